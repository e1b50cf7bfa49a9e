"""The coordinator's membership state machine, sans I/O.

:class:`Membership` is fed validated control messages (see :mod:`pccl_py.wire.control`)
and timer ticks, always with the current time, and returns a :class:`Decision`:
the messages to send, as ``(conn, message dict)``, and a reason for the log. It
owns no sockets, no tasks and no clocks, so every decision is a pure function of
the inputs and ``now`` and can be tested exhaustively.

``conn`` is an opaque hashable id the I/O layer gives each connection (the zmq
ROUTER routing id). Only connections that completed the CURVE handshake with the run's
keys exist for this core (the I/O layer authenticates them), so a routing id, though
chosen by the client and sent in clear, is claimable only by a holder of the run secret.
``peer_id`` is the peer's stable name, which it keeps across reconnects and coordinator
restarts.

States of a peer (one enum, see docs/membership.md):

* ``PENDING``: registered, waiting for the accepted peers to admit it.
* ``CLAIMED``: during the recovery window after a coordinator (re)start, a peer
  that says it was accepted; it becomes ``ACCEPTED`` when the window closes.
* ``ACCEPTED``: a member; part of its group's ring at the current epoch.

A removed peer leaves the table; its peer_id is remembered for a while, and any
message from it is answered with ``removed``.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from pccl_py.calls import never_made, tag_count
from pccl_py.coordinator.bandwidth import BandwidthMatrix
from pccl_py.coordinator.decision import Decision
from pccl_py.coordinator.state_sync import SyncHost, refusal
from pccl_py.coordinator.topology_opt import (
    OPTIMIZE_TOPOLOGY,
    OptimizeConfig,
    OptimizeRound,
    bandwidth_rows,
)

Conn = Hashable
Msg = dict[str, Any]

UPDATE_TOPOLOGY = "update_topology"


class PeerState(enum.Enum):
    PENDING = "pending"
    CLAIMED = "claimed"
    ACCEPTED = "accepted"


@dataclass(frozen=True)
class MembershipConfig:
    """Every timeout of the membership core, in seconds."""

    heartbeat_interval: float = 0.5  # coordinator -> peers "hb"; peers send theirs as often
    heartbeat_deadline: float = 3.0  # a peer silent this long is removed
    probe_timeout: float = 0.4  # a peer another peer reported dead must answer this fast
    reconnect_allowance: float = 1.0  # extra time after its connection closed (zmq reconnects)
    mismatch_grace: float = 2.0  # voters vs. a peer busy elsewhere, before InvalidUsage
    recovery_grace: float = 1.5  # after a (re)start: accepted peers re-introduce themselves
    removed_memory: float = 3600.0  # how long a removed peer_id is remembered
    max_peers: int = 4096
    max_removed: int = 65536
    rekey_delay: float = 0.5  # a live pair's fresh links wait this long: a peer leaving closes links first
    link_break_window: float = 60.0  # data-link breaks between live peers counted over this...
    link_break_limit: int = 3  # ...a pair breaking this often loses a member instead of a re-key
    handshake_timeout: float = 5.0  # a control connection that has not finished its CURVE handshake is closed
    optimize: OptimizeConfig = OptimizeConfig()  # optimize_topology: probes and ring moves
    bandwidth_max_age: float = 600.0  # a measured rate older than this is probed again


@dataclass
class Peer:
    peer_id: str
    group: int
    host: str
    port: int
    conn: Conn
    state: PeerState
    since: float  # when it registered (or was claimed)
    last_seen: float
    join_deadline: float  # pending: when its connect() gives up (inf: never)
    claim_ring_pos: int = -1
    claim_epoch: int = 0  # the epoch it claimed membership of (a restarted coordinator)
    claim_world: int = 0  # that epoch's world size
    epoch: int = 0  # last epoch the peer reported
    revision: int = -1
    activity: str | None = None
    activity_since: float = 0.0
    tx: int = 0  # data-plane bytes the peer reported sent / received, as of its last heartbeat
    rx: int = 0
    calls: tuple[int, ...] = ()  # the automatic tags of its calls in flight (last heartbeat)
    stuck_told: frozenset[int] = frozenset()  # of those, the calls it was told no voter makes


@dataclass
class Probe:
    nonce: int
    deadline: float
    why: str
    started: float
    next_ping: float
    reports: list[tuple[str, int]] = field(default_factory=list)  # (reporter, epoch of the broken link)


@dataclass
class Vote:
    req: int
    deadline: float  # inf: no deadline
    since: float
    kind: str = "vote"  # the message: "vote" (update_topology) or "optimize" (optimize_topology)
    below: int = 0  # what the voter made of its automatic tags (daemon/tags.py AutoTags.progress)
    open: tuple[int, ...] = ()


@dataclass
class _Step:
    """What one input produced: messages, reasons, and whether membership changed."""

    out: list[tuple[Conn, Msg]] = field(default_factory=list)
    why: list[str] = field(default_factory=list)
    changed: bool = False
    round_done: dict[str, int] = field(default_factory=dict)  # voter -> the req its topology answers
    done_reason: str = ""  # what the topology answering round_done says when the epoch stays
    work: tuple | None = None  # see Decision.work


class Membership:
    """Membership, epochs, votes, failure detection and restart recovery of one run."""

    def __init__(
        self,
        now: float,
        *,
        config: MembershipConfig | None = None,
        instance: str | None = None,
        seed: int | None = None,
    ) -> None:
        self.cfg = config or MembershipConfig()
        self.instance = instance or secrets.token_hex(8)
        # the id of the last completed vote round (in every topology: automatic tags count
        # from it); a new instance starts at random, so its ids are not an old one's
        self.round = (seed if seed is not None else secrets.randbits(30)) << 20
        self.started = now
        self.epoch = 0
        self._epoch_floor = 0  # highest epoch any peer ever reported to this instance
        self.peers: dict[str, Peer] = {}
        self.rings: dict[int, list[str]] = {}
        self.by_conn: dict[Conn, str] = {}
        self.removed: dict[str, tuple[float, str]] = {}  # peer_id -> (when, why)
        self.removed_conns: dict[Conn, str] = {}
        self.votes: dict[str, Vote] = {}
        self.vote_opened: float | None = None
        # per peer, the last vote answered: (its connection, req, the error it got or None when
        # its round completed); a repeat of that vote is answered again, not counted again
        self.answers: dict[str, tuple[Conn, int, Msg | None]] = {}
        self.probes: dict[str, Probe] = {}
        self.link_breaks: list[tuple[float, str, str]] = []  # (when, reporter, target), re-keyed
        self.rekeys: dict[str, tuple[float, str, int]] = {}  # target -> (when, reporter, epoch then)
        self._quiet = 2.5 * self.cfg.heartbeat_interval  # silent this long: its last activity is stale
        self.recover_until = now + self.cfg.recovery_grace
        self.recovering = self.cfg.recovery_grace > 0
        self._next_hb = now
        self._last_input = now  # when the core last ran (every input is a proof that it did)
        self.stall: tuple[float, float] | None = None  # the last span in which the core did not run
        self._nonce = (seed if seed is not None else secrets.randbits(32)) << 16
        self._step = _Step()
        self.sync = SyncHost(self.accepted)  # shared-state rounds (coordinator/state_sync.py)
        self.bw = BandwidthMatrix(max_age=self.cfg.bandwidth_max_age)  # measured link rates
        self.opt: OptimizeRound | None = None  # optimize_topology (coordinator/topology_opt.py)
        self._opt_rounds = 0

    # ------------------------------------------------------------------ queries

    def accepted(self, group: int | None = None) -> list[str]:
        return [
            p.peer_id
            for p in self.peers.values()
            if p.state is PeerState.ACCEPTED and (group is None or p.group == group)
        ]

    def pending(self) -> list[str]:
        return [p.peer_id for p in self.peers.values() if p.state is PeerState.PENDING]

    @property
    def world_size(self) -> int:
        return sum(len(r) for r in self.rings.values())

    @property
    def num_groups(self) -> int:
        return sum(1 for r in self.rings.values() if r)

    def topology_msg(self, peer_id: str, *, reason: str, req: int = 0) -> Msg:
        """``peer_id``'s group at the current epoch; ``req``: the vote of that peer it answers."""
        group = self.peers[peer_id].group
        ring = self.rings.get(group, [])
        rows = [[pid, self.peers[pid].host, self.peers[pid].port] for pid in ring]
        return {
            "type": "topology",
            "instance": self.instance,
            "epoch": self.epoch,
            "group": group,
            "peers": rows,
            "world_size": self.world_size,
            "num_groups": self.num_groups,
            "req": req,
            "reason": reason[:1024],
            "round": self.round,
        }

    def status(self, now: float, req: int = 0) -> Msg:
        members = []
        for p in sorted(self.peers.values(), key=lambda p: (p.group, p.state.value, p.peer_id)):
            ring = self.rings.get(p.group, [])
            members.append(
                {
                    "peer_id": p.peer_id,
                    "group": p.group,
                    "state": p.state.value,
                    "host": p.host,
                    "port": p.port,
                    "ring_pos": ring.index(p.peer_id) if p.peer_id in ring else -1,
                    "epoch": p.epoch,
                    "revision": p.revision,
                    "hb_age": max(0.0, now - p.last_seen),
                    "activity": p.activity,
                    "tx": p.tx,
                    "rx": p.rx,
                }
            )
        return {
            "type": "status_a",
            "req": req,
            "instance": self.instance,
            "epoch": self.epoch,
            "recovering": self.recovering,
            "uptime": max(0.0, now - self.started),
            "world_size": self.world_size,
            "num_groups": self.num_groups,
            "vote_open": bool(self.votes),
            "voters": sorted(self.votes),
            "members": members,
            "bandwidth": bandwidth_rows(self.bw, now, 4096),
            "optimizing": self.opt is not None,
        }

    # ------------------------------------------------------------------ inputs

    def on_message(self, now: float, conn: Conn, msg: Msg) -> Decision:
        """A validated message from ``conn``, a connection that completed the CURVE handshake
        with the run's keys (the transport authenticates; this core trusts what arrives)."""
        self._step = _Step()
        self._compensate_stall(now)
        mtype = msg["type"]
        if mtype == "status_q":
            self._send(conn, self.status(now, msg["req"]))
            self._why("status")
        elif mtype == "hello":
            self._on_hello(now, conn, msg)
        else:
            pid = self.by_conn.get(conn)
            peer = self.peers.get(pid) if pid is not None else None
            if peer is None or peer.conn != conn:
                self._on_stranger(conn, mtype)
            else:
                if now - peer.last_seen > self._quiet:
                    # it was silent (frozen, cut off): what it reported before says nothing about
                    # what it does now, so a lockstep check counts its activity from here
                    peer.activity_since = now
                peer.last_seen = now
                if pid in self.probes and mtype != "pong":  # it talks: it is alive and connected
                    self._probe_answered(now, peer, f"alive (sent {mtype})")
                handler = getattr(self, f"_on_{mtype}", None)
                if handler is None:
                    self._why(f"{pid}: {mtype} is not a message a peer sends; dropped")
                else:
                    handler(now, peer, msg)
        return self._finish(now)

    def on_disconnect(self, now: float, conn: Conn) -> Decision:
        """The transport saw ``conn``'s connection close: probe that peer at once."""
        self._step = _Step()
        self._compensate_stall(now)
        pid = self.by_conn.get(conn)
        peer = self.peers.get(pid) if pid is not None else None
        if peer is not None and peer.conn == conn:
            timeout = self.cfg.probe_timeout + self.cfg.reconnect_allowance
            self._probe(now, peer, "its control connection closed", timeout)
        return self._finish(now)

    def on_bad_input(self, now: float, conn: Conn, why: str) -> Decision:
        """``conn`` sent something :func:`protocol.decode` refused: a member is removed."""
        self._step = _Step()
        self._compensate_stall(now)
        pid = self.by_conn.get(conn)
        peer = self.peers.get(pid) if pid is not None else None
        if peer is not None and peer.conn == conn:
            self._remove(now, peer, f"sent a malformed message ({why})", tell=True)
        else:
            self._why(f"malformed message from an unregistered connection dropped ({why})")
        return self._finish(now)

    def tick(self, now: float) -> Decision:
        """Timers: recovery window, heartbeat deadlines, probes, vote deadlines, misuse."""
        self._step = _Step()
        self._compensate_stall(now)
        if self.recovering and now >= self.recover_until:
            self._rebuild(now)
        for peer in list(self.peers.values()):
            silent = now - peer.last_seen
            if silent > self.cfg.heartbeat_deadline:
                self._remove(
                    now,
                    peer,
                    f"no message for {silent:.2f} s (heartbeat deadline {self.cfg.heartbeat_deadline:g} s)",
                    tell=True,
                )
            elif peer.state is PeerState.PENDING and now >= peer.join_deadline:
                self._remove(now, peer, "not admitted before its connect deadline", tell=False)
                self._send(peer.conn, self._stalled_error(0, "connect", peer.join_deadline) or _error(
                    0,
                    "DeadlineExceeded",
                    "not admitted before the connect deadline: the accepted peers did not call "
                    "update_topology in time; connect again to retry",
                ))
        for pid, (when, reporter, epoch) in list(self.rekeys.items()):
            if now < when:
                continue
            del self.rekeys[pid]
            target = self.peers.get(pid)
            if epoch == self.epoch and target is not None and reporter in self.peers:
                self._link_broke(now, reporter, target)  # (a newer epoch brought fresh links)
        for pid, probe in list(self.probes.items()):
            if now >= probe.deadline and pid in self.peers:
                self._remove(
                    now,
                    self.peers[pid],
                    f"no answer to a probe within {now - probe.started:.2f} s after {probe.why}",
                    tell=True,
                )
            elif now >= probe.next_ping and pid in self.peers:  # again: the last may have met a
                probe.next_ping = now + self.cfg.probe_timeout / 4  # reconnecting socket
                self._send(self.peers[pid].conn, {"type": "ping", "nonce": probe.nonce})
        for pid, vote in list(self.votes.items()):
            if now >= vote.deadline:
                del self.votes[pid]
                err = self._stalled_error(vote.req, "update_topology", vote.deadline)
                if err is None:
                    missing = self._missing_voters()
                    err = _error(vote.req, "DeadlineExceeded",
                                 f"{_CALLS[vote.kind]} timed out: still waiting for {missing}")
                self._answer(self.peers[pid], vote.req, err)
                self._why(f"{pid}: vote timed out ({err['error']})")
        self._check_mismatch(now)
        self._sync_out(self.sync.tick(now))
        if self.opt is not None:
            self._opt_out(now, self.opt.tick(now))
        if now >= self._next_hb:
            self._next_hb = now + self.cfg.heartbeat_interval
            hb = {"type": "hb", "instance": self.instance, "epoch": self.epoch}
            for peer in self.peers.values():
                self._send(peer.conn, hb)
        self._forget_removed(now)
        return self._finish(now)

    def _compensate_stall(self, now: float) -> None:
        """If the coordinator itself did not run for a while (paused, swapped, suspended VM),
        the peers' silence is its own: shift their clocks instead of removing everyone.

        Called first by every input, so whatever comes first after the stall (a message, a
        closed connection, the timer) sees the shifted clocks: the clocks that measure how long
        a peer has been silent or busy (heartbeats, probes, lockstep grace) move by the stall;
        the callers' deadlines (votes, connects, sync rounds) do not, and one that passed
        during the stall is answered ``CoordinatorUnavailable`` (:meth:`_stalled_error`)."""
        gap = now - self._last_input
        self._last_input = now
        stall = gap - self.cfg.heartbeat_interval
        if stall <= self.cfg.heartbeat_interval:
            return
        self.stall = (now - gap, now)
        for peer in self.peers.values():
            peer.last_seen = min(now, peer.last_seen + stall)
            peer.activity_since = min(now, peer.activity_since + stall)
        for probe in self.probes.values():
            probe.deadline += stall
            probe.started += stall
        if self.vote_opened is not None:
            self.vote_opened = min(now, self.vote_opened + stall)
        self._why(f"coordinator did not run for {gap:.2f} s; peers' heartbeat clocks shifted by {stall:.2f} s")

    def _stalled_error(self, req: int, what: str, deadline: float) -> Msg | None:
        """The error for a call whose ``deadline`` passed while the coordinator did not run
        (None if it passed while it ran): its silence, not the other peers, failed the call."""
        if self.stall is None or not self.stall[0] < deadline <= self.stall[1]:
            return None
        return _error(
            req,
            "CoordinatorUnavailable",
            f"{what}: the deadline passed while the coordinator was not running "
            f"({self.stall[1] - self.stall[0]:.1f} s: paused, swapped out or suspended); nothing was "
            f"decided; call {what} again",
        )

    # ------------------------------------------------------------------ handlers

    def _on_hello(self, now: float, conn: Conn, msg: Msg) -> None:
        pid = msg["peer_id"]
        if pid in self.removed:
            self._send(conn, _removed(pid, self.removed[pid][1]))
            self._why(f"hello from removed peer {pid}: told it was removed")
            return
        self._epoch_floor = max(self._epoch_floor, msg["epoch"])
        peer = self.peers.get(pid)
        if peer is not None:  # a re-introduction: new connection, or a lost coordinator reply
            if peer.conn != conn:
                self.by_conn.pop(peer.conn, None)
            peer.conn, peer.last_seen = conn, now
            self.by_conn[conn] = pid
            if self.probes.pop(pid, None) is not None:
                self._why(f"{pid}: alive (re-introduced) while probed; kept")
            peer.epoch, peer.revision = msg["epoch"], msg["revision"]
            if msg["claim"] == "accepted":
                self.sync.recall(pid, msg["revision"])
            if (peer.host, peer.port) != (msg["host"], msg["port"]) and peer.state is not PeerState.ACCEPTED:
                peer.host, peer.port = msg["host"], msg["port"]
            self._welcome(peer, "re-introduced")
            if peer.state is PeerState.ACCEPTED:
                self._send(conn, self.topology_msg(pid, reason="re-introduced"))
            return
        if len(self.peers) >= self.cfg.max_peers:
            self._send(conn, {"type": "refused", "reason": f"run is full ({self.cfg.max_peers} peers)"})
            self._why(f"hello from {pid} refused: run full")
            return
        old = self.by_conn.get(conn)
        if old is not None and old in self.peers:  # same connection, new identity: drop the old
            self._remove(now, self.peers[old], f"its connection registered as {pid}", tell=False)
        claimed = msg["claim"] == "accepted" and self.recovering
        deadline = now + msg["timeout"] if msg["timeout"] > 0 else float("inf")
        peer = Peer(
            peer_id=pid,
            group=msg["group"],
            host=msg["host"],
            port=msg["port"],
            conn=conn,
            state=PeerState.CLAIMED if claimed else PeerState.PENDING,
            since=now,
            last_seen=now,
            join_deadline=float("inf") if claimed else deadline,
            claim_ring_pos=msg["ring_pos"],
            claim_epoch=msg["epoch"],
            claim_world=msg["world"],
            epoch=msg["epoch"],
            revision=msg["revision"],
            activity_since=now,
        )
        self.peers[pid] = peer
        self.by_conn[conn] = pid
        self.removed_conns.pop(conn, None)
        if msg["claim"] == "accepted":  # a member re-introducing itself: its last synced revision
            self.sync.recall(pid, msg["revision"])
        if claimed:
            self._welcome(peer, "coordinator is recovering; accepted peers are being collected")
        elif msg["claim"] == "accepted":
            self._welcome(peer, "claimed membership after the recovery window; rejoining as pending")
        else:
            self._welcome(peer, "registered")

    def _on_heartbeat(self, now: float, peer: Peer, msg: Msg) -> None:
        if msg["activity"] != peer.activity:
            peer.activity, peer.activity_since = msg["activity"], now
        peer.calls = tuple(msg["calls"])
        peer.stuck_told = peer.stuck_told & frozenset(peer.calls)
        peer.epoch, peer.revision = msg["epoch"], msg["revision"]
        peer.tx, peer.rx = msg["tx"], msg["rx"]

    def _on_vote(self, now: float, peer: Peer, msg: Msg) -> None:
        if peer.state is PeerState.PENDING:
            self._send(
                peer.conn,
                _error(
                    msg["req"],
                    "InvalidUsage",
                    "update_topology called by a peer that is not accepted yet: wait for connect() to return",
                ),
            )
            self._why(f"{peer.peer_id}: vote while pending refused")
            return
        vote = self.votes.get(peer.peer_id)
        if vote is not None and vote.req == msg["req"]:
            return  # a resend after a reconnect
        if self.opt is not None and self.opt.voters.get(peer.peer_id) == msg["req"]:
            return  # (a resend while its optimize round runs)
        if self._vote_came_again(peer, msg["req"]):
            return
        other = next((v.kind for v in self.votes.values() if v.kind != msg["type"]), None)
        if other is not None:
            self._mixed_votes(peer, msg)
            return
        deadline = now + msg["timeout"] if msg["timeout"] > 0 else float("inf")
        self.votes[peer.peer_id] = Vote(req=msg["req"], deadline=deadline, since=now, kind=msg["type"],
                                        below=msg["below"], open=tuple(msg["open"]))
        if self.vote_opened is None:
            self.vote_opened = now
        self._why(f"{peer.peer_id}: voted (waiting for {self._missing_voters()})")

    _on_optimize = _on_vote  # optimize_topology: the same vote, another round when complete

    def _on_bw_report(self, now: float, peer: Peer, msg: Msg) -> None:
        if self.opt is not None:
            self._opt_out(now, self.opt.report(now, peer.peer_id, msg))
        else:
            self._why(f"{peer.peer_id}: bw_report of round {msg['round']} ignored (no optimize round)")

    def _on_unvote(self, now: float, peer: Peer, msg: Msg) -> None:
        vote = self.votes.get(peer.peer_id)
        if vote is not None and vote.req == msg["req"]:
            del self.votes[peer.peer_id]
            self._why(f"{peer.peer_id}: withdrew its vote")

    def _on_pending_q(self, now: float, peer: Peer, msg: Msg) -> None:
        self._send(peer.conn, {"type": "pending_a", "req": msg["req"], "pending": bool(self.pending())})

    def _on_report_failure(self, now: float, peer: Peer, msg: Msg) -> None:
        target = self.peers.get(msg["peer_id"])
        if target is None or target is peer:
            self._why(f"{peer.peer_id}: failure report about {msg['peer_id']} ignored (not a member)")
            return
        if msg["epoch"] < self.epoch:
            self._why(f"{peer.peer_id}: report about {target.peer_id} from epoch {msg['epoch']} ignored "
                      f"(epoch {self.epoch} has fresh links)")
            return
        self._probe(now, target, f"{peer.peer_id} reported: {msg['reason']}", self.cfg.probe_timeout)
        self.probes[target.peer_id].reports.append((peer.peer_id, msg["epoch"]))

    def _on_leave(self, now: float, peer: Peer, msg: Msg) -> None:
        self._remove(now, peer, f"left: {msg['reason']}", tell=True)

    def _on_pong(self, now: float, peer: Peer, msg: Msg) -> None:
        probe = self.probes.get(peer.peer_id)
        if probe is not None and probe.nonce == msg["nonce"]:
            self._probe_answered(now, peer, "answered the probe")

    def _probe_answered(self, now: float, peer: Peer, how: str) -> None:
        """``peer`` is alive. If a member reported its data link to it broken, both are alive
        and the link is not: start a new epoch with the same members, so every daemon dials
        the links it lacks (and calls in flight restart in lockstep). A pair whose link keeps
        breaking costs a member instead (see :meth:`_link_broke`)."""
        probe = self.probes.pop(peer.peer_id)
        self._why(f"{peer.peer_id}: {how} after {probe.why}; kept")
        reporters = [r for r, epoch in probe.reports if epoch >= self.epoch and r in self.peers]
        if reporters and peer.state is PeerState.ACCEPTED and peer.peer_id not in self.rekeys:
            # not at once: a peer leaving gracefully closes its data links before its leave
            # arrives, and answers pings meanwhile
            self.rekeys[peer.peer_id] = (now + self.cfg.rekey_delay, reporters[0], self.epoch)

    def _link_broke(self, now: float, reporter: str, target: Peer) -> None:
        if self._step.changed:
            self._why(f"data link {reporter} - {target.peer_id}: a new epoch is coming anyway")
            return
        self.link_breaks = [b for b in self.link_breaks if now - b[0] < self.cfg.link_break_window]
        pair = {reporter, target.peer_id}
        again = [b for b in self.link_breaks if {b[1], b[2]} == pair]
        if len(again) + 1 >= self.cfg.link_break_limit:
            # the link between these two keeps breaking: drop the one with more broken links
            # (the reported one on a tie), so the rest of the run can go on
            def partners(pid: str) -> int:
                return len({b[1] if b[2] == pid else b[2] for b in self.link_breaks if pid in b[1:]})

            victim = max((target.peer_id, reporter), key=partners)
            self.link_breaks = [b for b in self.link_breaks if victim not in b[1:]]
            self._remove(now, self.peers[victim],
                         f"its data link with {(pair - {victim}).pop()} broke {len(again) + 1} times in "
                         f"{self.cfg.link_break_window:.0f} s while both were alive", tell=True)
            return
        self.link_breaks.append((now, reporter, target.peer_id))
        self._step.changed = True
        self._why(f"data link {reporter} - {target.peer_id} broke while both are alive: new epoch, "
                  f"same members, fresh links")

    def _on_sync_offer(self, now: float, peer: Peer, msg: Msg) -> None:
        if peer.state is PeerState.ACCEPTED:
            self._sync_out(self.sync.offer(now, peer.group, peer.peer_id, msg))
        elif peer.state is PeerState.CLAIMED:  # replayed when the accepted set is rebuilt
            self.sync.hold_recovering(peer.group, peer.peer_id, msg)
            self._why(f"{peer.peer_id}: sync offer held until the recovery window closes")
        else:
            self._send(peer.conn, refusal(
                "sync_shared_state by a peer that is not accepted yet: connect first "
                "(wait for connect() to return)"))
            self._why(f"{peer.peer_id}: sync offer while pending refused")

    def _on_sync_done(self, now: float, peer: Peer, msg: Msg) -> None:
        if peer.state is PeerState.ACCEPTED:
            self._sync_out(self.sync.done(now, peer.group, peer.peer_id, msg))

    def _sync_out(self, d) -> None:
        for pid, msg in d.out:
            peer = self.peers.get(pid)
            if peer is not None:
                self._send(peer.conn, msg)
        if d.reason:
            self._why(d.reason)

    def _on_stranger(self, conn: Conn, mtype: str) -> None:
        gone = self.removed_conns.get(conn)
        if gone is not None:
            self._send(conn, _removed(gone, self.removed.get(gone, (0, "removed"))[1]))
            self._why(f"{mtype} from removed peer {gone}: told it was removed")
        elif mtype not in ("pong", "unvote", "leave"):
            reason = "unknown connection (the coordinator may have restarted): send hello"
            self._send(conn, {"type": "reset", "instance": self.instance, "reason": reason})
            self._why(f"{mtype} from an unknown connection: asked it to introduce itself")

    # ------------------------------------------------------------------ decisions

    def _probe(self, now: float, peer: Peer, why: str, timeout: float) -> None:
        """Ping ``peer`` (again every probe_timeout/4); remove it unless it answers in ``timeout``."""
        probe = self.probes.get(peer.peer_id)
        if probe is not None:  # already probed: a stronger reason may shorten the deadline
            if now + timeout < probe.deadline:
                probe.deadline, probe.why = now + timeout, why
            return
        self._nonce += 1
        self.probes[peer.peer_id] = Probe(
            self._nonce, now + timeout, why, started=now, next_ping=now + self.cfg.probe_timeout / 4
        )
        self._send(peer.conn, {"type": "ping", "nonce": self._nonce})
        self._why(f"probing {peer.peer_id} ({why})")

    def _remove(self, now: float, peer: Peer, why: str, *, tell: bool) -> None:
        pid = peer.peer_id
        del self.peers[pid]
        if self.by_conn.get(peer.conn) == pid:
            del self.by_conn[peer.conn]
        if peer.state is not PeerState.PENDING:  # a member (or claimant) may not come back as itself
            self.removed[pid] = (now, why)
            self.removed_conns[peer.conn] = pid
        self.probes.pop(pid, None)
        self.rekeys.pop(pid, None)
        self.votes.pop(pid, None)
        self.answers.pop(pid, None)
        ring = self.rings.get(peer.group)
        if ring is not None and pid in ring:
            ring.remove(pid)
            if not ring:
                del self.rings[peer.group]
        if peer.state is PeerState.ACCEPTED:
            self._step.changed = True
        self._sync_out(self.sync.gone(now, peer.group, pid))
        self.bw.forget(pid)
        if self.opt is not None:
            self._opt_out(now, self.opt.gone(now, pid))
        if tell:
            self._send(peer.conn, _removed(pid, why))
        self._why(f"removed {pid} ({peer.state.value}): {why}")

    def _welcome(self, peer: Peer, reason: str) -> None:
        state = "recovering" if peer.state is PeerState.CLAIMED else peer.state.value
        self._send(
            peer.conn,
            {
                "type": "welcome",
                "instance": self.instance,
                "peer_id": peer.peer_id,
                "state": state,
                "heartbeat_interval": self.cfg.heartbeat_interval,
                "heartbeat_deadline": self.cfg.heartbeat_deadline,
                "reason": reason,
            },
        )
        self._why(f"{peer.peer_id}: {reason} (group {peer.group}, {state})")

    def _claims_complete(self) -> bool:
        """Every member of the newest epoch that claimants report has claimed its membership:
        the recovery window need not run to its end (the others never come, or come late:
        those were removed before the restart)."""
        claims = [p for p in self.peers.values() if p.state is PeerState.CLAIMED]
        if not claims:
            return False
        top = max(p.claim_epoch for p in claims)
        at_top = [p for p in claims if p.claim_epoch == top]
        world = at_top[0].claim_world
        return world > 0 and all(p.claim_world == world for p in at_top) and len(at_top) >= world

    def _rebuild(self, now: float) -> None:
        """End of the recovery window: the claimants become the accepted set."""
        self.recovering = False
        claimed = [p for p in self.peers.values() if p.state is PeerState.CLAIMED]
        for peer in sorted(claimed, key=lambda p: (p.group, p.claim_ring_pos, p.peer_id)):
            peer.state = PeerState.ACCEPTED
            self.rings.setdefault(peer.group, []).append(peer.peer_id)
        self.votes = {pid: v for pid, v in self.votes.items() if pid in self.accepted()}
        self._step.changed = self._step.changed or bool(claimed)
        early = now < self.recover_until
        self._why(f"recovery window closed{' early (every member of the last epoch claimed)' if early else ''}: "
                  f"rebuilt {len(claimed)} accepted peers from their claims")
        self._sync_out(self.sync.recovered(now))

    def _answer(self, peer: Peer, req: int, error: Msg) -> None:
        """Fail vote ``req`` of ``peer`` with ``error``, and remember it in case the vote comes again."""
        self._send(peer.conn, error)
        self.answers[peer.peer_id] = (peer.conn, req, error)

    def _vote_came_again(self, peer: Peer, req: int) -> bool:
        """A vote that was already answered came again: its daemon resends what is in flight
        when its connection closed or it re-introduced itself, and the answer may have been
        lost. Answer as before (its round's topology, now at the current epoch, or the same
        error) and count nothing; an older one than that is stale and only dropped (a daemon
        numbers its requests upwards, so it answered that call long ago)."""
        conn, answered, error = self.answers.get(peer.peer_id, (None, 0, None))
        if conn != peer.conn or req > answered:  # (a new socket: a restarted daemon counts from 1)
            return False
        if req < answered:
            self._why(f"{peer.peer_id}: vote {req} came again after vote {answered} was answered; dropped")
        elif error is not None:
            self._send(peer.conn, error)
            self._why(f"{peer.peer_id}: vote {req} came again after its answer; answered again")
        elif peer.state is PeerState.ACCEPTED:
            self._send(peer.conn, self.topology_msg(peer.peer_id, reason="vote answered again", req=req))
            self._why(f"{peer.peer_id}: vote {req} came again after its answer; answered again")
        else:
            return False
        return True

    def _missing_voters(self) -> str:
        if self.recovering:
            return "the recovery window to close"
        missing = sorted(set(self.accepted()) - set(self.votes))
        return ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "") if missing else "nobody"

    def _abort_stuck(self) -> None:
        """A peer in a call that a voter of its group has not made, or failed and does not
        retry (it votes instead), waits for ever: the voter will not join that call before
        the vote completes, and the vote waits for that peer. It happens when one peer
        completed a call that another failed (the other gets ``Diverged`` and votes while
        the first goes on to its next call). The call is failed at once with ``Diverged``,
        and the voters go on waiting: that peer votes next, instead of after the grace of
        the lockstep check. Known from the tags the heartbeats and votes report (up to one
        heartbeat late)."""
        if not self.votes:
            return
        for pid in self.accepted():
            peer = self.peers[pid]
            if pid in self.votes or not peer.calls:
                continue
            for tag in peer.calls:
                if tag in peer.stuck_told:
                    continue
                voter = next((vid for vid, v in self.votes.items() if self.peers[vid].group == peer.group
                              and never_made(tag, v.below, v.open)), None)
                if voter is None:
                    continue
                text = (f"peers diverged: this peer waits in a call (automatic tag {tag_count(tag)}) that peer "
                        f"{voter} did not make: it completed fewer calls than this peer and now waits in "
                        f"{_CALLS[self.votes[voter].kind]}; call it too (the call's result is not applied)")
                self._send(peer.conn, {"type": "abort", "error": "Diverged", "message": text[:1024]})
                peer.stuck_told = peer.stuck_told | {tag}
                self._why(f"{pid}: {text}")
                break

    def _check_mismatch(self, now: float) -> None:
        if not self.votes or self.vote_opened is None:
            return
        busy = []
        for pid in self.accepted():
            if pid in self.votes:
                continue
            peer = self.peers[pid]
            if peer.activity is None or peer.activity in (UPDATE_TOPOLOGY, OPTIMIZE_TOPOLOGY):
                continue
            if now - peer.last_seen > self._quiet:
                continue  # silent: its heartbeat deadline decides, not its last reported activity
            if now - max(peer.activity_since, self.vote_opened) > self.cfg.mismatch_grace:
                busy.append(peer)
        if not busy:
            return
        voters = sorted(self.votes)
        doing = "; ".join(f"peer {p.peer_id} is in {p.activity!r}" for p in busy)
        text = (
            f"lockstep mismatch: peers {', '.join(voters)} wait in {_CALLS[next(iter(self.votes.values())).kind]} "
            f"while {doing} (for more than {self.cfg.mismatch_grace:g} s); every accepted peer must call "
            f"it at the same point of the program"
        )
        for pid in voters:
            self._answer(self.peers[pid], self.votes[pid].req, _error(self.votes[pid].req, "InvalidUsage", text))
        for peer in busy:
            self._send(peer.conn, {"type": "abort", "error": "InvalidUsage", "message": text[:1024]})
        for group in sorted({p.group for p in busy}):  # syncs waiting for a voter would wait out their deadline
            self._sync_out(self.sync.abort(now, group, text))
        self.votes.clear()
        self.vote_opened = None
        self._why(text)

    def _finish(self, now: float) -> Decision:
        """Settle what the step implies (empty run, completed round), bump the epoch, push."""
        st = self._step
        if self.recovering and self._claims_complete():
            self._rebuild(now)
        if not self.recovering:
            pend = [p for p in self.peers.values() if p.state is PeerState.PENDING]
            if pend and not self.accepted():
                self._admit(pend, "run was empty")
            elif self.votes and set(self.accepted()) <= set(self.votes):
                self.round = (self.round + 1) % (1 << 62)  # every member is between calls here
                if next(iter(self.votes.values())).kind == "optimize":
                    self._open_optimize(now)  # admits nobody: answered when the round ends
                else:
                    st.round_done = {pid: vote.req for pid, vote in self.votes.items()}
                self.votes.clear()
                self.vote_opened = None
                pend = [p for p in self.peers.values() if p.state is PeerState.PENDING]
                if st.round_done and pend:
                    self._admit(pend, "every accepted peer voted")
                elif st.round_done:
                    self._why("vote round complete; nobody pending")
            else:
                self._abort_stuck()
        self._settle_optimize()
        if not self.votes:
            self.vote_opened = None
        if st.changed:
            self.epoch = max(self.epoch, self._epoch_floor) + 1
            reason = st.done_reason[:1024] or "; ".join(st.why)[-1024:]
            for pid in self.accepted():
                self._send(self.peers[pid].conn, self.topology_msg(pid, reason=reason, req=st.round_done.get(pid, 0)))
            self._why(f"epoch {self.epoch}: world size {self.world_size}, {self.num_groups} group(s)")
        else:
            for pid in sorted(st.round_done):
                self._send(self.peers[pid].conn,
                           self.topology_msg(pid, reason=st.done_reason or "vote round complete",
                                             req=st.round_done[pid]))
        for pid, req in st.round_done.items():
            self.answers[pid] = (self.peers[pid].conn, req, None)
        return Decision(st.out, "; ".join(st.why), st.work)

    # ------------------------------------------------------------------ optimize_topology

    def _open_optimize(self, now: float) -> None:
        """Every accepted peer voted ``optimize``: measure and order (coordinator/topology_opt.py)."""
        self._opt_rounds += 1
        self.opt = OptimizeRound(
            self._opt_rounds, now, voters={pid: v.req for pid, v in self.votes.items()},
            deadline=min(v.deadline for v in self.votes.values()), rings=self.rings, matrix=self.bw,
            epoch=self.epoch, config=self.cfg.optimize)
        self._opt_out(now, self.opt.start(now))

    def _opt_out(self, now: float, d: Decision) -> None:
        """Send what the round returned; once probing is over, solve (inline, or as work)."""
        self._sync_out(d)
        job = self.opt.solve_job() if self.opt is not None else None
        if job is None or self._step.work is not None:
            return
        if self.opt.inline:
            self._sync_out(self.opt.solved(now, job()))
        else:
            rid = self.opt.round_id
            self._step.work = (job, lambda t, result: self.on_solved(t, rid, result))

    def on_solved(self, now: float, round_id: int, result: Any) -> Decision:
        """The solver's result for optimize round ``round_id``, computed off the loop."""
        self._step = _Step()
        self._compensate_stall(now)
        if self.opt is not None and self.opt.round_id == round_id:
            self._sync_out(self.opt.solved(now, result))
        return self._finish(now)

    def _settle_optimize(self) -> None:
        """A finished round: move the rings it chose and answer its voters."""
        opt = self.opt
        if opt is None or opt.outcome is None:
            return
        self.opt = None
        out = opt.outcome
        for group, ring in out.moves.items():
            if set(ring) == set(self.rings.get(group, ())):  # (nobody joined meanwhile)
                self.rings[group] = list(ring)
                self._step.changed = True
        for pid, req in out.answers.items():
            peer = self.peers.get(pid)
            if peer is None:
                continue
            if out.error is not None:
                self._answer(peer, req, _error(req, *out.error))
            else:
                self._step.round_done[pid] = req
        self._step.done_reason = out.reason
        self._why(out.reason or (out.error[1] if out.error else ""))

    def _mixed_votes(self, peer: Peer, msg: Msg) -> None:
        text = (f"lockstep mismatch: peer {peer.peer_id} called {_CALLS[msg['type']]} while peers "
                f"{', '.join(sorted(self.votes))} wait in {_CALLS[next(iter(self.votes.values())).kind]}; "
                "every accepted peer must make the same call at the same point of the program")
        self._answer(peer, msg["req"], _error(msg["req"], "InvalidUsage", text))
        for pid, vote in self.votes.items():
            self._answer(self.peers[pid], vote.req, _error(vote.req, "InvalidUsage", text))
        self.votes.clear()
        self.vote_opened = None
        self._why(text)

    def _admit(self, pend: list[Peer], why: str) -> None:
        for peer in sorted(pend, key=lambda p: (p.since, p.peer_id)):
            peer.state = PeerState.ACCEPTED
            peer.join_deadline = float("inf")
            self.rings.setdefault(peer.group, []).append(peer.peer_id)
        self._step.changed = True
        self._why(f"accepted {', '.join(p.peer_id for p in pend)} ({why})")

    def _forget_removed(self, now: float) -> None:
        cutoff = now - self.cfg.removed_memory
        while self.removed and (
            len(self.removed) > self.cfg.max_removed or next(iter(self.removed.values()))[0] < cutoff
        ):
            pid = next(iter(self.removed))
            del self.removed[pid]
        while len(self.removed_conns) > self.cfg.max_removed:
            del self.removed_conns[next(iter(self.removed_conns))]

    def _send(self, conn: Conn, msg: Msg) -> None:
        self._step.out.append((conn, msg))

    def _why(self, text: str) -> None:
        self._step.why.append(text)


_CALLS = {"vote": UPDATE_TOPOLOGY, "optimize": OPTIMIZE_TOPOLOGY}


def _error(req: int, name: str, message: str) -> Msg:
    return {"type": "error", "req": req, "error": name, "message": message[:1024]}


def _removed(pid: str, why: str) -> Msg:
    text = f"peer {pid} was removed from the run ({why}); connect again as a new member (new peer_id)"
    return {"type": "removed", "peer_id": pid, "reason": text[:1024]}
