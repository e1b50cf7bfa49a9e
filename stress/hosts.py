"""Peers on separate hosts, simulated with network namespaces, and a shaped-link benchmark.

    python stress/hosts.py --peers 3 --rate 200mbit --sizes 1M,16M [--streams 4] [--repeat 5]

Each peer gets its own network namespace with one address on a shared bridge (10.X.Y.i),
as if it were a separate machine; the coordinator has the bridge's address. Each daemon
listens on 0.0.0.0 and advertises the address that routes to the coordinator, exactly as
in a multi-machine run, so the group is not co-located and every link is TCP. ``--rate`` puts a token-bucket (tc tbf) on each
peer's uplink. The trainers (clients) stay in this namespace and reach their daemons
through unix sockets.

Prints, per size, the median time of an all-reduce and the bus bandwidth
2(N-1)/N * bytes / time next to the shaped rate: the fraction of the uplinks the ring
keeps busy. Needs root and iproute2; everything is removed on exit.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import select
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

COORD_PORT = 48148  # free by construction: the namespaces are new


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def wait_ready(p: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    """Until a daemon started with stdout=PIPE prints READY (a hung one must not block us)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([p.stdout], [], [], 0.1)
        line = p.stdout.readline() if ready else b""
        if line.startswith(b"READY"):
            return
        if not line and p.poll() is not None:
            raise RuntimeError(f"{what} exited with code {p.returncode} while starting")
    raise TimeoutError(f"{what} did not start within {timeout:g} s")


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Stop processes we started (woken first: one may be SIGSTOPped), killing any that
    does not end within 5 s."""
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.terminate()
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    name = f"pcclprobe{os.getpid()}"
    try:
        _ip("netns", "add", name)
        _ip("netns", "del", name)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a network namespace: {exc}"
    return None


def parse_rate(text: str) -> float:
    """'200mbit' / '1gbit' / '500kbit' -> bits per second."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", text.strip().lower())
    if not m:
        raise ValueError(f"rate {text!r}: expected e.g. 200mbit, 1gbit")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


class Hosts:
    """``n`` network namespaces joined by a bridge; peer i has address ``self.addr[i]``.

    Use as a context manager; ``close()`` ends every process started through it (by PID)
    and deletes the namespaces (which removes their links).
    """

    def __init__(self, n: int, rate: str | None = None) -> None:
        tag = f"{os.getpid() % 100000}{random.randrange(100):02d}"
        self.hub = f"pcclh{tag}"
        self.names = [f"pccl{tag}p{i}" for i in range(n)]
        net = (random.randrange(64, 250), random.randrange(1, 250))
        self.addr = [f"10.{net[0]}.{net[1]}.{i + 1}" for i in range(n)]
        self.hub_addr = f"10.{net[0]}.{net[1]}.254"  # the bridge's own address: the coordinator's host
        self.coordinator = f"{self.hub_addr}:{COORD_PORT}"
        self.rate = rate
        self.procs: list[subprocess.Popen] = []
        self.dir = tempfile.mkdtemp(prefix="pccl-hosts-")
        self._made: list[str] = []
        try:
            self._build(tag)
        except BaseException:
            self.close()
            raise

    def _build(self, tag: str) -> None:
        _ip("netns", "add", self.hub)
        self._made.append(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        _ip("-n", self.hub, "addr", "add", f"{self.hub_addr}/24", "dev", "br0")
        _ip("-n", self.hub, "link", "set", "lo", "up")
        for i, ns in enumerate(self.names):
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            a, b = f"pv{tag}{i}a"[:15], f"pv{tag}{i}b"[:15]
            _ip("link", "add", a, "netns", ns, "type", "veth", "peer", "name", b, "netns", self.hub)
            _ip("-n", ns, "link", "set", a, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{self.addr[i]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", self.hub, "link", "set", b, "master", "br0")
            _ip("-n", self.hub, "link", "set", b, "up")
            if self.rate:
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                                "rate", self.rate, "burst", "256kb", "latency", "100ms"],
                               check=True, capture_output=True, timeout=10)

    def spawn(self, i: int | None, argv: list[str], **kw) -> subprocess.Popen:
        """Run ``argv`` inside peer i's namespace, or the hub's for None (``ip netns exec``
        execs it: the PID is the program's)."""
        ns = self.hub if i is None else self.names[i]
        p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], cwd=REPO, **kw)
        self.procs.append(p)
        return p

    def start_coordinator(self, *extra: str, log: str | None = None) -> subprocess.Popen:
        """The coordinator, on the bridge's address in the hub namespace (its log to ``log``)."""
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child holds it
        p = self.spawn(None, [sys.executable, "-m", "pccl_py.coordinator", "--listen", self.coordinator, *extra],
                       stdout=out, stderr=out)
        if log:
            out.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # the port is inside the namespace: probe from there
            r = subprocess.run(["ip", "netns", "exec", self.hub, sys.executable, "-c",
                                f"import socket; socket.create_connection(('{self.hub_addr}', {COORD_PORT}), 0.5)"],
                               capture_output=True, timeout=10)
            if r.returncode == 0:
                return p
            if p.poll() is not None:
                raise RuntimeError(f"the coordinator exited with code {p.returncode}")
            time.sleep(0.05)
        raise TimeoutError("the coordinator did not listen within 15 s")

    def start_daemon(self, i: int, *extra: str) -> tuple[subprocess.Popen, str]:
        """A daemon in peer i's namespace listening on 0.0.0.0; returns it and its unix socket."""
        path = os.path.join(self.dir, f"d{i}-{len(self.procs)}.sock")
        p = self.spawn(i, [sys.executable, "-m", "pccl_py.daemon", "--coordinator", self.coordinator,
                           "--listen", "0.0.0.0:0", "--ipc", path, *extra],
                       stdout=subprocess.PIPE, env={**os.environ})
        wait_ready(p, f"daemon {i}")
        return p, path

    def close(self) -> None:
        stop_all(self.procs)
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self._made.clear()
        for f in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, f))
        os.rmdir(self.dir)

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def join(client, n: int, timeout: float = 30.0) -> dict:
    """Connect and vote until all ``n`` peers are members (call it for every client at once)."""
    topo = client.connect()
    deadline = time.monotonic() + timeout
    while topo["world_size"] < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {topo['world_size']} of {n} peers joined within {timeout}s")
        topo = client.update_topology()
    return topo


def run_ours(hosts: Hosts, n: int, sizes: list[int], repeat: int, streams: int | None,
             quant: str | None, warmup: int = 1, idle: float = 0.0, alloc: bool = False) -> list[dict]:
    """Per size: ``warmup`` untimed calls, ``repeat`` timed ones (each the slowest peer's time); with
    ``idle``, one more call after that many seconds without traffic (``idle_time``); with
    ``alloc``, the tensors are ``Client.alloc`` arrays (no copy into or out of shared memory)."""
    import concurrent.futures as cf

    import numpy as np

    from pccl_py.client.client import Client

    extra = ["--streams", str(streams)] if streams else []
    paths = [hosts.start_daemon(i, *extra)[1] for i in range(n)]
    clients = [Client(daemon=p, timeout=120.0) for p in paths]
    rows = []
    try:
        with cf.ThreadPoolExecutor(n) as ex:
            list(ex.map(lambda c: join(c, n), clients))
            for count in sizes:
                xs = [c.alloc(count) if alloc else np.empty(count, np.float32) for c in clients]
                for x in xs:
                    x[:] = 1.0

                def one(i: int, xs=xs) -> tuple[float, dict]:
                    t0 = time.perf_counter()
                    info = clients[i].all_reduce(xs[i], quant=quant)
                    return time.perf_counter() - t0, info

                for _ in range(warmup):  # untimed: links set up, stream counts settled
                    list(ex.map(one, range(n)))
                times, info = [], {}
                for _ in range(repeat):
                    for x in xs:
                        x[:] = 1.0
                    res = list(ex.map(one, range(n)))
                    # the slowest peer's: the group's step (peers return up to a one-way
                    # delay apart, and a peer returning early does not make the step shorter)
                    times.append(max(t for t, _ in res))
                    info = res[0][1]
                    # a sample between calls, every element after the last: on 2 cores a
                    # full check of 16M elements takes longer than a long path's
                    # retransmission timeout, and a link idle that long restarts slow start,
                    # so the calls would no longer be back to back
                    if not all(np.allclose(x[::4099], n, rtol=0.02) for x in xs):
                        raise AssertionError(f"wrong all-reduce result at {count} elements")
                if not all(np.allclose(x, n, rtol=0.02) for x in xs):
                    raise AssertionError(f"wrong all-reduce result at {count} elements")
                row = {"size": count, "times": times, "algorithm": info["algorithm"], "tx_bytes": info["tx_bytes"]}
                if idle:
                    time.sleep(idle)
                    row["idle_time"] = max(t for t, _ in ex.map(one, range(n)))
                rows.append(row)
    finally:
        for c in clients:
            c.close()
    return rows


def run_gloo(hosts: Hosts, n: int, sizes: list[int], repeat: int, ifname: str = "eth0") -> list[dict]:
    from pccl_py.tools.bench.allreduce import _collect

    port = COORD_PORT + 1
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": ifname}
    procs = [hosts.spawn(r, [sys.executable, "-m", "pccl_py.tools.bench.allreduce", "--role", "gloo", "--world", str(n),
                             "--sizes", ",".join(map(str, sizes)), "--repeat", str(repeat), "--port", str(port),
                             "--rank", str(r), "--master", hosts.addr[0]],
                         stdout=subprocess.PIPE, env=env)
             for r in range(n)]
    return _collect(procs, 600.0)


def main(argv: list[str] | None = None) -> int:
    import statistics

    from pccl_py.tools.bench.allreduce import parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--rate", default="200mbit",
                    help="tbf rate of each peer's uplink, e.g. 200mbit, 1gbit; 'none': unshaped veth links")
    ap.add_argument("--sizes", default="1M,4M", help="float32 elements, comma separated (K/M suffixes)")
    ap.add_argument("--streams", type=int, default=None, help="TCP streams per link (daemon default if unset)")
    ap.add_argument("--quant", choices=["uint8", "uint4"], default=None)
    ap.add_argument("--compare", choices=["gloo"], default=None, help="gloo on the same namespaces and links")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    why = available()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    shaped = args.rate.lower() != "none"
    rate = parse_rate(args.rate) if shaped else None
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    n = args.peers
    with Hosts(n, rate=args.rate if shaped else None) as hosts:
        hosts.start_coordinator()
        ours = run_ours(hosts, n, sizes, args.repeat, args.streams, args.quant)
        gloo = run_gloo(hosts, n, sizes, args.repeat) if args.compare else None
    from pccl_py.daemon.dataplane import io_threads_on
    print(f"{n} peers in separate network namespaces, "
          f"{f'each uplink shaped to {args.rate} (tc tbf)' if shaped else 'unshaped veth links'}; "
          f"streams {args.streams or 'default'}, I/O threads {'on' if io_threads_on(None) else 'off'}, "
          f"quant {args.quant}; medians of {args.repeat}")
    head = f"{'elements':>10} {'bytes':>10} {'algo':>5} {'median s':>9} {'busbw Mbit/s':>13} {'of rate':>8}"
    print(head + (f" {'gloo s':>8} {'gloo Mbit/s':>12} {'ratio':>6}" if gloo else ""))
    for k, row in enumerate(ours):
        count = row["size"]
        med = statistics.median(row["times"])
        busbw = 2 * (n - 1) / n * 4 * count * 8 / med
        line = (f"{count:>10} {4 * count:>10} {row['algorithm']:>5} {med:>9.3f} {busbw / 1e6:>13.1f} "
                f"{f'{busbw / rate:.0%}' if rate else '-':>8}")
        if gloo:
            gmed = statistics.median(gloo[k]["times"])
            gbus = 2 * (n - 1) / n * 4 * count * 8 / gmed
            line += f" {gmed:>8.3f} {gbus / 1e6:>12.1f} {gmed / med:>5.2f}x"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
