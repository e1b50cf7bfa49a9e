"""A run on this machine: a coordinator and trainer processes that report JSON lines on
stdout, with one trainer SIGKILLed and a new one started at given steps. ``pccl demo`` and
the programs in ``examples/`` are built on it.

A trainer started to join later gets ``--hold`` on its command line: it gets ready (imports,
its daemon) and waits for a line on stdin before ``connect()``, so that it joins at the
planned step however long a process takes to start on a loaded machine.

A trainer prints one JSON object per line with ``worker`` (its id) and ``event``:
``joined`` (``epoch``, ``world``, ``step``, ``rx``, ``revision``, ``parity``), ``step``
(``step``, ``world``, ``parity``, and whatever else it measures), ``diverged``
(``step``, ``message``), ``done`` and ``error`` (``message``). Other lines are echoed.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Plan:
    peers: int = 3
    kill_at: int | None = None  # SIGKILL the newest trainer once a trainer reached this step
    join_at: int | None = None  # then start a new one once a trainer reached this step
    deadline: float = 300.0  # give up after this many seconds
    stall: float = 60.0  # fail when no step completes for this long
    name: str = "run"


@dataclass
class Outcome:
    failed: list[str] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)  # every trainer event, with "t" (seconds into the run)
    done: set[int] = field(default_factory=set)
    faults: list[dict] = field(default_factory=list)  # {"t", "kind": "kill"|"join", "worker"}


class LocalRun:
    """The processes of a run and the JSON lines they print."""

    def __init__(self, worker_cmd: Callable[[int, str], list[str]], name: str = "run") -> None:
        self.worker_cmd = worker_cmd
        self.name = name
        self.procs: dict[int, subprocess.Popen] = {}
        self.coordinator: subprocess.Popen | None = None
        self.buffers: dict[int, bytes] = {}
        self.last_kill: float | None = None  # seconds into the run of the last SIGKILL

    def start_coordinator(self, addr: str) -> None:
        self.coordinator = subprocess.Popen(
            [sys.executable, "-m", "pccl_py.coordinator", "--listen", addr, "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL)

    def start_worker(self, wid: int, addr: str, hold: bool = False) -> None:
        # A SIGKILLed trainer's resource tracker unlinks the trainer's shared memory and warns
        # about "leaked" segments: that is the cleanup working, not a leak worth showing here.
        env = {**os.environ, "PYTHONWARNINGS": "ignore::UserWarning:multiprocessing.resource_tracker"}
        cmd = self.worker_cmd(wid, addr) + (["--hold"] if hold else [])
        self.procs[wid] = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env,
                                           stdin=subprocess.PIPE if hold else subprocess.DEVNULL)
        os.set_blocking(self.procs[wid].stdout.fileno(), False)
        self.buffers[wid] = b""
        print(f"[{self.name}] started trainer {wid} (pid {self.procs[wid].pid})"
              f"{', held until it is to join' if hold else ''}", flush=True)

    def release(self, wid: int) -> None:
        """Let a held trainer go on to connect()."""
        p = self.procs[wid]
        p.stdin.write(b"go\n")
        p.stdin.flush()
        print(f"[{self.name}] trainer {wid} joins now", flush=True)

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
        everyone = list(self.procs.values()) + ([self.coordinator] if self.coordinator else [])
        for p in everyone:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in everyone:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def run(worker_cmd: Callable[[int, str], list[str]], plan: Plan,
        on_event: Callable[[dict, LocalRun], None] | None = None) -> Outcome:
    """Start the coordinator and ``plan.peers`` trainers, kill and add one as planned, and
    collect events until every trainer is done, one fails, or the run stalls."""
    addr = f"127.0.0.1:{free_port()}"
    lr = LocalRun(worker_cmd, plan.name)
    out = Outcome()
    lr.start_coordinator(addr)
    time.sleep(0.3)
    next_id = 0
    for _ in range(plan.peers):
        lr.start_worker(next_id, addr)
        next_id += 1
    killed = plan.kill_at is None
    joined = plan.join_at is None
    newcomer = -1
    last_step: dict[int, int] = {}
    t0 = time.monotonic()
    deadline = t0 + plan.deadline
    last_progress = t0
    try:
        while time.monotonic() < deadline:
            for ev in lr.poll(0.2):
                ev["t"] = time.monotonic() - t0
                out.events.append(ev)
                wid = ev.get("worker", -1)
                kind = ev.get("event")
                if kind == "step":
                    last_progress = time.monotonic()
                    last_step[wid] = ev["step"]
                    if not ev.get("parity", True):
                        out.failed.append(f"parity broken at step {ev['step']}")
                elif kind == "joined":
                    if wid == newcomer and ev.get("world", 2) < 2:
                        out.failed.append("the newcomer was not admitted while the others trained")
                    if not ev.get("parity", True):
                        out.failed.append(f"trainer {wid} joined with state that differs from the others")
                elif kind == "done":
                    out.done.add(wid)
                elif kind == "error":
                    out.failed.append(f"trainer {wid}: {ev.get('message')}")
                if on_event is not None:
                    on_event(ev, lr)
            lead = max(last_step.values(), default=0)
            if not killed and lead >= plan.kill_at:
                victim = max(w for w, p in lr.procs.items() if p.poll() is None)
                print(f"[{plan.name}] SIGKILL trainer {victim} (pid {lr.procs[victim].pid})", flush=True)
                lr.procs[victim].kill()
                lr.procs[victim].wait()
                lr.procs.pop(victim)
                killed = True
                lr.last_kill = time.monotonic() - t0
                out.faults.append({"t": time.monotonic() - t0, "kind": "kill", "worker": victim})
                if not joined:  # the newcomer gets ready now and joins at join_at
                    newcomer = next_id
                    next_id += 1
                    lr.start_worker(newcomer, addr, hold=True)
            if killed and not joined and lead >= plan.join_at:
                if newcomer < 0:  # no kill planned: start it now
                    newcomer = next_id
                    next_id += 1
                    lr.start_worker(newcomer, addr)
                else:
                    lr.release(newcomer)
                out.faults.append({"t": time.monotonic() - t0, "kind": "join", "worker": newcomer})
                joined = True
            for wid, p in list(lr.procs.items()):
                if p.poll() is not None and wid not in out.done:
                    out.failed.append(f"trainer {wid} exited with code {p.returncode}")
                    lr.procs.pop(wid)
            if lr.procs and all(w in out.done for w in lr.procs):
                break
            if time.monotonic() - last_progress > plan.stall:
                out.failed.append(f"no progress for {plan.stall:.0f}s")
                break
            if out.failed:
                break
        else:
            out.failed.append(f"did not finish within {plan.deadline:.0f}s")
    finally:
        # trainers that finished are leaving gracefully; give them time before SIGTERM
        lr.stop_all(grace=10.0 if not out.failed else 0.0)
    return out
