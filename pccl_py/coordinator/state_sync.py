"""The coordinator's shared-state part, sans I/O: one :class:`~pccl_py.coordinator.election.SyncRound`
at a time per peer group, a revision book, held offers.

:class:`SyncHost` is owned by :class:`~pccl_py.coordinator.membership.Membership`, which feeds it the
``sync_offer`` / ``sync_done`` messages of accepted peers, removals and timer ticks, and
sends what it returns. Like the round itself it keeps no sockets and no clocks: every
method takes ``now`` and returns a :class:`~pccl_py.coordinator.decision.Decision` whose ``out`` holds
``(peer_id, message)`` pairs (the membership core maps peer ids to connections).

Rules (tests and ``pccl bench sync`` host them in-process through
:class:`~pccl_py.coordinator.in_process.InProcessSyncHost`):

* The first ``sync_offer`` of a group with no open round opens one. Its members are the
  group's accepted peers at that moment and stay fixed for the round: a peer admitted
  later is not waited for, and its offer is held and replayed into the next round; a
  member that dies, leaves or is removed is ``member_gone`` (the round no longer waits for
  it; a dead fetcher counts as reported).
* An offer that arrives while its group's round is transferring is held and replayed
  into the next round (a peer holds at most one offer: a newer one replaces it).
* The round's deadline is the first offer's ``timeout`` (0: :data:`DEFAULT_TIMEOUT`).
* The revision book (``book[peer_id]``: revision of the last sync the peer completed)
  gets the round's ``synced`` when the round is done, loses a peer when it is removed,
  and is rebuilt from the ``revision`` of re-introductions after a coordinator restart
  (:meth:`SyncHost.recall`).
* Offers of peers that claim membership while the coordinator is recovering are held
  until the accepted set is rebuilt (:meth:`SyncHost.recovered`), then replayed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pccl_py.coordinator.decision import Decision
from pccl_py.coordinator.election import SyncRound, _complete, _plan, normalize_rows

DEFAULT_TIMEOUT = 600.0  # round deadline when an offer carries no timeout

Msg = dict[str, Any]


def refusal(message: str, error: str = "InvalidUsage") -> Msg:
    """A ``sync_plan`` that fails the receiver's sync at once (round 0: not in a round)."""
    return {"type": "sync_plan", "round": 0, "status": "error", "revision": -1, "sources": [],
            "tensors": [], "error": error, "message": message[:1024]}


class SyncHost:
    """Shared-state rounds of every group of one run (see the module docstring).

    ``members(group)`` returns the group's accepted peer ids (the membership core's
    ``accepted``); it is asked when a round opens.
    """

    def __init__(self, members: Callable[[int], list[str]]) -> None:
        self.members = members
        self.rounds: dict[int, SyncRound] = {}
        self.held: dict[int, dict[str, Msg]] = {}  # group -> peer -> offer for the next round
        self.recovering: dict[str, tuple[int, Msg]] = {}  # peer -> (group, offer) until rebuild
        self.book: dict[str, int] = {}
        self.state_of: dict[str, tuple] = {}  # peer -> the elected (revision, rows) it last synced to
        self.round_of: dict[str, int] = {}  # peer -> the round it last completed (answers repeat its id)
        self._next_round = 1

    # ------------------------------------------------------------------ inputs

    def offer(self, now: float, group: int, peer_id: str, msg: Msg) -> Decision:
        """A ``sync_offer`` of an accepted peer of ``group``."""
        out: list[tuple[str, Msg]] = []
        why: list[str] = []
        repeat = self._repeat(peer_id, msg)
        if repeat is not None:
            return repeat
        self._route(now, group, peer_id, msg, out, why)
        return Decision(out, "; ".join(w for w in why if w))

    def done(self, now: float, group: int, peer_id: str, msg: Msg) -> Decision:
        """A ``sync_done`` (a fetcher's report)."""
        rnd = self.rounds.get(group)
        last = self.round_of.get(peer_id)
        if (rnd is None or rnd.round_id != msg["round"]) and last == msg["round"] and peer_id in self.book:
            # the report of a round this peer completed: its sync_complete was lost; again
            return Decision([(peer_id, _complete(last, self.book[peer_id]))],
                            f"sync_done of {peer_id} repeats round {last}, which it completed: told again")
        if rnd is None:
            return Decision([], f"sync_done of round {msg['round']} from {peer_id} ignored (no open round)")
        d = rnd.transfer_done(now, peer_id, msg["ok"], msg["error"], msg["message"], round_id=msg["round"])
        return self._settle(now, group, d)

    def gone(self, now: float, group: int, peer_id: str) -> Decision:
        """``peer_id`` is no longer a member (death, leave, removal)."""
        self.book.pop(peer_id, None)
        self.state_of.pop(peer_id, None)
        self.round_of.pop(peer_id, None)
        self.recovering.pop(peer_id, None)
        held = self.held.get(group)
        if held is not None:
            held.pop(peer_id, None)
        rnd = self.rounds.get(group)
        if rnd is None or peer_id not in rnd.members:
            return Decision([], "")
        return self._settle(now, group, rnd.member_gone(now, peer_id))

    def tick(self, now: float) -> Decision:
        out: list[tuple[str, Msg]] = []
        why: list[str] = []
        for group in list(self.rounds):
            d = self._settle(now, group, self.rounds[group].tick(now))
            out.extend(d.out)
            if d.reason:
                why.append(d.reason)
        return Decision(out, "; ".join(why))

    def abort(self, now: float, group: int, reason: str) -> Decision:
        """End ``group``'s sync now: the coordinator aborted its peers (a lockstep mismatch),
        so a round that waits for a peer elsewhere would only end at its deadline. Every
        peer still waiting in it (or with an offer held for the next round) gets the error
        ``Aborted`` at once and comes back through ``update_topology``."""
        out: list[tuple[str, Msg]] = []
        text = f"sync aborted: {reason}"[:1024]
        rnd = self.rounds.pop(group, None)
        if rnd is not None and not rnd.done:
            for peer_id in sorted(rnd.offers):
                plan = rnd.plans.get(peer_id)
                if plan is not None and plan.get("status") != "error":
                    out.append((peer_id, _complete(rnd.round_id, plan["revision"], "Aborted", text)))
                elif plan is None:
                    out.append((peer_id, {**refusal(text, "Aborted"), "round": rnd.round_id}))
        for peer_id in sorted(self.held.pop(group, {})):
            out.append((peer_id, refusal(text, "Aborted")))
        if not out:
            return Decision([], "")
        return Decision(out, f"sync of group {group} aborted for {len(out)} peer(s)")

    def hold_recovering(self, group: int, peer_id: str, msg: Msg) -> None:
        """An offer of a peer that claims membership while the coordinator recovers."""
        self.recovering[peer_id] = (group, msg)

    def recovered(self, now: float) -> Decision:
        """The accepted set was rebuilt: replay the offers held since the restart."""
        out: list[tuple[str, Msg]] = []
        why: list[str] = []
        held, self.recovering = self.recovering, {}
        for peer_id, (group, msg) in held.items():
            if peer_id in self.members(group):
                self._route(now, group, peer_id, msg, out, why)
            else:
                out.append((peer_id, refusal("not a member after the coordinator restart: connect first")))
        return Decision(out, "; ".join(w for w in why if w))

    def recall(self, peer_id: str, revision: int) -> None:
        """A re-introduced peer's last synced revision (rebuilds the book after a restart)."""
        if revision >= 0:
            self.book.setdefault(peer_id, revision)

    # ------------------------------------------------------------------ internals

    def _repeat(self, peer_id: str, msg: Msg) -> Decision | None:
        """An offer of the revision this peer last completed, with the very state it was
        elected to: the peer repeats a sync whose answers it lost (the coordinator was
        stopped or restarted while they were on their way). It is told, at once and alone,
        that it is in sync at that revision; anything else goes to a round as usual."""
        last = self.book.get(peer_id)
        if last is None or msg["revision"] != last or self.state_of.get(peer_id) is None:
            return None
        try:
            rows = normalize_rows(msg["tensors"])
        except ValueError:
            return None
        if self.state_of[peer_id] != (last, rows):
            return None
        # under the id of the round it completed: a peer that got that round's plan waits for
        # its sync_complete, and takes no other round's
        rid = self.round_of.get(peer_id)
        if rid is None:
            rid = self._next_round
            self._next_round += 1
        return Decision([(peer_id, _plan(rid, "in_sync", last)), (peer_id, _complete(rid, last))],
                        f"sync offer of {peer_id} repeats revision {last}, which it completed: "
                        f"in sync (round {rid}, its answers were lost)")

    def _route(self, now: float, group: int, peer_id: str, msg: Msg, out: list, why: list) -> None:
        rnd = self.rounds.get(group)
        if rnd is not None and rnd.phase != "collecting" and peer_id in rnd.offers \
                and rnd.offers[peer_id].revision == msg["revision"]:
            # the same offer again (resent after a re-introduction, or because no answer came):
            # the round has it already; its plan goes again, in case that was what was lost
            plan = rnd.plans.get(peer_id)
            if plan is not None:
                out.append((peer_id, plan))
            why.append(f"sync offer of {peer_id} repeats its offer to round {rnd.round_id}"
                       f"{': its plan sent again' if plan is not None else '; ignored'}")
            return
        if rnd is not None and (rnd.phase != "collecting" or peer_id not in rnd.members):
            self.held.setdefault(group, {})[peer_id] = msg
            why.append(f"sync offer of {peer_id} held for the next round of group {group} "
                       f"(round {rnd.round_id} is {rnd.phase}"
                       f"{'' if peer_id in rnd.members else ' without it'})")
            return
        if rnd is None:
            timeout = msg["timeout"] if msg["timeout"] > 0 else DEFAULT_TIMEOUT
            rnd = SyncRound(self.members(group), now, timeout, known=dict(self.book), round_id=self._next_round)
            self._next_round += 1
            self.rounds[group] = rnd
            why.append(f"sync round {rnd.round_id} of group {group} opened for {len(rnd.members)} peer(s)")
        d = rnd.offer(now, peer_id, msg["revision"], msg["tensors"], msg["strategy"], (msg["host"], msg["port"]))
        d = self._settle(now, group, d)
        out.extend(d.out)
        why.append(d.reason)

    def _settle(self, now: float, group: int, d: Decision) -> Decision:
        """After any input: a finished round updates the book and lets the held offers in."""
        rnd = self.rounds.get(group)
        if rnd is None or not rnd.done:
            return Decision(d.out, _tag(rnd, d.reason))
        out = list(d.out)
        why = [_tag(rnd, d.reason)]
        self.book.update(rnd.synced)
        for peer_id in rnd.synced:
            self.state_of[peer_id] = rnd.winner
            self.round_of[peer_id] = rnd.round_id
        del self.rounds[group]
        for peer_id, msg in self.held.pop(group, {}).items():
            if peer_id in self.members(group):
                self._route(now, group, peer_id, msg, out, why)
        return Decision(out, "; ".join(w for w in why if w))


def _tag(rnd: SyncRound | None, reason: str) -> str:
    return f"sync round {rnd.round_id}: {reason}" if rnd is not None and reason else reason
