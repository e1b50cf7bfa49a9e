"""What became of the connections the coordinator accepted, sans I/O: :class:`Handshakes`.

Every control connection must complete a CURVE handshake with the run's keys before a byte
of it reaches the membership core; those that do not are *rejected*. The coordinator's
socket monitor reports, in order, per connection: ``accepted`` (with its file descriptor),
then a handshake that ``succeeded`` or ``failed`` (neither carries the descriptor), then
``disconnected`` (with the descriptor). libzmq reports a failure immediately before the
disconnection of the same connection, so :meth:`Handshakes.disconnected` pairs them. A
connection that closes without any handshake event (bytes that are not ZMTP at all) and
never delivered a message is rejected too, unless a handshake that succeeded is still
unaccounted for (a client that completed it and left without a word).

Rejections are counted by reason (``total``) and summarised for the log at most once per
``every`` seconds, by source address (:meth:`Handshakes.summary`), never one line each: a
process dialing with the wrong secret reconnects every few hundred milliseconds. A
connection closed by its client in the middle of the handshake (``incomplete``: a port
probe, a health check, a client that gave up, or one without CURVE that saw the mismatch
before the coordinator did) is counted but not logged: it offered no credentials to refuse.

The source address is read from the connection when its acceptance is handled; one that is
gone by then (bytes that zmq refused at once) is "an unknown address".
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

# rejection reasons (the label of pccl_rejected_connections_total)
REASONS = ("wrong_secret", "denied", "no_curve", "malformed", "incomplete")
QUIET = frozenset({"incomplete"})  # counted, not logged
SHOWN_SOURCES = 5  # addresses named in one summary line


@dataclass
class _Conn:
    ip: str
    talked: bool = False  # a message arrived on it: its handshake succeeded
    early: bool = False  # its first message was seen before its acceptance (monitor lag)


class Handshakes:
    """Rejected control connections: counted, and summarised per source address."""

    def __init__(self, every: float = 10.0, *, max_conns: int = 65536, max_sources: int = 1024) -> None:
        self.every = every
        self.max_conns = max_conns
        self.max_sources = max_sources
        self.total: dict[str, int] = dict.fromkeys(REASONS, 0)  # since the start
        self._conns: OrderedDict[int, _Conn] = OrderedDict()  # fd -> the connection on it
        self._failing: str | None = None  # a failure whose disconnection comes next
        self._unclaimed = 0  # handshakes that succeeded, their connection not yet seen talking
        self._window: dict[str, dict[str, int]] = {}  # source -> reason -> count, since the last summary
        self._first: float | None = None  # the first rejection of this window
        self._last_summary: float | None = None

    @property
    def rejected(self) -> int:
        return sum(self.total.values())

    # ------------------------------------------------------------------ monitor events

    def accepted(self, fd: int, ip: str) -> None:
        rec = self._conns.get(fd)
        if rec is not None and rec.early:  # its messages overtook this event
            rec.ip, rec.early = ip, False
            return
        self._conns[fd] = _Conn(ip)
        self._conns.move_to_end(fd)
        while len(self._conns) > self.max_conns:
            self._conns.popitem(last=False)

    def succeeded(self) -> None:
        self._unclaimed += 1

    def failed(self, reason: str) -> None:
        self._failing = reason

    def talked(self, fd: int) -> None:
        """A message arrived on ``fd``."""
        rec = self._conns.get(fd)
        if rec is None:
            rec = self._conns[fd] = _Conn("", talked=True, early=True)
            self._unclaimed -= 1
        elif not rec.talked:
            rec.talked = True
            self._unclaimed -= 1

    def disconnected(self, now: float, fd: int) -> str | None:
        """The connection on ``fd`` closed: why it was rejected, or None if it was not."""
        rec = self._conns.pop(fd, None)
        reason, self._failing = self._failing, None
        if reason is None:
            if rec is None or rec.talked:
                return None
            if self._unclaimed > 0:  # it completed a handshake and left without a word
                self._unclaimed -= 1
                return None
            reason = "malformed"  # not even ZMTP
        self._count(now, (rec.ip if rec is not None else "") or "an unknown address", reason)
        return reason

    # ------------------------------------------------------------------ the log

    def summary(self, now: float) -> str | None:
        """The log line for the rejections since the last one, at most once per ``every``
        seconds (the first one at once); None when there is nothing (yet) to say."""
        if not self._window or (self._last_summary is not None and now - self._last_summary < self.every):
            return None
        since = self._last_summary if self._last_summary is not None else self._first
        span = now - since
        when = f"in the last {span:.0f} s" if span >= 1.0 else "within a second"
        rows = sorted(self._window.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
        total = sum(sum(r.values()) for _, r in rows)
        self._window, self._first, self._last_summary = {}, None, now

        def reasons(r: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(r.items(), key=lambda kv: -kv[1]))

        def conns(n: int) -> str:
            return f"{n} connection{'s' if n != 1 else ''}"

        if len(rows) == 1:
            (ip, r), = rows
            return (f"{conns(total)} from {ip} failed authentication {when} ({reasons(r)}): "
                    "a process without this run's secret is dialing the coordinator")
        shown = [f"{sum(r.values())} from {ip} ({reasons(r)})" for ip, r in rows[:SHOWN_SOURCES]]
        rest = rows[SHOWN_SOURCES:]
        if rest:
            shown.append(f"{sum(sum(r.values()) for _, r in rest)} from {len(rest)} other addresses")
        return (f"{conns(total)} failed authentication {when}: {', '.join(shown)}; "
                "processes without this run's secret are dialing the coordinator")

    # ------------------------------------------------------------------ internals

    def _count(self, now: float, ip: str, reason: str) -> None:
        self.total[reason] = self.total.get(reason, 0) + 1
        if reason in QUIET:
            return
        if self._first is None:
            self._first = now
        if ip not in self._window and len(self._window) >= self.max_sources:
            ip = "other addresses"
        by_reason = self._window.setdefault(ip, {})
        by_reason[reason] = by_reason.get(reason, 0) + 1
