"""Unauthenticated connections flooding a data port (docs/dataplane.md "Connections and
handshake"; DESIGN.md section 8).

Claims attacked: connections that never prove the secret (idle ones, a slowloris sending a
plausible HELLO one byte a second, garbage, many at once) cost a data plane nothing lasting:
the legitimate peers' all-reduce keeps working during the flood with exact results, every
such connection is closed by the handshake timeout or at its first bad byte, nothing
crashes, and file descriptors and threads come back to where they were. The log lines the
flood produced are counted (printed; see the report).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

import numpy as np
import pytest
from test_dataplane import cluster, make_inputs, reference, run

from pccl_py.daemon.dataplane import DataPlaneConfig, same_host_address
from pccl_py.wire import frames as F

pytestmark = pytest.mark.timeout(60)

IDLE, SLOW, GARBAGE, UNIX = 100, 60, 100, 40  # 300 at once


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _open(target):
    if isinstance(target, int):
        return await asyncio.open_connection("127.0.0.1", target)
    return await asyncio.open_unix_connection(target)


async def attacker(kind: str, target, stop: asyncio.Event, closed: list) -> None:
    """One unauthenticated connection; appends how long it lived once the data plane closed it
    (garbage: from its garbage on)."""
    t0 = time.monotonic()
    try:
        r, w = await _open(target)
    except OSError:
        closed.append(("refused", 0.0))
        return
    t0 = time.monotonic()  # (a connect beyond the listen backlog waits for a SYN retry first)
    try:
        if kind == "garbage":
            await r.readexactly(F.CHALLENGE_S.size)
            t0 = time.monotonic()  # (a connect beyond the listen backlog waits for a SYN retry first)
            w.write(os.urandom(F.HELLO_FIXED.size + 50))
        elif kind == "slow":  # a plausible HELLO, one byte a second, never finished in time
            hello = F.encode_hello(b"no secret", b"c" * 32, "slowpoke", 1, 0, 1, 1, b"n" * 32)
            for b in hello:
                if stop.is_set() or w.is_closing():
                    break
                w.write(bytes([b]))
                try:  # a second between bytes, watching for the data plane hanging up
                    if not await asyncio.wait_for(r.read(4096), 1.0):
                        break
                except asyncio.TimeoutError:
                    pass
        # idle: nothing at all
        while not stop.is_set():
            data = await r.read(4096)
            if not data:
                break
    except (ConnectionError, asyncio.IncompleteReadError, RuntimeError):  # (uvloop: written after the close)
        pass
    finally:
        closed.append((kind, time.monotonic() - t0))
        w.transport.abort()


def test_a_flood_of_unauthenticated_connections_leaves_the_run_working(caplog, capsys):
    caplog.set_level(logging.INFO, logger="pccl.dataplane")
    cfg = DataPlaneConfig(io_threads=True, bulk_min=64 << 10)

    async def body():
        async with cluster(2, config=cfg, tcp_only=[0]) as dps:  # the real link is TCP, to the flooded port
            srcs_small = make_inputs(2, 1000, "int64", "sum", seed=1)
            srcs_big = make_inputs(2, 1 << 18, "float32", "sum", seed=2)
            for tag in (90_001, 90_002):  # warm: the real streams' I/O threads start on first use
                dsts = [np.zeros_like(s) for s in srcs_big]
                await asyncio.gather(*(d.all_reduce(srcs_big[i], dsts[i], dtype="float32", op="sum", tag=tag,
                                                    algorithm="ring", timeout=5) for i, d in enumerate(dps)))
            fd0, threads0 = fds(), threading.active_count()
            stop = asyncio.Event()
            closed: list = []
            port, upath = dps[1].port, same_host_address("127.0.0.1", dps[1].port)
            kinds = ["idle"] * IDLE + ["slow"] * SLOW + ["garbage"] * GARBAGE
            tasks = [asyncio.ensure_future(attacker(k, port, stop, closed)) for k in kinds]
            tasks += [asyncio.ensure_future(attacker("idle", upath, stop, closed)) for _ in range(UNIX)]
            await asyncio.sleep(0.3)
            peak = fds()
            # the real peers keep working throughout the flood
            calls, worst, tag = 0, 0.0, 0
            t_end = time.monotonic() + 6.0
            while time.monotonic() < t_end:
                for srcs, dtype in ((srcs_small, "int64"), (srcs_big, "float32")):
                    tag += 1
                    dsts = [np.zeros_like(s) for s in srcs]
                    t0 = time.monotonic()
                    await asyncio.gather(*(d.all_reduce(srcs[i], dsts[i], dtype=dtype, op="sum", algorithm="ring",
                                                        tag=tag, timeout=5) for i, d in enumerate(dps)))
                    worst = max(worst, time.monotonic() - t0)
                    want = reference(srcs, dtype, "sum")
                    assert all(d.tobytes() == want.tobytes() for d in dsts)
                    calls += 1
            # every flood connection was closed by the data plane (handshake timeout: 5 s)
            deadline = time.monotonic() + 3.0
            while len(closed) < len(tasks) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.wait(tasks, timeout=3)
            lived = {k: max((t for kk, t in closed if kk == k), default=0.0) for k in ("idle", "slow", "garbage")}
            assert len(closed) == len(tasks), f"{len(tasks) - len(closed)} flood connections still open"
            assert lived["garbage"] < 0.5 and lived["slow"] < 6.5 and lived["idle"] < 6.5, lived
            await asyncio.sleep(0.2)
            assert len(dps[1]._conns) == 2, "connections other than the real link's two streams remain"
            assert fds() <= fd0 + 2, (fd0, fds())
            assert threading.active_count() <= threads0 + 1, (threads0, threading.active_count())
            # and afterwards
            dsts = [np.zeros_like(s) for s in srcs_big]
            await asyncio.gather(*(d.all_reduce(srcs_big[i], dsts[i], dtype="float32", op="sum", tag=10_000,
                                                timeout=5) for i, d in enumerate(dps)))
            assert all(d.tobytes() == reference(srcs_big, "float32", "sum").tobytes() for d in dsts)
            return calls, worst, peak - fd0, fd0

    calls, worst, extra_fds, fd0 = run(body())
    lines = [r for r in caplog.records if r.name == "pccl.dataplane" and "closing data connection" in r.getMessage()]
    n = IDLE + SLOW + GARBAGE + UNIX
    with capsys.disabled():
        print(f"\n[flood] {n} unauthenticated connections: {calls} exact all-reduces meanwhile (slowest "
              f"{worst * 1000:.0f} ms), {extra_fds} extra fds at the peak over {fd0}, {len(lines)} "
              f"'closing data connection' log lines")
    assert calls >= 10
    warned = [r for r in lines if r.levelno >= logging.WARNING]
    summaries = [r for r in caplog.records if r.name == "pccl.dataplane" and "refused in the last" in r.getMessage()]
    assert not warned, "a warning per flood connection"
    assert 1 <= len(summaries) <= 8, [r.getMessage() for r in summaries]


@pytest.mark.parametrize("io_threads", [False, True], ids=["loop", "threads"])
def test_an_unauthenticated_connection_holds_one_descriptor(io_threads):
    n = 100
    cfg = DataPlaneConfig(io_threads=io_threads, bulk_min=64 << 10, max_pending_per_address=n + 10)  # all wait

    async def body():
        async with cluster(1, config=cfg) as dps:
            dp = dps[0]
            base_fds, base_conns = fds(), len(dp._conns)
            conns = [await asyncio.open_connection("127.0.0.1", dp.port) for _ in range(n)]
            try:
                deadline = time.monotonic() + 5
                while len(dp._conns) < base_conns + n:
                    assert time.monotonic() < deadline, "the connections were not all accepted"
                    await asyncio.sleep(0.01)
                extra = fds() - base_fds - n  # less our own ends
            finally:
                for _, w in conns:
                    w.transport.abort()
            return extra

    extra = run(body())
    assert extra <= n * 1.1, f"{n} unauthenticated connections hold {extra} descriptors in the data plane"
