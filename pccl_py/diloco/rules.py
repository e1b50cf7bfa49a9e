"""The arithmetic and the schedules of the DiLoCo modes, without a client: the outer
optimiser's update, the divisor of an average some peers joined with nothing to give,
the split of a model into fragments and when each fragment is exchanged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pccl_py.errors import InvalidUsage


@dataclass(frozen=True)
class OuterSGD:
    """SGD on the pseudo-gradient, with (Nesterov) momentum when ``momentum`` > 0.

    ``apply`` updates ``outer`` and ``momentum`` in place with the averaged pseudo-gradient
    ``delta`` (outer minus local parameters). The same operations in the same order on
    every peer give bit-identical results.
    """

    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise InvalidUsage(f"outer_lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise InvalidUsage(f"outer_momentum must be in [0, 1), got {self.momentum}")

    @torch.no_grad()
    def apply(self, outer: torch.Tensor, momentum: torch.Tensor, delta: torch.Tensor) -> None:
        if self.momentum == 0:
            outer.sub_(delta, alpha=self.lr)
            return
        momentum.mul_(self.momentum).add_(delta)
        step = delta.add(momentum, alpha=self.momentum) if self.nesterov else momentum
        outer.sub_(step, alpha=self.lr)


def contributors(world_size: int, empty: int) -> int:
    """How many peers an average is over when ``empty`` of the ``world_size`` peers of a
    call joined just before it and gave zeros (they had trained nothing yet): their zeros
    would otherwise pull the average toward zero. 0: nobody gave anything."""
    return max(0, world_size - max(0, empty))


def split_fragments(numels: Sequence[int], count: int) -> list[list[int]]:
    """Parameters (by index, in order) split into ``count`` contiguous fragments of about
    equal size: a parameter is never cut, each fragment holds at least one."""
    if count < 1:
        raise InvalidUsage(f"fragments must be >= 1, got {count}")
    if count > len(numels):
        raise InvalidUsage(f"{count} fragments for {len(numels)} parameter tensors: at most one "
                           "fragment per tensor")
    total = sum(numels)
    out: list[list[int]] = [[] for _ in range(count)]
    done = 0
    frag = 0
    for i, n in enumerate(numels):
        left = len(numels) - i  # tensors not yet placed, this one included
        # move on once this fragment has its share, keeping one tensor per fragment still to fill
        if out[frag] and frag < count - 1 and (done >= total * (frag + 1) / count or left <= count - 1 - frag):
            frag += 1
        out[frag].append(i)
        done += n
    return out


@dataclass(frozen=True)
class StreamingSchedule:
    """When each fragment is exchanged in streaming DiLoCo.

    Fragment ``p`` starts an exchange at the inner steps ``s`` with ``s % every == offset(p)``
    (offsets spread evenly over ``every``), and the exchange is finished ``overlap`` inner
    steps later, the trainer having gone on meanwhile. At steps that are multiples of
    ``every`` no exchange is in flight once those due have finished: there the peers vote and
    sync, before fragment 0 starts. That needs ``overlap <= every // fragments``.
    """

    fragments: int
    every: int
    overlap: int = 1

    def __post_init__(self) -> None:
        if self.fragments < 1 or self.every < 1 or self.overlap < 0:
            raise InvalidUsage("streaming needs fragments >= 1, sync_every >= 1, overlap >= 0")
        if self.every < self.fragments:
            raise InvalidUsage(f"sync_every ({self.every}) must be at least the number of fragments "
                               f"({self.fragments}): each fragment starts at its own inner step")
        if self.overlap > self.every // self.fragments:
            raise InvalidUsage(f"overlap ({self.overlap}) must be at most sync_every // fragments "
                               f"({self.every // self.fragments}): one exchange in flight at a time")

    def offset(self, p: int) -> int:
        return p * self.every // self.fragments

    def starts(self, step: int) -> list[int]:
        """Fragments whose exchange starts at inner step ``step`` (after its sync, if any)."""
        return [p for p in range(self.fragments) if step % self.every == self.offset(p)]

    def finishes(self, step: int) -> list[int]:
        """Fragments whose exchange, started ``overlap`` steps ago, is finished at ``step``
        (with ``overlap`` 0 an exchange is finished where it starts: none here)."""
        if self.overlap == 0 or step < self.overlap:
            return []
        return self.starts(step - self.overlap)

    def syncs(self, step: int) -> bool:
        """Whether the peers vote and sync at ``step`` (between the finishes and the starts)."""
        return step % self.every == 0
