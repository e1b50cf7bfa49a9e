"""Pure-numpy twin of every kernel in :mod:`pccl_py.kernels._native`.

Same names, same signatures, same results bit for bit (except the payload of a NaN
produced by a float32/float64 sum or prod, which the CPU chooses). It is slow on
purpose: every step is spelled out so this file doubles as the specification of the
kernels' semantics (see also docs/kernels.md). Tests compare the C kernels against it.

Buffers are anything with the buffer protocol (C-contiguous; writable where written).
bfloat16 data is raw 2-byte words (numpy has no bfloat16): widened to float32 by a
16-bit shift, narrowed by round-to-nearest-even on the bit pattern.
"""

from __future__ import annotations

import numbers
import operator

import numpy as np

__all__ = [
    "DTYPES",
    "OPS",
    "arrive",
    "bf16_to_f32",
    "copy",
    "copy_stream",
    "dequant_add_u4",
    "dequant_add_u8",
    "dequantize_u4",
    "dequantize_u8",
    "f32_to_bf16",
    "f32_to_f16",
    "finish_avg",
    "load_u64",
    "quantize_u4",
    "quantize_u8",
    "reduce",
    "store_u64",
]

DTYPES = ("float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8")
OPS = ("sum", "prod", "min", "max")

# storage dtype of each name (bfloat16: raw words)
_STORAGE = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.uint16,
    "bfloat16": np.uint16,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
}

F16_NAN = np.uint16(0x7E00)  # canonical quiet NaN of every float16 result
BF16_NAN = np.uint16(0x7FC0)  # canonical quiet NaN of every bfloat16 result


# ---- buffers ------------------------------------------------------------------------


def _bytes_view(obj, name: str, writable: bool) -> np.ndarray:
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError(
            f"{name} must support the buffer protocol (numpy array, memoryview, bytearray), "
            f"not {type(obj).__name__}"
        ) from None
    if not mv.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use a contiguous array or a copy)")
    if writable and mv.readonly:
        raise ValueError(f"{name} is read-only; it must be a writable buffer")
    if mv.nbytes == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.frombuffer(mv.cast("B"), dtype=np.uint8)


def _typed(raw: np.ndarray, dtype, name: str, dtype_name: str) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    if raw.size % itemsize:
        raise ValueError(
            f"{name} has {raw.size} bytes, not a multiple of the {dtype_name} itemsize {itemsize}"
        )
    return raw.view(dtype)


def _check_dtype(dtype: str) -> None:
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be str, not {type(dtype).__name__}")
    if dtype not in _STORAGE:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    if a.size == 0 or b.size == 0:
        return False
    pa, pb = a.ctypes.data, b.ctypes.data
    return pa < pb + b.nbytes and pb < pa + a.nbytes


# ---- 16-bit float conversions ---------------------------------------------------------


def bf16_to_f32(words: np.ndarray) -> np.ndarray:
    """bfloat16 words -> float32 (exact)."""
    return (words.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 words: round to nearest even; any NaN -> 0x7FC0."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(
        np.uint16
    )
    return np.where(np.isnan(x), BF16_NAN, r).astype(np.uint16)


def f16_to_f32(words: np.ndarray) -> np.ndarray:
    """float16 words -> float32 (exact)."""
    return words.view(np.float16).astype(np.float32)


def f32_to_f16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 words: IEEE round to nearest even (overflow -> inf); NaN -> 0x7E00."""
    with np.errstate(all="ignore"):
        r = x.astype(np.float16).view(np.uint16)
    return np.where(np.isnan(x), F16_NAN, r).astype(np.uint16)


# ---- reductions -----------------------------------------------------------------------


def _fsel(a: np.ndarray, b: np.ndarray, op: str) -> np.ndarray:
    """Float min/max: a NaN wins (a's first, then b's); on ties (+0 vs -0) a is kept."""
    pick_b = (b < a) if op == "min" else (b > a)
    r = np.where(pick_b, b, a)
    r = np.where(np.isnan(b), b, r)
    return np.where(np.isnan(a), a, r)


def _float_op(a: np.ndarray, b: np.ndarray, op: str) -> np.ndarray:
    if op == "sum":
        return a + b
    if op == "prod":
        return a * b
    return _fsel(a, b, op)


def reduce(dst, src, op: str, dtype: str) -> None:
    """dst = dst (op) src elementwise; op in sum|prod|min|max.

    float16/bfloat16 are computed in float32 and rounded back to nearest even; integer
    sum and prod wrap modulo 2**bits.
    """
    if not isinstance(op, str):
        raise TypeError(f"op must be str, not {type(op).__name__}")
    if op not in OPS:
        raise ValueError(
            f"unknown op {op!r}; expected one of sum, prod, min, max "
            "(avg is sum followed by finish_avg)"
        )
    _check_dtype(dtype)
    draw = _bytes_view(dst, "dst", True)
    sraw = _bytes_view(src, "src", False)
    if draw.size != sraw.size:
        raise ValueError(f"dst and src differ in length ({draw.size} vs {sraw.size} bytes)")
    d = _typed(draw, _STORAGE[dtype], "dst", dtype)
    s = _typed(sraw, _STORAGE[dtype], "src", dtype)
    if _overlap(draw, sraw) and draw.ctypes.data != sraw.ctypes.data:
        raise ValueError("dst and src overlap partially; pass disjoint buffers")
    with np.errstate(all="ignore"):
        if dtype in ("float32", "float64"):
            r = _float_op(d.copy(), s.copy(), op)
        elif dtype == "float16":
            r = f32_to_f16(_float_op(f16_to_f32(d), f16_to_f32(s), op))
        elif dtype == "bfloat16":
            r = f32_to_bf16(_float_op(bf16_to_f32(d), bf16_to_f32(s), op))
        else:
            ufunc = {"sum": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum}[op]
            r = ufunc(d, s)
        d[...] = r


def finish_avg(dst, n: int, dtype: str) -> None:
    """dst = dst / n: floats divide in their working precision (float16/bfloat16 via
    float32, rounded to nearest even); integers truncate toward zero (C division)."""
    if isinstance(n, (bool, np.bool_)) or not hasattr(type(n), "__index__"):
        raise TypeError(f"n must be an int, not {type(n).__name__}")
    n = operator.index(n)
    if not 1 <= int(n) <= 2**31 - 1:
        raise ValueError("n must be in 1 .. 2**31-1 (the number of contributions)")
    _check_dtype(dtype)
    d = _typed(_bytes_view(dst, "dst", True), _STORAGE[dtype], "dst", dtype)
    n = int(n)
    with np.errstate(all="ignore"):
        if dtype == "float32":
            d[...] = d / np.float32(n)
        elif dtype == "float64":
            d[...] = d / np.float64(n)
        elif dtype == "float16":
            d[...] = f32_to_f16(f16_to_f32(d) / np.float32(n))
        elif dtype == "bfloat16":
            d[...] = f32_to_bf16(bf16_to_f32(d) / np.float32(n))
        else:
            v = d.astype(np.int64)
            q = v // n
            q += ((v - q * n) != 0) & (v < 0)  # floor -> truncation toward zero
            d[...] = q.astype(d.dtype)


# ---- quantization -----------------------------------------------------------------------

_ZERO = np.float32(0.0)
_HALF = np.float32(0.5)


def _plan(x: np.ndarray, maxc: float):
    """(mode, lo, scale, params): mode 0 = all codes zero, 1 = fast rule, 2 = wide rule."""
    f32 = np.float32
    if x.size == 0:
        return 0, f32(0.0), f32(0.0), None
    if not np.isfinite(x).all():
        return 0, f32(np.nan), f32(np.nan), None
    lo = f32(x.min()) + _ZERO  # -0.0 -> +0.0
    hi = f32(x.max()) + _ZERO
    with np.errstate(all="ignore"):
        r = f32(hi - lo)
        if not np.isfinite(r):  # the range overflows float32: treated like inf
            return 0, f32(np.nan), f32(np.nan), None
        if r == 0:
            return 0, lo, f32(0.0), None
        scale = f32(r / f32(maxc))
        inv = f32(maxc) / r
        if np.isfinite(inv):
            return 1, lo, scale, inv
        # wide rule: the range is so small that maxc / r overflows float32
        return 2, lo, scale, np.float64(maxc) / (np.float64(hi) - np.float64(lo))


def _codes(x: np.ndarray, maxc: float) -> tuple[np.ndarray, float, float]:
    mode, lo, scale, inv = _plan(x, maxc)
    if mode == 0:
        return np.zeros(x.size, dtype=np.uint8), float(lo), float(scale)
    with np.errstate(all="ignore"):
        if mode == 1:  # float32 all the way: (x - lo) * inv + 0.5, clamp, truncate
            v = (x - lo) * inv + _HALF
            v = np.where(v > _ZERO, v, _ZERO)
            v = np.where(v < np.float32(maxc), v, np.float32(maxc))
        else:  # wide rule, in float64
            v = (x.astype(np.float64) - np.float64(lo)) * inv + 0.5
            v = np.where(v > 0.0, v, 0.0)
            v = np.where(v < maxc, v, maxc)
    return v.astype(np.int32).astype(np.uint8), float(lo), float(scale)


def _quant_args(src, codes, bits: int, fname: str):
    s = _typed(_bytes_view(src, "src", False), np.float32, "src", "float32")
    c = _bytes_view(codes, "codes", True)
    need = s.size if bits == 8 else (s.size + 1) // 2
    if c.size != need:
        raise ValueError(
            f"codes has {c.size} bytes; {fname} of {s.size} float32 values needs {need}"
        )
    if _overlap(s, c):
        raise ValueError("src and codes overlap; pass disjoint buffers")
    return s, c


def quantize_u8(src_f32, codes_u8) -> tuple[float, float]:
    """Min-max affine quantization to one 8-bit code per byte; returns (lo, scale)."""
    s, c = _quant_args(src_f32, codes_u8, 8, "quantize_u8")
    codes, lo, scale = _codes(s, 255.0)
    c[...] = codes
    return lo, scale


def quantize_u4(src_f32, codes_u8) -> tuple[float, float]:
    """Two 4-bit codes per byte, low nibble first; an odd count leaves the last high nibble 0."""
    s, c = _quant_args(src_f32, codes_u8, 4, "quantize_u4")
    codes, lo, scale = _codes(s, 15.0)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    c[...] = codes[0::2] | (codes[1::2] << np.uint8(4))
    return lo, scale


def _dequant_args(codes, lo, scale, dst, bits: int, fname: str):
    for name, v in (("lo", lo), ("scale", scale)):
        if not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a float, not {type(v).__name__}")
    c = _bytes_view(codes, "codes", False)
    d = _typed(_bytes_view(dst, "dst", True), np.float32, "dst", "float32")
    need = d.size if bits == 8 else (d.size + 1) // 2
    if c.size != need:
        raise ValueError(
            f"codes has {c.size} bytes; {fname} into {d.size} float32 values needs {need}"
        )
    if _overlap(c, d):
        raise ValueError("codes and dst overlap; pass disjoint buffers")
    return c, d


def _unpack_u4(c: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(2 * c.size, dtype=np.uint8)
    out[0::2] = c & np.uint8(15)
    out[1::2] = c >> np.uint8(4)
    return out[:n]


def _decode(codes: np.ndarray, lo: float, scale: float) -> np.ndarray:
    """code * scale + lo in float32 (lo and scale rounded to float32 first)."""
    with np.errstate(all="ignore"):
        return codes.astype(np.float32) * np.float32(scale) + np.float32(lo)


def dequantize_u8(codes, lo: float, scale: float, dst_f32) -> None:
    c, d = _dequant_args(codes, lo, scale, dst_f32, 8, "dequantize_u8")
    d[...] = _decode(c, lo, scale)


def dequantize_u4(codes, lo: float, scale: float, dst_f32) -> None:
    c, d = _dequant_args(codes, lo, scale, dst_f32, 4, "dequantize_u4")
    d[...] = _decode(_unpack_u4(c, d.size), lo, scale)


def dequant_add_u8(codes, lo: float, scale: float, dst_f32) -> None:
    c, d = _dequant_args(codes, lo, scale, dst_f32, 8, "dequant_add_u8")
    with np.errstate(all="ignore"):
        d += _decode(c, lo, scale)


def dequant_add_u4(codes, lo: float, scale: float, dst_f32) -> None:
    c, d = _dequant_args(codes, lo, scale, dst_f32, 4, "dequant_add_u4")
    with np.errstate(all="ignore"):
        d += _decode(_unpack_u4(c, d.size), lo, scale)


# ---- memory helpers of the shared-memory collectives --------------------------------


def copy(dst, src) -> None:
    """memcpy of equal-sized buffers (the native one also refuses overlap)."""
    d = _bytes_view(dst, "dst", True)
    s = _bytes_view(src, "src", False)
    if d.size != s.size:
        raise ValueError(f"copy: dst has {d.size} bytes, src {s.size}")
    np.copyto(d, s)


copy_stream = copy  # the native one bypasses the cache; the bytes are the same


def load_u64(buf, offset: int) -> int:
    return int.from_bytes(bytes(memoryview(buf)[offset:offset + 8]), "little")


def store_u64(buf, offset: int, value: int) -> None:
    memoryview(buf)[offset:offset + 8] = int(value).to_bytes(8, "little")


def arrive(buf, offset: int, ident: int, rank: int) -> int:
    """Set bit ``rank`` of the word ident << 32 | mask; -1 when the word holds another ident.

    Unlike the native one it is not atomic across processes: two arrivals at once can lose
    a bit, and then nobody sees a full mask and the call ends at its deadline (never with
    wrong data)."""
    v = load_u64(buf, offset)
    if v >> 32 != ident:
        return -1
    v |= 1 << rank
    store_u64(buf, offset, v)
    return v & 0xFFFFFFFF
