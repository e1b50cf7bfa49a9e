"""What every sans-I/O core of the coordinator returns: the messages to send and why."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


class Decision(NamedTuple):
    """``out``: ``(address, message)`` pairs to send, in order; ``reason``: one log line
    (empty when nothing worth logging happened).

    The address is what the core knows its receivers by: a connection for
    :class:`~pccl_py.coordinator.membership.Membership`, a peer id for the shared-state
    rounds (the membership core maps peer ids to connections).

    ``work``: see the field."""

    out: list[tuple[Any, dict[str, Any]]]
    reason: str
    # work too slow for the event loop (the ring solver above a dozen peers): the host runs
    # ``fn()`` on another thread and hands the result to ``then(now, result)``, whose
    # Decision it carries out like any other
    work: tuple[Callable[[], Any], Callable[[float, Any], Decision]] | None = None
