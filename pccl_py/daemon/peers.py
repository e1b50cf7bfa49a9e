"""The K streams to one peer, and the ``Link`` a collective sees (:mod:`pccl_py.collectives.base`).

* :class:`PeerStreams` -- the K streams to one peer (``session`` groups them), with a queue for
  frames sent before the link is up, and the clean-EOF grace across its streams. The
  connector may add streams to a live link (``DataPlane.add_streams``); a receiver places
  every frame by its header, whatever stream brought it, so each side stripes over the
  streams it has without the other agreeing on a count.
* :class:`GroupView` -- ranks of one topology mapped to links: what a collective sends on.

Routing decisions, failures and deadlines belong to :class:`pccl_py.daemon.dataplane.DataPlane`;
these classes call back into it.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING

from pccl_py.collectives.base import SPREAD
from pccl_py.daemon.streams import Stream
from pccl_py.daemon.topology import Topology
from pccl_py.errors import PeerLost
from pccl_py.wire import frames as F

if TYPE_CHECKING:
    from pccl_py.daemon.dataplane import DataPlane

_EOF_GRACE = 0.05  # after one stream's clean EOF, how long the others may take to drain


class PeerStreams:
    """The streams to one peer; frames sent before it is up wait in a queue."""

    def __init__(self, dp: DataPlane, peer_id: str, *, connector: bool, session: int | None,
                 nstreams: int):
        self.dp = dp
        self.peer_id = peer_id
        self.connector = connector
        self.session = session
        self.nstreams = nstreams  # the streams this side stripes over (all of them until up)
        self.conns: list[Stream | None] = [None] * nstreams
        self.announced = nstreams  # the count a HELLO from this side names (grows with add_streams)
        self.limit: int | None = None  # stripe over at most this many (None: every stream up)
        self.dialing: set[int] = set()  # (connector) stream indices add_streams is dialling
        self.ready = dp._loop.create_future()
        self.lost: str | None = None
        self._queue: list[tuple[int, bytes, object]] = []
        # SPREAD frames not handed to a stream yet: each goes to the next stream that has
        # sent what it was given (feed), so the streams finish together however unequal
        self._spread: collections.deque[tuple[bytes, object]] = collections.deque()
        self._turn = 0  # the stream feed offers a frame first (the streams take turns)
        self._up = 0
        self._eofs = 0
        self._eof_timer: asyncio.TimerHandle | None = None
        # [bytes sent, bytes received] to and from this peer, headers included; kept by the
        # data plane per peer id, so it adds up across the links of successive epochs
        self.traffic = dp.traffic.setdefault(peer_id, [0, 0])

    def attach(self, conn: Stream, stream: int) -> None:
        if self.lost is not None:
            conn._close(f"link to {self.peer_id} already lost")
            return
        if stream >= len(self.conns):
            self.conns.extend([None] * (stream + 1 - len(self.conns)))
        self.conns[stream] = conn
        self._up += 1
        if self.ready.done():  # a stream added to the live link: in use once no call runs
            self.dp._streams_added(self)
            return
        if self._up == self.nstreams:
            q, self._queue = self._queue, []
            for s, h, p in q:
                if s == SPREAD:
                    self._spread.append((h, p))
                else:
                    self.conns[s % self.nstreams].write(h, p)
            if not self.ready.done():
                self.ready.set_result(None)
                self.dp._link_ready(self)
            self.feed()

    def stream_eof(self) -> None:
        """One stream ended cleanly: lost once all have (their data read), or after a grace."""
        self._eofs += 1
        reason = "connection closed by the peer"
        if self._eofs >= self._up:
            self.dp._peer_lost(self, reason)
        elif self._eof_timer is None:
            self._eof_timer = self.dp._loop.call_later(_EOF_GRACE, self.dp._peer_lost, self, reason)

    @property
    def is_up(self) -> bool:
        return self.ready.done() and self.lost is None

    @property
    def attached(self) -> int:
        """Streams up from index 0 without a gap (the ones a sender may stripe over)."""
        n = 0
        while n < len(self.conns) and self.conns[n] is not None:
            n += 1
        return n

    def use_streams(self) -> int:
        """Take the streams up (at most ``limit``) for striping from now on; the count. Only
        between calls: a call stripes over one count from start to end."""
        if self.ready.done() and self.lost is None:
            n = self.attached
            self.nstreams = max(1, min(n, self.limit) if self.limit is not None else n)
        return self.nstreams

    def purge(self, key: bytes) -> None:
        self._queue = [x for x in self._queue if x[1][F.CALL_KEY_AT] != key]
        if self._spread:
            self._spread = collections.deque(x for x in self._spread if x[0][F.CALL_KEY_AT] != key)
        for c in self.conns:
            if c is not None:
                c.purge(key)

    def send(self, stream: int, header: bytes, payload) -> None:
        if self.lost is not None:
            return
        self.traffic[0] += len(header) + len(payload)
        if not self.ready.done():
            self._queue.append((stream, header, payload))
        elif stream == SPREAD:
            self._spread.append((header, payload))
            self.feed()
        else:
            self.conns[stream % self.nstreams].write(header, payload)

    def feed(self) -> None:
        """Hand queued SPREAD frames to the streams striped over that want one (each has
        sent what it was given: see Stream.wants_frame), taking turns. Called when such a
        frame is queued and whenever a stream has sent its frames."""
        spread = self._spread
        if not spread or self.lost is not None:
            return
        n = self.nstreams
        i, refused = self._turn, 0  # refused: streams in a row that wanted nothing
        while spread and refused < n:
            c = self.conns[i % n]
            if c is not None and c.wants_frame():
                c.write(*spread.popleft())
                refused = 0
            else:
                refused += 1
            i += 1
        self._turn = i % n

    def send_all(self, frame: bytes) -> None:
        """A control frame on every stream up, those this side does not stripe over too:
        the peer may stripe over more, and any of them may be stalled."""
        if self.lost is not None:
            return
        if not self.ready.done():
            for stream in range(self.nstreams):
                self.send(stream, frame, b"")
            return
        for c in self.conns:
            if c is not None:
                self.traffic[0] += len(frame)
                c.write(frame, b"")

    def close(self, reason: str, graceful: bool = False) -> None:
        if self.lost is None:
            self.lost = reason
        if self._eof_timer is not None:
            self._eof_timer.cancel()
            self._eof_timer = None
        self._queue = []
        self._spread.clear()
        if not self.ready.done():
            self.ready.set_exception(PeerLost(f"link to {self.peer_id}: {reason}"))
            self.ready.exception()
        for c in self.conns:
            if c is not None:
                c.shut(graceful)


class GroupView:
    """The ``Link`` a collective sees: ranks of one topology mapped to peer links."""

    def __init__(self, dp: DataPlane, topo: Topology):
        self.dp = dp
        self.rank = topo.rank
        self.world = len(topo.peers)
        self.group = topo.group
        self.epoch = topo.epoch
        self.ids = [p.peer_id for p in topo.peers]
        # every daemon of the group advertises the same host: they share a machine
        self.colocated = self.world > 1 and len({p.host for p in topo.peers}) == 1

    def send(self, rank: int, stream: int, header: bytes, payload) -> None:
        peer = self.dp._peers.get(self.ids[rank])
        if peer is not None:
            peer.send(stream, header, payload)

    def nstreams(self, rank: int) -> int:
        peer = self.dp._peers.get(self.ids[rank])
        return peer.nstreams if peer is not None else 1

    def fail_here(self, op, exc) -> None:
        self.dp._fail_op(op, exc, tell_peers=True)
