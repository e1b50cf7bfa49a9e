"""Bandwidth probes over the data plane's links (``DataPlane.probe``).

A probe measures one direction, this peer -> ``target``: ``nbytes`` of filler go out as
``PROBE`` frames striped over every stream of the link (frame tags and seals as for any
frame), the receiver counts them as they pass their integrity check and drops them, and
answers one ``PROBE_ACK`` once it has counted the probe's total. The rate is ``nbytes`` over
the time from the first frame queued to the acknowledgement read: it includes one round
trip, so a probe should be large enough for the transfer to dominate (8 MiB by default).

Frames of a probe carry the probe's id as their tag and ``PROBE_ATTEMPT`` as their attempt,
so they never share a call key (``frames.call_key``) with a collective.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from pccl_py.errors import Aborted, DeadlineExceeded, InvalidUsage, PeerLost
from pccl_py.wire import frames as F

if TYPE_CHECKING:
    from pccl_py.daemon.dataplane import DataPlane
    from pccl_py.daemon.peers import PeerStreams

PROBE_ATTEMPT = 0xFFFFFFFF
FRAME_BYTES = 1 << 20  # filler per frame (at most)
MAX_INCOMING = 256  # probes being counted at once (from all peers); the oldest is dropped beyond
_FILLER = memoryview(bytes(FRAME_BYTES))


class Probes:
    """The probes of one data plane: those it sends, and the counts of those it receives."""

    def __init__(self, dp: DataPlane) -> None:
        self.dp = dp
        self._next = 0
        self._sent: dict[tuple[str, int], asyncio.Future] = {}
        self._incoming: OrderedDict[tuple[str, int], int] = OrderedDict()

    async def probe(self, target: str, nbytes: int, timeout: float) -> tuple[float, float]:
        """Send ``nbytes`` to ``target`` and wait for its receipt: ``(bytes_per_s, seconds)``.
        Raises ``DeadlineExceeded`` after ``timeout`` seconds, ``PeerLost`` when the link
        is (or goes) down, ``InvalidUsage`` for a peer of no link."""
        if not 0 < nbytes <= F.MAX_PROBE:
            raise InvalidUsage(f"a probe sends 1 to {F.MAX_PROBE} bytes, not {nbytes}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        peer = self.dp._peers.get(target)
        if peer is None:
            raise InvalidUsage(f"probe: no data link to {target} in epoch {self.dp.epoch}")
        try:
            await asyncio.wait_for(asyncio.shield(peer.ready), timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"probe: the link to {target} is not up after {timeout:g} s") from None
        if peer.lost is not None:
            raise PeerLost(f"probe: the link to {target} is lost: {peer.lost}")
        self._next += 1
        key = (target, self._next)
        fut = loop.create_future()
        self._sent[key] = fut
        group = self.dp.topology.group if self.dp.topology is not None else 0
        per = max(1, min(FRAME_BYTES, -(-nbytes // peer.nstreams)))
        t0 = time.perf_counter()
        sent, stream = 0, 0
        try:
            while sent < nbytes:
                n = min(per, nbytes - sent)
                peer.send(stream, F.pack_header(F.PROBE, group, self.dp.epoch, self._next, PROBE_ATTEMPT, 0,
                                                nbytes, n), _FILLER[:n])
                sent += n
                stream = (stream + 1) % peer.nstreams
            try:
                await asyncio.wait_for(asyncio.shield(fut), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise DeadlineExceeded(f"probe of {nbytes} bytes to {target}: no receipt within {timeout:g} s") \
                    from None
        finally:
            self._sent.pop(key, None)
            if not fut.done():
                fut.cancel()
        seconds = max(time.perf_counter() - t0, 1e-9)
        return nbytes / seconds, seconds

    def bytes_in(self, peer: PeerStreams, h: F.Header) -> None:
        """A PROBE frame from ``peer`` passed its integrity check: count it; acknowledge the
        probe once its total is in."""
        key = (peer.peer_id, h.tag)
        got = self._incoming.pop(key, 0) + h.length
        if got < h.offset:
            self._incoming[key] = got
            while len(self._incoming) > MAX_INCOMING:
                self._incoming.popitem(last=False)
            return
        peer.send(0, F.pack_header(F.PROBE_ACK, h.group, self.dp.epoch, h.tag, PROBE_ATTEMPT, 0, got, 0), b"")

    def acked(self, peer: PeerStreams, h: F.Header) -> None:
        fut = self._sent.get((peer.peer_id, h.tag))
        if fut is not None and not fut.done():
            fut.set_result(h.offset)

    def lost(self, peer_id: str, reason: str) -> None:
        """The link to ``peer_id`` is down: its probes fail now."""
        for (pid, _), fut in list(self._sent.items()):
            if pid == peer_id and not fut.done():
                fut.set_exception(PeerLost(f"probe: the link to {peer_id} was lost: {reason}"))
        for key in [k for k in self._incoming if k[0] == peer_id]:
            del self._incoming[key]

    def close(self) -> None:
        for fut in self._sent.values():
            if not fut.done():
                fut.set_exception(Aborted("the data plane was closed"))
