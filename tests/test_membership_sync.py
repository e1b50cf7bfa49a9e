"""Shared-state rounds hosted by the membership core, driven without sockets."""

from __future__ import annotations

import pytest

from pccl_py.coordinator.membership import Membership, MembershipConfig
from pccl_py.wire import control as protocol

pytestmark = pytest.mark.timeout(30)

H1, H2, H3 = b"\x01" * 16, b"\x02" * 16, b"\x03" * 16


class Sim:
    """A coordinator core and fake peers; every message crosses the real codec."""

    def __init__(self, cfg: MembershipConfig | None = None):
        self.now = 100.0
        self.core = Membership(self.now, config=cfg or MembershipConfig(recovery_grace=0.0), seed=1)
        self.inbox: dict[str, list[dict]] = {}
        self.port = 30000

    def deliver(self, decision) -> None:
        for conn, msg in decision.out:
            msg = protocol.decode(protocol.encode_msg(msg))
            self.inbox.setdefault(conn, []).append(msg)

    def send(self, pid: str, mtype: str, **fields) -> None:
        msg = protocol.decode(protocol.encode(mtype, **fields))
        self.deliver(self.core.on_message(self.now, pid, msg))  # conn = peer id

    def hello(self, pid: str, claim: str = "new", revision: int = -1, epoch: int = 0, ring_pos: int = -1) -> None:
        self.port += 1
        self.send(pid, "hello", peer_id=pid, group=0, host="127.0.0.1", port=self.port, claim=claim, epoch=epoch,
                  ring_pos=ring_pos, world=0, revision=revision, instance="", timeout=0.0)

    def join(self, *pids: str) -> None:
        """Register pids and admit them (the accepted peers vote)."""
        for p in pids:
            self.hello(p)
        for _ in range(3):
            if set(pids) <= set(self.core.accepted()):
                return
            for m in self.core.accepted():
                self.req = getattr(self, "req", 1000) + 1
                self.send(m, "vote", req=self.req, timeout=0.0, below=0, open=[])
        assert set(pids) <= set(self.core.accepted())

    def offer(self, pid: str, revision: int, rows, strategy: str = "enforce_popular", timeout: float = 30.0):
        self.send(pid, "sync_offer", round_hint=0, revision=revision, strategy=strategy,
                  tensors=[list(r) for r in rows], host="127.0.0.1", port=40000 + hash(pid) % 1000,
                  timeout=timeout)

    def done(self, pid: str, rnd: int, ok: bool = True) -> None:
        self.send(pid, "sync_done", round=rnd, ok=ok, rx_bytes=0, error="" if ok else "PeerLost",
                  message="" if ok else "sources failed")

    def take(self, pid: str, mtype: str) -> list[dict]:
        box = self.inbox.get(pid, [])
        got = [m for m in box if m["type"] == mtype]
        self.inbox[pid] = [m for m in box if m["type"] != mtype]
        return got

    def tick(self, dt: float) -> None:
        """Advance time in 0.1 s steps; live peers heartbeat."""
        end = self.now + dt
        while self.now < end - 1e-9:
            self.now = min(end, self.now + 0.1)
            for pid in list(self.core.peers):
                self.send(pid, "heartbeat", activity=None, epoch=self.core.epoch, revision=0, tx=0, rx=0, calls=[])
            self.deliver(self.core.tick(self.now))


def rows(*hashes: bytes):
    return [(f"t{i}", 100 * (i + 1), h) for i, h in enumerate(hashes)]


def sync_all(sim: Sim, offers: dict[str, tuple[int, list]]) -> dict[str, dict]:
    """Everyone offers; fetchers report success; returns each peer's plan (+ 'complete')."""
    for pid, (rev, r) in offers.items():
        sim.offer(pid, rev, r)
    plans = {}
    for pid in offers:
        got = sim.take(pid, "sync_plan")
        assert len(got) == 1, (pid, got)
        plans[pid] = got[0]
    for pid, plan in plans.items():
        if plan["status"] == "fetch":
            sim.done(pid, plan["round"])
    for pid, plan in plans.items():
        if plan["status"] != "error":
            comp = sim.take(pid, "sync_complete")
            assert len(comp) == 1 and comp[0]["round"] == plan["round"], (pid, comp)
            plan["complete"] = comp[0]
    return plans


def test_peers_in_step_then_newcomer_fetches_from_every_up_to_date_peer():
    sim = Sim()
    sim.join("a")
    sim.join("b", "c")
    plans = sync_all(sim, {p: (0, rows(H1, H2)) for p in "abc"})
    assert {p["status"] for p in plans.values()} == {"in_sync"}
    assert all(p["complete"]["status"] == "ok" and p["complete"]["revision"] == 0 for p in plans.values())
    assert sim.core.sync.book == {"a": 0, "b": 0, "c": 0}
    plans = sync_all(sim, {p: (1, rows(H1, H2)) for p in "abc"})
    assert {p["status"] for p in plans.values()} == {"in_sync"}
    sim.join("n")
    # the newcomer offers revision 0 with other content; the established peers' state wins
    plans = sync_all(sim, {"a": (2, rows(H1, H2)), "b": (2, rows(H1, H2)), "c": (2, rows(H1, H2)),
                           "n": (0, rows(H3, H2))})
    n = plans["n"]
    assert n["status"] == "fetch" and n["revision"] == 2
    assert sorted(s[0] for s in n["sources"]) == ["a", "b", "c"]
    assert n["tensors"] == [["t0", 100, H1]]  # only the differing tensor moves
    assert n["complete"]["status"] == "ok"
    assert all(plans[p]["status"] == "in_sync" for p in "abc")
    assert sim.core.sync.book == {"a": 2, "b": 2, "c": 2, "n": 2}


def test_revision_error_for_one_peer_alone():
    sim = Sim()
    sim.join("a", "b", "c")
    sync_all(sim, {p: (0, rows(H1)) for p in "abc"})
    sim.offer("a", 1, rows(H1))
    sim.offer("b", 1, rows(H1))
    sim.offer("c", 5, rows(H1))  # skipped revisions
    (err,) = sim.take("c", "sync_plan")
    assert err["status"] == "error" and err["error"] == "RevisionError"
    assert "expected revision 1" in err["message"] and "offered 5" in err["message"]
    for p in "ab":
        (plan,) = sim.take(p, "sync_plan")
        assert plan["status"] == "in_sync" and plan["revision"] == 1
        (comp,) = sim.take(p, "sync_complete")
        assert comp["status"] == "ok"
    assert sim.take("c", "sync_complete") == []
    assert sim.core.sync.book == {"a": 1, "b": 1, "c": 0}  # c's retry offers 1 again


def test_member_dies_mid_round_round_resolves():
    sim = Sim(MembershipConfig(recovery_grace=0.0, heartbeat_deadline=1.0))
    sim.join("a", "b", "c")
    sim.offer("a", 0, rows(H1))
    sim.offer("b", 0, rows(H1))
    assert sim.take("a", "sync_plan") == []  # waits for c
    # c goes silent: removed at the heartbeat deadline, the round no longer waits for it
    end = sim.now + 1.5
    while sim.now < end:
        sim.now += 0.1
        for p in "ab":
            sim.send(p, "heartbeat", activity="sync_shared_state", epoch=sim.core.epoch, revision=0, tx=0, rx=0, calls=[])
        sim.deliver(sim.core.tick(sim.now))
    assert "c" not in sim.core.peers
    for p in "ab":
        (plan,) = sim.take(p, "sync_plan")
        assert plan["status"] == "in_sync"
        (comp,) = sim.take(p, "sync_complete")
        assert comp["status"] == "ok"


def test_fetcher_leaves_mid_transfer_others_complete():
    sim = Sim()
    sim.join("a", "b")
    sim.join("n")
    sync_all(sim, {p: (0, rows(H1)) for p in "ab"} | {"n": (0, rows(H1))})
    sim.offer("a", 1, rows(H2))
    sim.offer("b", 1, rows(H2))
    sim.offer("n", 1, rows(H1))
    (plan,) = sim.take("n", "sync_plan")
    assert plan["status"] == "fetch"
    assert sim.take("a", "sync_complete") == []  # sources serve until the fetcher reports
    sim.send("n", "leave", reason="bye")
    for p in "ab":
        (comp,) = sim.take(p, "sync_complete")
        assert comp["status"] == "ok" and comp["revision"] == 1
    assert "n" not in sim.core.sync.book


def test_pending_peer_is_refused_and_late_member_waits_for_next_round():
    sim = Sim()
    sim.join("a", "b")
    sim.hello("p")  # pending
    sim.offer("p", 0, rows(H1))
    (err,) = sim.take("p", "sync_plan")
    assert err["status"] == "error" and err["error"] == "InvalidUsage" and "connect first" in err["message"]
    # a round is collecting when p is admitted: p's offer waits for the next round
    sim.offer("a", 0, rows(H1))
    sim.send("a", "vote", req=2001, timeout=0.0, below=0, open=[])  # (after the votes of join(): a daemon counts up)
    sim.send("b", "vote", req=2002, timeout=0.0, below=0, open=[])
    assert "p" in sim.core.accepted()
    sim.offer("p", 0, rows(H2))
    assert sim.take("p", "sync_plan") == []
    sim.offer("b", 0, rows(H1))
    for q in "ab":
        assert sim.take(q, "sync_plan")[0]["status"] == "in_sync"
        assert sim.take(q, "sync_complete")[0]["status"] == "ok"
    # the held offer opened the next round, which has all three members
    assert sim.take("p", "sync_plan") == []
    sim.offer("a", 1, rows(H1))
    sim.offer("b", 1, rows(H1))
    (plan,) = sim.take("p", "sync_plan")
    assert plan["status"] == "fetch" and plan["revision"] == 1


def test_offer_during_transfer_is_held_then_replayed():
    sim = Sim()
    sim.join("a", "b")
    sync_all(sim, {"a": (0, rows(H1)), "b": (0, rows(H1))})
    sim.offer("a", 1, rows(H2))
    sim.offer("b", 1, rows(H1))  # tie of one each: smallest key bytes wins (H1)
    pa, pb = sim.take("a", "sync_plan")[0], sim.take("b", "sync_plan")[0]
    fetcher = "a" if pa["status"] == "fetch" else "b"
    other = "b" if fetcher == "a" else "a"
    # the in-sync peer's call returns only at completion; an offer now belongs to the next round
    sim.offer(other, 2, rows(H1))
    assert sim.take(other, "sync_plan") == []
    sim.done(fetcher, (pa if fetcher == "a" else pb)["round"])
    assert sim.take(other, "sync_complete")[0]["status"] == "ok"
    sim.offer(fetcher, 2, rows(H1))
    for p in "ab":
        (plan,) = sim.take(p, "sync_plan")
        assert plan["status"] == "in_sync" and plan["revision"] == 2


def test_an_offer_repeated_while_its_round_transfers_is_ignored_not_held():
    """A daemon resends its offer after a re-introduction or when no answer came (the
    coordinator may have dropped it, or its answer was lost); one the round already has
    must not be held for the next round as a new offer: its plan goes again. Repeats after
    the round ended are answered under that round's id."""
    sim = Sim()
    sim.join("a", "b")
    sync_all(sim, {"a": (0, rows(H1)), "b": (0, rows(H1))})
    sim.offer("a", 1, rows(H2))
    sim.offer("b", 1, rows(H1))
    pa, pb = sim.take("a", "sync_plan")[0], sim.take("b", "sync_plan")[0]
    fetcher, plan = ("a", pa) if pa["status"] == "fetch" else ("b", pb)
    other = "b" if fetcher == "a" else "a"
    first = (pb if other == "b" else pa)
    sim.offer(other, 1, rows(H1) if other == "b" else rows(H2))  # the same offer again
    assert sim.take(other, "sync_plan") == [first]  # its plan again (it may have been what was lost)
    sim.done(fetcher, plan["round"])
    for p in "ab":
        assert sim.take(p, "sync_complete")[0]["status"] == "ok"
    # a report repeated after the round ended (its sync_complete was lost): told again, same round
    sim.done(fetcher, plan["round"])
    (again,) = sim.take(fetcher, "sync_complete")
    assert again["round"] == plan["round"] and again["status"] == "ok" and again["revision"] == 1
    # an offer repeated after the round ended: in sync, under that round's id
    sim.offer(other, 1, rows(H1) if other == "b" else rows(H2))
    assert [m["round"] for m in sim.take(other, "sync_complete")] == [plan["round"]]
    sim.take(other, "sync_plan")
    # nothing was held: the next offers open a fresh round that waits for both
    sim.offer("a", 2, rows(H1))
    assert sim.take("a", "sync_plan") == []
    sim.offer("b", 2, rows(H1))
    for p in "ab":
        (nxt,) = sim.take(p, "sync_plan")
        assert nxt["status"] == "in_sync" and nxt["revision"] == 2


def test_timeout_names_the_missing_peer():
    sim = Sim()
    sim.join("a", "b")
    sim.offer("a", 0, rows(H1), timeout=1.0)
    sim.tick(1.2)
    (err,) = sim.take("a", "sync_plan")
    assert err["error"] == "DeadlineExceeded" and "b" in err["message"]


def test_restart_rebuilds_the_revision_book_from_reintroductions():
    sim = Sim(MembershipConfig(recovery_grace=1.0))
    sim.hello("a", claim="accepted", revision=7, epoch=5, ring_pos=0)
    sim.hello("b", claim="accepted", revision=7, epoch=5, ring_pos=1)
    sim.offer("a", 8, rows(H1))  # a sync offer re-sent during the recovery window is held
    assert sim.take("a", "sync_plan") == []
    sim.tick(1.1)
    assert sorted(sim.core.accepted()) == ["a", "b"]
    assert sim.core.sync.book == {"a": 7, "b": 7}
    sim.offer("b", 9, rows(H1))
    (err,) = sim.take("b", "sync_plan")
    assert err["error"] == "RevisionError" and "expected revision 8" in err["message"]
    # b's refusal leaves a as the round's only offer: a completes revision 8, b stays at 7
    assert sim.take("a", "sync_plan")[0]["status"] == "in_sync"
    assert sim.take("a", "sync_complete")[0]["revision"] == 8
    assert sim.core.sync.book == {"a": 8, "b": 7}
    sim.offer("b", 8, rows(H1))  # b's retry with the right revision; a is at 9 by now
    sim.offer("a", 9, rows(H1))
    for p in "ab":  # same content: b is in sync (nothing moves) and both are at 9
        assert sim.take(p, "sync_plan")[0]["status"] == "in_sync"
    assert sim.core.sync.book == {"a": 9, "b": 9}


def test_a_repeated_sync_whose_answers_were_lost_is_told_in_sync_at_once():
    """A peer whose sync completed at the coordinator but whose plan or completion was lost
    (the coordinator was stopped while they travelled) offers the same revision again: it
    is in sync at that revision, alone and at once, and the run goes on to the next one.
    The same revision with other content is still a revision error."""
    sim = Sim()
    sim.join("a", "b")
    sync_all(sim, {"a": (0, rows(H1)), "b": (0, rows(H2))})  # a tie: one of them fetched
    plans = sync_all(sim, {"a": (1, rows(H1)), "b": (1, rows(H1))})
    assert {p["status"] for p in plans.values()} == {"in_sync"}
    sim.offer("a", 1, rows(H1))  # a's answers for revision 1 never arrived
    (plan,) = sim.take("a", "sync_plan")
    (done,) = sim.take("a", "sync_complete")
    assert plan["status"] == "in_sync" and plan["revision"] == 1
    assert done["status"] == "ok" and done["round"] == plan["round"] and done["revision"] == 1
    assert sim.take("b", "sync_plan") == [] and sim.core.sync.book == {"a": 1, "b": 1}
    plans = sync_all(sim, {"a": (2, rows(H1)), "b": (2, rows(H1))})  # both go on, in step
    assert {p["status"] for p in plans.values()} == {"in_sync"}
    sim.offer("b", 2, rows(H3))  # revision 2 again, but not the state elected for it
    sim.offer("a", 3, rows(H1))
    (err,) = sim.take("b", "sync_plan")
    assert err["error"] == "RevisionError"


def test_a_lockstep_mismatch_ends_the_sync_that_waits_for_the_voter():
    """a and b sync while c votes in update_topology: the coordinator aborts them for the
    mismatch, and their syncs end with Aborted at once instead of at the round's deadline
    (a round cannot complete while one of its members waits elsewhere)."""
    from pccl_py.coordinator.membership import UPDATE_TOPOLOGY

    sim = Sim()
    sim.join("a", "b", "c")
    sim.offer("a", 0, rows(H1), timeout=60.0)
    sim.offer("b", 0, rows(H1), timeout=60.0)
    sim.send("c", "vote", req=7, timeout=30.0, below=0, open=[])
    for _ in range(40):  # 4 s of heartbeats saying what each peer does
        sim.now += 0.1
        for pid, act in (("a", "sync_shared_state"), ("b", "sync_shared_state"), ("c", UPDATE_TOPOLOGY)):
            sim.send(pid, "heartbeat", activity=act, epoch=sim.core.epoch, revision=0, tx=0, rx=0, calls=[])
        sim.deliver(sim.core.tick(sim.now))
    for p in "ab":
        assert sim.take(p, "abort"), p
        (plan,) = sim.take(p, "sync_plan")
        assert plan["status"] == "error" and plan["error"] == "Aborted" and "lockstep mismatch" in plan["message"]
    assert sim.core.sync.rounds == {}  # within 4 s, where the round's own deadline was 60 s
