"""zmq sockets on an asyncio loop, and the coordinator's address forms.

Sockets are plain (synchronous) zmq sockets pumped by the event loop's reader callback
(:class:`ZmqPump`), which works the same on asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import zmq

from pccl_py.errors import InvalidUsage

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
