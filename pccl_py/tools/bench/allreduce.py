"""``pccl bench allreduce``: all-reduce throughput through the public client API.

Starts a coordinator and N trainer processes on 127.0.0.1, each with its own daemon, and
times ``Client.all_reduce`` (client -> shared memory -> daemon -> wire -> daemon -> client)
over the given sizes. ``--compare gloo`` runs torch.distributed's gloo backend on the same
sizes and world size in the same invocation, one after the other.

Reported per size: median seconds over the repeats (as seen by rank 0), bus bandwidth
2(N-1)/N * bytes / seconds, and gloo's median and our speed-up over it. ``--floor`` also
times the memory floor of a same-host all-reduce on this machine (``pccl_py.tools.bench.floor``):
no shared-memory path can beat it, so ``floor / ours`` says how much is left to win.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from pccl_py import calls
from pccl_py.tools.bench import floor
from pccl_py.tools.launch import free_port

UNITS = {"k": 1 << 10, "K": 1 << 10, "m": 1 << 20, "M": 1 << 20, "g": 1 << 30, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'1M' -> 1048576 elements; plain numbers are element counts."""
    if text[-1] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text)


def warmups_for(nbytes: int) -> int:
    """Untimed calls first (page faults, connection and scheduler warm-up); gloo gets the same."""
    return 10 if nbytes <= 8 << 20 else 3


def repeats_for(nbytes: int, base: int) -> int:
    """Timed repeats per size: ``base`` for large calls, more for small (cheap, noisy) ones."""
    if nbytes <= 1 << 16:
        return base * 4
    return base * 3 if nbytes <= 8 << 20 else base


def ours_worker(args) -> int:
    import numpy as np

    from pccl_py.client.client import Client

    with Client(coordinator=args.coordinator, timeout=120.0, streams=args.streams, tcp_only=args.tcp_only) as c:
        topo = c.connect()
        deadline = time.monotonic() + 60
        while topo["world_size"] < args.world:
            if time.monotonic() > deadline:
                raise SystemExit("not all peers joined within 60 s")
            time.sleep(0.05)
            topo = c.update_topology()
        rows = []
        for n in args.sizes:
            if args.alloc:  # in shared memory the daemon maps: no copy in
                x = c.alloc(n)
                x[:] = 1.0 + topo["rank"]
            else:
                x = np.full(n, 1.0 + topo["rank"], dtype=np.float32)
            reps = repeats_for(4 * n, args.repeat)
            for _ in range(warmups_for(4 * n)):
                c.all_reduce(x, op="sum", quant=args.quant, algorithm=args.algorithm)
            times = []
            info = {}
            for _ in range(reps):
                t0 = time.perf_counter()
                info = c.all_reduce(x, op="sum", quant=args.quant, algorithm=args.algorithm)
                times.append(time.perf_counter() - t0)
            rows.append({"size": n, "times": times, "algorithm": info.get("algorithm"),
                         "tx_bytes": info.get("tx_bytes")})
        if topo["rank"] == 0:
            print(json.dumps(rows), flush=True)
        c.all_reduce(np.zeros(1, np.float32))  # nobody leaves while others still measure
    return 0


def gloo_worker(args) -> int:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}:{args.port}", rank=args.rank,
                            world_size=args.world)
    rows = []
    for n in args.sizes:
        x = torch.full((n,), 1.0 + args.rank, dtype=torch.float32)
        reps = repeats_for(4 * n, args.repeat)
        for _ in range(warmups_for(4 * n)):
            dist.all_reduce(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        rows.append({"size": n, "times": times})
    if args.rank == 0:
        print(json.dumps(rows), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _collect(procs: list[subprocess.Popen], timeout: float) -> list[dict]:
    """Wait for every process; rank 0 (whichever process it turned out to be) prints the rows."""
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for i, p in enumerate(procs):
            stdout, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if p.returncode != 0:
                raise RuntimeError(f"benchmark process {i} exited with {p.returncode}")
            outs += [ln for ln in stdout.decode().splitlines() if ln.startswith("[")]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if len(outs) != 1:
        raise RuntimeError(f"expected one result line from rank 0, got {len(outs)}")
    return json.loads(outs[0])


def _common(args) -> list[str]:
    return ["--world", str(args.world), "--sizes", ",".join(map(str, args.sizes)),
            "--repeat", str(args.repeat)]


def run_ours(args) -> list[dict]:
    addr = f"127.0.0.1:{free_port()}"
    coord = subprocess.Popen([sys.executable, "-m", "pccl_py.coordinator", "--listen", addr,
                              "--log-level", "WARNING"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        procs = []
        for _ in range(args.world):
            cmd = [sys.executable, "-m", "pccl_py.tools.bench.allreduce", "--role", "ours",
                   "--coordinator", addr, "--algorithm", args.algorithm, *_common(args)]
            if args.quant:
                cmd += ["--quant", args.quant]
            if args.streams:
                cmd += ["--streams", str(args.streams)]
            if args.alloc:
                cmd += ["--alloc"]
            if args.tcp_only:
                cmd += ["--tcp-only"]
            env = dict(os.environ)
            if args.io_threads != "auto":  # read by the daemons the clients spawn
                env["PCCL_IO_THREADS"] = args.io_threads
            if args.integrity is not None:
                env["PCCL_INTEGRITY"] = args.integrity
            if args.encrypt:
                env["PCCL_ENCRYPT"] = "1"
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env))
            time.sleep(0.05)
        return _collect(procs, args.timeout)
    finally:
        coord.terminate()
        try:
            coord.wait(5)
        except subprocess.TimeoutExpired:
            coord.kill()
            coord.wait()


def run_gloo(args) -> list[dict]:
    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, "-m", "pccl_py.tools.bench.allreduce", "--role", "gloo",
                          "--port", str(port), "--rank", str(r), *_common(args)],
                         stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
        for r in range(args.world)
    ]
    return _collect(procs, args.timeout)


def inspect_default_streams(cls) -> int:
    """The K a daemon's links start at when --streams is not given (DataPlane's default;
    the daemon then adds streams by measurement, see daemon/stream_count.py)."""
    import inspect
    return int(inspect.signature(cls.__init__).parameters["streams"].default)


def human(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pccl bench allreduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sizes", default="1,256K,1M,16M,64M",
                   help="comma-separated element counts (float32), suffixes K/M/G")
    p.add_argument("--quant", choices=[q for q in calls.QUANTS if q], default=None)
    p.add_argument("--streams", type=int, default=None)
    p.add_argument("--algorithm", choices=calls.ALGORITHMS, default="auto",
                   help="auto: direct for small calls, then shared memory when every peer shares this host, else ring")
    p.add_argument("--tcp-only", action="store_true",
                   help="daemons dial each other over TCP (by default peers on one host use Unix sockets)")
    p.add_argument("--io-threads", choices=["auto", "on", "off"], default="auto",
                   help="large frames on a receive and a send thread per stream (auto: on with more "
                        "than 2 CPUs); see docs/dataplane.md")
    p.add_argument("--integrity", choices=["on", "off"], default=None,
                   help="frame tags on the data links (default: the daemons' default, on); off measures their cost")
    p.add_argument("--encrypt", action="store_true", help="encrypted data payloads (measures their cost)")
    p.add_argument("--compare", choices=["gloo"], default=None)
    p.add_argument("--floor", action="store_true",
                   help="also time a daemon-free shared-memory all-reduce (the least memory traffic "
                        "possible on this host: a bound, not a collective)")
    p.add_argument("--alloc", action="store_true",
                   help="all-reduce tensors from Client.alloc (shared memory: no copy in)")
    p.add_argument("--repeat", type=int, default=7, help="timed repeats (more for small sizes)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run ours and gloo in turn this many times; report the median over rounds "
                        "and the range of the per-round ratios (on a shared machine load changes "
                        "between runs)")
    p.add_argument("--timeout", type=float, default=540.0)
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--role", choices=["ours", "gloo", "floor"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--floor-segments", default="", help=argparse.SUPPRESS)
    p.add_argument("--floor-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--master", default="127.0.0.1", help=argparse.SUPPRESS)  # gloo rank 0's host
    args = p.parse_args(argv)
    args.sizes = [parse_size(s) for s in str(args.sizes).split(",") if s]
    if args.role == "ours":
        return ours_worker(args)
    if args.role == "gloo":
        return gloo_worker(args)
    if args.role == "floor":
        return floor.worker(args)
    if args.world < 2:
        p.error("--world must be at least 2")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")

    from pccl_py.daemon.dataplane import DataPlane, DataPlaneConfig, io_threads_on
    streams = args.streams or f"auto (from {inspect_default_streams(DataPlane)})"
    threads = io_threads_on({"on": True, "off": False}.get(args.io_threads))
    io = (f"I/O threads: 2 per stream for frames >= {DataPlaneConfig().bulk_min >> 10} KiB" if threads
          else "I/O threads: none (the event loop moves every frame)")
    if not args.json:
        print(f"all-reduce float32 sum, world {args.world}, {len(os.sched_getaffinity(0))} cores, 127.0.0.1, "
              f"links over {'TCP' if args.tcp_only else 'Unix sockets'}, {streams} streams per link, {io}; "
              f"median of repeats as seen by rank 0"
              f"{'; tensors from Client.alloc' if args.alloc else ''}"
              f"{f'; median of {args.rounds} rounds (ours, then gloo, in turn)' if args.rounds > 1 else ''}"
              f"{'; floor: daemon-free shared-memory all-reduce (a bound, see pccl_py/tools/bench/floor.py)' if args.floor else ''}",
              flush=True)
    ours_by_round, gloo_by_round, floor_by_round = [], [], []
    for r in range(args.rounds):
        if args.rounds > 1:
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        ours_by_round.append(run_ours(args))
        if args.compare == "gloo":
            gloo_by_round.append(run_gloo(args))
        if args.floor:
            floor_by_round.append(floor.run(args, _collect))
    n = args.world
    header = f"{'elements':>9} {'bytes':>9} {'algo':>5} {'median ms':>10} {'busbw GB/s':>10}"
    if gloo_by_round:
        header += f" {'gloo ms':>9} {'gloo GB/s':>9} {'ratio':>6}"
        if args.rounds > 1:
            header += f" {'ratio range':>12}"
    if floor_by_round:
        header += f" {'floor ms':>9} {'floor/ours':>10}"
    if not args.json:
        print(header)
    for i, row in enumerate(ours_by_round[0]):
        nbytes = 4 * row["size"]
        ours_s = [statistics.median(rnd[i]["times"]) for rnd in ours_by_round]
        med = statistics.median(ours_s)
        busbw = 2 * (n - 1) / n * nbytes / med / 1e9
        rec = {"world": n, "size": row["size"], "bytes": nbytes, "streams": streams, "io_threads": threads,
               "alloc": args.alloc,
               "links": "tcp" if args.tcp_only else "unix", "quant": args.quant, "algorithm": row["algorithm"],
               "seconds": med, "busbw": busbw, "gloo_seconds": None, "ratio": None, "rounds": args.rounds}
        if gloo_by_round:
            gloo_s = [statistics.median(rnd[i]["times"]) for rnd in gloo_by_round]
            ratios = [g / o for g, o in zip(gloo_s, ours_s)]
            rec.update(gloo_seconds=statistics.median(gloo_s), ratio=statistics.median(ratios), ratios=ratios)
        if floor_by_round:
            floor_s = [statistics.median(rnd[i]["times"]) for rnd in floor_by_round]
            rec.update(floor_seconds=statistics.median(floor_s),
                       floor_ratio=statistics.median([f / o for f, o in zip(floor_s, ours_s)]))
        if args.rounds > 1:
            rec["seconds_by_round"] = ours_s
        if args.json:
            print(json.dumps(rec))
        else:
            line = (f"{human(row['size']):>9} {human(nbytes):>9} {str(row['algorithm']):>5} "
                    f"{med * 1e3:>10.3f} {busbw:>10.3f}")
            if gloo_by_round:
                gbw = 2 * (n - 1) / n * nbytes / rec["gloo_seconds"] / 1e9
                line += f" {rec['gloo_seconds'] * 1e3:>9.3f} {gbw:>9.3f} {rec['ratio']:>5.2f}x"
                if args.rounds > 1:
                    line += f" {min(rec['ratios']):>5.2f}-{max(rec['ratios']):.2f}x"
            if floor_by_round:
                line += f" {rec['floor_seconds'] * 1e3:>9.3f} {rec['floor_ratio']:>9.2f}x"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
