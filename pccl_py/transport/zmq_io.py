"""zmq sockets on an asyncio loop, the coordinator's address forms, and CURVE.

Sockets are plain (synchronous) zmq sockets pumped by the event loop's reader callback
(:class:`ZmqPump`), which works the same on asyncio and uvloop.

Every control-plane socket speaks CURVE with keys derived from the run secret
(:func:`pccl_py.wire.keys.curve_keypair`): the coordinator's ROUTER is the CURVE server
(:func:`curve_server`), every socket that talks to it a CURVE client holding the member key
pair (:func:`curve_client`). A handshake that fails is reported by the socket monitor
(:data:`HANDSHAKE_FAILED`); :func:`client_handshake_failure` and
:func:`server_reject_reason` say what each failure means on either side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import zmq

from pccl_py.errors import InvalidUsage
from pccl_py.wire import keys

log = logging.getLogger("pccl.zmq")

DEFAULT_COORDINATOR_PORT = 48148


def parse_addr(addr: str, default_port: int = DEFAULT_COORDINATOR_PORT) -> tuple[str, int]:
    """'host:port' (or 'tcp://host:port', or 'host') -> (host, port)."""
    text = addr.removeprefix("tcp://")
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise InvalidUsage(f"bad address {addr!r}: expected HOST:PORT") from None


def zmq_endpoint(addr: str) -> str:
    host, port = parse_addr(addr)
    return f"tcp://{host}:{port}"


HANDSHAKE_FAILED = frozenset({
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,  # the peer closed (or the link broke) mid-handshake
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,  # value: a zmq.PROTOCOL_ERROR_* code
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,  # value: the ZAP status code (400: denied)
})
HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | sum(HANDSHAKE_FAILED)


def curve_server(sock: zmq.Socket, secret: bytes) -> None:
    """Make ``sock`` the run's CURVE server: it holds the coordinator key pair of ``secret``.
    Which clients it admits is the ZAP handler's call (:mod:`pccl_py.transport.zap`), which
    must be bound on the socket's context before the socket binds."""
    public, secret_key = keys.curve_keypair(secret, "coordinator")
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key)
    sock.setsockopt(zmq.ZAP_DOMAIN, b"pccl")


def curve_client(sock: zmq.Socket, secret: bytes) -> None:
    """Make ``sock`` a CURVE client of the run's coordinator: it presents the member key pair
    of ``secret`` and completes a handshake only with a server holding the coordinator's
    secret key, so a process without the run secret can neither talk to the coordinator nor
    pose as it. Call before ``connect``."""
    public, secret_key = keys.curve_keypair(secret, "member")
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.curve_keypair(secret, "coordinator")[0])
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key)


def client_handshake_failure(event: int, value: int, addr: str, who: str = "this daemon",
                             secret_name: str = "PCCL_SECRET") -> str:
    """What a failed CURVE handshake with the coordinator at ``addr`` (monitor ``event`` and
    its ``value``) tells a client, and what to do about it (``secret_name``: where the client's
    secret came from)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"the coordinator at {addr} refused {who}'s credentials (status {value}): "
                f"is {secret_name} the same on both?")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return (f"the process at {addr} could not prove the run secret: it does not speak CURVE "
                    "(is it this run's coordinator, of this pccl_py version?)")
        return (f"the process at {addr} could not prove the run secret (CURVE handshake: protocol "
                f"error {value:#x}): is it this run's coordinator, with the same {secret_name}?")
    # the usual answer of a CURVE server with other keys: it cannot read our HELLO and hangs up
    return (f"the coordinator at {addr} refused {who}'s credentials (it closed the connection "
            f"during the CURVE handshake): is {secret_name} the same on both? (Otherwise the process "
            f"at {addr} could not prove the run secret: is it this run's coordinator?)")


def server_reject_reason(event: int, value: int) -> str:
    """The coordinator's label (``pccl_rejected_connections_total{port="control",reason}``) for a client's
    failed handshake."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "denied"  # it knew the coordinator's public key but not the member key pair
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            return "wrong_secret"  # its HELLO was not for this coordinator's key
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return "no_curve"
        return "malformed"
    return "incomplete"  # closed during the handshake


def close_monitored(sock: zmq.Socket | None, monitor: zmq.Socket | None, linger_ms: int) -> None:
    """Close a socket that has a monitor, and its monitor socket (either may be None)."""
    if sock is not None:
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        sock.close(linger=linger_ms)
    if monitor is not None:
        monitor.close(linger=0)


class ZmqPump:
    """Feed every frame set a zmq socket receives to ``on_frames``, from the event loop.

    zmq's FD is edge-triggered: the reader callback drains until EAGAIN, and
    :meth:`kick` (call it after sending from outside the callback) drains again soon.
    """

    def __init__(self, sock: zmq.Socket, on_frames: Callable[[list], None], *, copy: bool = False):
        self.sock = sock
        self.on_frames = on_frames
        self.copy = copy
        self.loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._scheduled = False
        self._closed = False
        self.loop.add_reader(self._fd, self.drain)
        self.kick()  # events may be pending already: the edge would never come

    def kick(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self.loop.call_soon(self.drain)

    def drain(self) -> None:
        self._scheduled = False
        for _ in range(256):
            if self._closed:
                return
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=self.copy)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.debug("zmq recv failed: %s", exc)
                return
            try:
                self.on_frames(frames)
            except Exception:  # a handler bug must not stop the pump
                log.exception("control message handler failed")
        self.kick()  # more may be waiting: yield to the loop, then go on

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self._fd)
