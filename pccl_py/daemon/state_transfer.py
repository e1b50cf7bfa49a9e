"""Peer-to-peer shared-state transfer: :func:`fetch` (a daemon's :class:`StateServer` is the other end).

An outdated peer pulls the elected state from several up-to-date peers at once. All
bytes to move are cut into chunks held in one shared queue; every source gets
``streams_per_source`` TCP connections, each taking the next chunk when it has room
(work stealing: faster sources move more, and the chunks of a source that dies or stalls
go back to the queue for the others). Payload is read by an ``asyncio.BufferedProtocol``
straight into the destination view and written by the server straight from the
published view (``transport.write(memoryview)`` then drain), so no Python copy of payload
is made on either side. After the last chunk the receiver hashes every tensor and
refuses content whose xxh3-128 differs from the elected hash (:class:`HashMismatch`).

Every connection first authenticates its source (:mod:`pccl_py.wire.state_transfer`):
the source must prove the run secret under the peer id the sync plan named. A source that
cannot is dropped before any request goes to it, like a dead one (its share goes to the
other sources), and a fetch that no other source can finish fails with
:class:`~pccl_py.errors.Unauthenticated` naming it. After the handshake every request,
reply header, payload and refusal carries a tag under the connection's session keys, and
payload is checked by the elected content hashes as well.

This module is the fetcher's I/O: sockets, deadlines, the event loop. The byte format is
:mod:`pccl_py.wire.state_transfer`; the decisions (chunks, the shared queue, what a failed
stream's chunks become, which error ends a fetch, the hash verdict and repair, what a
server refuses) are :mod:`pccl_py.daemon.transfer_plan`; the server is
:mod:`pccl_py.daemon.state_server`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pccl_py.calls import byte_view
from pccl_py.daemon.state_hash import hash_buffers_async
from pccl_py.daemon.state_server import Source, StateServer
from pccl_py.daemon.transfer_plan import (
    DEFAULT_CHUNK,
    HashMismatch,
    Mismatch,
    SourceRefused,
    Stream,
    TransferPlan,
    Verification,
)
from pccl_py.errors import InvalidUsage, PeerLost, ProtocolError, Unauthenticated
from pccl_py.retry import Backoff
from pccl_py.wire import state_transfer as wire

__all__ = ["DEFAULT_CHUNK", "HashMismatch", "Source", "SourceRefused", "StateServer", "fetch"]

log = logging.getLogger("pccl.state_transfer")

# A source that closes a connection before its HELLO holds too many unauthenticated
# connections from this address (a flood, or a burst of fetchers): try again like this,
# for at most the stall timeout.
BUSY_BACKOFF = Backoff(initial=0.05, maximum=0.5, factor=2.0, jitter=0.2, deadline=10.0)


class SourceBusy(PeerLost):
    """A source closed the connection before its HELLO (it refuses connections for now)."""


class _SourceConn(asyncio.BufferedProtocol):
    """One connection to a state source; authenticates it, then reads reply payloads straight
    into destination views.

    The framing is :class:`~pccl_py.wire.state_transfer.ReplyReader`'s and the handshake
    :class:`~pccl_py.wire.state_transfer.ClientHandshake`'s; this class only points the
    transport's reads at the scratch buffer or the destination, answers the HELLO, settles
    ``ready`` when the source has proved itself and the futures of the requests it sent,
    in order.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, source: Source, secret: bytes, peer_id: str) -> None:
        self.loop = loop
        self.label = source.label
        self.handshake = wire.ClientHandshake(secret, peer_id, source.peer_id)
        self.session: wire.Session | None = None
        self.transport: asyncio.Transport | None = None
        self.reader = wire.ReplyReader()
        self.scratch = bytearray(wire.ReplyReader.SCRATCH)
        self.got = 0
        self.heard = False  # any byte came from the source
        self.dest: memoryview | None = None
        self.pending: collections.deque[tuple[memoryview, asyncio.Future]] = collections.deque()
        self.ready: asyncio.Future = loop.create_future()  # the handshake is done
        self.error: BaseException | None = None
        self.progress_at = loop.time()

    # protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.error is not None:
            return memoryview(self.scratch)  # the connection is over: whatever still comes is dropped
        if self.reader.mode == "payload":
            return self.dest[self.got:]  # type: ignore[index]
        return memoryview(self.scratch)[self.got:self.reader.need]

    def buffer_updated(self, nbytes: int) -> None:
        self.got += nbytes
        self.heard = True
        self.progress_at = self.loop.time()
        if self.error is not None:
            self.got = 0
            return
        if self.got < self.reader.need:
            return
        mode = self.reader.mode
        data = None if mode == "payload" else memoryview(self.scratch)[:self.reader.need]
        self.got = 0
        try:
            event, value = self.reader.complete(data, payload=self.dest if mode == "ptag" else None)
            if event == "hello":
                self.transport.write(self.handshake.auth(*value))  # type: ignore[union-attr,misc]
            elif event == "proof":
                self.session = self.handshake.finish(value)
                self.reader.keyed(self.session.recv)
                if not self.ready.done():
                    self.ready.set_result(None)
        except Unauthenticated as exc:
            self.fail(Unauthenticated(f"state source {self.label}: {exc}"))
            return
        except ProtocolError as exc:
            self.fail(ProtocolError(f"state source {self.label}: {exc}"))
            return
        if event == "payload":
            self.dest = self.pending[0][0]
        elif event == "answered":
            _, fut = self.pending.popleft()
            self.dest = None
            if not fut.done():
                fut.set_result(value)
        elif event == "refused":
            if not self.reader.authenticated:  # it refused our proof: it does not hold the run's secret
                self.fail(Unauthenticated(f"state source {self.label} refused this peer's proof: {value}"))
            else:
                self.fail(SourceRefused(f"state source {self.label} refused: {value}"))
        # "more": the rest of the message is read next

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.heard:
            self.fail(SourceBusy(f"state source {self.label} closed the connection before its hello"))
        else:
            self.fail(PeerLost(f"state source {self.label} closed the connection" + (f": {exc}" if exc else "")))

    def fail(self, exc: BaseException) -> None:
        """The connection is over: the handshake and every request on it fail with the first cause."""
        if self.error is None:
            self.error = exc
        if not self.ready.done():
            self.ready.set_exception(self.error)
            self.ready.exception()  # mark retrieved
        while self.pending:
            _, fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(self.error)
                fut.exception()
        self.dest = None
        self.got = 0
        if self.transport is not None:
            self.transport.abort()

    # calls
    def request(self, name: str, revision: int, offset: int, dest: memoryview) -> asyncio.Future:
        """Ask for ``len(dest)`` bytes of ``name`` at ``offset``, to land in ``dest`` (after ``ready``)."""
        fut = self.loop.create_future()
        if self.error is None and (self.transport is None or self.transport.is_closing()):
            self.error = PeerLost(f"stream to state source {self.label} is closed")
        if self.error is None and self.session is None:
            self.error = ProtocolError(f"a request to {self.label} before its handshake")
        if self.error is not None:
            fut.set_exception(self.error)
            fut.exception()
            return fut
        self.pending.append((dest, fut))
        self.reader.asked(len(dest))
        self.transport.write(wire.encode_request(name, revision, offset, len(dest), self.session.send))  # type: ignore
        return fut


class _Wake:
    """Wakes the streams of one pass that wait for a chunk given back or for the end."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def wait(self):
        return self._event.wait()


def _sources(sources: Sequence[Source | tuple[str, str, int]]) -> list[Source]:
    out = []
    for s in sources:
        if len(s) != 3:
            raise InvalidUsage(f"a state source is (peer_id, host, port), got {s!r}: the fetcher "
                               "authenticates every source as the peer it expects")
        out.append(Source(str(s[0]), str(s[1]), int(s[2])))
    return list(dict.fromkeys(out))


async def fetch(
    sources: Sequence[Source | tuple[str, str, int]],
    tensors: Mapping[str, tuple[Any, bytes]],
    *,
    secret: bytes = b"",
    peer_id: str = "",
    revision: int,
    streams_per_source: int = 2,
    chunk: int = DEFAULT_CHUNK,
    pipeline: int = 2,
    timeout: float = 60.0,
    stall_timeout: float = 10.0,
    connect_timeout: float = 5.0,
    progress: Callable[[int, int], None] | None = None,
    verify: bool = True,
    repair: bool = True,
) -> dict[str, Any]:
    """Pull ``tensors`` ({name: (writable dest buffer, expected xxh3-128)}) at ``revision``.

    Bytes are striped over ``sources`` (:class:`Source`: the peer id each StateServer must
    prove, its host and port). A source that fails, stalls for ``stall_timeout`` s or
    fails authentication is dropped and its chunks go to the others (a source that closes
    connections before its HELLO is busy: its streams reconnect with backoff for up to
    ``stall_timeout`` s). If the
    striped content does not hash right and ``repair`` is set, the bad tensors are
    fetched again from one source at a time until one delivers the elected bytes
    (sources that deliver other bytes are listed in ``rejected_sources``).
    Raises PeerLost (every source failed; the reasons are in the message), Unauthenticated
    (every source failed and some failed authentication; it names them),
    DeadlineExceeded (``timeout`` s end to end), HashMismatch (no source delivered the
    elected content), InvalidUsage (bad arguments). On any failure the destinations hold
    partial data and the call may be retried. Returns {"rx_bytes", "seconds",
    "sources_used", "sources_failed", "rejected_sources", "per_source", "chunks",
    "retried_chunks", "hash_seconds"}.
    """
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    deadline = t0 + timeout
    if chunk <= 0 or streams_per_source <= 0 or pipeline <= 0:
        raise InvalidUsage("chunk, streams_per_source and pipeline must be positive")
    dests = {n: (byte_view(buf, f"fetch destination {n!r}", writable=True), bytes(h)) for n, (buf, h) in tensors.items()}
    srcs = _sources(sources)
    by_label = {s.label: s for s in srcs}
    opts = (revision, secret, peer_id, streams_per_source, chunk, pipeline, deadline, stall_timeout,
            connect_timeout, timeout)
    plan = await _transfer(srcs, dests, opts, progress)
    t_hash = loop.time()
    check = Verification(plan, await _mismatches(dests) if verify else [], repair)
    while (label := check.next_source()) is not None:
        # striped bytes are wrong somewhere: find a source whose own bytes are right
        sub = {n: dests[n] for n in check.wanted}
        try:
            again = await _transfer([by_label[label]], sub, opts, None)
        except (PeerLost, ProtocolError) as exc:
            check.refetch_failed(label, str(exc))
            continue
        if not check.refetched(label, again, await _mismatches(sub)):
            log.warning("fetch: source %s delivered content that is not the elected state", label)
    err = check.verdict()
    if err is not None:
        raise err
    t1 = loop.time()
    return {
        "rx_bytes": check.rx_bytes,
        "seconds": t1 - t0,
        "hash_seconds": t1 - t_hash,
        "sources_used": check.sources_used,
        "sources_failed": check.failures,
        "rejected_sources": check.rejected,
        "per_source": check.per_source,
        "chunks": check.chunks,
        "retried_chunks": check.retried,
    }


async def _mismatches(dests: Mapping[str, tuple[memoryview, bytes]]) -> list[Mismatch]:
    got = await hash_buffers_async({n: v for n, (v, _) in dests.items()})
    return [Mismatch(n, h, got[n]) for n, (_, h) in sorted(dests.items()) if got[n] != h]


async def _transfer(srcs: list[Source], dests: Mapping[str, tuple[memoryview, bytes]], opts: tuple,
                    progress: Callable[[int, int], None] | None) -> TransferPlan:
    """Move every byte of ``dests`` from ``srcs``; raise PeerLost / Unauthenticated /
    DeadlineExceeded if that fails."""
    revision, secret, peer_id, streams, chunk, pipeline, deadline, stall_timeout, connect_timeout, timeout = opts
    loop = asyncio.get_running_loop()
    plan = TransferPlan({n: len(v) for n, (v, _) in dests.items()}, chunk, [s.label for s in srcs])
    if plan.finished or not srcs:
        err = plan.verdict()
        if err is not None:
            raise err
        return plan
    views = {n: v for n, (v, _) in dests.items()}
    wake = _Wake()
    workers = [
        asyncio.ensure_future(_worker(plan, wake, (src.label, k), src, views, revision, secret, peer_id,
                                      pipeline, deadline, stall_timeout, connect_timeout, progress))
        for src in srcs
        for k in range(streams)
    ]
    try:
        done, not_done = await asyncio.wait(workers, timeout=max(0.0, deadline - loop.time()))
    finally:
        for w in workers:
            if not w.done():
                w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    for w in done:
        if not w.cancelled() and w.exception() is not None:
            raise w.exception()  # a bug in _worker; it catches remote failures itself
    err = plan.verdict(timed_out=bool(not_done), timeout=timeout)
    if err is not None:
        raise err
    return plan


async def _worker(plan: TransferPlan, wake: _Wake, stream: Stream, src: Source,
                  views: Mapping[str, memoryview], revision: int, secret: bytes, peer_id: str, depth: int,
                  deadline: float, stall_timeout: float, connect_timeout: float,
                  progress: Callable[[int, int], None] | None) -> None:
    """One stream: takes chunks from ``plan`` while it has room, asks ``src`` for them, reports
    what lands; when it ends, the plan gets its unanswered chunks back."""
    loop = asyncio.get_running_loop()
    label = stream[0]
    conn: _SourceConn | None = None
    asked: collections.deque[asyncio.Future] = collections.deque()  # plan.held(stream)'s requests
    failure: str | None = None
    unauthenticated = False
    try:
        if plan.finished:
            return
        conn = await _connect(src, secret, peer_id, deadline, connect_timeout, stall_timeout)
        while True:
            for c in plan.take(stream, depth - len(asked)):
                asked.append(conn.request(c.name, revision, c.offset, views[c.name][c.offset:c.offset + c.length]))
            if not asked:
                if plan.finished:
                    wake.notify()
                    return
                await wake.wait()
                continue
            fut = asked[0]
            while not fut.done():
                wait = min(stall_timeout, max(0.0, deadline - loop.time())) / 4 + 0.01
                await asyncio.wait([fut], timeout=wait)
                if not fut.done() and loop.time() - conn.progress_at > stall_timeout:
                    raise PeerLost(f"{label} sent nothing for {stall_timeout:g} s")
            fut.result()  # raises the connection's failure
            asked.popleft()
            plan.landed(stream)
            if progress is not None:
                progress(plan.done_bytes, plan.total)
            if plan.finished:
                wake.notify()
    except (PeerLost, ProtocolError) as exc:
        failure = str(exc)
        unauthenticated = isinstance(exc, Unauthenticated)
        (log.warning if unauthenticated else log.info)("fetch: dropping a stream to %s: %s", label, exc)
    finally:
        # unanswered chunks go back to the front of the queue for the other streams
        if plan.release(stream, failure, unauthenticated=unauthenticated):
            wake.notify()
        for fut in asked:
            if not fut.done():
                fut.cancel()
        if conn is not None:
            conn.fail(PeerLost(f"stream to {label} closed by the fetcher"))


async def _connect(src: Source, secret: bytes, peer_id: str, deadline: float, connect_timeout: float,
                   busy_for: float) -> _SourceConn:
    """A connection to ``src`` past its handshake: ``src`` proved the secret as ``src.peer_id``.
    A source that is busy (it closes before its HELLO) is tried again with BUSY_BACKOFF for
    up to ``busy_for`` seconds; every other failure raises at once (PeerLost,
    Unauthenticated, ProtocolError)."""
    loop = asyncio.get_running_loop()
    delays = dataclasses.replace(BUSY_BACKOFF, deadline=busy_for).delays()
    while True:
        left = max(0.001, min(connect_timeout, deadline - loop.time()))
        conn: _SourceConn | None = None
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _SourceConn(loop, src, secret, peer_id), src.host, src.port), left)
            await asyncio.wait_for(asyncio.shield(conn.ready), left)
            return conn
        except SourceBusy:
            pause = next(delays, None)
            if pause is None or loop.time() + pause > deadline:
                raise
            await asyncio.sleep(pause)
        except asyncio.TimeoutError:
            if conn is not None:
                conn.fail(PeerLost(f"no handshake with {src.label}"))
            raise PeerLost(f"no answer from {src.label} within {left:.1f} s") from None
        except OSError as exc:
            raise PeerLost(f"cannot connect to {src.label}: {exc}") from None
