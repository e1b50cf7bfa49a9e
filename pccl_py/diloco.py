"""DiLoCo outer optimisation on top of :class:`~pccl_py.client.client.Client`.

Each peer runs ``inner_steps`` steps of its own optimiser, then the peers average their
pseudo-gradients (outer params minus local params) with one all-reduce and apply an
outer SGD step with Nesterov momentum. The outer params are the shared state: every peer
holds identical bits after every outer step.

``DiLoCo`` waits for each outer all-reduce; ``async_outer=True`` applies the previous
step's averaged pseudo-gradient while the current one is in flight (one-step delayed
DiLoCo), which hides the all-reduce behind the next inner steps.

To keep peers in step across churn, put the outer state in a shared state::

    state = client.shared_state(diloco.named_state())
    diloco.use_state(state)          # outer params and momentum now live in the state
    ...
    diloco.outer_step()
    state.revision += 1
    client.sync_shared_state(state)  # newcomers fetch it; peers in step move no bytes

If the outer all-reduce ends with :class:`~pccl_py.errors.Diverged` (the other peers
completed it, this peer lost their last confirmation), ``outer_step`` does not apply it:
the local params go back to the outer params, a warning is logged, and the returned info
has ``"diverged": True``. This peer's state then lacks that step; the next
``sync_shared_state`` brings it in step (the peers hold different hashes, and the elected
state is fetched), so call it after every outer step as above.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from pccl_py.client.client import Client
from pccl_py.errors import Diverged

log = logging.getLogger("pccl.diloco")


class DiLoCo:
    def __init__(
        self,
        client: Client,
        params: Sequence[torch.Tensor],
        *,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        quant: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.client = client
        self.params = [p for p in params]
        self.outer = [p.detach().clone() for p in self.params]
        self.momentum = [torch.zeros_like(p) for p in self.params]
        self.outer_lr = outer_lr
        self.outer_momentum = outer_momentum
        self.quant = quant
        self.timeout = timeout
        self.last_info: dict = {}
        self._deltas: list[torch.Tensor] | None = None

    def _delta_buffers(self) -> list[torch.Tensor]:
        """Pseudo-gradient buffers: views of one allocation in shared memory per dtype, so
        the all-reduce reads them where they are (no copy in)."""
        if self._deltas is None:
            by_dtype: dict[torch.dtype, list[int]] = {}
            for i, p in enumerate(self.params):
                by_dtype.setdefault(p.dtype, []).append(i)
            deltas: list[torch.Tensor | None] = [None] * len(self.params)
            for dtype, idx in by_dtype.items():
                name = str(dtype).removeprefix("torch.")
                total = sum(self.params[i].numel() for i in idx)
                buf = self.client.alloc(total, name, as_torch=True)
                off = 0
                for i in idx:
                    n = self.params[i].numel()
                    deltas[i] = buf[off : off + n].view(self.params[i].shape)
                    off += n
            self._deltas = deltas
        return self._deltas

    @torch.no_grad()
    def outer_step(self) -> dict:
        """Average pseudo-gradients across peers and take one outer step (retrying on churn).
        A diverged step is not applied (see the module's notes): the info says ``diverged``."""
        deltas = self._delta_buffers()
        for d, o, p in zip(deltas, self.outer, self.params):
            torch.sub(o, p.detach(), out=d)
        try:
            info = self.client.all_reduce(deltas, op="avg", quant=self.quant, timeout=self.timeout, retry=True)
        except Diverged as exc:
            log.warning("outer step not applied: %s", exc)
            self.load_outer()
            self.last_info = {"diverged": True, "error": str(exc)}
            return self.last_info
        for o, m, d in zip(self.outer, self.momentum, deltas):
            m.mul_(self.outer_momentum).add_(d)
            # Nesterov: step along the gradient plus the updated momentum
            o.sub_(self.outer_lr * (d + self.outer_momentum * m))
        self.load_outer()
        self.last_info = info
        return info

    @torch.no_grad()
    def load_outer(self) -> None:
        for p, o in zip(self.params, self.outer):
            p.copy_(o)

    def state_tensors(self) -> list[torch.Tensor]:
        """Everything a newcomer must receive to be in step: outer params and momentum."""
        return self.outer + self.momentum

    def named_state(self) -> dict[str, torch.Tensor]:
        """The same tensors by name (``outer.<i>``, ``momentum.<i>``), for ``Client.shared_state``."""
        named = {f"outer.{i}": t for i, t in enumerate(self.outer)}
        named.update({f"momentum.{i}": t for i, t in enumerate(self.momentum)})
        return named

    def use_state(self, state) -> None:
        """Keep the outer params and momentum in ``state`` (a ``SharedState`` made from
        :meth:`named_state`): its shm-backed tensors replace this object's own, so outer steps
        write straight into the shared state and a sync needs no copy."""
        outer = [state[f"outer.{i}"] for i in range(len(self.outer))]
        momentum = [state[f"momentum.{i}"] for i in range(len(self.momentum))]
        for mine, theirs in zip(self.outer + self.momentum, outer + momentum):
            if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
                raise ValueError(f"shared state tensor {tuple(theirs.shape)} {theirs.dtype} does not match "
                                 f"{tuple(mine.shape)} {mine.dtype}")
        self.outer, self.momentum = outer, momentum
