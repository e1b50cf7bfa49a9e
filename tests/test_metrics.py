"""Prometheus metrics (pccl_py/metrics.py): what is counted, and the served endpoint."""

from __future__ import annotations

import urllib.request

import pytest

pytest.importorskip("prometheus_client")

from pccl_py.errors import Aborted  # noqa: E402
from pccl_py.metrics import Metrics  # noqa: E402

pytestmark = pytest.mark.timeout(30)


def value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in the exposition:\n{text}")


def test_calls_bytes_and_recovery_are_counted():
    m = Metrics("daemon")
    m.call_done("all_reduce", {"algorithm": "ring", "tx_bytes": 100, "rx_bytes": 90}, None, 0.01, now=10.0)
    m.call_done("all_reduce", None, Aborted("x"), 0.5, now=11.0)
    m.call_done("all_reduce", None, Aborted("x"), 0.5, now=11.5)  # still failing: recovery counts from 11.0
    m.call_done("all_reduce", {"algorithm": "ring", "tx_bytes": 5, "rx_bytes": 5}, None, 0.01, now=12.25)
    t = m.text()
    assert value(t, 'pccl_calls_total{algorithm="ring",op="all_reduce",outcome="ok"}') == 2
    assert value(t, 'pccl_calls_total{algorithm="-",op="all_reduce",outcome="Aborted"}') == 2
    assert value(t, 'pccl_bytes_total{direction="tx"}') == 105
    assert value(t, "pccl_recovery_seconds_sum") == 1.25 and value(t, "pccl_recovery_seconds_count") == 1


def test_coordinator_status_sets_members_and_forgets_peers_that_left():
    m = Metrics("coordinator")
    member = {"peer_id": "a", "state": "accepted", "hb_age": 0.25}
    m.status({"epoch": 3, "members": [member, {**member, "peer_id": "b", "hb_age": 1.5},
                                      {**member, "peer_id": "c", "state": "pending"}]})
    t = m.text()
    assert value(t, "pccl_epoch") == 3 and value(t, 'pccl_members{state="accepted"}') == 2
    assert value(t, 'pccl_heartbeat_age_seconds{peer="b"}') == 1.5
    m.status({"epoch": 4, "members": [member]})
    t = m.text()
    assert value(t, 'pccl_members{state="pending"}') == 0 and value(t, 'pccl_members{state="accepted"}') == 1
    assert 'peer="b"' not in t and value(t, "pccl_epoch") == 4


def test_the_endpoint_serves_this_process_numbers_only():
    a, b = Metrics("daemon"), Metrics("daemon")
    a.world_size.set(3)
    port = a.serve(0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            body = r.read().decode()
        assert value(body, "pccl_world_size") == 3
        assert value(b.text(), "pccl_world_size") == 0  # a registry of its own
    finally:
        a.close()


def test_a_daemon_serves_its_calls_and_epoch(coordinator):
    import numpy as np
    from conftest import free_port, stop_process
    from test_lease import start_daemon

    from pccl_py import Client

    port = free_port()
    proc, path = start_daemon(coordinator, "--metrics-port", str(port))
    try:
        with Client(daemon=path) as c:
            c.connect()
            x = np.ones(64, np.float32)
            for _ in range(3):
                c.all_reduce(x, op="sum")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                body = r.read().decode()
        assert value(body, 'pccl_calls_total{algorithm="single",op="all_reduce",outcome="ok"}') == 3
        assert value(body, "pccl_epoch") >= 1 and value(body, "pccl_world_size") == 1
    finally:
        stop_process(proc)


def test_the_coordinator_serves_its_members_and_epoch(tmp_path):
    import subprocess
    import sys
    import time

    from conftest import free_port, stop_process

    from pccl_py import Client

    addr, mport = f"127.0.0.1:{free_port()}", free_port()
    coord = subprocess.Popen([sys.executable, "-m", "pccl_py.coordinator", "--listen", addr, "--metrics-port",
                              str(mport), "--log-format", "json"], stdout=subprocess.DEVNULL,
                             stderr=open(tmp_path / "coord.log", "w"))
    try:
        with Client(coordinator=addr) as c:
            c.connect()
            deadline = time.monotonic() + 20
            body = ""
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                        body = r.read().decode()
                except OSError:
                    body = ""
                if 'pccl_members{state="accepted"} 1.0' in body:
                    break
                time.sleep(0.2)
            assert value(body, 'pccl_members{state="accepted"}') == 1 and value(body, "pccl_epoch") >= 1
            assert f'pccl_heartbeat_age_seconds{{peer="{c.refresh()["peer_id"]}"}}' in body
    finally:
        stop_process(coord)
    first = (tmp_path / "coord.log").read_text().splitlines()[0]
    assert '"role": "coordinator"' in first  # --log-format json: one object per line


def test_bytes_per_link_and_direction(coordinator):
    import concurrent.futures as cf

    import numpy as np
    from conftest import free_port, stop_process
    from test_lease import join, start_daemon

    from pccl_py import Client

    ports = [free_port(), free_port()]
    daemons = [start_daemon(coordinator, "--metrics-port", str(p), "--tcp-only") for p in ports]
    try:
        clients = [Client(daemon=path) for _, path in daemons]
        try:
            with cf.ThreadPoolExecutor(2) as ex:
                join(ex, clients, 2)
                x = [np.ones(1 << 18, np.float32) for _ in clients]
                list(ex.map(lambda i: clients[i].all_reduce(x[i], algorithm="ring"), range(2)))
            ids = [c.refresh()["peer_id"] for c in clients]
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/metrics", timeout=5) as r:
                body = r.read().decode()
        finally:
            for c in clients:
                c.close()
        sent = value(body, f'pccl_link_bytes_total{{direction="tx",peer="{ids[1]}"}}')
        got = value(body, f'pccl_link_bytes_total{{direction="rx",peer="{ids[1]}"}}')
        assert 1 << 20 <= sent < 2 << 20 and 1 << 20 <= got < 2 << 20  # half of 1 MiB twice, plus headers
        assert f'peer="{ids[0]}"' not in body  # no link to itself
    finally:
        for proc, _ in daemons:
            stop_process(proc)


def test_rejected_connections_are_counted_per_listener():
    d = Metrics("daemon")
    d.rejected("state")("bad_proof")
    d.rejected("state")("bad_proof")
    d.rejected("data")("timeout")
    t = d.text()
    assert value(t, 'pccl_rejected_connections_total{port="state",reason="bad_proof"}') == 2
    assert value(t, 'pccl_rejected_connections_total{port="data",reason="timeout"}') == 1
    c = Metrics("coordinator")  # its one listener, the control port: by reason alone
    c.rejected("control")("wrong_secret")
    assert value(c.text(), 'pccl_rejected_connections_total{port="control",reason="wrong_secret"}') == 1
