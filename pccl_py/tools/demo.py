"""``pccl demo``: a local DiLoCo run with peers killed and rejoining.

Starts a coordinator and ``--peers`` trainer processes on 127.0.0.1 (each with its own
private daemon), trains a small MLP with DiLoCo, SIGKILLs one trainer part-way, starts a
fresh one later, and checks after every outer step that all peers hold bit-identical
outer parameters. The outer parameters, their momentum and the step counter live in a
shared state (``Client.shared_state``); each outer step ends with ``update_topology()``
and ``sync_shared_state()``, which is also how a newcomer receives them. Exits non-zero if parity breaks, a trainer fails, or the run stalls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

WORKER_FLAG = "--worker"


# --------------------------------------------------------------------------- worker
def worker(args) -> int:
    import torch

    from pccl_py.client.client import Client
    from pccl_py.client.progress import ProgressBar
    from pccl_py.diloco import DiLoCo

    torch.set_num_threads(1)
    torch.manual_seed(0)  # every peer starts from the same initial model
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
        torch.nn.Linear(256, 1)
    )
    gen = torch.Generator().manual_seed(1000 + args.worker_id)  # each peer its own data
    w_true = torch.randn(16, 1, generator=torch.Generator().manual_seed(7))

    def batch():
        x = torch.randn(256, 16, generator=gen)
        return x, torch.sin(x @ w_true) + 0.05 * torch.randn(256, 1, generator=gen)

    def emit(**kw):
        print(json.dumps({"worker": args.worker_id, **kw}), flush=True)

    with Client(coordinator=args.coordinator, timeout=30.0) as client:
        if args.hold:  # started early by the launcher: join when it says so
            sys.stdin.readline()
        topo = client.connect()
        inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
        diloco = DiLoCo(client, model, outer_lr=0.7, outer_momentum=0.9, inner_optimizer=inner, timeout=30.0)
        # join() registers the run's state (outer parameters, momentum, step counter) as a
        # shared state and syncs it: the first peer alone, a newcomer together with the
        # members whose outer_step() admitted it. The model then holds the run's parameters
        # (and a newcomer's AdamW the state of an established peer).
        bar = ProgressBar(f"[trainer {args.worker_id}] receiving the run's state")
        res = diloco.join(progress=bar)
        parity = same_everywhere(client, diloco)
        emit(event="joined", epoch=topo["epoch"], world=topo["world_size"], step=diloco.step,
             rx=res["rx_bytes"], revision=diloco.state.revision, parity=parity)
        while diloco.step < args.outer_steps:
            for _ in range(args.inner_steps):
                x, y = batch()
                loss = torch.nn.functional.mse_loss(model(x), y)
                inner.zero_grad()
                loss.backward()
                inner.step()
            # average, outer step, vote (a newcomer's join() returns here), sync
            info = diloco.outer_step()
            if info.get("diverged"):  # not applied here; the sync brought this peer in step
                emit(event="diverged", step=diloco.step, message=info["error"])
            parity = same_everywhere(client, diloco)
            emit(
                event="step", step=diloco.step, loss=round(loss.item(), 5), world=info.get("world_size"),
                members=info.get("members"), epoch=info.get("epoch"), parity=parity,
                ms=round(info.get("seconds", 0.0) * 1e3, 2), bytes=int(info.get("tx_bytes", 0)),
                sync_ms=round(info.get("sync_seconds", 0.0) * 1e3, 2),
            )
            if not parity:
                emit(event="error", message="outer parameters differ between peers")
                return 3
        emit(event="done", step=diloco.step)
    return 0


def same_everywhere(client, diloco) -> bool:
    """Parity check: every peer's hash of its outer state, gathered (retried across a death)."""
    import xxhash

    from pccl_py.errors import Aborted, PeerLost

    digest = xxhash.xxh64()
    for t in diloco.outer + diloco.momentum:
        digest.update(t.numpy().tobytes())
    deadline = time.monotonic() + 30.0
    while True:
        try:
            hashes = client.all_gather(digest.digest(), timeout=30.0)
            return len(set(hashes)) == 1
        except (PeerLost, Aborted):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# ----------------------------------------------------------------------- orchestrator
def orchestrate(args) -> int:
    from pccl_py.tools import launch

    def worker_cmd(wid: int, addr: str) -> list[str]:
        return [sys.executable, "-m", "pccl_py.tools.demo", WORKER_FLAG, "--worker-id", str(wid),
                "--coordinator", addr, "--outer-steps", str(args.outer_steps),
                "--inner-steps", str(args.inner_steps)]

    state = {"kill_time": None, "seen_kill": False}

    def show(ev: dict, run: launch.LocalRun) -> None:
        wid, kind = ev["worker"], ev["event"]
        if run.last_kill is not None and not state["seen_kill"]:
            state["kill_time"], state["seen_kill"] = run.last_kill, True
        if kind == "step":
            recovered = ""
            if state["kill_time"] is not None and ev["world"] == args.peers - 1:
                recovered = f"  (recovered {ev['t'] - state['kill_time']:.2f}s after the kill)"
                state["kill_time"] = None
            live = [w for w, p in run.procs.items() if p.poll() is None]
            if live and wid == min(live):
                print(f"[demo] step {ev['step']:3d}  loss {ev['loss']:.5f}  world {ev['world']}  "
                      f"epoch {ev['epoch']}  all-reduce {ev['ms']:.1f} ms  parity "
                      f"{'ok' if ev['parity'] else 'BROKEN'}{recovered}", flush=True)
        elif kind == "joined":
            print(f"[demo] trainer {wid} accepted at epoch {ev['epoch']} (world {ev['world']}), "
                  f"starting from step {ev['step']} (shared state revision {ev['revision']}, "
                  f"{ev['rx']} bytes received)", flush=True)
        elif kind == "diverged":
            print(f"[demo] trainer {wid} did not apply step {ev['step']} (the others completed it "
                  f"without it); the next sync brings it in step: {ev['message']}", flush=True)

    print(f"[demo] {args.peers} trainers, {args.outer_steps} outer steps of {args.inner_steps} inner "
          f"steps; kill one at step {args.kill_at}, add one at step {args.join_at}")
    plan = launch.Plan(peers=args.peers, kill_at=args.kill_at, join_at=args.join_at, deadline=args.deadline,
                       stall=args.stall, name="demo")
    out = launch.run(worker_cmd, plan, show)
    if out.failed:
        print("[demo] FAILED: " + "; ".join(out.failed))
        return 1
    print(f"[demo] done: {len(out.done)} trainers finished {args.outer_steps} outer steps with identical "
          f"parameters; one was killed and one joined mid-run")
    if args.png:
        try:
            from pccl_py.tools.plot import draw
        except ImportError:  # pragma: no cover - matplotlib is in the demo's install
            print("[demo] no PNG: matplotlib is not installed (pip install matplotlib)")
            return 0
        path = draw(out.events, out.faults, args.png,
                    f"pccl demo: DiLoCo, {args.peers} trainers, one killed, one joined")
        print(f"[demo] loss, world size and bytes per outer step: {os.path.abspath(path)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pccl demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--outer-steps", type=int, default=40)
    p.add_argument("--inner-steps", type=int, default=20)
    p.add_argument("--kill-at", type=int, default=8)
    p.add_argument("--join-at", type=int, default=12)
    p.add_argument("--deadline", type=float, default=300.0, help="give up after this many seconds")
    p.add_argument("--stall", type=float, default=60.0, help="fail when no step completes for this long")
    p.add_argument("--png", default="pccl-demo.png", help="where to draw the run (empty: no picture)")
    p.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--hold", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
