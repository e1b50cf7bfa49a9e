"""The coordinator's optimize round (``optimize_topology``), sans I/O.

When every accepted peer has voted ``optimize`` (see :mod:`pccl_py.coordinator.membership`),
no collective is in flight anywhere, and the links may be measured. One
:class:`OptimizeRound` then:

1. **Probes** the ordered pairs of each group that the :class:`BandwidthMatrix` lacks
   (``missing``: never measured, or older than its ``max_age``), in steps that are
   matchings (:func:`matchings`): in one step each peer sends to at most one peer and
   receives from at most one, so a probe measures a link, not a share of one. Each sender
   of a step gets a ``bw_probe`` and answers with a ``bw_report``; the next step starts
   when every sender of this one reported. A sender whose report does not come within
   ``probe_timeout + REPORT_SLACK`` counts as done (its pairs stay unmeasured).
2. **Solves** each group's ring with :func:`~pccl_py.coordinator.ring_order.propose`
   against the current ring. Up to ``inline_max`` peers per group that runs at once (a few
   ms); above, :meth:`OptimizeRound.solve_job` hands a pure function to the host, which runs
   it off the event loop and feeds the result back (:meth:`OptimizeRound.solved`), so
   heartbeats never wait for the solver.
3. **Ends** with an :class:`Outcome`: the rings to move (a new epoch) or none (the same
   epoch), the votes to answer, and why; or an error for every voter (the deadline).

A peer that dies or leaves during the round (:meth:`OptimizeRound.gone`) no longer votes,
its probes count as done (a probe towards it is not waited for), and the round goes on
with the others. The round's deadline is the earliest deadline of its voters: reached, it
ends with ``DeadlineExceeded`` for every voter and the rings as they were.

Like :class:`~pccl_py.coordinator.state_sync.SyncHost`, a round takes ``now`` in every
method and returns a :class:`~pccl_py.coordinator.decision.Decision` addressed by peer id.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pccl_py.coordinator.bandwidth import BandwidthMatrix
from pccl_py.coordinator.decision import Decision
from pccl_py.coordinator.ring_order import EXACT_MAX, propose

Msg = dict[str, Any]

OPTIMIZE_TOPOLOGY = "optimize_topology"  # the activity a daemon reports while in the call
REPORT_SLACK = 2.0  # a sender's report may come this long after its probe's own timeout
MIN_RING = 3  # smaller groups have one ring order: nothing to measure or solve


@dataclass(frozen=True)
class OptimizeConfig:
    """How an optimize round probes and decides."""

    probe_bytes: int = 8 << 20  # bytes per probe (one directed pair)
    probe_timeout: float = 5.0  # seconds a probe may take
    min_gain: float = 0.1  # a ring moves only for a bottleneck more than this much better
    inline_max: int = EXACT_MAX  # groups up to this size are solved inline
    budget_s: float = 0.5  # the heuristic's budget above EXACT_MAX peers


class Phase(enum.Enum):
    PROBING = "probing"
    SOLVING = "solving"
    DONE = "done"


@dataclass
class Outcome:
    """How a round ended. ``moves``: group -> its new ring (groups absent keep theirs);
    ``answers``: voter -> the request to answer; ``error``: (name, message) for every voter
    instead of a topology (None: they get the topology); ``reason``: for the log and the
    answer."""

    moves: dict[int, tuple[str, ...]] = field(default_factory=dict)
    answers: dict[str, int] = field(default_factory=dict)
    error: tuple[str, str] | None = None
    reason: str = ""


Proposals = dict[int, tuple[tuple[str, ...] | None, str]]


def matchings(pairs: Iterable[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The directed ``pairs`` split into steps in which every peer sends at most once and
    receives at most once, and no pair is probed both ways at once (the receipt of a -> b
    travels b -> a, on the same link, and would queue behind b's own probe). Pairs are taken
    by their offset in the sorted peer order (``(j - i) mod n``), so all pairs of n peers
    take n - 1 steps for odd n (one rotation each), n for even n."""
    pairs = sorted(set(pairs))
    ids = sorted({p for pair in pairs for p in pair})
    index = {p: i for i, p in enumerate(ids)}
    n = len(ids) or 1
    rest = sorted(pairs, key=lambda ab: ((index[ab[1]] - index[ab[0]]) % n, index[ab[0]]))
    steps = []
    while rest:
        senders: set[str] = set()
        receivers: set[str] = set()
        step: list[tuple[str, str]] = []
        chosen: set[tuple[str, str]] = set()
        later = []
        for a, b in rest:
            if a in senders or b in receivers or (b, a) in chosen:
                later.append((a, b))
            else:
                step.append((a, b))
                chosen.add((a, b))
                senders.add(a)
                receivers.add(b)
        steps.append(step)
        rest = later
    return steps


def solve_rings(snapshots: dict[int, tuple[dict, list[str]]], min_gain: float, budget_s: float) -> Proposals:
    """Per group: ``propose`` over its rates and current ring (pure: safe on another thread)."""
    return {g: propose(bw, ring, min_gain=min_gain, budget_s=budget_s) for g, (bw, ring) in snapshots.items()}


class OptimizeRound:
    """One ``optimize_topology`` round (see the module docstring).

    ``voters``: peer -> the request of its vote; ``deadline``: the earliest of their
    deadlines (inf: none); ``rings``: group -> the current ring (copied)."""

    def __init__(self, round_id: int, now: float, *, voters: dict[str, int], deadline: float,
                 rings: dict[int, list[str]], matrix: BandwidthMatrix, epoch: int,
                 config: OptimizeConfig | None = None) -> None:
        self.round_id = round_id
        self.cfg = config or OptimizeConfig()
        self.voters = dict(voters)
        self.deadline = deadline
        self.rings = {g: list(r) for g, r in rings.items()}
        self.matrix = matrix
        self.epoch = epoch
        self.started = now
        self.phase = Phase.PROBING
        self.outcome: Outcome | None = None
        self.dead: set[str] = set()
        pairs = [pair for ring in self.rings.values() if len(ring) >= MIN_RING
                 for pair in matrix.missing(ring, now)]
        self.planned = len(pairs)
        self.steps = matchings(pairs)
        self.step = -1
        self.waiting: dict[str, tuple[float, list[str]]] = {}  # sender -> (report due, targets)
        self.measured = 0

    # ------------------------------------------------------------------ inputs

    def start(self, now: float) -> Decision:
        out: list[tuple[str, Msg]] = []
        why = [f"optimize round {self.round_id}: {len(self.voters)} voters, {self.planned} pairs to probe "
               f"in {len(self.steps)} steps"]
        self._advance(now, out, why)
        return Decision(out, "; ".join(why))

    def report(self, now: float, peer_id: str, msg: Msg) -> Decision:
        """A ``bw_report`` of ``peer_id``."""
        sent = self.waiting.get(peer_id)
        if self.phase is not Phase.PROBING or msg["round"] != self.round_id or sent is None:
            return Decision([], f"optimize: bw_report of round {msg['round']} from {peer_id} ignored "
                                f"(round {self.round_id} is {self.phase.value})")
        del self.waiting[peer_id]
        why = []
        for dst, rate, seconds in msg["rows"]:
            if dst not in sent[1] or dst in self.dead:
                why.append(f"{peer_id} -> {dst} not asked for; ignored")
                continue
            self.matrix.record(peer_id, dst, rate, now)
            self.measured += 1
            why.append(f"{peer_id} -> {dst}: {rate / 1e6:.1f} MB/s ({seconds * 1e3:.0f} ms)")
        missed = [d for d in sent[1] if d not in {row[0] for row in msg["rows"]}]
        if missed:
            why.append(f"{peer_id}: no rate to {', '.join(missed)} (probe failed)")
        out: list[tuple[str, Msg]] = []
        self._advance(now, out, why)
        return Decision(out, "optimize: " + "; ".join(why))

    def gone(self, now: float, peer_id: str) -> Decision:
        """``peer_id`` is no longer a member (death, leave, removal)."""
        if self.phase is Phase.DONE:
            return Decision([], "")
        self.dead.add(peer_id)
        self.voters.pop(peer_id, None)
        for ring in self.rings.values():
            if peer_id in ring:
                ring.remove(peer_id)
        why = [f"optimize: {peer_id} is gone; its probes count as done"]
        self.waiting.pop(peer_id, None)
        for sender, (_, targets) in list(self.waiting.items()):
            if peer_id in targets and all(t in self.dead for t in targets):
                del self.waiting[sender]  # its probe fails (or measured a dying peer): not waited for
        out: list[tuple[str, Msg]] = []
        if self.phase is Phase.PROBING:
            self._advance(now, out, why)
        return Decision(out, "; ".join(why))

    def tick(self, now: float) -> Decision:
        if self.phase is Phase.DONE:
            return Decision([], "")
        if now >= self.deadline:
            self._end(Outcome(answers=dict(self.voters), error=("DeadlineExceeded", (
                f"optimize_topology timed out while {self.phase.value} (round {self.round_id}: "
                f"{self.measured} of {self.planned} pairs measured); the rings are unchanged"))))
            return Decision([], f"optimize round {self.round_id}: deadline reached while {self.phase.value}")
        if self.phase is not Phase.PROBING:
            return Decision([], "")
        late = [pid for pid, (due, _) in self.waiting.items() if now >= due]
        if not late:
            return Decision([], "")
        for pid in late:
            del self.waiting[pid]
        why = [f"optimize: no report from {', '.join(sorted(late))} in time; their probes count as done"]
        out: list[tuple[str, Msg]] = []
        self._advance(now, out, why)
        return Decision(out, "; ".join(why))

    def solve_job(self) -> Callable[[], Proposals] | None:
        """While ``SOLVING``: the solver's work as a pure function (to run off the loop);
        hand its result to :meth:`solved`."""
        if self.phase is not Phase.SOLVING:
            return None
        snaps = {g: (self.matrix.snapshot(r), list(r)) for g, r in self.rings.items() if len(r) >= MIN_RING}
        gain, budget = self.cfg.min_gain, self.cfg.budget_s
        return lambda: solve_rings(snaps, gain, budget)

    def solved(self, now: float, proposals: Proposals) -> Decision:
        """The solver's proposals: the round ends. Peers that died meanwhile are dropped
        from a proposed ring (the survivors keep its order)."""
        if self.phase is not Phase.SOLVING:
            return Decision([], f"optimize round {self.round_id}: late solver result ignored")
        moves: dict[int, tuple[str, ...]] = {}
        why = []
        for g, ring in sorted(self.rings.items()):
            if len(ring) < MIN_RING:
                why.append(f"group {g}: ring of {len(ring)} peers: one order only")
                continue
            new, reason = proposals.get(g, (None, "not solved"))
            if new is not None:
                new = tuple(p for p in new if p not in self.dead)
                if set(new) == set(ring) and list(new) != ring:
                    moves[g] = new
            why.append(f"group {g}: {'new ring ' + ' '.join(p[:8] for p in new) + '; ' if g in moves else ''}"
                       f"{reason}")
        text = "; ".join(why) or "no group of 3 or more peers: nothing to order"
        self._end(Outcome(moves=moves, answers=dict(self.voters), reason=f"optimize_topology: {text}"))
        return Decision([], f"optimize round {self.round_id} done: {text}")

    @property
    def inline(self) -> bool:
        """Whether the solver runs inline (every group small enough)."""
        return max((len(r) for r in self.rings.values()), default=0) <= self.cfg.inline_max

    # ------------------------------------------------------------------ internals

    def _advance(self, now: float, out: list, why: list) -> None:
        """The next step once nobody of this one is awaited; SOLVING after the last."""
        while not self.waiting and self.phase is Phase.PROBING:
            self.step += 1
            if self.step >= len(self.steps):
                self.phase = Phase.SOLVING
                why.append(f"probes done ({self.measured} of {self.planned} pairs measured in "
                           f"{now - self.started:.2f} s)")
                return
            for a, b in self.steps[self.step]:
                if a in self.dead or b in self.dead:
                    continue
                self.waiting[a] = (now + self.cfg.probe_timeout + REPORT_SLACK, [b])
                out.append((a, {"type": "bw_probe", "round": self.round_id, "epoch": self.epoch, "targets": [b],
                                "bytes": self.cfg.probe_bytes, "timeout": self.cfg.probe_timeout}))

    def _end(self, outcome: Outcome) -> None:
        self.phase = Phase.DONE
        self.waiting.clear()
        self.outcome = outcome


def bandwidth_rows(matrix: BandwidthMatrix, now: float, limit: int) -> list[list]:
    """The matrix for a status reply: ``[src, dst, bytes_per_s, samples, age_s]`` rows
    (at most ``limit``)."""
    rows = []
    for src, row in matrix.as_dict().items():
        for dst, link in row.items():
            if len(rows) >= limit:
                return rows
            age = now - link["at"]
            rows.append([src, dst, float(link["bytes_per_s"]), int(link["samples"]),
                         max(0.0, age) if math.isfinite(age) else 0.0])
    return rows
