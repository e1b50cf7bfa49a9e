"""What a call may ask for (pccl_py.calls): allowed values, bounds and messages. No sockets."""

from __future__ import annotations

import math

import pytest

from pccl_py import calls
from pccl_py.calls import AUTO_TAG
from pccl_py.errors import InvalidUsage
from pccl_py.wire import frames as F
from pccl_py.wire import ipc
from pccl_py.wire.control import SYNC_SCHEMA

pytestmark = pytest.mark.timeout(30)


def test_the_allowed_values_are_those_the_implementations_know():
    assert calls.DTYPES == ("float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64",
                            "uint8")
    assert set(calls.OPS) == {"sum", "avg", "min", "max", "prod"}
    # every quantization a call may name has a code on the wire, and no other
    assert set(calls.QUANTS) == set(F.QUANT_BY_NAME)
    # the strategies a call may name are those the control message's schema lets through
    assert set(calls.STRATEGIES) == set(SYNC_SCHEMA["sync_offer"]["strategy"].choices)
    assert calls.ALGORITHMS == ("auto", "ring", "direct", "shm")
    assert calls.AUTO_TAG == 1 << 62 and calls.MAX_TAG == (1 << 63) - 1


@pytest.mark.parametrize("dtype", calls.DTYPES)
@pytest.mark.parametrize("op", calls.OPS)
@pytest.mark.parametrize("algorithm", calls.ALGORITHMS)
def test_every_allowed_combination_passes(dtype, op, algorithm):
    calls.check_all_reduce(dtype, op, None, algorithm)
    calls.check_reduction(op, None, algorithm)


@pytest.mark.parametrize("check,args,word,bad", [
    (calls.check_dtype, ("float33",), "dtype", "float33"),
    (calls.check_dtype, (None,), "dtype", None),
    (calls.check_op, ("mean",), "op", "mean"),
    (calls.check_op, ("SUM",), "op", "SUM"),
    (calls.check_quant, ("int3",), "quant", "int3"),
    (calls.check_algorithm, ("tree",), "algorithm", "tree"),
    (calls.check_strategy, ("popular",), "strategy", "popular"),
    (calls.check_reduction, ("median", None, "auto"), "op", "median"),
    (calls.check_reduction, ("sum", "fp8", "auto"), "quant", "fp8"),
    (calls.check_reduction, ("sum", None, "star"), "algorithm", "star"),
    (calls.check_all_reduce, ("complex64", "sum", None, "auto"), "dtype", "complex64"),
])
def test_an_unknown_name_is_refused_with_the_names_to_pass(check, args, word, bad):
    with pytest.raises(InvalidUsage, match=rf"^{word} {bad!r} is not supported; pass one of ") as info:
        check(*args)
    allowed = {"dtype": calls.DTYPES, "op": calls.OPS, "quant": calls.QUANTS, "algorithm": calls.ALGORITHMS,
               "strategy": calls.STRATEGIES}[word]
    assert all(repr(v) in str(info.value) for v in allowed)


def test_the_checks_go_in_the_order_of_the_arguments():
    with pytest.raises(InvalidUsage, match="^dtype"):
        calls.check_all_reduce("float33", "mean", "fp8", "star")
    with pytest.raises(InvalidUsage, match="^op"):
        calls.check_all_reduce("float32", "mean", "fp8", "star")
    with pytest.raises(InvalidUsage, match="^quant"):
        calls.check_all_reduce("float32", "sum", "fp8", "star")
    with pytest.raises(InvalidUsage, match="^algorithm"):
        calls.check_all_reduce("float32", "sum", None, "star")


@pytest.mark.parametrize("quant", ["uint8", "uint4"])
def test_quantization_takes_float32_sums_and_averages_only(quant):
    for op in ("sum", "avg"):
        calls.check_all_reduce("float32", op, quant, "auto")
    for dtype, op in [("float32", "max"), ("float32", "prod"), ("int32", "sum"), ("bfloat16", "avg")]:
        with pytest.raises(InvalidUsage, match="pass quant=None"):
            calls.check_all_reduce(dtype, op, quant, "auto")
    # the client knows only the names (the dtype comes from its tensors): no combination check
    calls.check_reduction("max", quant, "ring")


def test_whole_elements():
    calls.check_whole_elements(0, "float64")
    calls.check_whole_elements(12, "float32")
    with pytest.raises(InvalidUsage, match="10 bytes is not a whole number of float32 elements"):
        calls.check_whole_elements(10, "float32")
    with pytest.raises(InvalidUsage, match="bytes must be >= 0"):
        calls.check_whole_elements(-4, "float32")


def test_inline_data_must_be_bytes_of_the_size_and_small():
    calls.check_inline(b"\0" * 8, 8)
    calls.check_inline(b"\0" * ipc.INLINE_BYTES, ipc.INLINE_BYTES)
    big = ipc.INLINE_BYTES + 4
    for data, n in [(b"1234", 8), (b"\0" * big, big), ("abcd", 4), (bytearray(4), 4), (None, 0)]:
        with pytest.raises(InvalidUsage, match="inline data"):
            calls.check_inline(data, n)


def test_shared_memory_ranges():
    calls.check_shm_ranges(4096, (8192, 0), (8192, 4096), same_segment=True)  # apart
    calls.check_shm_ranges(4096, (8192, 1024), (8192, 1024), same_segment=True)  # in place
    calls.check_shm_ranges(4096, (4096, 0), (8192, 100), same_segment=False)
    for src, dst in [((8192, -1), (8192, 0)), ((8192, 0), (8192, 4097)), ((4095, 0), (8192, 0))]:
        with pytest.raises(InvalidUsage, match="outside the shared-memory segment"):
            calls.check_shm_ranges(4096, src, dst, same_segment=False)
    with pytest.raises(InvalidUsage, match="overlap without being the same range"):
        calls.check_shm_ranges(8192, (1 << 16, 0), (1 << 16, 4096), same_segment=True)
    calls.check_shm_ranges(8192, (1 << 16, 0), (1 << 16, 4096), same_segment=False)  # two files


def test_blob_must_be_bytes():
    for blob in (b"", b"x", bytearray(b"x"), memoryview(b"x")):
        calls.check_blob(blob)
    for blob in ("x", [1], None, 5):
        with pytest.raises(InvalidUsage, match="all_gather takes bytes"):
            calls.check_blob(blob)


def test_a_callers_tag_is_below_the_automatic_ones():
    assert calls.user_tag(0) == 0
    assert calls.user_tag(AUTO_TAG - 1) == AUTO_TAG - 1
    import numpy as np

    assert calls.user_tag(np.int64(7)) == 7 and type(calls.user_tag(np.int64(7))) is int
    # an integer, nothing that only converts to one (7.9 would have been tag 7)
    for bad in (-1, AUTO_TAG, AUTO_TAG | 3, "seven", "7", None, [1], math.inf, math.nan, 7.0, 7.9, True):
        with pytest.raises(InvalidUsage, match=r"tag must be in \[0, 2\*\*62\)"):
            calls.user_tag(bad)


def test_any_tag_fits_a_frame_header():
    for ok in (0, 5, AUTO_TAG | 9, F.MAX_TAG):
        calls.check_tag(ok)
    for bad in (-1, F.MAX_TAG + 1, 1.0, "1", None):
        with pytest.raises(InvalidUsage, match=r"tag must be an int in \[0, 2\*\*63\)"):
            calls.check_tag(bad)


def test_timeouts():
    import numpy as np

    for ok in (0.001, 1, 1e9, np.float32(2.5)):
        calls.check_timeout(ok)
    for bad in (0, -1, math.nan, math.inf, None, "5", True, [1], 10**400):
        with pytest.raises(InvalidUsage, match="timeout must be a number of seconds > 0"):
            calls.check_timeout(bad)


def test_a_requests_timeout_has_a_default_and_a_bound():
    assert calls.request_timeout(None) == calls.DEFAULT_TIMEOUT
    assert calls.request_timeout(0) == calls.DEFAULT_TIMEOUT  # as the daemon always read it
    assert calls.request_timeout(2) == 2.0 and isinstance(calls.request_timeout(2), float)
    assert calls.request_timeout(calls.MAX_TIMEOUT) == calls.MAX_TIMEOUT
    for bad in (-1, calls.MAX_TIMEOUT * 2, math.nan, math.inf, -math.inf, "soon", "5", b"5", True, False, [1],
                10**400):
        with pytest.raises(InvalidUsage, match=r"timeout must be in \(0, 86400.0\] seconds"):
            calls.request_timeout(bad)
        with pytest.raises(InvalidUsage, match=r"timeout must be in \(0, 86400.0\] seconds"):
            calls.call_timeout(bad)
    with pytest.raises(InvalidUsage):
        calls.call_timeout(0)  # a caller's own timeout has no default
    assert calls.call_timeout(3) == 3.0


def test_shapes():
    import numpy as np

    assert calls.shape_of(3) == (3,) and calls.shape_of((2, np.int64(3))) == (2, 3) and calls.shape_of([]) == ()
    for bad in (-1, (2, -1), 2.5, (2.0,), "ab", None, (True,), object()):
        with pytest.raises(InvalidUsage, match="shape must be an int or a sequence of ints >= 0"):
            calls.shape_of(bad)


def test_byte_view_is_a_flat_view_without_a_copy_or_a_clear_refusal():
    import numpy as np

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    v = calls.byte_view(a, "src")
    assert v.format == "B" and v.ndim == 1 and v.nbytes == 24
    v[0:4] = np.float32(7).tobytes()  # the same memory
    assert a[0, 0] == 7
    with pytest.raises(InvalidUsage, match="dst must be C-contiguous"):
        calls.byte_view(a[:, ::2], "dst")
    with pytest.raises(InvalidUsage, match="dst must be writable"):
        calls.byte_view(b"abc", "dst", writable=True)
    with pytest.raises(InvalidUsage, match="buffer protocol"):
        calls.byte_view([1, 2], "src")
