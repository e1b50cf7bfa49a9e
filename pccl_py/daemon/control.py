"""The daemon's side of the control plane: :class:`ControlChannel` (zmq DEALER on asyncio).

The link registers the daemon with the coordinator, keeps heartbeats flowing both
ways, applies every new topology (awaiting ``on_topology``) before the calls that
wait on it return, and survives coordinator restarts: when the coordinator goes
silent it keeps re-introducing itself (paced by one :class:`Backoff`), and when a
new coordinator instance answers it re-introduces itself with its peer_id, group,
epoch, ring position and shared-state revision, then resends requests in flight.
Every call has a deadline; a call made while the coordinator is away either
succeeds after it returns or raises :class:`CoordinatorUnavailable`.

Sockets are plain (synchronous) zmq sockets pumped by the event loop's reader
callback (:class:`~pccl_py.transport.zmq_io.ZmqPump`), which works the same on asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

import zmq

from pccl_py.daemon.topology import PeerInfo, Topology
from pccl_py.errors import (
    Aborted,
    CoordinatorUnavailable,
    DeadlineExceeded,
    InvalidUsage,
    PcclError,
    PeerLost,
    ProtocolError,
    from_wire,
)
from pccl_py.retry import Backoff
from pccl_py.transport.zmq_io import ZmqPump, zmq_endpoint
from pccl_py.wire import control as protocol

log = logging.getLogger("pccl.control")

# pace of re-introductions while the coordinator is silent: until one answers
REINTRODUCE_BACKOFF = Backoff(initial=0.1, maximum=1.0, factor=2.0, jitter=0.2, deadline=float("inf"))


def _topology_from(msg: dict, peer_id: str) -> Topology:
    peers = tuple(PeerInfo(pid, host, port) for pid, host, port in msg["peers"])
    ids = [p.peer_id for p in peers]
    if peer_id not in ids:
        raise ProtocolError(f"topology of epoch {msg['epoch']} does not include this peer {peer_id}")
    return Topology(
        epoch=msg["epoch"],
        group=msg["group"],
        rank=ids.index(peer_id),
        peers=peers,
        world_size=msg["world_size"],
        num_groups=msg["num_groups"],
    )


class ControlChannel:
    """A daemon's membership session with the coordinator (see the module docstring)."""

    def __init__(
        self,
        coordinator: str,
        *,
        group: int,
        data_addr: tuple[str, int],
        secret: bytes = b"",
        peer_id: str | None = None,
        heartbeat_interval: float = 0.5,
        coordinator_timeout: float = 3.0,
        on_topology: Callable[[Topology], Awaitable[None]] | None = None,
        on_abort: Callable[[PcclError], None] | None = None,
        on_removed: Callable[[str], None] | None = None,
        on_peer_id: Callable[[str], None] | None = None,
        backoff: Backoff = REINTRODUCE_BACKOFF,
    ) -> None:
        self.coordinator = coordinator
        self.endpoint = zmq_endpoint(coordinator)
        self.group = group
        self.data_addr = data_addr
        self.secret = secret
        self.peer_id = peer_id or f"peer-{secrets.token_hex(6)}"
        self._base_id = self.peer_id
        self.heartbeat_interval = heartbeat_interval
        self.coordinator_timeout = coordinator_timeout
        self.on_topology = on_topology
        self.on_abort = on_abort
        self.on_removed = on_removed
        self.on_peer_id = on_peer_id  # called when connect() after a removal takes a new peer_id
        self.backoff = backoff
        self.topology: Topology | None = None
        self.state = "idle"  # idle | pending | recovering | accepted | removed | left | closed
        self.revision = -1  # shared-state revision, reported to the coordinator
        self.instance = ""  # coordinator instance that welcomed us last
        # what this peer is doing (e.g. "all_reduce tag=5"), asked at each heartbeat
        self.activity_source: Callable[[], str | None] = lambda: None
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._pump: ZmqPump | None = None
        self._tasks: list[asyncio.Task] = []
        self._topo_q: asyncio.Queue[dict] = asyncio.Queue()
        self._requests: dict[int, tuple[dict, asyncio.Future]] = {}
        self._join: asyncio.Future[Topology] | None = None
        self._join_timeout = 0.0
        self._req = 0
        self._last_rx = 0.0  # loop time of the last message from the coordinator (0: never)
        self._lost = False
        self._coord_hb = heartbeat_interval  # the coordinator's heartbeat period (from welcome)
        self._hello_delays = self.backoff.delays()
        self._hello_due = 0.0
        self._last_hello = -1e9
        self._left: asyncio.Future | None = None
        self._removed_reason = ""
        # shared-state sync: plans and completions for daemon_sync (or an error to raise)
        self._sync_q: asyncio.Queue[dict | PcclError] = asyncio.Queue()
        self._sync_offer: tuple[dict, float] | None = None  # offer in flight (until its plan), deadline

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the socket and start heartbeats; does not register (see :meth:`connect`)."""
        if self._sock is not None:
            return
        self._ctx = zmq.Context.instance()
        self._open_socket()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._heartbeat_loop(), name=f"pccl-control-hb-{self.peer_id}"),
            loop.create_task(self._apply_loop(), name=f"pccl-control-topo-{self.peer_id}"),
        ]

    def _open_socket(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        rid = f"{self.peer_id[:100]}#{secrets.token_hex(4)}".encode()
        sock.setsockopt(zmq.ROUTING_ID, rid)
        sock.setsockopt(zmq.LINGER, 200)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)  # a restarted coordinator is found within 0.5 s
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.coordinator_timeout * 1000))
        sock.connect(self.endpoint)
        self._sock = sock
        self._pump = ZmqPump(sock, self._on_frames)

    async def close(self) -> None:
        """Stop heartbeats and close the socket (no leave is announced: see :meth:`leave`)."""
        if self.state == "closed":
            return
        self._fail_all(Aborted("the control link was closed"))
        self._sync_q.put_nowait(Aborted("the control link was closed"))
        self.state = "closed"
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._pump is not None:
            self._pump.close()
        if self._sock is not None:
            self._sock.close(linger=200)
            self._sock = None

    # ------------------------------------------------------------------ calls

    async def connect(self, timeout: float) -> Topology:
        """Register and wait until the accepted peers admit this peer; returns its topology."""
        self._require_started()
        if self.state == "accepted" and self.topology is not None:
            return self.topology
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.state == "recovering":  # a member while the coordinator rebuilds: wait for it
            if self._join is None or self._join.done():
                self._join = loop.create_future()
            return await self._wait(self._join, deadline, "connect")
        if self.state in ("removed", "left"):  # a removed peer_id never comes back: take a new one
            old = self.peer_id
            self.peer_id = f"{self._base_id}~{secrets.token_hex(3)}"
            self.topology = None
            self.instance = ""
            log.info("%s: connecting again as a new member %s", old, self.peer_id)
            if self.on_peer_id is not None:
                self.on_peer_id(self.peer_id)
        if self._join is None or self._join.done():
            self._join = loop.create_future()
        self.state = "pending"
        self._join_timeout = timeout
        self._send_hello(force=True)
        try:
            return await self._wait(self._join, deadline, "connect")
        except (DeadlineExceeded, CoordinatorUnavailable):
            self._send("leave", reason="connect() gave up waiting")
            self.state = "idle"
            raise
        except PcclError:
            if self.state == "pending":
                self.state = "idle"
            raise

    async def update_topology(self, timeout: float) -> Topology:
        """Vote to admit pending peers; returns once every accepted peer has voted."""
        self._require_member("update_topology")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.state == "pending":  # rejoined as pending after a coordinator restart
            if self._join is None or self._join.done():
                self._join = loop.create_future()
            return await self._wait(self._join, deadline, "update_topology")
        # accepted, or recovering (the new coordinator keeps votes made in its recovery window)
        fut = self._request("vote", timeout=max(0.0, timeout))
        try:
            return await self._wait(fut, deadline + 0.25, "update_topology")
        except (DeadlineExceeded, CoordinatorUnavailable):
            self._send("unvote", req=fut.req)  # type: ignore[attr-defined]
            raise

    async def are_peers_pending(self, timeout: float) -> bool:
        self._require_member("are_peers_pending")
        deadline = asyncio.get_running_loop().time() + timeout
        fut = self._request("pending_q")
        return await self._wait(fut, deadline, "are_peers_pending")

    async def report_peer_failure(self, peer_id: str, reason: str, epoch: int) -> None:
        """Tell the coordinator our data link to ``peer_id`` (of ``epoch``) broke. It probes
        that peer: a silent one is removed, a live one gets fresh links in a new epoch."""
        if self.state in ("accepted", "recovering", "pending"):
            self._send("report_failure", peer_id=peer_id[:128], reason=reason[:1024], epoch=epoch)

    def set_activity(self, activity: str | None) -> None:
        """Report a fixed activity from now on (a daemon sets ``activity_source`` instead)."""
        self.activity_source = lambda: activity

    def sync_channel(self) -> SyncChannel:
        """The :class:`~pccl_py.daemon.state_sync.SyncChannel` ``daemon_sync`` talks through."""
        return SyncChannel(self)

    def set_revision(self, revision: int) -> None:
        """Shared-state revision reported with heartbeats and re-introductions."""
        self.revision = revision

    async def leave(self) -> None:
        """Announce a graceful leave; the survivors get a new epoch at once."""
        if self.state not in ("pending", "recovering", "accepted") or self._sock is None:
            return
        loop = asyncio.get_running_loop()
        self._left = loop.create_future()
        self._send("leave", reason="graceful leave")
        self.state = "left"
        self._fail_all(Aborted("this peer left the run"))
        self._sync_q.put_nowait(Aborted("this peer left the run"))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._left), 1.0)

    # ------------------------------------------------------------------ internals

    def _require_started(self) -> None:
        if self._sock is None:
            raise InvalidUsage("the control link is not started (call start() first) or is closed")

    def _require_member(self, what: str) -> None:
        self._require_started()
        if self.state == "removed":
            raise PeerLost(self._removed_text())
        if self.state not in ("accepted", "pending", "recovering") or self.topology is None:
            raise InvalidUsage(f"{what} before connect() returned: call connect() first")

    def _removed_text(self) -> str:
        return self._removed_reason or (
            f"peer {self.peer_id} was removed from the run; connect again as a new member"
        )

    def _request(self, mtype: str, **fields) -> asyncio.Future:
        self._req += 1
        msg = {"type": mtype, "req": self._req, **fields}
        fut = asyncio.get_running_loop().create_future()
        fut.req = self._req  # type: ignore[attr-defined]
        self._requests[self._req] = (msg, fut)
        fut.add_done_callback(lambda f, r=self._req: self._requests.pop(r, None))
        self._send_msg(msg)
        return fut

    async def _wait(self, fut: asyncio.Future, deadline: float, what: str):
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            fut.cancel()
            silent = loop.time() - self._last_rx
            if self._last_rx == 0.0 or self._lost or silent > 2.5 * self._coord_hb:
                raise CoordinatorUnavailable(
                    f"{what}: no answer from the coordinator at {self.coordinator} before the "
                    f"deadline; is it running, and is the address right?"
                ) from None
            if what == "connect":
                raise DeadlineExceeded(
                    "connect: not admitted before the deadline: the accepted peers did not call "
                    "update_topology in time; call connect() again"
                ) from None
            raise DeadlineExceeded(f"{what}: the coordinator did not answer before the deadline") from None

    def _send(self, mtype: str, **fields) -> None:
        self._send_msg({"type": mtype, **fields})

    def _send_msg(self, msg: dict) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send(protocol.encode_msg(msg), zmq.NOBLOCK)
        except zmq.Again:
            log.debug("%s: control queue full, %s dropped", self.peer_id, msg["type"])
        except zmq.ZMQError as exc:
            log.debug("%s: send failed: %s", self.peer_id, exc)
        if self._pump is not None:
            self._pump.kick()

    def _send_hello(self, *, force: bool = False) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not force and now - self._last_hello < 0.2:
            return
        self._last_hello = now
        topo = self.topology
        was_member = self.state in ("accepted", "recovering") and topo is not None
        ts = time.time()
        self._send(
            "hello",
            peer_id=self.peer_id,
            group=self.group,
            host=self.data_addr[0],
            port=self.data_addr[1],
            ts=ts,
            proof=protocol.hello_proof(self.secret, self.peer_id, ts),
            claim="accepted" if was_member else "new",
            epoch=topo.epoch if topo is not None else 0,
            ring_pos=topo.rank if was_member else -1,
            revision=self.revision,
            instance=self.instance,
            timeout=self._join_timeout if self.state == "pending" else 0.0,
        )

    def _registered(self) -> bool:
        return self.state in ("pending", "recovering", "accepted")

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if not self._registered():
                continue
            now = loop.time()
            epoch = self.topology.epoch if self.topology is not None else 0
            activity = self.activity_source()
            self._send("heartbeat", activity=activity and activity[:256], epoch=epoch, revision=self.revision)
            silent_since = self._last_rx if self._last_rx else self._last_hello
            if now - silent_since > self.coordinator_timeout:
                if not self._lost:
                    self._lost = True
                    self._hello_delays = self.backoff.delays()
                    self._hello_due = now
                    log.warning(
                        "%s: no message from the coordinator for %.1f s; re-introducing until it answers",
                        self.peer_id, now - silent_since,
                    )
                if now >= self._hello_due:
                    self._send_hello(force=True)
                    self._hello_due = now + next(self._hello_delays, self.backoff.maximum)

    async def _apply_loop(self) -> None:
        while True:
            msg = await self._topo_q.get()
            try:
                await self._apply(msg)
            except Exception as exc:  # keep the link alive; the waiters learn why
                log.exception("%s: applying topology epoch %s failed", self.peer_id, msg.get("epoch"))
                self._fail_all(Aborted(f"applying the topology of epoch {msg.get('epoch')} failed: {exc}"))

    async def _apply(self, msg: dict) -> None:
        if not self._registered():
            return
        topo = _topology_from(msg, self.peer_id)
        current = self.topology
        if current is not None and topo.epoch < current.epoch:
            log.warning("%s: ignoring topology of older epoch %d (have %d)", self.peer_id, topo.epoch, current.epoch)
            return
        changed = current is None or topo != current or self.state != "accepted"
        self.state = "accepted"
        self.topology = topo
        if changed and self.on_topology is not None:
            await self.on_topology(topo)
        if self._join is not None and not self._join.done():
            self._join.set_result(topo)
        if msg["round_done"]:
            for _req, (req_msg, fut) in list(self._requests.items()):
                if req_msg["type"] == "vote" and not fut.done():
                    fut.set_result(self.topology)

    def _fail_all(self, exc: PcclError) -> None:
        for _req, (_msg, fut) in list(self._requests.items()):
            if not fut.done():
                fut.set_exception(exc)
        if self._join is not None and not self._join.done():
            self._join.set_exception(exc)
        for _req, (_msg, fut) in list(self._requests.items()):
            if fut.done() and not fut.cancelled():
                fut.exception()  # mark retrieved
        if self._join is not None and self._join.done() and not self._join.cancelled():
            self._join.exception()

    def _on_frames(self, frames: list) -> None:
        if len(frames) != 1:
            log.warning("%s: dropped a control message of %d frames", self.peer_id, len(frames))
            return
        try:
            msg = protocol.decode(frames[0].buffer)
        except ProtocolError as exc:
            log.warning("%s: dropped a malformed control message: %s", self.peer_id, exc)
            return
        loop = asyncio.get_running_loop()
        self._last_rx = loop.time()
        if self._lost:
            self._lost = False
            log.info("%s: the coordinator answers again", self.peer_id)
        handler = getattr(self, f"_on_{msg['type']}", None)
        if handler is None:
            log.warning("%s: unexpected %s from the coordinator dropped", self.peer_id, msg["type"])
            return
        handler(msg)

    def _check_instance(self, instance: str) -> None:
        if self._registered() and instance != self.instance:
            self._send_hello()

    def _on_welcome(self, msg: dict) -> None:
        if not self._registered() or msg["peer_id"] != self.peer_id:
            return
        new_instance = msg["instance"] != self.instance
        if new_instance and self.instance:
            log.info("%s: new coordinator instance %s (was %s), state %s",
                     self.peer_id, msg["instance"], self.instance, msg["state"])
        self.instance = msg["instance"]
        self._coord_hb = msg["heartbeat_interval"]
        if msg["state"] == "recovering":
            self.state = "recovering"
        elif msg["state"] == "pending":
            if self.state in ("accepted", "recovering"):
                text = (
                    "the coordinator restarted and this peer re-introduced itself after its recovery "
                    "window: it rejoins as pending and is admitted at the next update_topology"
                )
                log.warning("%s: %s", self.peer_id, text)
                if self.on_abort is not None:
                    self.on_abort(Aborted(text))
                for _req, (req_msg, fut) in list(self._requests.items()):
                    if req_msg["type"] == "vote" and not fut.done():
                        fut.set_exception(Aborted(text))
                        fut.exception()
            self.state = "pending"
        if new_instance:  # the new coordinator never saw our requests in flight
            for _req, (req_msg, fut) in list(self._requests.items()):
                if not fut.done():
                    self._send_msg(req_msg)
            offer = self._sync_offer  # nor the sync offer waiting for its plan (if still wanted)
            if offer is not None and asyncio.get_running_loop().time() < offer[1]:
                self._send_msg(offer[0])

    def _on_topology(self, msg: dict) -> None:
        if msg["instance"] != self.instance:  # not (yet) welcomed by this instance
            self._check_instance(msg["instance"])
            return
        self._topo_q.put_nowait(msg)

    def _on_hb(self, msg: dict) -> None:
        self._check_instance(msg["instance"])

    def _on_reset(self, msg: dict) -> None:
        if self._registered():
            log.info("%s: coordinator %s asks for a re-introduction: %s", self.peer_id, msg["instance"], msg["reason"])
            self._send_hello()

    def _on_ping(self, msg: dict) -> None:
        self._send("pong", nonce=msg["nonce"])

    def _on_pending_a(self, msg: dict) -> None:
        entry = self._requests.get(msg["req"])
        if entry is not None and not entry[1].done():
            entry[1].set_result(msg["pending"])

    def _on_error(self, msg: dict) -> None:
        exc = from_wire({"error": msg["error"], "message": msg["message"]})
        if msg["req"] == 0:  # about our registration
            if self._join is not None and not self._join.done():
                self._join.set_exception(exc)
            if self.state == "pending":
                self.state = "idle"
            return
        entry = self._requests.get(msg["req"])
        if entry is not None and not entry[1].done():
            entry[1].set_exception(exc)

    def _on_abort(self, msg: dict) -> None:
        exc = from_wire({"error": msg["error"], "message": msg["message"]})
        log.warning("%s: coordinator aborts: %s", self.peer_id, exc)
        if self.on_abort is not None:
            self.on_abort(exc)

    def _on_removed(self, msg: dict) -> None:
        if msg["peer_id"] != self.peer_id:  # about an identity this link no longer uses
            return
        if self._left is not None and not self._left.done():
            self._left.set_result(None)
        if self.state in ("removed", "left", "closed", "idle"):
            return
        self.state = "removed"
        self._removed_reason = msg["reason"]
        log.warning("%s: %s", self.peer_id, msg["reason"])
        self._fail_all(PeerLost(msg["reason"]))
        self._sync_q.put_nowait(PeerLost(msg["reason"]))
        if self.on_removed is not None:
            self.on_removed(msg["reason"])

    def _on_sync_plan(self, msg: dict) -> None:
        self._sync_offer = None
        self._sync_q.put_nowait(msg)

    def _on_sync_complete(self, msg: dict) -> None:
        self._sync_q.put_nowait(msg)

    def _on_refused(self, msg: dict) -> None:
        text = f"the coordinator refused this peer: {msg['reason']}"
        log.error("%s: %s", self.peer_id, text)
        if self._join is not None and not self._join.done():
            self._join.set_exception(InvalidUsage(text))
        if self.state == "pending":
            self.state = "idle"


class SyncChannel:
    """``send``/``recv`` of one daemon's shared-state sync over its :class:`ControlChannel`.

    ``send`` transmits ``sync_offer`` / ``sync_done``; a ``sync_offer`` starts a sync, so it
    first drops whatever an earlier, abandoned sync left queued. ``recv`` returns the next
    ``sync_plan`` / ``sync_complete`` the coordinator sent this peer, and raises
    ``PeerLost`` / ``Aborted`` when the peer is removed, leaves or the link closes.
    """

    def __init__(self, link: ControlChannel) -> None:
        self.link = link

    async def send(self, msg: dict) -> None:
        link = self.link
        if link.state == "removed":
            raise PeerLost(link._removed_text())
        if link._sock is None or not link._registered():
            raise CoordinatorUnavailable(
                f"not connected to the coordinator at {link.coordinator} (state {link.state}): "
                "call connect() first"
            )
        size = len(protocol.encode_msg(msg))
        if size > protocol.MAX_MESSAGE:
            raise InvalidUsage(
                f"{msg['type']} of {size} bytes exceeds the control frame limit of {protocol.MAX_MESSAGE} "
                "bytes: use fewer or shorter-named shared-state tensors"
            )
        if msg["type"] == "sync_offer":
            while not link._sync_q.empty():
                link._sync_q.get_nowait()
            timeout = msg["timeout"] if msg["timeout"] > 0 else 600.0
            link._sync_offer = (msg, asyncio.get_running_loop().time() + timeout)
        link._send_msg(msg)

    async def recv(self) -> dict:
        item = await self.link._sync_q.get()
        if isinstance(item, PcclError):
            raise item
        return item
