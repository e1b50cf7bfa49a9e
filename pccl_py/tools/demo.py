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
import select
import signal
import socket
import subprocess
import sys
import time

WORKER_FLAG = "--worker"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
class Run:
    def __init__(self, args) -> None:
        self.args = args
        self.procs: dict[int, subprocess.Popen] = {}
        self.coordinator: subprocess.Popen | None = None
        self.last_step: dict[int, int] = {}
        self.buffers: dict[int, bytes] = {}
        self.failed: list[str] = []

    def start_coordinator(self, addr: str) -> None:
        self.coordinator = subprocess.Popen(
            [sys.executable, "-m", "pccl_py.coordinator", "--listen", addr, "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL
        )

    def start_worker(self, wid: int, addr: str) -> None:
        cmd = [sys.executable, "-m", "pccl_py.tools.demo", WORKER_FLAG, "--worker-id", str(wid),
               "--coordinator", addr, "--outer-steps", str(self.args.outer_steps),
               "--inner-steps", str(self.args.inner_steps)]
        # A SIGKILLed trainer's resource tracker unlinks the trainer's shared memory and warns
        # about "leaked" segments: that is the cleanup working, not a leak worth showing here.
        env = {**os.environ, "PYTHONWARNINGS": "ignore::UserWarning:multiprocessing.resource_tracker"}
        self.procs[wid] = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
        os.set_blocking(self.procs[wid].stdout.fileno(), False)
        self.buffers[wid] = b""
        print(f"[demo] started trainer {wid} (pid {self.procs[wid].pid})", flush=True)

    def poll(self, timeout: float) -> list[dict]:
        live = {p.stdout.fileno(): wid for wid, p in self.procs.items() if p.stdout and not p.stdout.closed}
        if not live:
            time.sleep(timeout)
            return []
        r, _, _ = select.select(list(live), [], [], timeout)
        events = []
        for fd in r:
            wid = live[fd]
            chunk = self.procs[wid].stdout.read() or b""
            self.buffers[wid] += chunk
            *lines, self.buffers[wid] = self.buffers[wid].split(b"\n")
            for line in lines:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    print(f"[trainer {wid}] {line.decode(errors='replace')}")
        return events

    def stop_all(self, grace: float = 0.0) -> None:
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs.values()):
            time.sleep(0.05)
        for p in list(self.procs.values()) + ([self.coordinator] if self.coordinator else []):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in list(self.procs.values()) + ([self.coordinator] if self.coordinator else []):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def orchestrate(args) -> int:
    addr = f"127.0.0.1:{free_port()}"
    run = Run(args)
    print(f"[demo] coordinator on {addr}; {args.peers} trainers, {args.outer_steps} outer steps "
          f"of {args.inner_steps} inner steps; kill one at step {args.kill_at}, add one at step {args.join_at}")
    run.start_coordinator(addr)
    time.sleep(0.3)
    next_id = 0
    for _ in range(args.peers):
        run.start_worker(next_id, addr)
        next_id += 1
    killed = joined = False
    newcomer = -1
    kill_time = None
    done: set[int] = set()
    deadline = time.monotonic() + args.deadline
    last_progress = time.monotonic()
    try:
        while time.monotonic() < deadline:
            for ev in run.poll(0.2):
                wid = ev["worker"]
                if ev["event"] == "step":
                    last_progress = time.monotonic()
                    run.last_step[wid] = ev["step"]
                    recovered = ""
                    if kill_time is not None and ev["world"] == args.peers - 1:
                        recovered = f"  (recovered {time.monotonic() - kill_time:.2f}s after the kill)"
                        kill_time = None
                    if wid == min(w for w, p in run.procs.items() if p.poll() is None):
                        print(f"[demo] step {ev['step']:3d}  loss {ev['loss']:.5f}  world {ev['world']}  "
                              f"epoch {ev['epoch']}  all-reduce {ev['ms']:.1f} ms  parity "
                              f"{'ok' if ev['parity'] else 'BROKEN'}{recovered}", flush=True)
                    if not ev["parity"]:
                        run.failed.append(f"parity broken at step {ev['step']}")
                elif ev["event"] == "joined":
                    if wid == newcomer and ev["world"] < 2:
                        run.failed.append("the newcomer was not admitted while the others trained")
                    print(f"[demo] trainer {wid} accepted at epoch {ev['epoch']} (world {ev['world']}), "
                          f"starting from step {ev['step']} (shared state revision {ev['revision']}, "
                          f"{ev['rx']} bytes received)", flush=True)
                    if not ev["parity"]:
                        run.failed.append(f"trainer {wid} joined with state that differs from the others")
                elif ev["event"] == "diverged":
                    print(f"[demo] trainer {wid} did not apply step {ev['step']} (the others completed it "
                          f"without it); the next sync brings it in step: {ev['message']}", flush=True)
                elif ev["event"] == "done":
                    done.add(wid)
                elif ev["event"] == "error":
                    run.failed.append(f"trainer {wid}: {ev['message']}")
            lead = max(run.last_step.values(), default=0)
            if not killed and lead >= args.kill_at:
                victim = max(w for w, p in run.procs.items() if p.poll() is None)
                print(f"[demo] SIGKILL trainer {victim} (pid {run.procs[victim].pid})", flush=True)
                run.procs[victim].kill()
                run.procs[victim].wait()
                run.procs.pop(victim)
                killed, kill_time = True, time.monotonic()
            if killed and not joined and lead >= args.join_at:
                newcomer = next_id
                run.start_worker(next_id, addr)
                next_id += 1
                joined = True
            for wid, p in list(run.procs.items()):
                if p.poll() is not None and wid not in done:
                    run.failed.append(f"trainer {wid} exited with code {p.returncode}")
                    run.procs.pop(wid)
            if run.procs and all(w in done for w in run.procs):
                break
            if time.monotonic() - last_progress > args.stall:
                run.failed.append(f"no progress for {args.stall:.0f}s")
                break
            if run.failed:
                break
        else:
            run.failed.append(f"did not finish within {args.deadline:.0f}s")
    finally:
        # trainers that finished are leaving gracefully; give them time before SIGTERM
        run.stop_all(grace=10.0 if not run.failed else 0.0)
    if run.failed:
        print("[demo] FAILED: " + "; ".join(run.failed))
        return 1
    print(f"[demo] done: {len(done)} trainers finished {args.outer_steps} outer steps with identical "
          f"parameters; one was killed and one joined mid-run")
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
    p.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
