"""The peer daemon: one per trainer, owning every network connection of that peer.

It joins three things together and adds no protocol of its own:
  * :class:`~pccl_py.daemon.control.ControlChannel` to the coordinator (membership, votes),
  * :class:`~pccl_py.daemon.dataplane.DataPlane` to the other daemons (collectives),
  * the :class:`~pccl_py.daemon.session.TrainerSession` of its trainer's Client, which
    checks each IPC request (:mod:`pccl_py.wire.ipc`) and turns it into a call on
    :class:`Daemon`: connect, vote, all-reduce, all-gather, sync the shared state.

Run it as ``pccl daemon --coordinator HOST:PORT --group G`` or let ``Client(daemon=None)``
spawn a private one that exits with its client.

The trainer's IPC connection is the daemon's lease on its membership
(:mod:`pccl_py.daemon.lease`): when the connection of the trainer that connected the daemon
ends, however it ends, the daemon leaves the run at once, announced, so the survivors get
a new epoch without waiting for a heartbeat deadline; then it exits, or, with
``serve_successive``, opens a new membership under a new identity for the next trainer.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

from pccl_py import calls, logs
from pccl_py.calls import tag_count
from pccl_py.daemon.control import ControlChannel
from pccl_py.daemon.dataplane import DataPlane, DataPlaneConfig
from pccl_py.daemon.lease import Ended, Lease, Mode
from pccl_py.daemon.session import TrainerSession
from pccl_py.daemon.state_sync import daemon_sync
from pccl_py.daemon.state_transfer import StateServer
from pccl_py.daemon.stream_count import AUTO, streams_setting
from pccl_py.daemon.tags import AUTO_TAG, AutoTags
from pccl_py.daemon.topology import Topology
from pccl_py.errors import DeadlineExceeded, Diverged, InvalidUsage, PcclError
from pccl_py.metrics import Metrics
from pccl_py.transport.addresses import advertised_host, is_loopback
from pccl_py.transport.host_settings import slow_start_advice
from pccl_py.transport.zmq_io import parse_addr

log = logging.getLogger("pccl.daemon")

DEPARTURE_GRACE = 0.3  # seconds calls in flight may finish after a peer leaves the topology
def topology_summary(topo: Topology | None, peer_id: str) -> dict:
    if topo is None:
        return {"peer_id": peer_id, "connected": False}
    return {
        "peer_id": peer_id,
        "connected": True,
        "epoch": topo.epoch,
        "group": topo.group,
        "rank": topo.rank,
        "world_size": topo.world_size,
        "group_world_size": topo.group_world_size,
        "num_groups": topo.num_groups,
        "peers": [p.peer_id for p in topo.peers],
    }


class Daemon:
    def __init__(
        self,
        *,
        coordinator: str,
        group: int = 0,
        data_host: str = "127.0.0.1",
        data_port: int = 0,
        ipc_path: str | None = None,
        secret: bytes = b"",
        streams: int | str | None = None,
        max_streams: int | None = None,
        heartbeat_interval: float = 0.5,
        coordinator_timeout: float = 3.0,
        exit_with_client: bool = False,
        serve_successive: bool = False,
        shm: bool = True,
        advertise: str | None = None,
        link_timeout: float | None = None,
        tcp_only: bool = False,
        io_threads: bool | None = None,
        integrity: bool = True,
        encrypt: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics  # None: nothing is counted
        self._links_served = False
        self.lease = Lease(Mode.of(exit_with_client=exit_with_client, serve_successive=serve_successive))
        self.coordinator = coordinator
        self.group = group
        self.data_host = advertised_host(data_host, coordinator, advertise)  # what peers dial
        self._listen_host = data_host
        dp_kwargs = {"secret": secret, "host": data_host, "port": data_port, "advertise": self.data_host}
        try:  # a count fixes every link's streams; None or "auto": chosen per link by measurement
            fixed = streams_setting(streams)
        except ValueError as e:
            raise InvalidUsage(str(e)) from None
        if fixed is not None:
            dp_kwargs["streams"] = fixed
        tuning = {"shm": shm, "same_host_links": not tcp_only, "io_threads": io_threads, "integrity": integrity,
                  "encrypt": encrypt, "adapt_streams": fixed is None}
        if max_streams is not None:
            if not 1 <= max_streams <= 64:
                raise InvalidUsage(f"max_streams must be between 1 and 64, got {max_streams}")
            tuning["max_streams"] = max_streams
        if link_timeout is not None:
            if link_timeout < 0:
                raise InvalidUsage(f"link_timeout must be >= 0 seconds, got {link_timeout}")
            tuning["user_timeout"] = link_timeout
        dp_kwargs["config"] = DataPlaneConfig(**tuning)
        self._dp_kwargs = dp_kwargs
        self.secret = secret
        self._sync_lock = asyncio.Lock()
        self._control_kwargs = {
            "group": group,
            "secret": secret,
            "heartbeat_interval": heartbeat_interval,
            "coordinator_timeout": coordinator_timeout,
        }
        self._new_member()
        self.ipc_path = ipc_path or os.path.join(
            tempfile.gettempdir(), f"pccl-{os.getpid()}-{self.peer_id[:8]}.sock"
        )
        self._server: asyncio.AbstractServer | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self.sessions: set[TrainerSession] = set()  # (each session adds and removes itself)
        self._departure: asyncio.Task | None = None  # leaving the run after the lease ended
        self._stopper: asyncio.Task | None = None

    def _new_member(self) -> None:
        """A data plane and a state server under a new identity, not yet started; the control
        channel comes with :meth:`_start_member`. A daemon that serves successive trainers
        makes one per trainer: a successor joins the run as a new member."""
        self.peer_id = uuid.uuid4().hex
        self.data = DataPlane(self.peer_id, on_peer_failure=self._on_peer_failure, **self._dp_kwargs)
        if self.metrics is not None and not self._links_served:
            self._links_served = True  # the source reads whichever data plane is current
            self.metrics.link_traffic(lambda: self.data.traffic)
        self.state_server = StateServer(self.peer_id, secret=self.secret, host=self._listen_host, port=0,
                                        count=None if self.metrics is None else self.metrics.rejected("state"))
        if self.metrics is not None:  # the data port's strangers, counted like the state port's
            self.data.gate.count = self.metrics.rejected("data")
        self.control: ControlChannel | None = None
        self.topology: Topology | None = None
        self._tags = AutoTags()
        self.data.behind = self._tags.behind  # tells a peer retrying a call we completed
        self.data.router.stale = self._tags.stale  # drops frames of a count a vote round ended
        self._in_flight: dict[int, str] = {}
        self._removed: str | None = None
        self._leaving = False  # the data plane closes and the leave goes out: no topology applies

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        addr = await self._start_member()
        if os.path.exists(self.ipc_path):
            os.unlink(self.ipc_path)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: TrainerSession(self), path=self.ipc_path)
        os.chmod(self.ipc_path, 0o600)  # this user's processes only (a session also checks the peer's uid)
        log.info("daemon %s ready: IPC %s, data %s:%d (advertised as %s)", self.peer_id[:8],
                 self.ipc_path, *addr, self.data_host)

    async def _start_member(self) -> tuple[str, int]:
        addr = await self.data.start()
        await self.state_server.start()
        self.control = ControlChannel(
            self.coordinator,
            data_addr=(self.data_host, addr[1]),
            peer_id=self.peer_id,
            on_topology=self._on_topology,
            on_abort=self._on_abort,
            on_removed=self._on_removed,
            on_peer_id=self._on_peer_id,
            **self._control_kwargs,
        )
        self.control.activity_source = self._describe_activity
        self.control.traffic_source = self._traffic
        self.control.calls_source = self._auto_calls
        self.control.on_newer_topology = self.data.supersede
        self.control.progress_source = self._tags.progress
        self.control.on_probe = self.data.probe  # bw_probe of optimize_topology
        await self.control.start()
        return addr

    async def stop(self, graceful: bool = True) -> None:
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            await self._stop(graceful)
        finally:
            # only now may the process exit: wait_stopped() returning ends the event loop,
            # which would cancel a stop still flushing frames or announcing the leave
            self._stopped.set()

    async def _stop(self, graceful: bool) -> None:
        if self._server is not None:
            self._server.close()
        for s in list(self.sessions):
            s.close()
        if self._departure is not None:  # a departure under way finishes first (it is bounded)
            await asyncio.wait([self._departure])
        if graceful:
            await self._leave_run()
        else:
            await self.data.close()
        if self.control is not None:
            await self.control.close()
        await self.state_server.close()
        try:
            os.unlink(self.ipc_path)
        except FileNotFoundError:
            pass

    async def _leave_run(self) -> None:
        """Close the data plane, then announce the leave: its last frames, FINs included, are
        flushed before the streams end, so peers finish a call this peer completed before
        the new epoch reaches them through the coordinator."""
        self._leaving = True
        self.topology = None  # (calls in flight keep theirs; new ones are told to connect)
        await self.data.close()
        if self.control is not None:
            try:
                await asyncio.wait_for(self.control.leave(), 2.0)
            except Exception as exc:  # leaving is best effort: the coordinator may be gone
                log.info("leave not acknowledged: %s", exc)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # -- the lease: the trainer's IPC connection holds the membership ------------------
    def session_opened(self, session: TrainerSession) -> None:
        self.sessions.add(session)
        self.lease.opened(session)

    def session_closed(self, session: TrainerSession) -> None:
        self.sessions.discard(session)
        if not self._stopping:
            ended = self.lease.end(session, "its trainer's IPC connection closed")
            if ended is not None:
                log.warning("%s", ended.reason)
                self._depart(ended, stop_after=True)

    async def release(self, session: TrainerSession) -> bool:
        """``session`` leaves the run (a ``leave`` request): returns once the leave is
        announced (and, with serve_successive, the next membership is open); False when it
        held no lease, which changes nothing."""
        ended = self.lease.end(session, "its trainer asked to leave")
        if ended is None:
            return False
        log.info("%s", ended.reason)
        try:
            await asyncio.shield(self._depart(ended, stop_after=False))  # (its requester may go)
        finally:
            if ended.exit:  # the next loop iteration: the reply to the leave is written in this one
                asyncio.get_running_loop().call_soon(self._stop_soon)
        return True

    def _stop_soon(self) -> None:
        self._stopper = asyncio.ensure_future(self.stop())  # (held: a task nobody holds may vanish)

    def _depart(self, ended: Ended, *, stop_after: bool) -> asyncio.Task:
        self._departure = asyncio.ensure_future(self._leave_then(ended, stop_after))
        return self._departure

    async def _leave_then(self, ended: Ended, stop_after: bool) -> None:
        await self._leave_run()
        if self._stopping:
            return
        if ended.exit:
            if stop_after:
                self._stop_soon()  # (the leave is done: stop only closes)
            return
        try:
            await self.control.close()
            await self.state_server.close()
            self._new_member()
            await self._start_member()
        except Exception:
            log.exception("cannot open a new membership after the trainer left: stopping")
            self._stop_soon()
            return
        log.info("ready for the next trainer as %s", self.peer_id[:8])

    # -- callbacks from the control link and data plane ------------------------------
    async def _on_topology(self, topo: Topology) -> None:
        if self._stopping or self._leaving:
            return  # leaving: the data plane is already closed
        old = self.topology
        if old is not None and {p.peer_id for p in topo.peers} < {p.peer_id for p in old.peers}:
            # Only departures. A peer that completed a call and left is removed while others
            # may still be finishing that call with the remaining peers: let calls in flight
            # settle briefly before the new epoch aborts them. Calls that need a departed
            # peer fail on their own when its connections close.
            deadline = time.monotonic() + DEPARTURE_GRACE
            while any(k >= 0 for k in self._in_flight) and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
        log.info(
            "epoch %d: rank %d of %d in group %d (world %d)",
            topo.epoch, topo.rank, topo.group_world_size, topo.group, topo.world_size,
        )
        # Both switch in this loop iteration (set_topology swaps its view before its first
        # await, which waits for new links): a request that arrives while links come up must
        # take its tag from the new epoch's count, as the data plane runs it in that epoch.
        if old is None or not {p.peer_id for p in topo.peers} <= {p.peer_id for p in old.peers}:
            self._tags.reset(topo.round)  # the group gained a member: every member counts from zero
            log.debug("epoch %d gained a member: automatic tags count from round %s", topo.epoch, topo.round)
        self.topology = topo
        if self.metrics is not None:
            self.metrics.epoch.set(topo.epoch)
            self.metrics.world_size.set(topo.group_world_size)
        await self.data.set_topology(topo)

    def _on_abort(self, exc: PcclError) -> None:
        log.warning("abort from coordinator: %s", exc)
        self.data.abort(exc)

    def _on_removed(self, reason: str) -> None:
        log.warning("removed from the run: %s", reason)
        self._removed = reason
        self.topology = None

    def _on_peer_id(self, peer_id: str) -> None:
        # a removed peer rejoins under a new identity: every plane must present it
        log.info("rejoining as %s", peer_id[:8])
        self.peer_id = peer_id
        self.data.peer_id = peer_id
        self.state_server.peer_id = peer_id

    def _on_peer_failure(self, peer_id: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.link_losses.inc()
        log.info("data link to %s broke: %s; reporting it", peer_id[:8], reason)
        if self.control is not None:
            asyncio.ensure_future(self._report(peer_id, reason, self.data.epoch))

    async def _report(self, peer_id: str, reason: str, epoch: int) -> None:
        try:
            await self.control.report_peer_failure(peer_id, reason, epoch)
        except Exception as exc:
            log.info("could not report failure of %s: %s", peer_id[:8], exc)

    # -- what a trainer session asks of this peer ------------------------------------
    def require_connected(self) -> Topology:
        if self.topology is None:
            if self._removed:
                raise InvalidUsage(
                    f"this peer was removed from the run ({self._removed}); call connect() to rejoin"
                )
            raise InvalidUsage("not connected: call connect() before collectives")
        return self.topology

    def require_holder(self, session: TrainerSession) -> Topology:
        """The membership, for a call of ``session``: it must be connected and ``session``
        must hold the lease (``InvalidUsage`` otherwise)."""
        topo = self.require_connected()
        self.lease.require(session)
        return topo

    def _describe_activity(self) -> str | None:
        """What this peer is doing, for the coordinator's lockstep check (sent with heartbeats)."""
        acts = sorted({what if k < 0 else f"{what} tag={tag_count(k)}" if k & AUTO_TAG else f"{what} tag={k}"
                       for k, what in self._in_flight.items()})
        return ",".join(acts) if acts else None

    def _auto_calls(self) -> list[int]:
        """The automatic tags of the calls in flight (with heartbeats, for the lockstep check)."""
        return sorted(k for k in self._in_flight if k >= 0 and k & AUTO_TAG)

    def next_tag(self, user_tag) -> tuple[int, int | None]:
        """The call's tag and, for an automatic one, the token for ``tag_done``."""
        self.require_connected()
        if user_tag is not None:
            return calls.user_tag(user_tag), None
        return self._tags.take()

    def tag_done(self, tag: int, token: int | None, exc: BaseException | None) -> None:
        """The call of ``tag`` ended with ``exc`` (None: it succeeded). A ``Diverged`` call was
        completed by the other peers without this one: its tag is used up, like a success."""
        if token is not None:
            self._tags.done(tag, token, exc is None or isinstance(exc, Diverged))

    def summary(self) -> dict:
        return topology_summary(self.topology, self.peer_id)

    async def settled(self, timeout: float) -> bool:
        """Waits (up to ``timeout``) for the last trainer's departure, and with it the next
        membership, to complete; False if it is still under way."""
        if self._departure is None or self._departure.done():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._departure), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def connect(self, timeout: float, session: TrainerSession | None = None) -> dict:
        """Join the run (``session``, the trainer's connection, takes the lease on it)."""
        if self._stopping:
            raise InvalidUsage("this daemon is stopping")
        if session is not None:
            self.lease.take(session)
        if not await self.settled(timeout):
            raise DeadlineExceeded("connect: the previous trainer's membership was still being closed")
        self._removed = None
        topo = await self.control.connect(timeout)
        await self._wait_topology(topo.epoch, timeout)
        return self.summary()

    async def update_topology(self, timeout: float) -> dict:
        self.require_connected()
        self._in_flight[-1] = "update_topology"
        try:
            topo = await self.control.update_topology(timeout)
        finally:
            self._in_flight.pop(-1, None)
        self._count_from(topo)
        await self._wait_topology(topo.epoch, timeout)
        return self.summary()

    def _count_from(self, topo: Topology) -> None:
        """The topology answers this peer's vote: every member was between calls, and all
        count their automatic tags from its round."""
        if self._tags.new_round(topo.round):
            log.debug("vote round %s: automatic tags count from it", topo.round)
            self.data.tags_restarted()

    async def optimize_topology(self, timeout: float) -> dict:
        """Vote to measure the links and reorder the ring: this peer's view afterwards, with
        ``changed`` (its group's ring order differs from before the call) and ``reason``."""
        before = self.require_connected()
        self._in_flight[-3] = "optimize_topology"
        try:
            topo, reason = await self.control.optimize_topology(timeout)
        finally:
            self._in_flight.pop(-3, None)
        self._count_from(topo)
        await self._wait_topology(topo.epoch, timeout)
        summary = self.summary()
        order = [p.peer_id for p in before.peers]
        return {**summary, "changed": summary.get("peers") != order, "reason": reason}

    async def are_peers_pending(self, timeout: float) -> bool:
        self.require_connected()
        return bool(await self.control.are_peers_pending(timeout))

    async def all_gather(self, blob: bytes, *, user_tag, timeout: float) -> dict:
        topo = self.require_connected()
        tag, token = self.next_tag(user_tag)
        self._in_flight[tag] = "all_gather"
        exc: BaseException | None = None
        t0 = time.monotonic()
        try:
            blobs = await self.data.all_gather(blob, tag=tag, timeout=timeout)
        except BaseException as e:
            exc = e
            raise
        finally:
            self._in_flight.pop(tag, None)
            self.tag_done(tag, token, exc)
            self._count("all_gather", None, exc, t0)
        return {"blobs": blobs, "epoch": topo.epoch}

    async def sync_shared_state(self, views, *, revision: int, strategy: str, timeout: float,
                                progress: Callable[[int, int], None] | None) -> dict:
        """Bring the shared state in ``views`` (at ``revision``) in step with the other peers'."""
        async with self._sync_lock:
            self._in_flight[-2] = "sync_shared_state"
            try:
                result = await daemon_sync(
                    views,
                    revision=revision,
                    channel=self.control.sync_channel(),
                    server=self.state_server,
                    peer_id=self.peer_id,
                    secret=self.secret,
                    strategy=strategy,
                    timeout=timeout,
                    advertise=(self.data_host, self.state_server.address[1]),
                    progress=progress,
                )
                # re-introductions carry it, so a restarted coordinator rebuilds its revision book
                self.control.set_revision(result["revision"])
                if self.metrics is not None:
                    self.metrics.sync_bytes.inc(result.get("rx_bytes", 0))
                return result
            finally:
                self._in_flight.pop(-2, None)

    def _traffic(self) -> tuple[int, int]:
        """Data-plane bytes sent and received so far, over the peers of this membership
        (reported with heartbeats: ``pccl status --watch`` shows the rates)."""
        rows = list(self.data.traffic.values())
        return sum(r[0] for r in rows), sum(r[1] for r in rows)

    def _count(self, op: str, info: dict | None, exc: BaseException | None, t0: float) -> None:
        if self.metrics is not None:
            now = time.monotonic()
            self.metrics.call_done(op, info, exc if isinstance(exc, PcclError) or exc is None else exc, now - t0, now)

    async def _wait_topology(self, epoch: int, timeout: float) -> None:
        # on_topology is awaited by the control link before connect/update return, so this is
        # normally immediate; it guards against a callback still running.
        deadline = time.monotonic() + timeout
        while self.topology is None or self.topology.epoch < epoch:
            if time.monotonic() > deadline:
                raise InvalidUsage("topology did not arrive")
            await asyncio.sleep(0.001)

    def start_all_reduce(self, src, dst, *, dtype: str, op: str, quant: str | None, algorithm: str, user_tag,
                         timeout: float, shm_refs: tuple[str, int, str, int] | None,
                         done: Callable[[dict | None, PcclError | None], None]) -> None:
        """Post an all-reduce of ``src`` into ``dst`` under the caller's tag (None: the next
        automatic one); ``done(info, None)`` or ``done(None, error)`` when it ends. Bad
        arguments raise here."""
        topo = self.require_connected()
        tag, token = self.next_tag(user_tag)
        self._in_flight[tag] = "all_reduce"
        t0 = time.monotonic()

        def finish(info: dict | None, exc: PcclError | None) -> None:
            self._in_flight.pop(tag, None)
            self.tag_done(tag, token, exc)
            self._count("all_reduce", info, exc, t0)
            if info is not None:
                info["epoch"] = topo.epoch
            done(info, exc)

        try:
            self.data.start_all_reduce(
                src,
                dst,
                dtype=dtype,
                op=op,
                quant=quant,
                algorithm=algorithm,
                tag=tag,
                timeout=timeout,
                shm_refs=shm_refs,
                done=finish,
            )
        except BaseException as e:
            self._in_flight.pop(tag, None)
            self.tag_done(tag, token, e)
            raise


def _streams_arg(value: str) -> str:
    try:
        streams_setting(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="pccl daemon", description="Run a pccl peer daemon.")
    p.add_argument("--coordinator", default="127.0.0.1:48148", help="coordinator HOST:PORT")
    p.add_argument("--group", type=int, default=0, help="peer group of this daemon")
    p.add_argument("--listen", default="127.0.0.1:0", help="data-plane HOST:PORT (port 0: any)")
    p.add_argument("--advertise", default=None, metavar="HOST",
                   help="data-plane host the other peers dial (default: the --listen host, or, when "
                        "listening on 0.0.0.0 or ::, this machine's address on the route to the "
                        "coordinator)")
    p.add_argument("--ipc", default=None, metavar="PATH", help="Unix socket path its trainer (Client) connects to")
    p.add_argument("--streams", default=AUTO, metavar="auto|K", type=_streams_arg,
                   help="TCP streams per neighbour link: auto (default) starts at 4 (8 on a link of 15 ms round "
                        "trip or more, 16 from 50 ms) and adds streams while that raises a link's measured "
                        "throughput, up to --max-streams; K fixes every link at K")
    p.add_argument("--max-streams", type=int, default=None, metavar="K",
                   help="with --streams auto, at most K streams per link (default 16)")
    p.add_argument("--heartbeat-interval", type=float, default=0.5)
    p.add_argument("--coordinator-timeout", type=float, default=3.0)
    p.add_argument("--exit-with-client", action="store_true",
                   help="the first IPC connection (the client that spawned this daemon) holds it: exit "
                        "when that connection closes, connected to the run or not")
    p.add_argument("--serve-successive", action="store_true",
                   help="when the trainer that connected this daemon goes (close(), crash, SIGKILL), leave "
                        "the run and wait for the next trainer, which joins as a new member (default: leave "
                        "the run and exit)")
    p.add_argument("--no-shm", action="store_true",
                   help="never all-reduce through shared memory, even when every peer shares this host")
    p.add_argument("--tcp-only", action="store_true",
                   help="dial peers on this host over TCP too (by default a peer in the same network "
                        "namespace is reached through a Unix socket)")
    p.add_argument("--link-timeout", type=float, default=None, metavar="SECONDS",
                   help="close a data link whose sent data stays unacknowledged this long, so a dead "
                        "path is reported and replaced (default 10; 0: the kernel's ~15 min)")
    p.add_argument("--io-threads", choices=["auto", "on", "off"],
                   default=os.environ.get("PCCL_IO_THREADS", "auto"),
                   help="move frames of 256 KiB and more on a receive and a send thread per stream "
                        "(auto: when this process may use more than 2 CPUs; env PCCL_IO_THREADS)")
    p.add_argument("--integrity", choices=["on", "off"], default=os.environ.get("PCCL_INTEGRITY", "on"),
                   help="follow every data frame with an AES-GCM tag, so a frame changed in transit fails "
                        "its call instead of changing a result (off: for measuring its cost; every daemon "
                        "of a run must agree; env PCCL_INTEGRITY)")
    p.add_argument("--encrypt", action="store_true", default=os.environ.get("PCCL_ENCRYPT", "") not in ("", "0"),
                   help="also encrypt data payloads (AES-256-GCM); every daemon of a run must agree "
                        "(env PCCL_ENCRYPT=1)")
    p.add_argument("--log-level", default=os.environ.get("PCCL_LOG", "WARNING"))
    p.add_argument("--log-format", choices=logs.FORMATS, default=logs.default_format(),
                   help="text, or json: one object per line (env PCCL_LOG_FORMAT)")
    env_port = os.environ.get("PCCL_METRICS_PORT")
    p.add_argument("--metrics-port", type=int, default=int(env_port) if env_port else None, metavar="PORT",
                   help="serve Prometheus metrics on this port (0: any free one; it is logged; "
                        "env PCCL_METRICS_PORT)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address the metrics port listens on (default 127.0.0.1)")
    return p


async def _amain(args) -> int:
    host, port = parse_addr(args.listen, 0)
    secret = os.environ.get("PCCL_SECRET", "").encode()
    metrics = Metrics("daemon") if args.metrics_port is not None else None
    d = Daemon(
        coordinator=args.coordinator,
        group=args.group,
        data_host=host,
        data_port=port,
        ipc_path=args.ipc,
        secret=secret,
        streams=args.streams,
        max_streams=args.max_streams,
        heartbeat_interval=args.heartbeat_interval,
        coordinator_timeout=args.coordinator_timeout,
        exit_with_client=args.exit_with_client,
        serve_successive=args.serve_successive,
        shm=not args.no_shm,
        advertise=args.advertise,
        link_timeout=args.link_timeout,
        tcp_only=args.tcp_only,
        io_threads={"on": True, "off": False}.get(args.io_threads),
        integrity=args.integrity == "on",
        encrypt=args.encrypt,
        metrics=metrics,
    )
    _DAEMON.append(d)  # the log lines name its peer, rank and epoch from now on
    if metrics is not None:
        port = metrics.serve(args.metrics_port, args.metrics_host)
        log.warning("metrics on http://%s:%d/metrics", args.metrics_host, port)
    await d.start()
    advice = slow_start_advice(is_loopback(parse_addr(args.coordinator)[0]))
    if advice:
        log.warning("%s", advice)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(d.stop()))
    print(f"READY {d.ipc_path} {d.peer_id}", flush=True)
    await d.wait_stopped()
    return 0


_DAEMON: list[Daemon] = []  # the daemon of this process, once made


def _who() -> tuple[str, int, int]:
    """(peer id, rank, epoch) of this process's daemon, for its log lines."""
    if not _DAEMON:
        return "-", -1, -1
    d = _DAEMON[0]
    topo = d.topology
    return d.peer_id, (topo.rank if topo is not None else -1), (topo.epoch if topo is not None else -1)


def run_loop(coro) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.exit_with_client and args.serve_successive:
        parser.error("--exit-with-client and --serve-successive exclude each other")
    logs.setup("daemon", args.log_level, args.log_format, who=_who)
    try:
        return run_loop(_amain(args))
    except InvalidUsage as exc:  # a setting that cannot work: say which, without a traceback
        print(f"pccl daemon: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
