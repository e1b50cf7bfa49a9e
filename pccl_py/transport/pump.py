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
import struct
import threading
from collections.abc import Callable

from pccl_py.transport import seal as S

_POLL = 0.5  # seconds a thread waits in one poll before it checks for a stop request
_POLL_MS = int(_POLL * 1000)

try:
    from pccl_py.kernels._native import recv_fill, send_all
except ImportError:  # pragma: no cover - only without the extension
    recv_fill = send_all = None

Done = Callable[[BaseException | None], None]


class PumpStopped(ConnectionError):
    """The stream was closed while a job ran."""


class Pump:
    """The I/O threads of one stream (started on first use, ended by :meth:`stop`).

    The ``dup`` of the stream's socket is made here, so a process out of file descriptors
    finds out when the stream is set up (the stream then keeps every frame on the event
    loop), not in the middle of a frame. Both threads use it; the last one to end (or
    ``stop`` when none started) closes it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, name: str):
        self._loop = loop
        self._name = name
        self._sock = socket.socket(fileno=os.dup(sock.fileno()))  # OSError: no pump
        self._sock.settimeout(_POLL)  # poll + non-blocking call, as the file description already is
        self._lock = threading.Lock()
        self._users = 1  # this object until stop(), plus each live thread
        self._stopping = False
        self._stop_flag = bytearray(1)  # set by a hard stop: the C loops end between two system calls
        self._rx: queue.SimpleQueue | None = None
        self._tx: queue.SimpleQueue | None = None
        self.threads: list[threading.Thread] = []

    # -- the stream's side ------------------------------------------------------------------
    def recv(self, view: memoryview, pos: int, progress: Callable[[int], None] | None,
             done: Done, reduction=None, seal=None) -> None:
        """Fill ``view[pos:]`` from the socket, then ``done(None | error)`` on the loop. With
        a ``seal`` (begun for this frame), each byte is absorbed into the frame's tag as it
        arrives, before anything else reads it. With a ``reduction`` (``Rx.reduction``:
        ``.pair() -> (acc, other, op, dtype)`` and ``.done``, the bytes already reduced),
        ``acc (op)= other`` follows the bytes as they arrive; otherwise ``progress(pos)``
        after each read. Either runs on the thread: it must touch only memory of this
        payload's own. Raises (OSError, RuntimeError) if no thread can be started; the job
        is then not taken."""
        if self._rx is None:
            self._rx = self._start("rx", self._rx_loop)
        self._rx.put((view, pos, progress, reduction, seal, done))

    def send(self, header: bytes, payload, done: Done, seal=None) -> None:
        """Write ``header`` then ``payload`` (no copy), and with a ``seal`` (begun for this
        frame; an encrypting one has taken the header already) the frame's tag after them;
        then ``done(None | error)`` on the loop. Raises as :meth:`recv` does."""
        if self._tx is None:
            self._tx = self._start("tx", self._tx_loop)
        self._tx.put((header, payload, seal, done))

    def stop(self, hard: bool) -> None:
        """End the threads once their job is over; ``hard``: end the job too (the stream is
        being aborted, not closed gracefully): the C loops stop before their next system
        call, and the connection is shut down with a reset, which wakes a thread blocked in
        poll at once and tells the peer at once."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            if hard:
                self._stop_flag[0] = 1
                try:
                    self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for q in (self._rx, self._tx):
            if q is not None:
                q.put(None)
        self._release()

    # -- threads ------------------------------------------------------------------------------
    def _start(self, kind: str, body) -> queue.SimpleQueue:
        q: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            if self._stopping:
                q.put(None)
                return q
            self._users += 1
        t = threading.Thread(target=self._run, args=(body, q), name=f"pccl-{kind} {self._name}", daemon=True)
        try:
            t.start()
        except BaseException:
            self._release()
            raise
        self.threads.append(t)
        return q

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self._sock.close()

    def _run(self, body, q: queue.SimpleQueue) -> None:
        try:
            while True:
                job = q.get()
                if job is None:
                    return
                done = job[-1]
                try:
                    body(self._sock, *job[:-1])
                    err = None
                except BaseException as e:  # reported to the loop, which closes the stream
                    err = e
                if not self._report(done, err):
                    return
        finally:
            self._release()

    def _report(self, done: Done, err: BaseException | None) -> bool:
        try:
            self._loop.call_soon_threadsafe(done, err)
            return True
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            return False

    def _check(self) -> None:
        if self._stopping:
            raise PumpStopped("the stream was closed")

    def _rx_loop(self, sock: socket.socket, view: memoryview, pos: int, progress, reduction, seal) -> None:
        n = len(view)
        if recv_fill is not None and (seal is None or S.native(seal)):
            fd = sock.fileno()
            pair = reduction.pair() if reduction is not None else (None, None, "sum", "uint8")
            red = reduction.done if reduction is not None else pos
            while pos < n:
                pos, red = recv_fill(fd, view, pos, _POLL_MS, *pair, red, self._stop_flag, seal)
                if reduction is not None:
                    reduction.done = red
                if pos < n:
                    self._check()
            if reduction is None and progress is not None:
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
            if seal is not None:
                got_view = view[pos:pos + got]
                if seal.encrypting:
                    seal.crypt(got_view, got_view)
                else:
                    seal.absorb(got_view)
            pos += got
            if self._stop_flag[0]:
                raise PumpStopped("the stream was closed")
            if progress is not None:
                progress(pos)

    def _tx_loop(self, sock: socket.socket, header: bytes, payload, seal) -> None:
        if send_all is not None and (seal is None or S.native(seal)):
            fd, sent = sock.fileno(), 0
            total = len(header) + len(payload) + (S.TAG_BYTES if seal is not None else 0)
            while sent < total:
                sent = send_all(fd, header, payload, sent, _POLL_MS, self._stop_flag, seal)
                if sent < total:
                    self._check()
            return
        bufs = [memoryview(header), memoryview(payload).cast("B")]
        if seal is not None:
            if seal.encrypting:  # (its header was taken by the stream: _begin_frame)
                bufs[1] = memoryview(seal.crypt(bufs[1]))
            else:
                seal.absorb(bufs[0])
                seal.absorb(bufs[1])
            bufs.append(memoryview(seal.tag()))
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
            if self._stop_flag[0]:
                raise PumpStopped("the stream was closed")
