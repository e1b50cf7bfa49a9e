"""The daemon's side of the control plane, sans I/O: :class:`ControlCore`.

The core is fed validated coordinator messages (see :mod:`pccl_py.wire.control`), timer
ticks and the calls the daemon makes, always with the current time, and returns a
:class:`Actions`: the messages to send, the waits to complete or fail (and with what),
what to hand to the daemon's callbacks, and a reason for the log. It owns no socket,
task, future or clock: :class:`~pccl_py.daemon.control.ControlChannel` is its asyncio shell.

A wait is named by a key: a request id (> 0) for ``vote`` and ``pending_q``, :data:`JOIN`
for admission (``connect()``, or ``update_topology()`` of a peer pending again after a
coordinator restart), :data:`LEAVE` for the coordinator's confirmation of a leave.

The transport authenticates: the shell's socket completes a CURVE handshake with the run's
keys before any message passes. A handshake that fails (a coordinator with another run
secret, or a process on its address that cannot prove the run secret) reaches the core as
:meth:`ControlCore.handshake_failed`: it is logged (at most once per
:data:`HANDSHAKE_LOG_EVERY` seconds), the shell dials again after a backoff, and a
``connect()`` still registering fails with :class:`~pccl_py.errors.AuthenticationFailed`
after :data:`HANDSHAKE_FAILURES_TO_FAIL` failures in a row, instead of at its deadline.
Nothing else changes: a member keeps its membership while an impostor holds the address.

The session is one :class:`ChannelState`; ``_set_state`` rejects transitions not in
``_ALLOWED``. Whether the coordinator is silent is not a state of the session but a timer
on the last message received: while it is, the core re-introduces itself at the pace of
one :class:`~pccl_py.retry.Backoff`, whatever state the session is in.

Requests in flight (votes, ``pending_q``) are sent again whenever they or their answers may
have been lost: when the shell reports that the control connection closed
(:meth:`ControlCore.connection_lost`: a coordinator that was paused, a reconnect), and when
the coordinator welcomes a re-introduction (a new instance never saw them; the same instance
asks for one when it got a message on a connection it could not place, and dropped it). The
coordinator answers a repeated request as it answered the first one, and every answer names
its request, so a late answer never completes a later call.
"""

from __future__ import annotations

import enum
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pccl_py.calls import TAGS_REPORTED
from pccl_py.daemon.topology import PeerInfo, Topology
from pccl_py.errors import (
    Aborted,
    AuthenticationFailed,
    CoordinatorUnavailable,
    DeadlineExceeded,
    InternalError,
    InvalidUsage,
    PcclError,
    PeerLost,
    ProtocolError,
    from_wire,
)
from pccl_py.retry import Backoff
from pccl_py.wire import control as protocol

Msg = dict[str, Any]

JOIN = 0  # the wait for admission (request ids start at 1; an error with req 0 is about it)
LEAVE = -1  # the wait for the coordinator's confirmation of a leave

# pace of re-introductions while the coordinator is silent: until one answers
REINTRODUCE_BACKOFF = Backoff(initial=0.1, maximum=1.0, factor=2.0, jitter=0.2, deadline=float("inf"))
HELLO_SPACING = 0.2  # a hello asked for by a message waits this long after the last one
# What waits for an answer (votes, the sync offer, the fetch report) goes again after this
# long without one, then at doubling gaps up to RESEND_MAX: an answer can be lost around a
# reconnection (the coordinator's socket hands a peer over to its newest connection and
# drops what was queued on the old one), and nothing else would ask for it again. Every
# resend is answered again or ignored as a duplicate.
RESEND_FIRST = 2.0
RESEND_MAX = 8.0
# pace of dialing again after a failed CURVE handshake (zmq gives up on some failures for good)
REDIAL_BACKOFF = Backoff(initial=0.1, maximum=1.0, factor=2.0, jitter=0.2, deadline=float("inf"))
HANDSHAKE_FAILURES_TO_FAIL = 2  # failed handshakes in a row that end a registering connect()
HANDSHAKE_LOG_EVERY = 10.0  # seconds between warnings about failed handshakes
SYNC_OFFER_LIFETIME = 600.0  # an offer without a timeout is resent to a new coordinator this long


class ChannelState(enum.Enum):
    IDLE = "idle"  # not registered: never connected, or connect() gave up or was refused
    PENDING = "pending"  # registered, waiting for the accepted peers to admit it
    RECOVERING = "recovering"  # a member while a restarted coordinator rebuilds its table
    ACCEPTED = "accepted"  # a member with a topology
    REMOVED = "removed"  # the coordinator removed this peer_id: connect() takes a new one
    LEFT = "left"  # this peer announced a graceful leave: connect() takes a new peer_id
    CLOSED = "closed"  # for good


_S = ChannelState
_VOTES = ("vote", "optimize")  # requests the coordinator answers with a topology
REGISTERED = frozenset({_S.PENDING, _S.RECOVERING, _S.ACCEPTED})

_ALLOWED: dict[ChannelState, frozenset[ChannelState]] = {
    _S.IDLE: frozenset({_S.PENDING, _S.CLOSED}),
    # a registered peer may give up (IDLE), be welcomed again in any registered state by a
    # restarted coordinator, get a topology, be removed, leave or close
    _S.PENDING: REGISTERED | {_S.IDLE, _S.REMOVED, _S.LEFT, _S.CLOSED},
    _S.RECOVERING: REGISTERED | {_S.IDLE, _S.REMOVED, _S.LEFT, _S.CLOSED},
    _S.ACCEPTED: REGISTERED | {_S.IDLE, _S.REMOVED, _S.LEFT, _S.CLOSED},
    _S.REMOVED: frozenset({_S.PENDING, _S.CLOSED}),  # connect() again, with a new peer_id
    _S.LEFT: frozenset({_S.PENDING, _S.CLOSED}),
    _S.CLOSED: frozenset(),
}


@dataclass
class Actions:
    """What one input asks the shell to do, in this order: hand ``renamed`` to on_peer_id and
    ``abort`` to on_abort, send ``out``, fail and complete waits, queue ``sync`` items and the
    ``topology`` message, hand ``removed`` to on_removed. ``reason`` is for the log."""

    out: list[Msg] = field(default_factory=list)
    reason: str = ""
    level: int = logging.DEBUG  # log level of the reason
    settle: list[tuple[int, Any]] = field(default_factory=list)  # (wait key, result)
    fail: list[tuple[int, PcclError]] = field(default_factory=list)  # (wait key, exception)
    wait: int | None = None  # the wait the call behind these actions awaits (None: none)
    registering: bool = False  # connect() registers: if its wait fails, call connect_failed()
    topology: Msg | None = None  # a topology to queue for adopt() / applied()
    apply: Topology | None = None  # await on_topology(apply) between adopt() and applied()
    sync: list[Msg | PcclError] = field(default_factory=list)  # for the sync channel's recv()
    abort: PcclError | None = None  # for on_abort
    removed: str | None = None  # for on_removed: the coordinator's reason
    renamed: str | None = None  # for on_peer_id: the new peer_id
    redial: float | None = None  # drop the connection (and what is queued on it), dial again after this
    probe: Msg | None = None  # a bw_probe to run on the data plane, then report with probe_done()


def topology_from(msg: Msg, peer_id: str) -> Topology:
    """The :class:`Topology` a ``topology`` message gives ``peer_id``."""
    peers = tuple(PeerInfo(pid, host, port) for pid, host, port in msg["peers"])
    ids = [p.peer_id for p in peers]
    if peer_id not in ids:
        raise ProtocolError(f"topology of epoch {msg['epoch']} does not include this peer {peer_id}")
    return Topology(epoch=msg["epoch"], group=msg["group"], rank=ids.index(peer_id), peers=peers,
                    world_size=msg["world_size"], num_groups=msg["num_groups"], round=msg["round"])


@dataclass
class _Reintroduction:
    """The coordinator is silent: hellos go out at ``due``, then after each delay."""

    delays: Iterator[float]
    due: float


class ControlCore:
    """Registration, heartbeats, votes and coordinator restarts of one daemon (module docstring)."""

    def __init__(
        self,
        peer_id: str,
        *,
        group: int,
        data_addr: tuple[str, int],
        coordinator: str = "",
        heartbeat_interval: float = 0.5,
        coordinator_timeout: float = 3.0,
        backoff: Backoff = REINTRODUCE_BACKOFF,
        redial_backoff: Backoff = REDIAL_BACKOFF,
    ) -> None:
        self.peer_id = peer_id
        self.base_id = peer_id  # new identities after a removal derive from it
        self.group = group
        self.data_addr = data_addr
        self.coordinator = coordinator  # its address, for error messages
        self.coordinator_timeout = coordinator_timeout
        self.backoff = backoff
        self.redial_backoff = redial_backoff
        self.state = _S.IDLE
        self.topology: Topology | None = None
        self.revision = -1  # shared-state revision, reported with heartbeats and hellos
        self.instance = ""  # the coordinator instance that welcomed this peer last
        self.removed_reason = ""
        self.requests: dict[int, Msg] = {}  # in flight: resent when it may have been lost
        self._until: dict[int, float] = {}  # a vote's deadline (its caller's), for its resends
        self.sync_offer: tuple[Msg, float] | None = None  # offer waiting for its plan, until when
        self.sync_report: tuple[Msg, float] | None = None  # sync_done waiting for sync_complete, until when
        self.last_rx: float | None = None  # when the coordinator last sent anything (None: never)
        self.last_hello = float("-inf")
        self.coord_hb = heartbeat_interval  # the coordinator's heartbeat period (from welcome)
        self.reintro: _Reintroduction | None = None  # set while the coordinator is silent
        self._reintroduced = False  # a hello went out: the next welcome resends the requests
        self._retx: tuple[float, float] | None = None  # (next resend of what waits, its gap)
        self._join_timeout = 0.0
        self._next_req = 0
        self._adopting: Msg | None = None  # between adopt() and applied()
        self.handshake_failures = 0  # failed CURVE handshakes since the last one that succeeded
        self.handshake_error = ""  # what the last one means
        self._redials: Iterator[float] | None = None
        self._hs_logged: float | None = None  # when a failed handshake was last logged
        self._hs_unlogged = 0  # failed handshakes since then
        self._step = Actions()

    # ------------------------------------------------------------------ queries

    @property
    def registered(self) -> bool:
        return self.state in REGISTERED

    def removed_text(self) -> str:
        return self.removed_reason or f"peer {self.peer_id} was removed from the run; connect again as a new member"

    def require_member(self, what: str) -> None:
        if self.state is _S.REMOVED:
            raise PeerLost(self.removed_text())
        if not self.registered or self.topology is None:
            raise InvalidUsage(f"{what} before connect() returned: call connect() first")

    def wait_expired(self, now: float, what: str) -> PcclError:
        """The exception for a call whose wait reached its deadline at ``now``."""
        if self.handshake_failures:
            return CoordinatorUnavailable(
                f"{what}: no answer from the coordinator before the deadline: {self.handshake_error}")
        if self.last_rx is None or self.reintro is not None or now - self.last_rx > 2.5 * self.coord_hb:
            return CoordinatorUnavailable(
                f"{what}: no answer from the coordinator at {self.coordinator} before the "
                f"deadline; is it running, and is the address right?"
            )
        if what == "connect":
            return DeadlineExceeded(
                "connect: not admitted before the deadline: the accepted peers did not call "
                "update_topology in time; call connect() again"
            )
        return DeadlineExceeded(f"{what}: the coordinator did not answer before the deadline")

    # ------------------------------------------------------------------ calls

    def connect(self, now: float, timeout: float) -> Actions:
        """Register (or wait for the topology of a member whose coordinator restarted)."""
        self._begin()
        if self.state is _S.CLOSED:
            raise InvalidUsage("the control channel is closed")
        if self.state is _S.ACCEPTED and self.topology is not None:
            self._why(f"already a member at epoch {self.topology.epoch}")
            return self._step
        self._step.wait = JOIN
        if self.state is _S.RECOVERING:
            self._why("a member while the coordinator rebuilds its table: waiting for its topology")
            return self._step
        if self.state in (_S.REMOVED, _S.LEFT):  # a removed peer_id never comes back: take a new one
            old = self.peer_id
            self.peer_id = f"{self.base_id}~{secrets.token_hex(3)}"
            self.topology = None
            self.instance = ""
            self._step.renamed = self.peer_id
            self._why(f"{old} connects again as a new member {self.peer_id}", logging.INFO)
        self._set_state(_S.PENDING)
        self._join_timeout = timeout
        self._step.registering = True
        self._hello(now, force=True, why="registering")
        return self._step

    def connect_failed(self, exc: PcclError) -> Actions:
        """A registering connect() raised ``exc``: past its deadline it announces a leave."""
        self._begin()
        if isinstance(exc, (DeadlineExceeded, CoordinatorUnavailable)):
            self._send({"type": "leave", "reason": "connect() gave up waiting"})
            if self.registered:
                self._set_state(_S.IDLE)
            self._why("connect() gave up waiting: leave announced")
        elif self.state is _S.PENDING:
            self._set_state(_S.IDLE)
            self._why(f"connect() failed: {exc}")
        return self._step

    def vote(self, now: float, timeout: float, *, kind: str = "vote",
             progress: tuple[int, list[int]] = (0, [])) -> Actions:
        """update_topology() (``kind`` "vote": admit the pending peers) or optimize_topology()
        (``kind`` "optimize": measure the links and reorder the ring); ``wait`` says what to
        await: the topology (for "optimize": the topology and the coordinator's reason).
        ``progress``: what this peer made of its automatic tags (``AutoTags.progress``)."""
        self._begin()
        what = "optimize_topology" if kind == "optimize" else "update_topology"
        self.require_member(what)
        if self.state is _S.PENDING:  # rejoined as pending after a coordinator restart
            if kind == "optimize":
                raise Aborted("optimize_topology: this peer is pending again after a coordinator restart; "
                              "call update_topology to be admitted")
            self._step.wait = JOIN
            self._why("pending again after a coordinator restart: update_topology waits for admission")
            return self._step
        # accepted, or recovering (the new coordinator keeps votes made in its recovery window)
        below, open_tags = progress
        self._step.wait = self._request({"type": kind, "timeout": max(0.0, timeout), "below": below,
                                         "open": list(open_tags)})
        if timeout > 0:
            self._until[self._step.wait] = now + timeout
        self._why(f"vote {self._step.wait} sent")
        return self._step

    def unvote(self, req: int) -> Actions:
        """The caller of update_topology gave up waiting for vote ``req``."""
        self._begin()
        self.forget(req)
        self._send({"type": "unvote", "req": req})
        self._why(f"vote {req} withdrawn")
        return self._step

    def pending_query(self) -> Actions:
        """are_peers_pending(): ``wait`` is the request to await."""
        self._begin()
        self.require_member("are_peers_pending")
        self._step.wait = self._request({"type": "pending_q"})
        return self._step

    def report_failure(self, peer_id: str, reason: str, epoch: int) -> Actions:
        self._begin()
        if self.registered:
            self._send({"type": "report_failure", "peer_id": peer_id[:128], "reason": reason[:1024], "epoch": epoch})
            self._why(f"reported the link to {peer_id} of epoch {epoch} broken")
        else:
            self._why(f"link to {peer_id} broke while not registered ({self.state.value}): not reported")
        return self._step

    def sync_send(self, now: float, msg: Msg) -> Actions:
        """``sync_offer`` / ``sync_done`` from daemon_sync; raises when it cannot be sent."""
        self._begin()
        if self.state is _S.REMOVED:
            raise PeerLost(self.removed_text())
        if not self.registered:
            raise CoordinatorUnavailable(
                f"not connected to the coordinator at {self.coordinator} (state {self.state.value}): "
                "call connect() first"
            )
        size = len(protocol.encode_msg(msg))
        if size > protocol.MAX_MESSAGE:
            raise InvalidUsage(
                f"{msg['type']} of {size} bytes exceeds the control frame limit of {protocol.MAX_MESSAGE} "
                "bytes: use fewer or shorter-named shared-state tensors"
            )
        self._retx = None
        if msg["type"] == "sync_offer":
            timeout = msg["timeout"] if msg["timeout"] > 0 else SYNC_OFFER_LIFETIME
            self.sync_offer = (msg, now + timeout)
        elif msg["type"] == "sync_done":
            self.sync_report = (msg, now + SYNC_OFFER_LIFETIME)
        self._send(msg)
        return self._step

    def leave(self) -> Actions:
        """Announce a graceful leave; ``wait`` (if any) is the coordinator's confirmation."""
        self._begin()
        if not self.registered:
            self._why(f"not registered ({self.state.value}): no leave to announce")
            return self._step
        self._send({"type": "leave", "reason": "graceful leave"})
        self._set_state(_S.LEFT)
        self._fail_all(Aborted("this peer left the run"), sync=True)
        self._step.wait = LEAVE
        self._why("leave announced")
        return self._step

    def close(self) -> Actions:
        self._begin()
        if self.state is _S.CLOSED:
            self._why("already closed")
            return self._step
        self._fail_all(Aborted("the control channel was closed"), sync=True)
        self._set_state(_S.CLOSED)
        self._why("closed")
        return self._step

    def forget(self, key: int) -> None:
        """The wait ``key`` ended in the shell (completed, timed out, cancelled)."""
        self.requests.pop(key, None)
        self._until.pop(key, None)

    def connection_lost(self, now: float) -> Actions:
        """The control connection closed (the shell's socket reconnects by itself): what went
        out on it may not have arrived, and the answers sent back on it are lost. The requests
        in flight go out again on the next connection; the coordinator answers a request it
        already answered once more (a vote is not counted twice)."""
        self._begin()
        if self.registered and self.requests:
            self._resend(now, "the control connection closed")
        else:
            self._why("the control connection closed; nothing in flight")
        return self._step

    def handshake_failed(self, now: float, text: str) -> Actions:
        """The CURVE handshake with the coordinator failed; ``text`` says what that means and
        what to do. The shell drops the connection and dials again after ``redial``."""
        self._begin()
        self.handshake_failures += 1
        self.handshake_error = text
        self._hs_unlogged += 1
        if self._hs_logged is None or now - self._hs_logged >= HANDSHAKE_LOG_EVERY:
            n, self._hs_unlogged = self._hs_unlogged, 0
            since = ("" if self._hs_logged is None
                     else f" ({n} failed handshakes in the last {now - self._hs_logged:.0f} s)")
            self._hs_logged = now
            self._why(f"{text}{since}", logging.WARNING)
        if self._redials is None:
            self._redials = self.redial_backoff.delays()
        self._step.redial = next(self._redials, self.redial_backoff.maximum)
        if (self.state is _S.PENDING and self.topology is None
                and self.handshake_failures >= HANDSHAKE_FAILURES_TO_FAIL):
            # a registering connect(): it would only wait out its deadline
            self._step.fail.append((JOIN, AuthenticationFailed(text)))
            self._set_state(_S.IDLE)
            self._why(f"connect() fails after {self.handshake_failures} failed handshakes", logging.INFO)
        return self._step

    def handshake_succeeded(self, now: float) -> Actions:
        self._begin()
        if self.handshake_failures:
            self._why(f"CURVE handshake with the coordinator at {self.coordinator} succeeded after "
                      f"{self.handshake_failures} that failed", logging.INFO)
        else:
            self._why("CURVE handshake with the coordinator succeeded")
        self.handshake_failures = 0
        self.handshake_error = ""
        self._redials = None
        self._hs_logged, self._hs_unlogged = None, 0
        return self._step

    # ------------------------------------------------------------------ timers

    def tick(self, now: float, activity: str | None = None, *, traffic: tuple[int, int] = (0, 0),
             calls: list[int] | tuple[int, ...] = ()) -> Actions:
        """Heartbeat period: a heartbeat (with ``activity``, ``traffic``, the data-plane
        bytes sent and received so far, and ``calls``, the automatic tags in flight), and
        hellos while the coordinator is silent."""
        self._begin()
        if not self.registered:
            return self._step
        epoch = self.topology.epoch if self.topology is not None else 0
        self._send({"type": "heartbeat", "activity": activity and activity[:256], "epoch": epoch,
                    "revision": self.revision, "tx": traffic[0], "rx": traffic[1],
                    "calls": list(calls)[:TAGS_REPORTED]})
        silent_since = self.last_rx if self.last_rx is not None else self.last_hello
        if now - silent_since > self.coordinator_timeout:
            if self.reintro is None:
                self.reintro = _Reintroduction(self.backoff.delays(), now)
                self._why(f"no message from the coordinator for {now - silent_since:.1f} s; "
                          "re-introducing until it answers", logging.WARNING)
            if now >= self.reintro.due:
                self._hello(now, force=True, why="the coordinator is silent")
                self.reintro.due = now + next(self.reintro.delays, self.backoff.maximum)
        self._resend_unanswered(now)
        return self._step

    # ------------------------------------------------------------------ coordinator messages

    def on_message(self, now: float, msg: Msg) -> Actions:
        """A validated message from the coordinator (over a connection that proved the run secret)."""
        self._begin()
        self.last_rx = now
        if self.reintro is not None:
            self.reintro = None
            self._why("the coordinator answers again", logging.INFO)
        handler = getattr(self, f"_on_{msg['type']}", None)  # msg passed protocol.decode()
        if handler is None:
            self._why(f"unexpected {msg['type']} from the coordinator dropped", logging.WARNING)
        else:
            handler(now, msg)
        return self._step

    def _on_welcome(self, now: float, msg: Msg) -> None:
        if not self.registered or msg["peer_id"] != self.peer_id:
            self._why(f"welcome of {msg['peer_id']} ignored (this peer is {self.peer_id}, {self.state.value})")
            return
        new_instance = msg["instance"] != self.instance
        if new_instance and self.instance:
            self._why(f"new coordinator instance {msg['instance']} (was {self.instance}), state {msg['state']}",
                      logging.INFO)
        self.instance = msg["instance"]
        self.coord_hb = msg["heartbeat_interval"]
        if msg["state"] == "recovering":
            self._set_state(_S.RECOVERING)
        elif msg["state"] == "pending":
            if self.state in (_S.ACCEPTED, _S.RECOVERING):
                text = (
                    "the coordinator restarted and this peer re-introduced itself after its recovery "
                    "window: it rejoins as pending and is admitted at the next update_topology"
                )
                self._why(text, logging.WARNING)
                self._step.abort = Aborted(text)
                for req, sent in list(self.requests.items()):
                    if sent["type"] in _VOTES:
                        self.forget(req)
                        self._step.fail.append((req, Aborted(text)))
            self._set_state(_S.PENDING)
        else:
            self._why(f"welcomed by {self.instance} ({msg['state']})")
        if new_instance or self._reintroduced:  # requests may have been dropped (or never seen)
            self._reintroduced = False
            if self.requests:
                self._resend(now, "a new coordinator instance" if new_instance else "welcomed again")
            # so may the sync offer waiting for its plan and the fetch report waiting for the
            # round's end: a coordinator that dropped one (it came on a connection it could not
            # place, or before a restart) would wait for it until the round's deadline; one it
            # had is answered again or ignored as a duplicate
            self._resend_sync(now)

    def _on_topology(self, now: float, msg: Msg) -> None:
        if msg["instance"] != self.instance:  # not (yet) welcomed by this instance
            self._check_instance(now, "topology", msg["instance"])
            return
        self._step.topology = msg
        self._why(f"topology of epoch {msg['epoch']} queued")

    def _on_hb(self, now: float, msg: Msg) -> None:
        self._check_instance(now, "hb", msg["instance"])

    def _on_reset(self, now: float, msg: Msg) -> None:
        if self.registered:
            self._why(f"coordinator {msg['instance']} asks for a re-introduction: {msg['reason']}", logging.INFO)
            self._hello(now, force=False, why="asked to")
        else:
            self._why(f"reset ignored: not registered ({self.state.value})")

    def _on_ping(self, now: float, msg: Msg) -> None:
        self._send({"type": "pong", "nonce": msg["nonce"]})

    def _on_bw_probe(self, now: float, msg: Msg) -> None:
        if self.state is not _S.ACCEPTED:
            self._why(f"bw_probe of round {msg['round']} ignored ({self.state.value})")
            return
        self._step.probe = msg
        self._why(f"bw_probe of round {msg['round']}: {len(msg['targets'])} target(s), {msg['bytes']} bytes")

    def probe_done(self, msg: Msg, rows: list[list]) -> Actions:
        """The probes of ``msg`` (a bw_probe) ran: report ``rows`` ([dst, bytes_per_s, seconds]
        of each target reached)."""
        self._begin()
        if self.state is _S.ACCEPTED:
            self._send({"type": "bw_report", "round": msg["round"], "epoch": msg["epoch"], "rows": rows})
            self._why(f"bw_report of round {msg['round']}: {len(rows)} of {len(msg['targets'])} measured")
        else:
            self._why(f"bw_report of round {msg['round']} not sent ({self.state.value})")
        return self._step

    def _on_pending_a(self, now: float, msg: Msg) -> None:
        sent = self.requests.get(msg["req"])
        if sent is None or sent["type"] != "pending_q":
            self._why(f"pending_a for request {msg['req']} ignored: no such question in flight")
            return
        del self.requests[msg["req"]]
        self._step.settle.append((msg["req"], msg["pending"]))

    def _on_error(self, now: float, msg: Msg) -> None:
        exc = from_wire({"error": msg["error"], "message": msg["message"]})
        if msg["req"] == 0:  # about the registration
            self._step.fail.append((JOIN, exc))
            if self.state is _S.PENDING:
                self._set_state(_S.IDLE)
            self._why(f"registration failed: {exc}", logging.INFO)
            return
        if msg["req"] not in self.requests:
            self._why(f"error for request {msg['req']} ignored: not in flight ({exc})")
            return
        self.forget(msg["req"])
        self._step.fail.append((msg["req"], exc))
        self._why(f"request {msg['req']} failed: {exc}")

    def _on_abort(self, now: float, msg: Msg) -> None:
        exc = from_wire({"error": msg["error"], "message": msg["message"]})
        self._step.abort = exc
        self._why(f"coordinator aborts: {exc}", logging.WARNING)

    def _on_removed(self, now: float, msg: Msg) -> None:
        if msg["peer_id"] != self.peer_id:  # about an identity this peer no longer uses
            self._why(f"removal of {msg['peer_id']} ignored (this peer is now {self.peer_id})")
            return
        self._step.settle.append((LEAVE, None))
        if self.state not in REGISTERED:
            self._why(f"removal ignored: already {self.state.value}")
            return
        self._set_state(_S.REMOVED)
        self.removed_reason = msg["reason"]
        self._fail_all(PeerLost(msg["reason"]), sync=True)
        self._step.removed = msg["reason"]
        self._why(msg["reason"], logging.WARNING)

    def _on_sync_plan(self, now: float, msg: Msg) -> None:
        # a peer in sync waits for sync_complete with nothing else to send: its offer stays,
        # to be sent again after a re-welcome (the coordinator answers a repeated offer of a
        # completed round at once, and ignores one of a round that still runs); a fetcher's
        # fetch report takes that place, and an error ends the sync
        if msg["status"] != "in_sync":
            self.sync_offer = None
        self._step.sync.append(msg)

    def _on_sync_complete(self, now: float, msg: Msg) -> None:
        self.sync_offer = self.sync_report = None
        self._step.sync.append(msg)

    def _on_refused(self, now: float, msg: Msg) -> None:
        text = f"the coordinator refused this peer: {msg['reason']}"
        self._step.fail.append((JOIN, InvalidUsage(text)))
        if self.state is _S.PENDING:
            self._set_state(_S.IDLE)
        self._why(text, logging.ERROR)

    # ------------------------------------------------------------------ topologies

    def adopt(self, msg: Msg) -> Actions:
        """A queued topology is next: take it (``apply``: hand it to on_topology first), then
        call :meth:`applied`. One without this peer was queued for an identity this daemon no
        longer has (it was removed and rejoined as a new member meanwhile): it is ignored."""
        self._begin()
        self._adopting = None
        if not self.registered:
            self._why(f"topology of epoch {msg['epoch']} ignored: not registered ({self.state.value})")
            return self._step
        if all(row[0] != self.peer_id for row in msg["peers"]):
            self._why(f"topology of epoch {msg['epoch']} ignored: it does not include this peer "
                      f"{self.peer_id} (it was meant for an earlier membership of this daemon)", logging.INFO)
            return self._step
        topo = topology_from(msg, self.peer_id)
        current = self.topology
        if current is not None and topo.epoch < current.epoch:
            self._why(f"ignoring topology of older epoch {topo.epoch} (have {current.epoch})", logging.WARNING)
            return self._step
        changed = current is None or topo != current or self.state is not _S.ACCEPTED
        self._set_state(_S.ACCEPTED)
        self.topology = topo
        self._adopting = msg
        if changed:
            self._step.apply = topo
            self._why(f"epoch {topo.epoch}: rank {topo.rank} of {topo.group_world_size}, world {topo.world_size}")
        else:
            self._why(f"topology of epoch {topo.epoch} unchanged")
        return self._step

    def applied(self) -> Actions:
        """on_topology returned: admission completes, and so does the vote the topology answers
        (and any older vote still in flight: the coordinator keeps one vote per peer, the last)."""
        self._begin()
        msg, self._adopting = self._adopting, None
        if msg is None:
            return self._step
        self._step.settle.append((JOIN, self.topology))
        if msg["req"]:
            votes = [req for req, sent in self.requests.items() if sent["type"] in _VOTES and req <= msg["req"]]
            for req in votes:
                optimize = self.requests[req]["type"] == "optimize"
                self.forget(req)
                self._step.settle.append((req, (self.topology, msg["reason"]) if optimize else self.topology))
            self._why(f"update_topology round done (vote {msg['req']}; completes {votes or 'none in flight'})")
        return self._step

    def apply_failed(self, msg: Msg, exc: BaseException) -> Actions:
        """adopt() or on_topology raised: every wait fails (the channel itself lives on)."""
        self._begin()
        self._adopting = None
        self._fail_all(Aborted(f"applying the topology of epoch {msg.get('epoch')} failed: {exc}"))
        self._why(f"applying topology epoch {msg.get('epoch')} failed: {exc}", logging.ERROR)
        return self._step

    # ------------------------------------------------------------------ internals

    def _set_state(self, new: ChannelState) -> None:
        if new not in _ALLOWED[self.state]:
            raise InternalError(f"control channel of {self.peer_id}: illegal transition "
                                f"{self.state.value} -> {new.value}")
        self.state = new

    def _check_instance(self, now: float, what: str, instance: str) -> None:
        if not self.registered:
            self._why(f"{what} ignored: not registered ({self.state.value})")
        elif instance != self.instance:
            self._hello(now, force=False,
                        why=f"{what} from coordinator instance {instance!r}, welcomed by {self.instance!r}")

    def _hello(self, now: float, *, force: bool, why: str) -> None:
        if not force and now - self.last_hello < HELLO_SPACING:
            self._why(f"{why}: hello held back (one went out {now - self.last_hello:.2f} s ago)")
            return
        self.last_hello = now
        self._reintroduced = True
        topo = self.topology
        member = self.state in (_S.ACCEPTED, _S.RECOVERING) and topo is not None
        self._send({
            "type": "hello", "peer_id": self.peer_id, "group": self.group,
            "host": self.data_addr[0], "port": self.data_addr[1],
            # what a restarted coordinator rebuilds its table from
            "claim": "accepted" if member else "new",
            "epoch": topo.epoch if topo is not None else 0,
            "ring_pos": topo.rank if member else -1,
            "world": topo.world_size if member else 0,
            "revision": self.revision,
            "instance": self.instance,
            "timeout": self._join_timeout if self.state is _S.PENDING else 0.0,  # a pending peer's patience
        })
        self._why(f"{why}: hello as {'member' if member else 'new'}")

    def _request(self, msg: Msg) -> int:
        self._retx = None  # something new waits: its resends start from the first gap
        self._next_req += 1
        msg["req"] = self._next_req
        self.requests[self._next_req] = msg
        self._send(msg)
        return self._next_req

    def _resend_sync(self, now: float) -> None:
        for kept, what in ((self.sync_offer, "sync offer"), (self.sync_report, "fetch report")):
            if kept is not None and now < kept[1]:
                self._send(kept[0])
                self._why(f"resent the {what}")

    def _resend_unanswered(self, now: float) -> None:
        """Heartbeat period: what waits for an answer goes again at growing gaps (RESEND_FIRST)."""
        waiting = bool(self.requests) or any(k is not None and now < k[1] for k in (self.sync_offer, self.sync_report))
        if not waiting:
            self._retx = None
            return
        if self.state is not _S.ACCEPTED or self.reintro is not None:
            return  # a re-introduction resends it all when it is welcomed
        if self._retx is None:
            self._retx = (now + RESEND_FIRST, RESEND_FIRST)
            return
        due, gap = self._retx
        if now < due:
            return
        if self.requests:
            self._resend(now, f"no answer for {gap:g} s", logging.DEBUG)
        self._resend_sync(now)
        gap = min(2 * gap, RESEND_MAX)
        self._retx = (now + gap, gap)

    def _resend(self, now: float, why: str, level: int = logging.INFO) -> None:
        """Send the requests in flight again; a vote with the time its caller has left."""
        sent = []
        for req, msg in self.requests.items():
            until = self._until.get(req)
            if until is not None:
                if until <= now:  # its caller gives up now: no vote behind its back
                    continue
                msg = {**msg, "timeout": until - now}
            self._send(msg)
            sent.append(req)
        if sent:
            self._why(f"{why}: resent requests {sent}", level)
        else:
            self._why(f"{why}: no request to resend")

    def _fail_all(self, exc: PcclError, *, sync: bool = False) -> None:
        for req in self.requests:
            self._step.fail.append((req, exc))
        self.requests.clear()
        self._until.clear()
        self._step.fail.append((JOIN, exc))
        if sync:
            self._step.sync.append(exc)

    def _begin(self) -> None:
        self._step = Actions()

    def _send(self, msg: Msg) -> None:
        self._step.out.append(msg)

    def _why(self, text: str, level: int = logging.DEBUG) -> None:
        step = self._step
        step.reason = f"{step.reason}; {text}" if step.reason else text
        step.level = max(step.level, level)

