"""Small all-reduce by direct exchange (a one-level tree): one hop instead of 2(N-1).

Every peer sends its whole input to every other peer; each peer then reduces the N
contributions in rank order 0, 1, ..., N-1. All peers run the same sequence of
elementwise operations on the same bytes, so all end with identical bits. Cost: each
peer sends (N-1) x size, so ``algorithm="auto"`` uses it only below the measured
crossover; latency is one hop plus the FIN round, or one hop alone for a call of at most
``frames.TINY_BYTES``: its one frame per peer is the last thing each peer sends, so a FIN
after it would not narrow the window in which a broken link leaves one peer done and
another failed (the counted tags catch that case either way, see ``pccl_py/tags.py``).
"""

from __future__ import annotations

from .. import frames as F
from . import _kernels as K
from .base import Collective, Rx, expect, split


class DirectAllReduce(Collective):
    name = "tree"

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
        left = self._remaining.get(src, 0)
        expect(0 < h.length <= left, f"direct all-reduce: {h.length} more bytes from rank {src} than expected")
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
        w = self.link.world
        dst = self.dst
        if self.nbytes:
            dst[:] = self.slot(0)
            kop = "sum" if self.op == "avg" else self.op
            for r in range(1, w):
                K.reduce(dst, self.slot(r), kop, self.dtype)
            if self.op == "avg":
                K.finish_avg(dst, w, self.dtype)
        self.data_complete()
