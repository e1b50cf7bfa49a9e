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
    """A tensor seen as bytes; ``finish()`` writes staged results back when a copy was needed.

    A CUDA tensor viewed with ``device=True`` has no host bytes (``data`` None): ``dev`` is
    the tensor on its device, contiguous, copied straight into shared memory and back
    (:mod:`~pccl_py.client.cuda`); :meth:`to_host` turns it into today's host-staged view."""

    obj: Any
    data: np.ndarray | None  # uint8, C-contiguous; None for a device tensor copied by the GPU
    dtype: str
    staged: Any = None  # torch tensor to copy results into when the original was not viewable
    dev: Any = None  # the tensor on its device (contiguous) when it is copied straight into shared memory
    dev_copy: bool = False  # ``dev`` is a contiguous copy of a strided tensor: results go back into ``obj``
    how: str | None = None  # how a device tensor travelled: "host", "pinned" or "gpu_quant"

    @property
    def nbytes(self) -> int:
        if self.data is None:
            return int(self.dev.numel() * self.dev.element_size())
        return int(self.data.nbytes)

    def to_host(self) -> None:
        """Stage a device tensor through a pageable host copy (the path without pinning)."""
        if self.data is None:
            other = _host_staged(self.obj, self.dtype)
            self.data, self.staged, self.dev, self.how = other.data, other.staged, None, other.how

    def finish(self) -> None:
        if self.staged is not None:
            self.staged[0].copy_(self.staged[1])
        elif self.dev_copy:
            self.obj.copy_(self.dev)


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


def on_device(t) -> bool:
    """A torch tensor that host code cannot read in place (a CUDA tensor)."""
    return t.device.type == "cuda"


def flat(t: Any, device: bool = False) -> Flat:
    """``t`` as bytes. With ``device``, a CUDA tensor is left on its device (``Flat.dev``)
    for a copy straight into shared memory; else it is staged through a host copy."""
    if isinstance(t, np.ndarray):
        name = numpy_dtype(t)  # checks before the view, which fails on strided arrays
        return Flat(t, t.reshape(-1).view(np.uint8), name)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and isinstance(t, torch.Tensor):
        return _flat_torch(torch, t, device)
    raise InvalidUsage(f"expected a numpy array or torch tensor, got {type(t).__name__}")


def _host_staged(t, name: str) -> Flat:
    import torch

    host = t.detach().to("cpu", copy=True).contiguous()
    f = _view(torch, t, host, name, (t, host))
    f.how = "host" if on_device(t) else None
    return f


def _view(torch, t, work, name: str, staged) -> Flat:
    if work.dtype in (torch.bfloat16, torch.float16):
        arr = work.view(torch.int16).numpy()
    else:
        arr = work.numpy()
    return Flat(t, arr.reshape(-1).view(np.uint8), name, staged)


def _flat_torch(torch, t, device: bool = False) -> Flat:
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
    work = t.detach()
    if on_device(work):
        if not device:
            return _host_staged(t, name)
        dev = work.contiguous()
        return Flat(t, None, name, dev=dev, dev_copy=not work.is_contiguous(), how="pinned")
    if work.device.type != "cpu" or not work.is_contiguous():
        # CUDA tensors and strided views are staged through a contiguous host copy.
        return _host_staged(t, name)
    return _view(torch, t, work, name, None)
