"""Measure an emulated path: its RTT, one TCP flow's goodput and K flows' goodput.

    python stress/wan/measure.py --rtt-ms 20 --rate-mbit 200 --flow-cap 1/8 --flows 8
    python stress/wan/measure.py --rtt-ms 100 --rate-mbit 400 --windows stock --seconds 10

Two peers in network namespaces joined by the delay line (stress/wan/paths.py); peer 0
sends to peer 1 over raw TCP (stress/wan/flows.py). Goodput is what the receiver got
between --warmup and --seconds after the flows connected. Needs root and gcc.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import time
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wan.paths import WanPaths  # noqa: E402

FLOWS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flows.py")
_port = iter(range(5201, 6000))


def _ready(p: subprocess.Popen, timeout: float = 15.0) -> None:
    """Waits for a tool's READY line (it listens then), or fails with its exit."""
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    line = p.stdout.readline() if ready else b""
    if line.strip() != b"READY":
        raise RuntimeError(f"{p.args[-6:]} did not get ready within {timeout}s (exit code {p.poll()}): {line!r}")


def _json_tail(text: bytes) -> dict:
    lines = text.decode().strip().splitlines()
    if not lines:
        raise RuntimeError("a traffic tool printed nothing")
    return json.loads(lines[-1])


def rtt(net: WanPaths, src: int, dst: int, count: int = 20) -> dict:
    """TCP connect time and ``count`` 1-byte round trips from src to dst (milliseconds)."""
    port = next(_port)
    srv = net.popen(dst, [sys.executable, FLOWS, "echo", "--port", str(port)], stdout=subprocess.PIPE)
    _ready(srv)
    out = net.run(src, [sys.executable, FLOWS, "ping", "--to", net.addr(dst), "--port", str(port),
                        "--count", str(count)], capture_output=True, timeout=30 + count)
    srv.wait(10)
    if out.returncode != 0:
        raise RuntimeError(f"ping failed: {out.stderr.decode()[-2000:]}")
    r = _json_tail(out.stdout)
    rtts = r["rtts_ms"][1:] or r["rtts_ms"]  # the first one pays for the slow start of nothing: still, skip it
    return {"connect_ms": r["connect_ms"], "min_ms": min(rtts), "median_ms": statistics.median(rtts),
            "max_ms": max(rtts)}


def _receiver(net: WanPaths, dst: int, port: int, flows: int, seconds: float, warmup: float):
    """flows.py receiving ``flows`` flows on ``port`` in dst's namespace, ready."""
    r = net.popen(dst, [sys.executable, FLOWS, "recv", "--port", str(port), "--flows", str(flows),
                        "--seconds", str(seconds), "--warmup", str(warmup)], stdout=subprocess.PIPE)
    _ready(r)
    return r


def _send_argv(net: WanPaths, dst: int, port: int, flows: int, seconds: float, cc: str | None) -> list[str]:
    return [sys.executable, FLOWS, "send", "--to", net.addr(dst), "--port", str(port), "--flows", str(flows),
            "--seconds", str(seconds), *(["--cc", cc] if cc else [])]


def goodput(net: WanPaths, src: int, dst: int, flows: int, seconds: float, warmup: float,
            cc: str | None = None) -> dict:
    """``flows`` TCP flows from src to dst for ``seconds``; goodput after ``warmup`` (bits/s),
    per flow, the senders' TCP_INFO, and the delay line's CPU use and drops meanwhile. ``cc``:
    the senders' congestion control (per socket; None: the namespace's default)."""
    port = next(_port)
    before, dev_before = net.stats(), net.device_drops(src)
    rcv = _receiver(net, dst, port, flows, seconds, warmup)
    t0 = time.monotonic()
    out = net.run(src, _send_argv(net, dst, port, flows, seconds, cc), capture_output=True, timeout=seconds + 60)
    r_out, _ = rcv.communicate(timeout=30)
    wall = time.monotonic() - t0
    after = net.stats()
    res_dev = net.device_drops(src) - dev_before
    if out.returncode != 0 or rcv.returncode != 0:
        raise RuntimeError(f"traffic failed: sender {out.returncode} {out.stderr.decode()[-2000:]}, "
                           f"receiver {rcv.returncode}")
    res = _json_tail(r_out)
    res["sender"] = _json_tail(out.stdout)
    res["delayline_cores"] = (after["cpu_s"] - before["cpu_s"]) / wall

    def path(st):
        return next(p for p in st["paths"] if p["src"] == src and p["dst"] == dst)

    pa, pb = path(after), path(before)
    res["drops"] = pa["drop_pkts"] - pb["drop_pkts"]
    res["device_drops"] = res_dev
    res["packets"] = pa["in_pkts"] - pb["in_pkts"]
    res["packets_per_s"] = res["packets"] / wall  # what the delay line read from src for dst
    n = pa["out_pkts"] - pb["out_pkts"]
    res["late_mean_us"] = (pa["late_sum_ns"] - pb["late_sum_ns"]) / max(n, 1) / 1e3
    res["late_over_1ms"] = (pa["late_over_1ms"] - pb["late_over_1ms"]) / max(n, 1)
    res["wire_bytes"] = pa["out_bytes"] - pb["out_bytes"]
    return res


def goodput_both_ways(net: WanPaths, a: int, b: int, flows: int, seconds: float, warmup: float,
                      cc: str | None = None) -> tuple[float, float]:
    """``flows`` TCP flows a -> b and as many b -> a at the same time, as a ring all-reduce
    of two peers loads the path; the goodput of each direction after ``warmup`` (bits/s)."""
    ports = (next(_port), next(_port))
    rcv = [_receiver(net, dst, port, flows, seconds, warmup) for dst, port in zip((b, a), ports, strict=True)]
    snd = [net.popen(src, _send_argv(net, dst, port, flows, seconds, cc), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
           for (src, dst), port in zip(((a, b), (b, a)), ports, strict=True)]
    outs = [r.communicate(timeout=seconds + 60)[0] for r in rcv]
    for s_ in snd:
        _, err = s_.communicate(timeout=60)
        if s_.returncode != 0:
            raise RuntimeError(f"traffic failed: sender {s_.returncode} {err.decode()[-2000:]}")
    if any(r.returncode != 0 for r in rcv):
        raise RuntimeError(f"traffic failed: receivers {[r.returncode for r in rcv]}")
    ab, ba = (_json_tail(o)["bits_per_s"] for o in outs)
    return ab, ba


def parse_fraction(text: str | None) -> float | None:
    if text is None or text.lower() in ("", "none", "0"):
        return None
    return float(Fraction(text))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--rate-mbit", type=float, default=200.0, help="bottleneck per direction; 0: unlimited")
    ap.add_argument("--flow-cap", default=None, help="per-flow cap as a share of the rate, e.g. 1/8 (default: none)")
    ap.add_argument("--windows", choices=["stock", "large"], default="stock")
    ap.add_argument("--cc", default="cubic", help="the senders' congestion control, e.g. cubic, bbr, reno "
                    "(set per socket: the kernel lets a namespace default only to the host's allowed list)")
    ap.add_argument("--flows", type=int, default=8, help="K, the flows of the second goodput row")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=None, help="seconds left out of the goodput (default: 20%%)")
    ap.add_argument("--queue-ms", type=float, default=None, help="bottleneck queue (default: one RTT)")
    ap.add_argument("--no-offload", action="store_true", help="no TSO through the TUN devices")
    ap.add_argument("--no-realtime", action="store_true", help="the delay line at nice -10, not SCHED_FIFO")
    ap.add_argument("--json", default=None, help="write the raw results here")
    a = ap.parse_args(argv)
    cap = parse_fraction(a.flow_cap)
    warmup = a.seconds * 0.2 if a.warmup is None else a.warmup
    rate = a.rate_mbit or None
    with WanPaths(2, rtt_ms=a.rtt_ms, rate_mbit=rate, flow_cap_fraction=cap, windows=a.windows, cc=None,
                  queue_ms=a.queue_ms, offload=not a.no_offload, realtime=not a.no_realtime) as net:
        rmem, wmem = net.sysctl(0, "net/ipv4/tcp_rmem"), net.sysctl(0, "net/ipv4/tcp_wmem")
        print(f"path 0 -> 1: rtt {a.rtt_ms} ms, rate {f'{a.rate_mbit:g} Mbit/s' if rate else 'unlimited'}, "
              f"per-flow cap {a.flow_cap or 'none'}, queue {net.specs[0].qlimit} B, windows {a.windows} "
              f"(tcp_rmem {rmem}; tcp_wmem {wmem}), cc {a.cc} (per socket), offload {'off' if a.no_offload else 'on'}; "
              f"delay line {'SCHED_FIFO' if net.realtime else 'nice -10'}; goodput over {a.seconds - warmup:g} s after "
              f"{warmup:g} s", flush=True)
        r = rtt(net, 0, 1)
        print(f"RTT (TCP 1-byte echo): min {r['min_ms']:.2f} ms, median {r['median_ms']:.2f} ms, "
              f"max {r['max_ms']:.2f} ms; connect {r['connect_ms']:.2f} ms", flush=True)
        rows = [goodput(net, 0, 1, k, a.seconds, warmup, a.cc) for k in dict.fromkeys([1, a.flows])]
        late = net.stats()["paths"][0]
    print(f"{'flows':>5} {'Mbit/s':>9} {'of rate':>8} {'per flow min..max':>19} {'retrans':>8} "
          f"{'srtt ms':>8} {'drops':>6} {'dev drops':>9} {'pkts/s':>7} {'delay line cores':>17}")
    for g in rows:
        pf = g["per_flow_bits_per_s"]
        infos = [i for i in g["sender"]["tcp_info"] if i]
        srtt = statistics.median(i["srtt_ms"] for i in infos) if infos else float("nan")
        share = f"{g['bits_per_s'] / (rate * 1e6):.1%}" if rate else "-"
        print(f"{g['flows']:>5} {g['bits_per_s'] / 1e6:>9.1f} {share:>8} "
              f"{f'{min(pf) / 1e6:.1f}..{max(pf) / 1e6:.1f}':>19} {sum(i['retrans'] for i in infos):>8} "
              f"{srtt:>8.1f} {g['drops']:>6} {g['device_drops']:>9} {g['packets_per_s']:>7.0f} "
              f"{g['delayline_cores']:>17.2f}")
    per_row = ", ".join(f"{g['late_mean_us']:.0f}" for g in rows)
    print(f"delay line timing, path 0 -> 1, whole run: packets left {late['late_mean_ns'] / 1e3:.0f} us late "
          f"on average, at most {late['late_max_ns'] / 1e6:.2f} ms; {late['late_over_1ms']} of {late['out_pkts']} "
          f"over 1 ms; mean per goodput row: {per_row} us")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rtt": r, "goodput": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
