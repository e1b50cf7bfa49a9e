"""The coordinator's ZAP handler (ZeroMQ RFC 27): which CURVE clients may complete a handshake.

libzmq asks the handler bound at ``inproc://zeromq.zap.01`` of the socket's context about
every CURVE client that got as far as proving its key pair; the answer is "200" (go on) or
"400" (close). This one admits exactly one public key, the run's member key: a client holding
any other key pair cannot complete a handshake, so nothing it sends reaches the coordinator.

Why a small handler of our own, pumped by the event loop, rather than pyzmq's
``zmq.auth`` authenticators: the decision is one constant-time comparison, so answering on
the loop never blocks it (no thread to start, stop and keep apart from the loop's state), and
it needs no ``zmq.asyncio`` sockets, which nothing else here uses (:class:`ZmqPump` serves
asyncio and uvloop alike). The endpoint is per context: the coordinator gives its sockets a
context of their own, so two coordinators (or a coordinator and daemons) in one process never
share a handler. Bind it before the socket it guards: a CURVE server with no handler bound
admits every client that knows its public key.
"""

from __future__ import annotations

import hmac
import logging

import zmq
from zmq.utils import z85

from pccl_py.transport.zmq_io import ZmqPump

log = logging.getLogger("pccl.zap")

ENDPOINT = "inproc://zeromq.zap.01"
VERSION = b"1.0"


class ZapHandler:
    """Admit CURVE clients whose public key is ``allowed`` (Z85); refuse everything else."""

    def __init__(self, ctx: zmq.Context, allowed: bytes) -> None:
        self.allowed = z85.decode(allowed)
        self.admitted = 0
        self.denied = 0
        sock = ctx.socket(zmq.ROUTER)  # not REP: a reply that cannot go out wedges nothing
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(ENDPOINT)
        except zmq.ZMQError:
            sock.close()
            raise
        self.sock = sock
        self._pump = ZmqPump(sock, self._on_request, copy=True)

    def decide(self, request: list[bytes]) -> tuple[bytes, bytes]:
        """(status code, status text) for one request: version, request id, domain, address,
        routing id, mechanism, credentials..."""
        if len(request) < 6 or request[0] != VERSION:
            return b"500", b"malformed ZAP request"
        mechanism, credentials = request[5], request[6:]
        if mechanism != b"CURVE" or len(credentials) != 1:
            return b"400", b"CURVE only"
        if not hmac.compare_digest(credentials[0], self.allowed):
            return b"400", b"not this run's member key"
        return b"200", b"OK"

    def _on_request(self, frames: list[bytes]) -> None:
        # [routing id of libzmq's ZAP client, b"", request...]
        if len(frames) < 3 or frames[1] != b"":
            return
        request = frames[2:]
        code, text = self.decide(request)
        if code == b"200":
            self.admitted += 1
        else:
            self.denied += 1  # counted and summarised by the coordinator (monitor events)
        req_id = request[1] if len(request) > 1 else b""
        try:
            self.sock.send_multipart([frames[0], b"", VERSION, req_id, code, text, b"", b""], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the handshake then waits out its own timeout
            log.debug("ZAP reply not sent: %s", exc)

    def kick(self) -> None:
        self._pump.kick()

    def close(self) -> None:
        self._pump.close()
        self.sock.close(linger=0)
