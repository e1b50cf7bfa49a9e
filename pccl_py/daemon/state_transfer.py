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

Wire format (all integers little-endian)::

    server -> client  HELLO  b"PXS1" nonce[32]
    client -> server  AUTH   b"PXA1" u16 id_len, peer_id[id_len], proof[32]
                             proof = HMAC-SHA256(secret, nonce | peer_id)
    client -> server  REQ    b"PXQ1" u16 name_len, i64 revision, u64 offset, u64 length, name
    server -> client  RESP   b"PXR1" u8 status, u64 length, then `length` bytes:
                             status 0: payload (the answer to AUTH has length 0)
                             status 1: refusal text (UTF-8, <= 1024 bytes); the server closes

A request is answered only for a published tensor at the published revision and with
``offset + length`` inside the tensor; anything else malformed (bad magic, oversized
lengths, wrong proof, out-of-range ranges, garbage) closes the connection with a logged
reason, and the server goes on serving everyone else. Requests on one connection are
answered in order; a client may keep several in flight (``pipeline``).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pccl_py.daemon.state_hash import hash_buffers_async
from pccl_py.errors import DeadlineExceeded, InvalidUsage, PeerLost, ProtocolError
from pccl_py.wire.control import short

log = logging.getLogger("pccl_py.statexfer")

HELLO = struct.Struct("<4s32s")
AUTH = struct.Struct("<4sH")
REQ = struct.Struct("<4sHqQQ")
RESP = struct.Struct("<4sBQ")
M_HELLO, M_AUTH, M_REQ, M_RESP = b"PXS1", b"PXA1", b"PXQ1", b"PXR1"
MAX_ID = 128
MAX_NAME = 1024
MAX_TEXT = 1024
MAX_REQUEST = 1 << 30  # bytes in one request
DEFAULT_CHUNK = 4 << 20


class HashMismatch(ProtocolError):
    """Fetched content does not hash to the elected hash (a corrupt or lying source)."""


class SourceRefused(ProtocolError):
    """A source answered a request with a refusal (wrong revision, unknown tensor, bad proof)."""


def proof(secret: bytes, nonce: bytes, peer_id: str) -> bytes:
    """HMAC-SHA256(secret, nonce | peer_id)."""
    return hmac.new(secret, nonce + peer_id.encode(), hashlib.sha256).digest()


def _as_bytes_view(buf: Any, writable: bool = False) -> memoryview:
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if not mv.c_contiguous:
        raise InvalidUsage("shared-state buffers must be C-contiguous")
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    if writable and mv.readonly:
        raise InvalidUsage("a fetch destination must be writable")
    return mv


class _Bad(Exception):
    """Bad input from a client: close its connection and log why."""


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
        self.views = {n: _as_bytes_view(v) for n, v in views.items()}
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
            nonce = os.urandom(32)
            writer.write(HELLO.pack(M_HELLO, nonce))
            magic, n = AUTH.unpack(await asyncio.wait_for(reader.readexactly(AUTH.size), self.auth_timeout))
            if magic != M_AUTH or n > MAX_ID:
                raise _Bad(f"bad hello (magic {magic!r}, id length {n})")
            rest = await asyncio.wait_for(reader.readexactly(n + 32), self.auth_timeout)
            client_id = rest[:n].decode(errors="replace")
            if not hmac.compare_digest(proof(self.secret, nonce, client_id), rest[n:]):
                text = b"proof does not match the run secret"
                writer.write(RESP.pack(M_RESP, 1, len(text)) + text)
                await asyncio.wait_for(writer.drain(), self.auth_timeout)
                graceful = True
                raise _Bad(f"peer {client_id!r} failed the run-secret proof")
            who = f"{client_id}@{who}"
            writer.write(RESP.pack(M_RESP, 0, 0))
            while True:
                head = await asyncio.wait_for(reader.readexactly(REQ.size), self.idle_timeout)
                magic, n, revision, offset, length = REQ.unpack(head)
                if magic != M_REQ or n > MAX_NAME or n == 0:
                    raise _Bad(f"bad request header (magic {magic!r}, name length {n})")
                name = (await asyncio.wait_for(reader.readexactly(n), self.auth_timeout)).decode(errors="replace")
                if writer.transport.is_closing():
                    return  # dropped by unpublish() while the request was read
                view = self.views.get(name)
                if self.revision is None or revision != self.revision or view is None:
                    if self.revision is None:
                        why = "it serves no shared state right now"
                    elif revision != self.revision:
                        why = f"it serves revision {self.revision}"
                    else:
                        why = f"it has no tensor of that name (it serves {len(self.views)} tensors)"
                    text = f"{self.peer_id} cannot serve {name!r} at revision {revision}: {why}".encode()[:MAX_TEXT]
                    writer.write(RESP.pack(M_RESP, 1, len(text)) + text)
                    await asyncio.wait_for(writer.drain(), self.auth_timeout)
                    log.info("state server %s: refused %s: %s", self.peer_id, who, text.decode())
                    graceful = True
                    return
                if length > MAX_REQUEST or offset > len(view) or length > len(view) - offset:
                    raise _Bad(f"request {name!r} [{offset}, +{length}) outside its {len(view)} bytes")
                if self._die_at is not None and self.tx_bytes + length > self._die_at:
                    part = max(0, self._die_at - self.tx_bytes)
                    writer.write(RESP.pack(M_RESP, 0, length) + bytes(view[offset:offset + part]))
                    self.tx_bytes += part
                    self._crash()
                    return
                writer.write(RESP.pack(M_RESP, 0, length))
                if length:
                    writer.write(view[offset:offset + length])
                self.tx_bytes += length  # handed to the transport
                await asyncio.wait_for(writer.drain(), self.idle_timeout)  # a frozen reader ends here
        except _Bad as exc:
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


class _Link(asyncio.BufferedProtocol):
    """One client connection; reads response payloads straight into destination views."""

    def __init__(self, loop: asyncio.AbstractEventLoop, label: str) -> None:
        self.loop = loop
        self.label = label
        self.transport: asyncio.Transport | None = None
        self.small = bytearray(max(HELLO.size, RESP.size, MAX_TEXT))
        self.mode = "hello"
        self.need = HELLO.size
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
        if self.mode == "payload":
            return self.dest[self.got:]  # type: ignore[index]
        return memoryview(self.small)[self.got:self.need]

    def buffer_updated(self, nbytes: int) -> None:
        self.got += nbytes
        self.progress_at = self.loop.time()
        if self.got < self.need:
            return
        try:
            self._complete()
        except ProtocolError as exc:
            self.fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(PeerLost(f"state source {self.label} closed the connection" + (f": {exc}" if exc else "")))

    # state machine
    def _expect(self, mode: str, need: int) -> None:
        self.mode, self.need, self.got = mode, need, 0

    def _complete(self) -> None:
        mode = self.mode
        if mode == "hello":
            magic, nonce = HELLO.unpack_from(self.small)
            if magic != M_HELLO:
                raise ProtocolError(f"state source {self.label} is not a pccl state server (magic {magic!r})")
            self._expect("header", RESP.size)
            if not self.hello.done():
                self.hello.set_result(nonce)
        elif mode == "header":
            magic, status, length = RESP.unpack_from(self.small)
            if magic != M_RESP or status > 1:
                raise ProtocolError(f"state source {self.label} sent a bad response header")
            if not self.pending:
                raise ProtocolError(f"state source {self.label} sent an unsolicited response")
            if status == 1:
                if length > MAX_TEXT:
                    raise ProtocolError(f"state source {self.label} sent an oversized refusal")
                self._expect("text", length)
                if length == 0:
                    self._complete()
                return
            dest, fut = self.pending[0]
            want = 0 if dest is None else len(dest)
            if length != want:
                raise ProtocolError(f"state source {self.label} answered {length} bytes, asked {want}")
            if length == 0:
                self.pending.popleft()
                if not fut.done():
                    fut.set_result(0)
                self._expect("header", RESP.size)
            else:
                self.dest = dest
                self._expect("payload", length)
        elif mode == "payload":
            dest, fut = self.pending.popleft()
            self.dest = None
            if not fut.done():
                fut.set_result(self.need)
            self._expect("header", RESP.size)
        elif mode == "text":
            text = bytes(self.small[:self.need]).decode(errors="replace")
            raise SourceRefused(f"state source {self.label} refused: {text}")

    def fail(self, exc: BaseException) -> None:
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
        self.mode = "dead"
        self.need = len(self.small)
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
        self.transport.write(data)  # type: ignore[union-attr]
        return fut

    def auth(self, nonce: bytes, secret: bytes, peer_id: str) -> asyncio.Future:
        pid = peer_id.encode()
        return self._send(AUTH.pack(M_AUTH, len(pid)) + pid + proof(secret, nonce, peer_id), None)

    def request(self, name: str, revision: int, offset: int, dest: memoryview) -> asyncio.Future:
        raw = name.encode()
        return self._send(REQ.pack(M_REQ, len(raw), revision, offset, len(dest)) + raw, dest)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


@dataclass
class _Chunk:
    name: str
    offset: int
    dest: memoryview
    tries: int = 0


@dataclass
class _Work:
    """State the workers of one fetch share."""

    queue: collections.deque
    total: int
    inflight: int = 0
    done_bytes: int = 0
    retried: int = 0
    chunks: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    per_source: dict[str, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


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
    dests = {n: (_as_bytes_view(buf, writable=True), bytes(h)) for n, (buf, h) in tensors.items()}
    srcs = list(dict.fromkeys((str(h), int(p)) for h, p in sources))
    opts = (revision, secret, peer_id, streams_per_source, chunk, pipeline, deadline, stall_timeout,
            connect_timeout, timeout)
    work = await _transfer(srcs, dests, opts, progress)
    rx, chunks, retried = work.done_bytes, work.chunks, work.retried
    per_source, failures = dict(work.per_source), dict(work.failures)
    rejected: dict[str, str] = {}
    t_hash = loop.time()
    bad = await _mismatches(dests) if verify else []
    if bad and repair and len(srcs) > 1:
        # striped bytes are wrong somewhere: find a source whose own bytes are right
        for src in srcs:
            label = f"{src[0]}:{src[1]}"
            if label in failures:
                continue
            sub = {n: dests[n] for n, _, _ in bad}
            try:
                w = await _transfer([src], sub, opts, None)
            except (PeerLost, ProtocolError) as exc:
                failures[label] = str(exc)
                continue
            rx += w.done_bytes
            chunks += w.chunks
            per_source[label] = per_source.get(label, 0) + w.done_bytes
            still = await _mismatches(sub)
            if not still:
                bad = []
                break
            rejected[label] = "delivered " + ", ".join(f"{n!r} hashing to {short(g)}" for n, _, g in still[:4])
            log.warning("fetch: source %s delivered content that is not the elected state", label)
    if bad:
        used = [s for s, b in per_source.items() if b]
        raise HashMismatch(
            "fetched shared state does not match the elected hashes: "
            + ", ".join(f"{n!r} expected {short(e)} got {short(g)}" for n, e, g in bad[:4])
            + f" (sources {used}); the state was not accepted, retry sync_shared_state")
    t1 = loop.time()
    return {
        "rx_bytes": rx,
        "seconds": t1 - t0,
        "hash_seconds": t1 - t_hash,
        "sources_used": sum(1 for b in per_source.values() if b),
        "sources_failed": failures,
        "rejected_sources": rejected,
        "per_source": per_source,
        "chunks": chunks,
        "retried_chunks": retried,
    }


async def _mismatches(dests: Mapping[str, tuple[memoryview, bytes]]) -> list[tuple[str, bytes, bytes]]:
    got = await hash_buffers_async({n: v for n, (v, _) in dests.items()})
    return [(n, h, got[n]) for n, (_, h) in sorted(dests.items()) if got[n] != h]


async def _transfer(srcs: list[tuple[str, int]], dests: Mapping[str, tuple[memoryview, bytes]], opts: tuple,
                    progress: Callable[[int, int], None] | None) -> _Work:
    """Move every byte of ``dests`` from ``srcs``; raise PeerLost / DeadlineExceeded if that fails."""
    revision, secret, peer_id, streams, chunk, pipeline, deadline, stall_timeout, connect_timeout, timeout = opts
    loop = asyncio.get_running_loop()
    queue: collections.deque[_Chunk] = collections.deque()
    for name, (view, _) in sorted(dests.items()):
        for off in range(0, len(view), chunk):
            queue.append(_Chunk(name, off, view[off:off + chunk]))
    work = _Work(queue, sum(len(v) for v, _ in dests.values()))
    work.chunks = len(queue)
    if not queue:
        return work
    if not srcs:
        raise PeerLost("no up-to-date peer to fetch the shared state from")
    workers = [
        asyncio.ensure_future(_worker(work, src, revision, secret, peer_id, pipeline, deadline, stall_timeout,
                                      connect_timeout, progress))
        for src in srcs
        for _ in range(streams)
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
    if work.queue or work.inflight:
        left = work.total - work.done_bytes
        why = "; ".join(f"{s}: {r}" for s, r in work.failures.items()) or "no reason recorded"
        if not_done:
            raise DeadlineExceeded(
                f"shared-state fetch of {work.total} bytes did not finish within {timeout:g} s "
                f"({left} bytes left; failures: {why})")
        raise PeerLost(f"every state source failed with {left} of {work.total} bytes left: {why}; "
                       "retry sync_shared_state")
    return work


async def _worker(work: _Work, src: tuple[str, int], revision: int, secret: bytes, peer_id: str, depth: int,
                  deadline: float, stall_timeout: float, connect_timeout: float,
                  progress: Callable[[int, int], None] | None) -> None:
    loop = asyncio.get_running_loop()
    label = f"{src[0]}:{src[1]}"
    work.per_source.setdefault(label, 0)
    link: _Link | None = None
    inflight: collections.deque[tuple[_Chunk, asyncio.Future]] = collections.deque()
    try:
        if not work.queue and not work.inflight:
            return
        left = max(0.001, min(connect_timeout, deadline - loop.time()))
        try:
            _, link = await asyncio.wait_for(loop.create_connection(lambda: _Link(loop, label), *src), left)
            nonce = await asyncio.wait_for(link.hello, left)
            await asyncio.wait_for(link.auth(nonce, secret, peer_id), left)
        except asyncio.TimeoutError:
            raise PeerLost(f"no answer from {label} within {left:.1f} s") from None
        except OSError as exc:
            raise PeerLost(f"cannot connect to {label}: {exc}") from None
        while True:
            while len(inflight) < depth and work.queue:
                c = work.queue.popleft()
                work.inflight += 1
                inflight.append((c, link.request(c.name, revision, c.offset, c.dest)))
            if not inflight:
                if not work.queue and not work.inflight:
                    work.notify()
                    return
                await work.changed.wait()
                continue
            c, fut = inflight[0]
            while not fut.done():
                wait = min(stall_timeout, max(0.0, deadline - loop.time())) / 4 + 0.01
                await asyncio.wait([fut], timeout=wait)
                if not fut.done() and loop.time() - link.progress_at > stall_timeout:
                    raise PeerLost(f"{label} sent nothing for {stall_timeout:g} s")
            n = fut.result()  # raises the link's failure
            inflight.popleft()
            work.inflight -= 1
            work.done_bytes += n
            work.per_source[label] += n
            if progress is not None:
                progress(work.done_bytes, work.total)
            if not work.queue and not work.inflight:
                work.notify()
    except (PeerLost, ProtocolError) as exc:
        work.failures[label] = str(exc)
        log.info("fetch: dropping a stream to %s: %s", label, exc)
    finally:
        # unfinished chunks go back to the front of the queue for the other streams
        for c, fut in reversed(inflight):
            c.tries += 1
            work.retried += 1
            work.queue.appendleft(c)
            work.inflight -= 1
            if not fut.done():
                fut.cancel()
        if inflight:
            work.notify()
        if link is not None:
            link.fail(PeerLost(f"stream to {label} closed by the fetcher"))
