"""Data plane: K authenticated TCP streams per peer link, frames read straight into place.
A peer of this host (and network namespace) is reached through a Unix socket instead
(``same_host_links``): the same streams and frames, half the kernel time per frame.

:class:`DataPlane` listens, keeps links to the current topology's peers, routes frames
to collectives by (epoch, tag, attempt), stalls streams whose frame belongs to an
operation not posted yet, and fails operations on link loss, abort, epoch change and
deadline. The streams themselves (``asyncio.BufferedProtocol`` reading straight into
place) are in :mod:`pccl_py.daemon.streams`.

The collectives themselves live in :mod:`pccl_py.collectives` and are written against
the small ``Link`` surface of :mod:`pccl_py.collectives.base`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from pccl_py import calls
from pccl_py import kernels as K
from pccl_py.collectives.base import Collective
from pccl_py.collectives.gather import BlobAllGather
from pccl_py.collectives.shm import ShmContext
from pccl_py.daemon.allreduce_plan import plan_all_reduce
from pccl_py.daemon.peers import GroupView, PeerStreams
from pccl_py.daemon.probe import Probes
from pccl_py.daemon.router import DELIVER, DIVERGED, STALL, Router
from pccl_py.daemon.stream_count import GROW, StreamCount, StreamCountConfig
from pccl_py.daemon.streams import LINGER, Stream
from pccl_py.daemon.topology import Topology
from pccl_py.errors import (
    Aborted,
    DeadlineExceeded,
    InvalidUsage,
    PcclError,
    PeerLost,
    ProtocolError,
    error_code,
)
from pccl_py.retry import Backoff
from pccl_py.transport import local
from pccl_py.transport.host_settings import round_trip
from pccl_py.transport.limits import Gate
from pccl_py.wire import frames as F

log = logging.getLogger("pccl.dataplane")

__all__ = ["DataPlane", "DataPlaneConfig"]


@dataclass(frozen=True)
class DataPlaneConfig:
    """Tuning knobs and bounds (defaults chosen by stress/bench_dataplane.py, docs/dataplane.md)."""

    # ring sub-chunk (the unit of pipelining between steps): chunk / pipeline_depth,
    # clamped to [min_sub_bytes, sub_bytes]
    sub_bytes: int = 4 << 20
    min_sub_bytes: int = 256 << 10
    pipeline_depth: int = 8
    # a ring sub-chunk is striped over at most sub/min_stripe streams (a direct exchange over
    # nbytes/min_stripe). Not in the call's descriptor, but every peer should use the same:
    # a ring forwards stripes as the peer that started them cut them. Small stripes spread
    # the forwarded (all-gather) data thinly over many streams, each of which then runs dry
    # between stripes: Linux marks such a flow application-limited and bbr, ignoring those
    # rounds, stays in startup and overfills the bottleneck (256 KiB: 19% of segments
    # resent on a 100 ms path with 16 streams; 2 MiB: 0.5%; dataplane.md)
    min_stripe: int = 2 << 20
    direct_max_bytes: int = 64 << 10  # algorithm="auto": direct exchange at or below this size
    shm: bool = True  # algorithm="auto": shared memory instead of the ring when the group shares a host
    same_host_links: bool = True  # peers on this host: Unix-socket links instead of TCP
    quant_block_bytes: int = 1 << 20  # float32 bytes per quantization block (own lo/scale)
    max_payload: int = 64 << 20  # bound on any frame's payload
    max_blob: int = 64 << 20  # bound on an all_gather blob
    # every frame followed by a 16-byte tag (transport/seal.py), and with encrypt its payload
    # encrypted too (encrypt implies integrity); every daemon of a run must agree
    integrity: bool = True
    encrypt: bool = False
    handshake_timeout: float = 5.0
    # accepted connections from one address not yet authenticated: above the 16 streams a
    # link of a long path opens at once (streams per link), or its own peer is turned away
    max_pending_per_address: int = 32
    connect_timeout: float = 5.0  # set_topology waits at most this long for links
    stall_timeout: float = 10.0  # a frame for an op never posted is dropped after this
    user_timeout: float = 10.0  # a link whose data stays unacknowledged this long is closed (0: never)
    memo: int = 65536  # remembered (tag -> attempt) entries per epoch
    # Frames with at least bulk_min payload bytes are moved (and reduced) by a receive and a
    # send thread per stream instead of the event loop (transport/pump.py). io_threads:
    # True, False, or None for "when the machine has more than 2 CPUs" (on 2 cores the
    # kernel's copies already use both, and a thread hand-off only adds latency).
    io_threads: bool | None = None
    bulk_min: int = 256 << 10
    # Streams per link chosen by measurement (stream_count.py): the link starts at the
    # data plane's ``streams`` and its connector adds streams between calls, doubling while
    # the calls' throughput over the link gains more than 10 %, up to max_streams.
    # False: every link keeps ``streams`` (the --streams N override).
    adapt_streams: bool = False
    max_streams: int = 16


def same_host_address(host: str, port: int) -> str | None:
    """The Unix socket of the daemon whose data plane peers dial at ``host:port``, in this
    user's private directory (transport/local.py); None if this user has none."""
    return local.socket_path(host, port)


def io_threads_on(setting: bool | None) -> bool:
    """Whether the data plane moves large frames on I/O threads (``DataPlaneConfig.io_threads``)."""
    if setting is None:
        env = os.environ.get("PCCL_IO_THREADS", "auto").strip().lower()
        if env in ("0", "off", "false", "no"):
            return False
        if env in ("1", "on", "true", "yes"):
            return True
        return K.usable_cpus() > 2
    return bool(setting)


# A dial turned away before the challenge (too many strangers wait at that port from our
# address) is tried again after these pauses, within connect_timeout.
_HANDSHAKE_MIN = 1.0  # seconds a connected dial waits for its handshake, even past its deadline
TURNED_AWAY_BACKOFF = Backoff(initial=0.05, maximum=0.5, factor=2.0, jitter=0.2)
# A failed call is reported once the frames it had written have left (at most this long;
# links still holding its frames then are closed): the caller may reuse that memory then,
# and a frame sent from changed memory would fail its integrity check at the peer.
FLUSH_GRACE = 1.0
_SAME_HOST_CONNECT = 1.0  # a same-host listener answers at once; beyond this, try TCP


class _Scratch:
    """The ``conn`` a held frame is delivered through: staging of its own (the stream that
    read the frame may be using its staging buffer for another frame by then)."""

    @staticmethod
    def staging(n: int) -> memoryview:
        return memoryview(bytearray(n))


class DataPlane:
    """Peer-to-peer collectives over K streams per link (see module docstring)."""

    def __init__(self, peer_id: str, *, secret: bytes = b"", streams: int = 4, host: str = "127.0.0.1",
                 port: int = 0, on_peer_failure: Callable[[str, str], None] | None = None,
                 config: DataPlaneConfig | None = None, advertise: str | None = None):
        if not 0 < len(peer_id.encode()) <= F.MAX_PEER_ID:
            raise InvalidUsage("peer_id must be 1..255 bytes of utf-8")
        if not 1 <= streams <= 64:
            raise InvalidUsage("streams must be between 1 and 64")
        self.peer_id = peer_id
        self.secret = bytes(secret)
        self.streams = streams
        self.host = host
        self.port = port
        self.advertise = advertise or host  # the host peers dial (names the same-host listener)
        self.on_peer_failure = on_peer_failure
        self.config = config or DataPlaneConfig()
        self.io_threads = io_threads_on(self.config.io_threads)
        self.bulk_min = self.config.bulk_min if self.io_threads else 0
        self.seal = (F.SEAL_ENCRYPT if self.config.encrypt else F.SEAL_TAG if self.config.integrity
                     else F.SEAL_NONE)
        self._limits = F.Limits(max_payload=max(self.config.max_payload, self.config.max_blob))
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # bound in start()
        self._server: asyncio.AbstractServer | None = None
        self.topology: Topology | None = None
        self.epoch = 0
        self._view: GroupView | None = None
        self._peers: dict[str, PeerStreams] = {}
        self.traffic: dict[str, list[int]] = {}  # peer id -> [bytes sent, bytes received]
        self._lost: dict[str, str] = {}
        self._conns: set[Stream] = set()
        self._stalled: set[Stream] = set()
        # which call a frame belongs to, attempts, held frames: sans-I/O (router.py)
        self.router = Router(memo=self.config.memo, stall_timeout=self.config.stall_timeout)
        self._ops = self.router.ops  # tag -> the collective posted here
        self._held_timer: asyncio.TimerHandle | None = None
        self._workers: list[concurrent.futures.ThreadPoolExecutor] | None = None  # see _offload
        self._shm = ShmContext()
        self._unix = None
        self._unix_path: tuple[str, int] | None = None
        # Accepted connections that have not proved the secret: a few per address, each for
        # at most handshake_timeout, and their ends told in summaries (transport/limits.py).
        # The daemon sets gate.count to its metrics counter.
        self.gate = Gate(f"data port {peer_id[:8]}", max_pending=self.config.max_pending_per_address)
        self._gate_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._superseded: asyncio.Future | None = None  # resolved when a newer topology is queued
        self.probes = Probes(self)  # bandwidth probes (probe.py)
        # streams per link by measurement (stream_count.py); None: fixed at ``streams``
        self.stream_count = StreamCount(StreamCountConfig(
            initial=streams, maximum=max(streams, min(self.config.max_streams, self._limits.max_streams)))) \
            if self.config.adapt_streams else None
        self._sampling: tuple[float, dict[str, tuple[int, int]]] | None = None  # see _launch
        self._growing: set[asyncio.Task] = set()  # add_streams started by the controller

    @property
    def behind(self) -> Callable[[int], bool] | None:
        """Set by the daemon: True for a tag this peer completed that a peer now runs again
        (see pccl_py.daemon.tags); None: no such check."""
        return self.router.behind

    @behind.setter
    def behind(self, fn: Callable[[int], bool] | None) -> None:
        self.router.behind = fn

    def tags_restarted(self) -> None:
        """The daemon's automatic tags count afresh (a vote round): frames of the old count
        will never find their call (``router.stale`` tells them); a stream stalled on one
        reads on."""
        self._retry_stalled()

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(lambda: Stream(self), self.host, self.port)
        addr = self._server.sockets[0].getsockname()
        self.port = addr[1]
        if self.config.same_host_links:
            self._unix = await self._listen_unix()
        return addr[0], addr[1]

    async def _listen_unix(self):
        """A second listener, on a Unix socket named after the address peers dial, in a
        directory only this user can enter: a peer of this user in this network namespace
        (so on this host) dials it instead of TCP."""
        path = same_host_address(self.advertise, self.port)
        if path is None:
            return None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # left by a daemon that died on this port (only this user writes here)
            s.bind(path)
            s.listen(64)
            self._unix_path = (path, os.stat(path).st_ino)
        except OSError as e:
            s.close()
            log.warning("no same-host (Unix-socket) listener at %s: %s; peers on this host that find no "
                        "listener there dial TCP", path, e)
            return None
        return await self._loop.create_unix_server(lambda: Stream(self), sock=s)

    # -- strangers (connections that have not proved the secret) -----------------------------
    def admit(self, stream: Stream, addr: str) -> bool:
        """An accepted connection from ``addr`` may start its handshake (False: close it now)."""
        ok, evict = self.gate.admit(addr, stream, self._loop.time())
        if evict is not None:
            evict._close("too many connections from its address wait for their handshake", why="too_many")
        self._tell_refusals()
        return ok

    def stranger_failed(self, stream: Stream, why: str) -> None:
        self.gate.failed(stream, why, self._loop.time())
        self._tell_refusals()

    def _tell_refusals(self, force: bool = False) -> None:
        for line in self.gate.summary(self._loop.time(), force=force):
            log.warning("%s", line)
        at = self.gate.wake_at
        if at is not None and self._gate_timer is None and not self._closed:
            def due() -> None:
                self._gate_timer = None
                self._tell_refusals()
            self._gate_timer = self._loop.call_at(at + 0.001, due)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.probes.close()
        for task in self._growing:
            task.cancel()
        if self._gate_timer is not None:
            self._gate_timer.cancel()
            self._gate_timer = None
        self._tell_refusals(force=True)
        self.abort(Aborted("the data plane was closed"))
        self._drop_held()
        for srv in (self._server, self._unix):
            if srv is not None:
                srv.close()
        if self._unix_path is not None:  # ours still (not a successor's on the same port)
            path, ino = self._unix_path
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == ino:
                    os.unlink(path)
        for peer in list(self._peers.values()):
            peer.close("data plane closed", graceful=True)
        self._peers.clear()
        drains = [c.drained for c in self._conns if c.drained is not None and not c.drained.done()]
        if drains:  # the peers' EOFs: our last frames (FINs) were read, nothing was reset
            await asyncio.wait(drains, timeout=LINGER)
        for c in list(self._conns):
            if c.transport is not None and not c.transport.is_closing():
                c.transport.abort()
        for srv in (self._server, self._unix):
            if srv is not None:
                await srv.wait_closed()
        self._shm.close()
        for w in self._workers or ():
            w.shutdown(wait=False)
        await asyncio.sleep(0)

    def abort(self, exc: PcclError) -> None:
        for op in list(self._ops.values()):
            self._fail_op(op, exc, tell_peers=True)

    # -- topology and links -----------------------------------------------------------------
    async def set_topology(self, topo: Topology) -> None:
        self._loop = asyncio.get_running_loop()
        if self._closed:
            raise Aborted("the data plane is closed")
        if self.topology is not None and topo.epoch < self.epoch:
            raise InvalidUsage(f"topology epoch {topo.epoch} is older than the current {self.epoch}")
        if topo.peers[topo.rank].peer_id != self.peer_id:
            raise InvalidUsage(f"topology rank {topo.rank} is {topo.peers[topo.rank].peer_id!r}, not us")
        if topo.epoch > self.epoch or self.topology is None:
            self._lost.clear()
            if self._held_timer is not None:  # the router drops every held frame (old epoch)
                self._held_timer.cancel()
                self._held_timer = None
        ended = self.router.set_topology(topo.epoch, topo.group, topo.rank, [p.peer_id for p in topo.peers])
        for op in ended:
            self._fail_op(op, Aborted(f"membership changed to epoch {topo.epoch}"), tell_peers=False)
        self.topology = topo
        self.epoch = topo.epoch
        self._view = GroupView(self, topo)
        members = {p.peer_id for p in topo.peers}
        for pid in list(self._peers):
            if pid not in members:
                peer = self._peers.pop(pid)
                peer.close("peer left the topology")
        if self.stream_count is not None:
            for pid in self.stream_count.links() - members:  # a peer that left: its counts go with it
                self.stream_count.forget(pid)
        for pid in list(self.traffic):
            if pid not in members:  # a peer that left: its counts go with it
                del self.traffic[pid]
        self._shm.forget(members)
        waits = []
        for p in topo.peers:
            if p.peer_id == self.peer_id:
                continue
            peer = self._peers.get(p.peer_id)
            if peer is None:
                if self.peer_id < p.peer_id:
                    peer = self._dial(p)
                else:
                    peer = PeerStreams(self, p.peer_id, connector=False, session=None, nstreams=1)
                self._peers[p.peer_id] = peer
            if not peer.ready.done():
                waits.append(peer.ready)
        self._retry_stalled()
        if waits:
            await self._links_up(topo.epoch, waits)

    def supersede(self, epoch: int) -> None:
        """The topology of ``epoch`` is queued behind the one being applied: if it is newer,
        stop waiting for the links of this one (a peer that died meanwhile would hold it for
        connect_timeout, and the newer epoch, which removes that peer, behind it)."""
        if self._superseded is not None and not self._superseded.done() and epoch > self.epoch:
            self._superseded.set_result(None)

    async def _links_up(self, epoch: int, waits: list[asyncio.Future]) -> None:
        self._superseded = self._loop.create_future()
        try:
            pending = set(waits)
            deadline = self._loop.time() + self.config.connect_timeout
            while pending and not self._superseded.done():
                left = deadline - self._loop.time()
                if left <= 0:
                    break
                _, pending = await asyncio.wait([*pending, self._superseded], timeout=left,
                                                return_when=asyncio.FIRST_COMPLETED)
                pending.discard(self._superseded)
            for f in waits:
                if f.done():
                    f.exception()
            if pending and self._superseded.done():
                log.info("epoch %d: %d of %d links not up when a newer epoch came; applying that one",
                         epoch, len(pending), len(waits))
            elif pending:
                log.warning("epoch %d: %d of %d links not up after %.1fs", epoch,
                            len(pending), len(waits), self.config.connect_timeout)
        finally:
            self._superseded = None

    def _dial(self, p) -> PeerStreams:
        # adapting: a new link to a peer measured before starts at the count decided for it
        k = self.stream_count.streams(p.peer_id) if self.stream_count is not None else self.streams
        peer = PeerStreams(self, p.peer_id, connector=True, session=int.from_bytes(os.urandom(8), "little"),
                           nstreams=k)

        async def go(i: int) -> None:
            if self.config.same_host_links and await self._dial_unix(p, peer, i):
                return
            await self._dial_tcp(p, peer, i)

        for i in range(k):
            self._loop.create_task(go(i))
        return peer

    async def _dial_tcp(self, p, peer: PeerStreams, i: int) -> None:
        """Connect stream ``i`` to ``p`` over TCP and complete the handshake within
        connect_timeout; the link is lost if it cannot."""
        why = await self._connect_tcp(p, peer, i, self._loop.time() + self.config.connect_timeout)
        if why is not None and peer.lost is None:
            self._peer_lost(peer, why)

    async def _connect_tcp(self, p, peer: PeerStreams, i: int, deadline: float) -> str | None:
        """Connect stream ``i`` to ``p`` over TCP and complete the handshake by ``deadline``:
        None once it is up, else why not. A listener that closes before its challenge has
        turned us away (too many connections from our address wait for their handshake
        there, as when a link opens or adds many streams at once): dial again, backing off."""
        pauses = dataclasses.replace(TURNED_AWAY_BACKOFF, deadline=max(deadline - self._loop.time(), 0.0)).delays()
        while True:
            if peer.lost is not None:
                return peer.lost
            left = deadline - self._loop.time()
            try:
                _, stream = await asyncio.wait_for(self._loop.create_connection(
                    lambda: Stream(self, peer, i), p.host, p.port), max(left, 0.001))
            except asyncio.TimeoutError:  # a path that drops everything: no refusal ever comes
                return f"cannot connect to {p.host}:{p.port}: no answer within {self.config.connect_timeout:.0f} s"
            except OSError as e:
                return f"cannot connect to {p.host}:{p.port}: {e}"
            # once connected, the handshake gets at least _HANDSHAKE_MIN: a dial abandoned after
            # its HELLO went out would reset a stream the acceptor may already have attached
            if await stream.established(max(deadline - self._loop.time(), _HANDSHAKE_MIN)):
                return None
            if peer.lost is not None:
                return peer.lost
            pause = next(pauses, None) if stream.refused else None
            if pause is None:
                return stream.close_reason or (f"no handshake with {p.host}:{p.port} within "
                                               f"{self.config.connect_timeout:.0f} s")
            await asyncio.sleep(pause)

    async def _dial_unix(self, p, peer, i: int) -> bool:
        """Connect stream ``i`` to ``p`` over its same-host Unix socket and complete the
        handshake; False where there is none (another host, user or network namespace: no
        such file) or where what answers does not complete the handshake in time."""
        path = same_host_address(p.host, p.port)
        if path is None:
            return False
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            await asyncio.wait_for(self._loop.sock_connect(s, path), _SAME_HOST_CONNECT)
            _, stream = await self._loop.create_unix_connection(lambda: Stream(self, peer, i), sock=s)
        except (OSError, asyncio.TimeoutError):
            s.close()
            return False
        if await stream.established(_SAME_HOST_CONNECT):
            return True
        log.warning("same-host link to %s at %s: no handshake within %.1fs; using TCP", p.peer_id, path,
                    _SAME_HOST_CONNECT)
        return False

    def _accept_peer(self, hello: F.Hello) -> PeerStreams | None:
        peer = self._peers.get(hello.peer_id)
        if peer is not None and peer.connector:
            return None  # we dial this peer; it must not dial us
        if peer is not None and peer.session is None:  # placeholder from set_topology
            peer.session = hello.session
            peer.nstreams = peer.announced = hello.nstreams
            peer.conns = [None] * hello.nstreams
        elif peer is None or peer.session != hello.session:
            if peer is not None:  # it is alive and dialling us: nothing to report
                self._peer_lost(peer, "peer reconnected with a new session", report=False)
            peer = PeerStreams(self, hello.peer_id, connector=False, session=hello.session, nstreams=hello.nstreams)
            self._peers[hello.peer_id] = peer
            self._lost.pop(hello.peer_id, None)
        if hello.stream < len(peer.conns) and peer.conns[hello.stream] is not None:
            return None
        if not peer.ready.done() and peer.nstreams != hello.nstreams:
            return None  # (a live link may gain streams: add_streams)
        peer.announced = max(peer.announced, hello.nstreams)
        log.debug("peer %s stream %d/%d up (its epoch %d)", hello.peer_id, hello.stream, hello.nstreams,
                  hello.epoch)
        return peer

    def _peer_lost(self, peer: PeerStreams, reason: str, *, report: bool = True) -> None:
        if peer.lost is not None:
            return
        peer.close(reason)
        pid = peer.peer_id
        if self._peers.get(pid) is peer:
            del self._peers[pid]
        self.probes.lost(pid, reason)
        if self._closed:
            return
        member = pid in self.router.rank_of
        # a link that ends while idle is usually a peer leaving; one that ends mid-call is news
        (log.warning if self._ops else log.info)("link to peer %s lost: %s", pid, reason)
        if not member:
            return
        self._lost[pid] = reason
        rank = self.router.rank_of[pid]
        for op in list(self._ops.values()):
            if not op.peer_lost(rank):
                continue  # we hold all we need from it (its data, and its FIN where there is one)
            self._fail_op(op, PeerLost(f"lost peer {pid}: {reason}"), tell_peers=True)
        if self.on_peer_failure is not None and report:
            try:
                self.on_peer_failure(pid, reason)
            except Exception:
                log.exception("on_peer_failure callback failed")

    # -- streams per link (stream_count.py) ----------------------------------------------------
    async def add_streams(self, target: str, n: int, timeout: float) -> int:
        """Bring the link to ``target`` to ``n`` streams: dial the missing ones (this peer
        dials that link) with the link's handshake, within ``timeout`` seconds; the count
        this side stripes over once no call runs (at most ``n``; fewer where a dial failed).
        A dial that fails does not fail the link. Raises ``InvalidUsage`` for a link this
        peer does not dial, ``PeerLost`` for a link that is down."""
        peer = self._peers.get(target)
        if peer is None or not peer.connector:
            raise InvalidUsage(f"add_streams: this peer does not dial a link to {target} in epoch {self.epoch} "
                               "(the peer with the smaller id dials)")
        if not 1 <= n <= self._limits.max_streams:
            raise InvalidUsage(f"add_streams: 1 to {self._limits.max_streams} streams, not {n}")
        if peer.lost is not None or not peer.ready.done():
            raise PeerLost(f"add_streams: the link to {target} is not up: {peer.lost or 'connecting'}")
        peer.limit = n
        # the streams missing below n, except those another add_streams is dialling
        missing = [i for i in range(n) if (i >= len(peer.conns) or peer.conns[i] is None) and i not in peer.dialing]
        if missing:
            p = next((q for q in self.topology.peers if q.peer_id == target), None)
            if p is None:
                raise PeerLost(f"add_streams: {target} left the topology")
            peer.announced = max(peer.announced, n)
            peer.dialing.update(missing)
            deadline = self._loop.time() + timeout
            try:
                got = await asyncio.gather(*(self._dial_more(p, peer, i, deadline) for i in missing))
            finally:
                peer.dialing.difference_update(missing)
            if peer.lost is not None:
                raise PeerLost(f"add_streams: the link to {target} was lost: {peer.lost}")
            log.info("link to %s: %d of %d new streams up", target, sum(got), len(missing))
        if not self._ops:
            peer.use_streams()
        return min(peer.attached, n)

    async def _dial_more(self, p, peer: PeerStreams, i: int, deadline: float) -> bool:
        """Dial stream ``i`` of a live link the way its first stream went (Unix socket or
        TCP); False when it is not up by ``deadline``, without failing the link."""
        first = peer.conns[0].transport if peer.conns and peer.conns[0] is not None else None
        sock = first.get_extra_info("socket") if first is not None else None
        if sock is not None and sock.family == socket.AF_UNIX:
            return await self._dial_unix(p, peer, i)
        if peer.lost is not None or deadline <= self._loop.time():
            return False
        why = await self._connect_tcp(p, peer, i, deadline)
        if why is not None:
            log.info("link to %s: stream %d not added: %s", p.peer_id, i, why)
        return why is None

    def _link_ready(self, peer: PeerStreams) -> None:
        """A link came up: with streams chosen by measurement, a link new to the controller
        starts at the count its round trip suggests (``StreamCountConfig.long_paths``); the
        dialling side adds the streams, the accepting side stripes over them once they are up."""
        if self.stream_count is None:
            return
        first = peer.conns[0] if peer.conns else None
        sock = first.transport.get_extra_info("socket") if first is not None and first.transport else None
        d = self.stream_count.start(peer.peer_id, round_trip(sock))
        if d.action != GROW:
            log.debug("streams to %s: %s", peer.peer_id, d.reason)
            return
        log.info("streams to %s: %s", peer.peer_id, d.reason)
        peer.limit = d.streams
        if peer.connector:
            self._grow_later(peer.peer_id, d.streams)

    def _streams_added(self, peer: PeerStreams) -> None:
        """A stream joined a live link: striped over once no call runs (see _settle). The
        accepting end of a link it has not measured yet takes the dialler's count as its start."""
        if self.stream_count is not None and not peer.connector:
            d = self.stream_count.follow(peer.peer_id, peer.announced)
            if d.action == GROW:
                log.info("streams to %s: %s", peer.peer_id, d.reason)
                peer.limit = d.streams
        if not self._ops:
            peer.use_streams()

    def _sample_streams(self, coll: Collective) -> None:
        """A call that ran alone succeeded: one sample per link, and the controller's
        decision applied to the streams this side stripes over (``limit``, in use from the
        next call). Both ends of a link run the controller on the same calls; the dialling
        end adds the streams a grow needs (in the background), the accepting end uses what
        it is given, up to its own decision."""
        t0, before = self._sampling
        seconds = time.perf_counter() - t0
        now = self._loop.time()
        for pid, (tx0, rx0) in before.items():
            peer = self._peers.get(pid)
            if peer is None or not peer.is_up:
                continue
            tx, rx = peer.traffic
            d = self.stream_count.sample(pid, now, max(tx - tx0, rx - rx0), seconds, peer.nstreams)
            (log.debug if d.action == "hold" else log.info)("streams to %s: %s %d (%s)", pid, d.action,
                                                              d.streams, d.reason)
            peer.limit = d.streams
            if d.action == GROW and peer.connector:
                self._grow_later(pid, d.streams)

    def _grow_later(self, pid: str, n: int) -> None:
        task = self._loop.create_task(self._grow(pid, n))
        self._growing.add(task)
        task.add_done_callback(self._growing.discard)

    async def _grow(self, pid: str, n: int) -> None:
        """The controller's grow: dial; where fewer streams came up, settle there."""
        try:
            got = await self.add_streams(pid, n, self.config.connect_timeout)
        except PcclError as e:
            log.info("streams to %s: not grown to %d: %s", pid, n, e)
            return
        if got < n and self.stream_count is not None:
            d = self.stream_count.reached(pid, got, self._loop.time())
            peer = self._peers.get(pid)
            if peer is not None:
                peer.limit = d.streams
                if not self._ops:
                    peer.use_streams()

    # -- bandwidth probes (probe.py) ----------------------------------------------------------
    async def probe(self, target: str, nbytes: int, timeout: float) -> tuple[float, float]:
        """Measure the link to ``target`` (this peer -> it): ``(bytes_per_s, seconds)`` for
        ``nbytes`` striped over its streams, timed until the receiver acknowledges them."""
        if self._closed:
            raise Aborted("the data plane is closed")
        return await self.probes.probe(target, nbytes, timeout)

    def probe_bytes_in(self, peer: PeerStreams, h: F.Header) -> None:
        if peer is self._peers.get(peer.peer_id):
            self.probes.bytes_in(peer, h)

    def probe_acked(self, peer: PeerStreams, h: F.Header) -> None:
        self.probes.acked(peer, h)

    # -- routing (the decisions are the router's: router.py) -----------------------------------
    def route(self, h: F.Header, peer: PeerStreams):
        """The router's verdict on a frame from ``link``; its reason is logged once, and a
        peer that retries a call this peer completed is told (DIVERGED; the frame is dropped)."""
        v = self.router.route(h, peer.peer_id)
        if v.note is not None:
            log.log(*v.note)
        if v.action == DIVERGED:
            self._tell_diverged(h, peer.peer_id)
        return v

    def _tell_diverged(self, h: F.Header, pid: str) -> None:
        """``pid`` runs a call this peer completed: it failed that call (its last FIN was
        lost) and retries it, while this peer went on. Pairing the retry with our next call
        would mix two steps, so the retry fails there with ``Diverged``, and that peer's
        next call takes the tag after it: it pairs with our next call, which keeps running."""
        text = (f"peers diverged: peer {pid} retries a call (tag {h.tag}) that peer {self.peer_id} completed, "
                f"because one of them lost the other's confirmation; the caller's state lacks that call's "
                f"result. Bring the peers in step again (sync_shared_state)")
        self._tell(pid, F.encode_error(h.group, h.epoch, h.tag, h.attempt, F.ERR_DIVERGED, text, h.desc))

    def _tell(self, pid: str, frame: bytes) -> None:
        """Send a control frame on every stream of the link: one may be stalled on a frame of
        a call the peer has not posted, and the frame must not wait behind it."""
        peer = self._peers.get(pid)
        if peer is not None:
            peer.send_all(frame)

    def stall_expired(self, h: F.Header, pid: str) -> None:
        """A DATA frame from ``pid`` waited ``stall_timeout`` for a call that was not posted
        here, and was dropped. Its call can no longer complete: tell the sender (its call
        fails now with ``Aborted`` instead of at its deadline); the router counts that
        attempt as made here, so that our post of the tag pairs with the sender's retry."""
        if not self.router.attempt_dropped(h, pid):
            return
        text = (f"peer {self.peer_id} did not post tag {h.tag} (attempt {h.attempt}) within "
                f"{self.config.stall_timeout}s and dropped its data")
        self._tell(pid, F.encode_error(h.group, h.epoch, h.tag, h.attempt, F.ERR_ABORTED, text, h.desc))

    # -- small frames for calls not posted yet ------------------------------------------------
    def can_hold(self, h: F.Header) -> bool:
        return self.router.can_hold(h)

    def hold(self, h: F.Header, peer: PeerStreams, conn: Stream, payload: bytearray) -> None:
        """A held frame's payload is in. Its call may have been posted meanwhile: route again."""
        if self._closed or peer is not self._peers.get(peer.peer_id):
            return
        v = self.route(h, peer)
        if v.action == DELIVER:
            self._deliver(v.op, v.src, h, conn, payload)
        elif v.action == STALL:
            self.router.hold(h, peer.peer_id, conn, payload, self._loop.time())
            if self._held_timer is None:
                self._held_timer = self._loop.call_later(self.config.stall_timeout, self._expire_held)

    def _expire_held(self) -> None:
        """Held frames whose call was not posted within ``stall_timeout`` are dropped (and
        their senders told), then the timer is set for the next one due."""
        self._held_timer = None
        for held in self.router.expired(self._loop.time() + 1e-3):
            h = held.h
            log.warning("dropping a frame for tag %d epoch %d from %s: no such operation posted within %.1fs",
                        h.tag, h.epoch, held.peer_id, self.config.stall_timeout)
            self.stall_expired(h, held.peer_id)
        due = self.router.next_deadline()
        if due is not None:
            self._held_timer = self._loop.call_at(due, self._expire_held)

    def _drop_held(self) -> None:
        self.router.drop_held()
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None

    def _apply_held(self, coll: Collective) -> None:
        """Deliver the held frames of a call just posted (in arrival order)."""
        for src, held in self.router.take_held(coll):
            if not coll.done:
                self._deliver(coll, src, held.h, held.source, held.payload)

    def _deliver(self, op: Collective, src: int, h: F.Header, conn: Stream, payload: bytearray) -> None:
        try:
            rx = op.on_data(src, h, _Scratch)
        except InvalidUsage as e:
            self._fail_op(op, e, tell_peers=True)
            return
        except ProtocolError as e:
            conn._protocol_error(e)
            return
        rx.view[:] = payload
        if rx.progress is not None:
            rx.progress(len(payload))
        try:
            rx.finish()
        except PcclError as e:
            self._fail_op(op, e, tell_peers=True)

    def _retry_stalled(self) -> None:
        for c in list(self._stalled):
            c.retry_stalled()

    def _unstall(self, c: Stream) -> None:
        self._stalled.discard(c)

    def _remote_error(self, op: Collective, src: int, code: int, msg: str) -> None:
        if op.done:
            return
        op.on_error(src, code, msg)
        self._finish_failed(op, tell_peers=False)

    def _fail_op(self, op: Collective, exc: PcclError, *, tell_peers: bool) -> None:
        if op.done:
            return
        op.fail(exc)
        self._finish_failed(op, tell_peers=tell_peers, exc=exc)

    def _finish_failed(self, op: Collective, *, tell_peers: bool, exc: PcclError | None = None) -> None:
        self.router.finish(op)
        key = F.call_key(op.link.epoch, op.tag, op.attempt)
        for pid in op.link.ids:
            peer = self._peers.get(pid)
            if peer is not None:
                peer.purge(key)  # its frames still waiting to be sent are withdrawn
        if tell_peers and exc is not None and op.link.epoch == self.epoch:
            frame = F.encode_error(op.link.group, op.link.epoch, op.tag, op.attempt, error_code(exc), str(exc),
                                   op.desc)
            for r in range(op.link.world):
                if r != op.link.rank:
                    op.link.send(r, 0, frame, b"")

    # -- collectives ------------------------------------------------------------------------
    def _offload(self, fn, done, key: int = 0) -> None:
        """Run ``fn()`` on one of this data plane's worker threads, then ``done(result,
        error)`` on the loop: the numeric work of a collective (quantizing, decoding) that
        would otherwise hold the loop while frames wait. Jobs of one ``key`` run on one
        thread, in order (work on one block never overlaps)."""
        if self._workers is None:
            self._workers = [concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"pccl-work{i}")
                             for i in range(max(1, min(4, K.usable_cpus() // 4)))]
        worker = self._workers[key % len(self._workers)]

        def settle(f: asyncio.Future) -> None:
            if f.cancelled():
                done(None, Aborted("the data plane was closed"))
            elif f.exception() is not None:
                done(None, f.exception())
            else:
                done(f.result(), None)

        self._loop.run_in_executor(worker, fn).add_done_callback(settle)

    def _group(self) -> GroupView:
        if self._closed:
            raise Aborted("the data plane is closed")
        if self._view is None:
            raise InvalidUsage("no topology yet: call set_topology() first")
        return self._view

    async def all_reduce(self, src, dst, *, dtype: str, op: str, quant: str | None = None,
                         algorithm: str = "auto", tag: int, timeout: float,
                         shm_refs: tuple[str, int, str, int] | None = None) -> dict:
        t0 = time.perf_counter()
        plan = self._plan_all_reduce(src, dst, dtype, op, quant, algorithm, tag, timeout, shm_refs)
        if plan is None:
            return _info(1, "single", t0, None)
        make, world, algo = plan
        coll = await self._run(make, tag, timeout, f"all_reduce tag={tag}")
        return _info(world, algo, t0, coll)

    def start_all_reduce(self, src, dst, *, dtype: str, op: str, quant: str | None = None,
                         algorithm: str = "auto", tag: int, timeout: float,
                         shm_refs: tuple[str, int, str, int] | None = None,
                         done: Callable[[dict | None, PcclError | None], None]) -> None:
        """``all_reduce`` without a coroutine: ``done(info, None)`` or ``done(None, error)``
        is called once the call has ended (from the event loop; possibly before this returns
        for a world of one). Bad arguments raise here, as ``all_reduce`` would."""
        t0 = time.perf_counter()
        plan = self._plan_all_reduce(src, dst, dtype, op, quant, algorithm, tag, timeout, shm_refs)
        if plan is None:
            done(_info(1, "single", t0, None), None)
            return
        make, world, algo = plan
        coll = self._launch(make, tag, timeout, f"all_reduce tag={tag}")

        def settle(fut: asyncio.Future) -> None:
            exc = fut.exception()
            if exc is not None:
                def report() -> None:
                    self._settle(coll)
                    done(None, exc)
                self._flushed(coll, report)
            else:
                self._settle(coll)
                done(_info(world, algo, t0, coll), None)

        coll.future.add_done_callback(settle)

    def _plan_all_reduce(self, src, dst, dtype, op, quant, algorithm, tag, timeout, shm_refs):
        """Check the arguments; ``(make(attempt) -> Collective, world, algorithm)``, or None when
        the world is this peer alone (the result is then already in ``dst``)."""
        return plan_all_reduce(self._group, src, dst, dtype=dtype, op=op, quant=quant, algorithm=algorithm,
                               tag=tag, timeout=timeout, config=self.config, shm_refs=shm_refs, shm=self._shm,
                               worker=self._offload if self.bulk_min else None, loop=self._loop)

    async def all_gather(self, blob: bytes, *, tag: int, timeout: float) -> list[bytes]:
        if len(blob) > self.config.max_blob:
            raise InvalidUsage(f"blob of {len(blob)} bytes exceeds max_blob={self.config.max_blob}")
        calls.check_tag(tag)
        calls.check_timeout(timeout)
        view = self._group()
        if view.world == 1:
            return [bytes(blob)]
        desc = F.descriptor("all_gather")
        coll = await self._run(lambda attempt: BlobAllGather(view, blob=blob, max_blob=self.config.max_blob,
                                                         loop=self._loop, tag=tag, attempt=attempt, desc=desc),
                               tag, timeout, f"all_gather tag={tag}")
        return coll.future.result()

    async def _run(self, make, tag: int, timeout: float, what: str) -> Collective:
        coll = self._launch(make, tag, timeout, what)
        try:
            await asyncio.shield(coll.future)
        except asyncio.CancelledError:
            self._fail_op(coll, Aborted(f"{what}: the caller cancelled"), tell_peers=True)
            raise
        except PcclError:
            flushed = self._loop.create_future()
            self._flushed(coll, lambda: flushed.done() or flushed.set_result(None))
            await flushed
            raise
        finally:
            self._settle(coll)
        return coll

    def _flushed(self, coll: Collective, then: Callable[[], None]) -> None:
        """``then()`` once every frame written so far to the failed call's peers has left
        this process (see FLUSH_GRACE); a link still holding some after the grace is closed.
        A call that succeeded needs no wait: its peers read all it sent."""
        marks = [(c, c.mark()) for pid in coll.link.ids if (peer := self._peers.get(pid)) is not None
                 for c in peer.conns if c is not None]
        deadline = self._loop.time() + FLUSH_GRACE

        def poll() -> None:
            nonlocal marks
            marks = [(c, m) for c, m in marks if not c.flushed(m)]
            if marks and self._loop.time() < deadline:
                self._loop.call_later(0.001, poll)
                return
            for c, _ in marks:
                c._close(f"frames of a failed call still unsent after {FLUSH_GRACE}s")
            then()

        poll()

    def _launch(self, make, tag: int, timeout: float, what: str) -> Collective:
        """Post a collective: it starts (or fails) now; ``_settle`` it once its future is done."""
        view = self._view
        coll = make(self.router.post(tag))
        self.router.add(coll)
        if self.stream_count is not None:  # sampled only if it runs alone (see _settle)
            self._sampling = (time.perf_counter(), {pid: tuple(p.traffic) for pid in view.ids
                                                    if (p := self._peers.get(pid)) is not None}) \
                if len(self._ops) == 1 else None
        lost = [pid for pid in view.ids if pid in self._lost]
        if not coll.agree:
            # Without a FIN round, a lost peer's frame held here is all this call needs from
            # it: the peers that had posted the call before it went completed with it.
            self._apply_held(coll)
            lost = [pid for pid in lost if coll.needs(view.ids.index(pid))]
        if lost:
            self._fail_op(coll, PeerLost(f"{what}: peer {lost[0]} was lost in epoch {view.epoch}: "
                                         f"{self._lost[lost[0]]}"), tell_peers=False)
        else:
            if not coll.done:  # (a held frame may have failed it: InvalidUsage)
                try:
                    coll.start()
                except PcclError as e:
                    self._fail_op(coll, e, tell_peers=True)
                except Exception as e:  # pragma: no cover - bug
                    log.exception("collective start failed")
                    self._fail_op(coll, Aborted(f"{what}: internal error {e!r}"), tell_peers=True)
                self._apply_held(coll)
            self._apply_ctrl(coll)
            self._retry_stalled()
        coll.timer = self._loop.call_later(timeout, self._deadline, coll, timeout, what)
        return coll

    def _settle(self, coll: Collective) -> None:
        coll.timer.cancel()
        coll.finished()
        self.router.finish(coll)
        if self._ops:
            return
        if self._sampling is not None and self.stream_count is not None:
            if coll.future.done() and not coll.future.cancelled() and coll.future.exception() is None:
                self._sample_streams(coll)
            self._sampling = None
        for peer in self._peers.values():  # streams added (or limited) during the call: in use now
            peer.use_streams()

    def _deadline(self, coll: Collective, timeout: float, what: str) -> None:
        missing = [coll.link.ids[r] for r in range(coll.link.world)
                   if r != coll.link.rank and r not in coll._fins]
        state = "waiting for FIN from " + ", ".join(missing) if coll.data_done else "data incomplete"
        self._fail_op(coll, DeadlineExceeded(f"{what} did not finish within {timeout}s ({state})"), tell_peers=True)

    # -- control frames for ops not posted yet ------------------------------------------------
    def _apply_ctrl(self, coll: Collective) -> None:
        for pid, kind, code, msg in self.router.take_ctrl(coll):
            if coll.done or pid not in coll.link.ids:
                continue
            src = coll.link.ids.index(pid)
            if kind == F.FIN:
                coll.on_fin(src, code)
            else:
                self._remote_error(coll, src, code, msg)

    def _remember_ctrl(self, h: F.Header, peer_id: str, msg: str) -> None:
        self.router.remember_ctrl(h, peer_id, msg)


def _info(world: int, algo: str, t0: float, coll: Collective | None) -> dict:
    info = {"world_size": world, "algorithm": algo, "seconds": time.perf_counter() - t0,
            "tx_bytes": 0, "rx_bytes": 0, "tx_logical": 0, "rx_logical": 0}
    if coll is not None:
        info.update(coll.info())
    return info
