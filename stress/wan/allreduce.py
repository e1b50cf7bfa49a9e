"""All-reduce through pccl_py between peers joined by emulated internet paths.

    python stress/wan/allreduce.py --peers 2 --rtt-ms 20 --rate-mbit 200 --flow-cap 1/8 --sizes 1M,4M

Each daemon runs in its own namespace of a WanPaths (docs/wan.md), listening on 0.0.0.0;
the coordinator runs in peer 0's namespace; the trainers stay in this namespace and reach
their daemons through unix sockets (as in stress/hosts.py, whose benchmark loop this
reuses). Prints, per size, the median all-reduce time and the bus bandwidth against the
path's rate. Needs root and gcc.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # stress/: wan, hosts
import hosts as H  # noqa: E402

from wan.measure import goodput, goodput_both_ways, parse_fraction  # noqa: E402
from wan.paths import WanPaths  # noqa: E402

COORD_PORT = H.COORD_PORT


class Peers:
    """What hosts.run_ours needs of a set of hosts, on a WanPaths."""

    def __init__(self, net: WanPaths, log: str | None) -> None:
        self.net = net
        self.dir = tempfile.mkdtemp(prefix="pccl-wan-")
        self.coordinator = f"{net.addr(0)}:{COORD_PORT}"
        self.log = log

    @property
    def addr(self) -> list[str]:
        return [self.net.addr(i) for i in range(self.net.n)]

    def spawn(self, i: int, argv: list[str], **kw) -> subprocess.Popen:
        return self.net.popen(i, argv, cwd=H.REPO, **kw)

    def start_coordinator(self) -> None:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115 - the child holds it
        p = self.net.popen(0, [sys.executable, "-m", "pccl_py.coordinator", "--listen", self.coordinator],
                           stdout=out, stderr=out, cwd=H.REPO)
        if self.log:
            out.close()
        probe = f"import socket; socket.create_connection(('{self.net.addr(0)}', {COORD_PORT}), 0.5)"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # the port is inside the namespace: probe from there
            if self.net.run(0, [sys.executable, "-c", probe], capture_output=True, timeout=10).returncode == 0:
                return
            if p.poll() is not None:
                raise RuntimeError(f"the coordinator exited with code {p.returncode}")
            time.sleep(0.05)
        raise TimeoutError("the coordinator did not listen within 15 s")

    def start_daemon(self, i: int, *extra: str) -> tuple[subprocess.Popen, str]:
        path = os.path.join(self.dir, f"d{i}.sock")
        p = self.net.popen(i, [sys.executable, "-m", "pccl_py.daemon", "--coordinator", self.coordinator,
                               "--listen", "0.0.0.0:0", "--ipc", path, *extra], stdout=subprocess.PIPE, cwd=H.REPO)
        H.wait_ready(p, f"daemon {i}")
        return p, path

    def close(self) -> None:
        for f in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, f))
        os.rmdir(self.dir)


def run_topology(peers: Peers, n: int, count: int, repeat: int, rates: dict[tuple[int, int], float]) -> dict:
    """Peers admitted one by one (so the ring is the join order), ``repeat`` timed calls,
    ``optimize_topology()`` on every peer, ``repeat`` timed calls again."""
    import concurrent.futures as cf
    import itertools

    import numpy as np

    from pccl_py.client.client import Client

    paths = [peers.start_daemon(i)[1] for i in range(n)]
    clients = [Client(daemon=p, timeout=120.0) for p in paths]
    index = {}
    try:
        with cf.ThreadPoolExecutor(n) as ex:
            clients[0].connect()
            for k in range(1, n):  # one admission per vote: the ring grows in this order
                joining = ex.submit(clients[k].connect)
                while list(ex.map(lambda c: c.update_topology(), clients[:k]))[0]["world_size"] <= k:
                    pass  # every member votes until the vote that admitted it
                joining.result()
            for c in clients:
                index[c.refresh()["peer_id"]] = len(index)
            xs = [np.ones(count, np.float32) for _ in clients]

            def timed() -> list[float]:
                out = []
                for _ in range(repeat + 1):
                    t0 = time.perf_counter()
                    list(ex.map(lambda i: clients[i].all_reduce(xs[i]), range(n)))
                    out.append(time.perf_counter() - t0)
                    for x in xs:
                        x[:] = 1.0
                return out[1:]  # the first is a warm-up

            ring_before = [index[p] for p in clients[0].refresh()["peers"]]
            before = timed()
            t0 = time.perf_counter()
            views = list(ex.map(lambda c: c.optimize_topology(timeout=120.0), clients))
            optimize_s = time.perf_counter() - t0
            ring_after = [index[p] for p in clients[0].refresh()["peers"]]
            after = timed()
    finally:
        for c in clients:
            c.close()

    def bottleneck(ring):
        return min(rates[(a, b)] for a, b in zip(ring, ring[1:] + ring[:1]))

    best = max(bottleneck([0, *perm]) for perm in itertools.permutations(range(1, n)))
    return {"ring_before": ring_before, "ring_after": ring_after, "before": before, "after": after,
            "changed": views[0].get("changed"), "reason": views[0].get("reason"), "optimize_s": optimize_s,
            "bottleneck_before": bottleneck(ring_before), "bottleneck_after": bottleneck(ring_after),
            "best_bottleneck": best}


def main(argv: list[str] | None = None) -> int:
    from pccl_py.tools.bench.allreduce import parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--rate-mbit", type=float, default=200.0, help="each path's bottleneck; 0: unlimited")
    ap.add_argument("--flow-cap", default=None, help="per-flow cap as a share of the rate, e.g. 1/8")
    ap.add_argument("--windows", choices=["stock", "large"], default="stock")
    ap.add_argument("--cc", default=None, help="every namespace's default CC (default: the kernel's)")
    ap.add_argument("--streams", type=int, default=None, help="TCP streams per link (daemon default if unset)")
    ap.add_argument("--quant", choices=["uint8", "uint4"], default=None)
    ap.add_argument("--sizes", default="1M,4M", help="float32 elements, comma separated (K/M suffixes)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--alloc", action="store_true", help="tensors from Client.alloc: no copy into or out of "
                                                         "the daemon's shared memory (as a tuned trainer does)")
    ap.add_argument("--log", default=None, help="the coordinator's log")
    ap.add_argument("--warmup", type=int, default=10,
                    help="untimed calls per size first (links set up, stream counts settled; default 10)")
    ap.add_argument("--idle", type=float, default=0.0,
                    help="then time one call after this many seconds without traffic")
    ap.add_argument("--compare", choices=["gloo"], default=None, help="gloo through the same paths")
    ap.add_argument("--raw", action="store_true", help="raw TCP goodput between peers 0 and 1 with 1 and 8 "
                    "flows, one way and both ways at once (as a ring of two loads the path)")
    ap.add_argument("--slow-ring", type=float, default=None, metavar="MBIT",
                    help="the join-order ring's pairs (i, i+1) at this rate, the others at --rate-mbit; "
                         "time the first size, call optimize_topology() on every peer, time it again")
    ap.add_argument("--no-idle-restart", action="store_true",
                    help="net.ipv4.tcp_slow_start_after_idle=0 in every namespace (what operations.md advises)")
    a = ap.parse_args(argv)
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    rate = a.rate_mbit * 1e6 if a.rate_mbit else None
    n = a.peers
    slow = {(i, (i + 1) % n): (a.rtt_ms, a.slow_ring) for i in range(n)} if a.slow_ring else None
    if slow:
        return topology_main(a, n, sizes[0], slow)
    with WanPaths(n, rtt_ms=a.rtt_ms, rate_mbit=a.rate_mbit or None, flow_cap_fraction=parse_fraction(a.flow_cap),
                  windows=a.windows, cc=a.cc) as net:
        if a.no_idle_restart:
            for i in range(n):
                net.run(i, ["sysctl", "-qw", "net.ipv4.tcp_slow_start_after_idle=0"], check=True, timeout=10)
        peers = Peers(net, a.log)
        try:
            peers.start_coordinator()
            rows = H.run_ours(peers, n, sizes, a.repeat, a.streams, a.quant, warmup=a.warmup, idle=a.idle,
                             alloc=a.alloc)
            gloo = H.run_gloo(peers, n, sizes, a.repeat, ifname="wan0") if a.compare else None
            raw = {k: goodput(net, 0, 1, k, 8.0, 2.0) for k in (1, 8)} if a.raw else None
            both = {k: goodput_both_ways(net, 0, 1, k, 8.0, 2.0) for k in (1, 8)} if a.raw else None
            st = net.stats()
            tcp = [net.tcp_counters(i) for i in range(n)]
        finally:
            peers.close()
    cc = a.cc or "kernel default"
    print(f"{n} peers over emulated paths: rtt {a.rtt_ms:g} ms, "
          f"{f'{a.rate_mbit:g} Mbit/s' if rate else 'unlimited'} per direction, per-flow cap {a.flow_cap or 'none'}, "
          f"windows {a.windows}, cc {cc}, slow start after idle {'off' if a.no_idle_restart else 'kernel default'}; streams {a.streams or 'default'}, quant {a.quant}{', Client.alloc tensors' if a.alloc else ''}; medians of {a.repeat}; "
          f"delay line drops {sum(p['drop_pkts'] for p in st['paths'])}, CPU {st['cpu_s']:.1f} s")
    if raw:
        for k, r in raw.items():
            bps = r["bits_per_s"]
            print(f"raw TCP, {k} flow(s) peer 0 -> 1: {bps / 1e6:.1f} Mbit/s"
                  f"{f' ({bps / rate:.0%} of the rate)' if rate else ''}")
        for k, (ab, ba) in both.items():
            print(f"raw TCP both ways at once, {k} flow(s) each way: 0 -> 1 {ab / 1e6:.1f}, 1 -> 0 {ba / 1e6:.1f} "
                  f"Mbit/s{f' ({ab / rate:.0%}, {ba / rate:.0%} of the rate)' if rate else ''}")
    for i, c in enumerate(tcp):
        print(f"peer {i} TCP: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    head = f"{'elements':>10} {'bytes':>10} {'algo':>5} {'median s':>9} {'busbw Mbit/s':>13} {'of rate':>8}"
    head += f" {'idle s':>7} {'idle x':>6}" if a.idle else ""
    print(head + (f" {'gloo s':>8} {'gloo Mbit/s':>12} {'ratio':>6}" if gloo else ""))
    for k, row in enumerate(rows):
        med = statistics.median(row["times"])
        busbw = 2 * (n - 1) / n * 4 * row["size"] * 8 / med
        share = f"{busbw / rate:.0%}" if rate else "-"
        line = (f"{row['size']:>10} {4 * row['size']:>10} {row['algorithm']:>5} {med:>9.3f} {busbw / 1e6:>13.1f} "
                f"{share:>8}")
        if a.idle:
            line += f" {row['idle_time']:>7.3f} {row['idle_time'] / med:>5.2f}x"
        if gloo:
            gmed = statistics.median(gloo[k]["times"])
            gbus = 2 * (n - 1) / n * 4 * row["size"] * 8 / gmed
            line += f" {gmed:>8.3f} {gbus / 1e6:>12.1f} {gmed / med:>5.2f}x"
        print(line, flush=True)
    for row in rows:
        print(f"{row['size']:>10} every call, s: " + " ".join(f"{t:.3f}" for t in row["times"]))
    return 0


def topology_main(a, n: int, count: int, slow: dict) -> int:
    rates = {(i, j): a.rate_mbit for i in range(n) for j in range(n) if i != j}
    for (i, j), (_, mbit) in slow.items():
        rates[(i, j)] = rates[(j, i)] = mbit
    with WanPaths(n, rtt_ms=a.rtt_ms, rate_mbit=a.rate_mbit or None, per_pair=slow, windows=a.windows,
                  cc=a.cc) as net:
        peers = Peers(net, a.log)
        try:
            peers.start_coordinator()
            r = run_topology(peers, n, count, a.repeat, rates)
        finally:
            peers.close()
    bus = 2 * (n - 1) / n * 4 * count * 8
    b, f = statistics.median(r["before"]), statistics.median(r["after"])
    print(f"{n} peers over emulated paths: rtt {a.rtt_ms:g} ms, join-order ring pairs at {a.slow_ring:g} Mbit/s, "
          f"the others at {a.rate_mbit:g}; {count} float32 elements, medians of {a.repeat}")
    print(f"ring before {r['ring_before']} (slowest link {r['bottleneck_before']:g} Mbit/s): {b:.3f} s, "
          f"busbw {bus / b / 1e6:.1f} Mbit/s")
    print(f"optimize_topology(): {r['optimize_s']:.2f} s, changed {r['changed']}: {r['reason']}")
    print(f"ring after {r['ring_after']} (slowest link {r['bottleneck_after']:g} Mbit/s; the best ring's "
          f"{r['best_bottleneck']:g}): {f:.3f} s, busbw {bus / f / 1e6:.1f} Mbit/s; {b / f:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
