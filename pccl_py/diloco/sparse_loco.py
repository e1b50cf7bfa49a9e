"""Sparse exchange (SparseLoCo-style): each peer sends only the largest entries of its
pseudo-gradient, a few bits each, and keeps what it did not send for the next time.

At ``outer_step()`` a peer flattens ``outer - local`` (float32), adds the error-feedback
buffer, keeps the top ``density`` of each chunk quantized to ``bits`` bits
(:class:`~pccl_py.diloco.sparse.SparseCodec`), and the peers exchange these compact blobs
with ``all_gather``. Every peer sums the same blobs in the same (rank) order, so the
averaged update, and the outer parameters, are bit-identical everywhere. The error
feedback stands in for outer momentum, so the defaults are plain SGD with ``outer_lr`` 1.

The error-feedback buffer is this peer's own (a newcomer starts with zeros); it is not
part of the run's shared state.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from pccl_py.errors import Diverged, InvalidUsage

from .base import STEP, OuterLoop
from .sparse import SparseCodec

log = logging.getLogger("pccl.diloco")


class SparseLoCo(OuterLoop):
    def __init__(self, client: Any, model: Any, *, density: float = 0.02, bits: int = 4, chunk: int = 4096,
                 outer_lr: float = 1.0, outer_momentum: float = 0.0, **options: Any) -> None:
        if options.get("quant") is not None:
            raise InvalidUsage("SparseLoCo quantizes its own blobs (bits=2 or 4); quant does not apply")
        super().__init__(client, model, outer_lr=outer_lr, outer_momentum=outer_momentum, **options)
        if any(p.dtype != torch.float32 for p in self.params):
            raise InvalidUsage("SparseLoCo takes float32 parameters")
        self.numel = sum(p.numel() for p in self.params)
        self.codec = SparseCodec(self.numel, chunk=chunk, density=density, bits=bits)
        self._flat = torch.empty(self.numel, dtype=torch.float32)

    @torch.no_grad()
    def outer_step(self) -> dict:
        """Exchange the compressed pseudo-gradients, apply their average, vote and sync;
        returns ``bytes_sent`` (this peer's blob), ``tx_bytes`` (the blob times the other
        peers), ``bytes_received``, ``sync``, ``step``."""
        self._joined()
        off = 0
        for o, p in zip(self.outer, self.params, strict=True):
            n = p.numel()
            torch.sub(o.reshape(-1), p.detach().to("cpu").reshape(-1), out=self._flat[off:off + n])
            off += n
        feedback = self.codec.state_tensors()
        kept = {k: v.clone() for k, v in feedback.items()}  # what encode() takes out, back if not sent
        blob = self.codec.encode(self._flat)
        info: dict = {"bytes_sent": len(blob)}
        try:
            blobs = self.client.all_gather(blob, timeout=self.timeout, retry=True)
        except Diverged as exc:
            log.warning("outer step not applied: %s", exc)
            for k, v in kept.items():  # the others went on without this blob: keep its entries
                feedback[k].copy_(v)
            info.update(diverged=True, error=str(exc))
        else:
            avg = SparseCodec.aggregate(blobs, self.numel, op="avg")
            off = 0
            for o, m in zip(self.outer, self.momentum, strict=True):
                n = o.numel()
                self.outer_opt.apply(o, m, avg[off:off + n].view(o.shape))
                off += n
            self.state[STEP][0] += 1
            # an all-gather hands each peer's blob to each other peer: what this peer sends
            info.update(world_size=len(blobs), tx_bytes=len(blob) * (len(blobs) - 1),
                        bytes_received=sum(len(b) for b in blobs) - len(blob))
        res = self._vote_and_sync()
        self.load_model()
        info.update(sync=res["status"], sync_rx_bytes=res.get("rx_bytes", 0), sync_seconds=res.get("seconds", 0.0), step=self.step,
                    members=res["world_size"], epoch=res["epoch"])
        self.last_info = info
        return info
