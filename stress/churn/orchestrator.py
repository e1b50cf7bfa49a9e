"""The orchestrator of a churn run: starts the coordinator and the peers, applies the
fault schedule on time, reads every peer's events into the tracker, and stops everything
it started at the end (or at a stall)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from churn import report
from churn import schedule as S
from churn import tracker as T
from churn.procs import Coordinator, PeerProc, set_link

ENTRY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "churn.py")
CLEANUP = 60.0  # seconds the end of the run may take on top of its length


@dataclass
class Timer:
    when: float
    action: str  # thaw, link-up, coord-start, coord-cont
    rec: T.FaultRecord
    slot: int | None = None  # link-up: the namespace slot (the link comes back even if its peer died)


class Run:
    def __init__(self, args, sched: S.Schedule) -> None:
        self.args = args
        self.sched = sched
        self.log_dir = args.log_dir or tempfile.mkdtemp(prefix="pccl-churn-")
        os.makedirs(self.log_dir, exist_ok=True)
        self.hosts = None
        self.coord: Coordinator | None = None
        self.peers: dict[int, PeerProc] = {}
        self.timers: list[Timer] = []
        self.notes: list[str] = []
        self.t0 = time.monotonic()
        self.tracker = T.Tracker(self.t0)
        self.last_step = self.t0

    def say(self, text: str) -> None:
        print(f"[churn {time.monotonic() - self.t0:6.1f} s] {text}", flush=True)

    # -- processes ------------------------------------------------------------------------
    def start_peer(self, ident: int) -> str | None:
        """Start peer ``ident``; None, or why not."""
        a = self.args
        cmd = [sys.executable, ENTRY, "--role", "peer", "--coordinator", self.coord.address,
               "--peer-seed", str(ident + 7919 * (self.sched.seed or 0)), "--size", str(a.size),
               "--state-size", str(a.state_size), "--work", a.work, "--call-timeout", str(a.call_timeout),
               "--run-for", str(self.sched.seconds + CLEANUP), "--daemon-log-level", a.daemon_log_level]
        if a.retry:
            cmd.append("--retry")
        slot = None
        if self.hosts is not None:
            busy = {p.slot for p in self.peers.values() if p.alive()}
            busy |= {t.slot for t in self.timers if t.action == "link-up"}  # its link is down
            free = sorted(set(range(len(self.hosts.names))) - busy)
            if not free:
                return "no free network namespace"
            slot = free[0]
            cmd = ["ip", "netns", "exec", self.hosts.names[slot], *cmd, "--listen", "0.0.0.0:0"]
        err = open(os.path.join(self.log_dir, f"peer-{ident}.log"), "ab")  # noqa: SIM115 - the child holds it
        # its own process group (with the daemon it spawns): a machine's faults go to the group
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                             start_new_session=True)
        err.close()
        self.peers[ident] = PeerProc(ident, p, slot, self.coord.address)
        return None

    # -- faults ---------------------------------------------------------------------------
    def apply(self, f: S.Fault) -> None:
        now = time.monotonic()
        tr = self.tracker
        if f.kind == S.START:
            why = "peer id already used" if f.target in self.peers else self.start_peer(f.target)
            if why:
                tr.skipped(now, f, why)
                self.say(f"start peer {f.target}: skipped ({why})")
            else:
                tr.fault(now, f)
                where = f" in namespace slot {self.peers[f.target].slot}" if self.hosts is not None else ""
                self.say(f"started peer {f.target}{where}")
            return
        if f.kind in S.COORDINATOR:
            rec = tr.fault(now, f)
            if f.kind == S.COORD_RESTART:
                self.coord.kill()
                self.timers.append(Timer(now + f.duration, "coord-start", rec))
                self.say(f"SIGKILL coordinator; restart on {self.coord.address} in {f.duration:.1f} s")
            else:
                self.coord.freeze(True)
                self.timers.append(Timer(now + f.duration, "coord-cont", rec))
                self.say(f"SIGSTOP coordinator for {f.duration:.1f} s")
            return
        pr = self.peers.get(f.target)
        why = None
        if pr is None:
            why = "never started"
        elif not pr.alive() or pr.expected_exit:
            why = "not running"
        elif pr.frozen:
            why = "frozen"
        elif f.kind == S.LINK_CUT and self.hosts is None:
            why = "needs --hosts (a network namespace per peer)"
        elif f.kind == S.LINK_CUT and any(t.action == "link-up" and t.slot == pr.slot
                                          for t in self.timers):
            why = "link already cut"
        if why:
            tr.skipped(now, f, why)
            self.say(f"{f.kind} peer {f.target}: skipped ({why})")
            return
        rec = tr.fault(now, f)
        timed = "" if rec.outcome == T.UNRESOLVED else f" ({rec.note}: recovery not timed)"
        if f.kind == S.KILL:
            pr.expected_exit = True
            pr.machine(signal.SIGKILL)
            self.say(f"SIGKILL peer {f.target}: daemon and trainer{timed}")
        elif f.kind == S.CRASH:
            pr.expected_exit = True
            pr.trainer(signal.SIGKILL)
            self.say(f"SIGKILL trainer {f.target}: its daemon leaves{timed}")
        elif f.kind == S.LEAVE:
            pr.expected_exit = True
            pr.command("leave")
            self.say(f"peer {f.target} leaves (closes its Client){timed}")
        elif f.kind == S.FREEZE:
            pr.machine(signal.SIGSTOP)
            pr.frozen = True
            self.timers.append(Timer(now + f.duration, "thaw", rec))
            self.say(f"SIGSTOP peer {f.target} for {f.duration:.1f} s{timed}")
        elif f.kind == S.LINK_CUT:
            fail = set_link(self.hosts, pr.slot, up=False)
            if fail:
                rec.outcome, rec.note = T.SKIPPED, f"ip link set down failed: {fail}"
                self.say(f"link cut of peer {f.target} failed: {fail}")
                return
            self.timers.append(Timer(now + f.duration, "link-up", rec, pr.slot))
            self.say(f"link of peer {f.target} (slot {pr.slot}) down for {f.duration:.1f} s{timed}")

    def fire(self, timer: Timer) -> None:
        now = time.monotonic()
        f = timer.rec.fault
        if timer.action == "thaw":
            pr = self.peers[f.target]
            pr.machine(signal.SIGCONT)
            pr.frozen = False
            self.say(f"SIGCONT peer {f.target}")
        elif timer.action == "link-up":
            fail = set_link(self.hosts, timer.slot, up=True)
            self.say(f"link of peer {f.target} up" + (f" FAILED: {fail}" if fail else ""))
        elif timer.action == "coord-start":
            self.coord.start(wait=False)
            self.say(f"coordinator restarted on {self.coord.address}")
        elif timer.action == "coord-cont":
            self.coord.freeze(False)
            self.say("SIGCONT coordinator")
        self.tracker.ended(now, timer.rec)

    # -- events ---------------------------------------------------------------------------
    def on_event(self, pr: PeerProc, ev: dict) -> None:
        tr = self.tracker
        kind = ev.get("event")
        t = float(ev.get("t", time.monotonic()))
        if kind == "hello":
            pr.daemon_pid = int(ev["daemon_pid"])
        elif kind == "step":
            self.last_step = max(self.last_step, t)
            for rec in tr.step(t, pr.id, int(ev["epoch"]), int(ev["world"]), ev["checks"], bool(ev["parity"])):
                what = f"peer {rec.fault.target}" if rec.fault.target is not None else "coordinator"
                self.say(f"{rec.fault.kind} of {what}: {rec.outcome} after {rec.recovery:.3f} s")
            if not ev["parity"]:
                self.say(f"PARITY VIOLATION: peer {pr.id} gathered different hashes (epoch {ev['epoch']})")
            bad = [k for k, ok in ev["checks"].items() if not ok]
            if bad:
                self.say(f"WRONG RESULT: peer {pr.id}: {', '.join(bad)} (epoch {ev['epoch']})")
        elif kind == "state":
            why = tr.state(t, pr.id, int(ev["revision"]), str(ev["hash"]), bool(ev["correct"]))
            if why:
                self.say(f"SHARED-STATE PARITY VIOLATION: {why}")
            if not ev["correct"]:
                self.say(f"WRONG SHARED STATE: peer {pr.id} at revision {ev['revision']}")
        elif kind == "error":
            tr.error(t, pr.id, str(ev["type"]), str(ev["message"]))
        elif kind == "hang":
            if tr.hang(pr.id, str(ev["call"]), float(ev["began"]), float(ev["until"]), float(ev["limit"]),
                       str(ev["outcome"])):
                self.say(f"HANG: peer {pr.id} {ev['call']} ran {float(ev['until']) - float(ev['began']):.1f} s "
                         f"(limit {float(ev['limit']):.0f} s), {ev['outcome']}")
        elif kind == "daemon_exit":
            self.say(f"peer {pr.id}: its daemon exited with {ev['code']} (not by the harness)")

    def read(self, timeout: float) -> None:
        fds = {p.proc.stdout.fileno(): p for p in self.peers.values() if not p.proc.stdout.closed}
        if not fds:
            time.sleep(timeout)
            return
        r, _, _ = select.select(list(fds), [], [], timeout)
        for fd in r:
            self.drain(fds[fd])

    def drain(self, pr: PeerProc) -> None:
        for line in pr.lines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict):
                self.on_event(pr, ev)

    def check_exits(self) -> None:
        now = time.monotonic()
        for pr in self.peers.values():
            if pr.exit_seen or pr.alive():
                continue
            pr.exit_seen = True
            self.drain(pr)
            code = pr.proc.returncode
            if self.tracker.exited(now, pr.id, code, pr.expected_exit):
                self.say(f"CRASH: peer {pr.id} exited with {code}, not by the harness (log: "
                         f"{os.path.join(self.log_dir, f'peer-{pr.id}.log')})")

    # -- the run --------------------------------------------------------------------------
    def setup(self) -> None:
        a = self.args
        if a.hosts:
            import hosts as H

            self.hosts = H.Hosts(self.sched.peers + 3, rate=a.rate)
            self.coord = Coordinator(a.coordinator_log or os.path.join(self.log_dir, "coordinator.log"), self.hosts)
        else:
            from pccl_py.tools.launch import free_port

            self.coord = Coordinator(a.coordinator_log or os.path.join(self.log_dir, "coordinator.log"),
                                     address=f"127.0.0.1:{free_port()}")
        self.coord.start(wait=True)

    def loop(self) -> None:
        a = self.args
        pending = list(self.sched.faults)
        self.t0 = self.tracker.t0 = self.last_step = time.monotonic()
        for i in range(self.sched.peers):
            self.start_peer(i)
            self.tracker.starts += 1
        end = self.t0 + self.sched.seconds
        while time.monotonic() < end:
            self.read(0.1)
            now = time.monotonic()
            for timer in sorted([t for t in self.timers if t.when <= now], key=lambda t: t.when):
                self.timers.remove(timer)
                self.fire(timer)
            while pending and self.t0 + pending[0].t <= now:
                self.apply(pending.pop(0))
            self.check_exits()
            if now - self.last_step > a.stall:
                self.tracker.stall(now)
                self.say(f"STALL: no step completed for {a.stall:.0f} s")
                if not a.keep_going:
                    break
                self.last_step = now
        self.end = time.monotonic()
        self.read(0)

    def close(self) -> None:
        """End everything this run started: timers first (thaw, links up), then the
        peers, the coordinator, the namespaces."""
        for timer in list(self.timers):
            if timer.action in ("thaw", "link-up", "coord-cont"):
                try:
                    self.fire(timer)
                except Exception as exc:  # noqa: BLE001 - go on cleaning up
                    print(f"[churn] cleanup: {timer.action}: {exc}", file=sys.stderr)
        self.timers.clear()
        for pr in self.peers.values():
            pr.stop()
        if self.coord is not None:
            self.coord.close()
        if self.hosts is not None:
            self.hosts.close()


def orchestrate(args, sched: S.Schedule, notes: list[str]) -> int:
    run = Run(args, sched)
    run.notes = notes
    print(sched.describe(), flush=True)
    print(f"logs: {run.log_dir}", flush=True)

    def on_term(signum, frame):
        raise SystemExit(f"churn: {signal.Signals(signum).name}: stopping")

    old = signal.signal(signal.SIGTERM, on_term)
    # the hard overall deadline: whatever hangs, the run ends (and cleans up) by then
    old_alarm = signal.signal(signal.SIGALRM, on_term)
    signal.alarm(int(sched.seconds + CLEANUP + 60))
    try:
        run.setup()
        run.loop()
    finally:
        if not hasattr(run, "end"):
            run.end = time.monotonic()
        try:
            run.close()
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGTERM, old)
            signal.signal(signal.SIGALRM, old_alarm)
    summary = run.tracker.summary(run.end)
    header = (f"churn run: {sched.seconds:.0f} s planned, {summary['seconds']:.0f} s run, seed {sched.seed}, "
              f"{sched.peers} peers at start, work {args.work}{', retry' if args.retry else ''}, "
              f"{'--hosts (a network namespace per peer)' if args.hosts else 'one host'}; "
              f"kinds: {', '.join(sched.kinds)}")
    notes = [*notes, f"logs of the coordinator and every peer (trainer and daemon): {run.log_dir}"]
    if args.png:
        notes.append(report.write_png(args.png, summary, run.tracker.series(run.end)))
    print(report.text(summary, header, notes), flush=True)
    if args.json:
        report.write_json(args.json, {"header": header, "notes": notes, "schedule": json.loads(sched.dump()),
                                      "summary": summary, "series": run.tracker.series(run.end)})
    return 1 if summary["failures"] else 0
