"""CUDA tensors copied straight between the GPU and the shared memory the daemon reads.

The pool segment of a call is page-locked once (:class:`~pccl_py.client.segments.Pins`),
so the device-to-host copy lands in it by DMA, without a pageable bounce buffer and
without a second copy on the CPU; the result goes back host-to-device from the same
segment. Copies are queued ``non_blocking`` on a side stream per device that first waits
for the caller's current stream (the kernels that produced the tensor), then the host
waits for that stream once: the segment holds the tensor before the request is posted,
and the tensor holds the result before ``wait()`` returns.

``stage="gpu_quant"`` (quantized float32 calls): the tensor is quantized on its device
(:mod:`~pccl_py.client.gpu_quant`), only the codes cross PCIe (into a second pool
segment), and the host decodes them into the call's segment with the native kernel.

A tensor for which :func:`~pccl_py.client.tensors.on_device` is true but which is on the
CPU (tests) takes the same steps with plain copies.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from pccl_py.client import gpu_quant
from pccl_py.errors import InvalidUsage

STAGES = ("host", "pinned", "gpu_quant")
ENV = "PCCL_CUDA_STAGE"

_streams: dict = {}
_streams_lock = threading.Lock()


def stage_of(stage: str | None) -> str:
    """The staging of CUDA tensors for a call: ``stage``, else $PCCL_CUDA_STAGE, else pinned."""
    s = stage if stage is not None else os.environ.get(ENV) or "pinned"
    if s not in STAGES:
        raise InvalidUsage(f"stage must be one of {STAGES}, not {s!r}"
                           + ("" if stage is not None else f" (from ${ENV})"))
    return s


def _side(t):
    """The side stream of ``t``'s device (None for a CPU tensor)."""
    if t.device.type != "cuda":
        return None
    import torch

    key = (t.device.index if t.device.index is not None else torch.cuda.current_device())
    with _streams_lock:
        s = _streams.get(key)
        if s is None:
            s = _streams[key] = torch.cuda.Stream(device=key)
    return s


class _Queue:
    """Copies queued on side streams after the caller's work; ``sync()`` waits for all."""

    def __init__(self) -> None:
        self.streams: list = []

    def enter(self, t):
        import contextlib

        import torch

        s = _side(t)
        if s is None:
            return contextlib.nullcontext()
        if s not in self.streams:
            s.wait_stream(torch.cuda.current_stream(s.device))
            self.streams.append(s)
        return torch.cuda.stream(s)

    def sync(self) -> None:
        for s in self.streams:
            s.synchronize()


def host_view(buf: np.ndarray, like):
    """A torch tensor of ``like``'s dtype over the bytes ``buf`` (uint8)."""
    import torch

    return torch.from_numpy(buf).view(like.dtype)


def to_segment(items) -> None:
    """Copy each device tensor into its bytes of shared memory: [(tensor, uint8 array)]."""
    q = _Queue()
    for dev, buf in items:
        with q.enter(dev):
            host_view(buf, dev).copy_(dev.reshape(-1), non_blocking=True)
    q.sync()


def from_segment(items) -> None:
    """Copy results from shared memory into each device tensor: [(tensor, uint8 array)]."""
    q = _Queue()
    for dev, buf in items:
        with q.enter(dev):
            dev.reshape(-1).copy_(host_view(buf, dev), non_blocking=True)
    q.sync()


def quantized_to_segment(devs: list, quant: str, world: int, codes_buf: np.ndarray, dst: np.ndarray) -> None:
    """The float32 device tensors ``devs`` (one bucket, in order) quantized on their device
    on the daemon's blocks for ``world`` peers; codes copied into ``codes_buf`` (uint8,
    page-locked), then decoded into ``dst`` (the bucket's bytes of the call's segment)."""
    import torch

    q = _Queue()
    with q.enter(devs[0]):
        x = torch.cat([d.reshape(-1) for d in devs]) if len(devs) > 1 else devs[0].reshape(-1)
        bl = gpu_quant.blocks(x.numel(), world)
        codes, lo, scale = gpu_quant.quantize(torch, x, bl, quant)
        host = torch.from_numpy(codes_buf[:codes.numel()])
        host.copy_(codes, non_blocking=True)
    q.sync()
    gpu_quant.dequantize_into(codes_buf[:codes.numel()], lo, scale, bl, quant, dst.view(np.float32))


def code_bytes(nbytes: int, quant: str) -> int:
    n = nbytes // 4
    return n if quant == "uint8" else (n + 1) // 2
