"""What connections that never authenticate may cost a listener, sans-I/O: :class:`Gate`.

A listener whose peers must prove the run secret (the state server, later the data plane)
owes nothing to a connection that has not: it holds at most ``max_pending`` such
connections per remote address, closes the ones that do not finish their handshake in
time (the listener's own timer), and counts every connection it refused or that failed,
by reason. The counts reach the log as one summary per address at most once per
``interval`` seconds, never one line per connection, and a metrics counter (``count``)
one by one.

Use, with ``now`` any monotonic clock (e.g. ``loop.time()``)::

    gate = Gate("state server", max_pending=8, evict_after=1.0, interval=10.0, count=None)

    # a connection `conn` (any hashable handle) from `addr` was accepted
    admitted, evict = gate.admit(addr, conn, now)
    if not admitted: close conn at once             # counted as "too_many"
    if evict is not None: close evict at once       # an older pending one made room; counted
    ...
    gate.passed(conn)                               # its handshake completed: no longer pending
    gate.failed(conn, "timeout", now)               # it ended before that (a REASONS key);
                                                    # a no-op for one already settled or evicted
    gate.dropped(conn)                              # the listener closed it itself (shutting
                                                    # down): not counted
    gate.refuse(addr, "full", now)                  # counted without ever being admitted

    for line in gate.summary(now): log.warning(line)   # lines due now (maybe none;
                                                    # force=True: all that wait, at the end)
    gate.wake_at                                    # when summary() will have lines; None: no
                                                    # counts wait (arm a timer for it)

Admission at the limit: a new connection takes the place of the address's oldest pending
one if that one has waited more than ``evict_after`` seconds (an idle connection keeps no
place for long, so a flood of idle connections cannot lock out a peer that arrives after
it); otherwise the new one is refused (a burst of real handshakes is not cut short; the
peer that was refused retries, see ``fetch``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable

# reason -> the words in a summary line (the keys are metric labels)
REASONS = {
    "timeout": "handshake timeout",
    "bad_proof": "bad proof",
    "malformed": "malformed handshake",
    "closed": "closed during the handshake",
    "too_many": "too many pending",
    "full": "server full",
}

MAX_LINES = 5  # addresses named in one summary; the rest are added up in one more line


class Gate:
    """Pending (not yet authenticated) connections per address, and a tally of the refused and
    failed ones with a rate-limited summary. See the module docstring for the protocol.

    ``name`` starts every summary line ("state server"); ``count(reason)`` is called once
    per counted connection (e.g. a Prometheus counter's ``labels(...).inc``).
    """

    def __init__(self, name: str, *, max_pending: int = 8, evict_after: float = 1.0, interval: float = 10.0,
                 count: Callable[[str], None] | None = None) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.name = name
        self.max_pending = max_pending
        self.evict_after = evict_after
        self.interval = interval
        self.count = count
        self.total: collections.Counter[str] = collections.Counter()  # every reason, since the start
        self._pending: dict[str, dict[Hashable, float]] = {}  # addr -> {conn: admitted at}, oldest first
        self._addr_of: dict[Hashable, str] = {}
        self._tally: dict[str, collections.Counter[str]] = {}  # addr -> reason -> count, not yet logged
        self._since: float | None = None  # the first event of the tally
        self._last: float | None = None  # when the last summary went out

    # -- admission -------------------------------------------------------------------
    def pending(self, addr: str) -> int:
        """Connections from ``addr`` admitted and not yet settled."""
        return len(self._pending.get(addr, ()))

    def admit(self, addr: str, conn: Hashable, now: float) -> tuple[bool, Hashable | None]:
        """``(True, None)``: ``conn`` may start its handshake. ``(True, old)``: it may, and
        ``old`` must be closed now. ``(False, None)``: close ``conn`` at once."""
        if conn in self._addr_of:
            raise ValueError("a connection is admitted once")
        waiting = self._pending.setdefault(addr, {})
        evict = None
        if len(waiting) >= self.max_pending:
            oldest, since = next(iter(waiting.items()))
            if now - since <= self.evict_after:
                self.refuse(addr, "too_many", now)
                return False, None
            self._settle(oldest)
            self.refuse(addr, "too_many", now)
            evict = oldest
            waiting = self._pending.setdefault(addr, {})
        waiting[conn] = now
        self._addr_of[conn] = addr
        return True, evict

    def passed(self, conn: Hashable) -> None:
        """``conn`` completed its handshake."""
        self._settle(conn)

    def dropped(self, conn: Hashable) -> None:
        """The listener closed ``conn`` itself (it stops serving): it no longer counts, and is
        not counted as refused."""
        self._settle(conn)

    def failed(self, conn: Hashable, reason: str, now: float) -> None:
        """``conn`` ended before completing its handshake, for ``reason``."""
        addr = self._settle(conn)
        if addr is not None:
            self.refuse(addr, reason, now)

    def _settle(self, conn: Hashable) -> str | None:
        addr = self._addr_of.pop(conn, None)
        if addr is not None:
            waiting = self._pending[addr]
            del waiting[conn]
            if not waiting:
                del self._pending[addr]
        return addr

    # -- the tally -------------------------------------------------------------------
    def refuse(self, addr: str, reason: str, now: float) -> None:
        """Count one connection from ``addr`` refused or failed for ``reason``."""
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        self.total[reason] += 1
        self._tally.setdefault(addr, collections.Counter())[reason] += 1
        if self._since is None:
            self._since = now
        if self.count is not None:
            self.count(reason)

    @property
    def wake_at(self) -> float | None:
        """When :meth:`summary` has lines to give; None while nothing waits to be told."""
        if not self._tally:
            return None
        return self._since if self._last is None else max(self._since, self._last + self.interval)

    def summary(self, now: float, *, force: bool = False) -> list[str]:
        """The lines to log now: none before ``interval`` seconds have passed since the last
        summary (the first comes at once; ``force``: whatever waits, e.g. when the listener
        closes), else one per address (the busiest first, at most ``MAX_LINES``) with what
        was counted since, and the tally starts again."""
        due = self.wake_at
        if due is None or (now < due and not force):
            return []
        span = max(1, round(now - (self._since if self._last is None else self._last)))
        rows = sorted(self._tally.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
        lines = [f"{self.name}: {_conns(sum(c.values()))} from {addr} refused in the last {span} s ({_why(c)})"
                 for addr, c in rows[:MAX_LINES]]
        if len(rows) > MAX_LINES:
            rest: collections.Counter[str] = collections.Counter()
            for _, c in rows[MAX_LINES:]:
                rest.update(c)
            lines.append(f"{self.name}: {_conns(sum(rest.values()))} from {len(rows) - MAX_LINES} other addresses "
                         f"refused in the last {span} s ({_why(rest)})")
        self._tally = {}
        self._since = None
        self._last = now
        return lines


def _conns(n: int) -> str:
    return f"{n} connection" + ("" if n == 1 else "s")


def _why(c: collections.Counter[str]) -> str:
    return ", ".join(f"{n} {REASONS[r]}" for r, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
