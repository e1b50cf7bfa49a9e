"""Shared-state election: a sans-I/O round the coordinator hosts for one peer group.

One :class:`SyncRound` exists per group while its peers are inside
``sync_shared_state()``. The coordinator feeds it messages and the current time and
sends what it returns; the round itself never touches a socket or a clock. Every
method returns a :class:`Decision`: ``out`` (a list of ``(peer_id, message)`` to send)
and ``reason`` (one line for the log).

Messages (all fields always present, values are only str/int/bool/bytes/list, so they
fit msgpack and a strict schema; :data:`pccl_py.wire.control.SYNC_SCHEMA` validates them
as it does every control message):

daemon -> coordinator
  ``sync_offer``  {round_hint, revision, strategy, tensors, host, port, timeout}
      revision  int    the revision the peer offers (its last synced revision + 1)
      strategy  str    "enforce_popular" | "receive_only" | "send_only"
      tensors   list   rows [name: str, nbytes: int, hash: bytes(16)], one per tensor
                       that takes part in the comparison (tensors with
                       allow_content_inequality are left out by the daemon)
      host,port        where the peer's StateServer listens
      timeout   float  how long the peer will wait (the coordinator may use it as the
                       round's deadline: ``SyncRound(..., timeout=...)``)
      round_hint int   0 (reserved; lets a daemon name a round it retries)
      -> ``SyncRound.offer(now, peer_id, revision, tensors, strategy, (host, port))``
  ``sync_done``   {round, ok, rx_bytes, error, message}
      sent by a peer whose plan said "fetch", after the fetch (and hash check) ended.
      -> ``SyncRound.transfer_done(now, peer_id, ok, error, message, round_id=round)``

coordinator -> daemon
  ``sync_plan``   {round, status, revision, sources, tensors, error, message}
      status "in_sync": the peer holds the elected state; it keeps serving its state
                        until ``sync_complete`` arrives.
      status "fetch":   fetch ``tensors`` (rows [name, nbytes, expected_hash]) from
                        ``sources`` (rows [peer_id, host, port]) at ``revision``, check
                        the hashes, then send ``sync_done``.
      status "error":   this peer's sync fails with ``error`` (an errors.py class name:
                        RevisionError, InvalidUsage, DeadlineExceeded, PeerLost) and
                        ``message``; the round goes on for the others.
      revision: the elected revision (the peer's revision after a successful sync).
  ``sync_complete`` {round, status, revision, error, message}
      the sync call of this peer returns: status "ok" (error/message empty) or "error"
      (a failed or timed-out fetch). Every peer whose plan was not an error gets it once,
      all in the same Decision, when every fetching peer has reported (or died or timed
      out); so sources serve until no one needs them, and any offer that arrives after a
      ``sync_complete`` belongs to the next round.

Coordinator duties around the round: open a round at the first ``sync_offer`` of a
group that has none; while a round is past ``collecting`` (its ``phase``), hold new
offers and replay them into the next round once ``done``; after ``done`` merge
:attr:`SyncRound.synced` into the revision book. A peer whose offer got an error plan
during ``collecting`` may offer again in the same round (the new offer replaces it).

Round life: ``collecting`` -> (every live member offered) election, plans out ->
``transferring`` -> (every fetcher reported or died) ``sync_complete`` to everyone ->
``done``. ``tick(now)`` enforces the deadlines: if a member has not offered by
``started + timeout`` every offerer gets ``sync_plan`` error DeadlineExceeded naming
the missing peers; if a fetcher has not reported by ``elected_at + transfer_timeout``
(default: ``timeout``) its ``sync_complete`` says DeadlineExceeded and the round ends. ``member_gone`` drops a dead peer:
before the election it no longer counts; a dead fetcher counts as reported; a dead
source is the fetchers' business (they re-stripe over the remaining sources).

Revision rule. The coordinator keeps ``known[peer_id]`` = the revision of the last
round the peer completed (``SyncRound.synced`` after ``done``; a coordinator that
restarted rebuilds it from the ``revision`` field of ``hello``, -1 meaning unknown).
- A peer with a known last revision ``L`` must offer exactly ``L + 1``; otherwise its
  plan is error RevisionError ("expected revision L+1, offered R") and the round goes
  on without it.
- A peer that offers ``L`` again with exactly the state elected for ``L`` repeats a sync
  whose answers it lost (the coordinator stopped while they travelled): the coordinator
  (:class:`~pccl_py.coordinator.state_sync.SyncHost`) tells it at once, outside any round,
  that it is in sync at ``L``.
- A peer with no known revision (a newcomer, or one whose previous syncs all failed)
  may offer any revision >= 0. It learns the elected revision from its plan.
- Established offers (known revision) outrank newcomers': if any peer with a known
  revision offers a state that can win, only such offers are candidates, so a crowd of
  freshly initialised newcomers cannot out-vote the run. If no established peer takes
  part (the first sync of a run) every eligible offer is a candidate, and the highest
  revision wins before the most peers: a run restarted from a saved state (a peer offers
  the saved revision, the others a fresh one at 0) resumes from the save.

Election. Candidates are the valid offers of peers whose strategy is not receive_only
(restricted to established peers as above). Offers are grouped by their key
(revision, sorted tensor rows); the winning group has the most peers, then the higher
revision (among newcomers only: the higher revision, then the most peers), then the smallest key bytes (concatenated name, size and hash of each row) -
a deterministic order whatever the arrival order of the offers.
Then for each valid offer:
- same key as the winner -> "in_sync";
- same tensor contents as the winner but an older revision -> "in_sync" (nothing moves);
- send_only with another key -> error InvalidUsage (a send_only peer never receives);
- tensor names or sizes not those of the winner -> error InvalidUsage (layout differs);
- otherwise -> "fetch" of the tensors whose hash differs, from every winner-key holder
  that is not receive_only (at least one exists: the winner's own offers).
If no candidate exists (e.g. every peer is receive_only) every valid offer gets error
InvalidUsage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pccl_py.coordinator.decision import Decision
from pccl_py.wire.control import MAX_NAME, MAX_TENSORS, STRATEGIES, short

Key = tuple[int, tuple[tuple[str, int, bytes], ...]]


@dataclass
class _Offer:
    peer_id: str
    revision: int
    rows: tuple[tuple[str, int, bytes], ...]  # sorted by name
    strategy: str
    addr: tuple[str, int]
    established: bool

    @property
    def key(self) -> Key:
        return (self.revision, self.rows)


def _key_bytes(key: Key) -> bytes:
    return b"".join(n.encode() + b"\0" + s.to_bytes(8, "big") + h for n, s, h in key[1])


def rank(key: Key, count: int, established: bool = True) -> tuple:
    """Sort key of a candidate group: smallest is best (most peers, higher revision, smallest
    bytes). Among newcomers alone (no established candidate) the higher revision comes first:
    a peer restoring a saved state offers its revision, fresh peers offer 0."""
    if not established:
        return (-key[0], -count, _key_bytes(key))
    return (-count, -key[0], _key_bytes(key))


def _plan(round_id: int, status: str, revision: int, *, sources=(), tensors=(), error="", message="") -> dict:
    return {
        "type": "sync_plan",
        "round": round_id,
        "status": status,
        "revision": revision,
        "sources": [list(s) for s in sources],
        "tensors": [list(t) for t in tensors],
        "error": error,
        "message": message,
    }


def _complete(round_id: int, revision: int, error: str = "", message: str = "") -> dict:
    return {
        "type": "sync_complete",
        "round": round_id,
        "status": "error" if error else "ok",
        "revision": revision,
        "error": error,
        "message": message,
    }


def normalize_rows(tensors: Any) -> tuple[tuple[str, int, bytes], ...]:
    """Offer rows (list of [name, nbytes, hash] or {name: (nbytes, hash)}) -> sorted tuple; ValueError if malformed."""
    items = tensors.items() if isinstance(tensors, dict) else None
    rows = []
    if items is not None:
        for name, v in items:
            rows.append((name, *v))
    else:
        rows = [tuple(r) for r in tensors]
    out = []
    seen = set()
    if len(rows) > MAX_TENSORS:
        raise ValueError(f"{len(rows)} tensors exceed {MAX_TENSORS}")
    for r in rows:
        if len(r) != 3:
            raise ValueError("each tensor row is [name, nbytes, hash]")
        name, nbytes, digest = r
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise ValueError(f"bad tensor name {str(name)[:40]!r}")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"tensor {name!r}: bad size {nbytes!r}")
        if not isinstance(digest, (bytes, bytearray)) or len(digest) > 64:
            raise ValueError(f"tensor {name!r}: bad hash")
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice")
        seen.add(name)
        out.append((name, nbytes, bytes(digest)))
    out.sort()
    return tuple(out)


@dataclass
class SyncRound:
    """One shared-state sync of one peer group (sans-I/O; see the module docstring).

    members: the accepted peers of the group when the round opened (all must offer).
    known: last synced revision per peer (absent: unknown); the round does not mutate it;
           after ``done`` merge :attr:`synced` into it.
    """

    members: list[str]
    started: float
    timeout: float
    known: dict[str, int] = field(default_factory=dict)
    round_id: int = 0
    transfer_timeout: float | None = None

    def __post_init__(self) -> None:
        self.members = list(dict.fromkeys(self.members))
        self.phase = "collecting"  # collecting | transferring | done
        self.offers: dict[str, _Offer] = {}
        self.failed: dict[str, tuple[str, str]] = {}  # peer -> (error, message) decided so far
        self.waiting: set[str] = set()  # fetchers that have not reported
        self.finishers: list[str] = []  # peers that get sync_complete at the end
        self.results: dict[str, tuple[str, str]] = {}  # fetcher -> (error, message) of a failed fetch
        self.winner: Key | None = None
        self.revision = -1
        self.elected_at: float | None = None
        self.synced: dict[str, int] = {}  # peer -> revision, for the coordinator's `known`
        self.plans: dict[str, dict] = {}

    @property
    def done(self) -> bool:
        return self.phase == "done"

    # --- inputs -------------------------------------------------------------------------

    def offer(
        self,
        now: float,
        peer_id: str,
        revision: int,
        tensors: Any,
        strategy: str = "enforce_popular",
        data_addr: tuple[str, int] = ("", 0),
    ) -> Decision:
        if peer_id not in self.members:
            return Decision(
                [(peer_id, _plan(self.round_id, "error", -1, error="InvalidUsage",
                                 message="not a member of this sync round (join with update_topology first)"))],
                f"offer from non-member {peer_id} refused",
            )
        if self.phase != "collecting":
            # the coordinator holds offers for the next round while one is transferring
            # (see the module docstring); reaching here is a wiring bug, not the peer's fault
            return Decision(
                [(peer_id, _plan(self.round_id, "error", -1, error="InternalError",
                                 message="sync offer delivered to a round that already elected"))],
                f"late offer from {peer_id} refused ({self.phase})",
            )
        if peer_id in self.offers:
            return Decision([], f"duplicate offer from {peer_id} ignored")
        if peer_id in self.failed:  # its earlier offer was refused: this one replaces it
            del self.failed[peer_id]
            self.plans.pop(peer_id, None)
        out: list[tuple[str, dict]] = []
        try:
            if strategy not in STRATEGIES:
                raise ValueError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
            if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
                raise ValueError(f"revision must be an int >= 0, got {revision!r}")
            rows = normalize_rows(tensors)
        except ValueError as exc:
            self._fail(peer_id, "InvalidUsage", f"bad sync offer: {exc}", out)
            return self._maybe_elect(now, out, f"offer from {peer_id} invalid: {exc}")
        last = self.known.get(peer_id)
        if last is not None and last >= 0 and revision != last + 1:
            self._fail(
                peer_id,
                "RevisionError",
                f"peer {peer_id}: expected revision {last + 1} (last synced revision {last} + 1), "
                f"offered {revision}; increase the revision by exactly one per sync_shared_state()",
                out,
            )
            return self._maybe_elect(now, out, f"{peer_id} broke the revision rule ({revision} != {last + 1})")
        self.offers[peer_id] = _Offer(
            peer_id, revision, rows, strategy, (str(data_addr[0]), int(data_addr[1])),
            established=last is not None and last >= 0,
        )
        return self._maybe_elect(now, out, f"offer from {peer_id} rev {revision} ({strategy})")

    def transfer_done(
        self, now: float, peer_id: str, ok: bool, error: str = "", message: str = "", round_id: int | None = None
    ) -> Decision:
        if round_id is not None and round_id != self.round_id:
            return Decision([], f"sync_done of round {round_id} from {peer_id} ignored (round {self.round_id})")
        if peer_id not in self.waiting:
            return Decision([], f"unexpected sync_done from {peer_id} ignored")
        self.waiting.discard(peer_id)
        if ok:
            self.synced[peer_id] = self.revision
            reason = f"{peer_id} fetched revision {self.revision}"
        else:
            err = error or "PeerLost"
            self.results[peer_id] = (err, message or "fetch failed")
            reason = f"{peer_id} failed to fetch: {err}: {message}"
        return self._maybe_finish([], reason)

    def member_gone(self, now: float, peer_id: str) -> Decision:
        if peer_id not in self.members:
            return Decision([], f"{peer_id} gone (not in the round)")
        self.members.remove(peer_id)
        out: list[tuple[str, dict]] = []
        if self.phase == "collecting":
            self.offers.pop(peer_id, None)
            self.failed.pop(peer_id, None)
            return self._maybe_elect(now, out, f"{peer_id} gone before the election")
        if peer_id in self.finishers:
            self.finishers.remove(peer_id)
        self.synced.pop(peer_id, None)
        if peer_id in self.waiting:
            self.waiting.discard(peer_id)
            return self._maybe_finish(out, f"fetcher {peer_id} gone")
        return self._maybe_finish(out, f"{peer_id} gone during the transfer")

    def tick(self, now: float) -> Decision:
        out: list[tuple[str, dict]] = []
        if self.phase == "collecting" and now >= self.started + self.timeout:
            missing = [p for p in self.members if p not in self.offers and p not in self.failed]
            msg = (f"peers {missing} did not call sync_shared_state within {self.timeout:g} s; "
                   "every peer of the group must call it")
            for p in list(self.offers):
                out.append((p, _plan(self.round_id, "error", -1, error="DeadlineExceeded", message=msg)))
            self.offers.clear()
            self.phase = "done"
            return Decision(out, f"sync round timed out waiting for {missing}")
        if self.phase == "transferring" and self.elected_at is not None:
            limit = self.transfer_timeout if self.transfer_timeout is not None else self.timeout
            if now >= self.elected_at + limit and self.waiting:
                late = sorted(self.waiting)
                for p in late:
                    self.results[p] = ("DeadlineExceeded", f"state transfer did not finish within {limit:g} s")
                self.waiting.clear()
                return self._maybe_finish(out, f"fetchers {late} timed out")
        return Decision(out, "")

    # --- internals ----------------------------------------------------------------------

    def _fail(self, peer_id: str, error: str, message: str, out: list) -> None:
        self.failed[peer_id] = (error, message)
        plan = _plan(self.round_id, "error", -1, error=error, message=message)
        self.plans[peer_id] = plan
        out.append((peer_id, plan))

    def _maybe_elect(self, now: float, out: list, reason: str) -> Decision:
        if self.phase != "collecting":
            return Decision(out, reason)
        if any(p not in self.offers and p not in self.failed for p in self.members):
            return Decision(out, reason)
        return self._elect(now, out, reason)

    def _elect(self, now: float, out: list, reason: str) -> Decision:
        self.elected_at = now
        eligible = [o for o in self.offers.values() if o.strategy != "receive_only"]
        established = any(o.established for o in eligible)
        if established:
            eligible = [o for o in eligible if o.established]
        groups: dict[Key, int] = {}
        for o in eligible:
            groups[o.key] = groups.get(o.key, 0) + 1
        if not groups:
            for p in sorted(self.offers):
                self._fail(p, "InvalidUsage",
                           "no peer offered a state that may win the election (every offer is "
                           "receive_only or invalid); at least one peer must be able to send", out)
            self.offers.clear()
            self.phase = "done"
            return Decision(out, reason + "; election: no candidate")
        winner = min(groups, key=lambda k: rank(k, groups[k], established))
        self.winner = winner
        self.revision = winner[0]
        wrows = {n: (s, h) for n, s, h in winner[1]}
        holders = sorted(p for p, o in self.offers.items() if o.key == winner and o.strategy != "receive_only")
        sources = [(p, *self.offers[p].addr) for p in holders]
        n_fetch = 0
        for p in sorted(self.offers):
            o = self.offers[p]
            if o.key == winner:
                plan = _plan(self.round_id, "in_sync", self.revision)
                self.finishers.append(p)
                self.synced[p] = self.revision
            elif o.strategy == "send_only":
                self._fail(p, "InvalidUsage",
                           f"peer {p} is send_only but its state (revision {o.revision}) differs from the "
                           f"elected state (revision {self.revision}, {groups[winner]} peer(s)); "
                           "a send_only peer never receives", out)
                continue
            elif {n: s for n, s, _ in o.rows} != {n: s for n, (s, _) in wrows.items()}:
                mine = {n: s for n, s, _ in o.rows}
                diff = sorted(set(mine.items()) ^ {(n, s) for n, (s, _) in wrows.items()})[:4]
                self._fail(p, "InvalidUsage",
                           f"peer {p}: tensor names or sizes differ from the elected state "
                           f"(differences, name/bytes: {diff}); every peer must share the same tensors", out)
                continue
            else:
                mine = {n: h for n, _, h in o.rows}
                fetch = [(n, s, h) for n, (s, h) in sorted(wrows.items()) if mine.get(n) != h]
                if not fetch:  # same content, older revision: nothing to move
                    plan = _plan(self.round_id, "in_sync", self.revision)
                    self.finishers.append(p)
                    self.synced[p] = self.revision
                    self.plans[p] = plan
                    out.append((p, plan))
                    continue
                plan = _plan(self.round_id, "fetch", self.revision,
                             sources=[s for s in sources if s[0] != p], tensors=fetch)
                self.waiting.add(p)
                self.finishers.append(p)
                n_fetch += 1
            self.plans[p] = plan
            out.append((p, plan))
        self.phase = "transferring"
        why = (f"{reason}; elected revision {self.revision} hashes "
               f"{','.join(short(h) for _, _, h in winner[1][:3])} held by {groups[winner]} of "
               f"{len(self.offers)} ({len(groups)} candidate states); {n_fetch} fetch, "
               f"{len(self.failed)} error")
        return self._maybe_finish(out, why)

    def _maybe_finish(self, out: list, reason: str) -> Decision:
        if self.phase == "transferring" and not self.waiting:
            for p in self.finishers:
                out.append((p, _complete(self.round_id, self.revision, *self.results.get(p, ("", "")))))
            self.finishers = []
            self.phase = "done"
            reason += "; round complete"
        return Decision(out, reason)
