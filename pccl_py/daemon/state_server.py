"""A daemon's :class:`StateServer`: serves its published shared state to peers that prove the run secret.

Every connection starts with the mutual handshake of :mod:`pccl_py.wire.state_transfer`
(the server sends a fresh nonce and its peer id, the client proves the secret over both
nonces and both ids, the server proves it back); after it every request, reply header
and refusal carries a tag under the connection's session keys. A connection that has not proved the
secret costs next to nothing: it must finish the handshake within ``handshake_timeout``
seconds, at most ``max_pending_per_address`` of them per remote address wait at once
(:class:`~pccl_py.transport.limits.Gate` decides which one goes), and every one refused
or failed is counted (``count(reason)``, e.g. the daemon's
``pccl_rejected_connections_total{port="state",reason}``) and told in a summary line per
address at most once per ``log_interval`` seconds, never in a line of its own.

A request is answered only for a published tensor at the published revision and with
``offset + length`` inside the tensor; anything else malformed from an authenticated
peer (bad magic, oversized lengths, a tag that does not verify, out-of-range ranges,
garbage) closes the connection with a logged reason naming the peer, and the server goes
on serving everyone else. Requests on one connection are answered in order; a client may
keep several in flight. Payload is written straight from the published view
(``transport.write(memoryview)`` then drain), no Python copy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from pccl_py.calls import byte_view
from pccl_py.daemon.transfer_plan import refusal
from pccl_py.errors import ProtocolError, Unauthenticated
from pccl_py.transport.limits import Gate
from pccl_py.wire import state_transfer as wire

log = logging.getLogger("pccl.state_transfer")


class Source(NamedTuple):
    """A state source as a sync plan names it: the peer and where its StateServer listens."""

    peer_id: str
    host: str
    port: int

    @property
    def label(self) -> str:
        """How logs, errors and fetch statistics name it: ``peer_id@host:port``."""
        return f"{self.peer_id}@{self.host}:{self.port}"


class StateServer:
    """Serves the published shared state to authenticated peers.

    ``StateServer(peer_id, secret=b"", host="127.0.0.1", port=0, idle_timeout=300.0,
    handshake_timeout=5.0, max_connections=1024, max_pending_per_address=8,
    log_interval=10.0, count=None)``; ``await start()`` returns the bound ``(host, port)``
    (``source`` names it for a fetch); ``publish(revision, {name: view})`` makes the views
    servable (they must stay valid and unchanged until ``unpublish()``, which also drops
    every open connection); ``tx_bytes`` counts payload bytes handed to the transport since
    the last ``publish``; ``refused`` counts connections refused or closed for bad input;
    ``await close()``.
    """

    def __init__(self, peer_id: str = "", *, secret: bytes = b"", host: str = "127.0.0.1", port: int = 0,
                 idle_timeout: float = 300.0, handshake_timeout: float = 5.0, max_connections: int = 1024,
                 max_pending_per_address: int = 8, log_interval: float = 10.0,
                 count: Callable[[str], None] | None = None) -> None:
        self.secret = secret
        self.host = host
        self.port = port
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.revision: int | None = None
        self.views: dict[str, memoryview] = {}
        self.tx_bytes = 0
        self.bad_requests = 0  # authenticated connections closed for bad input
        self._count = count
        self.gate = Gate("state server", max_pending=max_pending_per_address,
                         evict_after=min(1.0, handshake_timeout / 2), interval=log_interval, count=count)
        self.peer_id = peer_id
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._summary_timer: asyncio.TimerHandle | None = None
        self._die_at: int | None = None

    @property
    def peer_id(self) -> str:
        """The id this server proves itself as (a daemon that rejoins the run changes it)."""
        return self._peer_id

    @peer_id.setter
    def peer_id(self, peer_id: str) -> None:
        self._peer_id = peer_id
        self.gate.name = "state server" + (f" {peer_id[:8]}" if peer_id else "")

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def source(self) -> Source:
        return Source(self.peer_id, self.host, self.port)

    @property
    def refused(self) -> int:
        """Connections refused or failed before their handshake, and authenticated ones
        closed for bad input."""
        return sum(self.gate.total.values()) + self.bad_requests

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
            self.gate.dropped(w)
            w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.unpublish()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._summary_timer is not None:
            self._summary_timer.cancel()
            self._summary_timer = None
        self._tell(force=True)

    # -- what refused connections cost: a count, and a summary now and then ----------
    def _tell(self, force: bool = False) -> None:
        loop = asyncio.get_running_loop()
        for line in self.gate.summary(loop.time(), force=force):
            log.warning("%s", line)
        wake = self.gate.wake_at
        if wake is not None and self._summary_timer is None and not force:
            self._summary_timer = loop.call_at(wake, self._on_summary_timer)

    def _on_summary_timer(self) -> None:
        self._summary_timer = None
        self._tell()

    # -- one connection --------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        peer = writer.get_extra_info("peername")
        addr = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        who = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if len(self._writers) >= self.max_connections:
            writer.transport.abort()
            self.gate.refuse(addr, "full", loop.time())
            self._tell()
            return
        admitted, evict = self.gate.admit(addr, writer, loop.time())
        if evict is not None:
            evict.transport.abort()  # type: ignore[attr-defined]
        if not admitted:
            writer.transport.abort()
            self._tell()
            return
        self._writers.add(writer)
        graceful = False  # close after a refusal (lets the text arrive); abort otherwise
        try:
            reason = None
            try:
                async with asyncio.timeout(self.handshake_timeout):
                    session, client_id = await self._handshake(reader, writer)
            except TimeoutError:
                reason = "timeout"
            except Unauthenticated as exc:
                reason, graceful = "bad_proof", True
                log.debug("state server %s: %s from %s", self.peer_id, exc, who)
            except ProtocolError as exc:
                reason = "malformed"
                log.debug("state server %s: %s from %s", self.peer_id, exc, who)
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                reason = "closed"
            except RuntimeError:
                if not writer.transport.is_closing():  # uvloop raises on writes after close
                    raise
                reason = "closed"
            if reason is not None:
                self.gate.failed(writer, reason, loop.time())
                self._tell()
                return
            self.gate.passed(writer)
            graceful = await self._requests(reader, writer, session, f"{client_id}@{who}")
        finally:
            self._writers.discard(writer)
            self.gate.dropped(writer)  # (a no-op unless an error above escaped)
            if graceful:
                writer.close()
            else:
                writer.transport.abort()

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                         ) -> tuple[wire.Session, str]:
        hs = wire.ServerHandshake(self.secret, self.peer_id)
        writer.write(hs.hello())
        n = wire.decode_auth_head(await reader.readexactly(wire.AUTH.size))
        client_id, nonce_c, proof_c = wire.decode_auth_rest(await reader.readexactly(wire.auth_rest_size(n)), n)
        try:
            session = hs.check(client_id, nonce_c, proof_c)
        except Unauthenticated:
            writer.write(wire.encode_refusal("proof does not match the run secret", None))
            await writer.drain()
            raise
        writer.write(hs.answer())
        return session, client_id

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: wire.Session,
                        who: str) -> bool:
        """Serve an authenticated connection until it ends; True if it ended with a refusal
        (close gracefully, so the text arrives)."""
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(wire.REQ.size), self.idle_timeout)
                n, partial = wire.decode_request_head(head)
                rest = await asyncio.wait_for(reader.readexactly(n), self.handshake_timeout)
                req = wire.finish_request(head, partial, rest, session.recv)
                if writer.transport.is_closing():
                    return False  # dropped by unpublish() while the request was read
                text = refusal(self.peer_id, self.revision, self.views, req)
                if text is not None:
                    writer.write(wire.encode_refusal(text, session.send))
                    await asyncio.wait_for(writer.drain(), self.handshake_timeout)
                    log.info("state server %s: refused %s: %s", self.peer_id, who, text)
                    return True
                view = self.views[req.name]
                wire.check_range(req, len(view))
                offset, length = req.offset, req.length
                if self._die_at is not None and self.tx_bytes + length > self._die_at:
                    part = max(0, self._die_at - self.tx_bytes)
                    writer.write(wire.encode_reply_head(length, session.send) + bytes(view[offset:offset + part]))
                    self.tx_bytes += part
                    self._crash()
                    return False
                writer.write(wire.encode_reply_head(length, session.send))
                if length:
                    part = view[offset:offset + length]
                    writer.write(part)
                    writer.write(session.send.tag(part))  # (the published view does not change)
                self.tx_bytes += length  # handed to the transport
                await asyncio.wait_for(writer.drain(), self.idle_timeout)  # a frozen reader ends here
        except ProtocolError as exc:
            self.bad_requests += 1
            if self._count is not None:
                self._count("bad_request")
            log.warning("state server %s: closing connection from %s: %s", self.peer_id, who, exc)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, OSError):
            pass
        except RuntimeError:
            if not writer.transport.is_closing():  # uvloop raises on writes after close
                raise
        return False
