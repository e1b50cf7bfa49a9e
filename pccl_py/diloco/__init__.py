"""The DiLoCo family on top of :class:`~pccl_py.client.client.Client`.

- :class:`DiLoCo`: average the pseudo-gradients every outer step (optionally quantized).
- :class:`DelayedDiLoCo`: the same, the exchange overlapping the next inner steps.
- :class:`StreamingDiLoCo`: fragments exchanged on staggered schedules, merged with a mix.
- :class:`SparseLoCo`: top-k per chunk, 2 or 4 bits, error feedback, ``all_gather``.

Each keeps the run's outer state in a shared state (see :mod:`pccl_py.diloco.base`), votes
and syncs at its outer steps, and leaves the run's parameters in the model: a newcomer's
``join()`` hands it the run's state with no copy by the user. docs/diloco.md has a
complete training loop for each.
"""

from .base import OuterLoop
from .delayed import DelayedDiLoCo
from .rules import OuterSGD, StreamingSchedule
from .sparse_loco import SparseLoCo
from .streaming import StreamingDiLoCo
from .sync import DiLoCo

__all__ = ["DiLoCo", "DelayedDiLoCo", "OuterLoop", "OuterSGD", "SparseLoCo", "StreamingDiLoCo",
           "StreamingSchedule"]
