"""CUDA tensors through the client: staged via host memory, result back on the GPU.

    python stress/cuda_smoke.py

Starts a coordinator and two clients (threads, each with its own daemon), all-reduces
float32, bfloat16 and strided CUDA tensors through page-locked shared memory (the default
``stage="pinned"``) and a quantized one with ``stage="gpu_quant"``, checks values, the
staging that ran and that the result stays on the GPU, and prints the time of a
64M-element CUDA all-reduce by each staging next to the same size on the CPU.
Exits 0 when everything matched, 2 when no GPU is visible.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pccl_py import Client  # noqa: E402
from pccl_py.tools.launch import free_port  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device visible")
        return 2
    addr = f"127.0.0.1:{free_port()}"
    coord = subprocess.Popen([sys.executable, "-m", "pccl_py.coordinator", "--listen", addr,
                              "--log-level", "WARNING", "--recovery-grace", "0.2"])
    time.sleep(1.0)
    clients = [Client(coordinator=addr, timeout=60.0) for _ in range(2)]
    failures = []
    try:
        with cf.ThreadPoolExecutor(2) as ex:
            def join(c):
                topo = c.connect()
                while topo["world_size"] < 2:
                    topo = c.update_topology()
                return topo["rank"]
            ranks = list(ex.map(join, clients))

            def body(c, rank):
                out = {}
                a = torch.full((1_000_003,), float(rank + 1), device="cuda")
                b = torch.arange(4096, device="cuda", dtype=torch.bfloat16) * (rank + 1)
                base = torch.full((600, 1000), float(rank + 1), device="cuda")
                s = base[:, ::2]  # strided: reduced through a contiguous copy, written back into the view
                info = c.all_reduce([a, b, s], op="sum")
                out["staging"] = info.get("cuda_staging")
                out["f32_ok"] = bool(torch.all(a == 3.0)) and a.is_cuda
                out["bf16_ok"] = bool(torch.equal(b, torch.arange(4096, device="cuda", dtype=torch.bfloat16) * 3))
                out["strided_ok"] = bool(torch.all(s == 3.0)) and bool(torch.all(base[:, 1::2] == rank + 1))
                ref = torch.linspace(-1, 1, 3_000_001, device="cuda")
                q = ref * (rank + 1)
                qi = c.all_reduce(q, op="avg", quant="uint8", stage="gpu_quant")
                out["gpu_quant_ok"] = (qi.get("cuda_staging") == "gpu_quant"
                                       and float((q - 1.5 * ref).abs().max()) <= 2 * 3.0 / 255)
                for dev, stage in (("cuda", "host"), ("cuda", "pinned"), ("cpu", None)):
                    x = torch.ones(64 << 20, device=dev)
                    c.all_reduce(x, stage=stage)
                    ts = []
                    for _ in range(5):
                        x.fill_(1.0)
                        t0 = time.perf_counter()
                        c.all_reduce(x, stage=stage)
                        ts.append(time.perf_counter() - t0)
                        out["f32_ok"] = out["f32_ok"] and bool(torch.all(x == 2.0))
                    out[f"{dev}{'_' + stage if stage else ''}_64M_ms"] = round(statistics.median(ts) * 1e3, 1)
                return out

            results = list(ex.map(body, clients, ranks))
    finally:
        for c in clients:
            c.close()
        coord.terminate()
        coord.wait(10)
    for r in results:
        print(r)
        if not (r["f32_ok"] and r["bf16_ok"] and r["strided_ok"] and r["gpu_quant_ok"]
                and r["staging"] == "pinned"):
            failures.append(r)
    print("CUDA path:", "FAILED" if failures else "ok", f"({torch.cuda.get_device_name()})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
