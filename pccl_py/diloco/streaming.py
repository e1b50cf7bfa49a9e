"""Streaming DiLoCo: the model is split into fragments, each exchanged on its own
schedule, staggered so that one small exchange at a time overlaps the inner steps.

Call :meth:`StreamingDiLoCo.inner_step` after every inner optimiser step. At inner step
``s`` (counted by the run, ``diloco.step``), in this order (see
:class:`~pccl_py.diloco.rules.StreamingSchedule`):

1. an exchange started ``overlap`` steps ago is waited for; its fragment's averaged
   pseudo-gradient takes an outer step, and the fragment's local parameters become
   ``mix * local + (1 - mix) * outer`` (the local ones went on training meanwhile);
2. every ``sync_every`` steps the peers vote and sync (no exchange is in flight there);
   a newcomer joins here and takes the outer parameters;
3. a fragment due starts its exchange of ``outer - local`` (an all-reduce, optionally
   ``quant="uint4"``).

Every fragment is thus exchanged once every ``sync_every`` inner steps, and the bytes on
the wire at any moment are one fragment's. Between exchanges the local parameters are
the peer's own; the outer parameters (and so the fragments' outer state) are identical
on every peer.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from pccl_py.errors import Diverged, InvalidUsage

from .base import STEP, OuterLoop
from .rules import StreamingSchedule, contributors, split_fragments
from .sync import pseudo_gradient_buffers

log = logging.getLogger("pccl.diloco")


class StreamingDiLoCo(OuterLoop):
    def __init__(self, client: Any, model: Any, *, fragments: int = 4, sync_every: int = 64, overlap: int = 1,
                 mix: float = 0.5, **options: Any) -> None:
        super().__init__(client, model, **options)
        if not 0 <= mix <= 1:
            raise InvalidUsage(f"mix must be in [0, 1], got {mix}")
        self.schedule = StreamingSchedule(fragments, sync_every, overlap)
        self.mix = float(mix)
        self.fragments = split_fragments([p.numel() for p in self.params], fragments)
        self._pending: dict[int, tuple[Any, int]] = {}  # fragment -> (handle, peers that gave zeros)
        self._fresh = 0  # newcomers of the last sync point, until fragment 0 started

    def join(self, **kw) -> dict:
        res = super().join(**kw)
        self._deltas = [pseudo_gradient_buffers(self.client, [self.params[i] for i in frag])
                        for frag in self.fragments]
        self._start_due(self.step, self.newcomer_ids)  # as the established peers do after this sync
        return res

    def _start_due(self, step: int, zeros: frozenset[str]) -> None:
        for f in self.schedule.starts(step):
            for d, i in zip(self._deltas[f], self.fragments[f], strict=True):
                torch.sub(self.outer[i], self.params[i].detach().to("cpu"), out=d)
            handle = self.client.all_reduce_async(self._deltas[f], op="sum", quant=self.quant,
                                                  algorithm=self.algorithm, timeout=self.timeout, retry=True)
            # newcomers joined at this step's sync and trained nothing: fragment 0, started
            # right there, has their zeros
            self._pending[f] = (handle, zeros if f == 0 else frozenset(), len(self._peers))
            if self.schedule.overlap == 0:
                self._finish(f)

    @torch.no_grad()
    def _finish(self, f: int) -> dict:
        handle, zeros, started_world = self._pending.pop(f)
        try:
            info = handle.wait()
        except Diverged as exc:
            log.warning("fragment %d: outer step not applied: %s", f, exc)
            return {"diverged": True, "error": str(exc)}
        n = contributors(int(info.get("world_size", 1)), self._gave_zeros(zeros, started_world, info))
        if n == 0:
            return info
        for d, i in zip(self._deltas[f], self.fragments[f], strict=True):
            d.div_(n)
            self.outer_opt.apply(self.outer[i], self.momentum[i], d)
            p = self.params[i]
            p.mul_(self.mix).add_(self.outer[i].to(p.device), alpha=1.0 - self.mix)
        info["fragment"] = f
        return info

    @torch.no_grad()
    def inner_step(self) -> dict:
        """Count one inner step of the run and do what the schedule says at it; returns
        ``finished`` (the infos of exchanges applied) and, at a sync point, ``sync``."""
        self._joined()
        self.state[STEP][0] += 1
        step = self.step
        out: dict = {"step": step, "finished": []}
        for f in self.schedule.finishes(step):
            out["finished"].append(self._finish(f))
        if self.schedule.syncs(step):
            res = self._vote_and_sync()
            if res["status"] == "fetched":  # a peer that missed an exchange: the run's parameters
                self.load_model()
            out.update(sync=res["status"], members=res["world_size"], epoch=res["epoch"])
            zeros = self.newcomer_ids
        else:
            zeros = frozenset()
        self._start_due(step, zeros)
        self.last_info = out
        return out

    def finish(self) -> None:
        """Wait for the exchanges in flight and apply them (at the end of training)."""
        for f in sorted(self._pending):
            self._finish(f)
