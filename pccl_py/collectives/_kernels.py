"""The kernels the collectives call: pccl_py._native when built, else the numpy reference.

One indirection so the data plane runs (slowly) before the C core is compiled. The
last-resort numpy versions below exist only for a checkout where neither the extension
nor ``pccl_py.reference`` is present yet.
"""

from __future__ import annotations

import logging
import os

import numpy as np

DTYPES: dict[str, tuple[int, np.dtype]] = {
    "float32": (4, np.dtype(np.float32)),
    "float64": (8, np.dtype(np.float64)),
    "float16": (2, np.dtype(np.float16)),
    "bfloat16": (2, np.dtype(np.uint16)),  # raw 2-byte words
    "int8": (1, np.dtype(np.int8)),
    "int16": (2, np.dtype(np.int16)),
    "int32": (4, np.dtype(np.int32)),
    "int64": (8, np.dtype(np.int64)),
    "uint8": (1, np.dtype(np.uint8)),
}
OPS = ("sum", "avg", "min", "max", "prod")
NAMES = ("reduce", "finish_avg", "quantize_u8", "quantize_u4", "dequantize_u8", "dequantize_u4",
         "dequant_add_u8", "dequant_add_u4")


def itemsize(dtype: str) -> int:
    return DTYPES[dtype][0]


# ---- last-resort numpy versions -------------------------------------------------------


def _bf16_to_f32(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(f: np.ndarray) -> np.ndarray:
    u = f.astype(np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + 0x7FFF
    out = ((u + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    out[nan] = 0x7FC0
    return out


def _view(buf, dtype: str) -> np.ndarray:
    return np.frombuffer(buf, dtype=DTYPES[dtype][1])


def _np_reduce(dst, src, op: str, dtype: str) -> None:
    d = _view(dst, dtype)
    s = _view(src, dtype)
    fn = {"sum": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum}[op]
    if dtype == "bfloat16":
        d[...] = _f32_to_bf16(fn(_bf16_to_f32(d), _bf16_to_f32(s)))
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            fn(d, s, out=d)


def _np_finish_avg(dst, n: int, dtype: str) -> None:
    d = _view(dst, dtype)
    if dtype == "bfloat16":
        d[...] = _f32_to_bf16(_bf16_to_f32(d) / np.float32(n))
    elif d.dtype.kind == "f":
        if d.dtype == np.float16:
            d[...] = (d.astype(np.float32) / np.float32(n)).astype(np.float16)
        else:
            np.divide(d, d.dtype.type(n), out=d)
    else:
        q = np.abs(d.astype(np.int64)) // n
        d[...] = np.where(d < 0, -q, q).astype(d.dtype)


def _np_quantize(src, codes, levels: int, packed: bool):
    x = np.frombuffer(src, dtype=np.float32)
    c = np.frombuffer(codes, dtype=np.uint8)
    if x.size == 0:
        return 0.0, 0.0
    lo = np.float32(x.min())
    hi = np.float32(x.max())
    scale = np.float32((hi - lo) / np.float32(levels))
    if scale > 0:
        q = np.clip(np.rint((x - lo) / scale), 0, levels).astype(np.uint8)
    else:
        q = np.zeros(x.size, np.uint8)
    if packed:
        if q.size % 2:
            q = np.append(q, np.uint8(0))
        c[...] = q[0::2] | (q[1::2] << 4)
    else:
        c[...] = q
    return float(lo), float(scale)


def _codes(codes, n: int, packed: bool) -> np.ndarray:
    c = np.frombuffer(codes, dtype=np.uint8)
    if not packed:
        return c[:n]
    q = np.empty(c.size * 2, np.uint8)
    q[0::2] = c & 0xF
    q[1::2] = c >> 4
    return q[:n]


def _np_dequant(codes, lo, scale, dst, packed: bool, add: bool) -> None:
    d = np.frombuffer(dst, dtype=np.float32)
    v = _codes(codes, d.size, packed).astype(np.float32) * np.float32(scale) + np.float32(lo)
    if add:
        d += v
    else:
        d[...] = v


_FALLBACK = {
    "reduce": _np_reduce,
    "finish_avg": _np_finish_avg,
    "quantize_u8": lambda s, c: _np_quantize(s, c, 255, False),
    "quantize_u4": lambda s, c: _np_quantize(s, c, 15, True),
    "dequantize_u8": lambda c, lo, sc, d: _np_dequant(c, lo, sc, d, False, False),
    "dequantize_u4": lambda c, lo, sc, d: _np_dequant(c, lo, sc, d, True, False),
    "dequant_add_u8": lambda c, lo, sc, d: _np_dequant(c, lo, sc, d, False, True),
    "dequant_add_u4": lambda c, lo, sc, d: _np_dequant(c, lo, sc, d, True, True),
}


def _load():
    impls = dict(_FALLBACK)
    source = "numpy fallback"
    for modname in ("reference", "_native"):  # later wins
        try:
            mod = __import__(f"pccl_py.{modname}", fromlist=["x"])
        except ImportError:
            continue
        found = [n for n in NAMES if hasattr(mod, n)]
        for n in found:
            impls[n] = getattr(mod, n)
        if found:
            source = f"pccl_py.{modname}"
    return impls, source


_IMPLS, SOURCE = _load()
if SOURCE != "pccl_py._native":
    logging.getLogger("pccl_py.kernels").warning(
        "pccl_py._native is not built; using %s (much slower): run `pip install -e .` or "
        "`python setup.py build_ext --inplace`", SOURCE)
reduce = _IMPLS["reduce"]
finish_avg = _IMPLS["finish_avg"]
quantize_u8 = _IMPLS["quantize_u8"]
quantize_u4 = _IMPLS["quantize_u4"]
dequantize_u8 = _IMPLS["dequantize_u8"]
dequantize_u4 = _IMPLS["dequantize_u4"]
dequant_add_u8 = _IMPLS["dequant_add_u8"]
dequant_add_u4 = _IMPLS["dequant_add_u4"]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask): what thread counts follow."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _np_copy(dst, src) -> None:
    np.copyto(np.frombuffer(dst, np.uint8), np.frombuffer(src, np.uint8))


def _py_load_u64(buf, offset: int) -> int:
    return int.from_bytes(bytes(memoryview(buf)[offset:offset + 8]), "little")


def _py_store_u64(buf, offset: int, value: int) -> None:
    memoryview(buf)[offset:offset + 8] = int(value).to_bytes(8, "little")


def _py_arrive(buf, offset: int, ident: int, rank: int) -> int:
    # Not atomic across processes: two arrivals at once can lose one bit, and then nobody
    # sees a full mask and the call ends at its deadline (never with wrong data).
    v = _py_load_u64(buf, offset)
    if v >> 32 != ident:
        return -1
    v |= 1 << rank
    _py_store_u64(buf, offset, v)
    return v & 0xFFFFFFFF


try:  # plain memory helpers: the native ones release the GIL, fence and are atomic
    from .._native import arrive, copy, copy_stream, load_u64, store_u64
except ImportError:  # pragma: no cover - only without the extension
    copy, load_u64, store_u64 = _np_copy, _py_load_u64, _py_store_u64
    copy_stream, arrive = _np_copy, _py_arrive
