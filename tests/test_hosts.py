"""Peers on separate hosts: each daemon in its own network namespace, listening on 0.0.0.0
as in a multi-machine run. Needs root and iproute2; skipped otherwise."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO

from pccl_py import Aborted, Client, InvalidUsage, PeerLost
from pccl_py.daemon import advertised_host

sys.path.insert(0, os.path.join(REPO, "stress"))
import hosts as H  # noqa: E402

WHY = H.available()
needs_netns = pytest.mark.skipif(WHY is not None, reason=WHY or "")


def test_advertised_host_rules(monkeypatch):
    assert advertised_host("10.1.2.3", "10.9.9.9:48148") == "10.1.2.3"
    assert advertised_host("0.0.0.0", "127.0.0.1:48148", advertise="203.0.113.7") == "203.0.113.7"
    # bound to every interface: the local end of the route to the coordinator
    assert advertised_host("0.0.0.0", "127.0.0.1:48148") == "127.0.0.1"
    assert advertised_host("", "127.0.0.1:48148") == "127.0.0.1"

    def no_route(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", no_route)
    with pytest.raises(InvalidUsage, match="--advertise"):
        advertised_host("0.0.0.0", "127.0.0.1:48148")


def _status(hosts: H.Hosts) -> dict:
    out = subprocess.run(["ip", "netns", "exec", hosts.hub, sys.executable, "-m", "pccl_py.cli", "status",
                          "--coordinator", hosts.coordinator, "--json"],
                         cwd=REPO, capture_output=True, timeout=30, check=True)
    return json.loads(out.stdout)


@needs_netns
@pytest.mark.timeout(180)
def test_peers_on_separate_hosts_advertise_their_own_address_and_use_tcp():
    n = 3
    with H.Hosts(n, rate="1gbit") as hosts:
        hosts.start_coordinator("--heartbeat-deadline", "2.0")
        paths = [hosts.start_daemon(i)[1] for i in range(n)]
        clients = [Client(daemon=p, timeout=30.0) for p in paths]
        try:
            with cf.ThreadPoolExecutor(n) as ex:
                topos = list(ex.map(lambda c: H.join(c, n), clients))
                st = _status(hosts)
                advertised = sorted(m["host"] for m in st["members"])
                assert advertised == sorted(hosts.addr), st  # not 0.0.0.0: what the peers dial

                def body(i: int):
                    rank = topos[i]["rank"]
                    big = np.full(300_001, rank + 1.0, np.float32)
                    small = np.full(3, rank + 1.0, np.float32)
                    q = np.linspace(-1, 1, 50_000, dtype=np.float32) * (rank + 1)
                    return (clients[i].all_reduce(big), big, clients[i].all_reduce(small), small,
                            clients[i].all_reduce(q, quant="uint8"), q)

                res = list(ex.map(body, range(n)))

                # shared state: the odd one out fetches the popular state over the TCP
                # transfer server its peers advertise (the same address as their data plane)
                rng = np.random.default_rng(7)
                good = rng.standard_normal(200_000).astype(np.float32)
                states = [c.shared_state({"w": good if i < 2 else np.zeros_like(good)})
                          for i, c in enumerate(clients)]
                syncs = list(ex.map(lambda i: clients[i].sync_shared_state(states[i], timeout=30.0), range(n)))
            total = n * (n + 1) / 2
            for info_big, big, info_small, small, info_q, q in res:
                # separate hosts: never the shared-memory path, whatever /dev/shm says
                assert info_big["algorithm"] == "ring" and np.all(big == total)
                assert info_small["algorithm"] == "tree" and np.all(small == total)
                assert info_q["algorithm"] == "quant"
                ref = np.linspace(-1, 1, 50_000, dtype=np.float32) * total
                assert np.max(np.abs(q - ref)) < 2 * total * 2.0 / 255
            assert res[0][5].tobytes() == res[1][5].tobytes() == res[2][5].tobytes()
            assert [r["status"] for r in syncs] == ["in_sync", "in_sync", "fetched"], syncs
            assert syncs[2]["rx_bytes"] == good.nbytes
            assert np.array_equal(states[2]["w"], good)
        finally:
            for c in clients:
                c.close()


@needs_netns
@pytest.mark.timeout(180)
def test_daemon_killed_on_another_host_survivors_fail_then_retry():
    n = 3
    with H.Hosts(n) as hosts:
        hosts.start_coordinator("--heartbeat-deadline", "2.0")
        started = [hosts.start_daemon(i) for i in range(n)]
        clients = [Client(daemon=path, timeout=30.0) for _, path in started]
        try:
            with cf.ThreadPoolExecutor(n) as ex:
                list(ex.map(lambda c: H.join(c, n), clients))
                xs = [np.ones(4_000_000, np.float32) for _ in range(2)]
                # the victim never calls: its daemon dies while the survivors wait on it
                futs = [ex.submit(clients[i].all_reduce, xs[i]) for i in range(2)]
                time.sleep(0.3)
                t_kill = time.monotonic()
                os.kill(started[2][0].pid, signal.SIGKILL)
                for f in futs:
                    with pytest.raises((PeerLost, Aborted)):
                        f.result(timeout=30)
                detect = time.monotonic() - t_kill
                assert all(np.all(x == 1.0) for x in xs), "a failed call must leave the input untouched"
                infos = list(ex.map(lambda i: clients[i].all_reduce(xs[i], retry=True), range(2)))
            assert detect < 5.0, f"survivors noticed the death after {detect:.2f}s"
            assert [i["world_size"] for i in infos] == [2, 2]
            assert all(np.all(x == 2.0) for x in xs)
        finally:
            for c in clients[:2]:
                c.close()
