"""What a call may ask for: the values each argument of a collective may take, and the checks.

Three layers check a call, each for its own reason: the client before it sends (the
caller learns of a mistake at once, before any peer is involved), the daemon when a
request arrives over its IPC socket (a client may be buggy or of another version), and
the data plane for its own callers. All of them check with the functions below, so each
allowed value and each bound is written here and nowhere else. Every check raises
:class:`~pccl_py.errors.InvalidUsage` with a message that says what to pass instead.

Values that an implementation defines come from it: the dtypes and reductions are those
the kernels implement (:mod:`pccl_py.kernels`), the sync strategies those the control messages
carry (:mod:`pccl_py.wire.control`), the largest tag the one a frame header holds
(:mod:`pccl_py.wire.frames`).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any

from pccl_py import kernels as K
from pccl_py.errors import InvalidUsage
from pccl_py.wire.control import MAX_TAGS, STRATEGIES
from pccl_py.wire.frames import MAX_TAG
from pccl_py.wire.ipc import INLINE_BYTES

__all__ = [
    "ALGORITHMS",
    "AUTO_TAG",
    "DEFAULT_TIMEOUT",
    "DTYPES",
    "MAX_TAG",
    "MAX_TIMEOUT",
    "OPS",
    "QUANTS",
    "QUANT_DTYPES",
    "QUANT_OPS",
    "STRATEGIES",
    "TAGS_REPORTED",
    "auto_tag",
    "check_algorithm",
    "check_all_reduce",
    "check_blob",
    "check_dtype",
    "check_inline",
    "check_op",
    "check_quant",
    "check_reduction",
    "check_shm_ranges",
    "check_strategy",
    "check_tag",
    "check_timeout",
    "check_whole_elements",
    "call_timeout",
    "never_made",
    "request_timeout",
    "shape_of",
    "tag_count",
    "tag_gen",
    "user_tag",
]

DTYPES: tuple[str, ...] = tuple(K.DTYPES)
OPS: tuple[str, ...] = tuple(K.OPS)  # avg: a sum, divided by the world size at the end
QUANTS = (None, "uint8", "uint4")  # None: full precision
QUANT_DTYPES = ("float32",)  # what a quantized all-reduce takes
QUANT_OPS = ("sum", "avg")
ALGORITHMS = ("auto", "ring", "direct", "shm")

# Tags. A caller's tag is below AUTO_TAG; tags with that bit set are the ones the daemon
# gives calls without a tag (pccl_py.daemon.tags). Every tag fits a frame header (MAX_TAG).
# An automatic tag is AUTO_TAG | generation << 32 | count: the generation names the vote
# round the count started at (every member of a group starts counting there together).
AUTO_TAG = 1 << 62
TAG_GEN_SHIFT = 32
TAG_GEN_MASK = (1 << 30) - 1
TAG_COUNT_MASK = (1 << TAG_GEN_SHIFT) - 1


def auto_tag(gen: int, count: int) -> int:
    """The automatic tag of call ``count`` (from 1) of generation ``gen``."""
    return AUTO_TAG | (gen & TAG_GEN_MASK) << TAG_GEN_SHIFT | count


def tag_gen(tag: int) -> int | None:
    """The generation of an automatic tag; None for a caller's tag."""
    return (tag >> TAG_GEN_SHIFT) & TAG_GEN_MASK if tag & AUTO_TAG else None


def tag_count(tag: int) -> int:
    return tag & TAG_COUNT_MASK


TAGS_REPORTED = MAX_TAGS  # automatic tags a heartbeat or a vote reports at most


def never_made(tag: int, below: int, open_tags: Sequence[int]) -> bool | None:
    """Whether a voter that reported ``(below, open_tags)`` (``AutoTags.progress`` in
    pccl_py.daemon.tags) leaves call ``tag`` of another peer unmade: it has not made it, or
    it failed it and now votes instead of retrying. None when that cannot be told (a
    caller's tag, or the two count in different generations)."""
    if not below or tag_gen(tag) is None or tag_gen(tag) != tag_gen(below):
        return None
    if tag_count(tag) >= tag_count(below) or tag in open_tags:
        return True
    if len(open_tags) >= TAGS_REPORTED and tag_count(tag) > tag_count(open_tags[-1]):
        return None  # beyond the failed tags the vote had room for
    return False

# Timeouts, in seconds. A request without one (or with 0) gets the default; a day at most,
# so that a typo cannot park a call for ever.
DEFAULT_TIMEOUT = 60.0
MAX_TIMEOUT = 24 * 3600.0


def _listing(allowed: tuple) -> str:
    return ", ".join(repr(v) for v in allowed)


def _one_of(what: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise InvalidUsage(f"{what} {value!r} is not supported; pass one of {_listing(allowed)}")


# -- names -------------------------------------------------------------------------------
def check_dtype(dtype: Any) -> None:
    _one_of("dtype", dtype, DTYPES)


def check_op(op: Any) -> None:
    _one_of("op", op, OPS)


def check_quant(quant: Any, dtype: str | None = None, op: str | None = None) -> None:
    """``quant`` is a known name; with ``dtype`` and ``op``, one that applies to them."""
    _one_of("quant", quant, QUANTS)
    if quant is None or dtype is None or op is None:
        return
    if dtype not in QUANT_DTYPES or op not in QUANT_OPS:
        raise InvalidUsage(
            f"quant={quant!r} needs dtype {' or '.join(QUANT_DTYPES)} and op {' or '.join(QUANT_OPS)} "
            f"(got dtype {dtype}, op {op}); pass quant=None for other dtypes and ops")


def check_algorithm(algorithm: Any) -> None:
    _one_of("algorithm", algorithm, ALGORITHMS)


def check_strategy(strategy: Any) -> None:
    _one_of("strategy", strategy, STRATEGIES)


def check_reduction(op: Any, quant: Any, algorithm: Any) -> None:
    """The names of an all-reduce that every peer must share (the client's check; the dtype
    comes from the tensors)."""
    check_op(op)
    check_quant(quant)
    check_algorithm(algorithm)


def check_all_reduce(dtype: Any, op: Any, quant: Any, algorithm: Any) -> None:
    """Every name of an all-reduce, and that its quantization applies to its dtype and op."""
    check_dtype(dtype)
    check_op(op)
    check_quant(quant, dtype, op)
    check_algorithm(algorithm)


# -- sizes -------------------------------------------------------------------------------
def check_whole_elements(nbytes: int, dtype: str) -> None:
    """``nbytes`` holds a whole number of ``dtype`` elements (``dtype`` already checked)."""
    if nbytes < 0:
        raise InvalidUsage(f"a call's size in bytes must be >= 0, got {nbytes}")
    item = K.itemsize(dtype)
    if nbytes % item:
        raise InvalidUsage(f"{nbytes} bytes is not a whole number of {dtype} elements ({item} bytes each); "
                           f"pass buffers of the dtype the call names")


def check_inline(data: Any, nbytes: int) -> None:
    """The bytes a small all-reduce carries in its request (at most ``INLINE_BYTES``)."""
    if not isinstance(data, bytes) or len(data) != nbytes or nbytes > INLINE_BYTES:
        raise InvalidUsage(f"inline data must be bytes of the call's size (at most {INLINE_BYTES}); "
                           f"larger calls pass their tensors in shared memory")


def check_shm_ranges(nbytes: int, src: tuple[int, int], dst: tuple[int, int], same_segment: bool) -> None:
    """The input and output ranges of a call in shared memory: ``src`` and ``dst`` are
    ``(segment size, offset)``; ranges of one segment are either apart or the same."""
    for size, off in (src, dst):
        if off < 0 or off + nbytes > size:
            raise InvalidUsage(f"buffer range [{off}, {off + nbytes}) outside the shared-memory segment "
                               f"of {size} bytes; map a segment large enough for the call")
    in_off, out_off = src[1], dst[1]
    if same_segment and in_off != out_off and abs(in_off - out_off) < nbytes:
        raise InvalidUsage("input and output ranges overlap without being the same range; "
                           "reduce in place (one range) or use ranges that are apart")


def byte_view(buf: Any, name: str = "buffer", writable: bool = False) -> memoryview:
    """``buf`` (anything with the buffer protocol) as a flat byte memoryview, without a copy;
    ``InvalidUsage`` when it is not C-contiguous, or not writable where it will be written."""
    try:
        mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    except TypeError:
        raise InvalidUsage(f"{name} does not support the buffer protocol (pass a numpy array, "
                           "bytes, bytearray or memoryview)") from None
    if not mv.c_contiguous:
        raise InvalidUsage(f"{name} must be C-contiguous (pass a contiguous copy)")
    if writable and mv.readonly:
        raise InvalidUsage(f"{name} must be writable")
    if mv.format == "B" and mv.ndim == 1:
        return mv
    try:
        return mv.cast("B")
    except TypeError as e:
        raise InvalidUsage(f"{name}: {e}") from None


def shape_of(shape: Any) -> tuple[int, ...]:
    """An array shape a caller passed (an integer, or a sequence of them), each >= 0."""
    dims = [shape] if _integer(shape) is not None else shape
    try:
        out = tuple(_integer(d) for d in dims)
    except TypeError:
        out = (None,)
    if any(d is None or d < 0 for d in out):
        raise InvalidUsage(f"shape must be an int or a sequence of ints >= 0, got {shape!r}")
    return out  # type: ignore[return-value]


def check_blob(blob: Any) -> None:
    """What an all-gather contributes: bytes (or a buffer of bytes)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise InvalidUsage(f"all_gather takes bytes, got {type(blob).__name__}; encode the data first")


def peer_count(n: Any) -> int:
    """How many peers ``wait_for_peers`` waits for: an integer >= 1."""
    value = _integer(n)
    if value is None or value < 1:
        raise InvalidUsage(f"wait_for_peers takes a number of peers >= 1, got {n!r}")
    return value


def poll_interval(value: Any) -> float:
    """A pause between two polls: a number of seconds in (0, 60]."""
    seconds = _seconds(value)
    if seconds is None or not 0 < seconds <= 60.0:
        raise InvalidUsage(f"poll must be in (0, 60] seconds, got {value!r}")
    return seconds


# -- tags and timeouts -------------------------------------------------------------------
def _integer(value: Any) -> int | None:
    """``value`` as an int if it is one (numpy integers too; never a bool, a float or a string)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _seconds(value: Any) -> float | None:
    """``value`` as finite seconds if it is a real number (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        x = float(value)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


def user_tag(tag: Any) -> int:
    """A caller's tag as an int: an integer below ``AUTO_TAG`` (2**62)."""
    n = _integer(tag)
    if n is None or not 0 <= n < AUTO_TAG:
        raise InvalidUsage(f"tag must be in [0, 2**62), got {tag!r}; pass a smaller int, or no tag to have "
                           f"calls tagged in call order")
    return n


def check_tag(tag: Any) -> None:
    """Any tag a collective runs under, automatic ones included: an int in [0, 2**63)."""
    if not isinstance(tag, int) or not 0 <= tag <= MAX_TAG:
        raise InvalidUsage(f"tag must be an int in [0, 2**63), got {tag!r}")


def check_timeout(timeout: Any) -> None:
    """A deadline in seconds: a finite number above 0."""
    seconds = _seconds(timeout)
    if seconds is None or seconds <= 0:
        raise InvalidUsage(f"timeout must be a number of seconds > 0, got {timeout!r}")


def call_timeout(value: Any) -> float:
    """A caller's timeout for one call, as the daemon will take it: a number of seconds in
    (0, ``MAX_TIMEOUT``]. The client checks it before it sends (and before it waits)."""
    seconds = _seconds(value)
    if seconds is None or not 0 < seconds <= MAX_TIMEOUT:
        raise InvalidUsage(f"timeout must be in (0, {MAX_TIMEOUT}] seconds, got {value!r}")
    return seconds


def request_timeout(value: Any) -> float:
    """The timeout of a request that arrived from a client: none (or 0) means
    ``DEFAULT_TIMEOUT``; else as :func:`call_timeout`."""
    if value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool) and value == 0):
        return DEFAULT_TIMEOUT
    return call_timeout(value)
