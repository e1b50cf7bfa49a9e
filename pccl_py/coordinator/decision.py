"""What every sans-I/O core of the coordinator returns: the messages to send and why."""

from __future__ import annotations

from typing import Any, NamedTuple


class Decision(NamedTuple):
    """``out``: ``(address, message)`` pairs to send, in order; ``reason``: one log line
    (empty when nothing worth logging happened).

    The address is what the core knows its receivers by: a connection for
    :class:`~pccl_py.coordinator.membership.Membership`, a peer id for the shared-state
    rounds (the membership core maps peer ids to connections)."""

    out: list[tuple[Any, dict[str, Any]]]
    reason: str
