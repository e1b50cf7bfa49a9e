"""One-step-delayed DiLoCo: the all-reduce of an outer step's pseudo-gradients runs while
the next inner steps do, and is applied at the end of them.

At ``outer_step()``: wait for the exchange started at the previous one and apply it to the
outer parameters; measure this phase's progress (the parameters the phase started from
minus the local ones); vote and sync (nothing is in flight there); start the exchange of
that progress; load the outer parameters into the model and train on. Each phase trains
from outer parameters that lack the one exchange in flight, which is what the delay
costs. The first phase's progress is applied at the end of the second.

Outer momentum amplifies the delay: on examples/' language model, outer momentum 0.9
(DiLoCo's usual setting) made the delayed run diverge (final loss 2.86 against 1.35 for
synchronous DiLoCo), 0.5 reached 1.66 and none 1.61; hence ``outer_momentum=0.0`` by
default here.

A newcomer joins at the vote and starts the next exchange with the others, with nothing
to give yet: the exchange is a sum, divided by the peers that gave something (every peer
knows how many joined), so its zeros do not dilute the average.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from pccl_py.errors import Diverged

from .base import STEP, OuterLoop
from .rules import contributors
from .sync import pseudo_gradient_buffers

log = logging.getLogger("pccl.diloco")


class DelayedDiLoCo(OuterLoop):
    """One-step-delayed DiLoCo (see the module docstring); used as :class:`DiLoCo` is."""

    def __init__(self, client: Any, model: Any, *, outer_momentum: float = 0.0, **options: Any) -> None:
        super().__init__(client, model, outer_momentum=outer_momentum, **options)
        self._base: list[torch.Tensor] = []  # the parameters this phase started from
        self._pending = None  # (handle, peers that gave zeros)

    def join(self, **kw) -> dict:
        res = super().join(**kw)
        # the established peers start an exchange right after this sync point: so does a
        # newcomer, with no progress to give
        self._deltas = pseudo_gradient_buffers(self.client, self.params)
        for d in self._deltas:
            d.zero_()
        self._start()
        self._base = [o.clone() for o in self.outer]
        return res

    def _start(self) -> None:
        """Start the exchange; the newcomers of the sync point just passed give zeros to it."""
        handle = self.client.all_reduce_async(self._deltas, op="sum", quant=self.quant, algorithm=self.algorithm,
                                              timeout=self.timeout, retry=True)
        self._pending = (handle, self.newcomer_ids, len(self._peers))

    @torch.no_grad()
    def _finish(self) -> dict:
        """Wait for the exchange in flight and apply it: the info of the call."""
        handle, zeros, started_world = self._pending
        self._pending = None
        try:
            info = handle.wait()
        except Diverged as exc:
            log.warning("delayed outer step not applied: %s", exc)
            return {"diverged": True, "error": str(exc)}
        n = contributors(int(info.get("world_size", 1)), self._gave_zeros(zeros, started_world, info))
        info["contributors"] = n
        if n == 0:  # only newcomers took part: nothing to apply
            return info
        for o, m, d in zip(self.outer, self.momentum, self._deltas, strict=True):
            d.div_(n)
            self.outer_opt.apply(o, m, d)
        self.state[STEP][0] += 1
        return info

    @torch.no_grad()
    def outer_step(self) -> dict:
        """Apply the exchange started at the previous outer step, vote and sync, start this
        phase's exchange; returns the applied call's info (``sync``, ``step``, ``members``)."""
        self._joined()
        info = self._finish() if self._pending is not None else {}  # none after an exchange that failed
        for d, b, p in zip(self._deltas, self._base, self.params, strict=True):
            torch.sub(b, p.detach().to("cpu"), out=d)
        res = self._vote_and_sync()
        self._start()
        self.load_model()
        self._base = [o.clone() for o in self.outer]
        info.update(sync=res["status"], sync_rx_bytes=res.get("rx_bytes", 0), sync_seconds=res.get("seconds", 0.0), step=self.step,
                    members=res["world_size"], epoch=res["epoch"])
        self.last_info = info
        return info

    def finish(self) -> dict:
        """Wait for and apply the exchange in flight (at the end of training); the model then
        holds the outer parameters with every phase's progress applied."""
        self._joined()
        info = self._finish() if self._pending is not None else {}
        self.load_model()
        return info
