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
from pccl_py.transport.addresses import advertised_host

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


def test_a_loopback_address_is_not_advertised_to_a_coordinator_elsewhere():
    """A daemon that listens on loopback cannot be reached from other machines: with a
    coordinator that is not on this machine's loopback it is refused up front, with what to
    set (no address outside 127.0.0.0/8 is contacted: these are numeric, nothing resolves)."""
    for listen in ("127.0.0.1", "127.0.0.5", "::1"):
        with pytest.raises(InvalidUsage, match=r"loopback.*0\.0\.0\.0:PORT.*advertise"):
            advertised_host(listen, "10.9.9.9:48148")
    assert advertised_host("127.0.0.1", "127.0.0.1:48148") == "127.0.0.1"  # a run on one machine
    assert advertised_host("127.0.0.1", "[::1]:48148") == "127.0.0.1"
    assert advertised_host("127.0.0.1", "10.9.9.9:48148", advertise="10.1.1.1") == "10.1.1.1"


def test_the_daemon_refuses_a_loopback_listen_with_a_remote_coordinator_before_any_traffic():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pccl_py.daemon", "--coordinator", "10.9.9.9:48148",
                          "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "loopback" in out.stderr and "--listen 0.0.0.0:PORT" in out.stderr, out.stderr[-2000:]


def test_link_timeout_reaches_the_data_plane():
    from pccl_py.daemon.service import Daemon

    d = Daemon(coordinator="127.0.0.1:1", link_timeout=3.5, shm=False)
    assert d.data.config.user_timeout == 3.5 and d.data.config.shm is False
    assert Daemon(coordinator="127.0.0.1:1").data.config.user_timeout == 10.0
    with pytest.raises(InvalidUsage, match="link_timeout"):
        Daemon(coordinator="127.0.0.1:1", link_timeout=-1.0)


def _status(hosts: H.Hosts) -> dict:
    out = subprocess.run(["ip", "netns", "exec", hosts.hub, sys.executable, "-m", "pccl_py", "status",
                          "--coordinator", hosts.coordinator, "--json"],
                         cwd=REPO, capture_output=True, timeout=30, check=True)
    return json.loads(out.stdout)


def _ns(hosts: H.Hosts, i: int, *cmd: str) -> None:
    subprocess.run(["ip", "netns", "exec", hosts.names[i], *cmd], check=True, capture_output=True, timeout=10)


def _three(hosts: H.Hosts) -> list[Client]:
    """A coordinator, a daemon per namespace, a client each, all members."""
    hosts.start_coordinator("--heartbeat-deadline", "2.0")
    clients = [Client(daemon=hosts.start_daemon(i)[1], timeout=30.0) for i in range(3)]
    with cf.ThreadPoolExecutor(3) as ex:
        list(ex.map(lambda c: H.join(c, 3), clients))
    return clients


def _round(clients: list[Client], value: float = 1.0) -> list:
    """One all-reduce with retry on every client; returns (info, result) or the exception."""
    def one(c):
        x = np.full(200_000, value, np.float32)
        try:
            return c.all_reduce(x, retry=True, timeout=20.0), x
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            return exc

    with cf.ThreadPoolExecutor(len(clients)) as ex:
        return list(ex.map(one, clients))


@needs_netns
@pytest.mark.timeout(180)
def test_peers_on_separate_hosts_advertise_their_own_address_and_use_tcp():
    n = 3
    with H.Hosts(n, rate="1gbit") as hosts:
        clients = _three(hosts)
        try:
            topos = [c.refresh() for c in clients]
            with cf.ThreadPoolExecutor(n) as ex:
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
                assert info_small["algorithm"] == "direct" and np.all(small == total)
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
        clients = _three(hosts)
        try:
            with cf.ThreadPoolExecutor(n) as ex:
                xs = [np.ones(4_000_000, np.float32) for _ in range(2)]
                # the victim never calls: its daemon dies while the survivors wait on it
                futs = [ex.submit(clients[i].all_reduce, xs[i]) for i in range(2)]
                time.sleep(0.3)
                t_kill = time.monotonic()
                os.kill(clients[2].daemon_pid, signal.SIGKILL)
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


@needs_netns
@pytest.mark.timeout(120)
def test_data_link_reset_between_live_peers_gets_fresh_links():
    """A data link between two live peers breaks (a middlebox resets it). Both still talk
    to the coordinator, so nobody is removed: a new epoch with the same members gives every
    daemon fresh links, and calls with retry go on at full world size."""
    with H.Hosts(3) as hosts:
        clients = _three(hosts)
        try:
            assert all(r[0]["world_size"] == 3 for r in _round(clients))
            epoch = clients[0].refresh()["epoch"]
            _ns(hosts, 0, "ss", "-K", "dst", hosts.addr[1])  # reset every connection 0 -> 1
            t0 = time.monotonic()
            res = _round(clients)
            took = time.monotonic() - t0
            for r in res:
                assert not isinstance(r, Exception), r
                assert r[0]["world_size"] == 3 and np.all(r[1] == 3.0)
            info = clients[2].refresh()
            assert info["epoch"] > epoch and info["world_size"] == 3
            print(f"\nlink reset between live peers -> a call at full world size after {took:.3f} s")
            assert took < 10.0, f"recovered after {took:.1f}s"
        finally:
            for c in clients:
                c.close()


@needs_netns
@pytest.mark.timeout(180)
def test_blackholed_link_between_live_peers_is_replaced_then_a_member_dropped():
    """Everything peer 0 sends to peer 1 is silently dropped (no reset ever comes). The
    kernel closes the stalled link (TCP user timeout), the new epoch's fresh link cannot
    connect either, and after the pair broke a few times one of the two is removed, so the
    run goes on with two peers instead of timing out forever."""
    with H.Hosts(3) as hosts:
        clients = _three(hosts)
        try:
            assert all(r[0]["world_size"] == 3 for r in _round(clients))
            # packets for peer 1 go to a class that sends 8 bit/s: they sit in its queue
            tc = ["tc"]
            _ns(hosts, 0, *tc, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "1")
            _ns(hosts, 0, *tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:1", "htb",
                "rate", "10gbit")
            _ns(hosts, 0, *tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:99", "htb",
                "rate", "8bit", "ceil", "8bit")
            _ns(hosts, 0, *tc, "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1",
                "u32", "match", "ip", "dst", f"{hosts.addr[1]}/32", "classid", "1:99")
            t0 = time.monotonic()
            deadline = t0 + 120
            while True:
                res = _round(clients)
                ok = [r for r in res if not isinstance(r, Exception)]
                if len(ok) == 2 and all(r[0]["world_size"] == 2 and np.all(r[1] == 2.0) for r in ok):
                    break  # the two that remain completed a call together
                assert time.monotonic() < deadline, res
            print(f"\nblackholed link -> two peers complete a call together after {time.monotonic() - t0:.1f} s")
            survivors = [c for c, r in zip(clients, res) if not isinstance(r, Exception)]
            assert clients[2] in survivors  # peer 2's links were never cut
        finally:
            for c in clients:
                c.close()


def test_a_client_refuses_a_loopback_listen_with_a_remote_coordinator_before_spawning():
    from pccl_py import Client

    with pytest.raises(InvalidUsage, match=r"loopback.*0\.0\.0\.0:PORT"):
        Client(coordinator="10.9.9.9:48148")  # the default listen is 127.0.0.1:0: no daemon starts
