"""Ring all-reduce: reduce-scatter then all-gather, pipelined in sub-chunks, striped.

The buffer is cut into N chunks; each chunk is cut into sub-chunks (about 1/``depth`` of
a chunk, clamped to [``min_sub_bytes``, ``sub_bytes``]); step 0 sends a sub-chunk as
max(1, min(K, sub // ``min_stripe``)) stripes, each a frame that goes to whichever of the
link's K streams has sent what it was given (``SPREAD``). At step t
(0 <= t < 2(N-1)) rank r sends chunk (r - t) mod N to its right neighbour and receives
chunk (r - t - 1) mod N from its left one. Steps t < N-1 reduce the received stripes into ``dst``
(reduce-scatter); steps t >= N-1 write them straight into ``dst`` (all-gather).

There is no barrier between steps: the moment a stripe of step t is in (and reduced) its
bytes are forwarded at step t+1 (the chunk received at step t is the one sent at step
t+1), as they came or split again where the sender striped more coarsely than this side
would; a sub-chunk is complete (counted) once all its bytes are in. Forwarding stripe by
stripe keeps one stream's loss recovery from holding up what the others brought. A frame
may not repeat a byte of its step that an earlier frame brought, and an all-gather frame is
taken only for bytes this peer has already forwarded at the reduce-scatter step that
received the same chunk (no honest neighbour has them sooner). After
the last reduce-scatter step rank r owns chunk (r + 1) mod N fully
reduced; for ``avg`` it divides it there, once, before forwarding, so every peer ends
with the owner's bytes (bit parity).

Reduce-scatter stripes are received straight into ``dst`` and combined there with the
local input (``dst = received (op) src``; every op is commutative elementwise), so
there is no staging copy and no up-front copy of ``src``. Step 0 sends from ``src``.
Only when ``src`` and ``dst`` overlap (an in-place call) does the ring copy ``src`` to
``dst`` first and receive reduce-scatter stripes into a per-stream staging buffer.
"""

from __future__ import annotations

import numpy as np

from pccl_py import kernels as K
from pccl_py.collectives.base import SPREAD, Collective, Ranges, Rx, pieces, split
from pccl_py.errors import ProtocolError
from pccl_py.wire import frames as F


class RingPlan:
    """Sans-I/O schedule: chunk bounds, sub-chunks and stripes, in elements."""

    def __init__(self, count: int, world: int, rank: int, item: int, sub_bytes: int,
                 min_stripe: int, min_sub_bytes: int = 0, depth: int = 1):
        self.count = count
        self.world = world
        self.rank = rank
        self.item = item
        chunk_bytes = -(-count // world) * item
        sub = min(sub_bytes, max(min_sub_bytes, chunk_bytes // max(1, depth)))
        self.sub_elems = max(1, sub // item)
        self.min_stripe_elems = max(1, min_stripe // item)
        self.bounds = split(count, world)
        self._subs: dict[int, list[tuple[int, int]]] = {}

    def chunk(self, c: int) -> tuple[int, int]:
        return self.bounds[c], self.bounds[c + 1]

    def send_chunk(self, t: int) -> int:
        return (self.rank - t) % self.world

    def recv_chunk(self, t: int) -> int:
        return (self.rank - t - 1) % self.world

    def subs(self, c: int) -> list[tuple[int, int]]:
        got = self._subs.get(c)
        if got is None:
            a, b = self.chunk(c)
            got = self._subs[c] = pieces(a, b, self.sub_elems)
        return got

    def stripes(self, a: int, b: int, k: int) -> list[tuple[int, int]]:
        n = b - a
        parts = max(1, min(k, n // self.min_stripe_elems))
        bd = split(n, parts)
        return [(a + bd[i], a + bd[i + 1]) for i in range(parts) if bd[i + 1] > bd[i]]

    @property
    def steps(self) -> int:
        return 2 * (self.world - 1)


class RingAllReduce(Collective):
    name = "ring"

    def __init__(self, link, *, src, dst, dtype: str, op: str, count: int, sub_bytes: int,
                 min_stripe: int, min_sub_bytes: int = 0, depth: int = 1, **kw):
        super().__init__(link, **kw)
        self.dtype = dtype
        self.op = op
        self.kop = "sum" if op == "avg" else op
        self.item = K.itemsize(dtype)
        self.src = src
        self.dst = dst
        self.inplace = np.shares_memory(np.frombuffer(src, np.uint8), np.frombuffer(dst, np.uint8))
        self.plan = RingPlan(count, link.world, link.rank, self.item, sub_bytes, min_stripe,
                             min_sub_bytes, depth)
        self.left = (link.rank - 1) % link.world
        self.right = (link.rank + 1) % link.world
        # remaining bytes per (step, sub index) still to arrive
        self._remaining: dict[tuple[int, int], int] = {}
        self._arrived: dict[tuple[int, int], Ranges] = {}  # per (step, sub index): frames' ranges
        # bytes of a reduce-scatter step t received, reduced and forwarded, where step t + N
        # gathers the same chunk: no honest left neighbour sends them at t + N before that
        self._forwarded: dict[tuple[int, int], Ranges] = {}
        self._units = 0
        for t in range(self.plan.steps):
            for j, (a, b) in enumerate(self.plan.subs(self.plan.recv_chunk(t))):
                self._remaining[(t, j)] = (b - a) * self.item
                self._arrived[(t, j)] = Ranges()
                if t + self.plan.world < self.plan.steps:
                    self._forwarded[(t, j)] = Ranges()
                self._units += 1
        if self.inplace:
            s8, d8 = np.frombuffer(src, np.uint8), np.frombuffer(dst, np.uint8)
            if s8.ctypes.data != d8.ctypes.data:
                np.copyto(d8, s8.copy())

    def start(self) -> None:
        self.started = True
        for a, b in self.plan.subs(self.plan.send_chunk(0)):
            self._send_range(0, a, b, self.src)
        if self._units == 0:
            self.data_complete()

    def _send_range(self, t: int, a: int, b: int, buf=None, parts: int | None = None) -> None:
        it = self.item
        buf = self.dst if buf is None or self.inplace else buf
        for x, y in self.plan.stripes(a, b, parts or self.link.nstreams(self.right)):
            self.send_data(self.right, SPREAD, t, x * it, buf[x * it:y * it], (y - x) * it)

    def on_data(self, src: int, h: F.Header, conn) -> Rx:
        self.check_desc(src, h)
        plan, it = self.plan, self.item
        if src != self.left or h.step >= plan.steps or h.quant != F.QUANT_NONE or not h.length:
            raise ProtocolError(f"unexpected ring frame from rank {src} (left is {self.left}): step {h.step}, "
                                f"quant {h.quant}, length {h.length}")
        a, b = plan.chunk(plan.recv_chunk(h.step))
        F.check_range(h, a * it, b * it, it)
        j = (h.offset // it - a) // plan.sub_elems
        key = (h.step, j)
        sa = a + j * plan.sub_elems
        if h.offset + h.length > min(b, sa + plan.sub_elems) * it:
            raise ProtocolError(f"ring frame [{h.offset}, +{h.length}) overruns sub-chunk {j} of step {h.step}")
        if h.step >= plan.world and not self._forwarded[(h.step - plan.world, j)].covers(h.offset, h.offset + h.length):
            raise ProtocolError(f"ring frame [{h.offset}, +{h.length}) of step {h.step} gathers bytes this peer "
                                f"has not reduced yet (step {h.step - plan.world})")
        if not self._arrived[key].add(h.offset, h.offset + h.length):
            raise ProtocolError(f"ring frame [{h.offset}, +{h.length}) of step {h.step} repeats bytes "
                                f"rank {src} already sent")
        self.count_rx(h, h.length)
        dst = self.dst[h.offset:h.offset + h.length]
        if h.step >= plan.world - 1:  # all-gather: straight into dst
            return Rx(dst, None, lambda: self._got(key, h.offset, h.length))
        if self.inplace:
            return _ReduceRx(self, dst, conn.staging(h.length), key, h.offset, h.length).rx()
        return _ReduceRx(self, dst, self.src[h.offset:h.offset + h.length], key, h.offset, h.length).rx_in_place()

    def _got(self, key: tuple[int, int], offset: int, n: int) -> None:
        """Bytes [offset, offset + n) of step t's sub-chunk j are in (and reduced): forward
        them at step t + 1 now, not once the whole sub-chunk is in, so that a stream held up
        by loss recovery holds up only what it carries."""
        if self.done:  # failed while this stripe came in: nothing more goes out
            return
        t, j = key
        plan, it = self.plan, self.item
        forwarded = self._forwarded.get(key)
        if forwarded is not None:
            forwarded.add(offset, offset + n)
        if t == plan.world - 2 and self.op == "avg":
            K.finish_avg(self.dst[offset:offset + n], plan.world, self.dtype)
        if t + 1 < plan.steps:
            a, b = offset // it, (offset + n) // it
            sa, sb = plan.subs(plan.recv_chunk(t))[j]
            # in as many pieces as its share of the sub-chunk would be striped into (at least 1)
            parts = -(-self.link.nstreams(self.right) * (b - a) // (sb - sa))
            self._send_range(t + 1, a, b, parts=parts)
        left = self._remaining[key] - n
        self._remaining[key] = left
        if left:
            return
        self._units -= 1
        if self._units == 0:
            self.data_complete()


class _ReduceRx:
    """Receives one stripe and reduces it as bytes arrive: either into dst, then
    ``dst (op)= src`` (``other`` is the local input), or into staging, then
    ``dst (op)= staging`` (``other`` is the staging buffer; in-place calls)."""

    __slots__ = ("ring", "dst", "stg", "key", "offset", "n", "done")

    def __init__(self, ring: RingAllReduce, dst, other, key, offset: int, n: int):
        self.ring, self.dst, self.stg, self.key, self.offset, self.n = ring, dst, other, key, offset, n
        self.done = 0

    def rx(self) -> Rx:
        return Rx(self.stg, self.progress, self.finish, self)

    def rx_in_place(self) -> Rx:
        return Rx(self.dst, self.progress, self.finish, self)

    def pair(self):
        """(acc, other, op, dtype) of ``acc (op)= other``: what ``progress`` computes."""
        return self.dst, self.stg, self.ring.kop, self.ring.dtype

    def progress(self, got: int) -> None:
        r = self.ring
        k = got - got % r.item
        if k - self.done >= 65536 or k == self.n:
            K.reduce(self.dst[self.done:k], self.stg[self.done:k], r.kop, r.dtype)
            self.done = k

    def finish(self) -> None:
        if self.done < self.n:
            r = self.ring
            K.reduce(self.dst[self.done:self.n], self.stg[self.done:self.n], r.kop, r.dtype)
            self.done = self.n
        self.ring._got(self.key, self.offset, self.n)
