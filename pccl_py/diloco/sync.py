"""DiLoCo: every ``inner_steps`` the peers average their pseudo-gradients (outer minus
local parameters) with one all-reduce, take an outer step, vote and sync; the model then
holds the run's outer parameters on every peer."""

from __future__ import annotations

import logging
from typing import Any

import torch

from pccl_py.errors import Diverged

from .base import STEP, OuterLoop

log = logging.getLogger("pccl.diloco")


def pseudo_gradient_buffers(client: Any, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Buffers shaped like ``params`` in shared memory (one allocation per dtype, the views
    consecutive), so an all-reduce reads and writes them where they are."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(p.dtype, []).append(i)
    out: list[Any] = [None] * len(params)
    for dtype, idx in by_dtype.items():
        buf = client.alloc(sum(params[i].numel() for i in idx), str(dtype).removeprefix("torch."), as_torch=True)
        off = 0
        for i in idx:
            n = params[i].numel()
            out[i] = buf[off:off + n].view(params[i].shape)
            off += n
    return out


class DiLoCo(OuterLoop):
    """Synchronous DiLoCo (see the module docstring).

    ::

        client.connect()
        diloco = DiLoCo(client, model, inner_optimizer=opt)
        diloco.join()                       # the model now holds the run's parameters
        while diloco.step < outer_steps:
            for _ in range(inner_steps):
                ...                         # forward, backward, opt.step()
            diloco.outer_step()             # average, outer step, vote, sync, model updated

    ``quant`` ("uint8", "uint4") quantizes the pseudo-gradients on the wire. A newcomer's
    ``join()`` returns at the vote of the established peers' ``outer_step()`` and receives
    the run's state there (and, with ``inner_optimizer``, the optimiser state of one peer).
    """

    @torch.no_grad()
    def outer_step(self) -> dict:
        """Average the pseudo-gradients, apply the outer step, vote and sync; returns the
        all-reduce's info with ``sync`` (``in_sync``/``fetched``), ``step`` and ``members``
        (the world after the vote: newcomers included).

        If the all-reduce ends in :class:`~pccl_py.errors.Diverged` (the others completed it
        without this peer) the step is not applied here (``"diverged": True`` in the info)
        and the sync that follows brings this peer the run's state."""
        self._joined()
        if self._deltas is None:
            self._deltas = pseudo_gradient_buffers(self.client, self.params)
        for d, o, p in zip(self._deltas, self.outer, self.params, strict=True):
            torch.sub(o, p.detach().to("cpu"), out=d)
        try:
            info = self.client.all_reduce(self._deltas, op="avg", quant=self.quant, algorithm=self.algorithm,
                                          timeout=self.timeout, retry=True)
        except Diverged as exc:
            log.warning("outer step not applied: %s", exc)
            info = {"diverged": True, "error": str(exc)}
        else:
            for o, m, d in zip(self.outer, self.momentum, self._deltas, strict=True):
                self.outer_opt.apply(o, m, d)
            self.state[STEP][0] += 1
        res = self._vote_and_sync()
        self.load_model()
        info.setdefault("world_size", res["world_size"])
        info.update(sync=res["status"], sync_rx_bytes=res.get("rx_bytes", 0), sync_seconds=res.get("seconds", 0.0), step=self.step,
                    members=res["world_size"], epoch=res["epoch"])
        self.last_info = info
        return info
