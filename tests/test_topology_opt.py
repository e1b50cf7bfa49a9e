"""optimize_topology on the coordinator, sans I/O: the round alone and inside Membership."""

from __future__ import annotations

import itertools

import pytest

from pccl_py.coordinator.bandwidth import BandwidthMatrix
from pccl_py.coordinator.membership import MembershipConfig
from pccl_py.coordinator.topology_opt import (
    REPORT_SLACK,
    OptimizeConfig,
    OptimizeRound,
    Phase,
    matchings,
)
from tests.test_membership import Sim, grow

pytestmark = pytest.mark.timeout(60)

OPT = OptimizeConfig(probe_bytes=1000, probe_timeout=1.0)
CFG = MembershipConfig(recovery_grace=0.0, optimize=OPT)

# a ring a -> c -> b -> d is fast; every other link is slow (the admission ring a b c d is slow)
FAST = {("a", "c"), ("c", "b"), ("b", "d"), ("d", "a")}


def rate(src: str, dst: str) -> float:
    return 100e6 if (src, dst) in FAST else 1e6


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_matchings_cover_every_pair_once_each_peer_once_per_step(n):
    ids = [f"p{i}" for i in range(n)]
    pairs = list(itertools.permutations(ids, 2))
    steps = matchings(pairs)
    assert sorted(p for s in steps for p in s) == sorted(pairs)
    assert len(steps) == (n - 1 if n % 2 else n)  # one rotation per step (both ways of a pair apart)
    for step in steps:
        assert len({a for a, _ in step}) == len(step) == len({b for _, b in step})
        assert not any((b, a) in step for a, b in step)


def test_matchings_of_a_partial_set():
    steps = matchings([("a", "b"), ("a", "c"), ("c", "b")])
    assert sorted(p for s in steps for p in s) == [("a", "b"), ("a", "c"), ("c", "b")]
    for step in steps:
        assert len({a for a, _ in step}) == len(step) == len({b for _, b in step})


def opt_vote(sim: Sim, pid: str, req: int, timeout: float = 0.0) -> list[dict]:
    return sim.send(pid, "optimize", req=req, timeout=timeout, below=0, open=[])


def answer_probes(sim: Sim, rates=rate, skip: tuple[str, ...] = ()) -> int:
    """Every peer answers the bw_probes in its inbox, until none are left; how many."""
    done = 0
    seen: dict[str, int] = sim.__dict__.setdefault("probes_seen", {})  # (across calls)
    while True:
        todo = []
        for pid in list(sim.core.peers):
            box = sim.inbox.get(sim.conn_of.get(pid, f"conn-{pid}"), [])
            for msg in box[seen.get(pid, 0):]:
                if msg["type"] == "bw_probe":
                    todo.append((pid, msg))
            seen[pid] = len(box)
        if not todo:
            return done
        for pid, msg in todo:
            if pid in skip or pid not in sim.core.peers:
                continue
            rows = [[t, rates(pid, t), 0.01] for t in msg["targets"]]
            sim.send(pid, "bw_report", round=msg["round"], epoch=msg["epoch"], rows=rows)
            done += 1


def probes_in(sim: Sim, pid: str) -> list[dict]:
    return [m for m in sim.inbox.get(f"conn-{pid}", []) if m["type"] == "bw_probe"]


def test_votes_probes_reports_new_ring_and_epoch():
    sim = Sim(CFG)
    grow(sim, "a", "b", "c", "d")
    assert sim.core.rings[0] == ["a", "b", "c", "d"]
    epoch = sim.core.epoch
    for i, pid in enumerate("abc"):
        assert opt_vote(sim, pid, 50 + i) == []
    assert sim.core.opt is None  # not everyone voted: no probe yet
    opt_vote(sim, "d", 53)
    assert sim.core.opt is not None and sim.core.opt.phase is Phase.PROBING
    first = [m for p in "abcd" for m in probes_in(sim, p)]
    assert len(first) == 4 and all(len(m["targets"]) == 1 and m["bytes"] == 1000 for m in first)
    assert answer_probes(sim) == 12  # every ordered pair, one report each
    assert sim.core.opt is None
    assert sim.core.epoch == epoch + 1
    assert sim.core.rings[0] == ["a", "c", "b", "d"]
    for i, pid in enumerate("abcd"):
        topo = sim.last_topo(pid)
        assert topo["epoch"] == epoch + 1 and topo["req"] == 50 + i
        assert [r[0] for r in topo["peers"]] == ["a", "c", "b", "d"]
        assert "bottleneck" in topo["reason"]
    status = sim.send("a", "status_q", req=9)[0]
    assert len(status["bandwidth"]) == 12 and not status["optimizing"]
    # the vote again (its answer was lost): the same answer, counted once
    again = opt_vote(sim, "b", 51)
    assert again[-1]["type"] == "topology" and again[-1]["req"] == 51 and sim.core.opt is None


def test_no_gain_keeps_the_epoch_and_says_why_and_second_call_probes_nothing():
    sim = Sim(CFG)
    grow(sim, "a", "b", "c")
    epoch = sim.core.epoch
    for i, pid in enumerate("abc"):
        opt_vote(sim, pid, 60 + i)
    assert answer_probes(sim, rates=lambda s, d: 5e6) == 6
    assert sim.core.epoch == epoch and sim.core.rings[0] == ["a", "b", "c"]
    for i, pid in enumerate("abc"):
        topo = sim.last_topo(pid)
        assert topo["epoch"] == epoch and topo["req"] == 60 + i
        assert "best found" in topo["reason"]
    for i, pid in enumerate("abc"):  # measured already: no probe, answered at once
        opt_vote(sim, pid, 70 + i)
    assert answer_probes(sim) == 0
    assert [sim.last_topo(p)["req"] for p in "abc"] == [70, 71, 72] and sim.core.epoch == epoch


def test_a_death_during_probing_ends_the_round_without_it():
    sim = Sim(CFG)
    grow(sim, "a", "b", "c", "d")
    epoch = sim.core.epoch
    for i, pid in enumerate("abcd"):
        opt_vote(sim, pid, 80 + i)
    # c answers nothing; it is silent and removed at its heartbeat deadline
    sim.tick(CFG.heartbeat_deadline + 0.5, beat=("a", "b", "d"))
    assert "c" not in sim.core.peers
    answer_probes(sim, skip=("c",))
    sim.tick(OPT.probe_timeout + REPORT_SLACK + 0.5, beat=("a", "b", "d"))
    answer_probes(sim, skip=("c",))
    assert sim.core.opt is None
    assert sim.core.epoch > epoch
    assert sorted(sim.core.rings[0]) == ["a", "b", "d"]
    for i, pid in zip((80, 81, 83), "abd", strict=True):
        answered = [t for t in sim.topos[pid] if t["req"] == i]
        assert answered and [r[0] for r in answered[-1]["peers"]] == sim.core.rings[0]
    assert all(p != "c" and q != "c" for p, q in sim.core.bw.snapshot(["a", "b", "c", "d"]))


def test_the_deadline_fails_every_voter_and_keeps_the_ring():
    sim = Sim(CFG)
    grow(sim, "a", "b", "c")
    epoch = sim.core.epoch
    for i, pid in enumerate("abc"):
        opt_vote(sim, pid, 90 + i, timeout=2.0)
    assert sim.core.opt is not None  # nobody answers its probe
    sim.tick(2.2)
    assert sim.core.opt is None and sim.core.epoch == epoch and sim.core.rings[0] == ["a", "b", "c"]
    for pid in "abc":
        errors = [m for m in sim.inbox[f"conn-{pid}"] if m["type"] == "error"]
        assert errors and errors[-1]["error"] == "DeadlineExceeded" and "probing" in errors[-1]["message"]


def test_lockstep_mismatch_between_update_and_optimize():
    sim = Sim(CFG)
    grow(sim, "a", "b", "c")
    sim.vote("a", req=200)
    out = opt_vote(sim, "b", 201)
    assert out[-1]["type"] == "error" and out[-1]["error"] == "InvalidUsage"
    assert "lockstep mismatch" in out[-1]["message"] and "optimize_topology" in out[-1]["message"]
    err_a = [m for m in sim.inbox["conn-a"] if m["type"] == "error"]
    assert err_a and err_a[-1]["req"] == 200
    assert not sim.core.votes and sim.core.opt is None


def test_lockstep_mismatch_with_a_peer_in_a_collective():
    sim = Sim(CFG)
    grow(sim, "a", "b", "c")
    sim.hb("c", activity="all_reduce tag=3")
    opt_vote(sim, "a", 300)
    opt_vote(sim, "b", 301)
    sim.tick(CFG.mismatch_grace + 0.5)
    errs = [m for m in sim.inbox["conn-a"] if m["type"] == "error"]
    assert errs and "optimize_topology" in errs[-1]["message"] and errs[-1]["req"] == 300
    assert any(m["type"] == "abort" for m in sim.inbox["conn-c"])


def test_late_report_counts_as_done():
    matrix = BandwidthMatrix()
    rnd = OptimizeRound(1, 0.0, voters={"a": 1, "b": 2, "c": 3}, deadline=float("inf"),
                        rings={0: ["a", "b", "c"]}, matrix=matrix, epoch=4, config=OPT)
    d = rnd.start(0.0)
    assert sorted(pid for pid, _ in d.out) == ["a", "b", "c"]
    d = rnd.tick(OPT.probe_timeout + REPORT_SLACK + 0.1)  # nobody reported: next step
    assert "no report" in d.reason and len(d.out) == 3 and rnd.step == 1
    rnd.tick(2 * (OPT.probe_timeout + REPORT_SLACK) + 0.2)
    assert rnd.phase is Phase.SOLVING and len(matrix) == 0
    job = rnd.solve_job()
    rnd.solved(10.0, job())
    assert rnd.phase is Phase.DONE and rnd.outcome.moves == {} and rnd.outcome.answers == {"a": 1, "b": 2, "c": 3}


def test_large_groups_are_solved_as_work_off_the_loop():
    cfg = MembershipConfig(recovery_grace=0.0, optimize=OptimizeConfig(probe_bytes=10, inline_max=3))
    sim = Sim(cfg)
    grow(sim, "a", "b", "c", "d")
    for i, pid in enumerate("abcd"):
        opt_vote(sim, pid, 400 + i)
    works = []
    orig = sim._deliver

    def deliver(decision):
        if decision.work is not None:
            works.append(decision.work)
        orig(decision)

    sim._deliver = deliver
    answer_probes(sim)
    assert len(works) == 1 and sim.core.opt is not None and sim.core.opt.phase is Phase.SOLVING
    fn, then = works[0]
    sim._deliver(then(sim.now, fn()))
    assert sim.core.opt is None and sim.core.rings[0] == ["a", "c", "b", "d"]
    assert sim.last_topo("a")["req"] == 400
