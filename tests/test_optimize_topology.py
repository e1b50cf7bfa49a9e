"""optimize_topology end to end on 127.0.0.1: clients, their daemons, a coordinator process."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import signal
import time

import numpy as np
import pytest
from conftest import Coordinator, free_port
from test_client import join_all

from pccl_py import Client
from pccl_py.tools.status import format_status, query_status

pytestmark = pytest.mark.timeout(120)


def start_coordinator(probe_bytes: int) -> Coordinator:
    c = Coordinator(free_port(), ["--heartbeat-deadline", "2.0", "--recovery-grace", "0.2",
                                  "--probe-bytes", str(probe_bytes), "--probe-bytes-timeout", "10"])
    c.start()
    return c


def sum_all(clients, ex) -> list[np.ndarray]:
    def body(c):
        x = np.full(1000, float(c.refresh()["rank"] + 1), np.float32)
        c.all_reduce(x, op="sum")
        return x
    return list(ex.map(body, clients, timeout=60))


@pytest.mark.parametrize("world", [3, 4])
def test_optimize_topology_agrees_and_keeps_the_epoch_when_called_again(world):
    coord = start_coordinator(256 << 10)
    clients = [Client(coordinator=coord.addr, timeout=30.0) for _ in range(world)]
    try:
        with cf.ThreadPoolExecutor(world) as ex:
            join_all(ex, clients)
            first = list(ex.map(lambda c: c.optimize_topology(), clients, timeout=60))
            assert len({r["epoch"] for r in first}) == 1
            assert len({tuple(r["peers"]) for r in first}) == 1
            assert sorted(first[0]["peers"]) == sorted(c.peer_id for c in clients)
            assert all(r["reason"].startswith("optimize_topology") for r in first)
            assert len({r["changed"] for r in first}) == 1
            status = asyncio.run(query_status(coord.addr, 5.0))
            assert len(status["bandwidth"]) == world * (world - 1)  # every directed pair measured
            assert all(row[2] > 0 for row in status["bandwidth"])
            assert "bandwidth (MB/s" in format_status(status) and "ring of group 0" in format_status(status)
            ring = [m["peer_id"] for m in sorted(status["members"], key=lambda m: m["ring_pos"])]
            assert ring == first[0]["peers"]
            outs = sum_all(clients, ex)
            expect = world * (world + 1) / 2
            assert all((x == expect).all() for x in outs)
            second = list(ex.map(lambda c: c.optimize_topology(), clients, timeout=60))
            assert {r["epoch"] for r in second} == {first[0]["epoch"]}
            assert [r["peers"] for r in second] == [first[0]["peers"]] * world
            assert not any(r["changed"] for r in second)
            assert all((x == expect).all() for x in sum_all(clients, ex))
    finally:
        for c in clients:
            c.close()
        coord.stop()


def test_a_peer_killed_during_optimize_leaves_the_survivors_a_ring_without_it():
    coord = start_coordinator(48 << 20)  # probes long enough to kill a daemon in the middle
    clients = [Client(coordinator=coord.addr, timeout=30.0) for _ in range(4)]
    victim = clients[3]
    try:
        with cf.ThreadPoolExecutor(4) as ex:
            join_all(ex, clients)
            futs = [ex.submit(c.optimize_topology) for c in clients]
            deadline = time.monotonic() + 20
            while not asyncio.run(query_status(coord.addr, 5.0))["optimizing"]:
                assert time.monotonic() < deadline, "the optimize round did not start"
                assert not all(f.done() for f in futs), "the round ended before it was seen"
                time.sleep(0.01)
            os.kill(victim._proc.pid, signal.SIGKILL)
            results = [f.result(timeout=60) for f in futs[:3]]
            assert len({r["epoch"] for r in results}) == 1
            assert len({tuple(r["peers"]) for r in results}) == 1
            assert sorted(results[0]["peers"]) == sorted(c.peer_id for c in clients[:3])
            outs = sum_all(clients[:3], ex)
            assert all((x == 6).all() for x in outs)
            status = asyncio.run(query_status(coord.addr, 5.0))
            assert not status["optimizing"]
            assert all(victim.peer_id not in row[:2] for row in status["bandwidth"])
    finally:
        for c in clients:
            c.close()
        coord.stop()
