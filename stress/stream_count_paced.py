"""Streams per link chosen by measurement, on 127.0.0.1 with every TCP flow capped.

Two data planes in one process (uvloop), linked over loopback TCP; every data stream's
socket gets ``SO_MAX_PACING_RATE`` (the kernel paces that flow: the shape of per-flow
policing, or of a window-bound flow). Optionally the whole loopback is capped too (a
``tbf`` qdisc; needs a network namespace of one's own: run under ``unshare -rn``). Runs
ring all-reduces with adapt_streams and prints, per call, the streams in use and the
rate; then the same calls with K fixed at the start count, for comparison.

    .venv/bin/python stress/stream_count_paced.py --flow-mbps 200 --calls 30
    unshare -rn .venv/bin/python stress/stream_count_paced.py --flow-mbps 200 --link-mbps 1600

Every wait has a deadline; the run ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)


def cap_flows(bytes_per_s: int) -> None:
    """Every data stream opened from now on is paced at ``bytes_per_s``."""
    from pccl_py.daemon import streams as S
    tune = S._tune

    def paced(sock, user_timeout):
        tune(sock, user_timeout)
        sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, bytes_per_s)
    S._tune = paced


def cap_loopback(mbps: int) -> None:
    run = lambda *a: subprocess.run(a, check=True, timeout=10)  # noqa: E731
    run("ip", "link", "set", "lo", "up")
    run("tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", f"{mbps}mbit", "burst", "1mb",
        "latency", "50ms")


async def calls(adapt: bool, initial: int, count: int, n: int, maximum: int) -> list[tuple[int, float]]:
    import numpy as np

    from pccl_py.daemon.dataplane import DataPlane, DataPlaneConfig
    from pccl_py.daemon.topology import PeerInfo, Topology

    config = DataPlaneConfig(same_host_links=False, io_threads=False, adapt_streams=adapt, max_streams=maximum)
    dps = [DataPlane(f"paced{i}", secret=b"paced", streams=initial, config=config) for i in range(2)]
    out = []
    try:
        for d in dps:
            await d.start()
        peers = tuple(PeerInfo(d.peer_id, "127.0.0.1", d.port) for d in dps)
        await asyncio.wait_for(asyncio.gather(*(d.set_topology(Topology(1, 0, r, peers, 2))
                                                for r, d in enumerate(dps))), 10)
        xs = [np.full(count, i + 1, np.float32) for i in range(2)]
        ys = [np.empty_like(x) for x in xs]
        link = dps[0]._peers[dps[1].peer_id]
        for tag in range(1, n + 1):
            k = link.nstreams
            t0 = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(d.all_reduce(x, y, dtype="float32", op="sum", algorithm="ring",
                                                                 tag=tag, timeout=60)
                                                    for d, x, y in zip(dps, xs, ys, strict=True))), 90)
            dt = time.perf_counter() - t0
            assert (ys[0] == 3).all() and (ys[1] == 3).all()
            out.append((k, count * 4 / dt))  # bytes each way over the link per second
    finally:
        for d in dps:
            await d.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flow-mbps", type=float, default=200.0, help="cap of every TCP flow, Mbit/s; 0: none")
    p.add_argument("--link-mbps", type=int, default=0, help="cap of the whole loopback (tbf), Mbit/s; 0: none")
    p.add_argument("--count", type=int, default=4 << 20, help="float32 elements per call")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--initial", type=int, default=4)
    p.add_argument("--max-streams", type=int, default=16)
    args = p.parse_args()
    import uvloop
    if args.link_mbps:
        cap_loopback(args.link_mbps)
    if args.flow_mbps:
        cap_flows(min(int(args.flow_mbps * 1e6 / 8), (1 << 31) - 1))
    print(f"flows capped at {args.flow_mbps or 'no cap'} Mbit/s, loopback at {args.link_mbps or 'no cap'} Mbit/s, "
          f"{args.count * 4 >> 20} MiB per call")
    for adapt in (True, False):
        got = uvloop.run(calls(adapt, args.initial, args.count, args.calls, args.max_streams))
        label = "auto" if adapt else f"fixed {args.initial}"
        print(f"{label}: K per call {[k for k, _ in got]}")
        tail = [r for _, r in got[-5:]]
        print(f"{label}: last 5 calls median {statistics.median(tail) * 8 / 1e9:.2f} Gbit/s "
              f"(first 3: {statistics.median([r for _, r in got[:3]]) * 8 / 1e9:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
