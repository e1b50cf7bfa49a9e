"""``pccl coordinator``: the run's membership service (asyncio on uvloop, zmq ROUTER).

This module only moves bytes and time: frames from the ROUTER are decoded and
validated by :mod:`pccl_py.wire.control`, fed to the sans-I/O core
:class:`pccl_py.coordinator.membership.Membership`, and the core's decisions are sent back.
A timer ticks the core; a socket monitor reports closed connections, which the
core answers with a probe. Malformed input is logged (rate-limited) and dropped;
the connection that sent it is ignored from then on (a member that does so is
removed), and nobody else notices.

The ROUTER is a CURVE server with the coordinator key pair derived from the run secret,
and its ZAP handler (:mod:`pccl_py.transport.zap`) admits only the member key: a process
without the secret cannot complete a handshake, so nothing it sends reaches the core, and
every message of a connection that did is authenticated and encrypted with keys of that
connection. The monitor also reports failed handshakes: they are counted
(:mod:`pccl_py.coordinator.handshakes`, ``pccl_rejected_connections_total{port="control",reason}``) and
summarised in the log at most once per ``reject_summary_every`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections import OrderedDict
from collections.abc import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from pccl_py import logs
from pccl_py.coordinator.decision import Decision
from pccl_py.coordinator.handshakes import Handshakes
from pccl_py.coordinator.membership import Membership, MembershipConfig
from pccl_py.coordinator.topology_opt import OptimizeConfig
from pccl_py.errors import InvalidUsage, ProtocolError
from pccl_py.metrics import Metrics
from pccl_py.transport.addresses import is_loopback
from pccl_py.transport.zap import ZapHandler
from pccl_py.transport.zmq_io import (
    DEFAULT_COORDINATOR_PORT,
    HANDSHAKE_EVENTS,
    HANDSHAKE_FAILED,
    ZmqPump,
    close_monitored,
    curve_server,
    parse_addr,
    server_reject_reason,
)
from pccl_py.wire import control as protocol
from pccl_py.wire import keys

log = logging.getLogger("pccl.coordinator")

TICK = 0.05  # seconds between timer ticks of the core
METRICS_EVERY = 1.0  # seconds between updates of the served metrics
MAX_BAD_CONNS = 4096  # connections remembered as sending garbage
MAX_FD_MAP = 65536
REJECT_SUMMARY_EVERY = 10.0  # seconds between log lines about failed handshakes
MONITORED = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | HANDSHAKE_EVENTS


def unprotected(host: str, secret: bytes) -> str | None:
    """The warning for a coordinator listening on ``host`` with ``secret``, if it needs one:
    with an empty secret every key is public (pccl_py/wire/keys.py), which is only fine on
    this machine's loopback."""
    if secret or is_loopback(host):
        return None
    return (f"the run secret is empty and this coordinator listens on {host or 'every interface'}, "
            "not a loopback address: the run is unprotected (anyone who can reach this port or a "
            "peer's can join the run, pose as its coordinator or read its traffic); give every "
            "process of the run the same PCCL_SECRET (e.g. openssl rand -hex 16)")


def _peer_ip(fd: int) -> str:
    """The remote address of the TCP connection on ``fd`` (zmq's, just accepted), or "" if
    it is already gone. A duplicate of the descriptor is asked and closed: zmq's stays open."""
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            return str(s.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return ""


class Coordinator:
    """One coordinator process's I/O around a :class:`Membership` core."""

    def __init__(self, listen: str, *, secret: bytes = b"", config: MembershipConfig | None = None,
                 metrics: Metrics | None = None, reject_summary_every: float = REJECT_SUMMARY_EVERY):
        self.metrics = metrics  # None: nothing is counted
        self._metrics_at = 0.0
        self.host, self.port = parse_addr(listen)
        self.secret = secret
        self.config = config or MembershipConfig()
        self.loop = asyncio.get_running_loop()
        self.core = Membership(self.loop.time(), config=self.config)
        self.handshakes = Handshakes(reject_summary_every)
        # a context of its own: the ZAP endpoint is per context (pccl_py/transport/zap.py)
        self._ctx: zmq.Context | None = None
        self._zap: ZapHandler | None = None
        self._sock: zmq.Socket | None = None
        self._mon: zmq.Socket | None = None
        self._pump: ZmqPump | None = None
        self._mon_pump: ZmqPump | None = None
        self._ticker: asyncio.Task | None = None
        self._fd_conn: OrderedDict[int, bytes] = OrderedDict()
        self._bad: OrderedDict[bytes, int] = OrderedDict()  # conn -> malformed messages seen
        self.stats = {"rx": 0, "tx": 0, "bad": 0, "dropped_tx": 0}

    async def start(self) -> str:
        """Bind and start; returns the bound 'host:port' (port 0 picks a free one)."""
        self._ctx = zmq.Context()
        try:  # the handler first: a CURVE server without one admits any client key
            self._zap = ZapHandler(self._ctx, keys.curve_keypair(self.secret, "member")[0])
        except zmq.ZMQError as exc:
            self._ctx.term()
            self._ctx = None
            raise InvalidUsage(f"cannot start the coordinator's authentication handler: {exc}") from None
        sock = self._ctx.socket(zmq.ROUTER)
        curve_server(sock, self.secret)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a peer's new socket with the same id takes over
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE)  # bigger frames close the connection
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RCVHWM, 10000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.config.heartbeat_deadline * 1000))
        # a stranger holds a half-open connection this long at most (libzmq's default: 30 s)
        sock.setsockopt(zmq.HANDSHAKE_IVL, max(1, int(self.config.handshake_timeout * 1000)))
        try:
            if self.port == 0:
                self.port = sock.bind_to_random_port(f"tcp://{self.host}")
            else:
                sock.bind(f"tcp://{self.host}:{self.port}")
        except zmq.ZMQError as exc:
            sock.close()
            self._zap.close()
            self._ctx.term()
            self._zap = self._ctx = None
            raise InvalidUsage(f"cannot listen on {self.host}:{self.port}: {exc}") from None
        self._sock = sock
        self._mon = sock.get_monitor_socket(MONITORED)
        self._pump = ZmqPump(sock, self._on_frames)
        self._mon_pump = ZmqPump(self._mon, self._on_monitor, copy=True)
        self._ticker = self.loop.create_task(self._tick_loop(), name="pccl-coordinator-tick")
        log.info(
            "coordinator %s listening on %s:%d (heartbeat %.2f s, deadline %.2f s, probe %.2f s, "
            "recovery window %.2f s)",
            self.core.instance, self.host, self.port, self.config.heartbeat_interval,
            self.config.heartbeat_deadline, self.config.probe_timeout, self.config.recovery_grace,
        )
        warning = unprotected(self.host, self.secret)
        if warning is not None:
            log.warning("%s", warning)
        return f"{self.host}:{self.port}"

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for pump in (self._pump, self._mon_pump):
            if pump is not None:
                pump.close()
        close_monitored(self._sock, self._mon, 0)
        self._sock = self._mon = None
        if self._zap is not None:
            self._zap.close()
            self._zap = None
        if self._ctx is not None:
            self._ctx.term()  # every socket of it is closed: returns at once
            self._ctx = None

    # ------------------------------------------------------------------ input

    def _on_frames(self, frames: list) -> None:
        self.stats["rx"] += 1
        conn = bytes(frames[0])
        if conn in self._bad:
            self._note_bad(conn, "further input from an ignored connection")
            return
        with contextlib.suppress(zmq.ZMQError, TypeError, AttributeError):
            fd = frames[-1].get(zmq.SRCFD)
            self.handshakes.talked(fd)
            if self._fd_conn.get(fd) != conn:
                self._fd_conn[fd] = conn
                self._fd_conn.move_to_end(fd)
                while len(self._fd_conn) > MAX_FD_MAP:
                    self._fd_conn.popitem(last=False)
        now = self.loop.time()
        if len(frames) != 2:
            self._reject(now, conn, f"{len(frames) - 1} frames instead of 1")
            return
        try:
            msg = protocol.decode(frames[1].buffer)
        except ProtocolError as exc:
            self._reject(now, conn, str(exc))
            return
        self._apply(self.core.on_message(now, conn, msg))

    def _reject(self, now: float, conn: bytes, why: str) -> None:
        self.stats["bad"] += 1
        self._bad[conn] = 0
        while len(self._bad) > MAX_BAD_CONNS:
            self._bad.popitem(last=False)
        self._note_bad(conn, why)
        self._apply(self.core.on_bad_input(now, conn, why))

    def _note_bad(self, conn: bytes, why: str) -> None:
        seen = self._bad.get(conn, 0) + 1
        self._bad[conn] = seen
        if seen <= 3 or seen % 1000 == 0:
            log.warning("bad input from connection %r (#%d), dropped and connection ignored: %s",
                        conn[:40], seen, why[:200])

    def _on_monitor(self, frames: list) -> None:
        try:
            event = parse_monitor_message(frames)
        except Exception:  # a monitor frame we do not understand is not worth a crash
            return
        kind, value = event["event"], event["value"]
        if kind == zmq.EVENT_ACCEPTED:
            self.handshakes.accepted(value, _peer_ip(value))
        elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.handshakes.succeeded()
        elif kind in HANDSHAKE_FAILED:
            self.handshakes.failed(server_reject_reason(kind, value))
        elif kind == zmq.EVENT_DISCONNECTED:
            now = self.loop.time()
            rejected = self.handshakes.disconnected(now, value)
            if rejected is not None:
                if self.metrics is not None:
                    self.metrics.rejected("control")(rejected)
                return
            conn = self._fd_conn.pop(value, None)
            if conn is not None:
                self._apply(self.core.on_disconnect(now, conn))

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            if self._pump is not None:
                self._pump.drain()  # what arrived counts before any deadline is judged
            try:
                self._apply(self.core.tick(self.loop.time()))
            except Exception:
                log.exception("membership tick failed")
            now = self.loop.time()
            line = self.handshakes.summary(now)
            if line is not None:
                log.warning("%s", line)
            if self.metrics is not None and now - self._metrics_at >= METRICS_EVERY:
                self._metrics_at = now
                self.metrics.status(self.core.status(now))
            for pump in (self._pump, self._mon_pump):  # a missed edge costs at most one tick
                if pump is not None:
                    pump.kick()
            if self._zap is not None:
                self._zap.kick()

    # ------------------------------------------------------------------ output

    def _apply(self, decision: Decision) -> None:
        if decision.reason:
            if decision.reason == "status":
                log.debug("status request answered")
            else:
                log.info("%s", decision.reason)
        sock = self._sock
        if sock is None:
            return
        for conn, msg in decision.out:
            try:
                data = protocol.encode_msg(msg)
            except ProtocolError:
                log.exception("the core produced an invalid %s message; not sent", msg.get("type"))
                continue
            try:
                sock.send_multipart([conn, data], zmq.NOBLOCK)
                self.stats["tx"] += 1
            except zmq.ZMQError:  # peer gone or its queue full: heartbeats and probes cover it
                self.stats["dropped_tx"] += 1
        if decision.out and self._pump is not None:
            self._pump.kick()
        if decision.work is not None:
            self._offload(*decision.work)

    def _offload(self, fn: Callable, then: Callable) -> None:
        """Run ``fn()`` (the ring solver for large groups) on a worker thread, so heartbeats
        and deadlines go on meanwhile; its result goes to the core through ``then``."""
        def done(fut: asyncio.Future) -> None:
            if fut.cancelled() or self._sock is None:
                return
            result = {}  # (a failed solver moves no ring: the round still ends)
            if fut.exception() is not None:
                log.error("optimize_topology: the solver failed: %r", fut.exception())
            else:
                result = fut.result()
            try:
                self._apply(then(self.loop.time(), result))
            except Exception:
                log.exception("applying the solver's result failed")

        self.loop.run_in_executor(None, fn).add_done_callback(done)


async def serve(
    listen: str = f"127.0.0.1:{DEFAULT_COORDINATOR_PORT}",
    *,
    secret: bytes = b"",
    heartbeat_deadline: float | None = None,
    config: MembershipConfig | None = None,
    ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
    metrics: Metrics | None = None,
) -> None:
    """Run a coordinator until ``stop`` is set (or the task is cancelled)."""
    cfg = config or MembershipConfig()
    if heartbeat_deadline is not None:
        cfg = MembershipConfig(**{**cfg.__dict__, "heartbeat_deadline": heartbeat_deadline})
    coord = Coordinator(listen, secret=secret, config=cfg, metrics=metrics)
    bound = await coord.start()
    try:
        if ready is not None:
            ready(bound)
        await (stop.wait() if stop is not None else asyncio.Future())
    finally:
        await coord.close()


def _parser() -> argparse.ArgumentParser:
    d = MembershipConfig()
    p = argparse.ArgumentParser(prog="pccl coordinator", description="Run the membership coordinator of a run.")
    p.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_COORDINATOR_PORT}", help="HOST:PORT (port 0: any)")
    p.add_argument("--secret", default=None, help="run secret (default: env PCCL_SECRET, else empty)")
    p.add_argument("--heartbeat-interval", type=float, default=d.heartbeat_interval)
    p.add_argument("--heartbeat-deadline", type=float, default=d.heartbeat_deadline,
                   help="a peer silent this long is removed (seconds)")
    p.add_argument("--probe-timeout", type=float, default=d.probe_timeout,
                   help="a reported/disconnected peer must answer a probe this fast (seconds)")
    p.add_argument("--reconnect-allowance", type=float, default=d.reconnect_allowance,
                   help="extra probe time when only a peer's control connection closed (seconds)")
    p.add_argument("--mismatch-grace", type=float, default=d.mismatch_grace)
    p.add_argument("--recovery-grace", type=float, default=d.recovery_grace,
                   help="after a start, time for accepted peers to re-introduce themselves")
    p.add_argument("--probe-bytes", type=int, default=d.optimize.probe_bytes,
                   help="optimize_topology: bytes per bandwidth probe (one directed pair)")
    p.add_argument("--probe-bytes-timeout", type=float, default=d.optimize.probe_timeout,
                   help="optimize_topology: seconds one bandwidth probe may take")
    p.add_argument("--min-gain", type=float, default=d.optimize.min_gain,
                   help="optimize_topology: a ring moves only for a bottleneck this much faster (0.1: 10%%)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", choices=logs.FORMATS, default="text",
                   help="text, or json: one object per line")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on this port (0: any free one; it is logged)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address the metrics port listens on (default 127.0.0.1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup("coordinator", args.log_level, args.log_format)
    secret = (args.secret if args.secret is not None else os.environ.get("PCCL_SECRET", "")).encode()
    cfg = MembershipConfig(
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_deadline=args.heartbeat_deadline,
        probe_timeout=args.probe_timeout,
        reconnect_allowance=args.reconnect_allowance,
        mismatch_grace=args.mismatch_grace,
        recovery_grace=args.recovery_grace,
        optimize=OptimizeConfig(probe_bytes=args.probe_bytes, probe_timeout=args.probe_bytes_timeout,
                                min_gain=args.min_gain),
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)

        def ready(addr: str) -> None:
            print(f"pccl coordinator listening on {addr}", flush=True)

        metrics = None
        if args.metrics_port is not None:
            metrics = Metrics("coordinator")
            port = metrics.serve(args.metrics_port, args.metrics_host)
            log.info("metrics on http://%s:%d/metrics", args.metrics_host, port)
        try:
            await serve(args.listen, secret=secret, config=cfg, ready=ready, stop=stop, metrics=metrics)
        finally:
            if metrics is not None:
                metrics.close()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        uvloop = None
    try:
        if uvloop is not None:
            uvloop.run(run())
        else:
            asyncio.run(run())
    except InvalidUsage as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
