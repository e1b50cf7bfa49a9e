"""optimize_topology across shaped links: four peers in network namespaces, where the ring
of the join order runs over slow links and its reverse over fast ones. Needs root and
iproute2; skipped otherwise."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO

from pccl_py import Client

sys.path.insert(0, os.path.join(REPO, "stress"))
import hosts as H  # noqa: E402

WHY = H.available()
FAST, SLOW = "200mbit", "20mbit"


def _status(hosts: H.Hosts) -> dict:
    out = subprocess.run(["ip", "netns", "exec", hosts.hub, sys.executable, "-m", "pccl_py", "status",
                          "--coordinator", hosts.coordinator, "--json"],
                         cwd=REPO, capture_output=True, timeout=30, check=True)
    return json.loads(out.stdout)


def _tc(hosts: H.Hosts, i: int, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", hosts.names[i], "tc", *args], check=True, capture_output=True, timeout=10)


def _shape(hosts: H.Hosts, i: int, slow_to: str) -> None:
    """Peer i's uplink: SLOW towards the address ``slow_to``, FAST towards everything else."""
    _tc(hosts, i, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10")
    _tc(hosts, i, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb", "rate", FAST)
    _tc(hosts, i, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:20", "htb", "rate", SLOW)
    _tc(hosts, i, "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
        "match", "ip", "dst", f"{slow_to}/32", "flowid", "1:20")


def _all_reduce(clients: list[Client], ex, n: int = 256 << 10) -> float:
    def one(c):
        x = np.ones(n, np.float32)
        t0 = time.perf_counter()
        c.all_reduce(x, timeout=30.0)
        assert (x == len(clients)).all()
        return time.perf_counter() - t0
    return max(ex.map(one, clients, timeout=60))


@pytest.mark.skipif(WHY is not None, reason=WHY or "")
@pytest.mark.timeout(60)
def test_optimize_topology_leaves_a_ring_of_slow_links_for_the_fast_one():
    n = 4
    with H.Hosts(n) as hosts:
        hosts.start_coordinator("--heartbeat-deadline", "3.0", "--probe-bytes", str(4 << 20))
        clients = [Client(daemon=hosts.start_daemon(i)[1], timeout=30.0) for i in range(n)]
        try:
            with cf.ThreadPoolExecutor(n) as ex:
                list(ex.map(lambda c: H.join(c, n), clients))
                st = _status(hosts)
                ring = [m["peer_id"] for m in sorted(st["members"], key=lambda m: m["ring_pos"])]
                host_of = {m["peer_id"]: m["host"] for m in st["members"]}
                ns_of = {addr: i for i, addr in enumerate(hosts.addr)}
                for a, b in zip(ring, ring[1:] + ring[:1], strict=True):  # every link of this ring is slow
                    _shape(hosts, ns_of[host_of[a]], host_of[b])
                before = _all_reduce(clients, ex)
                results = list(ex.map(lambda c: c.optimize_topology(timeout=30.0), clients, timeout=60))
                new = results[0]["peers"]
                assert all(r["peers"] == new and r["changed"] for r in results), [r["reason"] for r in results]
                # the reverse ring: each of its links is the reverse of a slow one, so fast
                start = ring.index(new[0])
                assert new == [ring[(start - k) % n] for k in range(n)], (ring, new, results[0]["reason"])
                after = _all_reduce(clients, ex)
                assert after < before / 3, (before, after)
                rates = {(r[0], r[1]): r[2] for r in _status(hosts)["bandwidth"]}
                slow = [rates[(a, b)] for a, b in zip(ring, ring[1:] + ring[:1], strict=True)]
                fast = [rates[(b, a)] for a, b in zip(ring, ring[1:] + ring[:1], strict=True)]
                assert max(slow) * 3 < min(fast), (slow, fast)
                print(f"all-reduce of 1 MiB: {before * 1e3:.0f} ms on the join ring, {after * 1e3:.0f} ms after "
                      f"optimize_topology; probed slow links {[round(s / 1e6, 1) for s in slow]} MB/s, "
                      f"fast {[round(f / 1e6, 1) for f in fast]} MB/s")
        finally:
            for c in clients:
                c.close()
