"""The options of ``python stress/churn.py`` (documented in that file's docstring)."""

from __future__ import annotations

import argparse
import os
import sys

from churn import schedule as S

WORK = "state,sum,parity,quant,async"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stress/churn.py",
                                description="Churn stress run: faults at random while peers all-reduce and sync.")
    p.add_argument("--minutes", type=float, default=3.0, help="length of the run (default 3)")
    p.add_argument("--peers", type=int, default=4, help="peers at the start (at most one more runs later)")
    p.add_argument("--seed", type=int, default=1, help="draws the fault schedule (default 1)")
    p.add_argument("--kinds", default=",".join(S.KINDS),
                   help=f"kinds of fault to draw, comma separated (default all: {','.join(S.KINDS)}); "
                        "link-cut needs --hosts and is left out without it")
    p.add_argument("--schedule", metavar="FILE", help="replay this schedule (from --schedule-out) instead of drawing one")
    p.add_argument("--schedule-out", metavar="FILE", help="save the schedule (JSON) before the run starts")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--png", metavar="FILE", help="draw world size, steps/s, faults and recovery times (matplotlib)")
    p.add_argument("--log-dir", metavar="DIR", help="logs of the coordinator and every peer (default: a new temp dir)")
    p.add_argument("--work", default=WORK,
                   help=f"what each step does, comma separated from {WORK} (default all)")
    p.add_argument("--size", type=int, default=1 << 16, help="elements of each all-reduce (default 65536)")
    p.add_argument("--state-size", type=int, default=1 << 14, help="float32 elements of the shared state")
    p.add_argument("--retry", action="store_true",
                   help="sync all-reduces and the all-gather with retry=True, as a trainer calls them")
    p.add_argument("--call-timeout", type=float, default=20.0, help="every call's timeout, seconds (default 20)")
    p.add_argument("--stall", type=float, default=30.0, help="seconds without any step that count as a stall")
    p.add_argument("--keep-going", action="store_true", help="go on after a stall (default: stop the run there)")
    p.add_argument("--hosts", action="store_true", help="each peer in its own network namespace (root)")
    p.add_argument("--rate", default=None, help="with --hosts: tbf rate of each uplink, e.g. 500mbit")
    p.add_argument("--coordinator-log", default=None, metavar="PATH",
                   help="the coordinator's log (default: in --log-dir)")
    p.add_argument("--daemon-log-level", default="WARNING", help="the peers' daemons' log level (default WARNING)")
    # a peer's own options (the orchestrator passes them)
    p.add_argument("--role", default="orchestrator", help=argparse.SUPPRESS)
    p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    p.add_argument("--peer-seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--listen", default="127.0.0.1:0", help=argparse.SUPPRESS)
    p.add_argument("--run-for", type=float, default=240.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def plan(args) -> tuple[S.Schedule, list[str]]:
    """The schedule of this run (drawn or loaded) and notes for the report."""
    notes = []
    if args.schedule:
        with open(args.schedule) as f:
            sched = S.Schedule.load(f.read())
        notes.append(f"replayed {args.schedule} (its length, peers and kinds; --minutes/--peers/--seed ignored)")
        if not args.hosts and any(f.kind in S.NEEDS_HOSTS for f in sched.faults):
            notes.append("link-cut: its faults are skipped (they need --hosts: a network namespace per peer)")
    else:
        kinds = [k for k in args.kinds.split(",") if k]
        unknown = [k for k in kinds if k not in S.KINDS]
        if unknown:
            raise SystemExit(f"--kinds: unknown {unknown}; known: {', '.join(S.KINDS)}")
        if not args.hosts:
            for k in S.NEEDS_HOSTS:
                if k in kinds:
                    kinds.remove(k)
                    notes.append(f"{k}: not run (needs --hosts: a network namespace per peer)")
        sched = S.draw(args.seed, args.minutes * 60.0, args.peers, kinds)
    if args.schedule_out:
        with open(args.schedule_out, "w") as f:
            f.write(sched.dump() + "\n")
    return sched, notes


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.role == "peer":
        from churn import peer

        try:
            return peer.run(args)
        except BrokenPipeError:  # the orchestrator is gone
            return 0
    bad = set(args.work.split(",")) - set(WORK.split(","))
    if bad:
        raise SystemExit(f"--work: unknown {sorted(bad)}; known: {WORK}")
    if args.hosts:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import hosts as H

        why = H.available()
        if why:
            print(f"--hosts: {why}", file=sys.stderr)
            return 2
    sched, notes = plan(args)
    from churn.orchestrator import orchestrate

    return orchestrate(args, sched, notes)
