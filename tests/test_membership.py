"""The membership core, driven without sockets: scenarios plus generated sequences."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pccl_py.calls import auto_tag
from pccl_py.coordinator.membership import Membership, MembershipConfig, PeerState
from pccl_py.wire import control as protocol

pytestmark = pytest.mark.timeout(60)

CFG = MembershipConfig(recovery_grace=0.0)


class Sim:
    """A coordinator core plus fake peers; every message crosses the real codec."""

    def __init__(self, cfg: MembershipConfig = CFG, now: float = 1000.0):
        self.now = now
        self.core = Membership(now, config=cfg, seed=1)
        self.inbox: dict[object, list[dict]] = {}
        self.topos: dict[str, list[dict]] = {}  # peer_id -> topology messages received
        self.conn_of: dict[str, object] = {}
        self.reasons: list[str] = []
        self._n = 0
        self._req = 100

    def _deliver(self, decision) -> None:
        self.reasons.append(decision.reason)
        for conn, msg in decision.out:
            msg = protocol.decode(protocol.encode_msg(msg))  # the core speaks the schema
            self.inbox.setdefault(conn, []).append(msg)
            if msg["type"] == "topology":
                pid = self.core.by_conn.get(conn)
                if pid is not None:
                    self.topos.setdefault(pid, []).append(msg)

    def send(self, pid: str, mtype: str, conn: object = None, **fields) -> list[dict]:
        conn = conn if conn is not None else self.conn_of.setdefault(pid, f"conn-{pid}")
        msg = protocol.decode(protocol.encode(mtype, **fields))
        start = len(self.inbox.get(conn, []))
        self._deliver(self.core.on_message(self.now, conn, msg))
        return self.inbox.get(conn, [])[start:]

    def hello(self, pid: str, group: int = 0, claim: str = "new", epoch: int = 0, ring_pos: int = -1,
              revision: int = -1, timeout: float = 0.0, conn=None, world: int = 0) -> list[dict]:
        self._n += 1
        return self.send(pid, "hello", conn=conn, peer_id=pid, group=group, host="127.0.0.1",
                         port=20000 + self._n, claim=claim, epoch=epoch,
                         ring_pos=ring_pos, world=world, revision=revision, instance="", timeout=timeout)

    def vote(self, pid: str, req: int | None = None, timeout: float = 0.0, below: int = 0,
             open_tags: tuple[int, ...] = ()) -> list[dict]:
        """``req``: by default the next of a counter, as a daemon numbers its requests upwards."""
        if req is None:
            self._req += 1
            req = self._req
        return self.send(pid, "vote", req=req, timeout=timeout, below=below, open=list(open_tags))

    def hb(self, pid: str, activity: str | None = None, calls: tuple[int, ...] = ()) -> list[dict]:
        return self.send(pid, "heartbeat", activity=activity, epoch=self.core.epoch, revision=0, tx=0, rx=0,
                         calls=list(calls))

    def tick(self, dt: float = 0.0, beat: tuple[str, ...] | None = None) -> None:
        """Advance time in small steps; peers in ``beat`` (default: all live) heartbeat."""
        end = self.now + dt
        while True:
            step = min(0.1, end - self.now)
            self.now += step
            live = list(self.core.peers) if beat is None else [p for p in beat if p in self.core.peers]
            for pid in live:
                self.send(pid, "heartbeat", activity=self.core.peers[pid].activity,
                          epoch=self.core.epoch, revision=0, tx=0, rx=0, calls=list(self.core.peers[pid].calls))
            self._deliver(self.core.tick(self.now))
            if self.now >= end - 1e-9:
                return

    def last_topo(self, pid: str) -> dict:
        return self.topos[pid][-1]

    def members(self, pid: str) -> list[str]:
        return [row[0] for row in self.last_topo(pid)["peers"]]

    def types(self, pid: str) -> list[str]:
        return [m["type"] for m in self.inbox.get(self.conn_of.get(pid, f"conn-{pid}"), [])]


def grow(sim: Sim, *pids: str) -> None:
    """First peer joins an empty run; the rest are admitted by unanimous votes."""
    sim.hello(pids[0])
    for pid in pids[1:]:
        sim.hello(pid)
        for voter in sim.core.accepted():
            sim.vote(voter, req=sim._n)


def test_first_peer_accepted_at_once_then_others_wait_for_a_vote():
    sim = Sim()
    out = sim.hello("a")
    assert [m["type"] for m in out] == ["welcome", "topology"]
    assert out[1]["epoch"] == 1 and out[1]["world_size"] == 1
    out = sim.hello("b")
    assert [m["type"] for m in out] == ["welcome"] and out[0]["state"] == "pending"
    assert sim.core.pending() == ["b"]
    assert sim.send("a", "pending_q", req=7) == [{"type": "pending_a", "req": 7, "pending": True}]
    out = sim.vote("a")
    assert out[-1]["type"] == "topology" and out[-1]["req"] and out[-1]["epoch"] == 2
    assert sim.members("a") == ["a", "b"] == sim.members("b")
    assert sim.last_topo("b")["world_size"] == 2


def test_all_pending_admitted_together_ring_order_kept():
    sim = Sim()
    grow(sim, "a", "b")
    for pid in ("c", "d", "e"):
        sim.hello(pid)
    sim.vote("a")
    assert not sim.topos["a"][-1]["req"] or sim.core.pending()  # one vote is not enough
    assert sim.core.pending() == ["c", "d", "e"]
    sim.vote("b")
    assert sim.core.pending() == []
    assert sim.members("e") == ["a", "b", "c", "d", "e"]
    assert sim.core.epoch == 3


def test_vote_with_nobody_pending_completes_round_epoch_unchanged():
    sim = Sim()
    grow(sim, "a", "b")
    epoch = sim.core.epoch
    assert sim.vote("a", req=5) == []
    out = sim.vote("b", req=6)
    assert out[-1]["type"] == "topology" and out[-1]["req"] == 6 and out[-1]["epoch"] == epoch
    assert sim.last_topo("a")["req"] == 5  # each voter's topology names its own vote


def test_vote_is_run_wide_across_groups():
    sim = Sim()
    sim.hello("a", group=0)
    sim.hello("x", group=1)
    assert sim.core.pending() == ["x"]
    sim.vote("a", req=3)
    assert sim.core.accepted() == ["a", "x"] and sim.last_topo("x")["group"] == 1
    assert sim.last_topo("x")["world_size"] == 2 and sim.last_topo("x")["num_groups"] == 2
    assert sim.members("x") == ["x"] and sim.members("a") == ["a"]
    sim.hello("y", group=1)
    sim.vote("a", req=4)
    sim.vote("a", req=4)  # a resend does not count twice
    assert sim.core.pending() == ["y"]  # x (another group) has not voted
    sim.vote("x", req=5)
    assert sim.members("x") == ["x", "y"] and sim.last_topo("a")["world_size"] == 3


def test_pending_peer_cannot_vote():
    sim = Sim()
    grow(sim, "a")
    sim.hello("b")
    out = sim.vote("b", req=9)
    assert out[0]["type"] == "error" and out[0]["error"] == "InvalidUsage" and out[0]["req"] == 9


def test_graceful_leave_pushes_new_epoch_at_once():
    sim = Sim()
    grow(sim, "a", "b", "c")
    epoch = sim.core.epoch
    out = sim.send("b", "leave", reason="done")
    assert out[-1]["type"] == "removed"
    assert sim.core.epoch == epoch + 1 and sim.members("a") == ["a", "c"] == sim.members("c")
    assert sim.send("b", "heartbeat", activity=None, epoch=0, revision=0, tx=0, rx=0, calls=[])[0]["type"] == "removed"
    assert sim.hello("b")[0]["type"] == "removed"  # same peer_id stays gone
    assert sim.hello("b2", conn="conn-b")[0]["type"] == "welcome"  # new id, same connection: fine


def test_heartbeat_deadline_removes_silent_peer_only():
    sim = Sim()
    grow(sim, "a", "b", "c")
    sim.tick(2.9, beat=("a", "c"))
    assert "b" in sim.core.peers
    sim.tick(0.3, beat=("a", "c"))
    assert "b" not in sim.core.peers and sim.members("a") == ["a", "c"]
    assert "removed" in sim.types("b")
    assert sim.last_topo("c")["world_size"] == 2


def test_coordinator_stall_does_not_remove_everyone():
    sim = Sim()
    grow(sim, "a", "b")
    epoch = sim.core.epoch
    sim.tick(0.5)
    sim.now += 10.0  # the coordinator process was stopped; the peers kept running
    sim._deliver(sim.core.tick(sim.now))
    assert sim.core.accepted() == ["a", "b"] and sim.core.epoch == epoch
    assert "did not run" in sim.reasons[-1]
    sim.tick(3.5, beat=("a",))  # afterwards, real silence still counts
    assert sim.core.accepted() == ["a"]


def test_a_stall_seen_first_as_closed_connections_keeps_the_probes_short():
    """zmq closes the connections a paused coordinator could not serve; the monitor may report
    that before the timer ticks. The stall is compensated by whichever input comes first, so
    the probes start after it with their normal deadline: a peer that is really gone is still
    found at the usual pace, the live ones are kept."""
    sim = Sim()
    grow(sim, "a", "b", "c")
    epoch = sim.core.epoch
    sim.tick(0.5)
    sim.now += 10.0  # stopped; the first thing it sees when it runs again: three closed connections
    for pid in ("a", "b", "c"):
        sim._deliver(sim.core.on_disconnect(sim.now, f"conn-{pid}"))
    assert "did not run" in sim.reasons[-3]
    assert sim.core.probes["c"].deadline == pytest.approx(sim.now + 1.4)
    sim.tick(1.3, beat=("a", "b"))  # a and b talk again on their new connections; c does not
    assert sim.core.accepted() == ["a", "b", "c"] and sim.core.epoch == epoch
    sim.tick(0.2, beat=("a", "b"))
    assert sim.core.accepted() == ["a", "b"]
    assert any("no answer to a probe" in r for r in sim.reasons)


def test_a_stall_does_not_count_toward_the_lockstep_grace():
    sim = Sim()
    grow(sim, "a", "b")
    sim.hb("b", "all_reduce tag=3")
    sim.vote("a", req=9)
    sim.tick(1.0)
    sim.now += 10.0
    sim.send("b", "heartbeat", activity="all_reduce tag=3", epoch=sim.core.epoch, revision=0, tx=0, rx=0, calls=[])
    sim.tick(0.5)  # 1.5 s of the 2 s grace seen by a running coordinator
    assert "error" not in sim.types("a")
    sim.tick(0.6)
    err = [m for m in sim.inbox["conn-a"] if m["type"] == "error"]
    assert err and err[0]["error"] == "InvalidUsage" and "lockstep" in err[0]["message"]


def test_deadlines_that_pass_during_a_stall_blame_the_coordinator():
    """The callers' deadlines are real time and are not shifted; a vote or a connect whose
    deadline passed while the coordinator did not run fails with CoordinatorUnavailable (the
    other peers may well have voted: their votes were waiting in its socket)."""
    sim = Sim()
    grow(sim, "a", "b")
    sim.vote("a", req=4, timeout=2.0)  # passes during the stall
    sim.hello("c", timeout=3.0)  # likewise
    sim.tick(0.5)
    sim.now += 5.0
    sim.tick(0.1)
    [err] = [m for m in sim.inbox["conn-a"] if m["type"] == "error"]
    assert err["req"] == 4 and err["error"] == "CoordinatorUnavailable" and "not running" in err["message"]
    [err] = [m for m in sim.inbox["conn-c"] if m["type"] == "error"]
    assert err["req"] == 0 and err["error"] == "CoordinatorUnavailable" and "c" not in sim.core.peers
    sim.vote("a", req=5, timeout=1.0)  # passes while it runs: the other peers' fault
    sim.tick(1.1)
    err = [m for m in sim.inbox["conn-a"] if m["type"] == "error"][-1]
    assert err["req"] == 5 and err["error"] == "DeadlineExceeded" and "b" in err["message"]


def test_a_repeated_vote_is_answered_again_not_counted_again():
    """A daemon resends its votes in flight when its connection closes; the answer may have
    gone down with that connection, so a vote already answered is answered again (with the
    current topology, or the same error), and nothing is counted twice."""
    sim = Sim()
    grow(sim, "a", "b")
    sim.hello("c")
    sim.vote("a", req=5)
    sim.vote("b", req=6)
    epoch = sim.core.epoch
    assert sim.core.accepted() == ["a", "b", "c"]
    out = sim.vote("a", req=5)  # again
    assert [(m["type"], m["req"], m["epoch"]) for m in out] == [("topology", 5, epoch)]
    assert not sim.core.votes and sim.core.epoch == epoch and "answered again" in sim.reasons[-1]
    out = sim.vote("a", req=7)  # a new vote opens a round
    assert out == [] and "a" in sim.core.votes
    sim.vote("a", req=7)  # and its repeat does not count twice
    assert sim.core.votes["a"].req == 7
    sim.vote("b", req=8)
    sim.vote("c", req=1)
    assert not sim.core.votes and sim.last_topo("c")["req"] == 1
    assert sim.vote("a", req=5) == [] and not sim.core.votes  # older than vote 7: stale, dropped

    sim.vote("a", req=9, timeout=0.5)
    sim.tick(0.6)
    first = [m for m in sim.inbox["conn-a"] if m["type"] == "error"]
    assert [m["error"] for m in first] == ["DeadlineExceeded"]
    assert sim.vote("a", req=9) == first and not sim.core.votes  # the same error again
    # the same peer_id on another socket (a restarted daemon counts its requests from 1): a new vote
    sim.send("b", "hello", conn="conn-b2", **_hello_fields(sim, "b"))
    sim.send("b", "vote", conn="conn-b2", req=8, timeout=0.0, below=0, open=[])
    assert sim.core.votes["b"].req == 8


def _hello_fields(sim: Sim, pid: str) -> dict:
    return dict(peer_id=pid, group=0, host="127.0.0.1", port=20099, claim="accepted",
                epoch=sim.core.epoch, ring_pos=-1, world=0, revision=-1, instance=sim.core.instance, timeout=0.0)


def test_failure_report_probe_removes_silent_peer_fast():
    sim = Sim()
    grow(sim, "a", "b", "c")
    out = sim.send("a", "report_failure", peer_id="b", reason="connection reset", epoch=sim.core.epoch)
    assert out == []
    ping = [m for m in sim.inbox["conn-b"] if m["type"] == "ping"]
    assert len(ping) == 1
    sim.tick(0.5, beat=("a", "c"))  # b does not answer
    assert "b" not in sim.core.peers and sim.members("c") == ["a", "c"]


def test_failure_report_against_live_peer_rekeys_the_same_members():
    sim = Sim()
    grow(sim, "a", "b", "c")
    epoch = sim.core.epoch
    sim.send("a", "report_failure", peer_id="b", reason="connection reset", epoch=epoch)
    nonce = [m for m in sim.inbox["conn-b"] if m["type"] == "ping"][-1]["nonce"]
    sim.send("b", "pong", nonce=nonce)
    sim.tick(0.6, beat=("a", "b", "c"))
    # both alive, their link is not: same members, next epoch, so every daemon re-dials
    assert sim.core.accepted() == ["a", "b", "c"] and sim.core.epoch == epoch + 1
    assert sim.members("c") == ["a", "b", "c"]
    assert any("broke while both are alive" in r for r in sim.reasons)
    # b's own report of the same break (epoch before the re-key) changes nothing more
    sim.send("b", "report_failure", peer_id="a", reason="connection reset", epoch=epoch)
    sim.tick(1.0)
    assert sim.core.accepted() == ["a", "b", "c"] and sim.core.epoch == epoch + 1
    sim.send("a", "report_failure", peer_id="a", reason="self", epoch=epoch + 1)  # about itself: ignored
    sim.tick(1.0)
    assert sim.core.epoch == epoch + 1


def test_failure_report_answered_by_any_message_rekeys_once():
    sim = Sim()
    grow(sim, "a", "b")
    epoch = sim.core.epoch
    # both ends report the break in the same epoch; b's report also proves b alive
    sim.send("a", "report_failure", peer_id="b", reason="reset", epoch=epoch)
    sim.send("b", "report_failure", peer_id="a", reason="reset", epoch=epoch)
    sim.tick(0.05, beat=("a", "b"))
    sim.tick(1.0, beat=("a", "b"))
    assert sim.core.accepted() == ["a", "b"] and sim.core.epoch == epoch + 1


def test_graceful_leave_after_its_links_closed_costs_one_epoch():
    """A leaving daemon closes its data links before its leave arrives; the survivors'
    reports about those links must not bring an extra epoch of the same members."""
    sim = Sim()
    grow(sim, "a", "b", "c")
    epoch = sim.core.epoch
    sim.send("a", "report_failure", peer_id="b", reason="connection closed by the peer", epoch=epoch)
    nonce = [m for m in sim.inbox["conn-b"] if m["type"] == "ping"][-1]["nonce"]
    sim.send("b", "pong", nonce=nonce)  # still flushing its last frames: answers pings
    sim.tick(0.1, beat=("a", "b", "c"))
    sim.send("b", "leave", reason="graceful leave")
    sim.tick(1.0, beat=("a", "c"))
    assert sim.core.accepted() == ["a", "c"] and sim.core.epoch == epoch + 1


def test_a_link_that_keeps_breaking_costs_a_member():
    sim = Sim()
    grow(sim, "a", "b", "c")
    for k in range(3):
        epoch = sim.core.epoch
        sim.send("a", "report_failure", peer_id="b", reason="reset", epoch=epoch)
        nonce = [m for m in sim.inbox["conn-b"] if m["type"] == "ping"][-1]["nonce"]
        sim.send("b", "pong", nonce=nonce)
        sim.tick(1.0, beat=("a", "b", "c"))
        if k < 2:
            assert sim.core.accepted() == ["a", "b", "c"] and sim.core.epoch == epoch + 1
    # the third break within the window: the reported peer goes, the rest continue
    assert sim.core.accepted() == ["a", "c"]
    assert "broke 3 times" in " ".join(sim.reasons)


def test_disconnect_probes_allowing_a_reconnect():
    sim = Sim()
    grow(sim, "a", "b", "c")
    sim._deliver(sim.core.on_disconnect(sim.now, "conn-b"))
    sim._deliver(sim.core.on_disconnect(sim.now, "conn-c"))
    sim.tick(1.3, beat=("a",))
    assert sim.core.accepted() == ["a", "b", "c"]  # probe_timeout + reconnect_allowance = 1.4 s
    pings = [m for m in sim.inbox["conn-b"] if m["type"] == "ping"]
    assert len(pings) >= 5 and len({m["nonce"] for m in pings}) == 1  # re-pinged every 0.1 s
    sim.hello("c")  # c's new socket re-introduces itself: alive
    sim.tick(0.2, beat=("a", "c"))
    assert sim.core.accepted() == ["a", "c"]


def test_failure_report_shortens_a_disconnect_probe():
    sim = Sim()
    grow(sim, "a", "b")
    sim._deliver(sim.core.on_disconnect(sim.now, "conn-b"))
    sim.tick(0.2, beat=("a",))
    sim.send("a", "report_failure", peer_id="b", reason="EOF on data link", epoch=sim.core.epoch)
    sim.tick(0.45, beat=("a",))
    assert sim.core.accepted() == ["a"]


def test_a_frozen_peer_is_not_a_lockstep_mismatch():
    """A peer frozen in the middle of a call keeps its last reported activity; the others
    voting meanwhile must wait for its heartbeat deadline, not get a lockstep error."""
    sim = Sim()
    grow(sim, "a", "b", "c")
    sim.hb("c", "all_reduce tag=7")
    sim.vote("a")
    sim.vote("b")
    sim.tick(2.8, beat=("a", "b"))  # c is silent: frozen, not busy elsewhere
    errors = [m for pid in ("a", "b") for m in sim.inbox[f"conn-{pid}"] if m.get("error") == "InvalidUsage"]
    assert not errors, errors
    sim.tick(0.5, beat=("a", "b"))  # past the 3 s deadline: c is removed, the round completes
    assert sim.core.accepted() == ["a", "b"] and sim.last_topo("a")["req"]


def test_a_thawed_peer_gets_the_grace_again():
    sim = Sim()
    grow(sim, "a", "b", "c")
    sim.hb("c", "all_reduce tag=7")
    sim.vote("a")
    sim.vote("b")
    sim.tick(1.5, beat=("a", "b"))  # c frozen for 1.5 s, then heard from again
    sim.tick(1.0)
    errors = [m for m in sim.inbox["conn-a"] if m.get("error") == "InvalidUsage"]
    assert not errors  # 1 s since it thawed: within the 2 s grace
    sim.tick(1.5)  # still in its call 2.5 s after thawing: that is a mismatch
    errors = [m for m in sim.inbox["conn-a"] if m.get("error") == "InvalidUsage"]
    assert errors and "lockstep mismatch" in errors[0]["message"]


def test_death_of_last_non_voter_completes_the_round():
    sim = Sim()
    grow(sim, "a", "b", "c")
    sim.hello("d")
    sim.vote("a")
    sim.vote("b")
    sim.tick(3.2, beat=("a", "b", "d"))  # c dies while the vote is open
    assert "c" not in sim.core.peers
    assert sim.members("a") == ["a", "b", "d"]
    assert sim.last_topo("a")["req"] and sim.last_topo("b")["req"]


def test_first_peers_of_empty_run_accepted_after_all_died():
    sim = Sim()
    grow(sim, "a")
    sim.hello("b")
    sim.hello("c")
    sim.tick(3.2, beat=("b", "c"))
    assert sorted(sim.core.accepted()) == ["b", "c"] and sim.members("c") == ["b", "c"]


def test_lockstep_mismatch_errors_voters_and_aborts_the_other():
    sim = Sim()
    grow(sim, "a", "b", "c")
    sim.hb("c", "all_reduce tag=5")
    sim.vote("a", req=11)
    sim.vote("b", req=12)
    sim.tick(1.5)
    assert not [m for m in sim.inbox["conn-a"] if m["type"] == "error"]
    sim.tick(0.7)
    err = [m for m in sim.inbox["conn-a"] if m["type"] == "error"]
    assert err and err[0]["error"] == "InvalidUsage" and err[0]["req"] == 11
    assert "c" in err[0]["message"] and "all_reduce tag=5" in err[0]["message"]
    abort = [m for m in sim.inbox["conn-c"] if m["type"] == "abort"]
    assert abort and abort[0]["message"] == err[0]["message"]
    assert not sim.core.votes


def test_a_peer_in_a_call_no_voter_makes_is_failed_at_once_and_the_voters_wait_on():
    """One peer completed call 3 that another failed (it got Diverged and votes); the first
    went on to call 4, which the voter never makes: it is told at once, not after the
    lockstep grace, and the round completes when it votes too."""
    sim = Sim()
    grow(sim, "a", "b", "c")
    gen = sim.last_topo("a")["round"]
    assert sim.last_topo("b")["round"] == gen  # one round id for every member
    sim.hb("c", "all_reduce tag=4", calls=(auto_tag(gen, 4),))
    sim.hb("b", "all_reduce tag=4", calls=(auto_tag(gen, 4),))
    sim.vote("a", req=11, below=auto_tag(gen, 4))  # a made calls 1-3: 4 is not its
    for pid in ("b", "c"):
        [abort] = [m for m in sim.inbox[f"conn-{pid}"] if m["type"] == "abort"]
        assert abort["error"] == "Diverged" and "a did not make" in abort["message"]
        assert "update_topology" in abort["message"]
    assert "error" not in sim.types("a") and "a" in sim.core.votes  # a waits on
    sim.tick(0.5)  # heartbeats that still show the call: told once
    assert [m["type"] for m in sim.inbox["conn-c"]].count("abort") == 1
    sim.vote("b", req=12, below=auto_tag(gen, 5))
    sim.vote("c", req=13, below=auto_tag(gen, 5))
    answer = sim.last_topo("a")
    assert answer["req"] == 11 and answer["round"] != gen  # a new round: the counts start again
    assert sim.last_topo("c")["round"] == answer["round"]


def test_a_peer_finishing_a_call_the_voter_completed_gets_the_grace():
    sim = Sim()
    grow(sim, "a", "b")
    gen = sim.last_topo("a")["round"]
    sim.hb("b", "all_reduce tag=3", calls=(auto_tag(gen, 3),))
    sim.vote("a", req=11, below=auto_tag(gen, 4))  # a completed 3: b may still be finishing it
    sim.tick(1.5)
    assert "abort" not in sim.types("b") and "error" not in sim.types("a")
    sim.tick(0.7)  # past the grace: the lockstep check of before
    assert [m["error"] for m in sim.inbox["conn-b"] if m["type"] == "abort"] == ["InvalidUsage"]


@pytest.mark.parametrize("case", ["other generation", "user tag", "other group", "nothing reported"])
def test_no_early_abort_without_proof(case):
    sim = Sim()
    grow(sim, "a", "b")
    gen = sim.last_topo("a")["round"]
    call, below = auto_tag(gen, 9), auto_tag(gen, 4)
    if case == "other generation":
        call = auto_tag(gen + 1, 9)
    elif case == "user tag":
        call = 9
    elif case == "other group":
        sim.core.peers["b"].group = 1
    elif case == "nothing reported":
        below = 0
    sim.hb("b", "all_reduce tag=9", calls=(call,))
    sim.vote("a", req=11, below=below)
    sim.tick(0.5)
    assert "abort" not in sim.types("b")


def test_idle_peer_is_no_mismatch_and_vote_deadline_resolves():
    sim = Sim()
    grow(sim, "a", "b")
    sim.vote("a", req=3, timeout=4.0)
    sim.tick(3.9)
    assert "error" not in sim.types("a")
    sim.tick(0.2)
    err = [m for m in sim.inbox["conn-a"] if m["type"] == "error"]
    assert err[0]["error"] == "DeadlineExceeded" and "b" in err[0]["message"]


def test_pending_connect_deadline():
    sim = Sim()
    grow(sim, "a")
    sim.hello("b", timeout=2.0)
    sim.tick(2.1)
    assert "b" not in sim.core.peers
    err = [m for m in sim.inbox["conn-b"] if m["type"] == "error"]
    assert err and err[0]["error"] == "DeadlineExceeded"
    assert sim.hello("b")[0]["state"] == "pending"  # may try again with the same id


def test_refusals():
    """The transport authenticates (CURVE): the core refuses a hello only when the run is full."""
    sim = Sim(MembershipConfig(recovery_grace=0.0, max_peers=1))
    assert sim.hello("a")[0]["type"] == "welcome"
    out = sim.hello("b")
    assert out[0]["type"] == "refused" and "full" in out[0]["reason"]
    assert list(sim.core.peers) == ["a"]
    # a stranger's non-hello is asked to introduce itself
    out = sim.send("zz", "vote", req=1, timeout=0.0, below=0, open=[])
    assert out[0]["type"] == "reset"


def test_status_is_schema_valid():
    sim = Sim()
    grow(sim, "a", "b")
    sim.hello("c")
    sim.hb("a", "all_reduce tag=1")
    st_ = sim.send("anyone", "status_q", req=4)[0]
    assert st_["epoch"] == 2 and st_["world_size"] == 2
    states = {m["peer_id"]: m["state"] for m in st_["members"]}
    assert states == {"a": "accepted", "b": "accepted", "c": "pending"}
    assert [m["activity"] for m in st_["members"] if m["peer_id"] == "a"] == ["all_reduce tag=1"]


def test_heartbeats_go_out():
    sim = Sim()
    grow(sim, "a")
    sim.tick(1.05)
    assert sim.types("a").count("hb") >= 2


def test_coordinator_restart_rebuilds_from_claims():
    cfg = MembershipConfig(recovery_grace=1.5)
    sim = Sim(cfg)
    # a, b, c were accepted at epoch 7 under the old coordinator (ring c, a, b)
    sim.hello("a", claim="accepted", epoch=7, ring_pos=1, revision=3)
    sim.hello("c", claim="accepted", epoch=7, ring_pos=0, revision=3)
    sim.hello("n")  # a brand-new peer during the window stays pending
    assert sim.types("a") == ["welcome"] and sim.inbox["conn-a"][0]["state"] == "recovering"
    sim.vote("a")  # a vote in the window is kept
    sim.tick(1.0)
    sim.hello("b", claim="accepted", epoch=6, ring_pos=2, revision=3)
    sim.tick(0.6)
    assert not sim.core.recovering
    assert sim.core.epoch == 8
    assert sim.members("a") == ["c", "a", "b"] == sim.members("b")
    assert sim.core.pending() == ["n"]
    sim.hello("late", claim="accepted", epoch=7, ring_pos=3)
    assert sim.core.pending() == ["n", "late"]
    sim.vote("b")
    sim.vote("c")
    assert sim.members("late") == ["c", "a", "b", "n", "late"] and sim.core.epoch == 9


def test_the_recovery_window_closes_once_every_member_of_the_last_epoch_claimed():
    sim = Sim(MembershipConfig(recovery_grace=1.5))
    sim.hello("a", claim="accepted", epoch=7, ring_pos=0, world=3)
    sim.hello("b", claim="accepted", epoch=6, ring_pos=1, world=3)  # missed epoch 7's push
    sim.hello("c", claim="accepted", epoch=7, ring_pos=2, world=3)
    sim.tick(0.1)
    assert sim.core.recovering  # 2 of epoch 7's 3 members: b's claim is of epoch 6
    sim.hello("d", claim="accepted", epoch=7, ring_pos=1, world=3)
    assert not sim.core.recovering and sorted(sim.core.accepted()) == ["a", "b", "c", "d"]
    assert sim.core.epoch == 8 and "closed early" in sim.reasons[-1]


def test_the_window_runs_to_its_end_when_a_member_never_claims():
    sim = Sim(MembershipConfig(recovery_grace=1.5))
    sim.hello("a", claim="accepted", epoch=7, ring_pos=0, world=2)  # its peer died with the coordinator
    sim.tick(1.4)
    assert sim.core.recovering
    sim.tick(0.2)
    assert not sim.core.recovering and sim.core.accepted() == ["a"]


def test_restart_with_no_claims_accepts_first_peers_and_epoch_never_goes_back():
    cfg = MembershipConfig(recovery_grace=1.5)
    sim = Sim(cfg)
    sim.hello("fresh")
    sim.tick(1.6)
    assert sim.core.accepted() == ["fresh"] and sim.core.epoch == 1
    sim.hello("old", claim="accepted", epoch=41, ring_pos=0)  # arrived after the window
    assert sim.core.pending() == ["old"]
    sim.vote("fresh")
    assert sim.core.epoch == 42 and sim.last_topo("old")["epoch"] == 42


def test_malformed_input_from_member_removes_it():
    sim = Sim()
    grow(sim, "a", "b")
    sim._deliver(sim.core.on_bad_input(sim.now, "conn-b", "garbage"))
    assert sim.core.accepted() == ["a"] and "removed" in sim.types("b")
    sim._deliver(sim.core.on_bad_input(sim.now, "conn-unknown", "garbage"))
    assert sim.core.accepted() == ["a"]


# ---------------------------------------------------------------------- generated sequences

PIDS = [f"p{i}" for i in range(5)]


class MembershipMachine(RuleBasedStateMachine):
    """Random joins, leaves, deaths, votes, reports, misuse and coordinator restarts."""

    def __init__(self):
        super().__init__()
        self.cfg = MembershipConfig(recovery_grace=1.5)
        self.sim = Sim(self.cfg)
        self.alive: set[str] = set()  # processes that run (a frozen/killed one is not)
        self.gen = 0
        self.ids: dict[str, str] = {}  # process slot -> current peer_id
        self.view: dict[str, tuple[str, int]] = {}  # peer_id -> (instance, epoch) last seen
        self.seen_sets: dict[tuple[str, int], frozenset] = {}
        self.votes_open: dict[str, float] = {}  # peer_id -> vote deadline
        self.connects: dict[str, float] = {}  # peer_id -> connect deadline
        self.req = 0
        self.last: dict[str, dict] = {}  # peer_id -> last topology it received
        self.sim.tick(1.6)  # past the first recovery window

    # -- helpers
    def pid(self, slot: str) -> str:
        return self.ids.setdefault(slot, f"{slot}.{self.gen}")

    def _check_topos(self):
        core = self.sim.core
        for pid, msgs in self.sim.topos.items():
            for m in msgs:
                key = (m["instance"], m["epoch"], m["group"])
                members = frozenset(r[0] for r in m["peers"])
                assert self.seen_sets.setdefault(key, members) == members, "disagreement at one epoch"
                inst, ep = self.view.get(pid, (m["instance"], 0))
                assert m["epoch"] >= ep, "epoch went back"
                assert m["epoch"] > ep or inst == m["instance"], "new instance reused an epoch"
                self.view[pid] = (m["instance"], m["epoch"])
                self.last[pid] = m
                if m["req"]:
                    self.votes_open.pop(pid, None)
                self.connects.pop(pid, None)
            msgs.clear()
        for conn, msgs in self.sim.inbox.items():
            pid = conn[5:] if isinstance(conn, str) else None
            for m in msgs:
                if m["type"] == "removed" and pid is not None:
                    self.last.pop(pid, None)
                if m["type"] in ("error", "removed") and pid is not None:
                    self.votes_open.pop(pid, None)
                    self.connects.pop(pid, None)
            msgs.clear()
        del core  # noqa

    def _send(self, slot, fn, *a, **kw):
        self._guarded(lambda: fn(self.pid(slot), *a, **kw), voter=self.pid(slot) if fn == self.sim.vote else None)

    def _guarded(self, step, voter=None):
        """Run one step; nobody may be admitted unless every surviving member voted."""
        before_acc = set(self.sim.core.accepted())
        pend = set(self.sim.core.pending())
        voters = set(self.sim.core.votes) | ({voter} if voter else set())
        recovering = self.sim.core.recovering
        step()
        after = set(self.sim.core.accepted())
        new = after - before_acc
        if new and before_acc and not recovering:
            survivors = before_acc & after
            assert new <= pend, "accepted someone who was not pending"
            assert survivors <= voters, f"admitted {new} without votes of {survivors - voters}"
        self._check_topos()

    # -- rules
    @rule(slot=st.sampled_from(PIDS), group=st.integers(0, 1))
    def join(self, slot, group):
        pid = self.pid(slot)
        if pid in self.sim.core.peers:
            return
        if pid in self.sim.core.removed:
            self.gen += 1
            self.ids[slot] = f"{slot}.{self.gen}"
            pid = self.ids[slot]
        if slot not in self.alive:  # a fresh process: it remembers nothing
            self.view.pop(pid, None)
            self.last.pop(pid, None)
        self.alive.add(slot)
        self.connects[pid] = self.sim.now + 5.0
        epoch = self.view.get(pid, ("", 0))[1]  # a live link reports the last epoch it saw
        self._send(slot, self.sim.hello, group=group, timeout=5.0, epoch=epoch)

    @rule(slot=st.sampled_from(PIDS))
    def vote(self, slot):
        pid = self.pid(slot)
        if slot not in self.alive or pid not in self.sim.core.peers:
            return
        self.req += 1
        if self.sim.core.peers[pid].state is not PeerState.PENDING:
            self.votes_open[pid] = self.sim.now + 4.0
        self._send(slot, self.sim.vote, req=self.req, timeout=4.0)

    @rule(slots=st.lists(st.sampled_from(PIDS), min_size=1, max_size=5, unique=True))
    def some_vote(self, slots):
        """Several peers vote in a row (often all but one: the interesting case)."""
        for slot in slots:
            self.vote(slot)

    @rule(slot=st.sampled_from(PIDS))
    def leave(self, slot):
        pid = self.pid(slot)
        if slot in self.alive and pid in self.sim.core.peers:
            self._send(slot, self.sim.send, "leave", reason="bye")
            self.alive.discard(slot)

    @rule(slot=st.sampled_from(PIDS))
    def die(self, slot):
        self.alive.discard(slot)
        self.votes_open.pop(self.pid(slot), None)  # a dead process waits for nothing
        self.connects.pop(self.pid(slot), None)

    @rule(slot=st.sampled_from(PIDS), other=st.sampled_from(PIDS))
    def report(self, slot, other):
        if slot in self.alive and self.pid(slot) in self.sim.core.peers:
            self._send(slot, self.sim.send, "report_failure", peer_id=self.pid(other), reason="link",
                       epoch=self.sim.core.epoch)

    @rule(slot=st.sampled_from(PIDS), act=st.sampled_from([None, "all_reduce tag=1", "update_topology"]))
    def activity(self, slot, act):
        if slot in self.alive and self.pid(slot) in self.sim.core.peers:
            self._send(slot, self.sim.hb, act)

    @rule(dt=st.sampled_from([0.05, 0.3, 1.0, 2.5]))
    def wait(self, dt):
        beat = tuple(self.pid(s) for s in self.alive)
        # live peers answer probes
        end = self.sim.now + dt
        while self.sim.now < end - 1e-9:
            self._guarded(lambda: self.sim.tick(min(0.1, end - self.sim.now), beat=beat))
            for s in self.alive:
                pid = self.pid(s)
                for m in self.sim.inbox.get(f"conn-{pid}", []):
                    if m["type"] == "ping" and pid in self.sim.core.peers:
                        self.sim.send(pid, "pong", nonce=m["nonce"])
            self._check_topos()

    @rule(slot=st.sampled_from(PIDS))
    def connection_closed(self, slot):
        """The transport saw the connection close (the process may still be alive)."""
        conn = f"conn-{self.pid(slot)}"
        self._guarded(lambda: self.sim._deliver(self.sim.core.on_disconnect(self.sim.now, conn)))

    @rule(slot=st.sampled_from(PIDS))
    def garbage(self, slot):
        """A peer sends bytes the decoder refuses: it is removed if it was registered."""
        pid = self.pid(slot)
        conn = f"conn-{pid}"
        if slot in self.alive:
            self._guarded(lambda: self.sim._deliver(self.sim.core.on_bad_input(self.sim.now, conn, "junk")))
            assert pid not in self.sim.core.peers
            self.alive.discard(slot)  # its process is broken: treat it as gone
            self.votes_open.pop(pid, None)
            self.connects.pop(pid, None)

    @rule()
    def restart_coordinator(self):
        """A new core; every live peer re-introduces itself with what it knows."""
        old = self.sim.core
        self.sim.core = Membership(self.sim.now, config=self.cfg, seed=2)
        self.sim.inbox.clear()
        self.votes_open.clear()  # their vote requests are resent by the link; here: dropped
        for s in sorted(self.alive):
            pid = self.pid(s)
            peer = old.peers.get(pid)
            if peer is None:
                continue
            last = self.last.get(pid)
            if last is not None:  # what the peer itself knows: its last topology
                ring_pos = [r[0] for r in last["peers"]].index(pid)
                self.sim.hello(pid, group=peer.group, claim="accepted", epoch=last["epoch"],
                               ring_pos=ring_pos, timeout=0.0)
            else:
                self.connects[pid] = self.sim.now + 5.0
                self.sim.hello(pid, group=peer.group, timeout=5.0, epoch=self.view.get(pid, ("", 0))[1])
        self._check_topos()

    # -- invariants
    @invariant()
    def nobody_waits_forever(self):
        now = self.sim.now
        for pid, deadline in self.votes_open.items():
            assert now <= deadline + 0.2, f"vote of {pid} never resolved"
        for pid, deadline in self.connects.items():
            assert now <= deadline + 0.2, f"connect of {pid} never resolved"

    @invariant()
    def table_consistent(self):
        core = self.sim.core
        ring_members = [pid for ring in core.rings.values() for pid in ring]
        assert sorted(ring_members) == sorted(core.accepted())
        assert len(set(ring_members)) == len(ring_members)
        assert set(core.votes) <= set(core.peers)
        assert set(core.probes) <= set(core.peers)
        if not core.recovering:
            assert not [p for p in core.peers.values() if p.state is PeerState.CLAIMED]
            if core.pending():
                assert core.accepted(), "pending peers in an empty run"
        assert not math.isnan(core.epoch)


MembershipMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMembershipMachine = MembershipMachine.TestCase
