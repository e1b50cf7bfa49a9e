"""Emulated internet paths between peers in network namespaces.

    with WanPaths(2, rtt_ms=20, rate_mbit=200, flow_cap_fraction=1/8) as net:
        net.popen(1, ["python3", "server.py"])
        net.run(0, ["python3", "client.py", net.addr(1)], timeout=60)

Peer i lives in network namespace ``pwan-<pid>-<k>-<i>`` with one TUN device, ``wan0``,
holding ``10.77.0.<i+1>/24``. One delay-line process (``delayline.c``, built with gcc on
first use) holds every TUN device: it reads what a peer sends, finds the peer that owns the
destination address and writes the packet into that peer's device after the path's one-way
delay (half the RTT), its bottleneck (a token bucket with a tail-drop queue) and, if asked,
a token bucket per TCP/UDP flow (5-tuple). Every ordered pair of peers is its own path.
See docs/wan.md.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass

from hosts import stop_all  # stress/ is on sys.path wherever wan is imported

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("delayline.c", "wanpath.h", "wanpath_test.c")
IFNAME = "wan0"
PREFIX = "pwan"
LARGE_WINDOW = 128 << 20  # bytes: a 1 Gbit/s path at 500 ms RTT, twice (the receive window is about half the buffer)
TXQUEUELEN = 4096
HOST_WIDE = ("net/core/rmem_max", "net/core/wmem_max")  # per namespace on some kernels only
# The delay line stands in for hardware: it goes ahead of the peers' processes for the CPU.
# SCHED_FIFO (realtime=True, the default) kept it within 0.7 ms of every due time on a busy
# 2-core VM (mean 26 us late); nice -10 alone left 7% of packets over 1 ms late (up to 13 ms).
# It sleeps whenever nothing is due, and the kernel's RT throttling caps it at 95% of a core.
REALTIME_PRIORITY = 10
DELAYLINE_NICE = -10
MIN_QUEUE = 64 << 10      # one 64 KiB TSO segment: a smaller queue would drop every such segment behind another
_seq = itertools.count()


class WanUnavailable(RuntimeError):
    """This machine cannot build the paths (no root, no namespaces, no TUN, no gcc, no such CC)."""


@dataclass(frozen=True)
class PathSpec:
    """One direction between two peers, as the delay line takes it."""

    src: int
    dst: int
    delay_ns: int        # one way
    rate: int            # bytes/s at the bottleneck; 0: unlimited
    qlimit: int          # bytes the bottleneck queue holds before it drops
    flow_rate: int       # bytes/s per 5-tuple flow; 0: no per-flow cap
    flow_qlimit: int     # bytes one flow's queue holds

    def arg(self) -> str:
        return f"{self.src}:{self.dst}:{self.delay_ns}:{self.rate}:{self.qlimit}:{self.flow_rate}:{self.flow_qlimit}"


# what says how a run's TCP fared: segments resent, retransmission timeouts (each stalls a
# flow for at least 200 ms), tail-loss probes, recoveries from SACK
TCP_COUNTERS = ("OutSegs", "RetransSegs", "TCPTimeouts", "TCPLossProbes", "TCPSackRecovery", "TCPSpuriousRTOs")


def parse_counters(text: str) -> dict[str, int]:
    """``/proc/net/snmp`` or ``/proc/net/netstat`` text: pairs of lines ``Proto: names`` then
    ``Proto: values``; every name with its value (TCP's and TcpExt's names do not collide)."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        n, v = names.split()[1:], values.split()[1:]
        if names.split(":")[0] != values.split(":")[0] or len(n) != len(v):
            continue
        for k, x in zip(n, v):
            try:
                out[k] = int(x)
            except ValueError:
                pass
    return out


def plan_paths(n: int, rtt_ms: float, rate_mbit: float | None, flow_cap_fraction: float | None = None,
               per_pair: dict[tuple[int, int], tuple[float, float | None]] | None = None,
               queue_ms: float | None = None) -> list[PathSpec]:
    """Every ordered pair's path. ``per_pair[(i, j)] = (rtt_ms, rate_mbit)`` overrides both
    directions between i and j. The bottleneck queue holds ``queue_ms`` at the path's rate
    (default: one RTT, a bandwidth-delay product), at least 64 KiB; a capped flow's queue
    holds its share of that. ``rate_mbit`` None or 0: unlimited (then no per-flow cap)."""
    if n < 2:
        raise ValueError("WanPaths needs at least 2 peers")
    if flow_cap_fraction is not None and not 0 < flow_cap_fraction <= 1:
        raise ValueError(f"flow_cap_fraction {flow_cap_fraction}: expected 0 < f <= 1, e.g. 1/8")
    pairs = {}
    for (i, j), v in (per_pair or {}).items():
        if not (0 <= i < n and 0 <= j < n and i != j):
            raise ValueError(f"per_pair key {(i, j)}: expected two different peers in 0..{n - 1}")
        pairs[(i, j)] = pairs[(j, i)] = v
    out = []
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            rtt, mbit = pairs.get((i, j), (rtt_ms, rate_mbit))
            if rtt < 0 or (mbit is not None and mbit < 0):
                raise ValueError(f"path {i}->{j}: negative rtt or rate")
            rate = int(mbit * 1e6 / 8) if mbit else 0
            qms = rtt if queue_ms is None else queue_ms
            qlimit = max(int(rate * qms / 1000), MIN_QUEUE) if rate else 1 << 30
            frate = int(rate * flow_cap_fraction) if rate and flow_cap_fraction else 0
            fq = max(int(qlimit * flow_cap_fraction), MIN_QUEUE) if frate else qlimit
            out.append(PathSpec(i, j, int(rtt * 1e6 / 2), rate, qlimit, frate, fq))
    return out


def window_sysctls(windows: str) -> dict[str, str]:
    """'stock': what a new namespace has (nothing set); 'large': 128 MiB socket buffers."""
    if windows == "stock":
        return {}
    if windows == "large":
        return {"net/ipv4/tcp_rmem": f"4096 131072 {LARGE_WINDOW}", "net/ipv4/tcp_wmem": f"4096 16384 {LARGE_WINDOW}",
                "net/core/rmem_max": str(LARGE_WINDOW), "net/core/wmem_max": str(LARGE_WINDOW)}
    raise ValueError(f"windows {windows!r}: expected 'stock' or 'large'")


def build(program: str = "delayline", cache: str | None = None) -> str:
    """A C program of this directory ('delayline', or 'wanpath_test': the scheduler on a fake
    clock), compiled with gcc into a cache directory keyed by the hash of the sources."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise WanUnavailable("gcc not found (it builds stress/wan/delayline.c)")
    h = hashlib.sha256()
    for name in SOURCES:
        with open(os.path.join(HERE, name), "rb") as f:
            h.update(f.read())
    cache = cache or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pccl-wan")
    os.makedirs(cache, exist_ok=True)
    exe = os.path.join(cache, f"{program}-{h.hexdigest()[:16]}")
    if not os.path.exists(exe):
        src = os.path.join(HERE, f"{program}.c")
        tmp = f"{exe}.{os.getpid()}.tmp"
        r = subprocess.run([gcc, "-O2", "-Wall", "-o", tmp, src], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise WanUnavailable(f"gcc failed on {src}:\n{r.stderr}")
        os.replace(tmp, exe)
    return exe


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def available() -> str | None:
    """None when WanPaths can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN devices)"
    if shutil.which("ip") is None:
        return "needs iproute2 (the ip command)"
    if shutil.which("gcc") is None:
        return "needs gcc (to build stress/wan/delayline.c)"
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    except OSError as exc:
        return f"cannot open /dev/net/tun: {exc}"
    name = f"{PREFIX}-probe-{os.getpid()}"
    try:
        _ip("netns", "add", name)
        _ip("netns", "del", name)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a network namespace: {exc}"
    return None


def remove_stale() -> list[str]:
    """Deletes namespaces this harness left behind in runs whose process is gone (killed by
    SIGKILL, say); returns their names. Namespaces of live processes are left alone."""
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return []
    gone = []
    for name in names:
        m = re.fullmatch(rf"{PREFIX}-(\d+)-\d+-\d+", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
            gone.append(name)
    return gone


class WanPaths:
    """``n`` peers, each in its own network namespace, joined by emulated paths.

    rtt_ms, rate_mbit: every path's round-trip time and bottleneck rate (per direction;
    None: unlimited). flow_cap_fraction: each 5-tuple flow is capped at that share of its
    path's rate (1/8: one TCP flow gets 12.5 %, eight fill the path). per_pair: {(i, j):
    (rtt_ms, rate_mbit)} for the two directions between i and j. windows: 'stock' or
    'large' (socket buffer limits, per namespace). cc: every namespace's default congestion
    control, e.g. 'cubic' or 'bbr' (None: the kernel's, which a namespace takes from the
    host; a CC outside the host-wide net.ipv4.tcp_allowed_congestion_control cannot be a
    namespace's default: WanUnavailable says so). offload: TSO/checksum offload
    through the TUN devices (up to 64 KiB per packet read; off: one read per MTU-sized
    packet). realtime: run the delay line SCHED_FIFO (else nice -10 only; also where the
    kernel refuses it: then ``self.realtime`` is False). The context's exit ends every
    process started through it (by PID), the delay line, and deletes the namespaces.
    """

    def __init__(self, n_peers: int, rtt_ms: float = 20.0, rate_mbit: float | None = None,
                 flow_cap_fraction: float | None = None, windows: str = "stock", cc: str | None = None,
                 per_pair: dict[tuple[int, int], tuple[float, float | None]] | None = None,
                 queue_ms: float | None = None, offload: bool = True, mtu: int = 1500,
                 realtime: bool = True) -> None:
        self.n = n_peers
        self.specs = plan_paths(n_peers, rtt_ms, rate_mbit, flow_cap_fraction, per_pair, queue_ms)
        self.sysctls = {"net/ipv4/tcp_no_metrics_save": "1", "net/ipv6/conf/all/disable_ipv6": "1",
                        **window_sysctls(windows)}
        if cc is not None:
            self.sysctls["net/ipv4/tcp_congestion_control"] = cc
        self.cc, self.offload, self.mtu, self.realtime = cc, offload, mtu, realtime
        self.skipped: list[str] = []  # sysctls that are not per namespace here, so not set
        why = available()
        if why:
            raise WanUnavailable(why)
        self.exe = build("delayline")
        remove_stale()
        tag = f"{os.getpid()}-{next(_seq)}"
        self.names = [f"{PREFIX}-{tag}-{i}" for i in range(n_peers)]
        self._addrs = [f"10.77.0.{i + 1}" for i in range(n_peers)]
        self.procs: list[subprocess.Popen] = []
        self.delayline: subprocess.Popen | None = None
        self.final_stats: dict | None = None
        self._made: list[str] = []
        self._log = tempfile.TemporaryFile()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup

    def _build(self) -> None:
        for ns in self.names:
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            self._sysctl(ns)
        cmd = [self.exe, "--watch-stdin", *(["--vnet"] if self.offload else [])]
        for ns, a in zip(self.names, self._addrs):
            cmd += ["--peer", f"{ns}:{IFNAME}:{a}"]
        for s in self.specs:
            cmd += ["--path", s.arg()]
        self.delayline = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        os.setpriority(os.PRIO_PROCESS, self.delayline.pid, DELAYLINE_NICE)
        if self.realtime:
            try:
                os.sched_setscheduler(self.delayline.pid, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
            except OSError:  # no realtime scheduling here (a container without it): nice only
                self.realtime = False
        line = self._line(10.0)
        if line != "READY":
            raise RuntimeError(f"the delay line did not start: {line!r} {self._stderr()}")
        for ns, a in zip(self.names, self._addrs):
            _ip("-n", ns, "addr", "add", f"{a}/24", "dev", IFNAME)
            # a TUN device drops what its ring (txqueuelen packets) cannot hold while the delay line is late
            _ip("-n", ns, "link", "set", IFNAME, "mtu", str(self.mtu), "txqueuelen", str(TXQUEUELEN), "up")

    def _sysctl(self, ns: str) -> None:
        if self.cc is not None:
            avail = self._read(ns, "net/ipv4/tcp_available_congestion_control").split()
            if self.cc not in avail:
                raise WanUnavailable(f"congestion control {self.cc!r} is not available here (have {avail}); "
                                     f"try `modprobe tcp_{self.cc}` as root")
            allowed = self._read(ns, "net/ipv4/tcp_allowed_congestion_control").split()
            if self.cc not in allowed:  # the kernel refuses it as a namespace's default (EPERM)
                raise WanUnavailable(
                    f"congestion control {self.cc!r} is available but not allowed outside the host's own "
                    f"namespace (net.ipv4.tcp_allowed_congestion_control = {' '.join(allowed)}, a host-wide "
                    f"setting): allow it there, or pass cc=None and set TCP_CONGESTION per socket as root "
                    f"(flows.py --cc does)")
        # a key the namespace does not show is global on this kernel: left alone (self.skipped)
        # (net.core.rmem_max and wmem_max show in a namespace but are read-only there on 6.x kernels)
        lines = ["set -e"]
        for k, v in self.sysctls.items():
            write = f"echo '{v}' > /proc/sys/{k}" + (f" 2>/dev/null || echo {k}" if k in HOST_WIDE else "")
            lines.append(f"if [ -e /proc/sys/{k} ]; then {write}; else echo {k}; fi")
        script = "\n".join(lines)
        r = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", script], capture_output=True, text=True,
                           timeout=10)
        if r.returncode != 0:
            raise WanUnavailable(f"cannot set sysctls in {ns}: {r.stderr.strip()}")
        self.skipped = r.stdout.split()

    def _read(self, ns: str, key: str) -> str:
        r = subprocess.run(["ip", "netns", "exec", ns, "cat", f"/proc/sys/{key}"], capture_output=True, text=True,
                           timeout=10, check=True)
        return r.stdout.strip()

    def _line(self, timeout: float) -> str:
        """One line of the delay line's stdout, within ``timeout``."""
        assert self.delayline is not None and self.delayline.stdout is not None
        ready, _, _ = select.select([self.delayline.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"the delay line said nothing within {timeout}s")
        return self.delayline.stdout.readline().decode().strip()

    def _stderr(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    # ------------------------------------------------------------------ use

    def addr(self, i: int) -> str:
        """Peer i's address (reachable from every other peer's namespace)."""
        return self._addrs[i]

    def netns(self, i: int) -> str:
        return self.names[i]

    def popen(self, i: int, argv: list[str], **kw) -> subprocess.Popen:
        """Starts ``argv`` in peer i's namespace (``ip netns exec`` execs it: the PID is the
        program's); it is ended on exit if still running."""
        p = subprocess.Popen(["ip", "netns", "exec", self.names[i], *argv], **kw)
        self.procs.append(p)
        return p

    def run(self, i: int, argv: list[str], timeout: float = 60.0, **kw) -> subprocess.CompletedProcess:
        """Runs ``argv`` in peer i's namespace to completion (killed after ``timeout``)."""
        return subprocess.run(["ip", "netns", "exec", self.names[i], *argv], timeout=timeout, **kw)

    def sysctl(self, i: int, key: str) -> str:
        """A sysctl as peer i's namespace sees it, e.g. 'net/ipv4/tcp_rmem'."""
        return self._read(self.names[i], key)

    def device_drops(self, i: int) -> int:
        """Packets peer i's TUN device dropped because the delay line did not read them in time
        (not the emulated path's drops: those are in stats())."""
        r = subprocess.run(["ip", "-n", self.names[i], "-s", "-j", "link", "show", IFNAME], capture_output=True,
                           text=True, timeout=10, check=True)
        return int(json.loads(r.stdout)[0]["stats64"]["tx"]["dropped"])

    def tcp_counters(self, i: int, keys: tuple[str, ...] = TCP_COUNTERS) -> dict[str, int]:
        """TCP counters of peer i's namespace since it was made (``/proc/net/snmp`` and
        ``/proc/net/netstat``, e.g. ``RetransSegs``, ``TCPTimeouts``); only ``keys``."""
        r = subprocess.run(["ip", "netns", "exec", self.names[i], "cat", "/proc/net/snmp", "/proc/net/netstat"],
                           capture_output=True, text=True, timeout=10, check=True)
        return {k: v for k, v in parse_counters(r.stdout).items() if k in keys}

    def stats(self, timeout: float = 5.0) -> dict:
        """The delay line's counters: per directed path packets and bytes in, out and
        dropped, the largest queue, how late packets left it; and its CPU seconds so far."""
        if self.delayline is None or self.delayline.poll() is not None:
            raise RuntimeError(f"the delay line is not running: {self._stderr()}")
        os.kill(self.delayline.pid, signal.SIGUSR1)
        return json.loads(self._line(timeout))

    def close(self) -> None:
        stop_all(self.procs)
        self.procs.clear()
        if self.delayline is not None:
            if self.delayline.poll() is None:
                self.delayline.terminate()
            try:
                out, _ = self.delayline.communicate(timeout=5)
                lines = out.decode().strip().splitlines()
                self.final_stats = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
            except subprocess.TimeoutExpired:
                self.delayline.kill()
                self.delayline.wait(5)
            self.delayline = None
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self._made.clear()
        self._log.close()

    def __enter__(self) -> WanPaths:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
