"""The DiLoCo modes: their arithmetic and schedules alone, then every mode against an
in-memory world of peers (threads, no daemon), then the modes through real clients with a
newcomer joining mid-run."""

from __future__ import annotations

import concurrent.futures as cf
import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pccl_py.client.shared_state import SharedState
from pccl_py.diloco import DelayedDiLoCo, DiLoCo, OuterSGD, StreamingDiLoCo, StreamingSchedule
from pccl_py.diloco.rules import contributors, split_fragments
from pccl_py.errors import Diverged, InvalidUsage

pytestmark = pytest.mark.timeout(120)


# -- rules ------------------------------------------------------------------------------
def test_outer_sgd_is_nesterov_on_the_pseudo_gradient_and_plain_sgd_without_momentum():
    o, m, d = torch.tensor([1.0, 2.0]), torch.zeros(2), torch.tensor([0.1, -0.2])
    OuterSGD(0.5, 0.9).apply(o, m, d)
    assert torch.allclose(m, d)
    assert torch.allclose(o, torch.tensor([1.0, 2.0]) - 0.5 * (d + 0.9 * d))
    o2 = torch.tensor([1.0, 2.0])
    OuterSGD(1.0, 0.0).apply(o2, torch.zeros(2), d)
    assert torch.equal(o2, torch.tensor([1.0, 2.0]) - d)
    with pytest.raises(InvalidUsage):
        OuterSGD(0.7, 1.0)


def test_contributors_leave_out_peers_that_gave_zeros():
    assert contributors(4, 1) == 3 and contributors(2, 2) == 0 and contributors(3, 0) == 3
    assert contributors(1, 5) == 0


@given(st.lists(st.integers(1, 1000), min_size=1, max_size=30), st.integers(1, 30))
def test_fragments_are_contiguous_cover_every_tensor_and_none_is_empty(numels, count):
    if count > len(numels):
        with pytest.raises(InvalidUsage):
            split_fragments(numels, count)
        return
    frags = split_fragments(numels, count)
    assert len(frags) == count and all(frags)
    assert [i for f in frags for i in f] == list(range(len(numels)))


def test_fragments_are_balanced_when_tensors_allow():
    frags = split_fragments([100] * 8, 4)
    assert [len(f) for f in frags] == [2, 2, 2, 2]


@pytest.mark.parametrize("fragments,every,overlap", [(1, 1, 0), (1, 4, 4), (2, 4, 2), (3, 10, 3), (4, 16, 1),
                                                     (4, 8, 0), (5, 12, 2)])
def test_streaming_schedule_exchanges_each_fragment_once_per_period_one_at_a_time(fragments, every, overlap):
    sched = StreamingSchedule(fragments, every, overlap)
    in_flight: dict[int, int] = {}
    started = {p: [] for p in range(fragments)}
    for s in range(0, 5 * every):
        for p in sched.finishes(s):
            assert in_flight.pop(p) == s - overlap
        if sched.syncs(s):
            assert not in_flight, f"step {s}: exchange in flight at a sync point"
        for p in sched.starts(s):
            started[p].append(s)
            if overlap:
                in_flight[p] = s
        assert len(in_flight) <= 1
    for p, steps in started.items():
        assert [b - a for a, b in zip(steps, steps[1:])] == [every] * (len(steps) - 1)
        assert steps[0] == sched.offset(p)


def test_streaming_schedule_refuses_overlapping_exchanges():
    with pytest.raises(InvalidUsage, match="overlap"):
        StreamingSchedule(4, 8, 3)
    with pytest.raises(InvalidUsage, match="fragments"):
        StreamingSchedule(4, 3, 0)


# -- an in-memory world ---------------------------------------------------------------------
class World:
    """N peers in threads: every collective is an exchange through a barrier."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n, timeout=30)
        self.slots: list = [None] * n

    def exchange(self, rank: int, value):
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class FakeHandle:
    def __init__(self, client, tensors, op) -> None:
        self.client, self.tensors, self.op = client, tensors, op
        self.inputs = [t.clone() for t in tensors]

    def wait(self):
        return self.client._reduce(self.tensors, self.inputs, self.op)


class FakeClient:
    """The client surface the modes use, over a World (no membership change)."""

    def __init__(self, world: World, rank: int, fail: Exception | None = None) -> None:
        self.world, self.rank, self.fail = world, rank, fail
        self.peer_id = f"p{rank}"
        self.states: list[SharedState] = []
        self.gathers = 0

    def refresh(self):
        return {"connected": True, "peers": [f"p{i}" for i in range(self.world.n)],
                "world_size": self.world.n, "epoch": 1}

    def update_topology(self, timeout=None):
        return self.refresh()

    def shared_state(self, tensors):
        st_ = SharedState(tensors)
        self.states.append(st_)
        return st_

    def sync_shared_state(self, state, timeout=None, progress=None):
        mine = bytes(state.buffer()[:])
        all_ = self.world.exchange(self.rank, mine)
        if mine != all_[0]:
            state.buffer()[:] = all_[0]
            return {"status": "fetched", "revision": state.revision, "rx_bytes": len(mine)}
        return {"status": "in_sync", "revision": state.revision, "rx_bytes": 0}

    def alloc(self, n, dtype, as_torch=True):
        return torch.zeros(n, dtype=getattr(torch, dtype))

    def _reduce(self, tensors, inputs, op):
        if self.fail is not None:
            raise self.fail
        everyone = self.world.exchange(self.rank, inputs)
        for i, t in enumerate(tensors):
            total = everyone[0][i].clone()
            for other in everyone[1:]:
                total += other[i]
            t.copy_(total / self.world.n if op == "avg" else total)
        return {"world_size": self.world.n, "seconds": 0.0}

    def all_reduce(self, tensors, op="sum", **kw):
        return self._reduce(tensors, [t.clone() for t in tensors], op)

    def all_reduce_async(self, tensors, op="sum", **kw):
        return FakeHandle(self, tensors, op)

    def all_gather(self, blob, **kw):
        self.gathers += 1
        return self.world.exchange(self.rank, bytes(blob))

    def close(self):
        for s in self.states:
            s.close()


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def run_world(n: int, body):
    """body(client, rank) in n threads over one World; returns their results."""
    world = World(n)
    clients = [FakeClient(world, r) for r in range(n)]
    try:
        with cf.ThreadPoolExecutor(n) as ex:
            return [f.result(timeout=60) for f in [ex.submit(body, c, r) for r, c in enumerate(clients)]]
    finally:
        for c in clients:
            c.close()


def drift(m: torch.nn.Module, rank: int, k: int) -> None:
    """Stand-in for inner steps: each peer moves its parameters its own way."""
    with torch.no_grad():
        for j, p in enumerate(m.parameters()):
            p.add_(0.01 * (rank + 1) * (k + 1) * (j + 1))


def flat(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def test_diloco_averages_applies_nesterov_and_leaves_the_run_parameters_in_every_model():
    def body(client, rank):
        m = model()
        d = DiLoCo(client, m, outer_lr=0.5, outer_momentum=0.9)
        d.join()
        start = flat(m).clone()
        drift(m, rank, 0)
        info = d.outer_step()
        return start, flat(m).clone(), info, d.step

    out = run_world(3, body)
    start = out[0][0]
    delta = sum(-0.01 * (r + 1) for r in range(3)) / 3  # outer minus local, averaged
    counts = [p.numel() for p in model().parameters()]
    expected_delta = torch.cat([torch.full((c,), delta * (j + 1)) for j, c in enumerate(counts)])
    expected = start - 0.5 * (expected_delta + 0.9 * expected_delta)
    for _, after, info, step in out:
        assert torch.equal(after, out[0][1])  # bit-identical on every peer
        assert torch.allclose(after, expected, atol=1e-6)
        assert step == 1 and info["sync"] == "in_sync" and info["members"] == 3


def test_a_diverged_outer_step_is_not_applied_and_the_sync_decides():
    world = World(1)
    client = FakeClient(world, 0, fail=Diverged("peer X completed it"))
    try:
        m = model()
        d = DiLoCo(client, m)
        d.join()
        start = flat(m).clone()
        drift(m, 0, 0)
        info = d.outer_step()
        assert info["diverged"] and "peer X" in info["error"]
        assert d.step == 0 and torch.equal(flat(m), start)  # back to the (unchanged) outer params
    finally:
        client.close()


def test_join_needs_a_connected_client_and_happens_once():
    class Unconnected(FakeClient):
        def refresh(self):
            return {"connected": False}

    c = Unconnected(World(1), 0)
    with pytest.raises(InvalidUsage, match="connect"):
        DiLoCo(c, model()).join()
    c = FakeClient(World(1), 0)
    try:
        d = DiLoCo(c, model())
        d.join()
        with pytest.raises(InvalidUsage, match="once"):
            d.join()
    finally:
        c.close()


def test_delayed_diloco_applies_each_phase_one_outer_step_later():
    def body(client, rank):
        m = model()
        d = DelayedDiLoCo(client, m, outer_lr=1.0, outer_momentum=0.0)
        d.join()  # every peer is new here: the first exchange carries only zeros
        theta0 = flat(m).clone()
        drift(m, rank, 0)
        i1 = d.outer_step()  # applies the join's exchange: nothing; starts phase 1's
        after1 = flat(m).clone()
        drift(m, rank, 1)
        i2 = d.outer_step()  # applies phase 1's
        return theta0, after1, flat(m).clone(), i1, i2

    out = run_world(2, body)
    theta0 = out[0][0]
    counts = [p.numel() for p in model().parameters()]
    phase1 = sum(-0.01 * (r + 1) for r in range(2)) / 2
    d1 = torch.cat([torch.full((c,), phase1 * (j + 1)) for j, c in enumerate(counts)])
    for t0, after1, after2, i1, i2 in out:
        assert torch.equal(t0, theta0)  # every peer joined the same run
        assert torch.equal(after1, theta0)  # nothing applied yet: back to the outer params
        assert torch.allclose(after2, theta0 - d1, atol=1e-6)
        assert torch.equal(after2, out[0][2])
        assert i1["contributors"] == 0 and i2["contributors"] == 2
        assert i1["step"] == 0 and i2["step"] == 1


def test_streaming_diloco_exchanges_fragments_in_turn_and_mixes():
    every, frags = 4, 2

    def body(client, rank):
        m = model()
        s = StreamingDiLoCo(client, m, fragments=frags, sync_every=every, overlap=1, mix=0.5,
                            outer_lr=1.0, outer_momentum=0.0)
        s.join()
        outers = []
        for k in range(3 * every):
            drift(m, rank, k)
            s.inner_step()
            outers.append(torch.cat([o.reshape(-1) for o in s.outer]).clone())
        s.finish()
        return outers, s.fragments, s.step

    out = run_world(2, body)
    outers0, fragments, step = out[0]
    assert step == 3 * every and len(fragments) == frags
    for outers, _, _ in out[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outers, outers0))  # identical outer state
    changed = [not torch.equal(a, b) for a, b in zip(outers0, outers0[1:])]
    # fragment 0 is finished at steps 1, 5, 9 (its join exchange, zeros only, changes nothing);
    # fragment 1 at 3, 7, 11: the outer state changes exactly there
    assert [k + 1 for k, c in enumerate(changed, start=1) if c] == [3, 5, 7, 9, 11]


# -- through real clients ----------------------------------------------------------------
def test_run_state_names_name_each_parameter():
    c = FakeClient(World(1), 0)
    try:
        d = DiLoCo(c, model())
        d.join()
        names = set(d.state.tensors)
        assert {"diloco.step", "diloco.outer.0.weight", "diloco.momentum.2.bias"} <= names
    finally:
        c.close()


def test_a_newcomer_that_left_during_its_first_exchange_is_not_divided_out():
    """The zeros of newcomers are divided out of an average only for those still in the call
    that succeeded: a newcomer that died mid-exchange (the retry ran without it) gave nothing."""

    class Shrunk(FakeClient):
        def refresh(self):
            return {"connected": True, "peers": ["p0", "p1"], "world_size": 2, "epoch": 2}

    c = Shrunk(World(1), 0)
    try:
        d = DelayedDiLoCo(c, model())
        new = frozenset({"p2"})
        assert d._gave_zeros(new, 3, {"world_size": 3}) == 1  # the call ran with the newcomer
        assert d._gave_zeros(new, 3, {"world_size": 2}) == 0  # the retry ran without it
        assert d._gave_zeros(frozenset({"p1", "p2"}), 3, {"world_size": 2}) == 1
        assert d._gave_zeros(frozenset(), 3, {"world_size": 2}) == 0
    finally:
        c.close()
