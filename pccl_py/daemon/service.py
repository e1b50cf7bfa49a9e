"""The peer daemon: one per trainer, owning every network connection of that peer.

It joins three things together and adds no protocol of its own:
  * :class:`~pccl_py.daemon.control.ControlChannel` to the coordinator (membership, votes),
  * :class:`~pccl_py.daemon.dataplane.DataPlane` to the other daemons (collectives),
  * the trainer-daemon IPC (:mod:`pccl_py.wire.ipc`) its trainer's Client talks to.

Run it as ``pccl daemon --coordinator HOST:PORT --group G`` or let ``Client(daemon=None)``
spawn a private one that exits with its client.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

from pccl_py import calls
from pccl_py.client.shared_state import layout_views
from pccl_py.client.tags import AUTO_TAG, AutoTags
from pccl_py.daemon.control import ControlChannel
from pccl_py.daemon.dataplane import DataPlane, DataPlaneConfig
from pccl_py.daemon.state_sync import daemon_sync
from pccl_py.daemon.state_transfer import StateServer
from pccl_py.daemon.topology import Topology
from pccl_py.errors import Diverged, InvalidUsage, PcclError, ProtocolError, to_wire
from pccl_py.transport import segments
from pccl_py.transport.zmq_io import parse_addr
from pccl_py.wire import ipc

log = logging.getLogger("pccl.daemon")

DEPARTURE_GRACE = 0.3  # seconds calls in flight may finish after a peer leaves the topology
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def advertised_host(listen_host: str, coordinator: str, advertise: str | None = None) -> str:
    """The data-plane host the coordinator hands to the other peers.

    ``advertise`` wins; a specific listen address is its own answer; a daemon bound to every
    interface (0.0.0.0, ::) advertises the local address its traffic to the coordinator
    leaves from: the address of the interface that faces the other machines of the run.
    """
    if advertise:
        return advertise
    if listen_host not in WILDCARD_HOSTS:
        return listen_host
    host, port = parse_addr(coordinator)
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)  # a UDP connect only picks the route: nothing is sent
            return s.getsockname()[0]
    except OSError as exc:
        raise InvalidUsage(
            f"listening on {listen_host or 'every interface'!r}, the daemon cannot tell which address "
            f"the other peers reach it at (no route to the coordinator {coordinator}: {exc}); "
            f"pass --advertise HOST") from None


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
        streams: int | None = None,
        heartbeat_interval: float = 0.5,
        coordinator_timeout: float = 3.0,
        exit_with_client: bool = False,
        shm: bool = True,
        advertise: str | None = None,
        link_timeout: float | None = None,
        tcp_only: bool = False,
        io_threads: bool | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.group = group
        self.peer_id = uuid.uuid4().hex
        self.ipc_path = ipc_path or os.path.join(
            tempfile.gettempdir(), f"pccl-{os.getpid()}-{self.peer_id[:8]}.sock"
        )
        self.exit_with_client = exit_with_client
        self.data_host = advertised_host(data_host, coordinator, advertise)  # what peers dial
        dp_kwargs = {"secret": secret, "host": data_host, "port": data_port, "advertise": self.data_host}
        if streams is not None:
            dp_kwargs["streams"] = streams
        tuning = {"shm": shm, "same_host_links": not tcp_only, "io_threads": io_threads}
        if link_timeout is not None:
            if link_timeout < 0:
                raise InvalidUsage(f"link_timeout must be >= 0 seconds, got {link_timeout}")
            tuning["user_timeout"] = link_timeout
        dp_kwargs["config"] = DataPlaneConfig(**tuning)
        self.data = DataPlane(self.peer_id, on_peer_failure=self._on_peer_failure, **dp_kwargs)
        self.secret = secret
        self.state_server = StateServer(self.peer_id, secret=secret, host=data_host, port=0)
        self._sync_lock = asyncio.Lock()
        self._control_kwargs = {
            "group": group,
            "secret": secret,
            "peer_id": self.peer_id,
            "heartbeat_interval": heartbeat_interval,
            "coordinator_timeout": coordinator_timeout,
        }
        self.control: ControlChannel | None = None
        self.topology: Topology | None = None
        self._tags = AutoTags()
        self.data.behind = self._tags.behind  # tells a peer retrying a call we completed
        self._in_flight: dict[int, str] = {}
        self._server: asyncio.AbstractServer | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self._sessions: set[TrainerSession] = set()
        self._removed: str | None = None

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        addr = await self.data.start()
        await self.state_server.start()
        self.control = ControlChannel(
            self.coordinator,
            data_addr=(self.data_host, addr[1]),
            on_topology=self._on_topology,
            on_abort=self._on_abort,
            on_removed=self._on_removed,
            on_peer_id=self._on_peer_id,
            **self._control_kwargs,
        )
        self.control.activity_source = self._describe_activity
        await self.control.start()
        if os.path.exists(self.ipc_path):
            os.unlink(self.ipc_path)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: TrainerSession(self), path=self.ipc_path)
        log.info("daemon %s ready: local %s, data %s:%d (advertised as %s)", self.peer_id[:8],
                 self.ipc_path, *addr, self.data_host)

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
        for s in list(self._sessions):
            s.close()
        # Close the data plane first (its last frames, FINs included, are flushed before the
        # streams end), then announce the leave: peers finish a call this peer completed
        # before the new epoch reaches them through the coordinator.
        await self.data.close()
        if self.control is not None:
            if graceful:
                try:
                    await asyncio.wait_for(self.control.leave(), 2.0)
                except Exception as exc:  # leaving is best effort: the coordinator may be gone
                    log.info("leave not acknowledged: %s", exc)
            await self.control.close()
        await self.state_server.close()
        try:
            os.unlink(self.ipc_path)
        except FileNotFoundError:
            pass

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # -- callbacks from the control link and data plane ------------------------------
    async def _on_topology(self, topo: Topology) -> None:
        if self._stopping:
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
            self._tags.reset()  # the group gained a member: every member counts from zero
        self.topology = topo
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
        log.info("data link to %s broke: %s; reporting it", peer_id[:8], reason)
        if self.control is not None:
            asyncio.ensure_future(self._report(peer_id, reason, self.data.epoch))

    async def _report(self, peer_id: str, reason: str, epoch: int) -> None:
        try:
            await self.control.report_peer_failure(peer_id, reason, epoch)
        except Exception as exc:
            log.info("could not report failure of %s: %s", peer_id[:8], exc)

    # -- requests from the client ----------------------------------------------------
    def _require_connected(self) -> Topology:
        if self.topology is None:
            if self._removed:
                raise InvalidUsage(
                    f"this peer was removed from the run ({self._removed}); call connect() to rejoin"
                )
            raise InvalidUsage("not connected: call connect() before collectives")
        return self.topology

    def _describe_activity(self) -> str | None:
        """What this peer is doing, for the coordinator's lockstep check (sent with heartbeats)."""
        acts = sorted({f"{what} tag={k & ~AUTO_TAG}" if k >= 0 else what for k, what in self._in_flight.items()})
        return ",".join(acts) if acts else None

    def next_tag(self, user_tag) -> tuple[int, int | None]:
        """The call's tag and, for an automatic one, the token for ``tag_done``."""
        self._require_connected()
        if user_tag is not None:
            return calls.user_tag(user_tag), None
        return self._tags.take()

    def tag_done(self, tag: int, token: int | None, exc: BaseException | None) -> None:
        """The call of ``tag`` ended with ``exc`` (None: it succeeded). A ``Diverged`` call was
        completed by the other peers without this one: its tag is used up, like a success."""
        if token is not None:
            self._tags.done(tag, token, exc is None or isinstance(exc, Diverged))

    async def handle(self, session: TrainerSession, req: dict) -> dict:
        op = req.get("op")
        timeout = calls.request_timeout(req.get("timeout"))
        if op == "hello":
            return {"peer_id": self.peer_id, "pid": os.getpid()}
        if op == "connect":
            self._removed = None
            topo = await self.control.connect(timeout)
            await self._wait_topology(topo.epoch, timeout)
            return topology_summary(self.topology, self.peer_id)
        if op == "update_topology":
            self._require_connected()
            self._in_flight[-1] = "update_topology"
            try:
                topo = await self.control.update_topology(timeout)
            finally:
                self._in_flight.pop(-1, None)
            await self._wait_topology(topo.epoch, timeout)
            return topology_summary(self.topology, self.peer_id)
        if op == "are_peers_pending":
            self._require_connected()
            return {"pending": bool(await self.control.are_peers_pending(timeout))}
        if op == "info":
            return topology_summary(self.topology, self.peer_id)
        if op == "map":
            session.map(str(req["name"]), int(req["size"]))
            return {}
        if op == "unmap":
            session.unmap(str(req["name"]))
            return {}
        if op == "all_gather":
            topo = self._require_connected()
            blob = req.get("data")
            calls.check_blob(blob)
            tag, token = self.next_tag(req.get("tag"))
            self._in_flight[tag] = "all_gather"
            exc: BaseException | None = None
            try:
                blobs = await self.data.all_gather(blob, tag=tag, timeout=timeout)
            except BaseException as e:
                exc = e
                raise
            finally:
                self._in_flight.pop(tag, None)
                self.tag_done(tag, token, exc)
            return {"blobs": blobs, "epoch": topo.epoch}
        if op == "sync_shared_state":
            return await self._sync(session, req, timeout)
        if op == "leave":
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.stop()))
            return {}
        raise InvalidUsage(f"unknown request {op!r}")

    async def _sync(self, session: TrainerSession, req: dict, timeout: float) -> dict:
        self._require_connected()
        desc = req.get("state")
        if not isinstance(desc, dict):
            raise InvalidUsage("sync_shared_state needs a state description")
        strategy = str(req.get("strategy", "enforce_popular"))
        calls.check_strategy(strategy)
        seg = session.segment(str(desc.get("segment")))
        views = layout_views(desc, seg.buf)
        async with self._sync_lock:
            self._in_flight[-2] = "sync_shared_state"
            try:
                result = await daemon_sync(
                    views,
                    revision=int(desc["revision"]),
                    channel=self.control.sync_channel(),
                    server=self.state_server,
                    peer_id=self.peer_id,
                    secret=self.secret,
                    strategy=strategy,
                    timeout=timeout,
                    advertise=(self.data_host, self.state_server.address[1]),
                    progress=session.progress_reporter(req.get("id")) if req.get("progress") else None,
                )
                # re-introductions carry it, so a restarted coordinator rebuilds its revision book
                self.control.set_revision(result["revision"])
                return result
            finally:
                self._in_flight.pop(-2, None)

    async def _wait_topology(self, epoch: int, timeout: float) -> None:
        # on_topology is awaited by the control link before connect/update return, so this is
        # normally immediate; it guards against a callback still running.
        deadline = time.monotonic() + timeout
        while self.topology is None or self.topology.epoch < epoch:
            if time.monotonic() > deadline:
                raise InvalidUsage("topology did not arrive")
            await asyncio.sleep(0.001)

    def start_all_reduce(self, session: TrainerSession, req: dict,
                         finish: Callable[[dict | None, PcclError | None], None]) -> None:
        """Post a client's all-reduce; ``finish(info, None)`` or ``finish(None, error)`` when it
        ends. No task per call: small all-reduces are latency-bound and every loop iteration
        counts. Bad requests raise here."""
        timeout = calls.request_timeout(req.get("timeout"))
        topo = self._require_connected()
        dtype = str(req.get("dtype"))
        calls.check_dtype(dtype)
        nbytes = int(req["nbytes"])
        calls.check_whole_elements(nbytes, dtype)
        inline = req.get("data")
        if inline is not None:  # a small call carries its bytes; the result goes back in the reply
            calls.check_inline(inline, nbytes)
            src, dst, refs = inline, bytearray(nbytes), None
        else:
            seg = session.segment(str(req["shm"]))
            in_seg = session.segment(str(req.get("in_shm") or req["shm"]))
            in_off, out_off = int(req["in_off"]), int(req["out_off"])
            calls.check_shm_ranges(nbytes, (in_seg.size, in_off), (seg.size, out_off), in_seg is seg)
            src = in_seg.buf[in_off:in_off + nbytes]
            dst = seg.buf[out_off:out_off + nbytes]
            refs = (in_seg.name.lstrip("/"), in_off, seg.name.lstrip("/"), out_off)
        tag, token = self.next_tag(req.get("tag"))
        self._in_flight[tag] = "all_reduce"

        def done(info: dict | None, exc: PcclError | None) -> None:
            self._in_flight.pop(tag, None)
            self.tag_done(tag, token, exc)
            if info is not None:
                info["epoch"] = topo.epoch
                if inline is not None:
                    info["data"] = dst
            finish(info, exc)

        try:
            self.data.start_all_reduce(
                src,
                dst,
                dtype=dtype,
                op=str(req.get("reduce", "sum")),
                quant=req.get("quant"),
                algorithm=str(req.get("algorithm", "auto")),
                tag=tag,
                timeout=timeout,
                shm_refs=refs,
                done=done,
            )
        except BaseException as e:
            self._in_flight.pop(tag, None)
            self.tag_done(tag, token, e)
            raise


class TrainerSession(asyncio.Protocol):
    """One client connection on the local socket."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.frames = ipc.FrameBuffer()
        self.transport: asyncio.Transport | None = None
        self.segments: dict = {}
        self.tasks: set[asyncio.Task] = set()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.daemon._sessions.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            msgs = self.frames.feed(data)
        except ProtocolError as exc:
            log.warning("closing local client: %s", exc)
            self.transport.close()
            return
        for msg in msgs:
            if msg.get("op") == "all_reduce":  # the hot path: no task
                rid = msg.get("id")
                try:
                    self.daemon.start_all_reduce(
                        self, msg, lambda info, exc, rid=rid: self._reply(rid, "all_reduce", info, exc))
                except Exception as exc:
                    self._reply(rid, "all_reduce", None, exc)
                continue
            t = asyncio.ensure_future(self._serve(msg))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def _serve(self, req: dict) -> None:
        try:
            if req.get("op") not in ipc.OPS:
                raise InvalidUsage(f"unknown request {req.get('op')!r}")
            reply = await self.daemon.handle(self, req)
        except Exception as exc:
            self._reply(req.get("id"), req.get("op"), None, exc)
            return
        self._reply(req.get("id"), req.get("op"), reply, None)

    def _reply(self, rid, op, reply: dict | None, exc: BaseException | None) -> None:
        if exc is None:
            reply["ok"] = True
        elif isinstance(exc, PcclError):
            reply = {"ok": False, **to_wire(exc)}
        elif isinstance(exc, (KeyError, TypeError, ValueError)):
            reply = {"ok": False, **to_wire(InvalidUsage(f"bad request: {exc!r}"))}
        else:  # never let one request kill the daemon
            log.error("request %s failed", op, exc_info=exc)
            reply = {"ok": False, **to_wire(exc)}
        reply["id"] = rid
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(ipc.pack(reply))

    def progress_reporter(self, rid, interval: float = 0.1):
        """A callback sending ``{"id": rid, "progress": [done, total]}`` to the client, throttled."""
        last = [0.0]

        def report(done: int, total: int) -> None:
            now = time.monotonic()
            if (now - last[0] >= interval or done >= total) and self.transport is not None:
                last[0] = now
                self.transport.write(ipc.pack({"id": rid, "progress": [int(done), int(total)]}))

        return report

    def map(self, name: str, size: int) -> None:
        if name in self.segments:
            return
        try:
            seg = segments.attach_segment(name)
        except OSError as exc:
            raise InvalidUsage(f"cannot map shared-memory segment {name!r}: {exc}") from None
        if seg.size < size:
            seg.close()
            raise InvalidUsage(f"segment {name} is {seg.size} bytes, expected {size}")
        self.segments[name] = seg

    def unmap(self, name: str) -> None:
        seg = self.segments.pop(name, None)
        if seg is not None:
            # a view may still be alive (an op, a transfer's buffers): the mapping then goes
            # with the last view
            seg.close()

    def segment(self, name: str):
        seg = self.segments.get(name)
        if seg is None:
            raise InvalidUsage(f"unknown shared-memory segment {name!r}; map it first")
        return seg

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.daemon._sessions.discard(self)
        for t in self.tasks:
            t.cancel()
        for name in list(self.segments):
            self.unmap(name)
        self.transport = None
        if self.daemon.exit_with_client:
            asyncio.ensure_future(self.daemon.stop())


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
    p.add_argument("--streams", type=int, default=None, help="TCP streams per neighbour link")
    p.add_argument("--heartbeat-interval", type=float, default=0.5)
    p.add_argument("--coordinator-timeout", type=float, default=3.0)
    p.add_argument("--exit-with-client", action="store_true", help="stop when the client disconnects")
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
    p.add_argument("--log-level", default=os.environ.get("PCCL_LOG", "WARNING"))
    return p


async def _amain(args) -> int:
    host, port = parse_addr(args.listen, 0)
    secret = os.environ.get("PCCL_SECRET", "").encode()
    d = Daemon(
        coordinator=args.coordinator,
        group=args.group,
        data_host=host,
        data_port=port,
        ipc_path=args.ipc,
        secret=secret,
        streams=args.streams,
        heartbeat_interval=args.heartbeat_interval,
        coordinator_timeout=args.coordinator_timeout,
        exit_with_client=args.exit_with_client,
        shm=not args.no_shm,
        advertise=args.advertise,
        link_timeout=args.link_timeout,
        tcp_only=args.tcp_only,
        io_threads={"on": True, "off": False}.get(args.io_threads),
    )
    await d.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(d.stop()))
    print(f"READY {d.ipc_path} {d.peer_id}", flush=True)
    await d.wait_stopped()
    return 0


def run_loop(coro) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s daemon[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return run_loop(_amain(args))


if __name__ == "__main__":
    sys.exit(main())
