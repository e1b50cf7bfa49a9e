"""The daemon's side of the control plane: :class:`ControlChannel` (zmq DEALER on asyncio).

The channel registers the daemon with the coordinator, keeps heartbeats flowing both
ways, applies every new topology (awaiting ``on_topology``) before the calls that
wait on it return, and survives coordinator restarts: when the coordinator goes
silent it keeps re-introducing itself (paced by one :class:`Backoff`), and when a
new coordinator instance answers it re-introduces itself with its peer_id, group,
epoch, ring position and shared-state revision, then resends requests in flight.
Every call has a deadline; a call made while the coordinator is away either
succeeds after it returns or raises :class:`CoordinatorUnavailable`.

The socket is a CURVE client with the member key pair derived from the run secret, and
completes a handshake only with a coordinator that holds the coordinator's secret key: a
process on the coordinator's address without the run secret can neither read nor send
anything this daemon would act on. A failed handshake is reported by the socket's monitor.

Every one of those decisions is taken by :class:`~pccl_py.daemon.control_core.ControlCore`
(sans I/O); this module is its shell: the socket (and its monitor, which reports a closed
connection, requests in flight may have been lost with it, and each handshake's outcome to
the core), the heartbeat and apply tasks, the futures the calls wait on, and the daemon's
callbacks.

Sockets are plain (synchronous) zmq sockets pumped by the event loop's reader
callback (:class:`~pccl_py.transport.zmq_io.ZmqPump`), which works the same on asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from pccl_py.daemon.control_core import (
    JOIN,
    REINTRODUCE_BACKOFF,
    Actions,
    ChannelState,
    ControlCore,
)
from pccl_py.daemon.topology import Topology
from pccl_py.errors import (
    CoordinatorUnavailable,
    DeadlineExceeded,
    InvalidUsage,
    PcclError,
    ProtocolError,
)
from pccl_py.retry import Backoff
from pccl_py.transport.zmq_io import (
    HANDSHAKE_EVENTS,
    HANDSHAKE_FAILED,
    ZmqPump,
    client_handshake_failure,
    close_monitored,
    curve_client,
    zmq_endpoint,
)
from pccl_py.wire import control as protocol

log = logging.getLogger("pccl.control")


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
        self.heartbeat_interval = heartbeat_interval
        self.coordinator_timeout = coordinator_timeout
        self.on_topology = on_topology
        self.on_abort = on_abort
        self.on_removed = on_removed
        self.on_peer_id = on_peer_id  # called when connect() after a removal takes a new peer_id
        self.secret = secret  # the CURVE keys of the socket derive from it
        self.core = ControlCore(
            peer_id or f"peer-{secrets.token_hex(6)}",
            group=group,
            data_addr=data_addr,
            coordinator=coordinator,
            heartbeat_interval=heartbeat_interval,
            coordinator_timeout=coordinator_timeout,
            backoff=backoff,
        )
        # what this peer is doing (e.g. "all_reduce tag=5"), asked at each heartbeat
        self.activity_source: Callable[[], str | None] = lambda: None
        self.traffic_source: Callable[[], tuple[int, int]] = lambda: (0, 0)  # data-plane bytes so far
        self.calls_source: Callable[[], list[int]] = lambda: []  # automatic tags in flight
        self.on_newer_topology: Callable[[int], None] | None = None  # a topology of that epoch was queued
        self.progress_source: Callable[[], tuple[int, list[int]]] = lambda: (0, [])  # AutoTags.progress
        # measures the data link to a peer: (target, bytes, timeout) -> (bytes_per_s, seconds)
        # (DataPlane.probe); None: bw_probe requests are answered with no rates
        self.on_probe: Callable[[str, int, float], Awaitable[tuple[float, float]]] | None = None
        self._probing: set[asyncio.Task] = set()
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._pump: ZmqPump | None = None
        self._mon: zmq.Socket | None = None  # the socket's monitor: closed connections, handshakes
        self._mon_pump: ZmqPump | None = None
        self._redial: asyncio.TimerHandle | None = None  # dialing again after a failed handshake
        self._tasks: list[asyncio.Task] = []
        self._topo_q: asyncio.Queue[dict] = asyncio.Queue()
        self._waits: dict[int, asyncio.Future] = {}  # JOIN, LEAVE or a request id -> its future
        # shared-state sync: plans and completions for daemon_sync (or an error to raise)
        self._sync_q: asyncio.Queue[dict | PcclError] = asyncio.Queue()

    # ------------------------------------------------------------------ the core's view

    @property
    def peer_id(self) -> str:
        return self.core.peer_id

    @property
    def state(self) -> str:
        """idle | pending | recovering | accepted | removed | left | closed"""
        return self.core.state.value

    @property
    def topology(self) -> Topology | None:
        return self.core.topology

    @property
    def revision(self) -> int:
        return self.core.revision

    @property
    def instance(self) -> str:
        return self.core.instance

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
        curve_client(sock, self.secret)
        rid = f"{self.peer_id[:100]}#{secrets.token_hex(4)}".encode()
        sock.setsockopt(zmq.ROUTING_ID, rid)
        sock.setsockopt(zmq.LINGER, 200)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)  # a restarted coordinator is found within 0.5 s
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.coordinator_timeout * 1000))
        self._mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | HANDSHAKE_EVENTS)
        self._mon_pump = ZmqPump(self._mon, self._on_monitor, copy=True)
        sock.connect(self.endpoint)
        self._sock = sock
        self._pump = ZmqPump(sock, self._on_frames)

    async def close(self) -> None:
        """Stop heartbeats and close the socket (no leave is announced: see :meth:`leave`)."""
        if self.core.state is ChannelState.CLOSED:
            return
        self._carry_out(self.core.close())
        for task in [*self._tasks, *self._probing]:
            task.cancel()
        for task in [*self._tasks, *self._probing]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._redial is not None:
            self._redial.cancel()
            self._redial = None
        for pump in (self._pump, self._mon_pump):
            if pump is not None:
                pump.close()
        close_monitored(self._sock, self._mon, 200)
        self._sock = self._mon = None

    # ------------------------------------------------------------------ calls

    async def connect(self, timeout: float) -> Topology:
        """Register and wait until the accepted peers admit this peer; returns its topology."""
        self._require_started()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        d = self.core.connect(loop.time(), timeout)
        if d.wait is None:  # already a member
            self._carry_out(d)
            return self.core.topology
        fut = self._future(d.wait)
        self._carry_out(d)
        try:
            return await self._wait(fut, d.wait, deadline, "connect")
        except PcclError as exc:
            if d.registering:  # (not a member waiting for a restarted coordinator's topology)
                self._carry_out(self.core.connect_failed(exc))
            raise

    async def update_topology(self, timeout: float) -> Topology:
        """Vote to admit pending peers; returns once every accepted peer has voted."""
        self._require_started()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        d = self.core.vote(loop.time(), timeout, progress=self.progress_source())
        fut = self._future(d.wait)
        self._carry_out(d)
        if d.wait == JOIN:  # pending again after a coordinator restart: wait for admission
            return await self._wait(fut, d.wait, deadline, "update_topology")
        try:
            return await self._wait(fut, d.wait, deadline + 0.25, "update_topology")
        except (DeadlineExceeded, CoordinatorUnavailable):
            self._carry_out(self.core.unvote(d.wait))
            raise

    async def optimize_topology(self, timeout: float) -> tuple[Topology, str]:
        """Vote to measure the data links and reorder the ring (every accepted peer must call
        it); returns the topology that answers the vote and the coordinator's reason."""
        self._require_started()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        d = self.core.vote(loop.time(), timeout, kind="optimize", progress=self.progress_source())
        fut = self._future(d.wait)
        self._carry_out(d)
        try:
            return await self._wait(fut, d.wait, deadline + 0.25, "optimize_topology")
        except (DeadlineExceeded, CoordinatorUnavailable):
            self._carry_out(self.core.unvote(d.wait))
            raise

    async def _probe(self, msg: dict) -> None:
        """Run a bw_probe: its targets one after another, then report what was measured."""
        rows = []
        for target in msg["targets"]:
            if self.on_probe is None:
                break
            try:
                rate, seconds = await self.on_probe(target, msg["bytes"], msg["timeout"])
            except PcclError as exc:
                log.info("%s: probe to %s failed: %s", self.peer_id, target[:8], exc)
                continue
            rows.append([target, float(rate), float(seconds)])
        self._carry_out(self.core.probe_done(msg, rows))

    async def are_peers_pending(self, timeout: float) -> bool:
        self._require_started()
        deadline = asyncio.get_running_loop().time() + timeout
        d = self.core.pending_query()
        fut = self._future(d.wait)
        self._carry_out(d)
        return await self._wait(fut, d.wait, deadline, "are_peers_pending")

    async def report_peer_failure(self, peer_id: str, reason: str, epoch: int) -> None:
        """Tell the coordinator our data link to ``peer_id`` (of ``epoch``) broke. It probes
        that peer: a silent one is removed, a live one gets fresh links in a new epoch."""
        self._carry_out(self.core.report_failure(peer_id, reason, epoch))

    def set_activity(self, activity: str | None) -> None:
        """Report a fixed activity from now on (a daemon sets ``activity_source`` instead)."""
        self.activity_source = lambda: activity

    def sync_channel(self) -> _SyncEnd:
        """The :class:`~pccl_py.daemon.state_sync.SyncChannel` ``daemon_sync`` talks through."""
        return _SyncEnd(self)

    async def sync_send(self, msg: dict) -> None:
        """Send a ``sync_offer`` / ``sync_done``. An offer starts a sync, so it first drops
        whatever an earlier, abandoned sync left queued."""
        if self._sock is None:
            raise CoordinatorUnavailable(
                f"not connected to the coordinator at {self.coordinator} (state {self.state}): "
                "call connect() first"
            )
        d = self.core.sync_send(asyncio.get_running_loop().time(), msg)
        if msg["type"] == "sync_offer":
            while not self._sync_q.empty():
                self._sync_q.get_nowait()
        self._carry_out(d)

    async def sync_recv(self) -> dict:
        """The next ``sync_plan`` / ``sync_complete`` the coordinator sent this peer; raises
        ``PeerLost`` / ``Aborted`` when the peer is removed, leaves or the channel closes."""
        item = await self._sync_q.get()
        if isinstance(item, PcclError):
            raise item
        return item

    def set_revision(self, revision: int) -> None:
        """Shared-state revision reported with heartbeats and re-introductions."""
        self.core.revision = revision

    async def leave(self) -> None:
        """Announce a graceful leave; the survivors get a new epoch at once."""
        if self._sock is None:
            return
        d = self.core.leave()
        fut = self._future(d.wait) if d.wait is not None else None
        self._carry_out(d)
        if fut is not None:  # the coordinator's confirmation, briefly: it may be gone
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(fut), 1.0)

    # ------------------------------------------------------------------ internals

    def _require_started(self) -> None:
        if self._sock is None:
            raise InvalidUsage("the control channel is not started (call start() first) or is closed")

    def _future(self, key: int) -> asyncio.Future:
        """The future of wait ``key`` (admission is shared by every call waiting for it)."""
        fut = self._waits.get(key)
        if fut is None or fut.done():
            fut = asyncio.get_running_loop().create_future()
            self._waits[key] = fut
            fut.add_done_callback(lambda f, k=key: self._forget(k, f))
        return fut

    def _forget(self, key: int, fut: asyncio.Future) -> None:
        if self._waits.get(key) is fut:
            del self._waits[key]
        self.core.forget(key)

    async def _wait(self, fut: asyncio.Future, key: int, deadline: float, what: str) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            fut.cancel()
            self.core.forget(key)  # at once: a request given up on is not resent to a new coordinator
            raise self.core.wait_expired(loop.time(), what) from None

    def _carry_out(self, d: Actions, *, exc_info: bool = False) -> None:
        if d.reason:
            log.log(d.level, "%s: %s", self.peer_id, d.reason, exc_info=exc_info)
        if d.renamed is not None and self.on_peer_id is not None:
            self.on_peer_id(d.renamed)
        if d.abort is not None and self.on_abort is not None:
            self.on_abort(d.abort)
        for msg in d.out:
            self._send_msg(msg)
        for key, exc in d.fail:
            fut = self._waits.get(key)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: a caller that gave up never will
        for key, result in d.settle:
            fut = self._waits.get(key)
            if fut is not None and not fut.done():
                fut.set_result(result)
        for item in d.sync:
            self._sync_q.put_nowait(item)
        if d.topology is not None:
            self._topo_q.put_nowait(d.topology)
            if self.on_newer_topology is not None:
                self.on_newer_topology(d.topology["epoch"])  # the one being applied need not wait for its links
        if d.removed is not None and self.on_removed is not None:
            self.on_removed(d.removed)
        if d.redial is not None:
            self._drop_and_redial(d.redial)
        if d.probe is not None:
            task = asyncio.get_running_loop().create_task(self._probe(d.probe), name=f"pccl-probe-{self.peer_id}")
            self._probing.add(task)
            task.add_done_callback(self._probing.discard)

    def _drop_and_redial(self, delay: float) -> None:
        """Drop the connection (and what is queued on it) and dial again after ``delay``: zmq
        itself gives up for good after some failed handshakes (a refusal, a peer without
        CURVE), and a coordinator that can prove the run secret may come back to the address."""
        if self._sock is None or self._redial is not None:
            return
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disconnect(self.endpoint)
        self._redial = asyncio.get_running_loop().call_later(delay, self._dial)

    def _dial(self) -> None:
        self._redial = None
        if self._sock is not None:
            try:
                self._sock.connect(self.endpoint)
            except zmq.ZMQError as exc:  # the heartbeat's silence check re-introduces later
                log.warning("%s: cannot dial the coordinator at %s again: %s", self.peer_id, self.coordinator, exc)

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

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            activity = self.activity_source() if self.core.registered else None
            traffic = self.traffic_source() if self.core.registered else (0, 0)
            calls = self.calls_source() if self.core.registered else []
            self._carry_out(self.core.tick(loop.time(), activity, traffic=traffic, calls=calls))

    async def _apply_loop(self) -> None:
        while True:
            msg = await self._topo_q.get()
            try:
                d = self.core.adopt(msg)
                self._carry_out(d)
                if d.apply is not None and self.on_topology is not None:
                    await self.on_topology(d.apply)
                self._carry_out(self.core.applied())
            except Exception as exc:  # keep the channel alive; the waiters learn why
                self._carry_out(self.core.apply_failed(msg, exc), exc_info=True)

    def _on_monitor(self, frames: list) -> None:
        try:
            event = parse_monitor_message(frames)
        except Exception:  # a monitor frame we do not understand is not worth a crash
            return
        kind, now = event["event"], asyncio.get_running_loop().time()
        if kind == zmq.EVENT_DISCONNECTED:
            self._carry_out(self.core.connection_lost(now))
        elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._carry_out(self.core.handshake_succeeded(now))
        elif kind in HANDSHAKE_FAILED:
            text = client_handshake_failure(kind, event["value"], self.coordinator)
            self._carry_out(self.core.handshake_failed(now, text))

    def _on_frames(self, frames: list) -> None:
        if len(frames) != 1:
            log.warning("%s: dropped a control message of %d frames", self.peer_id, len(frames))
            return
        try:
            msg = protocol.decode(frames[0].buffer)
        except ProtocolError as exc:
            log.warning("%s: dropped a malformed control message: %s", self.peer_id, exc)
            return
        self._carry_out(self.core.on_message(asyncio.get_running_loop().time(), msg))


class _SyncEnd:
    """This daemon's end of its shared-state sync: the
    :class:`~pccl_py.daemon.state_sync.SyncChannel` that ``daemon_sync`` talks through."""

    def __init__(self, channel: ControlChannel) -> None:
        self.send = channel.sync_send
        self.recv = channel.sync_recv
