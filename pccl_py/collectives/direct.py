"""Small all-reduce by direct exchange (a one-level tree): one hop instead of 2(N-1).

Every peer sends its whole input to every other peer; each peer then reduces the N
contributions in rank order 0, 1, ..., N-1. All peers run the same sequence of
elementwise operations on the same bytes, so all end with identical bits. Cost: each
peer sends (N-1) x size, so ``algorithm="auto"`` uses it only below the measured
crossover; latency is one hop plus the FIN round, or one hop alone for a call of at most
``frames.TINY_BYTES``: its one frame per peer is the last thing each peer sends, so a FIN
after it would not narrow the window in which a broken link leaves one peer done and
another failed (the counted tags catch that case either way, see ``pccl_py/daemon/tags.py``).
"""

from __future__ import annotations

from pccl_py import kernels as K
from pccl_py.collectives.base import Collective, Ranges, Rx, expect, split
from pccl_py.wire import frames as F


class DirectAllReduce(Collective):
    name = "direct"

    def __init__(self, link, *, src, dst, dtype: str, op: str, count: int, min_stripe: int, **kw):
        super().__init__(link, **kw)
        self.dtype, self.op = dtype, op
        self.item = K.itemsize(dtype)
        self.nbytes = count * self.item
        self.dst = dst
        self.min_stripe = max(self.item, min_stripe - min_stripe % self.item)
        w = link.world
        self.slots = memoryview(bytearray(w * self.nbytes))
        me = link.rank
        self.slot(me)[:] = src
        self.agree = not 0 < self.nbytes <= F.TINY_BYTES
        self._remaining = {r: self.nbytes for r in range(w) if r != me and self.nbytes}
        self._arrived = {r: Ranges() for r in self._remaining}

    def needs(self, rank: int) -> bool:
        if self.agree:
            return super().needs(rank)
        return rank in self._remaining  # no FIN round: once its frame is in, nothing more

    def slot(self, r: int):
        return self.slots[r * self.nbytes:(r + 1) * self.nbytes]

    def start(self) -> None:
        self.started = True
        lk = self.link
        mine = self.slot(lk.rank)
        it = self.item
        for r in range(lk.world):
            if r == lk.rank or not self.nbytes:
                continue
            k = lk.nstreams(r)
            parts = max(1, min(k, self.nbytes // self.min_stripe)) if self.agree else 1
            bd = split(self.nbytes // it, parts)
            for s in range(parts):
                a, b = bd[s] * it, bd[s + 1] * it
                if b > a:
                    self.send_data(r, (s + self.tag) % k, 0, a, mine[a:b], b - a)
        self._check_done()

    def on_data(self, src: int, h: F.Header, conn) -> Rx:
        self.check_desc(src, h)
        expect(h.step == 0 and h.quant == F.QUANT_NONE, "unexpected direct all-reduce frame")
        F.check_range(h, 0, self.nbytes, self.item)
        expect(h.length > 0 and src in self._arrived, f"direct all-reduce: unexpected frame from rank {src}")
        expect(self._arrived[src].add(h.offset, h.offset + h.length),
               f"direct all-reduce: frame [{h.offset}, +{h.length}) from rank {src} repeats bytes it already sent")
        self.count_rx(h, h.length)
        view = self.slot(src)[h.offset:h.offset + h.length]

        def finish(src=src, n=h.length):
            self._remaining[src] -= n
            if not self._remaining[src]:
                del self._remaining[src]
                self._check_done()

        return Rx(view, None, finish)

    def _check_done(self) -> None:
        if self._remaining or not self.started or self.data_done:
            return
        if self.nbytes:
            _fold(self.dst, self.slots, self.nbytes, self.link.world, self.op, self.dtype)
        self.data_complete()


def _fold(dst, slots, nbytes: int, world: int, op: str, dtype: str) -> None:
    """``dst`` = ``op`` over the world's contributions (rank r's at ``r * nbytes`` in ``slots``),
    in rank order 0..N-1."""
    K.fold([slots[r * nbytes:(r + 1) * nbytes] for r in range(world)], [dst], op, dtype)


class RootedAllReduce(Collective):
    """Tiny all-reduce (1..``frames.TINY_BYTES``) of three or more peers through rank 0.

    Every other peer sends its input to rank 0 (step 0), which reduces the N contributions
    in rank order and sends the result to each of them (step 1): 2(N-1) frames instead of
    the direct exchange's N(N-1), for one more hop. Only rank 0 computes, so every peer
    holds its bytes. No FIN round, as for a tiny direct exchange: a peer's one frame is all
    it owes (``needs``); rank 0 needs every contribution, the others only the result.
    """

    name = "direct"
    agree = False

    def __init__(self, link, *, src, dst, dtype: str, op: str, count: int, **kw):
        super().__init__(link, **kw)
        self.dtype, self.op = dtype, op
        self.item = K.itemsize(dtype)
        self.nbytes = count * self.item
        self.dst = dst
        w = link.world
        self._heard: set[int] = set()
        if link.rank == 0:
            self.slots = memoryview(bytearray(w * self.nbytes))
            self.slots[:self.nbytes] = src
            self._remaining = set(range(1, w))
        else:
            self.mine = bytes(src)  # the frame's payload: the caller may reuse src once we are done
            self._remaining = {0}

    def needs(self, rank: int) -> bool:
        return rank in self._remaining

    def start(self) -> None:
        self.started = True
        lk = self.link
        if lk.rank:
            self.send_data(0, self.tag % lk.nstreams(0), 0, 0, self.mine, self.nbytes)
        else:
            self._check_done()

    def on_data(self, src: int, h: F.Header, conn) -> Rx:
        self.check_desc(src, h)
        me = self.link.rank
        expect(h.quant == F.QUANT_NONE and h.offset == 0 and h.length == self.nbytes, "bad rooted all-reduce frame")
        expect(src in self._remaining and src not in self._heard and h.step == (0 if me == 0 else 1)
               and (me == 0 or src == 0), f"rooted all-reduce: unexpected frame (step {h.step}) from rank {src}")
        self._heard.add(src)  # at the header: a second frame while the first is still arriving is refused too
        self.count_rx(h, h.length)
        if me == 0:
            return Rx(self.slots[src * self.nbytes:(src + 1) * self.nbytes], None, lambda: self._got(src))
        return Rx(self.dst, None, self._got_result)  # the result lands in place

    def _got(self, src: int) -> None:
        self._remaining.discard(src)
        self._check_done()

    def _check_done(self) -> None:
        if self._remaining or not self.started or self.data_done:
            return
        n, w = self.nbytes, self.link.world
        _fold(self.dst, self.slots, n, w, self.op, self.dtype)
        out = bytes(self.dst)  # the caller may reuse dst once we are done; the frames may not be out
        for r in range(1, w):
            self.send_data(r, self.tag % self.link.nstreams(r), 1, 0, out, n)
        self.data_complete()

    def _got_result(self) -> None:  # rank 0 answers only once it has our frame: we started
        self._remaining.clear()
        self.data_complete()
