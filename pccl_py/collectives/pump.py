"""Large payloads off the event loop: a receive thread and a send thread per data stream.

The event loop keeps every decision (handshake, routing, schedules, failures, timers).
What leaves it is the part of a large frame that costs CPU: the system calls that copy
payload bytes between a socket and the caller's buffer (``recv_into`` and ``sendmsg``
release the GIL) and the reduction of received bytes (the native kernels release it).
A :class:`Pump` is given one job at a time per direction by its stream and reports the
end of each job back to the loop with ``call_soon_threadsafe``; while a receive job runs
the stream's transport does not read, and while a send job runs the stream queues its
other frames, so the bytes of two frames never interleave on a socket.

With the C extension built, a job is one call of ``_native.recv_fill`` or
``_native.send_all``: the whole frame, and the reduction of a received stripe as its bytes
arrive, with the GIL released once, instead of once per read (a thread that takes the GIL
back after every 64 KiB competes with the event loop and the other streams' threads for
it). Without the extension the same loops run in Python.

Each thread works on a ``dup`` of the stream's socket (the same connection, the same
non-blocking file description) and waits in ``poll`` at most ``_POLL`` seconds at a
time, so a stop request is seen within that bound even on a link that went silent;
:meth:`Pump.stop` with ``hard=True`` also shuts the connection down, which wakes a
thread blocked in ``poll`` at once (SIGKILL of a peer or a closed link ends a job within
milliseconds, not ``_POLL``).
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import threading
from collections.abc import Callable

_POLL = 0.5  # seconds a thread waits in one poll before it checks for a stop request
_POLL_MS = int(_POLL * 1000)

try:
    from .._native import recv_fill, send_all
except ImportError:  # pragma: no cover - only without the extension
    recv_fill = send_all = None

Done = Callable[[BaseException | None], None]


class PumpStopped(ConnectionError):
    """The stream was closed while a job ran."""


class Pump:
    """The I/O threads of one stream (started on first use, ended by :meth:`stop`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, name: str):
        self._loop = loop
        self._fd = sock.fileno()
        self._name = name
        self._lock = threading.Lock()
        self._stopping = False
        self._socks: list[socket.socket] = []  # the dups of live threads (for a hard stop)
        self._rx: queue.SimpleQueue | None = None
        self._tx: queue.SimpleQueue | None = None
        self.threads: list[threading.Thread] = []

    # -- the stream's side ------------------------------------------------------------------
    def recv(self, view: memoryview, pos: int, progress: Callable[[int], None] | None,
             done: Done, reduction=None) -> None:
        """Fill ``view[pos:]`` from the socket, then ``done(None | error)`` on the loop. With
        a ``reduction`` (``Rx.reduction``: ``.pair() -> (acc, other, op, dtype)`` and ``.done``,
        the bytes already reduced), ``acc (op)= other`` follows the bytes as they arrive;
        otherwise ``progress(pos)`` after each read. Either runs on the thread: it must touch
        only memory of this payload's own."""
        if self._rx is None:
            self._rx = self._start("rx", self._rx_loop)
        self._rx.put((view, pos, progress, reduction, done))

    def send(self, header: bytes, payload, done: Done) -> None:
        """Write ``header`` then ``payload`` (no copy); then ``done(None | error)`` on the loop."""
        if self._tx is None:
            self._tx = self._start("tx", self._tx_loop)
        self._tx.put((header, payload, done))

    def stop(self, hard: bool) -> None:
        """End the threads once their job is over; ``hard``: end the job too, by shutting the
        connection down (the stream is being aborted, not closed gracefully)."""
        with self._lock:
            self._stopping = True
            if hard:
                for s in self._socks:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        for q in (self._rx, self._tx):
            if q is not None:
                q.put(None)

    # -- threads ------------------------------------------------------------------------------
    def _start(self, kind: str, body) -> queue.SimpleQueue:
        q: queue.SimpleQueue = queue.SimpleQueue()
        sock = socket.socket(fileno=os.dup(self._fd))
        sock.settimeout(_POLL)  # poll + non-blocking call, as the file description already is
        with self._lock:
            if self._stopping:
                sock.close()
                q.put(None)
                return q
            self._socks.append(sock)
        t = threading.Thread(target=self._run, args=(body, sock, q), name=f"pccl-{kind} {self._name}",
                             daemon=True)
        self.threads.append(t)
        t.start()
        return q

    def _run(self, body, sock: socket.socket, q: queue.SimpleQueue) -> None:
        try:
            while True:
                job = q.get()
                if job is None:
                    return
                done = job[-1]
                try:
                    body(sock, *job[:-1])
                    err = None
                except BaseException as e:  # reported to the loop, which closes the stream
                    err = e
                if not self._report(done, err):
                    return
        finally:
            with self._lock:
                self._socks.remove(sock)
                sock.close()

    def _report(self, done: Done, err: BaseException | None) -> bool:
        try:
            self._loop.call_soon_threadsafe(done, err)
            return True
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            return False

    def _check(self) -> None:
        if self._stopping:
            raise PumpStopped("the stream was closed")

    def _rx_loop(self, sock: socket.socket, view: memoryview, pos: int, progress, reduction) -> None:
        n = len(view)
        if recv_fill is not None:
            fd = sock.fileno()
            if reduction is not None:
                acc, other, op, dtype = reduction.pair()
                red = reduction.done
                while pos < n:
                    pos, red = recv_fill(fd, view, pos, _POLL_MS, acc, other, op, dtype, red)
                    reduction.done = red
                    if pos < n:
                        self._check()
                return
            while pos < n:
                pos, _ = recv_fill(fd, view, pos, _POLL_MS)
                if pos < n:
                    self._check()
            if progress is not None:
                progress(n)
            return
        if reduction is not None:
            progress = reduction.progress
        while pos < n:
            try:
                got = sock.recv_into(view[pos:])
            except TimeoutError:
                self._check()
                continue
            if not got:
                raise ConnectionResetError("the peer closed the connection in the middle of a payload")
            pos += got
            if progress is not None:
                progress(pos)

    def _tx_loop(self, sock: socket.socket, header: bytes, payload) -> None:
        if send_all is not None:
            fd, sent, total = sock.fileno(), 0, len(header) + len(payload)
            while sent < total:
                sent = send_all(fd, header, payload, sent, _POLL_MS)
                if sent < total:
                    self._check()
            return
        bufs = [memoryview(header), memoryview(payload).cast("B")]
        while bufs:
            try:
                sent = sock.sendmsg(bufs)
            except TimeoutError:
                self._check()
                continue
            while bufs and sent >= len(bufs[0]):
                sent -= len(bufs[0])
                bufs.pop(0)
            if sent:
                bufs[0] = bufs[0][sent:]
