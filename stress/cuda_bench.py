"""Time all-reduces of CUDA tensors by the way they reach the daemon.

    PYTHONPATH=. python stress/cuda_bench.py [--sizes 1M 16M 64M] [--reps 7] [--json out.json]

Starts a coordinator and two clients (threads of this process, each with its own daemon,
both on the current GPU), and for each size of float32 CUDA tensor reports the median
time of one all_reduce, the two peers starting each call together, for
  * sum, stage="host": staged through a pageable host copy (the path before pinning);
  * sum, stage="pinned": DMA straight into page-locked shared memory and back;
  * quant="uint8", stage="pinned" and stage="gpu_quant" (quantized on the GPU, codes cross PCIe);
and, for context, one device-to-host and one host-to-device copy of the same size, into
pageable and into page-locked memory, timed with CUDA events. Every result is checked.
Exits 0 when all matched, 1 on a wrong result, 2 when no GPU is visible.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pccl_py import Client  # noqa: E402
from pccl_py.tools.launch import free_port  # noqa: E402

MODES = [("sum", None, "host"), ("sum", None, "pinned"), ("avg", "uint8", "pinned"), ("avg", "uint8", "gpu_quant")]


def count_of(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1].upper(), 1)
    return int(text.rstrip("kKmM")) * mult


def copy_times(n: int, reps: int) -> dict:
    """Median ms of a D2H and an H2D copy of n float32, into pageable and page-locked memory."""
    dev = torch.empty(n, device="cuda")
    out = {}
    for kind, host in (("pageable", torch.empty(n)), ("pinned", torch.empty(n, pin_memory=True))):
        for way in ("d2h", "h2d"):
            ts = []
            for _ in range(reps + 1):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                if way == "d2h":
                    host.copy_(dev, non_blocking=kind == "pinned")
                else:
                    dev.copy_(host, non_blocking=kind == "pinned")
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b))
            ms = statistics.median(ts[1:])
            out[f"{way}_{kind}_ms"] = round(ms, 3)
            out[f"{way}_{kind}_GBps"] = round(n * 4 / ms / 1e6, 1)
    return out


def bench(c: Client, rank: int, sizes: list[int], reps: int, barrier: threading.Barrier) -> dict:
    rows = {}
    for n in sizes:
        base = torch.linspace(-1, 1, n, device="cuda")
        x = torch.empty(n, device="cuda")
        for op, quant, stage in MODES:
            ts, info, ok = [], None, True
            for _ in range(reps + 1):  # the first call (fresh segments, registration) is not timed
                if quant is None:
                    x.fill_(float(rank + 1))
                else:
                    torch.mul(base, rank + 1, out=x)
                torch.cuda.synchronize()
                barrier.wait(timeout=120)
                t0 = time.perf_counter()
                info = c.all_reduce(x, op=op, quant=quant, stage=stage)
                ts.append(time.perf_counter() - t0)
                if quant is None:
                    ok = ok and bool(torch.all(x == 3.0))
                else:  # avg of base and 2*base = 1.5*base, quantized twice on a range of 3
                    ok = ok and float((x - 1.5 * base).abs().max()) <= 2 * 3.0 / 255
            rows[(n, op, quant, stage)] = {"ms": round(statistics.median(ts[1:]) * 1e3, 2),
                                           "staging": info.get("cuda_staging"), "ok": ok}
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1M", "16M", "64M"], help="float32 elements per tensor")
    ap.add_argument("--reps", type=int, default=7, help="timed calls per size and mode (after one untimed)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device visible: this benchmark needs a GPU", file=sys.stderr)
        return 2
    sizes = [count_of(s) for s in args.sizes]
    addr = f"127.0.0.1:{free_port()}"
    coord = subprocess.Popen([sys.executable, "-m", "pccl_py.coordinator", "--listen", addr,
                              "--log-level", "WARNING", "--recovery-grace", "0.2"])
    time.sleep(1.0)
    clients = []
    try:
        clients = [Client(coordinator=addr, timeout=120.0) for _ in range(2)]
        with cf.ThreadPoolExecutor(2) as ex:
            def join(c):
                topo = c.connect()
                deadline = time.monotonic() + 60
                while topo["world_size"] < 2:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the two clients did not both join within 60 s")
                    topo = c.update_topology()
                return topo["rank"]

            ranks = list(ex.map(join, clients))
            barrier = threading.Barrier(2)
            futs = [ex.submit(bench, c, r, sizes, args.reps, barrier) for c, r in zip(clients, ranks)]
            results = [f.result(timeout=600) for f in futs]
    finally:
        for c in clients:
            c.close()
        coord.terminate()
        coord.wait(10)
    copies = {n: copy_times(n, args.reps) for n in sizes}

    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, 2 peers on one GPU, median of {args.reps} calls (ms)")
    head = f"{'elements':>9} {'MiB':>5} | {'sum host':>9} {'sum pinned':>10} {'x':>5} | " \
           f"{'u8 pinned':>9} {'u8 gpu_q':>9} {'x':>5} | {'D2H pg/pin':>11} {'H2D pg/pin':>11}"
    print(head)
    print("-" * len(head))
    out, failed = [], False
    for n in sizes:
        cells = {(op, q, st): max(r[(n, op, q, st)]["ms"] for r in results) for op, q, st in MODES}
        oks = all(r[(n, op, q, st)]["ok"] for r in results for op, q, st in MODES)
        stagings = {f"{op}/{q}/{st}": results[0][(n, op, q, st)]["staging"] for op, q, st in MODES}
        failed = failed or not oks
        h, p = cells[("sum", None, "host")], cells[("sum", None, "pinned")]
        qp, qg = cells[("avg", "uint8", "pinned")], cells[("avg", "uint8", "gpu_quant")]
        cp = copies[n]
        print(f"{n:>9} {n * 4 >> 20:>5} | {h:>9.2f} {p:>10.2f} {h / p:>5.2f} | {qp:>9.2f} {qg:>9.2f} "
              f"{qp / qg:>5.2f} | {cp['d2h_pageable_ms']:>5.2f}/{cp['d2h_pinned_ms']:<5.2f} "
              f"{cp['h2d_pageable_ms']:>5.2f}/{cp['h2d_pinned_ms']:<5.2f}{'' if oks else '  WRONG RESULT'}")
        out.append({"elements": n, "bytes": n * 4, "ms": {f"{op}/{q}/{st}": v for (op, q, st), v in cells.items()},
                    "staging": stagings, "copies": cp, "ok": oks})
    print("x: speed-up of the second column over the first; times are the slower peer's median")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device, "torch": torch.__version__, "reps": args.reps, "rows": out}, fh, indent=1)
    print("results:", "WRONG" if failed else "ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
