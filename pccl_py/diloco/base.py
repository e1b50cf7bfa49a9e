"""What every DiLoCo mode shares: the run's state in a shared state, the points where
the peers vote and sync, a newcomer's welcome, and the model loaded from the run's state.

The shared state holds ``diloco.step`` (int64, one element), ``diloco.outer.<name>`` (the
outer parameters) and ``diloco.momentum.<name>`` (the outer optimiser's momentum), one
per parameter of the model, named as ``model.named_parameters()`` names them (``p<i>``
for a list of tensors). A mode may add its own entries.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pccl_py.errors import Aborted, CoordinatorUnavailable, DeadlineExceeded, InvalidUsage, PeerLost
from pccl_py.retry import Backoff

from .rules import OuterSGD

log = logging.getLogger("pccl.diloco")

STEP = "diloco.step"
MAX_HANDOVER = 60 << 20  # bytes of inner optimiser state one all_gather carries (the daemon's blob limit is 64 MiB)
RETRYABLE = (PeerLost, Aborted, CoordinatorUnavailable)


def outer_name(name: str) -> str:
    return f"diloco.outer.{name}"


def momentum_name(name: str) -> str:
    return f"diloco.momentum.{name}"


def named_parameters(model: Any) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of what the outer optimiser updates: a module's trainable parameters
    by their names, or a sequence of tensors as ``p0``, ``p1``, ..."""
    if isinstance(model, torch.nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    elif isinstance(model, Sequence) and all(isinstance(p, torch.Tensor) for p in model):
        named = [(f"p{i}", p) for i, p in enumerate(model)]
    else:
        raise InvalidUsage(f"DiLoCo takes a torch.nn.Module or a list of tensors, got {type(model).__name__}")
    if not named:
        raise InvalidUsage("the model has no trainable parameters")
    for n, p in named:
        if not p.is_floating_point():
            raise InvalidUsage(f"parameter {n} is {p.dtype}: DiLoCo averages floating-point parameters")
    return named


class OuterLoop:
    """The part every mode shares (see the module docstring); a mode adds its exchange.

    ``join()`` once after ``client.connect()``: it registers the run's state, syncs it (a
    newcomer receives the run's; with ``restore`` a saved file is offered), welcomes
    newcomers and loads the outer parameters into the model. The mode's step method ends at
    :meth:`_vote_and_sync`, after which the model holds the run's parameters again.
    """

    def __init__(self, client: Any, model: Any, *, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 nesterov: bool = True, quant: str | None = None, timeout: float = 60.0,
                 inner_optimizer: torch.optim.Optimizer | None = None, algorithm: str = "auto") -> None:
        self.client = client
        self.algorithm = algorithm
        self._named = named_parameters(model)
        self.params = [p for _, p in self._named]
        self.outer_opt = OuterSGD(outer_lr, outer_momentum, nesterov)
        self.quant = quant
        self.timeout = float(timeout)
        self.inner_optimizer = inner_optimizer
        self.state: Any = None  # the SharedState, from join()
        self.outer: list[torch.Tensor] = []
        self.momentum: list[torch.Tensor] = []
        self.last_info: dict = {}
        self.newcomers = 0  # peers that joined at the last sync point (0 when nobody did)
        self.newcomer_ids: frozenset[str] = frozenset()
        self._peers: set[str] = set()
        self._deltas: Any = None  # a mode's exchange buffers, made at its first use

    # -- the run's state -----------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {STEP: torch.zeros(1, dtype=torch.int64)}
        for n, p in self._named:
            tensors[outer_name(n)] = p.detach().to("cpu", copy=True).contiguous()
        for n, p in self._named:
            tensors[momentum_name(n)] = torch.zeros(p.shape, dtype=p.dtype)
        return tensors

    @property
    def step(self) -> int:
        """Outer steps the run has taken (inner steps for streaming DiLoCo)."""
        self._joined()
        return int(self.state[STEP][0])

    def _joined(self) -> None:
        if self.state is None:
            raise InvalidUsage("call join() first (after client.connect())")

    def join(self, *, restore: str | None = None, timeout: float | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict:
        """Take part in the run: register the run's state, sync it, load it into the model.

        ``restore``: a file written by :meth:`save`; if it exists its state is offered (a run
        whose peers all stopped resumes from it: among peers that never synced, the highest
        revision wins). Returns the sync's info."""
        if self.state is not None:
            raise InvalidUsage("join() is called once")
        info = self.client.refresh()
        if not info.get("connected"):
            raise InvalidUsage("call client.connect() before join()")
        self.state = self.client.shared_state(self._state_tensors())
        if restore is not None:
            import os

            if os.path.exists(restore):
                self.state.load(restore)
                log.info("offering the state saved in %s (revision %d)", restore, self.state.revision)
        self.outer = [self.state[outer_name(n)] for n, _ in self._named]
        self.momentum = [self.state[momentum_name(n)] for n, _ in self._named]
        self._peers = set(info.get("peers", ()))
        res = self._sync(timeout, progress)
        self._welcome(self._peers, newcomer=True)
        self.load_model()
        return res

    def save(self, path: str) -> None:
        """Write the run's state to ``path`` (atomically, with a hash checked on load):
        ``join(restore=path)`` resumes from it."""
        self._joined()
        self.state.save(path)

    @torch.no_grad()
    def load_model(self) -> None:
        """Copy the outer parameters into the model's."""
        for p, o in zip(self.params, self.outer, strict=True):
            p.copy_(o)

    def _gave_zeros(self, ids: frozenset[str], started_world: int, info: dict) -> int:
        """How many of the peers ``ids`` that gave zeros to an exchange (newcomers) were in
        the call that succeeded: all of them, unless the world shrank meanwhile; then those
        still members (a newcomer that left is no zero to divide out)."""
        if not ids or int(info.get("world_size", started_world)) >= started_world:
            return len(ids)
        return len(ids & set(self.client.refresh().get("peers", ())))

    # -- vote and sync -------------------------------------------------------------------
    def _retry(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` again after a peer or the coordinator was lost, until ``timeout``."""
        delays = Backoff(deadline=self.timeout).delays()
        while True:
            try:
                return fn()
            except RETRYABLE as exc:
                pause = next(delays, None)
                if pause is None:
                    raise DeadlineExceeded(f"{what} kept failing for {self.timeout:.0f}s: {exc}") from exc
                log.info("%s failed (%s); again in %.2fs", what, exc, pause)
                time.sleep(pause)

    def _sync(self, timeout: float | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
        t = self.timeout if timeout is None else timeout
        return self._retry("sync_shared_state", lambda: self.client.sync_shared_state(
            self.state, timeout=t, progress=progress))

    def _vote_and_sync(self) -> dict:
        """Every peer at the same point: admit newcomers (who join here), advance the
        revision, sync (a peer whose state differs takes the run's), welcome newcomers."""
        topo = self._retry("update_topology", lambda: self.client.update_topology(timeout=self.timeout))
        self.state.revision += 1
        res = self._sync()
        self._welcome(set(topo.get("peers", ())), newcomer=False)
        res["world_size"] = topo.get("world_size")
        res["epoch"] = topo.get("epoch")
        return res

    def _welcome(self, peers: set[str], newcomer: bool) -> None:
        """At a sync point where peers joined: learn how many (every peer the same number),
        and hand them the inner optimiser's state of the lowest-ranked established peer.

        Whether anyone joined, every peer knows alike: a newcomer, and an established peer
        that sees ids it did not hold at the previous sync point (only update_topology
        admits peers)."""
        joined = newcomer or bool(peers - self._peers)
        self._peers = peers
        self.newcomers = 0
        self.newcomer_ids = frozenset()
        if not joined:
            return
        me = self.client.peer_id
        flags = self.client.all_gather((b"N" if newcomer else b"E") + me.encode(), timeout=self.timeout,
                                       retry=True)
        self.newcomer_ids = frozenset(f[1:].decode() for f in flags if f[:1] == b"N")
        self.newcomers = len(self.newcomer_ids)
        senders = [f[1:].decode() for f in flags if f[:1] == b"E"]
        if self.inner_optimizer is None or not senders or not self.newcomers:
            return
        blob = b""
        if senders[0] == me:
            buf = io.BytesIO()
            torch.save(self.inner_optimizer.state_dict(), buf)
            blob = buf.getvalue()
            if len(blob) > MAX_HANDOVER:
                log.warning("the inner optimiser's state (%d MiB) is more than one all_gather carries (%d MiB): "
                            "the newcomers' inner optimisers start afresh", len(blob) >> 20, MAX_HANDOVER >> 20)
                blob = b""
        blobs = self.client.all_gather(blob, timeout=self.timeout, retry=True)
        if not newcomer:
            return
        given = next((b for b in blobs if b), None)
        if given is None:
            log.warning("no established peer handed over the inner optimiser's state (it left meanwhile); "
                        "this peer's inner optimiser starts afresh")
            return
        self.inner_optimizer.load_state_dict(torch.load(io.BytesIO(given), map_location="cpu", weights_only=True))
        log.info("received the inner optimiser's state of peer %s (%d bytes)", senders[0], len(given))
