"""End to end through the public API: Client -> private daemon -> wire -> daemons -> Client."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import signal
import time

import numpy as np
import pytest
from conftest import Coordinator, free_port

from pccl_py import Aborted, Client, DeadlineExceeded, Diverged, InvalidUsage, PcclError, PeerLost
from pccl_py.wire import ipc

pytestmark = pytest.mark.timeout(120)


def join_all(ex, clients, timeout=30.0):
    """Connect every client and vote until all are members; returns their views."""
    n = len(clients)

    def join(c):
        topo = c.connect()
        deadline = time.monotonic() + timeout
        while topo["world_size"] < n:
            assert time.monotonic() < deadline, "peers did not all join"
            topo = c.update_topology()
        return topo

    return list(ex.map(join, clients))


@contextlib.contextmanager
def joined_pair(coordinator, timeout: float = 15.0):
    """Two clients in one run; the second one never calls unless the test makes it."""
    a = Client(coordinator=coordinator.addr, timeout=timeout)
    b = Client(coordinator=coordinator.addr, timeout=timeout)
    try:
        with cf.ThreadPoolExecutor(2) as ex:
            join_all(ex, [a, b])
        yield a, b
    finally:
        a.close()
        b.close()


def run_peers(n, fn, coordinator, timeout=90):
    """Start n clients (each with its own daemon), join them all, run fn(client, rank) in threads."""
    clients = [Client(coordinator=coordinator.addr, timeout=20.0) for _ in range(n)]
    try:
        with cf.ThreadPoolExecutor(n) as ex:
            topos = join_all(ex, clients)
            futs = [ex.submit(fn, c, t["rank"]) for c, t in zip(clients, topos)]
            return [f.result(timeout=timeout) for f in futs], clients
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("world", [2, 3])
def test_all_reduce_ops_dtypes_and_parity(coordinator, world):
    sizes = [0, 1, 7, 1000, 65537, 300_001]

    def body(c, rank):
        out = []
        for n in sizes:
            rng = np.random.default_rng(1000 * rank + n)
            x = rng.standard_normal(n).astype(np.float32)
            c.all_reduce(x, op="sum")
            y = (rng.integers(-50, 50, n)).astype(np.int32)
            c.all_reduce(y, op="max")
            z = rng.standard_normal(n)
            info = c.all_reduce(z, op="avg")
            out.append((x.tobytes(), y.tobytes(), z.tobytes(), info["world_size"]))
        return out

    results, _ = run_peers(world, body, coordinator)
    # expected values from the same generators
    for i, n in enumerate(sizes):
        xs, ys, zs = [], [], []
        for r in range(world):
            rng = np.random.default_rng(1000 * r + n)
            xs.append(rng.standard_normal(n).astype(np.float32))
            ys.append(rng.integers(-50, 50, n).astype(np.int32))
            zs.append(rng.standard_normal(n))
        got = [np.frombuffer(res[i][0], np.float32) for res in results]
        np.testing.assert_allclose(got[0], np.sum(xs, axis=0), rtol=1e-5, atol=1e-5)
        assert np.array_equal(np.frombuffer(results[0][i][1], np.int32), np.max(ys, axis=0))
        np.testing.assert_allclose(np.frombuffer(results[0][i][2], np.float64), np.mean(zs, axis=0),
                                   rtol=1e-12, atol=1e-12)
        for res in results[1:]:  # bit parity across peers
            assert res[i][:3] == results[0][i][:3]
        assert all(res[i][3] == world for res in results)


def test_torch_bf16_bucket_and_quantized(coordinator):
    torch = pytest.importorskip("torch")

    def body(c, rank):
        a = torch.full((1000,), float(rank + 1), dtype=torch.bfloat16)
        b = torch.arange(10, dtype=torch.float32) * (rank + 1)
        s = (torch.arange(20, dtype=torch.float32) * (rank + 1)).reshape(4, 5)[:, 1]  # strided view
        c.all_reduce([a, b, s], op="sum")
        q = torch.linspace(-1, 1, 50_000) * (rank + 1)
        info = c.all_reduce(q, op="avg", quant="uint8")
        return a.float().tolist()[:3], b.tolist(), s.tolist(), q.numpy().tobytes(), info

    results, _ = run_peers(2, body, coordinator)
    for a, b, s, _, info in results:
        assert a == [3.0, 3.0, 3.0]
        assert b == [3.0 * i for i in range(10)]
        assert s == [3.0 * v for v in (1, 6, 11, 16)]
        assert info["tx_bytes"] < info["tx_logical"]  # the wire carried codes, not floats
    q = np.frombuffer(results[0][3], np.float32)
    ref = np.linspace(-1, 1, 50_000, dtype=np.float32) * 1.5
    assert np.max(np.abs(q - ref)) < 2 * 4.0 / 255  # within a couple of quantization steps
    assert results[0][3] == results[1][3]


def test_tagged_calls_in_flight(coordinator):
    def body(c, rank):
        xs = [np.full(100_000 + k, float(rank + k), np.float32) for k in range(4)]
        handles = [c.all_reduce_async(x, tag=10 + k) for k, x in enumerate(xs)]
        for h in reversed(handles):
            h.wait()
        return [float(x[0]) for x in xs]

    results, _ = run_peers(2, body, coordinator)
    for vals in results:
        assert vals == [1.0 + 2 * k for k in range(4)]


def test_two_threads_have_calls_in_flight_at_once(coordinator):
    """Threads of one trainer do not wait for each other's calls: each thread's tagged calls
    run while the other thread's are in flight, and a property read answers meanwhile."""
    import threading

    def body(c, rank):
        gate = threading.Barrier(2, timeout=20)
        seen = {}

        def worker(k):
            x = np.full(400_000, float(rank + 1 + k), np.float32)
            gate.wait()
            for i in range(5):
                c.all_reduce(x, tag=100 + 10 * k + i)
                assert x[0] == x[-1]
            seen[k] = float(x[0])

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
        for t in ts:
            t.start()
        t0 = time.monotonic()
        ws = c.world_size  # answered by the daemon while the calls run, not after them
        ws_seconds = time.monotonic() - t0
        for t in ts:
            t.join(30)
        assert not any(t.is_alive() for t in ts)
        return seen, ws, ws_seconds

    results, _ = run_peers(2, body, coordinator)
    for seen, ws, ws_seconds in results:
        assert ws == 2
        assert ws_seconds < 2.0
        # x doubles-and-more each round: (1+k) + (2+k) summed 5 times over
        assert seen[0] == 3.0 * 2 ** 4
        assert seen[1] == 5.0 * 2 ** 4


def test_waits_of_two_threads_do_not_serialise(coordinator):
    """A thread waiting for a call that cannot finish yet (its peer has not posted it) does
    not hold up another thread's call: the second finishes first."""
    import threading

    with joined_pair(coordinator) as (a, b):
        xa = np.ones(1000, np.float32)
        ha = a.all_reduce_async(xa, tag=7)  # b posts tag 7 only later
        done = {}

        def other():
            y = np.ones(1000, np.float32)
            a.all_reduce(y, tag=8)
            done["t"] = time.monotonic()

        def peer_b():
            yb = np.ones(1000, np.float32)
            b.all_reduce(yb, tag=8)
            time.sleep(0.5)
            b.all_reduce(np.ones(1000, np.float32), tag=7)

        waiter = threading.Thread(target=lambda: done.setdefault("a", ha.wait()))
        waiter.start()
        time.sleep(0.05)  # the waiter is now blocked in the wait for tag 7
        tb = threading.Thread(target=peer_b)
        tb.start()
        other()
        t8 = done["t"]
        waiter.join(20)
        tb.join(20)
        assert "a" in done and xa[0] == 2.0
        assert done["a"]["world_size"] == 2
        # tag 8 finished while tag 7 was still waiting for b (which posts it 0.5 s later)
        assert t8 < time.monotonic() - 0.2


def test_calls_before_connect_fail_fast(coordinator):
    with Client(coordinator=coordinator.addr, timeout=5.0) as c:
        t0 = time.monotonic()
        with pytest.raises(InvalidUsage, match="connect"):
            c.all_reduce(np.ones(4, np.float32))
        with pytest.raises(InvalidUsage):
            c.all_reduce(np.ones(4, np.float32), op="median")
        assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("count", [1000, 2000])  # inline (at most INLINE_BYTES), through a segment
def test_daemon_deadline_reaches_the_caller_with_its_reason(coordinator, count):
    """A call the other peer never joins ends at the daemon's deadline; the caller gets the
    daemon's DeadlineExceeded (what it waited for), not a claim that the daemon was silent,
    and its input is untouched."""
    with joined_pair(coordinator) as (a, _):
        x = np.ones(count, np.float32)
        taken, take = [], a._pool.take
        a._pool.take = lambda n: taken.append(take(n)) or taken[-1]
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"did not finish within 0\.5s \(data incomplete\)"):
            a.all_reduce(x, timeout=0.5)
        assert time.monotonic() - t0 < 4.0  # the daemon's deadline, not the client's + slack
        assert np.all(x == 1.0)
        if x.nbytes <= ipc.INLINE_BYTES:
            assert not taken
            return
        # peers may still write into a failed call's output: its segment is never reused
        assert len(taken) == 1 and taken[0] not in a._pool.all
        assert not os.path.exists("/dev/shm/" + taken[0].name.lstrip("/"))


def test_a_call_of_several_dtypes_fails_whole_and_leaves_every_tensor_untouched(coordinator):
    """Each dtype is its own collective. When the int32 part fails (the peers disagree on
    its size) but the float32 part succeeded, the caller gets the error and neither tensor
    changes: the float32 result is not written either."""
    with joined_pair(coordinator) as (a, b):
        def call(c, n):
            x, y = np.full(4, 1.5, np.float32), np.ones(n, np.int32)
            try:
                c.all_reduce([x, y], timeout=10.0)
            except InvalidUsage as exc:
                return exc, x, y
            return None, x, y

        with cf.ThreadPoolExecutor(2) as ex:
            results = [f.result(timeout=30) for f in [ex.submit(call, a, 5), ex.submit(call, b, 6)]]
        for exc, x, y in results:
            assert exc is not None and "different arguments" in str(exc)
            assert np.all(x == 1.5) and np.all(y == 1)


def test_daemon_refuses_malformed_inline_requests(coordinator):
    """A request whose inline bytes do not match its size, exceed INLINE_BYTES or are not
    bytes is refused with InvalidUsage before anything is sent; the daemon serves on."""
    with joined_pair(coordinator) as (a, b):
        base = {"op": "all_reduce", "dtype": "float32", "reduce": "sum", "algorithm": "auto", "timeout": 5.0}
        big = ipc.INLINE_BYTES + 4
        for bad in ({"nbytes": 8, "data": b"1234"}, {"nbytes": big, "data": b"\0" * big},
                    {"nbytes": 4, "data": "abcd"}):
            with pytest.raises(InvalidUsage, match="inline data|all_reduce.data"):
                a._call({**base, **bad})
        seg = a._pool.take(1 << 16)
        with pytest.raises(InvalidUsage, match="overlap without being the same range"):
            a._call({**base, "nbytes": 8192, "shm": seg.name, "in_off": 0, "out_off": 4096})
        x, y = np.ones(3, np.float32), np.full(3, 2.0, np.float32)
        with cf.ThreadPoolExecutor(2) as ex:
            for f in [ex.submit(a.all_reduce, x), ex.submit(b.all_reduce, y)]:
                f.result(timeout=30)
        assert np.all(x == 3.0) and np.all(y == 3.0)


def test_plain_arrays_are_reduced_in_one_region_of_shared_memory(coordinator):
    """A numpy array is copied into one region that the call reduces in place (half the
    shared memory of separate input and output regions); the caller's array changes only
    when the call succeeded, and the segment goes back to the pool for the next call."""
    with joined_pair(coordinator) as (a, b):
        n = 100_000
        xs = [np.full(n, 1.5, np.float32), np.full(n, 2.0, np.float32)]
        with cf.ThreadPoolExecutor(2) as ex:
            for f in [ex.submit(c.all_reduce, x) for c, x in zip((a, b), xs)]:
                assert f.result(timeout=30)["algorithm"] == "shm"
        assert np.all(xs[0] == 3.5) and np.all(xs[1] == 3.5)
        for c in (a, b):
            (seg,) = c._pool.all
            assert seg.size < 2 * xs[0].nbytes  # one region of n floats, rounded up to 2^k
        h = a.all_reduce_async(xs[0], timeout=1.0)  # b never joins: the call fails
        with pytest.raises(PcclError):
            h.wait()
        assert np.all(xs[0] == 3.5)


def test_a_short_wait_returns_on_time(coordinator):
    """Handle.wait(timeout) honours a timeout shorter than the client's receive slice."""
    with joined_pair(coordinator) as (a, _):
        h = a.all_reduce_async(np.ones(10, np.float32), timeout=2.0)  # b never joins this call
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="no answer"):
            h.wait(timeout=0.05)
        assert time.monotonic() - t0 < 0.2


def _close_all(clients) -> None:
    """Close every client; one whose daemon a test killed may raise."""
    for c in clients:
        try:
            c.close()
        except Exception:
            pass


def test_peer_killed_survivors_fail_then_retry(coordinator):
    clients = [Client(coordinator=coordinator.addr, timeout=20.0) for _ in range(3)]
    try:
        with cf.ThreadPoolExecutor(3) as ex:
            join_all(ex, clients)
            victim, survivors = clients[2], clients[:2]
            x = [np.ones(2_000_000, np.float32) for _ in survivors]
            # the victim never calls: kill its daemon while the survivors wait on it
            futs = [ex.submit(c.all_reduce, xi) for c, xi in zip(survivors, x)]
            time.sleep(0.3)
            t_kill = time.monotonic()
            os.kill(victim._proc.pid, signal.SIGKILL)
            for f in futs:
                with pytest.raises((PeerLost, Aborted)):
                    f.result(timeout=30)
            detect = time.monotonic() - t_kill
            assert detect < 5.0, f"survivors noticed the death after {detect:.2f}s"
            assert all(np.all(xi == 1.0) for xi in x), "a failed call must leave the input untouched"
            infos = list(ex.map(lambda p: p[0].all_reduce(p[1], retry=True), zip(survivors, x)))
            assert all(i["world_size"] == 2 for i in infos)
            assert all(np.all(xi == 2.0) for xi in x)
    finally:
        _close_all(clients)


def test_all_gather_with_retry_goes_on_without_a_killed_peer(coordinator):
    """The survivors' gather waits on a peer whose daemon is then SIGKILLed: with
    ``retry=True`` it runs again on the new membership and returns the survivors' blobs."""
    clients = [Client(coordinator=coordinator.addr, timeout=20.0) for _ in range(3)]
    try:
        with cf.ThreadPoolExecutor(3) as ex:
            join_all(ex, clients)
            victim, survivors = clients[2], clients[:2]
            futs = [ex.submit(c.all_gather, f"blob {i}".encode(), retry=True) for i, c in enumerate(survivors)]
            time.sleep(0.3)
            os.kill(victim._proc.pid, signal.SIGKILL)
            got = [f.result(timeout=30) for f in futs]
            assert got[0] == got[1] and sorted(got[0]) == [b"blob 0", b"blob 1"]
            with pytest.raises((PeerLost, Aborted)):  # without retry the same loss is the caller's
                fut = ex.submit(survivors[0].all_gather, b"again", timeout=10.0)
                time.sleep(0.2)
                os.kill(survivors[1]._proc.pid, signal.SIGKILL)
                fut.result(timeout=30)
    finally:
        _close_all(clients)


def test_a_call_the_voter_never_makes_fails_at_once_and_the_counts_realign(coordinator):
    """b is in a call while a waits in update_topology (as after b completed a call that a
    failed): b's call fails with Diverged within about a heartbeat, not after the lockstep
    grace; a's vote waits on; once b votes too, both count their calls from the same
    round, so their next calls pair up (b's Diverged used a tag up that a never took)."""
    a = Client(coordinator=coordinator.addr, timeout=15.0)
    b = Client(coordinator=coordinator.addr, timeout=15.0)
    try:
        with cf.ThreadPoolExecutor(2) as ex:
            join_all(ex, [a, b])
            fa = ex.submit(a.update_topology)
            t0 = time.monotonic()
            with pytest.raises(Diverged, match="update_topology"):
                b.all_reduce(np.ones(1 << 16, np.float32), algorithm="ring")  # (its data waits at a)
            took = time.monotonic() - t0
            assert took < 1.9, f"told after {took:.2f} s"  # under the 2 s lockstep grace
            assert not fa.done()  # a waits for b's vote, it gets no error
            b.update_topology()
            fa.result(timeout=10)
            t0 = time.monotonic()
            outs = list(ex.map(lambda c: c.all_reduce(np.ones(1 << 16, np.float32), algorithm="ring")["epoch"], [a, b]))
            assert outs[0] == outs[1]
            # b's data of the aborted call, stalled at a, is dropped at the round, not after
            # the 10 s stall timeout with the new call's data queued behind it
            assert time.monotonic() - t0 < 5.0
    finally:
        a.close()
        b.close()


def test_coordinator_restart_run_continues():
    # the default recovery window (1.5 s): the daemons must re-introduce themselves inside it
    coordinator = Coordinator(free_port(), ["--heartbeat-deadline", "2.0"])
    coordinator.start()
    try:
        _restart_body(coordinator)
    finally:
        coordinator.stop()


def _restart_body(coordinator):
    clients = [Client(coordinator=coordinator.addr, timeout=30.0) for _ in range(2)]
    try:
        with cf.ThreadPoolExecutor(2) as ex:
            before = join_all(ex, clients)
            coordinator.kill()
            time.sleep(0.5)
            coordinator.start()
            deadline = time.monotonic() + 20
            while True:
                infos = [c.refresh() for c in clients]
                if all(i.get("epoch", 0) > before[0]["epoch"] for i in infos):
                    break
                assert time.monotonic() < deadline, f"no new epoch after restart: {infos}"
                time.sleep(0.1)
            assert {tuple(i["peers"]) for i in infos} == {tuple(before[0]["peers"])}
            xs = [np.full(1000, 1.0, np.float32), np.full(1000, 2.0, np.float32)]
            list(ex.map(lambda p: p[0].all_reduce(p[1], retry=True), zip(clients, xs)))
            assert all(np.all(x == 3.0) for x in xs)
    finally:
        for c in clients:
            c.close()


def test_frozen_peer_removed_then_rejoins_as_new_member(coordinator):
    a = Client(coordinator=coordinator.addr, timeout=20.0)
    b = Client(coordinator=coordinator.addr, timeout=20.0)
    try:
        with cf.ThreadPoolExecutor(2) as ex:
            join_all(ex, [a, b])
            old_id = b.refresh()["peer_id"]
            os.kill(b._proc.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                while a.refresh()["world_size"] != 1:
                    assert time.monotonic() - t0 < 10, "frozen peer not removed"
                    time.sleep(0.05)
                removed_after = time.monotonic() - t0
            finally:
                os.kill(b._proc.pid, signal.SIGCONT)
            assert removed_after < 6.0  # heartbeat deadline is 2 s in this fixture
            deadline = time.monotonic() + 10
            while b.refresh().get("connected"):
                assert time.monotonic() < deadline, "resumed peer was not told it was removed"
                time.sleep(0.05)
            with pytest.raises(InvalidUsage, match="removed"):
                b.all_reduce(np.ones(3, np.float32))
            fb = ex.submit(b.connect)
            deadline = time.monotonic() + 20
            while a.update_topology()["world_size"] < 2:
                assert time.monotonic() < deadline
            info_b = fb.result(timeout=20)
            assert info_b["peer_id"] != old_id and info_b["world_size"] == 2
            xs = [np.full(10, 1.0, np.float32), np.full(10, 2.0, np.float32)]
            list(ex.map(lambda p: p[0].all_reduce(p[1]), zip((a, b), xs)))
            assert all(np.all(x == 3.0) for x in xs)
    finally:
        a.close()
        b.close()


def test_client_allocated_tensors_skip_the_copy_in(coordinator):
    torch = pytest.importorskip("torch")

    def body(c, rank):
        a = c.alloc(300_001)  # numpy float32
        a[:] = rank + 1
        info = c.all_reduce(a, op="sum")
        flat_t = c.alloc(3000, as_torch=True)
        parts = [flat_t[:1000].view(10, 100), flat_t[1000:]]  # consecutive views: one run
        for p in parts:
            p.fill_(float(rank + 1))
        info2 = c.all_reduce(parts, op="avg")
        b = c.alloc(17, "bfloat16", as_torch=True)
        b.fill_(rank + 1)
        c.all_reduce(b)
        gaps = [flat_t[:10], flat_t[20:30]]  # not one run: copied as usual
        info3 = c.all_reduce(gaps, op="max")
        plain = np.full(5, rank + 1.0, np.float32)
        info4 = c.all_reduce(plain)
        return (float(a[0]), float(a[-1]), info["input_copied"], float(flat_t.mean()), info2["input_copied"],
                float(b[0]), info3["input_copied"], float(plain[0]), info4["input_copied"])

    results, _ = run_peers(2, body, coordinator)
    for r in results:
        assert r == (3.0, 3.0, False, 1.5, False, 3.0, True, 3.0, True)
    del torch


@pytest.mark.parametrize("algorithm", ["auto", "ring"])
def test_a_whole_allocated_array_gets_its_result_without_a_copy(coordinator, algorithm):
    """A call over the whole of an alloc() array writes the result into its twin, whose
    pages then take the array's place: right values for many calls in a row (the two
    buffers swapping roles), views of part of it copied as before, torch views see it."""
    torch = pytest.importorskip("torch")

    def body(c, rank):
        n = 1 << 20
        a = c.alloc(n)
        t = torch.from_numpy(a)  # another view of the same memory
        addr = a.__array_interface__["data"][0]
        seen = []
        for step in range(6):
            a[:] = np.arange(n, dtype=np.float32) * (rank + 1) + step
            info = c.all_reduce(a, op="sum", algorithm=algorithm)
            want = np.arange(n, dtype=np.float32) * 3 + 2 * step
            seen.append((bool(np.array_equal(a, want)), info["result_copied"], info["input_copied"],
                         float(t[7]) == float(want[7])))
        assert a.__array_interface__["data"][0] == addr
        part = a[: n // 2]  # not the whole array: the result is copied back
        part[:] = rank + 1
        info = c.all_reduce(part, algorithm=algorithm)
        seen.append((bool(np.all(part == 3)) and bool(a[n // 2] == want[n // 2]), info["result_copied"],
                     info["input_copied"], True))
        return seen

    results, _ = run_peers(2, body, coordinator)
    for seen in results:
        assert seen[:6] == [(True, False, False, True)] * 6
        assert seen[6] == (True, True, False, True)


def test_a_failed_call_on_an_allocated_array_leaves_it_untouched_and_the_next_one_works(coordinator):
    before = _shm_names()
    with joined_pair(coordinator, timeout=5.0) as (a, b):
        xa, xb = a.alloc(1 << 18), b.alloc(1 << 18)
        xa[:] = 1.0
        xb[:] = 2.0
        wrong = np.ones(1 << 17, np.float32)  # b calls tag 5 with another size: both fail
        with cf.ThreadPoolExecutor(2) as ex:
            fa = ex.submit(a.all_reduce, xa, tag=5)
            fb = ex.submit(b.all_reduce, wrong, tag=5)
            for f in (fa, fb):
                with pytest.raises(InvalidUsage):
                    f.result(timeout=30)
        assert np.all(xa == 1.0)  # untouched; its twin was replaced (a peer may still write into it)
        with cf.ThreadPoolExecutor(2) as ex:
            infos = list(ex.map(lambda p: p[0].all_reduce(p[1], tag=6), [(a, xa), (b, xb)]))
        assert np.all(xa == 3.0) and np.all(xb == 3.0)
        assert not infos[0]["result_copied"]
        del xa, xb
    left = _shm_names() - before
    assert not left, f"segments left in /dev/shm: {sorted(left)}"


def test_peer_frozen_mid_shared_memory_calls_never_yields_torn_results(coordinator):
    """Daemons on one host all-reduce through shared memory. One daemon is frozen at a
    random point of a stream of calls and resumed after the others moved on: every call that
    succeeds anywhere has the exact sum for its world, every call that fails leaves its input
    untouched, and the survivors go on without the frozen peer."""
    import random

    n = 1 << 20
    clients = [Client(coordinator=coordinator.addr, timeout=8.0) for _ in range(3)]
    bad: list[str] = []
    hangs: list[str] = []
    pairs = [0, 0, 0]  # successful calls in a world of two, the same count on both survivors
    stop_at: list[int | None] = [None]
    t_start = time.monotonic()

    def loop(i: int, c: Client) -> None:
        x = c.alloc(n)
        # the survivors stop after the same call: one that stopped on a clock while the
        # other had just started a call would leave that call waiting until its deadline
        while stop_at[0] is None or pairs[i] < stop_at[0]:
            x[:] = 1.0
            try:
                info = c.all_reduce(x, algorithm="shm" if c.world_size > 1 else "auto")
            except PcclError as exc:
                if isinstance(exc, DeadlineExceeded):
                    hangs.append(f"client {i} at {time.monotonic() - t_start:.1f}s: {exc}")
                if not np.all(x == 1.0):
                    bad.append(f"client {i}: input modified by a failed call ({exc})")
                if "removed" in str(exc):
                    return  # the frozen peer, told it was removed
                continue
            if not np.all(x == info["world_size"]):
                bad.append(f"client {i}: got {np.unique(x)[:4]} for world {info['world_size']}")
            if info["world_size"] == 2:
                pairs[i] += 1

    try:
        with cf.ThreadPoolExecutor(3) as ex:
            join_all(ex, clients)
            futs = [ex.submit(loop, i, c) for i, c in enumerate(clients)]
            time.sleep(random.uniform(0.3, 0.6))
            os.kill(clients[2]._proc.pid, signal.SIGSTOP)
            time.sleep(3.5)  # past the 2 s heartbeat deadline: it is removed
            os.kill(clients[2]._proc.pid, signal.SIGCONT)
            time.sleep(4.0)
            before = max(pairs[0], pairs[1])
            stop_at[0] = before + 20  # twenty more calls, all after the frozen daemon resumed
            for f in futs:
                f.result(timeout=60)
    finally:
        for c in clients:
            c.close()
    assert not bad, bad
    assert not hangs, hangs
    assert pairs[0] == pairs[1] == stop_at[0], (pairs, stop_at)
    assert before > 0  # the survivors went on without the frozen peer


def test_no_room_in_dev_shm_fails_the_call_not_the_process(coordinator, monkeypatch):
    """When /dev/shm cannot hold a new segment (reserving its pages fails with ENOSPC),
    alloc() and an all-reduce that needs a new segment raise InvalidUsage at once, before
    any peer is involved; once there is room again the same client works."""
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    with joined_pair(coordinator) as (a, b):
        before = set(os.listdir("/dev/shm"))
        with monkeypatch.context() as m:
            m.setattr(os, "posix_fallocate", full)
            with pytest.raises(InvalidUsage, match="/dev/shm has no room"):
                a.alloc(1000)
            t0 = time.monotonic()
            with pytest.raises(InvalidUsage, match="/dev/shm has no room"):
                a.all_reduce(np.ones(100_000, np.float32))
            assert time.monotonic() - t0 < 2.0
        assert not {n for n in set(os.listdir("/dev/shm")) - before if n.startswith("pccl_")}
        xs = [np.full(100_000, 1.0, np.float32), np.full(100_000, 2.0, np.float32)]
        with cf.ThreadPoolExecutor(2) as ex:
            for f in [ex.submit(c.all_reduce, x) for c, x in zip((a, b), xs)]:
                f.result(timeout=30)
        assert np.all(xs[0] == 3.0) and np.all(xs[1] == 3.0)


def _shm_names() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("pccl")}


def test_hundred_calls_with_a_daemon_killed_midway_leave_no_segment_behind(coordinator):
    """Three trainers make 100 calls with retry; after 40 one trainer's daemon is SIGKILLed
    (the trainer goes on alone); once every client is closed no shared-memory segment of
    the run is left in /dev/shm, the dead daemon's included."""
    before = _shm_names()
    clients = [Client(coordinator=coordinator.addr, timeout=20.0) for _ in range(3)]
    try:
        with cf.ThreadPoolExecutor(3) as ex:
            join_all(ex, clients)

            def body(i):
                x = np.full(300_000, 1.0, np.float32)
                for step in range(100):
                    if i == 2 and step == 40:
                        os.kill(clients[2]._proc.pid, signal.SIGKILL)
                        clients[2]._proc.wait(10)
                        return step
                    x[:] = 1.0
                    clients[i].all_reduce(x, retry=True)
                    assert x[0] == x[-1] and x[0] in (2.0, 3.0)
                return 100

            assert list(ex.map(body, range(3))) == [100, 100, 40]
    finally:
        _close_all(clients)
    left = _shm_names() - before
    assert not left, f"segments left in /dev/shm: {sorted(left)}"
