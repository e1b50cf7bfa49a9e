"""Requests to the daemon over its Unix socket, and their replies (:mod:`pccl_py.wire.ipc`).

Several threads of a trainer may have calls in flight at once. One of the waiting threads
at a time reads the socket (the reader) and files every reply under its request id; the
others wait on a condition for theirs. No lock is held across a receive. Progress reports
that arrive for a request go to the callback registered with it, on whichever thread reads.
"""

from __future__ import annotations

import itertools
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable

from pccl_py.errors import DeadlineExceeded, InvalidUsage, PcclError, PeerLost, from_wire
from pccl_py.wire import ipc

log = logging.getLogger("pccl.client")

SLACK = 5.0  # the daemon enforces deadlines; the client waits this much longer before giving up
RECV_SLICE = 0.25  # seconds a wait for the daemon blocks before it checks its deadline


class NoAnswer(DeadlineExceeded):
    """The daemon sent no reply before the client's own deadline (timeout + SLACK)."""


def dial(path: str) -> socket.socket:
    # A blocking socket whose receives give up after SO_RCVTIMEO (see Rpc._recv_timeout): one
    # recv() per wait, where a Python-level timeout costs an ioctl and a poll() besides.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as exc:
        s.close()
        raise PcclError(f"cannot reach the daemon at {path}: {exc}") from exc
    return s


class Rpc:
    """The request/reply connection of one client to its daemon."""

    def __init__(self, path: str) -> None:
        self._ids = itertools.count(1)
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition(threading.Lock())
        self._reading = False  # a waiting thread reads the socket for everyone
        self._waiting = 0  # threads waiting on _cond
        self._send_lock = threading.Lock()
        self._buf = ipc.FrameBuffer()
        self._progress: dict[int, Callable[[int, int], None]] = {}  # request id -> callback
        self._rcvtimeo = 0  # microseconds; set before each wait
        self._sock: socket.socket | None = dial(path)

    @property
    def closed(self) -> bool:
        return self._sock is None

    def send(self, msg: dict, progress: Callable[[int, int], None] | None = None) -> int:
        """Send a request; returns its id for :meth:`wait`. ``progress(done, total)`` gets
        the reports the daemon sends for it until :meth:`forget`."""
        if self._sock is None:
            raise InvalidUsage("client is closed")
        rid = next(self._ids)  # (itertools.count is atomic under the GIL)
        msg["id"] = rid
        if progress is not None:  # before the request: another thread may read its first report
            self._progress[rid] = progress
        data = ipc.pack(msg)
        with self._send_lock:
            self._sock.sendall(data)
        return rid

    def forget(self, rid: int) -> None:
        """No more progress reports for request ``rid``."""
        self._progress.pop(rid, None)

    def call(self, msg: dict, timeout: float) -> dict:
        """Send a request and wait for its reply (``timeout``, unless the request names one,
        is the daemon's deadline; the client waits ``SLACK`` longer)."""
        msg.setdefault("timeout", timeout)
        rid = self.send(msg)
        return self.wait(rid, time.monotonic() + timeout + SLACK)

    def wait(self, rid: int, deadline: float) -> dict:
        """The reply to request ``rid``, or its error raised; ``NoAnswer`` at ``deadline``."""
        cond = self._cond
        while True:
            with cond:
                while rid not in self._replies and self._reading:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise NoAnswer("the daemon did not answer in time")
                    self._waiting += 1
                    try:
                        cond.wait(min(left, RECV_SLICE))
                    finally:
                        self._waiting -= 1
                reply = self._replies.pop(rid, None)
                if reply is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoAnswer("the daemon did not answer in time")
                self._reading = True  # this thread reads for everyone until its next receive ends
            try:
                self._read_once(min(left, RECV_SLICE))
            finally:
                with cond:
                    self._reading = False
                    if self._waiting:  # (one thread alone, the usual case, skips the wake-up)
                        cond.notify_all()
        if not reply.pop("ok", False):
            raise from_wire(reply)
        reply.pop("id", None)
        return reply

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _recv_timeout(self, seconds: float) -> None:
        """Make the next receives give up after ``seconds`` (a syscall only when it changes)."""
        us = max(1, int(seconds * 1e6))  # a zero SO_RCVTIMEO would mean "never"
        if us != self._rcvtimeo:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", *divmod(us, 1_000_000)))
            self._rcvtimeo = us

    def _read_once(self, seconds: float) -> None:
        """One receive of at most ``seconds`` (by the reading thread): replies are filed."""
        self._recv_timeout(seconds)
        try:
            data = self._sock.recv(1 << 16)
        except BlockingIOError:  # SO_RCVTIMEO passed: the waiters look at their deadlines
            return
        if not data:
            raise PeerLost("the daemon closed the connection (did it crash? see its log)")
        for m in self._buf.feed(data):
            if "progress" in m and "ok" not in m:
                self._on_progress(m)
            else:
                with self._cond:
                    self._replies[m.get("id")] = m

    def _on_progress(self, msg: dict) -> None:
        callback = self._progress.get(msg.get("id"))
        done_total = msg.get("progress")
        if callback is not None and isinstance(done_total, list) and len(done_total) == 2:
            try:  # runs on whichever thread reads: an error must not lose other threads' replies
                callback(int(done_total[0]), int(done_total[1]))
            except Exception:
                log.exception("progress callback failed")
