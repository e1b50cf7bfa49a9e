"""all_reduce_async(..., retry=...): the handle's wait() re-posts the call on the new
membership. First the retry loop against fake handles (no sockets), then real runs where
a peer is killed or leaves while the others' calls are in flight."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import types

import numpy as np
import pytest
from test_client import _close_all as close_all
from test_client import join_all

from pccl_py import Aborted, Client, DeadlineExceeded, InvalidUsage, PeerLost
from pccl_py.client.allreduce import Retrying
from pccl_py.errors import SegmentLost
from pccl_py.retry import Backoff

pytestmark = pytest.mark.timeout(120)


# -- the loop, with fake handles --------------------------------------------------------
class FakeHandle:
    def __init__(self, outcome):
        self.outcome = outcome
        self.waits = 0

    def wait(self, timeout=None):
        self.waits += 1
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def fake_client(epochs):
    """What Client._retrying reads of its client: the epoch known, the default timeout, and
    the wait for a new epoch (recorded; each wait moves to the next epoch of ``epochs``)."""
    c = types.SimpleNamespace(_info={"epoch": epochs[0]}, timeout=10.0, waited_after=[])

    def wait_new_epoch(epoch, backoff):
        c.waited_after.append(epoch)
        c._info = {"epoch": epochs[len(c.waited_after)]}

    c._wait_new_epoch = wait_new_epoch
    return c


def retrying_over(client, outcomes, retry, epoch):
    handles = [FakeHandle(o) for o in outcomes]
    queue = iter(handles[1:])
    h = Retrying(handles[0], lambda: next(queue),
                 lambda once: Client._retrying(client, once, retry, "all_reduce", epoch=epoch))
    return h, handles


def test_wait_reposts_after_each_covered_failure_and_returns_the_last_attempts_info():
    c = fake_client([3, 4, 5])
    fast = Backoff(initial=0.001, maximum=0.001, deadline=5.0)
    h, handles = retrying_over(c, [PeerLost("a"), Aborted("b"), {"world_size": 2, "epoch": 5}], fast, epoch=3)
    assert not h.done()
    assert h.wait() == {"world_size": 2, "epoch": 5}
    assert h.done() and h.attempts == 3
    assert [x.waits for x in handles] == [1, 1, 1]  # each attempt waited once
    # the first retry waits past the epoch known when the first attempt was posted, the
    # second past the one known when the re-post went out
    assert c.waited_after == [3, 4]
    assert h.wait()["epoch"] == 5 and handles[2].waits == 1  # a second wait() answers from memory


def test_segment_lost_is_retried_without_waiting_for_an_epoch():
    c = fake_client([7, 8])
    h, _ = retrying_over(c, [SegmentLost("gone", segment="x"), {"ok": 1}], Backoff(initial=0.001), epoch=7)
    assert h.wait() == {"ok": 1}
    assert h.attempts == 2 and c.waited_after == []


def test_errors_outside_the_rule_and_an_exhausted_deadline_end_the_wait():
    c = fake_client([1, 2, 3])
    h, handles = retrying_over(c, [InvalidUsage("misuse"), {"ok": 1}], True, epoch=1)
    with pytest.raises(InvalidUsage, match="misuse"):
        h.wait()
    assert h.done() and h.attempts == 1 and handles[1].waits == 0
    with pytest.raises(InvalidUsage):  # the error stays the handle's answer
        h.wait()

    c = fake_client(list(range(100)))
    h, _ = retrying_over(c, [PeerLost(str(i)) for i in range(50)], Backoff(initial=0.01, deadline=0.05), epoch=0)
    with pytest.raises(DeadlineExceeded, match="kept failing"):
        h.wait()
    assert 1 < h.attempts < 50


# -- real runs ---------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["kill", "close"])
def test_calls_in_flight_with_retry_finish_over_the_survivors(coordinator, how):
    """Three peers; two post two calls each (a large one and a small inline one, automatic
    tags) with retry=True, the third never posts and is then SIGKILLed (or closes). The
    survivors' waits re-post both calls on the new membership: each returns the sum over
    the two survivors."""
    clients = [Client(coordinator=coordinator.addr, timeout=20.0) for _ in range(3)]
    try:
        with cf.ThreadPoolExecutor(3) as ex:
            topos = join_all(ex, clients)
            epoch = topos[0]["epoch"]
            victim, survivors = clients[2], clients[:2]
            big = [np.full(1_000_000, float(i + 1), np.float32) for i in range(2)]
            small = [np.full(16, 10.0 * (i + 1)) for i in range(2)]
            handles = []
            for c, b, s in zip(survivors, big, small):
                handles.append((c.all_reduce_async(b, retry=True), c.all_reduce_async(s, retry=True)))
                # the daemon posts an all-reduce as it reads the request, before it answers a
                # later one: once this answers, both calls are in flight at this epoch
                assert c.refresh()["epoch"] == epoch
            assert not any(h.done() for pair in handles for h in pair)
            if how == "kill":
                os.kill(victim._proc.pid, signal.SIGKILL)
            else:
                victim.close()

            def finish(pair):
                return pair[0].wait(), pair[1].wait()

            infos = [f.result(timeout=60) for f in [ex.submit(finish, p) for p in handles]]
        for (ib, is_), (hb, hs) in zip(infos, handles):
            assert ib["world_size"] == 2 and is_["world_size"] == 2
            assert ib["epoch"] > epoch and is_["epoch"] > epoch
            assert hb.attempts >= 2 and hs.attempts >= 2  # the first attempts could not finish
        for b in big:
            assert np.all(b == 3.0)
        for s in small:
            assert np.all(s == 30.0)
    finally:
        close_all(clients)


def test_a_final_failure_after_a_repost_leaves_the_tensors_untouched(coordinator):
    """The victim dies under the first attempt; the other survivor never posts the re-post,
    which then runs out of its time: wait() raises, and the input is as given."""
    clients = [Client(coordinator=coordinator.addr, timeout=20.0) for _ in range(3)]
    try:
        with cf.ThreadPoolExecutor(3) as ex:
            topos = join_all(ex, clients)
        a, victim = clients[0], clients[2]
        x = np.arange(500_000, dtype=np.float32)
        h = a.all_reduce_async(x, timeout=2.0, retry=Backoff(initial=0.01, deadline=15.0))
        assert a.refresh()["epoch"] == topos[0]["epoch"]  # posted at the first epoch
        os.kill(victim._proc.pid, signal.SIGKILL)
        with pytest.raises(DeadlineExceeded):  # the re-post waited for b, which never posts
            h.wait()
        assert h.attempts >= 2
        assert np.array_equal(x, np.arange(500_000, dtype=np.float32))
    finally:
        close_all(clients)


def test_all_reduce_is_the_async_call_and_its_wait(coordinator):
    """Without a failure a retrying handle is one attempt, and all_reduce gives the same."""
    clients = [Client(coordinator=coordinator.addr, timeout=20.0) for _ in range(2)]
    try:
        with cf.ThreadPoolExecutor(2) as ex:
            join_all(ex, clients)

            def body(c, rank):
                x = np.full(300_000, rank + 1.0, np.float32)
                h = c.all_reduce_async(x, retry=True, tag=5)
                info = h.wait()
                y = np.full(300_000, rank + 1.0, np.float32)
                info2 = c.all_reduce(y, retry=True, tag=6)
                return h.attempts, info, info2, float(x[0]), float(y[-1])

            out = list(ex.map(body, clients, range(2)))
        for attempts, info, info2, x0, y0 in out:
            assert attempts == 1 and x0 == 3.0 and y0 == 3.0
            assert info["world_size"] == info2["world_size"] == 2
    finally:
        close_all(clients)
