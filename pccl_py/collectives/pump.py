"""Large payloads off the event loop: a receive thread and a send thread per data stream.

The event loop keeps every decision (handshake, routing, schedules, failures, timers).
What leaves it is the part of a large frame that costs CPU: the system calls that copy
payload bytes between a socket and the caller's buffer (``recv_into`` and ``sendmsg``
release the GIL) and the reduction of received bytes (the native kernels release it).
A :class:`Pump` is given one job at a time per direction by its stream and reports the
end of each job back to the loop with ``call_soon_threadsafe``; while a receive job runs
the stream's transport does not read, and while a send job runs the stream queues its
other frames, so the bytes of two frames never interleave on a socket.

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
             done: Done) -> None:
        """Fill ``view[pos:]`` from the socket; ``progress(pos)`` after each read (on the
        thread: it must touch only memory of its own); then ``done(None | error)`` on the loop."""
        if self._rx is None:
            self._rx = self._start("rx", self._rx_loop)
        self._rx.put((view, pos, progress, done))

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

    def _rx_loop(self, sock: socket.socket, view: memoryview, pos: int, progress) -> None:
        n = len(view)
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
