"""Client.wait_for_peers: members admit newcomers until the run has n peers, and all leave
the wait at the same epoch."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest
from test_client import _close_all as close_all

from pccl_py import Client, DeadlineExceeded, InvalidUsage

pytestmark = pytest.mark.timeout(120)


def test_three_peers_started_one_after_another_leave_the_wait_together(coordinator):
    """Each peer starts once the one before it waits: the first is alone in the run, the
    second is admitted by the first's vote, the third by both. All return world size 3 at
    one epoch, and the last one's wait returns at once (its connect() saw 3 peers)."""
    clients: list[Client] = []
    waiting = [threading.Event() for _ in range(3)]
    lock = threading.Lock()

    def peer(k):
        c = Client(coordinator=coordinator.addr, timeout=30.0)
        with lock:
            clients.append(c)
        joined = c.connect()
        waiting[k].set()  # (set just before the wait: the next peer starts meanwhile)
        t0 = time.monotonic()
        info = c.wait_for_peers(3, timeout=40.0)
        return joined, info, time.monotonic() - t0

    try:
        with cf.ThreadPoolExecutor(3) as ex:
            futs = []
            for k in range(3):
                futs.append(ex.submit(peer, k))
                assert waiting[k].wait(40.0), f"peer {k} did not connect"
            out = [f.result(timeout=60) for f in futs]
        epochs = {info["epoch"] for _, info, _ in out}
        assert [info["world_size"] for _, info, _ in out] == [3, 3, 3]
        assert len(epochs) == 1, f"peers left the wait at different epochs: {epochs}"
        assert sorted(info["rank"] for _, info, _ in out) == [0, 1, 2]
        joined_last, info_last, seconds_last = out[2]
        assert joined_last["world_size"] == 3 and joined_last["epoch"] == info_last["epoch"]
        assert seconds_last < 1.0
        # the view each returned is the view the daemon holds now: nobody left, nobody voted since
        assert {c.refresh()["epoch"] for c in clients} == epochs
    finally:
        close_all(clients)


def test_a_newcomer_admitted_during_the_wait_returns_promptly(coordinator):
    """The first member waits for two peers; the newcomer's connect() returns with two peers
    and its own wait_for_peers(2) answers at once; so does the member's."""
    a = Client(coordinator=coordinator.addr, timeout=20.0)
    b = None
    try:
        a.connect()
        with cf.ThreadPoolExecutor(1) as ex:
            fa = ex.submit(a.wait_for_peers, 2, timeout=30.0)
            b = Client(coordinator=coordinator.addr, timeout=20.0)
            joined = b.connect()
            t0 = time.monotonic()
            info_b = b.wait_for_peers(2, timeout=30.0)
            seconds = time.monotonic() - t0
            info_a = fa.result(timeout=30)
        assert joined["world_size"] == 2
        assert seconds < 0.5
        assert info_a["world_size"] == info_b["world_size"] == 2
        assert info_a["epoch"] == info_b["epoch"]
    finally:
        close_all([c for c in (a, b) if c is not None])


def test_the_deadline_says_how_many_peers_came(coordinator):
    with Client(coordinator=coordinator.addr, timeout=10.0) as c:
        c.connect()
        assert c.wait_for_peers(1)["world_size"] == 1  # already there: no vote, no wait
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"1 of the 3 peers awaited"):
            c.wait_for_peers(3, timeout=0.5, poll=0.05)
        assert 0.5 <= time.monotonic() - t0 < 3.0


def test_bad_arguments_and_a_peer_not_connected_are_misuse(coordinator):
    with Client(coordinator=coordinator.addr, timeout=10.0) as c:
        for n in (0, -1, True, 2.0, "2", None):
            with pytest.raises(InvalidUsage, match="number of peers"):
                c.wait_for_peers(n)
        for poll in (0, -0.1, float("nan"), "0.1", 61):
            with pytest.raises(InvalidUsage, match="poll"):
                c.wait_for_peers(2, poll=poll)
        with pytest.raises(InvalidUsage, match="connect"):
            c.wait_for_peers(1, timeout=2.0)


class FakeMember:
    """What wait_for_peers calls on its client, scripted: ``pending`` answers in turn, each
    vote the next of ``votes`` (an info dict, or an error to raise)."""

    def __init__(self, world, pending, votes):
        self.view = {"connected": True, "world_size": world, "epoch": 1}
        self.pending = list(pending)
        self.votes = list(votes)
        self.log = []

    def _timeout(self, timeout):
        return 5.0 if timeout is None else timeout

    def refresh(self):
        self.log.append("refresh")
        return dict(self.view)

    def are_peers_pending(self, timeout=None):
        self.log.append("pending?")
        return self.pending.pop(0) if self.pending else False

    def update_topology(self, timeout=None):
        self.log.append("vote")
        outcome = self.votes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        self.view = outcome
        return dict(outcome)


def test_the_loop_votes_only_while_peers_are_pending_and_returns_the_vote_that_completed_it():
    m = FakeMember(1, [False, True, True],
                   [{"connected": True, "world_size": 2, "epoch": 2}, {"connected": True, "world_size": 3, "epoch": 3}])
    info = Client.wait_for_peers(m, 3, poll=0.001)
    assert info["world_size"] == 3 and info["epoch"] == 3
    assert m.log == ["refresh", "pending?", "refresh", "pending?", "vote", "pending?", "vote"]


def test_a_vote_that_timed_out_is_taken_again_only_if_someone_is_still_pending():
    """A newcomer that gave up its connect() after this member saw it pending: the vote runs
    out (DeadlineExceeded), the loop looks again, and the wait goes on instead of failing."""
    m = FakeMember(2, [True, False, True], [DeadlineExceeded("vote timed out"),
                                            {"connected": True, "world_size": 3, "epoch": 4}])
    info = Client.wait_for_peers(m, 3, timeout=5.0, poll=0.001)
    assert info["epoch"] == 4
    assert m.log == ["refresh", "pending?", "vote", "refresh", "pending?", "refresh", "pending?", "vote"]
