"""Dev benchmark of the data plane: N DataPlane instances in N processes (one each, uvloop).

Times all_reduce for each size and algorithm and prints medians. Used to pick the
defaults in DataPlaneConfig (streams K, sub-chunk size, direct/ring crossover).

    .venv/bin/python stress/bench_dataplane.py --world 2 3 4 --sizes 1 1M 16M 64M
    .venv/bin/python stress/bench_dataplane.py --world 2 --sizes 1 256 4K 16K 64K --algorithms ring direct
    .venv/bin/python stress/bench_dataplane.py --world 2 --streams 1 2 4 8 --sub-bytes 512K 1M 4M
    .venv/bin/python stress/bench_dataplane.py --world 2 3 4 --backend gloo   # torch.distributed, same harness

Sizes are float32 element counts (suffix K/M = 2**10/2**20). Every run ends by itself:
each child has a hard time limit and the parent kills what is left.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def parse_size(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * mult[text[-1].upper()] if text[-1].upper() in mult else int(text)


def fmt_size(n: int) -> str:
    for suffix, m in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= m and n % m == 0:
            return f"{n // m}{suffix}"
    return str(n)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# ------------------------------------------------------------------------------ child


async def child_main(args) -> None:
    import numpy as np

    from pccl_py.daemon.dataplane import DataPlane, DataPlaneConfig
    from pccl_py.daemon.topology import PeerInfo, Topology

    rank, world = args.rank, len(args.ports)
    d = DataPlaneConfig()
    cfg = DataPlaneConfig(sub_bytes=args.sub_bytes_one, min_stripe=args.min_stripe,
                          min_sub_bytes=min(d.min_sub_bytes, args.sub_bytes_one), pipeline_depth=args.depth,
                          direct_max_bytes=args.direct_max, same_host_links=not args.tcp_only,
                          io_threads={"on": True, "off": False}.get(args.io_threads),
                          bulk_min=parse_size(args.bulk_min) if args.bulk_min else d.bulk_min)
    dp = DataPlane(f"bench{rank:03d}", secret=b"bench", streams=args.streams_one, port=args.ports[rank],
                   config=cfg)
    await dp.start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "go" from the parent
    peers = tuple(PeerInfo(f"bench{i:03d}", "127.0.0.1", p) for i, p in enumerate(args.ports))
    await dp.set_topology(Topology(1, 0, rank, peers, world))
    results = []
    tag = 0
    prof = None
    if os.environ.get("PCCL_BENCH_PROFILE") and rank == 0:  # dev aid: where rank 0's CPU goes
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    for count in args.sizes:
        src = np.full(count, rank + 1, np.float32)
        dst = np.empty_like(src)
        dst.fill(0)  # touch the pages once, as a daemon's reused buffers would be
        for algo in args.algorithms:
            quant = None
            if algo in ("uint8", "uint4"):
                algo, quant = "auto", algo
            times = []
            reps = args.reps if count * 4 >= (4 << 20) else args.reps * 4
            loop_cpu = proc_cpu = 0.0
            for i in range(reps + 1):
                tag += 1
                t0 = time.perf_counter()
                c0, p0 = time.thread_time(), time.process_time()
                info = await dp.all_reduce(src, dst, dtype="float32", op="sum", algorithm=algo, quant=quant,
                                           tag=tag, timeout=60)
                if i:  # first one is a warm-up
                    times.append(time.perf_counter() - t0)
                    loop_cpu += time.thread_time() - c0  # the event loop's thread alone
                    proc_cpu += time.process_time() - p0  # every thread of this peer
            want = world * (world + 1) / 2
            if quant is None and not (dst[0] == want and dst[-1] == want and dst[count // 2] == want):
                raise SystemExit(f"wrong result at {count} elements: {dst[0]}, {dst[count // 2]}, {dst[-1]}")
            results.append({"count": count, "algorithm": info["algorithm"] + (f"/{quant}" if quant else ""),
                            "median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
                            "reps": reps, "loop_busy": loop_cpu / sum(times), "cpu": proc_cpu / sum(times)})
    if prof is not None:
        import pstats
        prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(18)
    # one last collective so no peer closes while another still measures
    await dp.all_gather(b"done", tag=tag + 1, timeout=60)
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    await dp.close()


def gloo_main(args) -> None:
    import statistics as st

    import torch
    import torch.distributed as dist

    rank, world = args.rank, len(args.ports)
    print("ready", flush=True)
    sys.stdin.readline()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.ports[0]}", rank=rank,
                            world_size=world)
    results = []
    for count in args.sizes:
        t = torch.full((count,), float(rank + 1), dtype=torch.float32)
        times = []
        reps = args.reps if count * 4 >= (4 << 20) else args.reps * 4
        for i in range(reps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            if i:
                times.append(time.perf_counter() - t0)
        results.append({"count": count, "algorithm": "gloo", "median_ms": st.median(times) * 1e3,
                        "min_ms": min(times) * 1e3, "reps": reps})
    dist.barrier()
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ parent


def run_world(args, world: int, streams: int, sub_bytes: int) -> list[dict]:
    ports = free_ports(world)
    cmd_base = [sys.executable, os.path.abspath(__file__), "--child", "--ports", *map(str, ports),
                "--sizes", *map(str, args.sizes), "--algorithms", *args.algorithms, "--reps", str(args.reps),
                "--streams", str(streams), "--sub-bytes", str(sub_bytes), "--min-stripe", str(args.min_stripe),
                "--direct-max", str(args.direct_max), "--backend", args.backend, "--depth", str(args.depth),
                "--io-threads", args.io_threads] + (["--tcp-only"] if args.tcp_only else []) + (
                ["--bulk-min", args.bulk_min] if args.bulk_min else [])
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen(cmd_base + ["--rank", str(r)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env, cwd=REPO) for r in range(world)]
    try:
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"child did not start: {line!r}")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        out, _ = procs[0].communicate(timeout=args.time_limit)
        for p in procs[1:]:
            p.wait(timeout=10)
        for line in out.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        raise RuntimeError("rank 0 printed no result")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--sizes", nargs="+", default=["1", "1M", "16M", "64M"])
    ap.add_argument("--algorithms", nargs="+", default=["auto"], help="auto ring direct uint8 uint4")
    ap.add_argument("--streams", type=int, nargs="+", default=[None])
    ap.add_argument("--sub-bytes", nargs="+", default=[None])
    ap.add_argument("--min-stripe", default=None)
    ap.add_argument("--direct-max", default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--depth", type=int, default=None, help="ring sub-chunks per chunk (pipeline depth)")
    ap.add_argument("--time-limit", type=float, default=240.0, help="seconds per world before giving up")
    ap.add_argument("--backend", choices=["pccl", "gloo"], default="pccl")
    ap.add_argument("--tcp-only", action="store_true", help="TCP between the processes, no Unix sockets")
    ap.add_argument("--io-threads", choices=["auto", "on", "off"], default="auto",
                    help="large frames on per-stream I/O threads (DataPlaneConfig.io_threads)")
    ap.add_argument("--bulk-min", default=None, help="smallest payload moved by an I/O thread")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ports", type=int, nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from pccl_py.daemon.dataplane import DataPlaneConfig
    d = DataPlaneConfig()
    args.sizes = [parse_size(s) for s in args.sizes]
    args.min_stripe = parse_size(args.min_stripe) if args.min_stripe else d.min_stripe
    args.direct_max = parse_size(args.direct_max) if args.direct_max else d.direct_max_bytes
    args.depth = args.depth or d.pipeline_depth
    if args.child and args.backend == "gloo":
        gloo_main(args)
        return
    if args.child:
        import uvloop
        args.streams_one = args.streams[0]
        args.sub_bytes_one = parse_size(args.sub_bytes[0])
        uvloop.run(child_main(args))
        return
    streams = [s or 4 for s in args.streams]
    subs = [parse_size(s) if s else d.sub_bytes for s in args.sub_bytes]
    from pccl_py import kernels as _kernels
    print(f"# float32 sum all-reduce, medians over {args.reps} reps (x4 below 1M elements), "
          f"{len(os.sched_getaffinity(0))} cores, loopback, one process per peer on uvloop, "
          f"kernels: {_kernels.SOURCE}")
    from pccl_py.daemon.dataplane import io_threads_on
    threads = io_threads_on({"on": True, "off": False}.get(args.io_threads))
    print(f"# links: {'TCP' if args.tcp_only else 'Unix sockets (same host)'}; I/O threads: "
          f"{'2 per stream (frames >= ' + (args.bulk_min or fmt_size(d.bulk_min)) + ' bytes)' if threads else 'none'}"
          f"; busbw = size * 2(N-1)/N / time")
    print("# loop: share of the time rank 0's event-loop thread was on a CPU; cpu: rank 0's CPU time "
          "(all threads) over the time")
    print(f"{'N':>2} {'K':>2} {'sub':>5} {'size':>6} {'algorithm':>12} {'median_ms':>10} {'min_ms':>9} {'GB/s':>6} "
          f"{'busbw':>6} {'loop':>5} {'cpu':>5}")
    for world in args.world:
        for k in streams:
            for sub in subs:
                t0 = time.monotonic()
                for r in run_world(args, world, k, sub):
                    gbs = r["count"] * 4 / (r["median_ms"] / 1e3) / 1e9
                    bus = gbs * 2 * (world - 1) / world
                    extra = (f" {r['loop_busy']:5.0%} {r['cpu']:5.2f}" if "loop_busy" in r else "")
                    print(f"{world:>2} {k:>2} {fmt_size(sub):>5} {fmt_size(r['count']):>6} {r['algorithm']:>12} "
                          f"{r['median_ms']:10.3f} {r['min_ms']:9.3f} {gbs:6.2f} {bus:6.2f}{extra}", flush=True)
                print(f"#   ({time.monotonic() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
