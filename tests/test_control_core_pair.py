"""Daemon control cores paired with the coordinator's membership core: no sockets, no loop.

A coordinator restart, end to end: the daemons' heartbeats meet a new instance, its reset
makes them re-introduce themselves, and the ring is rebuilt from what they claim. A paused
coordinator: what was in flight is lost with the connections that closed meanwhile, and
the daemons' resends complete the round.
"""

from __future__ import annotations

import pytest

from pccl_py.coordinator.decision import Decision
from pccl_py.coordinator.membership import Membership, MembershipConfig
from pccl_py.daemon.control_core import JOIN, Actions, ChannelState, ControlCore
from pccl_py.retry import Backoff
from pccl_py.wire import control as protocol

pytestmark = pytest.mark.timeout(60)

NOW = 1024.0
S = ChannelState


def make(peer_id: str) -> ControlCore:
    return ControlCore(peer_id, group=0, data_addr=("127.0.0.1", 7001),
                       backoff=Backoff(initial=0.125, maximum=0.5, jitter=0.0, deadline=float("inf")))


def wire(d: Actions) -> list[dict]:
    return [protocol.decode(protocol.encode_msg(m)) for m in d.out]


class Pair:
    """Daemon cores and the coordinator's membership core, messages through the codec."""

    def __init__(self, *pids: str, grace: float = 0.0) -> None:
        self.now = NOW
        self.cores = {pid: make(pid) for pid in pids}
        self.coord = self._coordinator("c1", grace)
        self.settled: dict[str, list] = {}  # the waits each daemon's topologies completed
        self.sync_in: dict[str, list] = {}  # what reached each daemon's sync end

    def _coordinator(self, instance: str, grace: float) -> Membership:
        cfg = MembershipConfig(recovery_grace=grace, heartbeat_deadline=30.0)
        return Membership(self.now, config=cfg, instance=instance, seed=1)

    def restart(self, grace: float) -> None:
        self.coord = self._coordinator("c2", grace)

    def to_coord(self, pid: str, d: Actions) -> None:
        for m in wire(d):
            self.to_daemons(self.coord.on_message(self.now, pid, m))

    def to_daemons(self, d) -> None:
        for pid, m in d.out:
            if pid not in self.cores:  # a connection that is gone: nobody reads it
                continue
            m = protocol.decode(protocol.encode_msg(m))
            step = self.cores[pid].on_message(self.now, m)
            self.sync_in.setdefault(pid, []).extend(step.sync)
            self.to_coord(pid, step)
            if step.topology is not None:  # what the shell's apply loop does
                self.cores[pid].adopt(step.topology)
                self.settled.setdefault(pid, []).extend(self.cores[pid].applied().settle)

    def tick(self, dt: float) -> None:
        end = self.now + dt
        while self.now < end:
            self.now += 0.125
            for pid, core in self.cores.items():
                self.to_coord(pid, core.tick(self.now))
            self.to_daemons(self.coord.tick(self.now))


def test_restarted_coordinator_rebuilds_the_ring_from_the_reintroductions():
    pair = Pair("a", "b", "c")
    pair.to_coord("a", pair.cores["a"].connect(pair.now, 5.0))
    for pid in ("b", "c"):
        pair.to_coord(pid, pair.cores[pid].connect(pair.now, 5.0))
        for voter in [p for p, core in pair.cores.items() if core.state is S.ACCEPTED]:
            pair.to_coord(voter, pair.cores[voter].vote(pair.now, 5.0))
    epoch = pair.cores["a"].topology.epoch
    assert all(core.state is S.ACCEPTED for core in pair.cores.values())
    assert [p.peer_id for p in pair.cores["c"].topology.peers] == ["a", "b", "c"]
    for core, rev in zip(pair.cores.values(), (3, 3, 2), strict=True):
        core.revision = rev

    pair.restart(grace=1.0)  # a new instance knows nobody: the daemons' heartbeats get a reset
    pending = pair.cores["b"].vote(pair.now, 20.0)  # in flight across the restart
    pair.tick(0.25)
    assert all(core.instance == "c2" for core in pair.cores.values())
    assert {pid: p.revision for pid, p in pair.coord.peers.items()} == {"a": 3, "b": 3, "c": 2}
    assert {pid: p.claim_ring_pos for pid, p in pair.coord.peers.items()} == {"a": 0, "b": 1, "c": 2}
    assert "b" in pair.coord.votes  # the vote was resent to the new instance
    # every member of the last epoch (3 of 3) claimed: the window closed before its end,
    # and the claims became the ring, in their old order
    assert not pair.coord.recovering and pair.now < pair.coord.recover_until
    for core in pair.cores.values():
        assert core.state is S.ACCEPTED and core.topology.epoch > epoch
        assert [p.peer_id for p in core.topology.peers] == ["a", "b", "c"]
    assert pair.coord.accepted() == ["a", "b", "c"]
    assert pending.wait in pair.cores["b"].requests  # still waits: the others have not voted
    for pid in ("a", "c"):
        pair.to_coord(pid, pair.cores[pid].vote(pair.now, 5.0))
    assert (pending.wait, pair.cores["b"].topology) in pair.settled["b"]


def test_peer_that_misses_the_window_rejoins_as_pending_and_is_voted_in():
    pair = Pair("a", "b")
    pair.to_coord("a", pair.cores["a"].connect(pair.now, 5.0))
    pair.to_coord("b", pair.cores["b"].connect(pair.now, 5.0))
    pair.to_coord("a", pair.cores["a"].vote(pair.now, 5.0))
    assert pair.cores["b"].state is S.ACCEPTED

    pair.restart(grace=0.5)
    late = pair.cores.pop("b")  # b is cut off while the window is open
    pair.tick(1.0)
    assert pair.coord.accepted() == ["a"] and pair.cores["a"].state is S.ACCEPTED
    pair.cores["b"] = late
    pair.tick(0.25)
    assert late.state is S.PENDING and pair.coord.pending() == ["b"]
    assert late.vote(pair.now, 5.0).wait == JOIN  # its update_topology waits for admission
    pair.to_coord("a", pair.cores["a"].vote(pair.now, 5.0))
    assert late.state is S.ACCEPTED and (JOIN, late.topology) in pair.settled["b"]
    assert [p.peer_id for p in late.topology.peers] == ["a", "b"]


def formed(*pids: str) -> Pair:
    pair = Pair(*pids)
    pair.to_coord(pids[0], pair.cores[pids[0]].connect(pair.now, 5.0))
    for pid in pids[1:]:
        pair.to_coord(pid, pair.cores[pid].connect(pair.now, 5.0))
        for voter in [p for p, core in pair.cores.items() if core.state is S.ACCEPTED]:
            pair.to_coord(voter, pair.cores[voter].vote(pair.now, 5.0))
    assert all(core.state is S.ACCEPTED for core in pair.cores.values())
    pair.settled.clear()
    return pair


def test_answers_lost_with_the_closed_connections_come_again_after_the_resends():
    """The issue, without sockets: a paused coordinator reads the votes queued in its
    socket when it runs again and completes the round, but its answers to a and b go to
    connections that zmq is replacing, and are lost (c's arrives). a and b resend on their
    closed connections and are answered again: every vote completes, in that one round (c
    has moved on and will not vote again), at the same epoch."""
    pair = formed("a", "b", "c")
    epoch = pair.coord.epoch
    votes = {pid: core.vote(pair.now, 30.0) for pid, core in pair.cores.items()}
    pair.to_coord("c", votes["c"])
    for pid in ("a", "b"):
        for m in wire(votes[pid]):
            d = pair.coord.on_message(pair.now, pid, m)
    pair.to_daemons(Decision([(conn, m) for conn, m in d.out if conn == "c"], ""))
    assert not pair.coord.votes  # the round is complete on the coordinator's side
    assert pair.settled["c"] == [(JOIN, pair.cores["c"].topology), (votes["c"].wait, pair.cores["c"].topology)]
    assert all(votes[pid].wait in pair.cores[pid].requests for pid in ("a", "b"))  # a and b do not know
    pair.now += 0.25
    for pid in ("a", "b"):
        pair.to_coord(pid, pair.cores[pid].connection_lost(pair.now))
    for pid, v in votes.items():
        assert (v.wait, pair.cores[pid].topology) in pair.settled[pid]
        assert pair.cores[pid].requests == {} and pair.cores[pid].topology.epoch == epoch
    assert not pair.coord.votes and pair.coord.epoch == epoch  # no second round was opened


def test_a_vote_lost_on_the_way_counts_when_it_is_resent():
    pair = formed("a", "b")
    lost = pair.cores["a"].vote(pair.now, 30.0)  # written to a connection that closed unread
    other = pair.cores["b"].vote(pair.now, 30.0)
    pair.to_coord("b", other)
    assert set(pair.coord.votes) == {"b"}
    pair.to_coord("a", pair.cores["a"].connection_lost(pair.now + 0.25))
    assert (lost.wait, pair.cores["a"].topology) in pair.settled["a"]
    assert (other.wait, pair.cores["b"].topology) in pair.settled["b"]
    assert not pair.coord.votes


def test_what_comes_under_a_renamed_connection_is_asked_for_again():
    """zmq hands a reconnecting peer's routing id to its new connection and renames the old
    one: what the old one still carries arrives under a name the coordinator cannot place (a
    vote is dropped with a reset nobody reads), and a hello there even moves the peer to it.
    The peer's next message on its own connection gets a reset; its re-introduction is
    welcomed, and the welcome resends the vote."""
    pair = formed("a", "b")
    lost = pair.cores["a"].vote(pair.now, 30.0)
    for m in wire(lost):
        assert pair.coord.on_message(pair.now, "tmp-a", m).out[0][1]["type"] == "reset"
    pair.now += 1.0
    hello = pair.cores["a"].on_message(pair.now, {"type": "reset", "instance": "c1", "reason": "test"})
    for m in wire(hello):  # an earlier hello, also on the old connection
        pair.coord.on_message(pair.now, "tmp-a", m)
    assert pair.coord.peers["a"].conn == "tmp-a"
    other = pair.cores["b"].vote(pair.now, 30.0)
    pair.to_coord("b", other)
    assert set(pair.coord.votes) == {"b"}
    pair.tick(0.25)  # a's heartbeat on its own connection: reset, hello, welcome, the vote again
    assert pair.coord.peers["a"].conn == "a"
    assert (lost.wait, pair.cores["a"].topology) in pair.settled["a"]
    assert (other.wait, pair.cores["b"].topology) in pair.settled["b"]


def test_a_paused_coordinator_that_lost_a_sync_rounds_answers_to_one_peer_is_asked_again():
    """The round completes and the coordinator stops after b got its plan (in sync) and
    before its sync_complete (lost with the connection that closes meanwhile). b hears nothing, re-introduces itself, and
    the welcome makes it offer again: the coordinator answers a repeat of a round b
    completed at once, instead of b waiting out its sync deadline."""
    pair = Pair("a", "b")
    pair.to_coord("a", pair.cores["a"].connect(pair.now, 5.0))
    pair.to_coord("b", pair.cores["b"].connect(pair.now, 5.0))
    pair.to_coord("a", pair.cores["a"].vote(pair.now, 5.0))
    offer = {"type": "sync_offer", "round_hint": 0, "revision": 1, "strategy": "enforce_popular",
             "tensors": [["w", 4, b"\x07" * 16]], "host": "127.0.0.1", "port": 1, "timeout": 20.0}
    pair.to_coord("a", pair.cores["a"].sync_send(pair.now, dict(offer, port=1)))
    lost = pair.coord.on_message(pair.now, "b", protocol.decode(protocol.encode_msg(
        pair.cores["b"].sync_send(pair.now, dict(offer, port=2)).out[0])))
    assert {m["type"] for pid, m in lost.out if pid == "b"} == {"sync_plan", "sync_complete"}
    core_b = pair.cores["b"]
    plan = next(m for pid, m in lost.out if pid == "b" and m["type"] == "sync_plan")
    core_b.on_message(pair.now, protocol.decode(protocol.encode_msg(plan)))  # the plan came; the complete did not
    assert core_b.sync_offer is not None
    for _ in range(40):  # the coordinator is silent to b (stopped): b's clock runs on
        pair.now += 0.125
        pair.to_coord("b", core_b.tick(pair.now))  # it wakes for b's hellos: welcome, then the resend
        if core_b.sync_offer is None:
            break
    # b's sync waits for the sync_complete of its plan's round and takes no other round's
    completes = [m for m in pair.sync_in.get("b", []) if m["type"] == "sync_complete"]
    assert [m["round"] for m in completes] == [plan["round"]], completes
    assert core_b.sync_offer is None


def test_offers_and_votes_that_get_no_answer_go_again_at_growing_gaps():
    """An answer lost around a reconnection, with no re-introduction to make the daemon ask
    again: what waits goes again after 2 s, then 4, 8, 8 ...; each resend is answered again
    or ignored."""
    pair = Pair("a", "b")
    pair.to_coord("a", pair.cores["a"].connect(pair.now, 5.0))
    pair.to_coord("b", pair.cores["b"].connect(pair.now, 5.0))
    pair.to_coord("a", pair.cores["a"].vote(pair.now, 5.0))
    a = pair.cores["a"]
    vote = a.vote(pair.now, 60.0)  # waits for b, which computes
    pair.to_coord("a", vote)
    sent = []
    for _ in range(int(16 / 0.125)):
        pair.now += 0.125
        step = a.tick(pair.now)
        sent += [round(pair.now - NOW, 3) for m in wire(step) if m["type"] == "vote"]
        pair.to_coord("a", step)
    assert len(sent) == 3 and sent[1] - sent[0] == pytest.approx(4.0) and sent[2] - sent[1] == pytest.approx(8.0)
    assert pair.coord.votes["a"].req == vote.wait  # the same vote, counted once
    pair.to_coord("b", pair.cores["b"].vote(pair.now, 5.0))
    assert (vote.wait, a.topology) in pair.settled["a"]
