"""The C kernels (pccl_py.kernels._native) against their numpy twin (pccl_py.kernels.reference) and against
independent oracles (numpy float16 arithmetic, torch bfloat16, hand-computed values)."""

from __future__ import annotations

import math
import threading
import zlib

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pccl_py.kernels import _native as N
from pccl_py.kernels import reference as R

pytestmark = pytest.mark.timeout(60)

DTYPES = ["float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8"]
OPS = ["sum", "prod", "min", "max"]
STORAGE = {
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
# 0, 1, odd, primes, around the 16-lane blocks, above the 64 KiB GIL threshold
LENGTHS = [0, 1, 2, 3, 7, 15, 16, 17, 31, 33, 127, 1021, 4099, 20011]
SPECIALS = {
    "float32": [np.nan, np.inf, -np.inf, 0.0, -0.0, 3.4e38, -3.4e38, 1e-45, -1e-45, 1.0],
    "float64": [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.7e308, -1.7e308, 5e-324, 1.0],
}


# every instruction-set level this CPU runs (the kernels promise the same bits at each)
_ALL_ISA = ["generic", "sse2", "avx2"]
ISA_LEVELS = _ALL_ISA[: _ALL_ISA.index(N._isa()[1]) + 1]


@pytest.fixture(params=ISA_LEVELS)
def isa(request):
    prev = N._set_isa(request.param)
    try:
        yield request.param
    finally:
        N._set_isa(prev)


def on_every_isa(fn):
    """fn() under every ISA level; returns the results (restores the level)."""
    prev = N._isa()[0]
    try:
        out = []
        for level in ISA_LEVELS:
            N._set_isa(level)
            out.append(fn())
        return out
    finally:
        N._set_isa(prev)


def make(dtype: str, n: int, rng: np.random.Generator, special: bool = True) -> np.ndarray:
    """Random data of a dtype, with the type's special values sprinkled in."""
    st_ = STORAGE[dtype]
    if dtype in ("float16", "bfloat16"):  # every bit pattern: NaNs, infs, subnormals, -0
        return rng.integers(0, 1 << 16, n, dtype=np.uint16)
    if dtype in ("float32", "float64"):
        x = (rng.standard_normal(n) * np.exp(rng.uniform(-20, 20, n))).astype(st_)
        if special and n:
            k = max(1, n // 10)
            x[rng.integers(0, n, k)] = rng.choice(np.array(SPECIALS[dtype], dtype=st_), k)
        return x
    ii = np.iinfo(st_)
    return rng.integers(ii.min, ii.max, n, dtype=st_, endpoint=True)


def same(a: np.ndarray, b: np.ndarray, dtype: str, op: str = "") -> None:
    """Bitwise equal, except the payload of float32/float64 NaNs out of sum/prod, which the
    CPU chooses (their positions must still agree)."""
    if dtype in ("float32", "float64") and op in ("sum", "prod"):
        na, nb = np.isnan(a), np.isnan(b)
        np.testing.assert_array_equal(na, nb)
        a, b = a[~na], b[~nb]
    assert a.tobytes() == b.tobytes(), f"{dtype} {op}: {np.count_nonzero(a != b)} elements differ"


def unaligned(arr: np.ndarray, offset: int) -> tuple[bytearray, memoryview]:
    """A copy of arr living at byte offset `offset` of a bytearray."""
    buf = bytearray(arr.nbytes + offset + 8)
    mv = memoryview(buf)[offset : offset + arr.nbytes]
    mv[:] = arr.tobytes()
    return buf, mv


# ---- reduce / finish_avg against the reference ------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_reduce_matches_reference(isa: str, dtype: str, op: str) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{dtype}-{op}".encode()))
    for n in LENGTHS:
        a, b = make(dtype, n, rng), make(dtype, n, rng)
        got, want = a.copy(), a.copy()
        N.reduce(got, b, op, dtype)
        R.reduce(want, b, op, dtype)
        same(got, want, dtype, op)
        np.testing.assert_array_equal(b, b.copy())  # src untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("offsets", [(1, 3), (3, 0), (2, 5)])
def test_reduce_unaligned(isa: str, dtype: str, op: str, offsets: tuple[int, int]) -> None:
    rng = np.random.default_rng(7)
    n = 1027
    a, b = make(dtype, n, rng), make(dtype, n, rng)
    _, dmv = unaligned(a, offsets[0])
    _keep, smv = unaligned(b, offsets[1])
    N.reduce(dmv, smv, op, dtype)
    want = a.copy()
    R.reduce(want, b, op, dtype)
    same(np.frombuffer(dmv, dtype=STORAGE[dtype]), want, dtype, op)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_dst_is_src(isa: str, dtype: str) -> None:
    rng = np.random.default_rng(3)
    a = make(dtype, 1001, rng)
    want = a.copy()
    R.reduce(want, a.copy(), "sum", dtype)
    N.reduce(a, a, "sum", dtype)
    same(a, want, dtype, "sum")


@pytest.mark.parametrize("dtype", DTYPES)
def test_finish_avg_matches_reference(isa: str, dtype: str) -> None:
    rng = np.random.default_rng(11)
    for n in LENGTHS:
        a = make(dtype, n, rng)
        for k in (1, 2, 3, 7, 1000, 2**31 - 1):
            got, want = a.copy(), a.copy()
            N.finish_avg(got, k, dtype)
            R.finish_avg(want, k, dtype)
            same(got, want, dtype)


def test_finish_avg_integers_truncate_toward_zero() -> None:
    a = np.array([7, -7, 6, -6, 1, -1, 0, -(2**31), 2**31 - 1], dtype=np.int32)
    N.finish_avg(a, 2, "int32")
    assert a.tolist() == [3, -3, 3, -3, 0, 0, 0, -(2**30), 2**30 - 1]
    b = np.array([-(2**63), 2**63 - 1, -5, 5], dtype=np.int64)
    N.finish_avg(b, 3, "int64")
    assert b.tolist() == [-(2**63 // 3), (2**63 - 1) // 3, -1, 1]
    c = np.array([-128, 127, -3], dtype=np.int8)
    N.finish_avg(c, 2, "int8")
    assert c.tolist() == [-64, 63, -1]
    u = np.array([255, 5, 1], dtype=np.uint8)
    N.finish_avg(u, 2, "uint8")
    assert u.tolist() == [127, 2, 0]


def test_finish_avg_accepts_numpy_integers() -> None:
    for impl in (N, R):
        a = np.array([6, -9], dtype=np.int16)
        impl.finish_avg(a, np.int64(3), "int16")
        assert a.tolist() == [2, -3]


def test_finish_avg_floats_are_ieee_division() -> None:
    x = np.array([1.0, 2.0, 10.0, np.inf, -np.inf, np.nan, -0.0, 1e-45], dtype=np.float32)
    got = x.copy()
    N.finish_avg(got, 3, "float32")
    with np.errstate(all="ignore"):
        want = x / np.float32(3)
    np.testing.assert_array_equal(got, want)
    assert got.tobytes()[24:28] == np.float32(-0.0).tobytes()


# ---- semantics checked without the reference ----------------------------------------------


def test_float_min_max_nan_and_signed_zero(isa: str) -> None:
    nan = np.float32(np.nan)
    d = np.array([nan, 1.0, nan, 0.0, -0.0, 2.0], dtype=np.float32)
    s = np.array([1.0, nan, nan, -0.0, 0.0, -np.inf], dtype=np.float32)
    lo, hi = d.copy(), d.copy()
    N.reduce(lo, s, "min", "float32")
    N.reduce(hi, s, "max", "float32")
    assert np.isnan(lo[:3]).all() and np.isnan(hi[:3]).all()
    # ties keep dst: min(+0, -0) = +0, min(-0, +0) = -0
    assert np.signbit(lo[3:5]).tolist() == [False, True]
    assert np.signbit(hi[3:5]).tolist() == [False, True]
    assert lo[5] == -np.inf and hi[5] == 2.0
    # both NaN: dst's NaN (its payload) wins
    for dtype, itype in (("float32", np.uint32), ("float64", np.uint64)):
        nbits = np.finfo(dtype).bits
        qnan = (1 << (nbits - 1)) - (1 << (np.finfo(dtype).nmant - 1))  # 0x7FC00000-ish
        d = np.array([qnan + 1, qnan + 2], dtype=itype)
        s = np.array([qnan + 3, qnan + 4], dtype=itype)
        for op in ("min", "max"):
            got = d.copy()
            N.reduce(got, s, op, dtype)
            assert got.tolist() == d.tolist(), (dtype, op)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_min_max_zero_ties_keep_dst(isa: str, dtype: str) -> None:
    n = 37  # through the vector loops and their tails
    if dtype in ("float16", "bfloat16"):
        pz, nz = np.uint16(0), np.uint16(0x8000)
        d = np.array([pz, nz] * n, dtype=np.uint16)
        s = np.array([nz, pz] * n, dtype=np.uint16)
    else:
        d = np.array([0.0, -0.0] * n, dtype=dtype)
        s = np.array([-0.0, 0.0] * n, dtype=dtype)
    for op in ("min", "max"):
        got = d.copy()
        N.reduce(got, s, op, dtype)
        assert got.tobytes() == d.tobytes(), (dtype, op)


def test_integer_wraparound_like_numpy() -> None:
    for dtype in ("int8", "int16", "int32", "int64", "uint8"):
        ii = np.iinfo(dtype)
        a = np.array([ii.max, ii.min, ii.max, -1 if ii.min else 3], dtype=dtype)
        b = np.array([1, -1 if ii.min else 1, ii.max, ii.max], dtype=dtype)
        for op, uf in (("sum", np.add), ("prod", np.multiply)):
            got = a.copy()
            N.reduce(got, b, op, dtype)
            with np.errstate(all="ignore"):
                np.testing.assert_array_equal(got, uf(a, b), err_msg=f"{dtype} {op}")


def test_float16_matches_numpy_arithmetic() -> None:
    """numpy computes float16 arithmetic in float32 and rounds back: the same rule."""
    rng = np.random.default_rng(5)
    a = rng.integers(0, 1 << 16, 50000, dtype=np.uint16)
    b = rng.integers(0, 1 << 16, 50000, dtype=np.uint16)
    for op, uf in (("sum", np.add), ("prod", np.multiply)):
        got = a.copy()
        N.reduce(got, b, op, "float16")
        with np.errstate(all="ignore"):
            want = uf(a.view(np.float16), b.view(np.float16))
        nan = np.isnan(want)
        np.testing.assert_array_equal(
            got.view(np.float16)[~nan].view(np.uint16), want[~nan].view(np.uint16)
        )
        assert (got[nan] == 0x7E00).all()


def test_bfloat16_rounding_to_nearest_even() -> None:
    def bf(x: float) -> int:
        return int(np.array([x], dtype=np.float32).view(np.uint32)[0] >> 16)

    one = bf(1.0)
    cases = [
        (1.0, 2.0**-8, one),  # exact tie -> even (1.0)
        (1.0 + 2.0**-7, 2.0**-8, bf(1.0 + 2.0**-6)),  # tie -> even (up)
        (1.0, 2.0**-8 + 2.0**-12, bf(1.0 + 2.0**-7)),  # above the tie -> up
        (3.3895313892515355e38, 3.3895313892515355e38, 0x7F80),  # overflow -> inf
    ]
    for x, y, want in cases:
        d = np.array([bf(x)], dtype=np.uint16)
        N.reduce(d, np.array([bf(y)], dtype=np.uint16), "sum", "bfloat16")
        assert int(d[0]) == want, (x, y, hex(int(d[0])), hex(want))
    nan = np.array([0x7F80, 0xFFC1, 0x7F81], dtype=np.uint16)  # inf + -inf, NaN + 1, sNaN + 1
    N.reduce(nan, np.array([0xFF80, one, one], dtype=np.uint16), "sum", "bfloat16")
    assert nan.tolist() == [0x7FC0] * 3


def test_bfloat16_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    a = rng.integers(0, 1 << 16, 40000, dtype=np.uint16)
    b = rng.integers(0, 1 << 16, 40000, dtype=np.uint16)
    for op in OPS:
        got = a.copy()
        N.reduce(got, b, op, "bfloat16")
        ta = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        tb = torch.from_numpy(b.view(np.int16).copy()).view(torch.bfloat16)
        fn = {"sum": torch.add, "prod": torch.mul, "min": torch.minimum, "max": torch.maximum}[op]
        want = fn(ta, tb).view(torch.int16).numpy().view(np.uint16)
        nan = np.isnan(R.bf16_to_f32(want))
        assert (got[nan] == 0x7FC0).all(), op
        # torch keeps either zero on a (+0, -0) tie; ours keeps dst
        diff = (got != want) & ~nan
        zero_tie = (R.bf16_to_f32(got) == 0) & (R.bf16_to_f32(want) == 0)
        assert not (diff & ~zero_tie).any(), f"{op}: {np.count_nonzero(diff & ~zero_tie)} differ"


def test_half_conversions_exhaustive(isa: str) -> None:
    words = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    f = R.f16_to_f32(words)
    # widening then narrowing is the identity on every non-NaN float16 (through the C kernel:
    # min with itself widens, selects and narrows)
    got = words.copy()
    N.reduce(got, words, "min", "float16")
    nan = np.isnan(f)
    np.testing.assert_array_equal(got[~nan], words[~nan])
    assert (got[nan] == 0x7E00).all()
    got = words.copy()
    N.reduce(got, words, "max", "bfloat16")
    nanb = np.isnan(R.bf16_to_f32(words))
    np.testing.assert_array_equal(got[~nanb], words[~nanb])
    assert (got[nanb] == 0x7FC0).all()


def test_float16_narrowing_matches_numpy_on_float32_patterns() -> None:
    """avg with n=1 narrows float32 results; probe narrowing at ties and overflow via sums."""
    rng = np.random.default_rng(13)
    a = rng.integers(0, 1 << 16, 200000, dtype=np.uint16)
    b = rng.integers(0, 1 << 16, 200000, dtype=np.uint16)
    got = a.copy()
    N.reduce(got, b, "sum", "float16")
    want = a.copy()
    R.reduce(want, b, "sum", "float16")
    assert got.tobytes() == want.tobytes()


# ---- quantization -----------------------------------------------------------------------


def qbound(x: np.ndarray, lo: float, scale: float) -> float:
    """max |decode(encode(x)) - x| allowed: half a step plus float32 rounding."""
    hi = float(np.max(x))
    mag = max(abs(lo), abs(hi))
    ulp = max(2.0 ** (math.frexp(mag)[1] - 24), 2.0**-149)  # float32 ulp at mag
    # a denormal step is rounded to a multiple of 2**-149, off by up to half of that, and
    # code c multiplies the error by c (up to 255): 1.268e-42 over 255 steps gave 1.6e-43
    bound = scale / 2 * (1 + 1e-3) + 4 * ulp + 1e-44 + 255 * 2.0**-150
    if scale == 0.0:  # a range of denormals whose step underflows to 0: every value decodes to lo
        bound = max(bound, hi - lo)
    return bound


def quant_roundtrip(x: np.ndarray, bits: int):
    n = x.size
    codes = np.empty(n if bits == 8 else (n + 1) // 2, dtype=np.uint8)
    lo, scale = (N.quantize_u8 if bits == 8 else N.quantize_u4)(x, codes)
    y = np.empty_like(x)
    (N.dequantize_u8 if bits == 8 else N.dequantize_u4)(codes, lo, scale, y)
    return codes, lo, scale, y


def check_quant(x: np.ndarray, bits: int) -> None:
    runs = on_every_isa(lambda: quant_roundtrip(x, bits))
    codes, lo, scale, y = runs[0]
    for c2, lo2, sc2, y2 in runs[1:]:  # every ISA level: the same bits
        assert c2.tobytes() == codes.tobytes() and y2.tobytes() == y.tobytes()
        assert np.float32(lo2).tobytes() == np.float32(lo).tobytes()
        assert np.float32(sc2).tobytes() == np.float32(scale).tobytes()
    rcodes = np.empty_like(codes)
    rlo, rscale = (R.quantize_u8 if bits == 8 else R.quantize_u4)(x, rcodes)
    assert (lo, scale) == (rlo, rscale) or (math.isnan(lo) and math.isnan(rlo))
    assert codes.tobytes() == rcodes.tobytes()
    ry = np.empty_like(x)
    (R.dequantize_u8 if bits == 8 else R.dequantize_u4)(codes, lo, scale, ry)
    assert y.tobytes() == ry.tobytes()
    if x.size and np.isfinite(x).all() and np.isfinite(lo):
        err = float(np.max(np.abs(y.astype(np.float64) - x.astype(np.float64))))
        assert err <= qbound(x, lo, scale), (err, scale)
        assert np.float32(lo) == x.min()
    # decode_add is decode then add, bit for bit
    acc = np.linspace(-1, 1, x.size, dtype=np.float32)
    racc = acc.copy()
    (N.dequant_add_u8 if bits == 8 else N.dequant_add_u4)(codes, lo, scale, acc)
    (R.dequant_add_u8 if bits == 8 else R.dequant_add_u4)(codes, lo, scale, racc)
    same(acc, racc, "float32", "sum")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_matches_reference_and_bound(isa: str, bits: int) -> None:
    rng = np.random.default_rng(17 + bits)
    for n in LENGTHS:
        for scale_ in (1e-30, 1e-3, 1.0, 1e6, 1e30):
            x = (rng.standard_normal(n) * scale_).astype(np.float32)
            check_quant(x, bits)
        check_quant(rng.uniform(100, 101, n).astype(np.float32), bits)  # offset far from 0


@pytest.mark.parametrize("bits", [8, 4])
@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        st.integers(0, 300),
        elements=st.floats(
            -float(np.float32(1e37)), float(np.float32(1e37)), width=32, allow_nan=False
        ),
    )
)
@example(x=np.array([1.268e-42, 0.0], dtype=np.float32))  # a denormal range: the step itself rounds
def test_quantize_property(bits: int, x: np.ndarray) -> None:
    check_quant(x, bits)


@pytest.mark.parametrize("bits", [8, 4])
@settings(max_examples=40, deadline=None)
@given(x=hnp.arrays(np.float32, st.integers(1, 200), elements=st.floats(width=32)))
def test_quantize_any_float32_matches_reference(bits: int, x: np.ndarray) -> None:
    check_quant(x, bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_uses_full_code_range(bits: int) -> None:
    x = np.linspace(-3, 5, 1001, dtype=np.float32)
    codes, lo, scale, y = quant_roundtrip(x, bits)
    m = 255 if bits == 8 else 15
    c = codes if bits == 8 else R._unpack_u4(codes, x.size)
    assert c[0] == 0 and c[-1] == m and lo == -3.0
    assert scale == np.float32(np.float32(8.0) / np.float32(m))
    assert y[0] == -3.0
    # monotone
    assert (np.diff(c.astype(int)) >= 0).all()


def test_quantize_round_half_up_rule() -> None:
    # lo = 0, hi = 255 -> scale 1, inv 1: code = trunc(x + 0.5)
    x = np.array([0, 255, 0.49, 0.5, 1.5, 2.5, 254.5], dtype=np.float32)
    codes = np.empty(x.size, np.uint8)
    lo, scale = N.quantize_u8(x, codes)
    assert (lo, scale) == (0.0, 1.0)
    assert codes.tolist() == [0, 255, 0, 1, 2, 3, 255]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_constant_chunk(isa: str, bits: int) -> None:
    for v in (0.0, -0.0, 1.5, -3e38, 1e-45):
        x = np.full(33, v, dtype=np.float32)
        codes, lo, scale, y = quant_roundtrip(x, bits)
        assert scale == 0.0 and not codes.any()
        assert lo == v and not np.signbit(np.float32(lo)) or v != 0.0
        np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_nonfinite_poisons_chunk(isa: str, bits: int, bad: float) -> None:
    x = np.linspace(-1, 1, 101, dtype=np.float32)
    x[37] = bad
    codes, lo, scale, y = quant_roundtrip(x, bits)
    assert math.isnan(lo) and math.isnan(scale)
    assert not codes.any()
    assert np.isnan(y).all()
    check_quant(x, bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_extreme_ranges(isa: str, bits: int) -> None:
    # a range that still fits float32
    x = np.array([-1e38, 0.0, 5e37, 1e38], dtype=np.float32)
    check_quant(x, bits)
    _, lo, scale, y = quant_roundtrip(x, bits)
    assert np.isfinite(y).all()
    # a range that overflows float32 -> treated like inf
    x = np.array([-3e38, 0.0, 3e38], dtype=np.float32)
    _, lo, scale, y = quant_roundtrip(x, bits)
    assert math.isnan(lo) and math.isnan(scale)
    check_quant(x, bits)
    # tiny ranges (the wide rule: M / range overflows float32)
    for x in (
        np.array([0.0, 1e-45, 2e-45, 3e-45, 1e-44], dtype=np.float32),
        np.array([1e-38, 1e-38 + 1e-44, 1e-38 + 3e-45], dtype=np.float32),
        np.array([-5e-39, 5e-39, 0.0], dtype=np.float32),
    ):
        check_quant(x, bits)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_deterministic(bits: int) -> None:
    rng = np.random.default_rng(23)
    x = rng.standard_normal(100003).astype(np.float32)
    a = quant_roundtrip(x, bits)
    b = quant_roundtrip(x.copy(), bits)
    assert (
        a[0].tobytes() == b[0].tobytes() and a[1:3] == b[1:3] and a[3].tobytes() == b[3].tobytes()
    )


def test_quantize_u4_packing_low_nibble_first() -> None:
    x = np.array([0, 15, 1, 14, 2], dtype=np.float32)  # scale 1, lo 0
    codes = np.full(3, 0xFF, dtype=np.uint8)
    lo, scale = N.quantize_u4(x, codes)
    assert (lo, scale) == (0.0, 1.0)
    assert codes.tolist() == [0xF0, 0xE1, 0x02]
    y = np.empty(5, np.float32)
    N.dequantize_u4(codes, lo, scale, y)
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_unaligned(isa: str, bits: int) -> None:
    rng = np.random.default_rng(29)
    x = rng.standard_normal(4097).astype(np.float32)
    ncodes = x.size if bits == 8 else (x.size + 1) // 2
    _, xmv = unaligned(x, 1)
    cbuf = bytearray(ncodes + 3)
    cmv = memoryview(cbuf)[3:]
    q = N.quantize_u8 if bits == 8 else N.quantize_u4
    lo, scale = q(xmv, cmv)
    rc = np.empty(ncodes, np.uint8)
    assert (lo, scale) == (R.quantize_u8 if bits == 8 else R.quantize_u4)(x, rc)
    assert bytes(cmv) == rc.tobytes()
    acc = rng.standard_normal(x.size).astype(np.float32)
    _, amv = unaligned(acc, 2)
    (N.dequant_add_u8 if bits == 8 else N.dequant_add_u4)(cmv, lo, scale, amv)
    (R.dequant_add_u8 if bits == 8 else R.dequant_add_u4)(rc, lo, scale, acc)
    assert bytes(amv) == acc.tobytes()
    _, dmv = unaligned(acc, 3)
    (N.dequantize_u8 if bits == 8 else N.dequantize_u4)(cmv, lo, scale, dmv)
    (R.dequantize_u8 if bits == 8 else R.dequantize_u4)(rc, lo, scale, acc)
    assert bytes(dmv) == acc.tobytes()


def test_kernels_run_concurrently_from_threads() -> None:
    """The GIL is released: threads running big kernels at once still get exact results."""
    rng = np.random.default_rng(31)
    base = rng.standard_normal(1 << 18).astype(np.float32)
    want = base.copy()
    R.reduce(want, base, "sum", "float32")
    errors: list[str] = []

    def work() -> None:
        for _ in range(5):
            d = base.copy()
            N.reduce(d, base, "sum", "float32")
            if d.tobytes() != want.tobytes():
                errors.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors


# ---- bad arguments ------------------------------------------------------------------------

F32 = np.zeros(8, np.float32)
CODES8 = np.zeros(8, np.uint8)
CODES4 = np.zeros(4, np.uint8)


def ro(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


BAD_CALLS = [
    # (call, exception, message fragment)
    (lambda m: m.reduce(F32.copy(), F32, "sum", "float8"), ValueError, "dtype"),
    (lambda m: m.reduce(F32.copy(), F32, "avg", "float32"), ValueError, "op"),
    (lambda m: m.reduce(F32.copy(), F32, 3, "float32"), TypeError, None),
    (lambda m: m.reduce(F32.copy(), F32, "sum", None), TypeError, None),
    (lambda m: m.reduce([1.0], F32, "sum", "float32"), TypeError, "buffer"),
    (lambda m: m.reduce(F32.copy(), "abcd", "sum", "float32"), TypeError, "buffer"),
    (
        lambda m: m.reduce(np.zeros(16, np.float32)[::2], F32, "sum", "float32"),
        ValueError,
        "contiguous",
    ),
    (
        lambda m: m.reduce(F32.copy(), np.zeros(16, np.float32)[::2], "sum", "float32"),
        ValueError,
        "contiguous",
    ),
    (lambda m: m.reduce(ro(F32), F32, "sum", "float32"), ValueError, "read-only"),
    (lambda m: m.reduce(bytes(32), F32, "sum", "float32"), ValueError, "read-only"),
    (
        lambda m: m.reduce(F32.copy(), np.zeros(7, np.float32), "sum", "float32"),
        ValueError,
        "length",
    ),
    (lambda m: m.reduce(bytearray(6), bytes(6), "sum", "float32"), ValueError, "multiple"),
    (lambda m: m.reduce(bytearray(3), bytes(3), "sum", "int16"), ValueError, "multiple"),
    (lambda m: m.finish_avg(F32.copy(), 0, "float32"), ValueError, "n must"),
    (lambda m: m.finish_avg(F32.copy(), -2, "float32"), ValueError, "n must"),
    (lambda m: m.finish_avg(F32.copy(), 2**40, "float32"), ValueError, "n must"),
    (lambda m: m.finish_avg(F32.copy(), 2.0, "float32"), TypeError, "int"),
    (lambda m: m.finish_avg(F32.copy(), True, "float32"), TypeError, "int"),
    (lambda m: m.finish_avg(F32.copy(), 2, "complex64"), ValueError, "dtype"),
    (lambda m: m.finish_avg(ro(F32), 2, "float32"), ValueError, "read-only"),
    (lambda m: m.finish_avg(bytearray(5), 2, "int32"), ValueError, "multiple"),
    (lambda m: m.quantize_u8(F32, np.zeros(7, np.uint8)), ValueError, "codes"),
    (lambda m: m.quantize_u8(F32, ro(CODES8)), ValueError, "read-only"),
    (lambda m: m.quantize_u8(bytes(7), bytearray(1)), ValueError, "multiple"),
    (lambda m: m.quantize_u8(1.0, CODES8.copy()), TypeError, "buffer"),
    (lambda m: m.quantize_u4(F32, np.zeros(8, np.uint8)), ValueError, "codes"),
    (
        lambda m: m.quantize_u4(np.zeros(16, np.float32)[::2], CODES4.copy()),
        ValueError,
        "contiguous",
    ),
    (lambda m: m.dequantize_u8(CODES8, 0.0, 1.0, ro(F32)), ValueError, "read-only"),
    (lambda m: m.dequantize_u8(np.zeros(9, np.uint8), 0.0, 1.0, F32.copy()), ValueError, "codes"),
    (lambda m: m.dequantize_u8(CODES8, "0", 1.0, F32.copy()), TypeError, None),
    (lambda m: m.dequantize_u4(CODES8, 0.0, 1.0, F32.copy()), ValueError, "codes"),
    (lambda m: m.dequant_add_u8(CODES8, 0.0, 1.0, bytearray(30)), ValueError, "multiple"),
    (lambda m: m.dequant_add_u4(np.zeros(3, np.uint8), 0.0, 1.0, F32.copy()), ValueError, "codes"),
    (lambda m: m.dequant_add_u4(CODES4, 0.0, 1.0, object()), TypeError, "buffer"),
]


@pytest.mark.parametrize("impl", [N, R], ids=["native", "reference"])
@pytest.mark.parametrize("case", range(len(BAD_CALLS)))
def test_bad_arguments_raise(impl, case: int) -> None:
    call, exc, fragment = BAD_CALLS[case]
    with pytest.raises(exc, match=fragment):
        call(impl)


def test_partial_overlap_rejected() -> None:
    buf = np.zeros(16, np.float32)
    with pytest.raises(ValueError, match="overlap"):
        N.reduce(buf[0:8], buf[4:12], "sum", "float32")
    c = np.zeros(64, np.uint8)
    with pytest.raises(ValueError, match="overlap"):
        N.quantize_u8(c[0:32].view(np.float32), c[16:24])
    with pytest.raises(ValueError, match="overlap"):
        N.dequant_add_u8(c[0:8], 0.0, 1.0, c[4:36].view(np.float32))


def test_empty_buffers() -> None:
    e = np.zeros(0, np.float32)
    N.reduce(e, e.copy(), "sum", "float32")
    N.finish_avg(e, 3, "float32")
    assert N.quantize_u8(e, np.zeros(0, np.uint8)) == (0.0, 0.0)
    assert N.quantize_u4(e, np.zeros(0, np.uint8)) == (0.0, 0.0)
    N.dequant_add_u4(np.zeros(0, np.uint8), 1.0, 1.0, e)


def test_isa_levels() -> None:
    in_use, best = N._isa()
    assert best in _ALL_ISA and in_use == best  # the default is the best level
    prev = N._set_isa("avx2")
    try:
        assert N._isa()[0] == best  # clamped to what the CPU has
        assert N._set_isa("generic") == best and N._isa()[0] == "generic"
        with pytest.raises(ValueError, match="ISA"):
            N._set_isa("avx512")
    finally:
        N._set_isa(prev)


def test_keyword_arguments_and_surface() -> None:
    d = np.ones(4, np.float32)
    N.reduce(dst=d, src=np.ones(4, np.float32), op="sum", dtype="float32")
    assert d.tolist() == [2.0] * 4
    assert tuple(N.DTYPES) == tuple(DTYPES) == R.DTYPES
    assert tuple(N.OPS) == tuple(OPS) == R.OPS
    for name in (
        "reduce",
        "finish_avg",
        "quantize_u8",
        "quantize_u4",
        "dequantize_u8",
        "dequantize_u4",
        "dequant_add_u8",
        "dequant_add_u4",
    ):
        assert callable(getattr(N, name)) and callable(getattr(R, name))


def test_copy_and_fenced_slots():
    src = np.arange(100_000, dtype=np.uint8)
    dst = np.zeros_like(src)
    N.copy(dst, src)
    assert np.array_equal(dst, src)
    with pytest.raises(ValueError):
        N.copy(dst[:10], src)
    with pytest.raises(ValueError):
        N.copy(src[1:], src[:-1])  # overlapping
    slots = bytearray(64)
    N.store_u64(slots, 8, 2**64 - 1)
    assert N.load_u64(slots, 8) == 2**64 - 1 and N.load_u64(slots, 0) == 0
    for bad in (-8, 3, 64):
        with pytest.raises(ValueError):
            N.load_u64(slots, bad)
    with pytest.raises(ValueError):
        N.store_u64(bytes(16), 0, 1)  # read-only


@pytest.mark.parametrize("n", [0, 1, 15, 16, 63, 64, 65, 1000, (1 << 20) + 7])
@pytest.mark.parametrize("shift", [0, 1, 8, 15])
def test_copy_stream_any_alignment(n, shift):
    src = np.random.default_rng(n).integers(0, 256, n + 16, dtype=np.uint8)
    dst = np.zeros(n + 32, np.uint8)
    N.copy_stream(dst[shift:shift + n], src[3:3 + n])
    assert np.array_equal(dst[shift:shift + n], src[3:3 + n])
    assert not dst[:shift].any() and not dst[shift + n:].any()  # nothing written around it


def test_copy_stream_refuses_what_copy_refuses():
    buf = np.zeros(4096, np.uint8)
    with pytest.raises(ValueError, match="overlap"):
        N.copy_stream(buf[1:], buf[:-1])
    with pytest.raises(ValueError, match="bytes"):
        N.copy_stream(buf[:10], buf[10:30])
    with pytest.raises(ValueError):
        N.copy_stream(bytes(10), buf[:10])  # read-only destination


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_arrivals_are_recorded_for_their_ident_only(impl):
    arrive = N.arrive if impl == "native" else R.arrive
    slots = bytearray(32)
    ident = 0xABCDEF12
    N.store_u64(slots, 8, ident << 32)
    assert [arrive(slots, 8, ident, r) for r in (2, 0, 2, 31)] == [0b100, 0b101, 0b101, 0x80000005]
    assert arrive(slots, 8, ident ^ 1, 1) == -1  # another call's word: nothing written
    assert N.load_u64(slots, 8) == (ident << 32) | 0x80000005
    N.store_u64(slots, 8, 0)  # the slot serves no call
    assert arrive(slots, 8, ident, 0) == -1 and N.load_u64(slots, 8) == 0
    if impl == "native":
        with pytest.raises(ValueError, match="32 bits"):
            N.arrive(slots, 8, 1 << 32, 0)
        with pytest.raises(ValueError, match="rank"):
            N.arrive(slots, 8, 1, 32)
        with pytest.raises(ValueError):
            N.arrive(bytes(16), 8, 1, 0)  # read-only
        with pytest.raises(ValueError):
            N.arrive(slots, 4, 1, 0)  # unaligned


def test_arrivals_are_atomic_across_processes():
    """32 processes each set their bit 2,000 times on one word of shared memory, while
    the word also changes under them: no bit is lost."""
    import multiprocessing as mp
    from multiprocessing import shared_memory

    seg = shared_memory.SharedMemory(create=True, size=64)
    try:
        for _ in range(3):
            N.store_u64(seg.buf, 8, 7 << 32)
            procs = [mp.get_context("fork").Process(target=_arrive_on, args=(seg.name, r)) for r in range(32)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(60)
                assert p.exitcode == 0
            assert N.load_u64(seg.buf, 8) == (7 << 32) | 0xFFFFFFFF
    finally:
        seg.close()
        seg.unlink()


def _arrive_on(name: str, rank: int) -> None:
    from multiprocessing import shared_memory
    seg = shared_memory.SharedMemory(name=name)
    for _ in range(2000):
        assert N.arrive(seg.buf, 8, 7, rank) >> rank & 1
    seg.close()


@pytest.mark.parametrize("op", ["sum", "avg", "max", "prod"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32"])
def test_fold_in_blocks_or_in_place_gives_the_reference_bits(op, dtype):
    from pccl_py import kernels as K

    rng = np.random.default_rng(3)
    nbytes = 4 * 1000 + (2 if dtype == "bfloat16" else 0)
    srcs = [rng.integers(0, 255, nbytes, dtype=np.uint8) for _ in range(3)]
    if dtype == "bfloat16":  # keep every word a finite number
        for s in srcs:
            s.view(np.uint16)[:] &= 0x3FFF
    want = srcs[0].copy()
    for s in srcs[1:]:
        R.reduce(want, s, "sum" if op == "avg" else op, dtype)
    if op == "avg":
        R.finish_avg(want, 3, dtype)
    direct = np.zeros(nbytes, np.uint8)
    K.fold([memoryview(s) for s in srcs], [memoryview(direct)], op, dtype)
    outs = [np.zeros(nbytes, np.uint8) for _ in range(2)]
    K.fold([memoryview(s) for s in srcs], [memoryview(o) for o in outs], op, dtype,
           memoryview(bytearray(256)))  # blocks of 256 bytes: several, the last one short
    for got in (direct, *outs):
        assert bytes(got) == bytes(want)
