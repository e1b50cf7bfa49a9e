"""Views of numpy arrays and torch tensors as flat byte buffers with a dtype name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pccl_py.errors import InvalidUsage

_NUMPY = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float64): "float64",
    np.dtype(np.float16): "float16",
    np.dtype(np.int8): "int8",
    np.dtype(np.int16): "int16",
    np.dtype(np.int32): "int32",
    np.dtype(np.int64): "int64",
    np.dtype(np.uint8): "uint8",
}


@dataclass
class Flat:
    """A tensor seen as bytes; ``finish()`` writes staged results back when a copy was needed."""

    obj: Any
    data: np.ndarray  # uint8, C-contiguous
    dtype: str
    staged: Any = None  # torch tensor to copy results into when the original was not viewable

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def finish(self) -> None:
        if self.staged is not None:
            self.staged[0].copy_(self.staged[1])


def numpy_dtype(t: np.ndarray) -> str:
    """The dtype name of a numpy array the runtime can reduce in place (else InvalidUsage)."""
    name = _NUMPY.get(t.dtype)
    if name is None:
        raise InvalidUsage(f"unsupported numpy dtype {t.dtype}; supported: {sorted(_NUMPY.values())}")
    if not t.flags.c_contiguous:
        raise InvalidUsage("numpy arrays must be C-contiguous (use np.ascontiguousarray)")
    if not t.flags.writeable:
        raise InvalidUsage("numpy array is read-only; results are written in place")
    return name


def flat(t: Any) -> Flat:
    if isinstance(t, np.ndarray):
        name = numpy_dtype(t)  # checks before the view, which fails on strided arrays
        return Flat(t, t.reshape(-1).view(np.uint8), name)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and isinstance(t, torch.Tensor):
        return _flat_torch(torch, t)
    raise InvalidUsage(f"expected a numpy array or torch tensor, got {type(t).__name__}")


def _flat_torch(torch, t) -> Flat:
    names = {
        torch.float32: "float32",
        torch.float64: "float64",
        torch.float16: "float16",
        torch.bfloat16: "bfloat16",
        torch.int8: "int8",
        torch.int16: "int16",
        torch.int32: "int32",
        torch.int64: "int64",
        torch.uint8: "uint8",
    }
    name = names.get(t.dtype)
    if name is None:
        raise InvalidUsage(f"unsupported torch dtype {t.dtype}")
    staged = None
    work = t.detach()
    if work.device.type != "cpu" or not work.is_contiguous():
        # CUDA tensors and strided views are staged through a contiguous host copy.
        host = work.to("cpu", copy=True).contiguous()
        staged = (t, host)
        work = host
    if work.dtype in (torch.bfloat16, torch.float16):
        arr = work.view(torch.int16).numpy()
    else:
        arr = work.numpy()
    return Flat(t, arr.reshape(-1).view(np.uint8), name, staged)
