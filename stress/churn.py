"""Churn stress run: faults at random while peers all-reduce and sync shared state.

    python stress/churn.py --minutes 3 --peers 4 [--seed 1] [--hosts [--rate 500mbit]]
    python stress/churn.py --schedule-out s.json --json r.json --png r.png
    python stress/churn.py --schedule s.json          # replay a saved schedule

Every peer is a trainer with its own daemon (its Client spawns it). It loops:
update_topology() (connect() for a newcomer), then

  * state   write revision R+1's content into a shared state, sync_shared_state(), report
            (revision, xxh64 of the state's bytes) on stdout: the orchestrator checks that
            every peer reporting one revision reports one hash (a side channel, not the
            runtime under test) and that the bytes are that revision's content;
  * sum     an all-reduce (sum) of ones: every element must be the world size;
  * parity  an all-reduce (avg) of random values: its hash goes to the all-gather;
  * quant   a quant="uint8" all-reduce (sum) of a known vector plus small noise: within a
            tolerance of world x vector, and its hash to the all-gather;
  * async   two all_reduce_async() calls in flight at once, then wait() on both;
  * then an all-gather of those hashes: every peer must have gathered the same ones.

Every call is timed by the peer itself against its deadline: one that runs past it without
its error is a hang. The faults (stress/churn/schedule.py), drawn from --seed up front,
printed at the start:

  kill           SIGKILL to a peer's daemon and trainer (its machine dies)
  crash          SIGKILL to the trainer alone (its daemon leaves the run)
  freeze         SIGSTOP to daemon and trainer, SIGCONT 2-6 s later (removed after the
                 3 s heartbeat deadline, then it rejoins as a new member)
  leave          the trainer closes its Client (a graceful leave) and exits
  link-cut       with --hosts only: the peer's link down for 1-5 s (ip link set eth0 down in
                 its namespace); without --hosts this kind is left out, and the report says so
  coord-restart  SIGKILL to the coordinator, restarted on the same address 0.5-3 s later
  coord-stop     SIGSTOP to the coordinator, SIGCONT 2-6 s later
  start          a new peer (the run holds 2 to peers+1 peers)

The report: per kind of fault, how many, how each ended, and the recovery time (median,
p95, max): for kill, crash, leave, freeze and link-cut of a member of the newest epoch, the
time to the first step a survivor completed in a newer epoch (or, for a freeze or a cut
that removed no one, the first step after it ended); for the coordinator's faults, the
first step completed after it came back, timed from its return; for start, the new peer's
first step. Then steps
and steps/s, errors by type, parity violations (collective and shared state), wrong
results, hangs (a call past its deadline; calls of a frozen peer are not counted), crashes
(a trainer that exited non-zero, not killed by the harness), and stalls (no step at all
for --stall seconds). It exits non-zero on any of those. It stops by itself: the run's
length, then at most a minute to end every process it started (by PID; namespaces
deleted), under a hard deadline.

Options:
  --minutes M          length (3)              --peers N          peers at the start (4)
  --seed S             draws the schedule (1)  --kinds K,K,...    kinds to draw (all)
  --schedule FILE      replay a schedule       --schedule-out FILE  save the schedule
  --json FILE          the report as JSON      --png FILE         a plot (needs matplotlib,
                                                                  else skipped and said)
  --work W,W,...       state,sum,parity,quant,async (all)
  --size N             all-reduce elements (65536: shared memory on one host; <= 1024:
                       the small-call path)    --state-size N     shared-state elements
  --retry              the synchronous all-reduces and the all-gather with retry=True, as a
                       trainer calls them (the async pair is never retried: a failed one
                       sends the peer back to update_topology(), as every failure does
                       without --retry, which tests the coordinator's mismatch abort)
  --call-timeout S     every call's timeout (20)   --stall S  seconds without a step (30)
  --keep-going         go on after a stall     --log-dir DIR      every process's log
  --hosts              a network namespace per peer (root; stress/hosts.py), so every
                       link is TCP as between machines  --rate R  shape each uplink (tbf)
  --coordinator-log PATH, --daemon-log-level LEVEL
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # pccl_py
sys.path.insert(0, HERE)  # the churn package beside this file, and hosts.py

from churn.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
