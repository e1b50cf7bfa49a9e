"""What a churn run saw, and what it means: fed with the peers' events, the faults and
the time; returns the report's numbers. Sans-I/O (no clock, no socket, no process), so
the recovery rules and the statistics are tested on made-up events.

Times are seconds on one clock shared by every process of the run (CLOCK_MONOTONIC).

Recovery of a fault, per kind:

* kill, crash, leave, freeze, link cut of a member of the newest epoch (the epoch of the
  newest step any peer completed): the first step completed in a newer epoch by another
  peer ("new epoch"); for a freeze or a cut, also the first step completed in that same
  epoch after the fault ended, when the peer was not removed meanwhile ("same epoch").
  A fault on a peer that was not a member (still joining, already removed while frozen)
  changes no membership, so it is not timed.
* coordinator restart or stop: the first step completed after the coordinator returned,
  timed from its return (the outage itself is the harness's choice; the row keeps it).
* start: the first step of the new peer (its join time).
A fault not resolved by the end of the run is "unresolved".
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from churn import schedule as S

NEW_EPOCH, SAME_EPOCH, JOINED, BACK, NOT_TIMED, UNRESOLVED, SKIPPED = (
    "new epoch", "same epoch", "joined", "after return", "not timed", "unresolved", "skipped")


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(1, math.ceil(q / 100.0 * len(s)))
    return s[k - 1]


@dataclass
class FaultRecord:
    fault: S.Fault
    t: float  # when it was applied (the run's clock)
    base_epoch: int = -1
    end: float | None = None  # when it ended (SIGCONT, link up, coordinator back)
    outcome: str = UNRESOLVED
    recovery: float | None = None
    note: str = ""

    def row(self, t0: float) -> dict:
        return {"t": round(self.t - t0, 3), "kind": self.fault.kind, "target": self.fault.target,
                "duration": self.fault.duration, "base_epoch": self.base_epoch, "outcome": self.outcome,
                "recovery_s": None if self.recovery is None else round(self.recovery, 3), "note": self.note,
                "ended_s": None if self.end is None else round(self.end - t0, 3)}


@dataclass
class Tracker:
    t0: float  # the run's start
    newest_epoch: int = -1
    peer_epoch: dict[int, int] = field(default_factory=dict)  # epoch of each peer's last step
    faults: list[FaultRecord] = field(default_factory=list)
    steps: int = 0
    step_times: list[tuple[float, int, int]] = field(default_factory=list)  # (t, peer, world)
    checks: dict[str, int] = field(default_factory=dict)  # check -> steps it was made in
    wrong: dict[str, int] = field(default_factory=dict)  # check -> wrong results
    parity_collective: int = 0
    state_reports: int = 0
    state_seen: dict[int, tuple[str, int]] = field(default_factory=dict)  # revision -> (digest, first peer)
    parity_state: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: dict[str, list[str]] = field(default_factory=dict)
    hangs: list[dict] = field(default_factory=list)
    late_while_frozen: int = 0
    crashes: list[dict] = field(default_factory=list)
    stalls: list[float] = field(default_factory=list)
    frozen: dict[int, list[list[float]]] = field(default_factory=dict)  # peer -> [[from, to]]
    starts: int = 0

    # -- faults ----------------------------------------------------------------------------
    def fault(self, now: float, fault: S.Fault) -> FaultRecord:
        """``fault`` was applied at ``now``."""
        rec = FaultRecord(fault, now, self.newest_epoch)
        if fault.kind == S.START:
            self.starts += 1
        elif fault.kind in S.PEER_FAULTS:
            member = fault.target in self.peer_epoch and self.peer_epoch[fault.target] == self.newest_epoch
            if not member:
                rec.outcome = NOT_TIMED
                rec.note = "not a member of the newest epoch"
            if fault.kind == S.FREEZE:
                self.frozen.setdefault(fault.target, []).append([now, math.inf])
        self.faults.append(rec)
        return rec

    def skipped(self, now: float, fault: S.Fault, why: str) -> FaultRecord:
        rec = FaultRecord(fault, now, self.newest_epoch, outcome=SKIPPED, note=why)
        self.faults.append(rec)
        return rec

    def ended(self, now: float, rec: FaultRecord) -> None:
        """The fault of ``rec`` is over: the peer thawed, its link is up, the coordinator is back."""
        rec.end = now
        if rec.fault.kind == S.FREEZE:
            for span in self.frozen.get(rec.fault.target, []):
                if span[1] == math.inf:
                    span[1] = now

    # -- the peers' events -----------------------------------------------------------------
    def step(self, now: float, peer: int, epoch: int, world: int, checks: dict[str, bool], parity: bool) -> list[FaultRecord]:
        """A step completed; returns the faults it resolved."""
        self.steps += 1
        self.step_times.append((now, peer, world))
        for name, ok in checks.items():
            self.checks[name] = self.checks.get(name, 0) + 1
            if not ok:
                self.wrong[name] = self.wrong.get(name, 0) + 1
        self.parity_collective += not parity
        resolved = []
        for rec in self.faults:
            if rec.outcome != UNRESOLVED:
                continue
            kind, target = rec.fault.kind, rec.fault.target
            if kind == S.START:
                if peer == target:
                    rec.outcome, rec.recovery = JOINED, now - rec.t
            elif kind in S.COORDINATOR:
                if rec.end is not None and now > rec.end:
                    rec.outcome, rec.recovery = BACK, now - rec.end
            elif peer != target and epoch > rec.base_epoch:
                rec.outcome, rec.recovery = NEW_EPOCH, now - rec.t
            elif (kind in (S.FREEZE, S.LINK_CUT) and rec.end is not None and now > rec.end
                  and epoch == rec.base_epoch):
                rec.outcome, rec.recovery = SAME_EPOCH, now - rec.t
            if rec.outcome != UNRESOLVED:
                resolved.append(rec)
        self.peer_epoch[peer] = epoch
        self.newest_epoch = max(self.newest_epoch, epoch)
        return resolved

    def state(self, now: float, peer: int, revision: int, digest: str, correct: bool) -> str | None:
        """A peer synced its shared state to ``revision``; returns a parity violation, if any."""
        self.state_reports += 1
        self.checks["state"] = self.checks.get("state", 0) + 1
        if not correct:
            self.wrong["state"] = self.wrong.get("state", 0) + 1
        seen = self.state_seen.setdefault(revision, (digest, peer))
        if seen[0] != digest:
            why = (f"revision {revision}: peer {peer} holds {digest}, peer {seen[1]} held {seen[0]} "
                   f"({now - self.t0:.1f} s)")
            self.parity_state.append(why)
            return why
        return None

    def error(self, now: float, peer: int, kind: str, message: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        samples = self.error_samples.setdefault(kind, [])
        if len(samples) < 3 and message[:60] not in [m[:60] for m in samples]:
            samples.append(message)

    def hang(self, peer: int, call: str, began: float, until: float, limit: float, outcome: str) -> bool:
        """A call of ``peer`` ran from ``began`` to ``until`` (still running: the time it was
        seen), past its ``limit``; True when it counts as a hang (the peer was not frozen
        meanwhile, which stops its clock's meaning)."""
        if any(a < until and b > began for a, b in self.frozen.get(peer, [])):
            self.late_while_frozen += 1
            return False
        self.hangs.append({"peer": peer, "call": call, "t": round(began - self.t0, 3),
                           "seconds": round(until - began, 3), "limit_s": limit, "outcome": outcome})
        return True

    def exited(self, now: float, peer: int, code: int, expected: bool) -> bool:
        """A peer's trainer exited with ``code``; ``expected``: the harness killed it or asked
        it to leave. True when it counts as a crash."""
        if expected and code in (0, -9):
            return False
        if code == 0 and not expected:
            return False  # its own deadline: not a crash
        self.crashes.append({"peer": peer, "code": code, "t": round(now - self.t0, 3),
                             "expected": expected})
        return True

    def stall(self, now: float) -> None:
        self.stalls.append(round(now - self.t0, 3))

    # -- the end ---------------------------------------------------------------------------
    def kinds_table(self) -> dict[str, dict]:
        table: dict[str, dict] = {}
        for rec in self.faults:
            row = table.setdefault(rec.fault.kind, {"applied": 0, "skipped": 0, NEW_EPOCH: 0, SAME_EPOCH: 0,
                                                    JOINED: 0, BACK: 0, NOT_TIMED: 0, UNRESOLVED: 0,
                                                    "times": []})
            if rec.outcome == SKIPPED:
                row["skipped"] += 1
                continue
            row["applied"] += 1
            row[rec.outcome] += 1
            if rec.recovery is not None:
                row["times"].append(rec.recovery)
        for row in table.values():
            times = row.pop("times")
            row["timed"] = len(times)
            row["median_s"] = round(statistics.median(times), 3) if times else None
            row["p95_s"] = round(percentile(times, 95), 3) if times else None
            row["max_s"] = round(max(times), 3) if times else None
        return {k: table[k] for k in S.KINDS if k in table}

    def series(self, end: float, width: float = 1.0) -> dict[str, list]:
        """Per ``width``-second bin from the start: steps per second and the largest world
        size a step reported (None where no step completed)."""
        n = max(1, math.ceil((end - self.t0) / width))
        rate = [0.0] * n
        world: list[int | None] = [None] * n
        for t, _peer, w in self.step_times:
            i = min(n - 1, max(0, int((t - self.t0) / width)))
            rate[i] += 1.0 / width
            world[i] = w if world[i] is None else max(world[i], w)
        return {"t": [round(i * width, 3) for i in range(n)], "steps_per_s": rate, "world": world}

    def failures(self) -> list[str]:
        """Why the run failed (empty: it passed)."""
        out = []
        if self.parity_collective:
            out.append(f"{self.parity_collective} collective parity violations")
        if self.parity_state:
            out.append(f"{len(self.parity_state)} shared-state parity violations")
        if sum(self.wrong.values()):
            out.append(f"{sum(self.wrong.values())} wrong results")
        if self.hangs:
            out.append(f"{len(self.hangs)} hangs")
        if self.crashes:
            out.append(f"{len(self.crashes)} crashes")
        if self.stalls:
            out.append(f"stalled (no step for the stall limit) at {self.stalls[0]:.0f} s")
        if not self.steps:
            out.append("no step completed")
        return out

    def summary(self, end: float) -> dict:
        seconds = max(1e-9, end - self.t0)
        return {
            "seconds": round(seconds, 3),
            "steps": self.steps,
            "steps_per_s": round(self.steps / seconds, 3),
            "peer_starts": self.starts,
            "max_world": max((w for _, _, w in self.step_times), default=0),
            "faults": self.kinds_table(),
            "fault_log": [r.row(self.t0) for r in self.faults],
            "errors": dict(sorted(self.errors.items(), key=lambda kv: -kv[1])),
            "error_samples": self.error_samples,
            "checks": self.checks,
            "wrong": self.wrong,
            "parity_violations": {"collective": self.parity_collective, "shared_state": len(self.parity_state),
                                  "shared_state_detail": self.parity_state[:20]},
            "state_reports": self.state_reports,
            "state_revisions": len(self.state_seen),
            "hangs": self.hangs,
            "late_calls_of_frozen_peers": self.late_while_frozen,
            "crashes": self.crashes,
            "stalls": self.stalls,
            "failures": self.failures(),
        }
