"""Large frames on the streams' I/O threads (transport/pump.py): the pump alone over a
socket pair, then data planes with ``io_threads=True`` (results, parity, a peer lost, and
nothing left behind: threads, file descriptors)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest
from test_dataplane import all_reduce_all, families, make_inputs, reference, run, topo
from test_dataplane import cluster as dp_cluster

from pccl_py.daemon.dataplane import DataPlane, DataPlaneConfig
from pccl_py.daemon.streams import Stream
from pccl_py.errors import Aborted, PeerLost
from pccl_py.transport import pump as pump_mod
from pccl_py.transport.pump import Pump

pytestmark = pytest.mark.timeout(60)

# every payload of 32 KiB or more goes through the threads: the default sizes below use both paths
THREADS = DataPlaneConfig(io_threads=True, bulk_min=32 << 10)


def open_fds() -> set[int]:
    return set(int(x) for x in os.listdir("/proc/self/fd"))


def pccl_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pccl-")]


@contextlib.contextmanager
def nothing_left_behind(timeout: float = 5.0):
    """Fails the test if a pump thread or a file descriptor opened inside is still there at
    the end (threads get ``timeout`` seconds to finish: they wake within a poll interval)."""
    run(asyncio.sleep(0))  # what an event loop keeps once per process is not ours
    fds, threads = open_fds(), set(pccl_threads())
    yield
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (set(pccl_threads()) - threads or open_fds() - fds):
        time.sleep(0.02)
    left = set(pccl_threads()) - threads
    assert not left, f"threads left running: {sorted(t.name for t in left)}"
    extra = open_fds() - fds
    assert not extra, f"file descriptors left open: {sorted(extra)} " + ", ".join(
        _describe(fd) for fd in sorted(extra))


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


# ---------------------------------------------------------------- the pump alone


async def _pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def test_pump_moves_a_payload_both_ways_and_reports_progress():
    async def body():
        loop = asyncio.get_running_loop()
        a, b = await _pair()
        pa, pb = Pump(loop, a, "a"), Pump(loop, b, "b")
        payload = np.random.default_rng(0).integers(0, 256, 5 << 20, dtype=np.uint8)
        into = bytearray(16 + payload.nbytes)
        seen = []
        got = loop.create_future()
        sent = loop.create_future()
        pb.recv(memoryview(into), 0, seen.append, got.set_result)
        pa.send(b"H" * 16, memoryview(payload), sent.set_result)
        assert await asyncio.wait_for(sent, 10) is None
        assert await asyncio.wait_for(got, 10) is None
        assert bytes(into[:16]) == b"H" * 16 and bytes(into[16:]) == payload.tobytes()
        assert seen == sorted(seen) and seen[-1] == len(into)
        pa.stop(hard=False)
        pb.stop(hard=False)
        a.close()
        b.close()

    with nothing_left_behind():
        run(body())


@pytest.mark.skipif(pump_mod.recv_fill is None, reason="the C extension is not built")
def test_native_receive_reduces_as_bytes_arrive_and_returns_on_timeout_or_eof():
    a, b = socket.socketpair()
    a.setblocking(False)
    n = 300_000
    x = np.arange(n, dtype=np.float32)
    got = np.zeros(n, np.float32)  # the received bytes: the peer's x
    acc = np.full(n, 2.0, np.float32)  # acc += received, as the bytes arrive
    gv = memoryview(got).cast("B")
    t = threading.Thread(target=lambda: (b.sendall(x[: n // 2].tobytes()), time.sleep(0.3),
                                         b.sendall(x[n // 2:].tobytes())))
    t.start()
    pos, done = 0, 0
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:  # the first half, then a poll that times out
        pos, done = pump_mod.recv_fill(a.fileno(), gv, pos, 20, acc, got, "sum", "float32", done)
    assert 0 < pos < 4 * n and done <= pos and done % 4 == 0
    with pytest.raises(ValueError):
        pump_mod.recv_fill(a.fileno(), gv, pos, 20, acc, got[:10], "sum", "float32", done)
    while pos < 4 * n:
        pos, done = pump_mod.recv_fill(a.fileno(), gv, pos, 1000, acc, got, "sum", "float32", done)
    t.join()
    assert done == 4 * n
    assert np.array_equal(got, x) and np.array_equal(acc, x + 2)
    b.close()
    with pytest.raises(ConnectionResetError):
        pump_mod.recv_fill(a.fileno(), gv, 0, 1000)
    a.close()


@pytest.mark.skipif(pump_mod.send_all is None, reason="the C extension is not built")
def test_native_send_writes_header_and_payload_and_resumes_where_it_stopped():
    a, b = socket.socketpair()
    a.setblocking(False)
    payload = np.random.default_rng(1).integers(0, 256, 8 << 20, dtype=np.uint8)
    total = 3 + payload.nbytes
    sent = pump_mod.send_all(a.fileno(), b"abc", payload, 0, 20)  # nobody reads: stops when full
    assert 0 < sent < total
    out = bytearray()

    def reader():
        while len(out) < total:
            out.extend(b.recv(1 << 20))

    t = threading.Thread(target=reader)
    t.start()
    while sent < total:
        sent = pump_mod.send_all(a.fileno(), b"abc", payload, sent, 1000)
    t.join(10)
    assert bytes(out) == b"abc" + payload.tobytes()
    b.close()
    with pytest.raises(OSError):
        pump_mod.send_all(a.fileno(), b"abc", payload, 0, 1000)
    a.close()


@pytest.mark.parametrize("native", [True, False])
def test_pump_with_and_without_the_native_loops(native, monkeypatch):
    """The same frames through the C loops or the Python ones (a build without the
    extension), a reduction included."""
    if not native:
        monkeypatch.setattr(pump_mod, "recv_fill", None)
        monkeypatch.setattr(pump_mod, "send_all", None)
    elif pump_mod.recv_fill is None:
        pytest.skip("the C extension is not built")

    class Sum:  # what the ring's receive of a reduce-scatter stripe hands the pump
        def __init__(self, acc, other):
            self.acc, self.other, self.done = acc, other, 0

        def pair(self):
            return self.acc, self.other, "sum", "float32"

        def progress(self, got):
            k = got - got % 4
            np.add(self.acc[self.done // 4:k // 4], self.other[self.done // 4:k // 4],
                   out=self.acc[self.done // 4:k // 4])
            self.done = k

    async def body():
        loop = asyncio.get_running_loop()
        a, b = await _pair()
        pa, pb = Pump(loop, a, "a"), Pump(loop, b, "b")
        n = 1 << 20
        x = np.arange(n, dtype=np.float32)
        recv = np.zeros(n, np.float32)
        acc = np.ones(n, np.float32)
        red = Sum(acc, recv)
        sent, got = loop.create_future(), loop.create_future()
        pb.recv(memoryview(recv).cast("B"), 0, None, got.set_result, red)
        pa.send(b"", memoryview(x).cast("B"), sent.set_result)
        assert await asyncio.wait_for(sent, 10) is None
        assert await asyncio.wait_for(got, 10) is None
        assert red.done == 4 * n
        assert np.array_equal(recv, x) and np.array_equal(acc, x + 1)
        pa.stop(hard=False)
        pb.stop(hard=False)
        a.close()
        b.close()

    with nothing_left_behind():
        run(body())


@pytest.mark.parametrize("blocked_in", ["recv", "send"])
def test_a_hard_stop_wakes_a_thread_blocked_in_a_system_call(blocked_in):
    """A receive that waits for bytes that never come, or a send to a peer that never reads
    (the socket buffers full), ends within milliseconds of ``stop(hard=True)``."""
    async def body():
        loop = asyncio.get_running_loop()
        a, b = await _pair()
        pump = Pump(loop, a, "a")
        done = loop.create_future()
        if blocked_in == "recv":
            pump.recv(memoryview(bytearray(1 << 20)), 0, None, done.set_result)
        else:  # far more than the socket buffers hold: the thread blocks in sendmsg
            pump.send(b"", memoryview(bytearray(64 << 20)), done.set_result)
        await asyncio.sleep(0.3)
        assert not done.done()
        t0 = time.monotonic()
        pump.stop(hard=True)
        err = await asyncio.wait_for(done, 5)
        woke = time.monotonic() - t0
        assert isinstance(err, OSError), err
        assert woke < 0.2, f"the blocked thread took {woke:.3f}s to wake"
        a.close()
        b.close()

    with nothing_left_behind():
        run(body())


def test_a_soft_stop_lets_the_running_job_finish():
    async def body():
        loop = asyncio.get_running_loop()
        a, b = await _pair()
        pump = Pump(loop, a, "a")
        into = bytearray(1 << 20)
        done = loop.create_future()
        pump.recv(memoryview(into), 0, None, done.set_result)
        await asyncio.sleep(0.05)
        pump.stop(hard=False)
        await loop.sock_sendall(b, b"x" * len(into))
        assert await asyncio.wait_for(done, 5) is None
        assert into == b"x" * len(into)
        a.close()
        b.close()

    with nothing_left_behind():
        run(body())


# ---------------------------------------------------------------- data planes on threads


def cluster(n: int, *, streams: int = 4, tcp: bool = False, failures=None):
    """test_dataplane's cluster with the I/O threads on (over TCP, or Unix sockets)."""
    return dp_cluster(n, streams=streams, config=THREADS, failures=failures, tcp_only=range(n) if tcp else ())


def pumped(dp: DataPlane) -> int:
    """How many of this data plane's streams have started I/O threads."""
    return sum(1 for c in dp._conns if c._pump is not None and c._pump.threads)


@pytest.mark.parametrize("world,tcp", [(2, True), (3, False), (4, True)])
def test_results_and_parity_on_io_threads(world, tcp):
    """Sizes whose frames take both paths (loop below 32 KiB, threads above), every op of
    the ring, an in-place call; the threads were used and nothing is left once closed."""
    async def body():
        async with cluster(world, tcp=tcp) as dps:
            fam = "AF_INET" if tcp else "AF_UNIX"
            assert all(families(d) == {o.peer_id: {fam} for o in dps if o is not d} for d in dps)
            tag = 0
            for count in (5, 40_000, 300_007, 1 << 21):
                for op in ("sum", "avg", "max", "min", "prod"):
                    tag += 1
                    srcs = make_inputs(world, count, "float32", op, seed=tag)
                    before = [s.copy() for s in srcs]
                    dsts, _ = await all_reduce_all(dps, srcs, dtype="float32", op=op, algorithm="ring", tag=tag)
                    want = reference(srcs, "float32", op)
                    for r in range(world):
                        assert dsts[r].tobytes() == want.tobytes(), (count, op, r)
                        assert srcs[r].tobytes() == before[r].tobytes()
            # in place: src and dst are one buffer
            tag += 1
            srcs = make_inputs(world, 1 << 20, "float32", "sum", seed=99)
            want = reference(srcs, "float32", "sum")
            await asyncio.gather(*(d.all_reduce(srcs[i], srcs[i], dtype="float32", op="sum", algorithm="ring",
                                                tag=tag, timeout=30) for i, d in enumerate(dps)))
            for r in range(world):
                assert srcs[r].tobytes() == want.tobytes()
            assert all(pumped(d) > 0 for d in dps)

    with nothing_left_behind():
        run(body(), timeout=55)


def test_every_stream_carries_ring_data():
    """Stripes take the streams in turn: at 4M elements over 8 streams, all 8 have moved
    payloads (on threads) in both directions."""
    async def body():
        async with cluster(2, streams=8, tcp=True) as dps:
            srcs = make_inputs(2, 4 << 20, "float32", "sum", seed=1)
            await all_reduce_all(dps, srcs, dtype="float32", op="sum", algorithm="ring", tag=1)
            for d in dps:
                assert pumped(d) == 8, pumped(d)
                kinds = {t.name.split()[0] for c in d._conns for t in c._pump.threads}
                assert kinds == {"pccl-rx", "pccl-tx"}

    with nothing_left_behind():
        run(body(), timeout=55)


def test_hundred_calls_with_a_peer_lost_midway_leave_nothing_behind():
    """100 calls among three data planes; after 40 one of them drops every connection
    mid-call (as a killed process would); the survivors fail fast, go on as two, and once
    all are closed no thread and no file descriptor of theirs is left."""
    failures: list = []

    async def body():
        async with cluster(3, tcp=True, failures=failures) as dps:
            count = 1 << 20
            srcs = [np.full(count, i + 1, np.float32) for i in range(3)]
            dsts = [np.empty(count, np.float32) for _ in range(3)]
            members = [0, 1, 2]
            epoch = 1
            for tag in range(1, 101):
                futs = {i: asyncio.ensure_future(dps[i].all_reduce(srcs[i], dsts[i], dtype="float32", op="sum",
                                                                   algorithm="ring", tag=tag, timeout=20))
                        for i in members}
                if tag == 40:
                    await asyncio.sleep(0.005)
                    for c in list(dps[2]._conns):  # gone without a word, mid-call
                        c.transport.abort()
                    futs[2].cancel()
                    res = await asyncio.gather(*(futs[i] for i in (0, 1)), return_exceptions=True)
                    assert all(isinstance(r, (PeerLost, Aborted)) for r in res), res
                    members, epoch = [0, 1], epoch + 1
                    t = topo(dps, epoch, members)
                    await asyncio.gather(*(dps[i].set_topology(t[i]) for i in members))
                    continue
                await asyncio.gather(*futs.values())
                want = float(sum(i + 1 for i in members))
                assert all(dsts[i][0] == want and dsts[i][-1] == want for i in members)
            assert {f[1] for f in failures if f[0] in (0, 1)} == {dps[2].peer_id}

    with nothing_left_behind():
        run(body(), timeout=55)


def test_stream_state_after_pumped_payloads_is_reading_again():
    """After payloads moved on threads the transport reads again (small calls still work)."""
    async def body():
        async with cluster(2, tcp=True) as dps:
            srcs = make_inputs(2, 1 << 20, "float32", "sum", seed=3)
            await all_reduce_all(dps, srcs, dtype="float32", op="sum", algorithm="ring", tag=1)
            for tag in range(2, 12):
                small = make_inputs(2, 3, "float32", "sum", seed=tag)
                dsts, _ = await all_reduce_all(dps, small, dtype="float32", op="sum", tag=tag)
                assert dsts[0].tobytes() == reference(small, "float32", "sum").tobytes()
            for d in dps:
                for c in d._conns:
                    assert isinstance(c, Stream) and not c.busy

    run(body())


# ---------------------------------------------------------------- when threads cannot be had


@pytest.mark.skipif(pump_mod.recv_fill is None, reason="the C extension is not built")
def test_a_set_stop_byte_ends_the_native_loops_before_their_next_system_call():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.sendall(b"x" * 1000)  # bytes are there to read
    stop = bytearray(b"\x01")
    buf = bytearray(1000)
    assert pump_mod.recv_fill(a.fileno(), buf, 0, 1000, stop=stop) == (0, 0)
    assert pump_mod.send_all(a.fileno(), b"h", b"payload", 0, 1000, stop) == 0
    stop[0] = 0
    assert pump_mod.recv_fill(a.fileno(), buf, 0, 1000, stop=stop) == (1000, 1000)
    a.close()
    b.close()


def test_a_stream_that_cannot_dup_its_socket_keeps_its_frames_on_the_loop(monkeypatch):
    real = pump_mod.os.dup
    calls = []

    def failing(fd):
        calls.append(fd)
        if len(calls) <= 3:
            raise OSError(24, "Too many open files")
        return real(fd)

    monkeypatch.setattr(pump_mod.os, "dup", failing)

    async def body():
        async with cluster(2, tcp=True) as dps:
            srcs = make_inputs(2, 1 << 20, "float32", "sum", seed=4)
            for tag in (1, 2):
                dsts, _ = await all_reduce_all(dps, srcs, dtype="float32", op="sum", algorithm="ring", tag=tag)
                assert all(d.tobytes() == reference(srcs, "float32", "sum").tobytes() for d in dsts)
            without = [c for d in dps for c in d._conns if c._pump is None]
            assert len(without) == 3  # those streams moved every frame on the loop

    with nothing_left_behind():
        run(body())


def test_a_thread_that_cannot_start_fails_the_call_fast_not_at_its_deadline(monkeypatch):
    def no_threads(self, kind, body):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(Pump, "_start", no_threads)

    async def body():
        async with cluster(2, tcp=True) as dps:
            srcs = make_inputs(2, 1 << 20, "float32", "sum", seed=5)
            t0 = time.monotonic()
            res = await asyncio.gather(*(d.all_reduce(srcs[i], np.empty_like(srcs[i]), dtype="float32", op="sum",
                                                      algorithm="ring", tag=1, timeout=30)
                                         for i, d in enumerate(dps)), return_exceptions=True)
            assert all(isinstance(r, (PeerLost, Aborted)) for r in res), res
            assert time.monotonic() - t0 < 5

    run(body())


def test_large_copies_on_threads_work_in_a_forked_child(monkeypatch):
    """The copy pool of a parent is not the child's: a child's first large copy must not
    wait on threads it does not have."""
    from pccl_py.client import copies

    monkeypatch.setattr(copies, "_copy_threads", lambda: 2)
    n = copies.PARALLEL_COPY_MIN * 2
    src = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    dst = np.zeros(n, np.uint8)
    copies.copy_into(dst, src)  # the parent's pool starts
    assert np.array_equal(dst, src)
    pid = os.fork()
    if pid == 0:  # child: exit code 0 only if the copy finished and is right
        try:
            signal.alarm(10)
            d2 = np.zeros(n, np.uint8)
            copies.copy_into(d2, src)
            os._exit(0 if np.array_equal(d2, src) else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


@pytest.mark.parametrize("world,quant,cpus", [(2, "uint8", 2), (3, "uint4", 16), (4, "uint8", 16)])
def test_quantized_all_reduce_with_its_work_on_the_worker_threads(world, quant, cpus, monkeypatch):
    """With threads on, quantizing, adding and decoding run on the data plane's workers (one
    on a small machine, four on 16 CPUs; work on one block stays on one of them): the same
    bytes on every peer, within the quantization bound, input untouched; a non-finite input
    still fails the call everywhere with InvalidUsage."""
    from pccl_py.daemon import dataplane as dataplane_mod
    from pccl_py.errors import InvalidUsage

    monkeypatch.setattr(dataplane_mod.os, "sched_getaffinity", lambda pid: set(range(cpus)))

    async def body():
        async with cluster(world, tcp=True) as dps:
            count = 3 * (1 << 20) + 7
            rng = np.random.default_rng(world)
            srcs = [rng.standard_normal(count).astype(np.float32) for _ in range(world)]
            before = [s.copy() for s in srcs]
            dsts, _ = await all_reduce_all(dps, srcs, dtype="float32", op="avg", quant=quant, tag=1)
            assert all(d.tobytes() == dsts[0].tobytes() for d in dsts)
            assert all(s.tobytes() == b.tobytes() for s, b in zip(srcs, before))
            exact = np.mean(np.stack(srcs).astype(np.float64), axis=0)
            levels = 255 if quant == "uint8" else 15
            spread = max(float(s.max() - s.min()) for s in srcs)
            assert np.max(np.abs(dsts[0] - exact)) <= spread / levels + np.ptp(exact) / levels
            assert max(len(d._workers or ()) for d in dps) == (4 if cpus == 16 else 1)
            srcs[0][12345] = np.inf
            res = await asyncio.gather(*(d.all_reduce(srcs[i], np.empty_like(srcs[i]), dtype="float32", op="sum",
                                                      quant=quant, tag=2, timeout=20) for i, d in enumerate(dps)),
                                       return_exceptions=True)
            assert all(isinstance(r, InvalidUsage) for r in res), res

    with nothing_left_behind():
        run(body(), timeout=55)


def test_io_threads_on_the_stock_asyncio_loop():
    async def body():
        async with cluster(3, tcp=True) as dps:
            srcs = make_inputs(3, 1 << 20, "float32", "sum", seed=8)
            dsts, _ = await all_reduce_all(dps, srcs, dtype="float32", op="sum", algorithm="ring", tag=1)
            assert all(d.tobytes() == reference(srcs, "float32", "sum").tobytes() for d in dsts)
            assert all(pumped(d) > 0 for d in dps)

    with nothing_left_behind():
        asyncio.run(asyncio.wait_for(body(), 50))


def test_a_send_thread_blocked_on_a_frozen_peer_is_woken_when_the_peer_is_removed():
    """Rank 2 never reads (frozen, or not posting): the others' send threads block in
    sendmsg once its socket buffers are full. A new epoch without rank 2 (the coordinator
    removing a frozen peer) fails their call at once and wakes those threads."""
    async def body():
        async with cluster(3, streams=2, tcp=True) as dps:
            count = 8 << 20
            srcs = make_inputs(3, count, "float32", "sum", seed=9)
            futs = [asyncio.ensure_future(dps[i].all_reduce(srcs[i], np.empty_like(srcs[i]), dtype="float32",
                                                            op="sum", algorithm="ring", tag=1, timeout=30))
                    for i in (0, 1)]
            for c in list(dps[2]._conns):
                c.transport.pause_reading()  # frozen: reads nothing more
            victim = dps[2].peer_id
            deadline = time.monotonic() + 10
            blocked = []
            while time.monotonic() < deadline and not blocked:
                await asyncio.sleep(0.05)
                blocked = [c for d in dps[:2] for c in d._conns
                           if c.peer_streams is not None and c.peer_streams.peer_id == victim and c._tx_busy]
            assert blocked, "no send thread got blocked on the frozen peer"
            threads = [t for c in blocked for t in c._pump.threads]
            t0 = time.monotonic()
            t2 = topo(dps, 2, [0, 1])
            await asyncio.gather(*(dps[i].set_topology(t2[i]) for i in (0, 1)))
            res = await asyncio.gather(*futs, return_exceptions=True)
            assert all(isinstance(r, Aborted) for r in res), res
            for t in threads:
                t.join(2)
            woke = time.monotonic() - t0
            assert not any(t.is_alive() for t in threads)
            assert woke < 1.0, f"blocked send threads took {woke:.2f}s to end"

    with nothing_left_behind():
        run(body(), timeout=55)
