"""Peer-to-peer shared-state transfer: a :class:`StateServer` per daemon and :func:`fetch`.

An outdated peer pulls the elected state from several up-to-date peers at once. All
bytes to move are cut into chunks held in one shared queue; every source gets
``streams_per_source`` TCP connections, each taking the next chunk when it has room
(work stealing: faster sources move more, and the chunks of a source that dies or stalls
go back to the queue for the others). Payload is read by an ``asyncio.BufferedProtocol``
straight into the destination view and written by the server straight from the
published view (``transport.write(memoryview)`` then drain), so no Python copy of payload
is made on either side. After the last chunk the receiver hashes every tensor and
refuses content whose xxh3-128 differs from the elected hash (:class:`HashMismatch`).

This module is the I/O: sockets, deadlines, the event loop. The byte format (HELLO,
AUTH, REQ, RESP and their bounds) is :mod:`pccl_py.wire.state_transfer`; the decisions
(chunks, the shared queue, what a failed stream's chunks become, which error ends a
fetch, the hash verdict and repair, what a server refuses) are
:mod:`pccl_py.daemon.transfer_plan`.

A request is answered only for a published tensor at the published revision and with
``offset + length`` inside the tensor; anything else malformed (bad magic, oversized
lengths, wrong proof, out-of-range ranges, garbage) closes the connection with a logged
reason, and the server goes on serving everyone else. Requests on one connection are
answered in order; a client may keep several in flight (``pipeline``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pccl_py.calls import byte_view
from pccl_py.daemon.state_hash import hash_buffers_async
from pccl_py.daemon.transfer_plan import (
    DEFAULT_CHUNK,
    HashMismatch,
    Mismatch,
    SourceRefused,
    Stream,
    TransferPlan,
    Verification,
    refusal,
)
from pccl_py.errors import InvalidUsage, PeerLost, ProtocolError
from pccl_py.wire import state_transfer as wire

__all__ = ["DEFAULT_CHUNK", "HashMismatch", "SourceRefused", "StateServer", "fetch"]

log = logging.getLogger("pccl.state_transfer")


# ---------------------------------------------------------------------------------------
# server


class StateServer:
    """Serves the published shared state to authenticated peers.

    ``StateServer(peer_id, secret=b"", host="127.0.0.1", port=0, idle_timeout=300.0,
    auth_timeout=10.0, max_connections=1024)``;
    ``await start()`` returns the bound ``(host, port)``; ``publish(revision, {name: view})``
    makes the views servable (they must stay valid and unchanged until ``unpublish()``,
    which also drops every open connection); ``tx_bytes`` counts payload bytes handed
    to the transport since the last ``publish``; ``await close()``.
    """

    def __init__(self, peer_id: str = "", *, secret: bytes = b"", host: str = "127.0.0.1", port: int = 0,
                 idle_timeout: float = 300.0, auth_timeout: float = 10.0, max_connections: int = 1024) -> None:
        self.peer_id = peer_id
        self.secret = secret
        self.host = host
        self.port = port
        self.idle_timeout = idle_timeout
        self.auth_timeout = auth_timeout
        self.max_connections = max_connections
        self.revision: int | None = None
        self.views: dict[str, memoryview] = {}
        self.tx_bytes = 0
        self.refused = 0  # connections closed for bad input (for tests and status)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._die_at: int | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.address

    def publish(self, revision: int, views: Mapping[str, Any]) -> None:
        self.views = {n: byte_view(v, f"shared-state tensor {n!r}") for n, v in views.items()}
        self.revision = revision
        self.tx_bytes = 0

    def inject_death_after(self, nbytes: int) -> None:
        """Fault injection: after serving ``nbytes`` more payload bytes (mid-chunk), stop
        listening and drop every connection, as a crashed daemon would."""
        self._die_at = self.tx_bytes + nbytes

    def _crash(self) -> None:
        log.info("state server %s: injected crash after %d bytes", self.peer_id, self.tx_bytes)
        self._die_at = None
        if self._server is not None:
            self._server.close()
        self.unpublish()

    def unpublish(self) -> None:
        self.views = {}
        self.revision = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.unpublish()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        who = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if len(self._writers) >= self.max_connections:
            self.refused += 1
            log.warning("state server %s: refusing %s: %d connections open", self.peer_id, who, len(self._writers))
            writer.transport.abort()
            return
        self._writers.add(writer)
        graceful = False  # close after a refusal (lets the text arrive); abort otherwise
        try:
            nonce = os.urandom(wire.NONCE_LEN)
            writer.write(wire.encode_hello(nonce))
            n = wire.decode_auth_head(await asyncio.wait_for(reader.readexactly(wire.AUTH.size), self.auth_timeout))
            rest = await asyncio.wait_for(reader.readexactly(n + wire.PROOF_LEN), self.auth_timeout)
            client_id, mac = wire.decode_auth_rest(rest, n)
            if not wire.proof_matches(self.secret, nonce, client_id, mac):
                writer.write(wire.encode_refusal("proof does not match the run secret"))
                await asyncio.wait_for(writer.drain(), self.auth_timeout)
                graceful = True
                raise ProtocolError(f"peer {client_id!r} failed the run-secret proof")
            who = f"{client_id}@{who}"
            writer.write(wire.encode_reply_head(0))
            while True:
                head = await asyncio.wait_for(reader.readexactly(wire.REQ.size), self.idle_timeout)
                n, req = wire.decode_request_head(head)
                req = wire.finish_request(req, await asyncio.wait_for(reader.readexactly(n), self.auth_timeout))
                if writer.transport.is_closing():
                    return  # dropped by unpublish() while the request was read
                text = refusal(self.peer_id, self.revision, self.views, req)
                if text is not None:
                    writer.write(wire.encode_refusal(text))
                    await asyncio.wait_for(writer.drain(), self.auth_timeout)
                    log.info("state server %s: refused %s: %s", self.peer_id, who, text)
                    graceful = True
                    return
                view = self.views[req.name]
                wire.check_range(req, len(view))
                offset, length = req.offset, req.length
                if self._die_at is not None and self.tx_bytes + length > self._die_at:
                    part = max(0, self._die_at - self.tx_bytes)
                    writer.write(wire.encode_reply_head(length) + bytes(view[offset:offset + part]))
                    self.tx_bytes += part
                    self._crash()
                    return
                writer.write(wire.encode_reply_head(length))
                if length:
                    writer.write(view[offset:offset + length])
                self.tx_bytes += length  # handed to the transport
                await asyncio.wait_for(writer.drain(), self.idle_timeout)  # a frozen reader ends here
        except ProtocolError as exc:
            self.refused += 1
            log.warning("state server %s: closing connection from %s: %s", self.peer_id, who, exc)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, OSError):
            pass
        except RuntimeError:
            if not writer.transport.is_closing():  # uvloop raises on writes after close
                raise
        finally:
            self._writers.discard(writer)
            if graceful:
                writer.close()
            else:
                writer.transport.abort()


# ---------------------------------------------------------------------------------------
# client


class _SourceConn(asyncio.BufferedProtocol):
    """One connection to a state source; reads reply payloads straight into destination views.

    The framing is :class:`~pccl_py.wire.state_transfer.ReplyReader`'s; this class only
    points the transport's reads at the scratch buffer or the destination and settles the
    futures of the requests it sent, in order.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, label: str) -> None:
        self.loop = loop
        self.label = label
        self.transport: asyncio.Transport | None = None
        self.reader = wire.ReplyReader()
        self.scratch = bytearray(wire.ReplyReader.SCRATCH)
        self.got = 0
        self.dest: memoryview | None = None
        self.pending: collections.deque[tuple[memoryview | None, asyncio.Future]] = collections.deque()
        self.hello: asyncio.Future = loop.create_future()
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
        self.progress_at = self.loop.time()
        if self.error is not None:
            self.got = 0
            return
        if self.got < self.reader.need:
            return
        data = None if self.reader.mode == "payload" else memoryview(self.scratch)[:self.reader.need]
        self.got = 0
        try:
            event, value = self.reader.complete(data)
        except ProtocolError as exc:
            self.fail(ProtocolError(f"state source {self.label}: {exc}"))
            return
        if event == "nonce":
            if not self.hello.done():
                self.hello.set_result(value)
        elif event == "payload":
            self.dest = self.pending[0][0]
        elif event == "answered":
            _, fut = self.pending.popleft()
            self.dest = None
            if not fut.done():
                fut.set_result(value)
        elif event == "refused":
            self.fail(SourceRefused(f"state source {self.label} refused: {value}"))
        # "text": the refusal's text is read next

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(PeerLost(f"state source {self.label} closed the connection" + (f": {exc}" if exc else "")))

    def fail(self, exc: BaseException) -> None:
        """The connection is over: every request on it fails with the first cause."""
        if self.error is None:
            self.error = exc
        if not self.hello.done():
            self.hello.set_exception(self.error)
            self.hello.exception()  # mark retrieved
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
    def _send(self, data: bytes, dest: memoryview | None) -> asyncio.Future:
        fut = self.loop.create_future()
        if self.error is None and (self.transport is None or self.transport.is_closing()):
            self.error = PeerLost(f"stream to state source {self.label} is closed")
        if self.error is not None:
            fut.set_exception(self.error)
            fut.exception()
            return fut
        self.pending.append((dest, fut))
        self.reader.asked(0 if dest is None else len(dest))
        self.transport.write(data)  # type: ignore[union-attr]
        return fut

    def auth(self, nonce: bytes, secret: bytes, peer_id: str) -> asyncio.Future:
        return self._send(wire.encode_auth(secret, nonce, peer_id), None)

    def request(self, name: str, revision: int, offset: int, dest: memoryview) -> asyncio.Future:
        return self._send(wire.encode_request(name, revision, offset, len(dest)), dest)


class _Wake:
    """Wakes the streams of one pass that wait for a chunk given back or for the end."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def wait(self):
        return self._event.wait()


def _label(src: tuple[str, int]) -> str:
    return f"{src[0]}:{src[1]}"


async def fetch(
    sources: Sequence[tuple[str, int]],
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

    Bytes are striped over ``sources`` ((host, port) of StateServers). A source that fails
    or stalls for ``stall_timeout`` s is dropped and its chunks go to the others. If the
    striped content does not hash right and ``repair`` is set, the bad tensors are
    fetched again from one source at a time until one delivers the elected bytes
    (sources that deliver other bytes are listed in ``rejected_sources``).
    Raises PeerLost (every source failed; the reasons are in the message),
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
    srcs = list(dict.fromkeys((str(h), int(p)) for h, p in sources))
    by_label = {_label(s): s for s in srcs}
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


async def _transfer(srcs: list[tuple[str, int]], dests: Mapping[str, tuple[memoryview, bytes]], opts: tuple,
                    progress: Callable[[int, int], None] | None) -> TransferPlan:
    """Move every byte of ``dests`` from ``srcs``; raise PeerLost / DeadlineExceeded if that fails."""
    revision, secret, peer_id, streams, chunk, pipeline, deadline, stall_timeout, connect_timeout, timeout = opts
    loop = asyncio.get_running_loop()
    plan = TransferPlan({n: len(v) for n, (v, _) in dests.items()}, chunk, [_label(s) for s in srcs])
    if plan.finished or not srcs:
        err = plan.verdict()
        if err is not None:
            raise err
        return plan
    views = {n: v for n, (v, _) in dests.items()}
    wake = _Wake()
    workers = [
        asyncio.ensure_future(_worker(plan, wake, (_label(src), k), src, views, revision, secret, peer_id,
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


async def _worker(plan: TransferPlan, wake: _Wake, stream: Stream, src: tuple[str, int],
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
    try:
        if plan.finished:
            return
        left = max(0.001, min(connect_timeout, deadline - loop.time()))
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(lambda: _SourceConn(loop, label), *src), left)
            nonce = await asyncio.wait_for(conn.hello, left)
            await asyncio.wait_for(conn.auth(nonce, secret, peer_id), left)
        except asyncio.TimeoutError:
            raise PeerLost(f"no answer from {label} within {left:.1f} s") from None
        except OSError as exc:
            raise PeerLost(f"cannot connect to {label}: {exc}") from None
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
        log.info("fetch: dropping a stream to %s: %s", label, exc)
    finally:
        # unanswered chunks go back to the front of the queue for the other streams
        if plan.release(stream, failure):
            wake.notify()
        for fut in asked:
            if not fut.done():
                fut.cancel()
        if conn is not None:
            conn.fail(PeerLost(f"stream to {label} closed by the fetcher"))
