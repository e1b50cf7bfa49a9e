"""The daemon's control core, driven without sockets or an event loop.

Every message into the core and out of it crosses the real codec (the core speaks the
schema). tests/test_control_core_pair.py pairs daemon cores with the coordinator's core.
"""

from __future__ import annotations

import logging
import re

import pytest

from pccl_py.daemon.control_core import JOIN, LEAVE, Actions, ChannelState, ControlCore
from pccl_py.errors import (
    Aborted,
    AuthenticationFailed,
    CoordinatorUnavailable,
    DeadlineExceeded,
    InternalError,
    InvalidUsage,
    PcclError,
    PeerLost,
    ProtocolError,
)
from pccl_py.retry import Backoff
from pccl_py.wire import control as protocol

pytestmark = pytest.mark.timeout(60)

NOW = 1024.0  # powers of two below keep every time sum exact
# no jitter: the pace of re-introductions is exact (0.125, 0.25, 0.5, 0.5, ...)
BACKOFF = Backoff(initial=0.125, maximum=0.5, factor=2.0, jitter=0.0, deadline=float("inf"))
S = ChannelState


def make(peer_id: str = "p1", **kw) -> ControlCore:
    opts = dict(group=3, data_addr=("127.0.0.1", 7001), coordinator="127.0.0.1:5555",
                heartbeat_interval=0.5, coordinator_timeout=3.0, backoff=BACKOFF)
    opts.update(kw)
    return ControlCore(peer_id, **opts)


def wire(d: Actions) -> list[dict]:
    """The decision's messages as the coordinator would decode them."""
    return [protocol.decode(protocol.encode_msg(m)) for m in d.out]


def types(d: Actions) -> list[str]:
    return [m["type"] for m in wire(d)]


def msg(mtype: str, **fields) -> dict:
    return protocol.decode(protocol.encode(mtype, **fields))


def welcome(state: str = "accepted", instance: str = "c1", peer_id: str = "p1", hb: float = 0.5) -> dict:
    return msg("welcome", instance=instance, peer_id=peer_id, state=state, heartbeat_interval=hb,
               heartbeat_deadline=3.0, reason="registered")


def topology(epoch: int = 1, peers: tuple[str, ...] = ("p1",), instance: str = "c1", req: int = 0,
             world_size: int | None = None) -> dict:
    rows = [[p, "127.0.0.1", 7000 + i] for i, p in enumerate(peers)]
    return msg("topology", instance=instance, epoch=epoch, group=3, peers=rows,
               world_size=len(peers) if world_size is None else world_size, num_groups=1,
               req=req, reason="test", round=5)


def apply(core: ControlCore, topo_msg: dict) -> tuple[Actions, Actions]:
    """What the shell's apply loop does with a queued topology (on_topology returns at once)."""
    return core.adopt(topo_msg), core.applied()


def joined(core: ControlCore | None = None, now: float = NOW, epoch: int = 1,
           peers: tuple[str, ...] = ("p1",)) -> ControlCore:
    """A member of instance c1 at ``epoch``."""
    core = core or make()
    core.connect(now, 5.0)
    core.on_message(now, welcome())
    d = core.on_message(now, topology(epoch, peers))
    apply(core, d.topology)
    assert core.state is S.ACCEPTED
    return core


def offer(timeout: float, revision: int = 0) -> dict:
    return {"type": "sync_offer", "round_hint": 0, "revision": revision, "strategy": "enforce_popular",
            "tensors": [["w", 4, b"\x07" * 16]], "host": "127.0.0.1", "port": 1, "timeout": timeout}


DONE = {"type": "sync_done", "round": 1, "ok": True, "rx_bytes": 0, "error": "", "message": ""}


def hellos(d: Actions) -> list[dict]:
    return [m for m in wire(d) if m["type"] == "hello"]


# ---------------------------------------------------------------------- registration


def test_connect_registers_and_the_first_topology_admits():
    core = make()
    d = core.connect(NOW, 5.0)
    assert core.state is S.PENDING and d.wait == JOIN and d.registering
    [hello] = wire(d)
    assert hello["type"] == "hello" and hello["peer_id"] == "p1" and hello["group"] == 3
    assert (hello["host"], hello["port"]) == ("127.0.0.1", 7001)
    assert hello["claim"] == "new" and hello["epoch"] == 0 and hello["ring_pos"] == -1
    assert hello["timeout"] == 5.0 and hello["revision"] == -1 and hello["instance"] == ""
    assert "ts" not in hello and "proof" not in hello  # CURVE authenticates the connection

    d = core.on_message(NOW + 0.01, welcome(hb=0.25))
    assert core.instance == "c1" and core.coord_hb == 0.25
    assert core.state is S.PENDING and d.out == [] and d.settle == []  # welcomed, not yet admitted

    d = core.on_message(NOW + 0.02, topology(1, ("p0", "p1"), world_size=5))
    assert d.topology is not None and core.state is S.PENDING  # queued: the shell applies it
    adopt, done = apply(core, d.topology)
    assert core.state is S.ACCEPTED
    topo = adopt.apply
    assert topo is not None and topo.epoch == 1 and topo.rank == 1 and topo.world_size == 5
    assert [p.peer_id for p in topo.peers] == ["p0", "p1"] and topo.peers[0].port == 7000
    assert done.settle == [(JOIN, topo)]

    d = core.connect(NOW + 1, 5.0)  # a member already: nothing to wait for, nothing sent
    assert d.wait is None and d.out == [] and "already a member" in d.reason


def test_a_queued_topology_without_this_peer_is_ignored_not_an_error():
    """A topology queued for an identity this daemon no longer has (removed, then rejoined
    under a new peer id before the queue reached it) is dropped with a reason; the waits of
    the current membership stay in place and the current topology is kept."""
    core = joined(epoch=2, peers=("p0", "p1"))
    d = core.adopt(topology(3, ("p0", "p9")).copy())
    assert d.apply is None and d.fail == [] and d.settle == []
    assert "does not include this peer p1" in d.reason and d.level == logging.INFO
    assert core.topology.epoch == 2 and core.state is S.ACCEPTED
    d = core.applied()  # the shell calls it after every adopt: nothing was being adopted
    assert d.settle == []


def test_connect_that_gives_up_announces_a_leave_and_goes_idle():
    core = make()
    core.connect(NOW, 1.0)
    d = core.connect_failed(DeadlineExceeded("not admitted"))
    assert core.state is S.IDLE
    assert wire(d) == [{"type": "leave", "reason": "connect() gave up waiting"}]

    core.connect(NOW + 2, 1.0)
    d = core.connect_failed(InvalidUsage("refused"))  # not a deadline: nothing to announce
    assert core.state is S.IDLE and d.out == []
    core.connect(NOW + 4, 1.0)
    assert core.state is S.PENDING


def test_registration_refused_or_failed_by_the_coordinator():
    core = make()
    core.connect(NOW, 5.0)
    d = core.on_message(NOW, msg("refused", reason="run is full (4096 peers)"))
    assert core.state is S.IDLE and d.level == logging.ERROR
    [(key, exc)] = d.fail
    assert key == JOIN and isinstance(exc, InvalidUsage) and "full" in str(exc)

    core.connect(NOW + 1, 5.0)
    d = core.on_message(NOW + 1, msg("error", req=0, error="DeadlineExceeded", message="not admitted in time"))
    assert core.state is S.IDLE
    [(key, exc)] = d.fail
    assert key == JOIN and type(exc) is DeadlineExceeded and str(exc) == "not admitted in time"


# ---------------------------------------------------------------------- heartbeats and silence


def test_heartbeats_only_while_registered_with_epoch_revision_and_activity():
    core = make()
    assert core.tick(NOW, "all_reduce tag=1").out == []  # not registered yet
    joined(core, epoch=4)
    core.revision = 9
    [hb] = wire(core.tick(NOW + 0.5, "x" * 300))
    assert hb == {"type": "heartbeat", "activity": "x" * 256, "epoch": 4, "revision": 9, "tx": 0, "rx": 0,
                  "calls": []}
    [hb] = wire(core.tick(NOW + 1.0, None))
    assert hb["activity"] is None


def test_silent_coordinator_is_reintroduced_at_the_pace_of_the_backoff():
    core = joined()
    step = 0.0625
    sent: list[float] = []
    warnings = 0
    for k in range(1, 73):  # 4.5 s of ticks, the coordinator silent throughout
        now = NOW + k * step
        d = core.tick(now)
        assert types(d)[0] == "heartbeat"
        warnings += "re-introducing until it answers" in d.reason
        for h in hellos(d):
            assert h["claim"] == "accepted" and h["epoch"] == 1 and h["ring_pos"] == 0
            assert h["instance"] == "c1" and h["timeout"] == 0.0
            sent.append(now - NOW)
    # silent for more than coordinator_timeout (3 s) first at 3.0625; then 0.125, 0.25, 0.5, 0.5
    assert sent == [3.0625, 3.1875, 3.4375, 3.9375, 4.4375]
    assert warnings == 1
    assert isinstance(core.wait_expired(NOW + 4.5, "update_topology"), CoordinatorUnavailable)

    d = core.on_message(NOW + 4.5, msg("hb", instance="c1", epoch=1))
    assert "answers again" in d.reason and d.level == logging.INFO and core.reintro is None
    assert d.out == []  # the same instance: no re-introduction needed
    for k in range(1, 40):  # it keeps talking: heartbeats only
        now = NOW + 4.5 + k * step
        if k % 8 == 0:
            core.on_message(now, msg("hb", instance="c1", epoch=1))
        assert types(core.tick(now)) == ["heartbeat"]

    # silent again: the pace starts over from the backoff's first delay
    last = core.last_rx
    sent = []
    for k in range(1, 65):
        d = core.tick(last + k * step)
        sent += [last + k * step - last for _ in hellos(d)]
    assert sent == [3.0625, 3.1875, 3.4375, 3.9375]


def test_wait_expired_blames_the_coordinator_only_when_it_is_silent():
    core = make()
    exc = core.wait_expired(NOW, "connect")  # never heard from it
    assert isinstance(exc, CoordinatorUnavailable) and "127.0.0.1:5555" in str(exc)
    core.connect(NOW, 5.0)
    core.on_message(NOW, welcome(state="pending", hb=0.5))
    exc = core.wait_expired(NOW + 1.0, "connect")  # it talks (within 2.5 heartbeats)
    assert type(exc) is DeadlineExceeded and "update_topology in time" in str(exc)
    exc = core.wait_expired(NOW + 1.0, "are_peers_pending")
    assert type(exc) is DeadlineExceeded and str(exc).startswith("are_peers_pending:")
    assert isinstance(core.wait_expired(NOW + 1.3, "connect"), CoordinatorUnavailable)  # > 2.5 x 0.5 s


# ---------------------------------------------------------------------- failed CURVE handshakes

REFUSED = "the coordinator at 127.0.0.1:5555 refused this daemon's credentials: is PCCL_SECRET the same on both?"


def test_a_registering_connect_fails_typed_after_two_failed_handshakes_not_at_its_deadline():
    core = make(redial_backoff=Backoff(initial=0.125, maximum=0.5, factor=2.0, jitter=0.0, deadline=float("inf")))
    core.connect(NOW, 30.0)
    d = core.handshake_failed(NOW + 0.01, REFUSED)
    assert d.fail == [] and core.state is S.PENDING  # one may be a coordinator going down mid-handshake
    assert d.redial == 0.125 and d.level == logging.WARNING and REFUSED in d.reason
    d = core.handshake_failed(NOW + 0.2, REFUSED)
    [(key, exc)] = d.fail
    assert key == JOIN and type(exc) is AuthenticationFailed and str(exc) == REFUSED
    assert isinstance(exc, InvalidUsage)  # retrying fails the same way until the secrets match
    assert core.state is S.IDLE and d.out == [] and d.redial == 0.25
    assert d.level == logging.INFO  # the warning went out with the first failure
    # a later connect() fails at the next failed handshake: the count carries over
    core.connect(NOW + 1, 30.0)
    assert type(core.handshake_failed(NOW + 1.1, REFUSED).fail[0][1]) is AuthenticationFailed
    assert isinstance(core.wait_expired(NOW + 2, "connect"), CoordinatorUnavailable)
    assert REFUSED in str(core.wait_expired(NOW + 2, "connect"))


def test_a_member_keeps_its_membership_through_failed_handshakes_and_warns_every_ten_seconds():
    core = joined(epoch=3, peers=("p0", "p1"))
    warned = []
    for k in range(60):  # an impostor on the coordinator's address for 30 s
        now = NOW + 0.5 * k
        d = core.handshake_failed(now, REFUSED)
        assert d.fail == [] and d.redial is not None and d.redial <= 1.2  # 1 s, jittered
        if d.level >= logging.WARNING:
            warned.append((now, d.reason))
    assert core.state is S.ACCEPTED and core.topology.epoch == 3
    assert [w[0] - NOW for w in warned] == [0.0, 10.0, 20.0]
    assert warned[1][1].endswith("(20 failed handshakes in the last 10 s)")
    d = core.handshake_succeeded(NOW + 31)  # the run's coordinator is back
    assert d.level == logging.INFO and "succeeded after 60" in d.reason
    assert core.handshake_failures == 0
    d = core.handshake_failed(NOW + 32, REFUSED)
    assert d.level == logging.WARNING and d.redial < 0.2  # a new episode: warned at once, dialed soon


# ---------------------------------------------------------------------- coordinator restarts


def test_new_instance_gets_a_member_hello_then_the_requests_in_flight():
    core = joined(epoch=6, peers=("p0", "p1"))
    core.revision = 7
    vote = core.vote(NOW, 10.0)
    query = core.pending_query()
    sync = offer(30.0, revision=8)
    core.sync_send(NOW, sync)
    assert (vote.wait, query.wait) == (1, 2)

    d = core.on_message(NOW + 1, msg("hb", instance="c2", epoch=0))  # a restarted coordinator
    [hello] = hellos(d)
    assert hello["peer_id"] == "p1" and hello["group"] == 3 and hello["claim"] == "accepted"
    assert hello["epoch"] == 6 and hello["ring_pos"] == 1 and hello["revision"] == 7
    assert hello["instance"] == "c1" and hello["timeout"] == 0.0
    d = core.on_message(NOW + 1.1, msg("hb", instance="c2", epoch=0))  # once per 0.2 s
    assert d.out == [] and "held back" in d.reason
    d = core.on_message(NOW + 1.1, topology(9, ("p1",), instance="c2"))  # not welcomed by c2 yet
    assert d.topology is None and d.out == []

    d = core.on_message(NOW + 1.2, welcome(state="recovering", instance="c2"))
    assert core.state is S.RECOVERING and core.instance == "c2"
    assert wire(d) == [
        {"type": "vote", "req": 1, "timeout": pytest.approx(8.8), "below": 0, "open": []},  # what its caller has left
        {"type": "pending_q", "req": 2},
        protocol.decode(protocol.encode_msg(sync)),
    ]
    assert "resent requests [1, 2]" in d.reason
    assert core.on_message(NOW + 1.3, welcome(state="recovering", instance="c2")).out == []  # duplicate

    assert core.connect(NOW + 1.3, 5.0).wait == JOIN  # a member waits for the rebuilt topology
    d = core.on_message(NOW + 2, topology(7, ("p0", "p1"), instance="c2", req=1))
    adopt, done = apply(core, d.topology)
    assert core.state is S.ACCEPTED and adopt.apply is not None and adopt.apply.epoch == 7
    assert (1, adopt.apply) in done.settle and (JOIN, adopt.apply) in done.settle
    assert 2 in core.requests and 1 not in core.requests  # the question still waits for its answer
    d = core.on_message(NOW + 2, msg("pending_a", req=2, pending=False))
    assert d.settle == [(2, False)] and core.requests == {}


def test_a_closed_connection_resends_the_requests_in_flight_with_the_time_left():
    """What went out on a connection that closed may be lost (a paused coordinator's zmq drops
    it, and the answers it sends to a connection being replaced), and the coordinator
    answers a repeat as it answered the first: so everything in flight goes out again."""
    core = joined()
    vote = core.vote(NOW, 8.0)
    forever = core.vote(NOW, 0.0)  # no deadline
    query = core.pending_query()
    d = core.connection_lost(NOW + 2)
    assert wire(d) == [
        {"type": "vote", "req": vote.wait, "timeout": 6.0, "below": 0, "open": []},
        {"type": "vote", "req": forever.wait, "timeout": 0.0, "below": 0, "open": []},
        {"type": "pending_q", "req": query.wait},
    ]
    assert d.level == logging.INFO and "connection closed" in d.reason
    assert core.instance == "c1" and core.state is S.ACCEPTED  # no re-introduction needed
    d = core.connection_lost(NOW + 8)  # past the first vote's deadline: its caller gives up now
    assert [m["req"] for m in wire(d)] == [forever.wait, query.wait]
    core.forget(forever.wait)
    core.forget(query.wait)
    core.forget(vote.wait)
    d = core.connection_lost(NOW + 9)
    assert d.out == [] and "nothing in flight" in d.reason
    core.close()
    assert core.connection_lost(NOW + 9).out == []


def test_a_reintroduction_to_the_same_instance_resends_the_requests_once():
    """The coordinator drops what comes on a connection it cannot place (zmq renames the old
    connection of a peer that reconnected) and asks for a re-introduction: what it dropped may
    have been a request, so the welcome that answers the hello resends them, once per hello."""
    core = joined()
    vote = core.vote(NOW, 4.0)
    d = core.on_message(NOW + 1, msg("reset", instance="c1", reason="unknown connection"))
    assert [h["claim"] for h in hellos(d)] == ["accepted"]
    d = core.on_message(NOW + 1, welcome())
    assert wire(d) == [{"type": "vote", "req": vote.wait, "timeout": 3.0, "below": 0, "open": []}] and "welcomed again" in d.reason
    assert core.on_message(NOW + 1, welcome()).out == []  # a second welcome for the same hello
    core.forget(vote.wait)
    core.on_message(NOW + 2, msg("reset", instance="c1", reason="unknown connection"))
    assert core.on_message(NOW + 2, welcome()).out == []  # nothing in flight


def test_a_reintroduction_to_the_same_instance_resends_the_sync_offer_and_the_fetch_report():
    """A sync offer (or a fetch report) sent on a connection the coordinator could not place
    is dropped there; the round would wait for it until its deadline. The welcome that
    answers the re-introduction sends it again, until its plan (or sync_complete) came."""
    core = joined()
    core.sync_send(NOW, offer(20.0))
    core.on_message(NOW + 1, msg("reset", instance="c1", reason="unknown connection"))
    d = core.on_message(NOW + 1, welcome())
    assert [m["type"] for m in wire(d)] == ["sync_offer"] and "resent the sync offer" in d.reason
    plan = msg("sync_plan", round=4, status="fetch", revision=1, sources=[], tensors=[], error="", message="")
    core.on_message(NOW + 2, plan)
    core.sync_send(NOW + 3, dict(DONE, round=4))
    core.on_message(NOW + 4, msg("reset", instance="c1", reason="unknown connection"))
    d = core.on_message(NOW + 4, welcome())
    assert [m["type"] for m in wire(d)] == ["sync_done"] and "resent the fetch report" in d.reason
    core.on_message(NOW + 5, msg("sync_complete", round=4, status="ok", revision=1, error="", message=""))
    core.on_message(NOW + 6, msg("reset", instance="c1", reason="unknown connection"))
    assert core.on_message(NOW + 6, welcome()).out == []  # nothing waits for an answer any more


def test_an_answer_completes_its_vote_and_older_ones_never_a_later_one():
    core = joined()
    first = core.vote(NOW, 5.0)
    _, done = apply(core, core.on_message(NOW, topology(1, req=first.wait)).topology)
    assert (first.wait, core.topology) in done.settle
    # the first vote was resent before its answer came; the coordinator answers the repeat
    # too, and that answer arrives while the next update_topology waits: it is not its answer
    second = core.vote(NOW, 5.0)
    _, done = apply(core, core.on_message(NOW, topology(1, req=first.wait)).topology)
    assert done.settle == [(JOIN, core.topology)] and second.wait in core.requests
    third = core.vote(NOW, 5.0)  # two threads voting: the coordinator keeps the later vote
    _, done = apply(core, core.on_message(NOW, topology(1, req=third.wait)).topology)
    assert {key for key, _ in done.settle} == {JOIN, second.wait, third.wait} and core.requests == {}


def test_expired_sync_offer_is_not_resent_and_sync_complete_ends_the_offer():
    core = joined()
    core.sync_send(NOW, offer(2.0))
    d = core.on_message(NOW + 3, welcome(state="recovering", instance="c2"))
    assert d.out == []  # its caller gave up a second ago
    core.sync_send(NOW + 3, offer(0.0))
    assert core.sync_offer is not None and core.sync_offer[1] == NOW + 3 + 600.0  # no timeout: 600 s
    plan = msg("sync_plan", round=4, status="in_sync", revision=0, sources=[], tensors=[], error="",
               message="")
    d = core.on_message(NOW + 4, plan)
    assert d.sync == [plan] and core.sync_offer is not None  # in sync: it waits for sync_complete
    done = msg("sync_complete", round=4, status="ok", revision=0, error="", message="")
    assert core.on_message(NOW + 4, done).sync == [done] and core.sync_offer is None
    assert core.on_message(NOW + 5, welcome(state="recovering", instance="c3")).out == []


def test_a_peer_in_sync_whose_sync_complete_was_lost_offers_again_after_a_re_welcome():
    """The coordinator sent the plan (in sync) and sync_complete together and stopped; the
    complete never arrived. Nothing else would ever be sent: the sync waited for its whole
    deadline. The offer goes again, and the coordinator answers a repeat of a completed
    round at once."""
    core = joined()
    core.sync_send(NOW, offer(20.0))
    core.on_message(NOW + 1, msg("sync_plan", round=4, status="in_sync", revision=1, sources=[], tensors=[],
                                 error="", message=""))
    core.on_message(NOW + 6, msg("reset", instance="c1", reason="unknown connection"))
    d = core.on_message(NOW + 6, welcome())
    assert [m["type"] for m in wire(d)] == ["sync_offer"] and "resent the sync offer" in d.reason
    for status in ("fetch", "error"):  # a fetcher's report takes its place; an error ends it
        core.sync_send(NOW + 7, offer(20.0))
        core.on_message(NOW + 7, msg("sync_plan", round=5, status=status, revision=1, sources=[], tensors=[],
                                     error="", message=""))
        assert core.sync_offer is None


def test_member_welcomed_as_pending_after_the_window_is_aborted_and_its_votes_fail():
    core = joined()
    vote = core.vote(NOW, 10.0)
    core.pending_query()
    d = core.on_message(NOW + 5, welcome(state="pending", instance="c2"))
    assert core.state is S.PENDING and d.level == logging.WARNING
    assert isinstance(d.abort, Aborted) and "rejoins as pending" in str(d.abort)
    [(key, exc)] = d.fail
    assert key == vote.wait and isinstance(exc, Aborted)
    assert wire(d) == [{"type": "pending_q", "req": 2}]  # the vote is not resent, the question is
    d = core.vote(NOW, 10.0)  # update_topology now waits for admission
    assert d.wait == JOIN and d.out == []


# ---------------------------------------------------------------------- removal, leave, close


def test_removed_fails_everything_then_connect_takes_a_new_peer_id():
    core = joined()
    vote = core.vote(NOW, 10.0)
    text = "peer p1 was removed from the run (silent); connect again as a new member"
    d = core.on_message(NOW, msg("removed", peer_id="p1", reason=text))
    assert core.state is S.REMOVED and d.removed == text and d.level == logging.WARNING
    assert {key for key, _ in d.fail} == {vote.wait, JOIN}
    assert all(isinstance(exc, PeerLost) and str(exc) == text for _, exc in d.fail)
    assert len(d.sync) == 1 and isinstance(d.sync[0], PeerLost)

    d = core.on_message(NOW, msg("removed", peer_id="p1", reason=text))  # duplicate
    assert d.fail == [] and d.removed is None and "already removed" in d.reason
    with pytest.raises(PeerLost, match="connect again"):
        core.vote(NOW, 1.0)
    with pytest.raises(PeerLost):
        core.sync_send(NOW, DONE)
    assert core.report_failure("p0", "x", 1).out == []

    d = core.connect(NOW + 1, 5.0)
    assert re.fullmatch(r"p1~[0-9a-f]{6}", core.peer_id) and d.renamed == core.peer_id
    assert core.state is S.PENDING and core.topology is None and core.instance == ""
    [hello] = wire(d)
    assert hello["peer_id"] == core.peer_id and hello["claim"] == "new" and hello["epoch"] == 0
    d = core.on_message(NOW + 1, msg("removed", peer_id="p1", reason=text))  # about the old identity
    assert core.state is S.PENDING and d.fail == [] and "ignored" in d.reason


def test_leave_fails_the_waits_and_the_removal_confirms_it():
    core = joined()
    vote = core.vote(NOW, 10.0)
    d = core.leave()
    assert core.state is S.LEFT and d.wait == LEAVE
    assert wire(d) == [{"type": "leave", "reason": "graceful leave"}]
    assert {key for key, _ in d.fail} == {vote.wait, JOIN}
    assert all(isinstance(exc, Aborted) for _, exc in d.fail) and isinstance(d.sync[0], Aborted)
    d = core.on_message(NOW, msg("removed", peer_id="p1", reason="left"))
    assert d.settle == [(LEAVE, None)] and core.state is S.LEFT and d.removed is None
    assert core.leave().out == []  # nothing to announce twice
    assert core.tick(NOW + 10).out == []  # no heartbeats once gone
    assert core.connect(NOW + 11, 1.0).renamed is not None


def test_close_is_final():
    core = joined()
    core.pending_query()
    d = core.close()
    assert core.state is S.CLOSED and {key for key, _ in d.fail} == {1, JOIN}
    assert all(isinstance(exc, Aborted) for _, exc in d.fail) and isinstance(d.sync[0], Aborted)
    assert "already closed" in core.close().reason and core.close().fail == []
    with pytest.raises(InvalidUsage):
        core.connect(NOW, 1.0)
    with pytest.raises(CoordinatorUnavailable):
        core.sync_send(NOW, DONE)
    assert core.on_message(NOW, welcome()).out == [] and core.state is S.CLOSED
    d = core.adopt(topology(2))
    assert d.apply is None and core.state is S.CLOSED and core.applied().settle == []


# ---------------------------------------------------------------------- errors and aborts


@pytest.mark.parametrize(
    "name, cls",
    [("InvalidUsage", InvalidUsage), ("DeadlineExceeded", DeadlineExceeded), ("PeerLost", PeerLost),
     ("NoSuchError", PcclError)],
)
def test_error_fails_its_request_with_the_named_exception(name, cls):
    core = joined()
    vote = core.vote(NOW, 10.0)
    d = core.on_message(NOW, msg("error", req=vote.wait, error=name, message="lockstep mismatch"))
    [(key, exc)] = d.fail
    assert key == vote.wait and type(exc) is cls and str(exc) == "lockstep mismatch"
    assert core.state is S.ACCEPTED and vote.wait not in core.requests
    d = core.on_message(NOW, msg("error", req=vote.wait, error=name, message="again"))  # duplicate
    assert d.fail == [] and "ignored" in d.reason


def test_abort_is_handed_to_the_daemon_and_changes_no_state():
    core = joined()
    d = core.on_message(NOW, msg("abort", error="InvalidUsage", message="peers disagree"))
    assert type(d.abort) is InvalidUsage and str(d.abort) == "peers disagree"
    assert d.fail == [] and core.state is S.ACCEPTED and d.level == logging.WARNING


# ---------------------------------------------------------------------- votes


def test_votes_complete_only_when_the_round_is_done_and_unvotes_withdraw():
    core = make()
    with pytest.raises(InvalidUsage, match="before connect"):
        core.vote(NOW, 1.0)
    with pytest.raises(InvalidUsage, match="before connect"):
        core.pending_query()
    joined(core)
    d = core.vote(NOW, -1.0)
    assert wire(d) == [{"type": "vote", "req": 1, "timeout": 0.0, "below": 0, "open": []}] and d.wait == 1
    second = core.vote(NOW, 4.0)
    assert second.wait == 2

    _, done = apply(core, core.on_message(NOW, topology(2, ("p1", "p2"))).topology)
    assert done.settle == [(JOIN, core.topology)]  # a new epoch, but not the end of the round
    d = core.unvote(2)
    assert wire(d) == [{"type": "unvote", "req": 2}] and 2 not in core.requests
    _, done = apply(core, core.on_message(NOW, topology(2, ("p1", "p2"), req=1)).topology)
    assert (1, core.topology) in done.settle and all(key != 2 for key, _ in done.settle)
    d = core.on_message(NOW + 1, welcome(instance="c2"))
    assert d.out == []  # nothing left in flight to resend

    query = core.pending_query()
    d = core.on_message(NOW, msg("pending_a", req=query.wait, pending=True))
    assert d.settle == [(query.wait, True)]
    d = core.on_message(NOW, msg("pending_a", req=query.wait, pending=True))  # duplicate
    assert d.settle == [] and "ignored" in d.reason
    vote = core.vote(NOW, 1.0)
    d = core.on_message(NOW, msg("pending_a", req=vote.wait, pending=True))  # not a question
    assert d.settle == [] and vote.wait in core.requests


# ---------------------------------------------------------------------- stale input


def test_stale_and_foreign_messages_are_ignored_with_a_reason():
    core = joined(epoch=5, peers=("p0", "p1"))
    d = core.on_message(NOW, welcome(peer_id="p9"))
    assert d.out == [] and "ignored" in d.reason and core.state is S.ACCEPTED

    adopt, done = apply(core, core.on_message(NOW, topology(4, ("p1",))).topology)  # older epoch
    assert adopt.apply is None and "older epoch" in adopt.reason and adopt.level == logging.WARNING
    assert done.settle == [] and core.topology.epoch == 5 and core.topology.world_size == 2

    adopt, done = apply(core, core.on_message(NOW, topology(5, ("p0", "p1"))).topology)  # the same again
    assert adopt.apply is None and "unchanged" in adopt.reason and done.settle == [(JOIN, core.topology)]

    d = core.on_message(NOW, msg("pong", nonce=3))  # a message only peers send
    assert "unexpected pong" in d.reason and d.level == logging.WARNING

    d = core.on_message(NOW, msg("ping", nonce=77))
    assert wire(d) == [{"type": "pong", "nonce": 77}]

    vote = core.vote(NOW, 1.0)
    bad = core.on_message(NOW, topology(6, ("p0", "p2"))).topology  # without this peer: stale
    d = core.adopt(bad)
    assert d.apply is None and d.fail == [] and "does not include this peer" in d.reason
    # on_topology raising is what fails the waits
    d = core.apply_failed(bad, ProtocolError("no"))
    assert {key for key, _ in d.fail} == {vote.wait, JOIN} and d.level == logging.ERROR
    assert all(isinstance(exc, Aborted) and "epoch 6" in str(exc) for _, exc in d.fail)
    assert core.state is S.ACCEPTED and core.topology.epoch == 5


def test_reset_and_foreign_hb_reintroduce_only_a_registered_peer():
    core = make()
    assert core.on_message(NOW, msg("reset", instance="c1", reason="who are you")).out == []
    assert core.on_message(NOW, msg("hb", instance="c1", epoch=0)).out == []
    joined(core)
    d = core.on_message(NOW + 1, msg("reset", instance="c1", reason="who are you"))
    assert [h["claim"] for h in hellos(d)] == ["accepted"] and d.level == logging.INFO


def test_report_failure_only_while_registered_and_bounded():
    core = make()
    assert core.report_failure("p0", "reset", 1).out == []
    joined(core)
    [m] = wire(core.report_failure("q" * 200, "r" * 2000, 3))
    assert m["type"] == "report_failure" and len(m["peer_id"]) == 128 and len(m["reason"]) == 1024
    assert m["epoch"] == 3


def test_sync_send_checks_before_it_sends():
    core = make()
    with pytest.raises(CoordinatorUnavailable, match="call connect"):
        core.sync_send(NOW, DONE)
    joined(core)
    huge = offer(1.0)
    huge["tensors"] = [[f"t{i}-" + "n" * 240, 4, b"h" * 64] for i in range(6000)]
    with pytest.raises(InvalidUsage, match="exceeds the control frame limit"):
        core.sync_send(NOW, huge)
    assert core.sync_offer is None


# ---------------------------------------------------------------------- transitions


@pytest.mark.parametrize(
    "start, new",
    [(S.IDLE, S.ACCEPTED), (S.IDLE, S.RECOVERING), (S.IDLE, S.REMOVED), (S.IDLE, S.LEFT),
     (S.REMOVED, S.ACCEPTED), (S.REMOVED, S.IDLE), (S.LEFT, S.ACCEPTED), (S.LEFT, S.REMOVED),
     (S.CLOSED, S.PENDING), (S.CLOSED, S.IDLE), (S.CLOSED, S.CLOSED)],
)
def test_illegal_transitions_are_rejected(start, new):
    core = make()
    core.state = start
    with pytest.raises(InternalError, match=f"illegal transition {start.value} -> {new.value}"):
        core._set_state(new)
    assert core.state is start


@pytest.mark.parametrize(
    "start, new",
    [(S.IDLE, S.PENDING), (S.PENDING, S.ACCEPTED), (S.ACCEPTED, S.RECOVERING), (S.RECOVERING, S.PENDING),
     (S.ACCEPTED, S.REMOVED), (S.PENDING, S.IDLE), (S.REMOVED, S.PENDING), (S.LEFT, S.CLOSED)],
)
def test_legal_transitions_are_taken(start, new):
    core = make()
    core.state = start
    core._set_state(new)
    assert core.state is new


def test_a_welcome_for_a_peer_that_is_not_registered_moves_nothing():
    core = make()
    for state in ("accepted", "pending", "recovering"):
        d = core.on_message(NOW, welcome(state=state))
        assert core.state is S.IDLE and core.instance == "" and "ignored" in d.reason


def test_optimize_vote_probes_on_request_and_settles_with_the_reason():
    core = joined(epoch=4, peers=("p0", "p1", "p2"))
    d = core.vote(NOW, 10.0, kind="optimize")
    assert wire(d) == [{"type": "optimize", "req": d.wait, "timeout": 10.0, "below": 0, "open": []}]
    probe = msg("bw_probe", round=3, epoch=4, targets=["p2"], bytes=4096, timeout=2.0)
    a = core.on_message(NOW + 0.1, probe)
    assert a.probe == probe and a.out == []  # the shell runs it on the data plane
    r = core.probe_done(probe, [["p2", 1.5e8, 0.01]])
    assert wire(r) == [{"type": "bw_report", "round": 3, "epoch": 4, "rows": [["p2", 1.5e8, 0.01]]}]
    answer = core.on_message(NOW + 0.2, {**topology(5, ("p1", "p0", "p2"), req=d.wait),
                                         "reason": "optimize_topology: moved"})
    _, done = apply(core, answer.topology)
    [(req, (topo, reason))] = done.settle[1:]
    assert req == d.wait and topo.epoch == 5 and topo.rank == 0 and reason == "optimize_topology: moved"
    assert core.requests == {}


def test_bw_probe_is_ignored_unless_accepted():
    core = make()
    core.connect(NOW, 5.0)
    core.on_message(NOW, welcome(state="pending"))
    d = core.on_message(NOW, msg("bw_probe", round=1, epoch=1, targets=["p2"], bytes=10, timeout=1.0))
    assert d.probe is None and "ignored" in d.reason
