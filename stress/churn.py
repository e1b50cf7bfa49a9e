"""Churn stress run: peers killed, frozen and started at random while all-reduces run.

    python stress/churn.py --minutes 3 --peers 4 [--seed 1] [--hosts [--rate 500mbit]]

Every peer (a trainer with its own daemon) loops: update_topology(), all_reduce(sum) of a
vector whose expected result it can check (it contributes ones; the sum must equal the
world size of that call), then an all-gather of the hash of a second, random all-reduce
result to check bit parity. At random times the orchestrator

  * kills a peer's machine: SIGKILL to its daemon and its trainer (links die abruptly),
  * crashes a trainer: SIGKILL to the trainer alone (its daemon leaves the run),
  * freezes a machine: SIGSTOP to daemon and trainer, SIGCONT 2-6 s later (it is removed
    when its heartbeats stop, and rejoins as a new member when it wakes),
  * starts a new peer.

It reports completed steps, errors by type, parity breaks, wrong results, and the time
from each kill of a member of the newest epoch to the first step completed in a newer
epoch (the survivors going on without the dead peer; killing a peer that was already
removed, say while frozen, changes no membership, so it is not timed). It stops by itself after --minutes and exits non-zero on any
parity break, wrong result, or stall.

With ``--hosts`` every peer runs in its own network namespace (stress/hosts.py) with its
own address, so the group is not co-located and every all-reduce crosses TCP links
(needs root); ``--rate`` shapes each uplink. Without it all peers share this host and
large all-reduces go through shared memory.

By default a failed call sends a peer back to ``update_topology()`` while peers whose
call completed go on, so peers leave lockstep and the coordinator's mismatch abort brings
them back. ``--retry`` makes the all-reduces and the all-gather ``retry=True``, as a trainer would call them:
a failed call is repeated on the new membership, and only errors that are not retried
(``Diverged``, a removal, a mismatch) send a peer back to vote.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pccl_py import calls  # noqa: E402
from pccl_py.tools.demo import free_port  # noqa: E402


def peer(args) -> int:
    import numpy as np
    import xxhash

    from pccl_py import Client, PcclError

    rng = np.random.default_rng(args.peer_seed)
    with Client(coordinator=args.coordinator, timeout=20.0, listen=args.listen) as c:
        print(json.dumps({"event": "hello", "daemon_pid": c.daemon_pid}), flush=True)
        topo = c.connect()
        # connect() returned at the members' update_topology(): this peer's first step skips it
        voted = True
        deadline = time.monotonic() + args.minutes * 60 + 30
        while time.monotonic() < deadline:
            try:
                if not voted:
                    topo = c.update_topology()
                voted = False
                ones = np.ones(args.size, dtype=np.float32)
                info = c.all_reduce(ones, op="sum", retry=args.retry)
                ok = bool(np.all(ones == info["world_size"]))
                x = rng.standard_normal(args.size).astype(np.float32)
                c.all_reduce(x, op="avg", quant=args.quant, retry=args.retry)
                hashes = c.all_gather(xxhash.xxh64(x.tobytes()).digest(), retry=args.retry)
                print(json.dumps({"event": "step", "epoch": topo["epoch"], "world": info["world_size"],
                                  "correct": ok, "parity": len(set(hashes)) == 1,
                                  "t": time.time()}), flush=True)
            except PcclError as exc:
                print(json.dumps({"event": "error", "type": type(exc).__name__, "message": str(exc)[:200],
                                  "t": time.time()}), flush=True)
                if "removed" in str(exc) or "not connected" in str(exc):
                    topo = c.connect()
                    voted = True
    return 0


def _is_daemon(pid: int) -> bool:
    """The PID still belongs to a pccl daemon (it was not reused since we learned it)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"pccl_py.daemon" in f.read()
    except OSError:
        return False


class Peer:
    def __init__(self, proc: subprocess.Popen, slot: int | None) -> None:
        self.proc = proc
        self.slot = slot
        self.buf = b""
        self.daemon_pid: int | None = None
        self.epoch = -1  # epoch of its last completed step

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int, daemon: bool = True) -> None:
        """``sig`` to the daemon (if asked and known) and then the trainer."""
        if daemon and self.daemon_pid is not None and _is_daemon(self.daemon_pid):
            os.kill(self.daemon_pid, sig)
        if self.alive():
            os.kill(self.proc.pid, sig)


def orchestrate(args) -> int:
    rnd = random.Random(args.seed)
    hosts = None
    if args.hosts:
        import hosts as H

        why = H.available()
        if why:
            print(f"--hosts: {why}", file=sys.stderr)
            return 2
        hosts = H.Hosts(args.peers + 2, rate=args.rate)
        hosts.start_coordinator(log=args.coordinator_log)
        addr, coord = hosts.coordinator, None
    else:
        addr = f"127.0.0.1:{free_port()}"
        coord = subprocess.Popen([sys.executable, "-m", "pccl_py.coordinator", "--listen", addr],
                                 stdout=subprocess.DEVNULL)
    peers: dict[int, Peer] = {}
    frozen: dict[int, float] = {}
    stats = {"steps": 0, "errors": {}, "parity_breaks": 0, "wrong": 0, "kills": 0, "crashes": 0,
             "freezes": 0, "starts": 0}
    recoveries: list[float] = []
    pending_kill: tuple[float, int] | None = None  # (when, newest epoch a step had run in by then)
    newest_epoch = 0
    next_id = 0

    def start() -> None:
        nonlocal next_id
        cmd = [sys.executable, os.path.abspath(__file__), "--role", "peer", "--coordinator", addr,
               "--peer-seed", str(next_id), "--size", str(args.size), "--minutes", str(args.minutes)]
        if args.retry:
            cmd += ["--retry"]
        if args.quant:
            cmd += ["--quant", args.quant]
        slot = None
        if hosts is not None:
            busy = {pr.slot for pr in peers.values() if pr.alive()}
            slot = min(set(range(len(hosts.names))) - busy)
            cmd = ["ip", "netns", "exec", hosts.names[slot], *cmd, "--listen", "0.0.0.0:0"]
        # its own process group (with the daemon it spawns), so the end of the run can stop a
        # daemon whose PID it has not learnt yet, before the namespaces go
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, start_new_session=True)
        os.set_blocking(p.stdout.fileno(), False)
        peers[next_id] = Peer(p, slot)
        next_id += 1
        stats["starts"] += 1

    def on_event(i: int, ev: dict) -> None:
        nonlocal last_step, pending_kill, newest_epoch
        if ev["event"] == "hello":
            peers[i].daemon_pid = int(ev["daemon_pid"])
        elif ev["event"] == "step":
            peers[i].epoch = int(ev["epoch"])
            stats["steps"] += 1
            last_step = time.monotonic()
            stats["parity_breaks"] += not ev["parity"]
            stats["wrong"] += not ev["correct"]
            newest_epoch = max(newest_epoch, int(ev["epoch"]))
            if pending_kill is not None and ev["epoch"] > pending_kill[1]:
                # the first step completed in an epoch newer than the kill: the run went on
                recoveries.append(time.monotonic() - pending_kill[0])
                pending_kill = None
                print(f"[churn] recovered: a step in epoch {ev['epoch']}, {recoveries[-1]:.3f} s after the kill",
                      flush=True)
        else:
            stats["errors"][ev["type"]] = stats["errors"].get(ev["type"], 0) + 1
            samples = stats.setdefault("error_samples", {}).setdefault(ev["type"], [])
            if len(samples) < 3 and ev["message"][:60] not in [m[:60] for m in samples]:
                samples.append(ev["message"])

    time.sleep(0.3)
    for _ in range(args.peers):
        start()
    end = time.monotonic() + args.minutes * 60
    last_step = time.monotonic()
    next_event = time.monotonic() + rnd.uniform(3, 8)
    try:
        while time.monotonic() < end:
            fds = {pr.proc.stdout.fileno(): i for i, pr in peers.items() if pr.alive()}
            r, _, _ = select.select(list(fds), [], [], 0.2) if fds else ([], [], [])
            for fd in r:
                pr = peers[fds[fd]]
                pr.buf += pr.proc.stdout.read() or b""
                *lines, pr.buf = pr.buf.split(b"\n")
                for line in lines:
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        continue
                    on_event(fds[fd], ev)
            now = time.monotonic()
            for i, t in list(frozen.items()):
                if now >= t:
                    peers[i].signal(signal.SIGCONT)
                    del frozen[i]
            if now >= next_event:
                alive = [i for i, pr in peers.items() if pr.alive() and i not in frozen]
                action = rnd.choice(["kill", "crash", "freeze", "start"]) if len(alive) > 2 else "start"
                victim = rnd.choice(alive) if alive else None
                if action == "kill" and victim is not None:
                    peers[victim].signal(signal.SIGKILL)
                    stats["kills"] += 1
                    # recovery is timed only for a member of the newest epoch: a peer not in it
                    # (removed while frozen, not admitted yet) leaves the survivors' ring as is
                    member = peers[victim].epoch == newest_epoch
                    if member:
                        pending_kill = (now, newest_epoch)
                    print(f"[churn] SIGKILL peer {victim}: daemon and trainer"
                          f"{'' if member else ' (not a member of the newest epoch: no recovery to time)'}",
                          flush=True)
                elif action == "crash" and victim is not None:
                    peers[victim].signal(signal.SIGKILL, daemon=False)
                    stats["crashes"] += 1
                    print(f"[churn] SIGKILL trainer {victim}: its daemon leaves", flush=True)
                elif action == "freeze" and victim is not None:
                    peers[victim].signal(signal.SIGSTOP)
                    frozen[victim] = now + rnd.uniform(2, 6)
                    stats["freezes"] += 1
                    print(f"[churn] SIGSTOP peer {victim}: daemon and trainer", flush=True)
                elif len([pr for pr in peers.values() if pr.alive()]) < args.peers + 1:
                    start()
                    where = f" in namespace slot {peers[next_id - 1].slot}" if hosts is not None else ""
                    print(f"[churn] started peer {next_id - 1}{where}", flush=True)
                next_event = now + rnd.uniform(4, 10)
            if now - last_step > args.stall:
                print(f"[churn] STALL: no step for {args.stall:.0f}s", flush=True)
                stats["stalled"] = True
                break
    finally:
        for pr in peers.values():
            pr.signal(signal.SIGCONT)
            pr.signal(signal.SIGKILL)
            try:  # the trainer is not reaped yet, so its group id is still ours
                os.killpg(pr.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            pr.proc.wait()
        if coord is not None:
            coord.kill()
            coord.wait()
        if hosts is not None:
            hosts.close()
    if recoveries:
        stats["recovery_median_s"] = round(statistics.median(recoveries), 3)
        stats["recovery_max_s"] = round(max(recoveries), 3)
    print(json.dumps(stats, indent=1))
    bad = stats["parity_breaks"] or stats["wrong"] or stats.get("stalled") or not stats["steps"]
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--size", type=int, default=1 << 16)
    p.add_argument("--quant", choices=[q for q in calls.QUANTS if q], default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--stall", type=float, default=30.0)
    p.add_argument("--retry", action="store_true", help="all-reduces with retry=True, as a trainer calls them")
    p.add_argument("--hosts", action="store_true", help="each peer in its own network namespace (root)")
    p.add_argument("--rate", default=None, help="with --hosts: tbf rate of each uplink, e.g. 500mbit")
    p.add_argument("--coordinator-log", default=None, metavar="PATH", help="with --hosts: the coordinator's log")
    p.add_argument("--listen", default="127.0.0.1:0", help=argparse.SUPPRESS)
    p.add_argument("--role", default="orchestrator", help=argparse.SUPPRESS)
    p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    p.add_argument("--peer-seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    return peer(args) if args.role == "peer" else orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
