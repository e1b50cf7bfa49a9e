"""Quantized all-reduce (float32 only): every value is quantized exactly twice, whatever N.

1. Reduce-scatter by direct send: chunk c of every peer's input is quantized once (per
   block, min-max affine, ``lo``/``scale`` in the frame header) and sent straight to
   chunk c's owner (rank c). No peer ever re-quantizes a partial sum, so the error does
   not grow with the world size.
2. The owner accumulates in float32 with the fused dequant-add kernel, its own
   contribution exact; ``avg`` divides once.
3. The owner quantizes each finished block once, keeps dequantize(codes) in its own
   ``dst`` -- exactly what it sends -- and sends the codes to every peer (all-gather by
   direct send). Every peer dequantizes the same codes with the same parameters, so
   all hold identical bytes.
"""

from __future__ import annotations

import math

import numpy as np

from pccl_py import kernels as K
from pccl_py.collectives.base import SPREAD, Collective, Rx, expect, pieces, split
from pccl_py.errors import Aborted, InvalidUsage, PcclError
from pccl_py.wire import frames as F


def _finite(params: tuple[float, float], what: str) -> tuple[float, float]:
    lo, scale = params
    if not (math.isfinite(lo) and math.isfinite(scale)):
        raise InvalidUsage(f"quantized all-reduce: the {what} holds NaN or infinity (or overflows float32); "
                           "quantization needs finite values")
    return lo, scale


def code_bytes(n: int, quant: int) -> int:
    return n if quant == F.QUANT_U8 else (n + 1) // 2


class QuantAllReduce(Collective):
    name = "quant"

    def __init__(self, link, *, src, dst, op: str, count: int, quant: str, block_bytes: int, worker=None, **kw):
        super().__init__(link, **kw)
        # worker(fn, done): run fn() on one thread of the data plane (in order), then
        # done(result, error) on the loop; None: the numeric work runs on the loop.
        self._worker = worker
        self.op = op
        self.q = F.QUANT_BY_NAME[quant]
        self.quantize = K.quantize_u8 if self.q == F.QUANT_U8 else K.quantize_u4
        self.dequantize = K.dequantize_u8 if self.q == F.QUANT_U8 else K.dequantize_u4
        self.dequant_add = K.dequant_add_u8 if self.q == F.QUANT_U8 else K.dequant_add_u4
        self.src = src
        self.dst = dst
        w, me = link.world, link.rank
        belems = max(2, (block_bytes // 4) & ~1)  # even, so 4-bit blocks pack whole bytes
        bounds = split(count, w)
        # per chunk: list of (elem start, elem stop, code offset)
        self.blocks: list[list[tuple[int, int, int]]] = []
        self.block_at: dict[tuple[int, int], int] = {}
        off = 0
        for c in range(w):
            lst = []
            for a, b in pieces(bounds[c], bounds[c + 1], belems):
                self.block_at[(c, a * 4)] = len(lst)
                lst.append((a, b, off))
                off += code_bytes(b - a, self.q)
            self.blocks.append(lst)
        self.codes = np.empty(off, np.uint8)
        self.cview = memoryview(self.codes)
        self.own_pending = [w - 1] * len(self.blocks[me])
        self._seen: set[tuple[int, int]] = set()
        self._units = sum(len(b) for b in self.blocks)
        # With a worker, the peers' contributions to our blocks are added after the stream
        # has read on, so each lands in a slot of its own: one per (peer, block), in one
        # buffer per call (made at the first contribution).
        own = self.blocks[me]
        self._own_base = own[0][2] if own else 0
        self._own_len = sum(code_bytes(b - a, self.q) for a, b, _ in own)
        self._inbox: memoryview | None = None

    def _slot(self, src: int, off: int, n: int) -> memoryview:
        """Where the codes of peer ``src``'s contribution at code offset ``off`` are read."""
        if self._inbox is None:
            self._inbox = memoryview(np.empty((self.link.world - 1) * self._own_len, np.uint8))
        start = (src - (src > self.link.rank)) * self._own_len + off - self._own_base
        return self._inbox[start:start + n]

    # -- numeric work: on the loop, or in order on the data plane's worker thread -------------
    def _do(self, fn, then, key: int = 0) -> None:
        """``then(fn())``. With a worker, ``fn`` runs there (it touches only this call's
        buffers; jobs of one ``key``, the block they work on, run in order on one thread,
        so work on one block never overlaps) and ``then`` on the loop, unless the call
        ended meanwhile."""
        if self._worker is None:
            then(fn())
            return
        self._worker(fn, lambda res, exc: self._after(then, res, exc), key)

    def _after(self, then, res, exc) -> None:
        if self.done:
            return
        try:
            if exc is not None:
                raise exc
            then(res)
        except PcclError as e:
            self.link.fail_here(self, e)
        except Exception as e:  # pragma: no cover - a kernel bug
            self.link.fail_here(self, Aborted(f"quantized all-reduce: internal error {e!r}"))

    def start(self) -> None:
        self.started = True
        lk = self.link
        for j, (a, b, _) in enumerate(self.blocks[lk.rank]):  # before anything is added to it
            self._do(lambda a=a, b=b: K.copy(self.dst[a * 4:b * 4], self.src[a * 4:b * 4]), lambda _: None, j)
        for c in range(lk.world):
            if c == lk.rank:
                continue
            for i, (a, b, off) in enumerate(self.blocks[c]):
                cb = self.cview[off:off + code_bytes(b - a, self.q)]

                def encode(a=a, b=b, cb=cb):
                    return _finite(self.quantize(self.src[a * 4:b * 4], cb), "input")

                def send(params, c=c, a=a, b=b, cb=cb):
                    self.send_data(c, SPREAD, 0, a * 4, cb, (b - a) * 4, elems=b - a, quant=self.q,
                                   lo=params[0], scale=params[1])

                self._do(encode, send, i)
        self._maybe_done()

    def on_data(self, src: int, h: F.Header, conn) -> Rx:
        self.check_desc(src, h)
        me = self.link.rank
        expect(h.quant == self.q, f"quantization kind {h.quant} differs from {self.q}")
        expect(h.step in (0, 1), f"quantized all-reduce step {h.step} out of range")
        owner = me if h.step == 0 else src
        idx = self.block_at.get((owner, h.offset))
        expect(idx is not None, f"quantized frame at offset {h.offset} is not a block start")
        a, b, off = self.blocks[owner][idx]
        expect(h.elems == b - a, f"quantized block of {h.elems} elements, expected {b - a}")
        key = (src, idx) if h.step == 0 else (-1 - src, idx)
        expect(key not in self._seen, f"duplicate quantized block {idx} from rank {src}")
        self._seen.add(key)
        self.count_rx(h, h.elems * 4)
        dst = self.dst[a * 4:b * 4]
        lo, scale = h.lo, h.scale
        if h.step == 0:
            # a contribution to a block this peer owns: added in float32 (on the worker, from
            # a slot of its own, as the stream reads on into its staging)
            stg = conn.staging(h.length) if self._worker is None else self._slot(src, off, h.length)

            def added(_):
                self.own_pending[idx] -= 1
                if self.own_pending[idx] == 0:
                    self._finish_block(idx)

            return Rx(stg, None, lambda: self._do(lambda: self.dequant_add(stg, lo, scale, dst), added, idx))
        stg = conn.staging(h.length)

        # A result block: decoding touches only this block, so it runs as the payload's last
        # progress step, on the stream's I/O thread when one moves the payload.
        def decode(got: int) -> None:
            if got == len(stg):
                self.dequantize(stg, lo, scale, dst)

        return Rx(stg, decode, self._unit)

    def _finish_block(self, idx: int) -> None:
        lk = self.link
        a, b, off = self.blocks[lk.rank][idx]
        dst = self.dst[a * 4:b * 4]
        cb = self.cview[off:off + code_bytes(b - a, self.q)]

        def encode():
            if self.op == "avg":
                K.finish_avg(dst, lk.world, "float32")
            lo, scale = _finite(self.quantize(dst, cb), "result")
            lo, scale = float(np.float32(lo)), float(np.float32(scale))  # exactly what the header carries
            self.dequantize(cb, lo, scale, dst)
            return lo, scale

        def send(params):
            for r in range(lk.world):
                if r != lk.rank:
                    self.send_data(r, SPREAD, 1, a * 4, cb, (b - a) * 4, elems=b - a,
                                   quant=self.q, lo=params[0], scale=params[1])
            self._unit()

        self._do(encode, send, idx)

    def _unit(self) -> None:
        self._units -= 1
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.started and self._units == 0:
            self.data_complete()
