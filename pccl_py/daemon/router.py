"""Where a data frame goes, sans-I/O: which call it belongs to, or why it waits or is dropped.

A :class:`Router` holds what routing needs and nothing else: the membership (epoch,
group, rank of every member), the calls posted here (tag -> collective), the attempt
counter of every tag, the tags finished in this epoch, small frames held for calls not
posted yet (with their deadlines), and FIN/ERROR frames remembered for such calls. It is
fed frame headers, the sending peer's id and the time, and answers with a
:class:`Verdict` (deliver to a call, drop, stall the stream, remember, or tell the
sender that the peers diverged) and a reason. The data plane turns verdicts into reads,
pauses, log lines and ERROR frames; the router opens no socket and starts no timer, so
tests drive it with headers and clock values alone (tests/test_router.py).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from pccl_py.errors import InvalidUsage
from pccl_py.wire import frames as F

DELIVER = "deliver"  # to ``op`` as rank ``src``
DROP = "drop"  # read and discard the payload
STALL = "stall"  # a DATA frame for a call not posted here yet (or a newer epoch): wait for it
PEND = "pend"  # FIN/ERROR for a call not posted yet: remember it (``remember_ctrl``), never stall
DIVERGED = "diverged"  # drop, and tell the sender it retries a call this peer completed

HELD_MAX_BYTES = 4 << 20  # payload bytes of small frames held for calls not posted yet
HELD_MAX = 4096  # and their number; beyond either, a frame stalls its stream instead
CTRL_PENDING_MAX = 4096


class Verdict:
    """What to do with a frame: ``action`` (one of the names above), the call and the
    sender's rank for DELIVER, and ``note``: a line worth logging, (level, text), given once
    per reason and peer (a burst of dropped frames makes one line). A plain slotted class:
    one is made for every frame a stream reads."""

    __slots__ = ("action", "op", "src", "note")

    def __init__(self, action: str, op=None, src: int = -1, note: tuple[int, str] | None = None):
        self.action, self.op, self.src, self.note = action, op, src, note


class Held:
    """A small DATA frame kept for a call not posted yet; ``source`` is whatever the data
    plane needs to blame if the payload turns out malformed (its stream)."""

    __slots__ = ("h", "peer_id", "source", "payload", "deadline")

    def __init__(self, h: F.Header, peer_id: str, source, payload, deadline: float):
        self.h, self.peer_id, self.source, self.payload, self.deadline = h, peer_id, source, payload, deadline


class Router:
    def __init__(self, *, memo: int = 65536, stall_timeout: float = 10.0, held_max: int | None = None,
                 held_max_bytes: int | None = None):
        self.memo = memo
        self.stall_timeout = stall_timeout
        self.held_max = HELD_MAX if held_max is None else held_max
        self.held_max_bytes = HELD_MAX_BYTES if held_max_bytes is None else held_max_bytes
        self.epoch = 0
        self.group: int | None = None  # None: no topology yet
        self.rank = -1
        self.rank_of: dict[str, int] = {}
        self.ops: dict[int, object] = {}  # tag -> the collective posted here
        self._next_attempt: collections.OrderedDict[int, int] = collections.OrderedDict()  # tag -> next attempt
        self._finished: collections.OrderedDict[int, int] = collections.OrderedDict()  # tag -> last attempt
        self._ctrl: collections.OrderedDict[tuple[int, int, int], list] = collections.OrderedDict()
        self._noted: collections.OrderedDict[tuple, bool] = collections.OrderedDict()
        self._held: dict[tuple[int, int], list[Held]] = {}
        self.held_bytes = 0
        self.held_count = 0
        # True for a tag this peer completed that a peer now runs again (pccl_py.daemon.tags)
        self.behind: Callable[[int], bool] | None = None
        # True for an automatic tag of a count that ended at a vote round: never posted again
        self.stale: Callable[[int], bool] | None = None

    # -- membership -------------------------------------------------------------------------
    def set_topology(self, epoch: int, group: int, rank: int, members: list[str]) -> list:
        """A topology (same or newer epoch). Returns the calls a newer epoch ends; their
        attempt counters, finished tags, held frames and remembered controls go with it."""
        ended = []
        if epoch > self.epoch or self.group is None:
            ended = list(self.ops.values())
            self.ops.clear()
            self._next_attempt.clear()
            self._finished.clear()
            self._ctrl = collections.OrderedDict((k, v) for k, v in self._ctrl.items() if k[0] > epoch)
            self.drop_held()  # every held frame is of the old epoch (``can_hold``)
        self.epoch, self.group, self.rank = epoch, group, rank
        self.rank_of = {pid: i for i, pid in enumerate(members)}
        return ended

    # -- calls ------------------------------------------------------------------------------
    def post(self, tag: int) -> int:
        """A call of ``tag`` is about to be posted: its attempt number within the epoch."""
        if tag in self.ops:
            raise InvalidUsage(f"tag {tag} is already in flight; tags must be unique among concurrent calls")
        attempt = self._next_attempt.get(tag, 0)
        self._remember(self._next_attempt, tag, attempt + 1)
        return attempt

    def add(self, op) -> None:
        self.ops[op.tag] = op

    def finish(self, op) -> None:
        """``op`` ended (either way): later frames of its attempt are late, not early."""
        if self.ops.get(op.tag) is op:
            del self.ops[op.tag]
            self._remember(self._finished, op.tag, op.attempt)

    # -- frames -----------------------------------------------------------------------------
    def route(self, h: F.Header, pid: str) -> Verdict:
        if h.epoch < self.epoch:
            return self._drop(logging.INFO, ("epoch", pid, h.epoch),
                              f"dropping frames of stale epoch {h.epoch} from {pid} (current epoch {self.epoch})")
        if h.epoch > self.epoch or self.group is None:
            return self._wait(h)
        if h.group != self.group:
            return self._drop(logging.WARNING, ("group", pid, h.group),
                              f"dropping frames of group {h.group} from {pid} (we are group {self.group})")
        src = self.rank_of.get(pid)
        if src is None or src == self.rank:
            return self._drop(logging.WARNING, ("member", pid, h.epoch),
                              f"dropping frames from {pid}: not a member of epoch {self.epoch}")
        op = self.ops.get(h.tag)
        if op is not None and op.done and op.attempt >= h.attempt:
            return Verdict(DROP)  # finished here a moment ago; its caller has not resumed yet
        if op is not None and not op.done:
            if op.attempt == h.attempt:
                return Verdict(DELIVER, op, src)
            if h.attempt < op.attempt:
                return self._drop(logging.INFO, ("attempt", pid, h.tag, h.attempt),
                                  f"dropping frames of attempt {h.attempt} of tag {h.tag} from {pid} "
                                  f"(attempt {op.attempt} runs)")
            return self._wait(h, src)
        if self._finished.get(h.tag, -1) >= h.attempt:
            return self._drop(logging.DEBUG, ("late", pid, h.tag, h.attempt),
                              f"dropping late frames of finished tag {h.tag} from {pid}")
        if h.kind == F.DATA and self.stale is not None and self.stale(h.tag):
            # a call aborted before a vote round restarted the count (its sender went on to
            # update_topology): waiting for its post would stall the stream for stall_timeout
            return self._drop(logging.INFO, ("stale", pid, h.tag, h.attempt),
                              f"dropping frames of tag {h.tag} from {pid}: its count ended at a vote round")
        if h.kind == F.DATA and self.behind is not None and self.behind(h.tag):
            note = self._once(("diverged", pid, h.epoch, h.tag, h.attempt), logging.WARNING,
                              f"peer {pid} retries tag {h.tag}, which this peer completed: the peers diverged")
            # the sender is told once per attempt; its later frames of that attempt are dropped
            return Verdict(DIVERGED, None, src, note) if note is not None else Verdict(DROP)
        return self._wait(h, src)

    def attempt_dropped(self, h: F.Header, pid: str) -> bool:
        """A DATA frame from ``pid`` for a call never posted here was dropped after the stall
        timeout: that attempt can no longer complete. Count it as made here (our post of
        the tag then pairs with the sender's retry); True if the sender should be told."""
        if h.epoch != self.epoch or pid not in self.rank_of:
            return False
        if self._next_attempt.get(h.tag, 0) <= h.attempt:
            self._remember(self._next_attempt, h.tag, h.attempt + 1)
        return True

    # -- small frames held for calls not posted yet -------------------------------------------
    def can_hold(self, h: F.Header) -> bool:
        """Whether a DATA frame for a call not posted yet is small enough to be kept aside
        (its stream reads on) instead of stalling its stream."""
        return (h.kind == F.DATA and h.epoch == self.epoch and h.length <= F.TINY_BYTES
                and self.held_count < self.held_max and self.held_bytes + h.length <= self.held_max_bytes)

    def hold(self, h: F.Header, pid: str, source, payload, now: float) -> Held:
        held = Held(h, pid, source, payload, now + self.stall_timeout)
        self._held.setdefault((h.epoch, h.tag), []).append(held)
        self.held_bytes += h.length
        self.held_count += 1
        return held

    def take_held(self, op) -> list[tuple[int, Held]]:
        """The held frames of a call just posted, as (sender rank, frame) in arrival order;
        those of its earlier attempts are dropped, those of later ones stay."""
        bucket = self._held.get((op.link.epoch, op.tag))
        out = []
        for held in list(bucket or ()):
            if held.h.attempt > op.attempt:
                continue
            self._release(held)
            src = self.rank_of.get(held.peer_id)
            if held.h.attempt == op.attempt and src is not None:
                out.append((src, held))
        return out

    def expired(self, now: float) -> list[Held]:
        """Held frames whose call was not posted within the stall timeout (released)."""
        out = [held for bucket in self._held.values() for held in bucket if held.deadline <= now]
        for held in out:
            self._release(held)
        return out

    def next_deadline(self) -> float | None:
        return min((held.deadline for bucket in self._held.values() for held in bucket), default=None)

    def drop_held(self) -> None:
        self._held.clear()
        self.held_bytes = self.held_count = 0

    def _release(self, held: Held) -> None:
        key = (held.h.epoch, held.h.tag)
        bucket = self._held[key]
        bucket.remove(held)
        if not bucket:
            del self._held[key]
        self.held_bytes -= held.h.length
        self.held_count -= 1

    # -- FIN / ERROR for calls not posted yet ------------------------------------------------
    def remember_ctrl(self, h: F.Header, pid: str, msg: str) -> None:
        self._ctrl.setdefault((h.epoch, h.tag, h.attempt), []).append((pid, h.kind, h.arg, msg))
        while len(self._ctrl) > CTRL_PENDING_MAX:
            self._ctrl.popitem(last=False)

    def take_ctrl(self, op) -> list[tuple[str, int, int, str]]:
        """Remembered (peer id, kind, step or code, message) for a call just posted."""
        return self._ctrl.pop((op.link.epoch, op.tag, op.attempt), [])

    # -- helpers ------------------------------------------------------------------------------
    def _wait(self, h: F.Header, src: int = -1) -> Verdict:
        return Verdict(STALL if h.kind == F.DATA else PEND, None, src)

    def _drop(self, level: int, key: tuple, text: str) -> Verdict:
        return Verdict(DROP, note=self._once(key, level, text))

    def _once(self, key: tuple, level: int, text: str) -> tuple[int, str] | None:
        if key in self._noted:
            return None
        self._remember(self._noted, key, True)
        return level, text

    def _remember(self, d: collections.OrderedDict, k, v) -> None:
        d[k] = v
        d.move_to_end(k)
        while len(d) > self.memo:
            d.popitem(last=False)
