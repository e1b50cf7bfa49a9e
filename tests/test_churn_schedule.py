"""The churn harness's schedule and report logic (stress/churn/), without processes or sockets."""

from __future__ import annotations

import os
import sys

import pytest
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "stress"))
from churn import report  # noqa: E402
from churn import schedule as S  # noqa: E402
from churn import tracker as T  # noqa: E402

pytestmark = pytest.mark.timeout(30)


def population(sched: S.Schedule) -> None:
    """Replays the schedule's own population rules and checks every fault against them."""
    alive = set(range(sched.peers))
    busy: dict[int, float] = {}
    coordinator_until = -1.0
    for f in sched.faults:
        if f.kind == S.START:
            assert f.target not in alive
            alive.add(f.target)
            assert len(alive) <= sched.peers + 1
        elif f.kind in S.COORDINATOR:
            assert f.target is None and f.t >= coordinator_until
            coordinator_until = f.t + f.duration
        else:
            assert f.target in alive, f"{f} names a peer that is not alive"
            assert busy.get(f.target, 0.0) <= f.t, f"{f} hits a peer that is still frozen or cut off"
            working = [p for p in alive if busy.get(p, 0.0) <= f.t]
            assert len(working) > 2
            if f.kind in S.REMOVING:
                alive.remove(f.target)
            else:
                busy[f.target] = f.t + f.duration
        if f.kind in S.DURATIONS:
            lo, hi = S.DURATIONS[f.kind]
            assert lo <= f.duration <= hi


@pytest.mark.parametrize("seed", [1, 2, 3, 17])
def test_seeded_schedule_is_reproducible_and_keeps_its_rules(seed):
    a = S.draw(seed, 180.0, 4, S.KINDS)
    b = S.draw(seed, 180.0, 4, S.KINDS)
    assert a == b and a.dump() == b.dump()
    assert a.faults != S.draw(seed + 100, 180.0, 4, S.KINDS).faults
    assert all(8.0 <= f.t < 180.0 - 12.0 for f in a.faults)
    assert [f.t for f in a.faults] == sorted(f.t for f in a.faults)
    assert len(a.faults) >= 15
    population(a)


def test_kinds_left_out_are_never_drawn():
    kinds = [k for k in S.KINDS if k not in (S.LINK_CUT, S.COORD_STOP)]
    sched = S.draw(5, 600.0, 3, kinds)
    drawn = {f.kind for f in sched.faults}
    assert S.LINK_CUT not in drawn and S.COORD_STOP not in drawn
    assert drawn == set(kinds)  # ten minutes draw every kind asked for
    population(sched)
    with pytest.raises(ValueError, match="unknown"):
        S.draw(1, 60.0, 3, ["kill", "explode"])


def test_replay_round_trip():
    sched = S.draw(9, 120.0, 3, S.KINDS)
    again = S.Schedule.load(sched.dump())
    assert again == sched
    assert again.describe() == sched.describe()
    assert "coordinator" in sched.describe() or "peer" in sched.describe()
    bad = sched.dump().replace('"kill"', '"explode"', 1)
    if bad != sched.dump():
        with pytest.raises(ValueError, match="unknown kind"):
            S.Schedule.load(bad)


def test_percentile_is_nearest_rank():
    xs = [float(i) for i in range(1, 21)]
    assert T.percentile(xs, 95) == 19.0
    assert T.percentile(xs, 50) == 10.0
    assert T.percentile([3.0], 95) == 3.0
    assert T.percentile([5.0, 1.0, 9.0], 100) == 9.0


def steps(tr: T.Tracker, t: float, epoch: int, peers, world=None):
    for p in peers:
        tr.step(t, p, epoch, world or len(peers), {"sum": True}, True)


def test_recovery_rules_and_statistics():
    tr = T.Tracker(t0=100.0)
    steps(tr, 101.0, 3, [0, 1, 2, 3])
    # a kill of a member: resolved by another peer's step in a newer epoch, not by steps
    # of the old epoch that were in flight
    kill = tr.fault(110.0, S.Fault(10.0, S.KILL, 3))
    steps(tr, 110.2, 3, [0, 1])
    assert kill.outcome == T.UNRESOLVED
    steps(tr, 110.5, 4, [0])
    assert (kill.outcome, kill.recovery) == (T.NEW_EPOCH, pytest.approx(0.5))
    # a short freeze that removed no one: the first step of that epoch after the thaw
    steps(tr, 111.0, 4, [0, 1, 2])
    freeze = tr.fault(120.0, S.Fault(20.0, S.FREEZE, 2, 2.0))
    steps(tr, 121.0, 4, [0])  # before the thaw: does not count
    assert freeze.outcome == T.UNRESOLVED
    tr.ended(122.0, freeze)
    steps(tr, 122.25, 4, [1])
    assert (freeze.outcome, freeze.recovery) == (T.SAME_EPOCH, pytest.approx(2.25))
    # a crash of a peer that is not in the newest epoch: nothing to time
    tr.peer_epoch[7] = 2
    crash = tr.fault(125.0, S.Fault(25.0, S.CRASH, 7))
    assert crash.outcome == T.NOT_TIMED
    # the coordinator: the first step after it came back, timed from its return
    stop = tr.fault(130.0, S.Fault(30.0, S.COORD_STOP, None, 3.0))
    steps(tr, 132.0, 4, [0])
    assert stop.outcome == T.UNRESOLVED
    tr.ended(133.0, stop)
    steps(tr, 134.0, 4, [1])
    assert (stop.outcome, stop.recovery) == (T.BACK, pytest.approx(1.0))
    assert stop.row(100.0)["ended_s"] == pytest.approx(33.0)
    # a start: the new peer's first step
    start = tr.fault(140.0, S.Fault(40.0, S.START, 9))
    steps(tr, 141.0, 4, [0])
    steps(tr, 141.5, 5, [9])
    assert (start.outcome, start.recovery) == (T.JOINED, pytest.approx(1.5))
    # more kills for the statistics: 0.5 (above), 1.0, 2.0, 4.0; and one never resolved
    for i, (rec_after, epoch, target) in enumerate([(1.0, 6, 9), (2.0, 7, 1), (4.0, 8, 2)]):
        steps(tr, 149.0 + 10 * i, epoch - 1, [target])  # a member of the newest epoch
        k = tr.fault(150.0 + 10 * i, S.Fault(50.0 + 10 * i, S.KILL, target))
        steps(tr, 150.0 + 10 * i + rec_after, epoch, [0])
        assert k.outcome == T.NEW_EPOCH
    tr.skipped(190.0, S.Fault(90.0, S.KILL, 42), "not running")
    open_kill = tr.fault(195.0, S.Fault(95.0, S.KILL, 0))
    assert open_kill.outcome == T.UNRESOLVED
    table = tr.kinds_table()
    k = table["kill"]
    assert (k["applied"], k["skipped"], k[T.NEW_EPOCH], k[T.UNRESOLVED], k["timed"]) == (5, 1, 4, 1, 4)
    assert (k["median_s"], k["p95_s"], k["max_s"]) == (1.5, 4.0, 4.0)
    assert table["crash"][T.NOT_TIMED] == 1 and table["crash"]["median_s"] is None
    assert list(table) == [k for k in S.KINDS if k in table]  # report order
    summary = tr.summary(200.0)
    assert summary["steps"] == tr.steps and summary["steps_per_s"] == round(tr.steps / 100.0, 3)
    assert summary["failures"] == []
    text = report.text(summary, "header", ["a note"])
    assert "kill" in text and "result: PASS" in text and "a note" in text


def test_violations_hangs_and_crashes_fail_the_run():
    tr = T.Tracker(t0=0.0)
    tr.step(1.0, 0, 1, 2, {"sum": True, "quant": False}, parity=False)
    assert tr.state(1.0, 0, 5, "aa", True) is None
    assert tr.state(1.1, 1, 5, "aa", True) is None
    assert "revision 5" in tr.state(1.2, 2, 5, "bb", True)
    tr.state(1.3, 2, 6, "cc", correct=False)
    # a late call of a frozen peer is not a hang; of a running one it is
    tr.fault(2.0, S.Fault(2.0, S.FREEZE, 0, 3.0))
    tr.ended(5.0, tr.faults[-1])
    assert not tr.hang(0, "all_reduce", 1.0, 40.0, 28.0, "returned")
    assert tr.hang(1, "update_topology", 1.0, 40.0, 28.0, "still running")
    # exits: SIGKILLed or asked to leave is fine, a non-zero exit on its own is a crash
    assert not tr.exited(3.0, 0, -9, expected=True)
    assert not tr.exited(3.0, 1, 0, expected=True)
    assert not tr.exited(3.0, 1, 0, expected=False)
    assert tr.exited(3.0, 2, 1, expected=False)
    assert tr.exited(3.0, 3, 1, expected=True)
    failures = tr.failures()
    assert len(failures) == 5, failures
    summary = tr.summary(10.0)
    assert summary["parity_violations"]["collective"] == 1
    assert summary["parity_violations"]["shared_state"] == 1
    assert summary["wrong"] == {"quant": 1, "state": 1}
    assert summary["late_calls_of_frozen_peers"] == 1
    assert "FAIL" in report.text(summary, "h", [])


def test_series_bins_steps_and_world():
    tr = T.Tracker(t0=0.0)
    for t, w in [(0.1, 3), (0.5, 3), (1.2, 4), (3.9, 2)]:
        tr.step(t, 0, 1, w, {}, True)
    s = tr.series(4.0)
    assert s["t"] == [0.0, 1.0, 2.0, 3.0]
    assert s["steps_per_s"] == [2.0, 1.0, 0.0, 1.0]
    assert s["world"] == [3, 4, None, 2]
