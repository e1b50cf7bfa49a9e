"""The kernels the runtime calls: :mod:`pccl_py.kernels._native` when built, else the reference.

* ``_native`` (``native/*.c``): reductions, the avg finish, min-max quantization, memory
  helpers for shared-memory collectives, and the socket loops of the data plane's I/O
  threads. Typed by ``_native.pyi``.
* :mod:`~pccl_py.kernels.reference`: the pure-numpy twin of every kernel and memory
  helper, bit for bit; the specification the C code is tested against. The runtime falls
  back to it (slowly, with a warning) only in a checkout whose extension is not built.
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


def itemsize(dtype: str) -> int:
    return DTYPES[dtype][0]


try:
    from pccl_py.kernels import _native as _impl

    SOURCE = "pccl_py.kernels._native"
except ImportError:  # pragma: no cover - only in a checkout without the built extension
    from pccl_py.kernels import reference as _impl

    SOURCE = "pccl_py.kernels.reference"
    logging.getLogger("pccl.kernels").warning(
        "pccl_py.kernels._native is not built; using the numpy reference (much slower): run "
        "`pip install -e .` or `python setup.py build_ext --inplace`")

reduce = _impl.reduce
finish_avg = _impl.finish_avg
quantize_u8 = _impl.quantize_u8
quantize_u4 = _impl.quantize_u4
dequantize_u8 = _impl.dequantize_u8
dequantize_u4 = _impl.dequantize_u4
dequant_add_u8 = _impl.dequant_add_u8
dequant_add_u4 = _impl.dequant_add_u4
copy = _impl.copy  # the native memory helpers release the GIL, fence and are atomic
copy_stream = _impl.copy_stream
load_u64 = _impl.load_u64
store_u64 = _impl.store_u64
arrive = _impl.arrive


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask): what thread counts follow."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fold(srcs: list, outs: list, op: str, dtype: str, scratch: memoryview | None = None) -> None:
    """Every buffer of ``outs`` = ``op`` over the equal-sized ``srcs`` in list order (avg: the
    sum, then divided by ``len(srcs)``).

    Every peer that folds the same contributions in the same order makes the same kernel
    calls on the same bytes, so all of them hold the same bits. With ``scratch`` the work
    goes block by block through it (a block stays in cache) and each finished block is
    copied to every output; without, it is done in ``outs[0]`` and copied from there."""
    kop = "sum" if op == "avg" else op
    n = len(outs[0])
    step = len(scratch) if scratch is not None and len(scratch) else max(n, 1)
    for a in range(0, n, step):
        b = min(n, a + step)
        o = scratch[:b - a] if scratch is not None else outs[0][a:b]
        copy(o, srcs[0][a:b])
        for src in srcs[1:]:
            reduce(o, src[a:b], kop, dtype)
        if op == "avg":
            finish_avg(o, len(srcs), dtype)
        for d in outs if scratch is not None else outs[1:]:
            copy(d[a:b], o)
