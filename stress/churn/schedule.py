"""The fault schedule of a churn run: drawn up front from a seed, printed, saved, replayed.

Sans-I/O: :func:`draw` is a pure function of its arguments (it opens nothing, reads no
clock), so the same seed gives the same schedule on every machine, and a schedule saved
with :meth:`Schedule.dump` replays exactly with :meth:`Schedule.load`.

Peers are named by start order: the run starts peers 0..peers-1, and every ``start``
fault names the id its new peer gets. ``draw`` follows the population it creates (who
is alive, who is frozen or cut off when) so that a fault names a peer that should exist
then; at run time a fault whose target is not running (it died on its own, or never
came up) is skipped and reported, never redirected, so a replay does the same things.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field

# kinds of fault, in report order
KILL = "kill"                # SIGKILL to a peer's daemon and trainer (its machine dies)
CRASH = "crash"              # SIGKILL to the trainer alone (its daemon leaves the run)
FREEZE = "freeze"            # SIGSTOP to daemon and trainer, SIGCONT after `duration`
LEAVE = "leave"              # the trainer closes its Client and exits (a graceful leave)
LINK_CUT = "link-cut"        # the peer's link down for `duration` (--hosts only)
COORD_RESTART = "coord-restart"  # SIGKILL to the coordinator, restarted after `duration`
COORD_STOP = "coord-stop"    # SIGSTOP to the coordinator, SIGCONT after `duration`
START = "start"              # a new peer starts (not a fault; timed as a join)

KINDS = (KILL, CRASH, FREEZE, LEAVE, LINK_CUT, COORD_RESTART, COORD_STOP, START)
PEER_FAULTS = (KILL, CRASH, FREEZE, LEAVE, LINK_CUT)
REMOVING = (KILL, CRASH, LEAVE)  # the target is gone for good
COORDINATOR = (COORD_RESTART, COORD_STOP)
NEEDS_HOSTS = (LINK_CUT,)  # needs a network namespace per peer

# how long a fault with a duration lasts, seconds (uniform in the range): freezes and cuts
# straddle the coordinator's 3 s heartbeat deadline, so some end in a removal and some not
DURATIONS = {FREEZE: (2.0, 6.0), LINK_CUT: (1.0, 5.0), COORD_RESTART: (0.5, 3.0), COORD_STOP: (2.0, 6.0)}


@dataclass(frozen=True)
class Fault:
    t: float  # seconds after the run started
    kind: str
    target: int | None  # peer id; None for the coordinator
    duration: float = 0.0  # freeze, link cut, coordinator stop; a restart's downtime

    def describe(self) -> str:
        who = "coordinator" if self.target is None else f"peer {self.target}"
        span = f" for {self.duration:.1f} s" if self.duration else ""
        return f"{self.t:7.1f} s  {self.kind:<13} {who}{span}"


@dataclass
class Schedule:
    seed: int | None
    seconds: float
    peers: int  # started at time 0, ids 0..peers-1
    kinds: list[str]
    faults: list[Fault] = field(default_factory=list)

    def dump(self) -> str:
        return json.dumps({"seed": self.seed, "seconds": self.seconds, "peers": self.peers, "kinds": self.kinds,
                           "faults": [asdict(f) for f in self.faults]}, indent=1)

    @classmethod
    def load(cls, text: str) -> Schedule:
        d = json.loads(text)
        faults = [Fault(float(f["t"]), str(f["kind"]), None if f["target"] is None else int(f["target"]),
                        float(f.get("duration", 0.0))) for f in d["faults"]]
        for kind in [*d["kinds"], *(f.kind for f in faults)]:
            if kind not in KINDS:
                raise ValueError(f"schedule: unknown kind of fault {kind!r}; known: {', '.join(KINDS)}")
        if any(b.t < a.t for a, b in zip(faults, faults[1:])):
            raise ValueError("schedule: faults must be in time order")
        return cls(d.get("seed"), float(d["seconds"]), int(d["peers"]), list(d["kinds"]), faults)

    def describe(self) -> str:
        head = (f"fault schedule: seed {self.seed}, {self.seconds:.0f} s, {self.peers} peers at start, "
                f"kinds {', '.join(self.kinds)}; {len(self.faults)} events")
        return "\n".join([head, *("  " + f.describe() for f in self.faults)])


def draw(seed: int, seconds: float, peers: int, kinds: list[str] | tuple[str, ...] = KINDS, *,
         gap: tuple[float, float] = (3.0, 7.0), first: float = 8.0, quiet_tail: float = 12.0,
         min_working: int = 2) -> Schedule:
    """A schedule of ``seconds`` for ``peers`` starting peers, faults of ``kinds`` only.

    An event every ``gap`` seconds (uniform), from ``first`` seconds (the peers must come
    up) to ``quiet_tail`` seconds before the end (the last fault has time to recover).
    The kind is drawn uniformly from ``kinds``, with these rules about the population:
    a fault on a peer needs more than ``min_working`` peers that are neither frozen nor
    cut off; with fewer peers alive than at the start a new one is started 40% of the
    time; at most ``peers + 1`` peers are alive; one coordinator fault at a time.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kinds of fault {sorted(unknown)}; known: {', '.join(KINDS)}")
    rng = random.Random(seed)
    alive = list(range(peers))
    busy_until: dict[int, float] = {}  # frozen or cut off until
    coordinator_busy_until = 0.0
    next_id = peers
    faults: list[Fault] = []
    t = first
    while t < seconds - quiet_tail:
        working = [p for p in alive if busy_until.get(p, 0.0) <= t]
        kind = rng.choice(list(kinds)) if kinds else None
        if START in kinds and len(alive) < peers and rng.random() < 0.4:
            kind = START
        if kind in PEER_FAULTS and len(working) <= min_working:
            kind = START if START in kinds else None
        if kind == START and len(alive) > peers:
            kind = None
        if kind in COORDINATOR and t < coordinator_busy_until:
            kind = None
        if kind == START:
            faults.append(Fault(round(t, 2), START, next_id))
            alive.append(next_id)
            next_id += 1
        elif kind in PEER_FAULTS:
            target = rng.choice(working)
            span = round(rng.uniform(*DURATIONS[kind]), 2) if kind in DURATIONS else 0.0
            faults.append(Fault(round(t, 2), kind, target, span))
            if kind in REMOVING:
                alive.remove(target)
            else:
                busy_until[target] = t + span
        elif kind in COORDINATOR:
            span = round(rng.uniform(*DURATIONS[kind]), 2)
            faults.append(Fault(round(t, 2), kind, None, span))
            coordinator_busy_until = t + span + 3.0  # and a few seconds to settle
        t += rng.uniform(*gap)
    return Schedule(seed, float(seconds), peers, list(kinds), faults)
