"""One data stream under the data plane: one authenticated TCP (or Unix) stream.

* :class:`Stream` -- one TCP stream, an ``asyncio.BufferedProtocol``. ``get_buffer`` hands
  the event loop the exact bytes of the next handshake message; after the handshake,
  headers and small payloads are read through a 16 KiB stage (one read takes several
  small frames), and a payload with at least ``_DIRECT_MIN`` bytes left is read straight
  into its destination (a slice of the caller's ``dst`` or a per-stream staging buffer),
  so Python copies at most 16 KiB of a large payload on the way in. Outgoing payloads are
  memoryviews handed to the transport (one ``writev`` on uvloop).

The K streams to one peer and the ``Link`` a collective sees are in
:mod:`pccl_py.daemon.peers`.

Routing decisions, failures and deadlines belong to :class:`pccl_py.daemon.dataplane.DataPlane`;
these classes call back into it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING

from pccl_py.collectives.base import Rx
from pccl_py.daemon.router import DIVERGED, DROP, PEND, STALL
from pccl_py.errors import InvalidUsage, PcclError, ProtocolError
from pccl_py.transport import seal as S
from pccl_py.transport.pump import Pump
from pccl_py.wire import frames as F
from pccl_py.wire import keys

if TYPE_CHECKING:
    from pccl_py.daemon.dataplane import DataPlane
    from pccl_py.daemon.peers import PeerStreams

log = logging.getLogger("pccl.dataplane")

_SCRATCH = 1 << 16
_DIRECT_MIN = 1 << 14  # a payload with this much left is read straight into its destination
_STAGE = _DIRECT_MIN + F.HEADER_SIZE  # one staged recv: so at most this much of a payload is copied
# bytes a stream's transport may hold before frames wait in its backlog; it asks for SPREAD
# frames again (PeerStreams.feed) once it holds a quarter of that
WRITE_HIGH = 512 << 10
# unsent bytes a TCP stream's kernel buffer may hold (TCP_NOTSENT_LOWAT): beyond what is in
# flight, a stream commits little data ahead, so a slow stream holds up little of a call
NOTSENT_LOWAT = 256 << 10
LINGER = 1.0  # seconds a graceful close waits for the peer's EOF

# connection states
_HS_CHALLENGE, _HS_HELLO, _HS_HELLO_ID, _HS_WELCOME, _HS_WELCOME_ID = range(5)
_HEADER, _PAYLOAD, _DISCARD, _CTRL_PAYLOAD, _STALLED, _CLOSED, _DRAIN, _PUMPED, _TAG = range(5, 14)
_FRAME_BYTES = (_HEADER, _PAYLOAD, _DISCARD, _CTRL_PAYLOAD)  # states whose bytes a frame's tag covers


class Stream(asyncio.BufferedProtocol):
    """One data stream: a state machine fed by exact reads (handshake, large payloads) or
    staged reads (headers, small payloads, several frames at once)."""

    def __init__(self, dp: DataPlane, peer_streams: PeerStreams | None = None, stream: int = 0):
        self.dp = dp
        self.peer_streams = peer_streams  # known up front for the connector; after HELLO for the acceptor
        self.stream = stream
        self.connector = peer_streams is not None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._small = bytearray(2048)  # handshake messages, headers, ERROR messages
        self._view = memoryview(self._small)[:0]
        self._stage = memoryview(bytearray(_STAGE))
        self._staged = False  # the last get_buffer handed out the stage
        self._carry: tuple[int, int] | None = None  # staged bytes behind a stalled header
        self._pos = 0
        self._state = _CLOSED
        self._hdr: F.Header | None = None
        self._backlog: collections.deque = collections.deque()
        self._blocked = False
        self._rx = None
        self._rx_op = None
        self._progress = None
        self._stg = bytearray(0)
        self._scratch: memoryview | None = None
        self._hs_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self.drained: asyncio.Future | None = None
        self._nonce = b""
        self._challenge = b""  # the acceptor's nonce (the connector keeps what it was sent)
        self._partial: F.Hello | None = None
        # Frame seals (transport/seal.py), set when the handshake completes if the run seals
        # frames: each direction's tag covers every frame's header and payload; a frame's
        # bytes are acted on only after its tag checks (_frame_done).
        self._tx_seal = self._rx_seal = None
        self._tx_seq = self._rx_seq = 0
        self._tag = memoryview(bytearray(S.TAG_BYTES))
        self._then: tuple | None = None  # what the frame whose tag is being read does then
        self._discard_then = None  # what a frame being dropped does once its tag checks
        # (connector) until the handshake completes, a failure is not the link's loss: the
        # dialler decides (another way, another try, or the loss; see established())
        self._up: asyncio.Future | None = dp._loop.create_future() if self.connector else None
        # (acceptor) the connector proved the secret: from then on its failures are news,
        # before that they are a stranger's, counted by the data plane's gate (limits.py)
        self._proved = False
        self.refused = False  # (see _not_up)
        self.close_reason = ""
        self._mac = b""
        # Frames of at least this many payload bytes go through the stream's I/O threads
        # (0: everything on the event loop); see pump.py.
        self._bulk = dp.bulk_min
        self._pump: Pump | None = None
        self._pumped_rx = False  # the payload being read goes to the receive thread
        self._tx_busy = False  # the send thread is writing a frame
        # what went out, so a failed call can wait until its frames have left (flushed)
        self._written = 0  # bytes handed to the transport
        self._jobs = [0, 0]  # frames handed to the send thread, and those it finished

    # -- asyncio callbacks ------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self._vectored = type(transport).__module__.startswith("uvloop")
        sock = transport.get_extra_info("socket")
        # (the I/O threads come with the handshake's end: a stranger costs one descriptor)
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_HIGH // 4)
        if sock is not None and sock.family != socket.AF_UNIX:
            _tune(sock, self.dp.config.user_timeout)
        pn = transport.get_extra_info("peername")
        self.peer = f"{pn[0]}:{pn[1]}" if isinstance(pn, tuple) else "this host (Unix socket)"
        self.dp._conns.add(self)
        if not self.connector and not self.dp.admit(self, pn[0] if isinstance(pn, tuple) else "this host"):
            self._state = _CLOSED  # refused (counted by the data plane's gate): no more of it
            self.dp._conns.discard(self)
            transport.abort()
            return
        self._hs_timer = self.dp._loop.call_later(self.dp.config.handshake_timeout, self._hs_timeout)
        if self.connector:
            self._want(_HS_CHALLENGE, F.CHALLENGE_S.size)
        else:
            self._nonce = os.urandom(F.NONCE_LEN)
            transport.write(F.encode_challenge(self._nonce))
            self._want(_HS_HELLO, F.HELLO_FIXED.size)

    def get_buffer(self, sizehint: int):
        st = self._state
        if st == _HEADER or st == _DISCARD or st == _CTRL_PAYLOAD or st == _TAG or (
                st == _PAYLOAD and len(self._view) - self._pos < _DIRECT_MIN):
            # Staged: one recv takes a header with its small payload and whatever frames
            # follow (a 4-byte all-reduce costs one read instead of two or three).
            self._staged = True
            return self._stage
        self._staged = False
        v = self._view[self._pos:]
        if not len(v):  # nothing armed (must not happen): swallow into scratch, then fail
            return self._scratch_view()
        return v

    def buffer_updated(self, nbytes: int) -> None:
        if self._state == _DRAIN:  # leaving: whatever the peer still sends is dropped
            return
        if self._staged:
            self._feed(0, nbytes)
        elif not len(self._view) - self._pos:
            self._protocol_error(ProtocolError("bytes arrived while nothing was expected"))
            return
        else:
            if self._rx_seal is not None and self._state == _PAYLOAD:
                got = self._view[self._pos:self._pos + nbytes]
                if self._rx_seal.encrypting:
                    self._rx_seal.crypt(got, got)  # decrypted in place
                else:
                    self._rx_seal.absorb(got)
            self._pos += nbytes
            self._advance()
        if self._pumped_rx:
            self._pump_rx()

    def _advance(self) -> None:
        """``self._pos`` moved: act on a filled view (a payload, a header, handshake bytes)."""
        if self._state == _PAYLOAD:
            if self._progress is not None:
                try:
                    self._progress(self._pos)
                except Exception as e:  # pragma: no cover - kernel failure is a bug
                    self._internal_error(e)
                    return
            if self._pos < len(self._view):
                return
            rx, self._rx, self._progress = self._rx, None, None
            self._frame_done(self._finish, rx)
            return
        if self._pos < len(self._view):
            return
        try:
            self._complete()
        except ProtocolError as e:
            self._protocol_error(e)

    def _feed(self, a: int, b: int) -> None:
        """Hand staged bytes ``[a, b)`` to the state machine, frame after frame. Bytes behind
        a stalled header stay staged (reading is paused) until the stall ends."""
        stage = self._stage
        while a < b:
            st = self._state
            if st == _STALLED:
                self._carry = (a, b)
                return
            if st == _CLOSED or st == _DRAIN:
                return
            n = min(len(self._view) - self._pos, b - a)
            if n <= 0:  # pragma: no cover - every state arms a non-empty view
                self._protocol_error(ProtocolError("bytes arrived while nothing was expected"))
                return
            seal = self._rx_seal
            if seal is not None and st in _FRAME_BYTES:
                if not seal.encrypting:
                    seal.absorb(stage[a:a + n])
                elif st == _DISCARD:
                    seal.crypt(stage[a:a + n])  # (the plaintext is dropped; the tag still counts it)
            if st != _DISCARD:  # dropped bytes need not land anywhere
                self._view[self._pos:self._pos + n] = stage[a:a + n]
                if seal is not None and seal.encrypting and (st == _PAYLOAD or st == _CTRL_PAYLOAD):
                    got = self._view[self._pos:self._pos + n]
                    seal.crypt(got, got)
            self._pos += n
            a += n
            self._advance()
        self._carry = None

    def _resume(self) -> None:
        """A stall ended: first the bytes staged behind it, then the socket again."""
        carry, self._carry = self._carry, None
        if carry is not None:
            self._feed(*carry)
        if self._pumped_rx and self._pump_rx():
            return
        if self._state != _STALLED and self._state != _CLOSED:
            self.transport.resume_reading()

    # -- payloads through the receive thread ----------------------------------------------
    def _pump_rx(self) -> bool:
        """Hand the rest of the current payload to the receive thread (the transport stops
        reading until it is in); False if too little is left to be worth it."""
        if self._state != _PAYLOAD or len(self._view) - self._pos < _DIRECT_MIN:
            return False
        self._pumped_rx = False
        try:
            self._pump.recv(self._view, self._pos, self._progress, self._pumped_in, self._rx.reduction,
                            self._rx_seal)
        except (OSError, RuntimeError) as e:  # no thread could be started
            self._close(f"cannot start an I/O thread: {e}")
            return True
        self._state = _PUMPED
        self.transport.pause_reading()
        return True

    def _pumped_in(self, err: BaseException | None) -> None:
        if self._state != _PUMPED:  # closed meanwhile
            return
        if err is not None:
            self._close(f"receive failed: {err}")
            return
        self._state = _PAYLOAD
        self._pos = len(self._view)
        self._progress = None  # the thread reduced everything
        self._advance()
        if self._state != _STALLED and self._state != _CLOSED and not (self._pumped_rx and self._pump_rx()):
            self.transport.resume_reading()

    def eof_received(self):
        return False  # close

    def connection_lost(self, exc) -> None:
        self._not_up(f"connection closed ({exc or 'EOF'})")
        if self._state != _CLOSED:
            self._stranger_failed("closed")
        self._state = _CLOSED
        self._stop_pump(hard=True)
        self._cancel_timers()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.dp._conns.discard(self)
        self.dp._unstall(self)
        if self.peer_streams is None:
            return
        if exc is None and self.peer_streams.is_up:
            self.peer_streams.stream_eof()  # the peer's other streams may still hold its last frames
        else:
            self.dp._peer_lost(self.peer_streams, f"connection closed ({exc or 'EOF'})")

    # -- state machine ------------------------------------------------------------------
    def _want(self, state: int, n: int) -> None:
        self._state = state
        self._view = memoryview(self._small)[:n]
        self._pos = 0
        if state == _HEADER and self._rx_seal is not None:  # a new frame
            self._rx_seal.begin(self._rx_seq)
            self._rx_seq += 1

    def _frame_done(self, then=None, *args) -> None:
        """The frame's bytes are in: ``then(*args)`` once its tag checks (at once when the
        run does not seal frames), and the next frame's header is awaited."""
        if self._rx_seal is None:
            self._want(_HEADER, F.HEADER_SIZE)
            if then is not None:
                then(*args)
            return
        self._then = (then, args)
        self._state = _TAG
        self._view = self._tag
        self._pos = 0

    def _tag_in(self) -> None:
        if not self._rx_seal.check(self._tag):
            raise ProtocolError(f"frame {self._rx_seq - 1} failed its integrity check: changed in transit "
                                "(or sent under another run secret)")
        (then, args), self._then = self._then, None
        self._want(_HEADER, F.HEADER_SIZE)
        if then is not None:
            then(*args)

    def _scratch_view(self) -> memoryview:
        if self._scratch is None:
            self._scratch = memoryview(bytearray(_SCRATCH))
        return self._scratch

    def staging(self, n: int) -> memoryview:
        if len(self._stg) < n:
            self._stg = bytearray(n)
        return memoryview(self._stg)[:n]

    def _complete(self) -> None:
        st = self._state
        if st == _HEADER:
            if self._rx_seal is not None and self._rx_seal.encrypting:
                self._open_header()
            self._on_header(F.decode_header(self._view, self.dp._limits))
        elif st == _DISCARD:
            self._discard(self._discard_left)
        elif st == _TAG:
            self._tag_in()
        elif st == _CTRL_PAYLOAD:
            self._on_error_payload(bytes(self._view))
        elif st == _HS_HELLO:
            n, self._partial = F.decode_hello_fixed(self._view, self.dp._limits)
            self._want(_HS_HELLO_ID, n)
        elif st == _HS_HELLO_ID:
            hello = F.finish_hello(self._partial, self._view, self.dp.secret, self._nonce)
            self._proved = True
            self.dp.gate.passed(self)
            self._on_hello(hello)
        elif st == _HS_CHALLENGE:
            self._challenge = F.decode_challenge(self._view)
            lk = self.peer_streams
            self._nonce = os.urandom(F.NONCE_LEN)
            self.transport.write(F.encode_hello(self.dp.secret, self._challenge, self.dp.peer_id, self.dp.epoch,
                                                self.stream, lk.announced, lk.session, self._nonce, self.dp.seal))
            self._want(_HS_WELCOME, F.WELCOME_FIXED.size)
        elif st == _HS_WELCOME:
            n, self._mac = F.decode_welcome_fixed(self._view)
            self._want(_HS_WELCOME_ID, n)
        elif st == _HS_WELCOME_ID:
            lk = self.peer_streams
            F.finish_welcome(self._mac, self._view, self.dp.secret, self._nonce, self.stream,
                             lk.session, lk.peer_id, self._challenge)
            c2a, a2c = keys.link_keys(self.dp.secret, self._challenge, self._nonce, self.dp.peer_id, lk.peer_id,
                                      self.stream, lk.session)
            self._keys(tx=c2a, rx=a2c)
            self._established()
        else:  # pragma: no cover
            raise ProtocolError(f"bytes in state {st}")

    def _on_hello(self, hello: F.Hello) -> None:
        dp = self.dp
        if hello.peer_id == dp.peer_id:
            raise ProtocolError(f"peer announced our own id {hello.peer_id!r}")
        if hello.seal != dp.seal:
            raise ProtocolError(f"peer {hello.peer_id!r} {_SEAL_WORDS[hello.seal]}, this daemon "
                                f"{_SEAL_WORDS[dp.seal]}: start every daemon of the run with the same "
                                "--integrity and --encrypt settings (env PCCL_INTEGRITY, PCCL_ENCRYPT)")
        peer_streams = dp._accept_peer(hello)
        if peer_streams is None:
            raise ProtocolError(f"peer {hello.peer_id!r}: stream {hello.stream} rejected (duplicate or role clash)")
        self.peer_streams = peer_streams
        self.stream = hello.stream
        self.transport.write(F.encode_welcome(dp.secret, hello.nonce, dp.peer_id, hello.stream, hello.session,
                                              self._nonce))
        c2a, a2c = keys.link_keys(dp.secret, self._nonce, hello.nonce, hello.peer_id, dp.peer_id, hello.stream,
                                  hello.session)
        self._keys(tx=a2c, rx=c2a)
        self._established()

    def _keys(self, tx: bytes, rx: bytes) -> None:
        if self.dp.seal != F.SEAL_NONE:
            enc = self.dp.seal == F.SEAL_ENCRYPT
            self._tx_seal, self._rx_seal = S.new_seal(tx, True, enc), S.new_seal(rx, False, enc)

    def _start_pump(self) -> None:
        """The stream's I/O threads (pump.py), if it moves large frames off the loop."""
        sock = self.transport.get_extra_info("socket")
        if self._bulk and sock is not None:
            try:
                self._pump = Pump(self.dp._loop, sock, f"{id(self):x}")
            except OSError as e:  # out of file descriptors: this stream keeps frames on the loop
                log.warning("data stream without I/O threads: %s", e)
        if self._pump is not None:
            # The send thread may only write while the transport holds nothing: limits of 0
            # make every buffered byte pause us, and resume_writing say the buffer is empty.
            self.transport.set_write_buffer_limits(high=0, low=0)
        else:
            self._bulk = 0

    def _established(self) -> None:
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None
        self._start_pump()
        self._want(_HEADER, F.HEADER_SIZE)
        if self._up is not None and not self._up.done():
            self._up.set_result(True)
        self.peer_streams.attach(self, self.stream)

    async def established(self, timeout: float) -> bool:
        """(Connector) True once the handshake completed; False if it
        failed or did not complete within ``timeout``: the connection is then dropped
        without counting as the link's loss (the caller dials another way)."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._up), timeout)
        except asyncio.TimeoutError:
            self._close("no handshake in time")
            return False

    def _not_up(self, reason: str) -> None:
        """Closing before the handshake completed, on a dial that may try again or another
        way: the dialler decides (``refused``, ``close_reason``), the link is not lost here."""
        if self._up is not None and not self._up.done():
            # closed before a byte of the challenge: the listener turned us away (its gate)
            self.refused = self._state == _HS_CHALLENGE and self._pos == 0
            self.close_reason = reason
            self._up.set_result(False)
            self.peer_streams = None

    def _hs_timeout(self) -> None:
        self._hs_timer = None
        if self._state < _HEADER:
            self._close(f"handshake not finished within {self.dp.config.handshake_timeout}s", why="timeout")

    # -- frames ---------------------------------------------------------------------------
    def _on_header(self, h: F.Header) -> None:
        self.peer_streams.traffic[1] += F.HEADER_SIZE + h.length + (S.TAG_BYTES if self._rx_seal is not None else 0)
        if h.kind == F.PROBE:  # filler of a bandwidth probe: counted once its tag checks, dropped
            self._discard(h.length, lambda ps=self.peer_streams: self.dp.probe_bytes_in(ps, h))
            return
        if h.kind == F.PROBE_ACK:
            self._frame_done(self.dp.probe_acked, self.peer_streams, h)
            return
        v = self.dp.route(h, self.peer_streams)
        verdict, op, src = v.action, v.op, v.src
        if verdict == STALL:
            if self.dp.can_hold(h):  # a small frame: kept aside, the stream reads on
                self._hold(h)
                return
            self._stall(h)
            return
        if verdict == DROP or verdict == DIVERGED:
            self._discard(h.length)
            return
        if verdict == PEND:  # FIN/ERROR for an operation not posted yet: remembered
            op = None
        if h.kind == F.DATA:
            try:
                rx = op.on_data(src, h, self)
            except InvalidUsage as e:  # acted on once the frame's tag checks: a changed header
                self._discard(h.length,  # fails its tag (PeerLost), not the call as misuse
                              lambda e=e: op.done or self.dp._fail_op(op, e, tell_peers=True))
                return
            self._receive(rx, op, h.length)
        elif h.kind == F.FIN:
            if op is None:
                self._frame_done(self.dp._remember_ctrl, h, self.peer_streams.peer_id, "")
            else:
                self._frame_done(op.on_fin, src, h.fin)
        else:  # ERROR: read the message first
            self._hdr = h
            self._ctrl = (op, src)
            if h.length == 0:
                self._on_error_payload(b"")
            else:
                self._want(_CTRL_PAYLOAD, h.length)

    def _finish(self, rx) -> None:
        """A payload is complete: let its collective act on it (reduce, forward, finish)."""
        try:
            rx.finish()
        except PcclError as e:  # the collective refuses (e.g. a non-finite quantized result)
            self.dp._fail_op(self._rx_op, e, tell_peers=True)
        except Exception as e:  # pragma: no cover - a bug
            self._internal_error(e)

    def _on_error_payload(self, payload: bytes) -> None:
        h = self._hdr
        self._hdr = None
        self._frame_done(self._error_frame, h, payload)

    def _error_frame(self, h: F.Header, payload: bytes) -> None:
        op, src = self._ctrl
        msg = F.decode_error_message(payload)
        if op is None:
            self.dp._remember_ctrl(h, self.peer_streams.peer_id, msg)
        else:
            self.dp._remote_error(op, src, h.error_code, msg)

    def _discard(self, n: int, then=None) -> None:
        """Drop the next ``n`` payload bytes, then ``then()`` once the frame's tag checks."""
        if then is not None:
            self._discard_then = then
        if n <= 0:
            then, self._discard_then = self._discard_then, None
            self._frame_done(then)
            return
        self._discard_left = n - min(n, _SCRATCH)
        self._state = _DISCARD
        self._view = self._scratch_view()[:min(n, _SCRATCH)]
        self._pos = 0

    def _hold(self, h: F.Header) -> None:
        """Read the payload of a small frame for a call not posted here into a buffer of its
        own; the data plane keeps it until the call is posted (``DataPlane.hold``)."""
        buf = bytearray(h.length)
        peer_streams = self.peer_streams
        self._receive(Rx(memoryview(buf), None, lambda: self.dp.hold(h, peer_streams, self, buf)), None, h.length)

    def _receive(self, rx: Rx, op, length: int) -> None:
        """Read the next ``length`` payload bytes into ``rx.view``, then ``rx.finish()``."""
        self._rx, self._progress, self._rx_op = rx, rx.progress, op
        if length == 0:
            self._rx = self._progress = None
            self._frame_done(self._finish, rx)
            return
        self._state = _PAYLOAD
        self._view = rx.view
        self._pos = 0
        self._pumped_rx = self._bulk and length >= self._bulk
        if len(self._view) != length:  # pragma: no cover - collective bug
            raise ProtocolError("internal: receive view size mismatch")

    def _stall(self, h: F.Header) -> None:
        self._hdr = h
        self._state = _STALLED
        self._view = memoryview(self._small)[:0]
        self._pos = 0
        self.transport.pause_reading()
        self._stall_timer = self.dp._loop.call_later(self.dp.config.stall_timeout, self._stall_expired)
        self.dp._stalled.add(self)

    def _stall_expired(self) -> None:
        self._stall_timer = None
        if self._state != _STALLED:
            return
        h = self._hdr
        log.warning("dropping a frame for tag %d epoch %d from %s: no such operation posted within %.1fs",
                    h.tag, h.epoch, self.peer_streams.peer_id if self.peer_streams else self.peer, self.dp.config.stall_timeout)
        self.dp._stalled.discard(self)
        self._hdr = None
        if self.peer_streams is not None and h.kind == F.DATA:
            self.dp.stall_expired(h, self.peer_streams.peer_id)
        self._discard(h.length)
        self._resume()

    def retry_stalled(self) -> None:
        """Called by the data plane when operations or the epoch changed."""
        if self._state != _STALLED:
            return
        h = self._hdr
        if self.dp.route(h, self.peer_streams).action == STALL:
            return
        self.dp._stalled.discard(self)
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._hdr = None
        try:
            self._on_header(h)
        except ProtocolError as e:
            self._protocol_error(e)
            return
        if self._state != _STALLED and self._state != _CLOSED:
            self._resume()

    # -- errors and closing ---------------------------------------------------------------
    def _protocol_error(self, e: ProtocolError) -> None:
        who = self.peer_streams.peer_id if self.peer_streams is not None and self._state >= _HEADER else self.peer
        self._close(f"protocol error from {who}: {e}",
                    why="bad_proof" if self._state == _HS_HELLO_ID else "malformed")

    def _internal_error(self, e: BaseException) -> None:
        log.exception("internal error on a data stream")
        self._close(f"internal error: {type(e).__name__}: {e}")

    def _stranger_failed(self, why: str) -> bool:
        """An accepted connection that ends before it proved the secret: the gate counts it
        and summarises such ends (one log line per address and interval, not one each)."""
        if self.connector or self._proved:
            return False
        self.dp.stranger_failed(self, why)
        return True

    def _close(self, reason: str, why: str = "malformed") -> None:
        if self._state == _CLOSED:
            return
        if self._stranger_failed(why):
            log.debug("closing data connection %s: %s", self.peer, reason)
        else:
            log.warning("closing data connection %s: %s", self.peer, reason)
        self._not_up(reason)
        self._state = _CLOSED
        self._stop_pump(hard=True)
        self._cancel_timers()
        self.dp._unstall(self)
        if self.peer_streams is not None:
            self.dp._peer_lost(self.peer_streams, reason)
        if self.transport is not None:
            self.transport.abort()

    def shut(self, graceful: bool) -> None:
        """Close for good (the link is going): gracefully (FIN after what was sent, so the
        peer reads our last frames) when asked and nothing is in flight, else with a reset."""
        if self._state == _CLOSED:
            return
        gentle = graceful and not self.busy
        self._state = _CLOSED
        self._stop_pump(hard=not gentle)
        self._cancel_timers()
        self.dp._unstall(self)
        if self.transport is None:
            return
        if gentle and not self.transport.get_write_buffer_size():
            self.drain(LINGER)
        else:
            self.transport.abort()

    def drain(self, timeout: float) -> None:
        """Leave gracefully: half-close (our FIN follows the frames already written), then read
        and drop whatever the peer still sends until its EOF or ``timeout``. Closing with
        unread bytes would send RST instead, and an RST makes the peer's kernel drop our last
        frames (a FIN of a call the peer then fails, while we counted it done)."""
        tr = self.transport
        self._state = _DRAIN
        self._cancel_timers()
        self.dp._unstall(self)
        self._view = self._scratch_view()
        self._pos = 0
        self.drained = self.dp._loop.create_future()
        try:
            tr.write_eof()
            tr.resume_reading()
        except (OSError, RuntimeError):
            tr.abort()
            return
        self._drain_timer = self.dp._loop.call_later(timeout, tr.abort)

    def _stop_pump(self, hard: bool) -> None:
        if self._pump is not None:
            self._pump.stop(hard)
            self._pump = None
        self._pumped_rx = False

    @property
    def busy(self) -> bool:
        """A thread is moving a frame: the stream cannot be closed gracefully now."""
        return self._tx_busy or self._state == _PUMPED

    def _cancel_timers(self) -> None:
        for t in (self._hs_timer, self._stall_timer):
            if t is not None:
                t.cancel()
        self._hs_timer = self._stall_timer = None

    # -- sending ------------------------------------------------------------------------
    # The transport holds at most ~WRITE_HIGH bytes (by reference); beyond that, frames wait
    # in our backlog, where a failed call's frames can still be withdrawn (purge).

    def pause_writing(self) -> None:
        self._blocked = True

    def resume_writing(self) -> None:
        self._blocked = False
        self._flush()
        self._more()

    def wants_frame(self) -> bool:
        """Whether this stream has sent what it was given (into the kernel, or nearly: its
        transport holds less than WRITE_HIGH) and may take a SPREAD frame."""
        return not (self._blocked or self._backlog or self._tx_busy or self._state == _CLOSED
                    or self.transport is None or self.transport.is_closing())

    def _more(self) -> None:
        """Sent what it had: the link may give it a SPREAD frame."""
        if self.peer_streams is not None and not self._backlog:
            self.peer_streams.feed()

    def _flush(self) -> None:
        backlog = self._backlog
        while backlog and not self._blocked and not self._tx_busy:
            h, p = backlog.popleft()
            if not self._emit(h, p):
                return

    def mark(self) -> tuple[int, int]:
        """Where the stream's output is now: :meth:`flushed` says when all of it has left."""
        return self._written, self._jobs[0]

    def flushed(self, mark: tuple[int, int]) -> bool:
        """Every byte written up to ``mark`` is in the kernel (none will be read from the
        memory it came from any more), or the stream is closed (none will be sent)."""
        if self._state == _CLOSED or self.transport is None or self.transport.is_closing():
            return True
        return self._written - self.transport.get_write_buffer_size() >= mark[0] and self._jobs[1] >= mark[1]

    def _pumped_out(self, err: BaseException | None) -> None:
        self._tx_busy = False
        self._jobs[1] += 1
        if err is not None:
            if self._state != _CLOSED:
                self._close(f"send failed: {err}")
            return
        if self._state != _CLOSED:
            self._flush()
            self._more()

    def write(self, header: bytes, payload) -> None:
        if self.transport.is_closing():  # ending (clean-EOF grace): the link is about to be lost
            return
        if self._blocked or self._backlog or self._tx_busy:
            self._backlog.append((header, payload))
        else:
            self._emit(header, payload)

    def purge(self, key: bytes) -> None:
        """Withdraw queued frames whose (epoch, tag, attempt) header bytes equal ``key``."""
        if self._backlog:
            self._backlog = collections.deque(x for x in self._backlog if x[0][F.CALL_KEY_AT] != key)

    def _begin_frame(self, seal, header: bytes) -> bytes:
        """Start the frame's seal; the header as it goes out. An encrypting seal takes the
        header now (the quantization fields zeroed as associated data, then encrypted as
        the first bytes of the frame's ciphertext); otherwise the header is absorbed with
        the payload, here or on the send thread."""
        seal.begin(self._tx_seq)
        self._tx_seq += 1
        if not seal.encrypting:
            return header
        a, b = F.QUANT_AT, F.QUANT_AT + F.QUANT_LEN
        aad = header[:a] + bytes(F.QUANT_LEN) + header[b:]
        seal.absorb(aad)
        return header[:a] + seal.crypt(header[a:b]) + header[b:]

    def _open_header(self) -> None:
        """(An encrypting seal) the header just read: its associated data, then its
        quantization fields decrypted in place (see _begin_frame)."""
        seal, view = self._rx_seal, self._view
        a, b = F.QUANT_AT, F.QUANT_AT + F.QUANT_LEN
        aad = bytearray(view)
        aad[a:b] = bytes(F.QUANT_LEN)
        seal.absorb(aad)
        seal.crypt(view[a:b], view[a:b])

    def _emit(self, header: bytes, payload) -> bool:
        """Write a frame (or hand it to the send thread); False if it went back to the
        backlog because the transport still holds bytes."""
        tr = self.transport
        if tr.is_closing():
            return True
        seal = self._tx_seal
        if len(header) > F.HEADER_SIZE:  # an ERROR frame comes whole: its message is its payload
            header, payload = header[:F.HEADER_SIZE], header[F.HEADER_SIZE:]
        if self._bulk and len(payload) >= self._bulk and self._pump is not None:
            if tr.get_write_buffer_size():  # the transport still writes: after it, in order
                self._backlog.appendleft((header, payload))
                if not self._blocked:  # (its limits of 0 pause us whenever it holds bytes)
                    self.dp._loop.call_later(0.0005, self._flush)
                return False
            if seal is not None:
                header = self._begin_frame(seal, header)
            self._jobs[0] += 1
            try:
                self._pump.send(header, payload, self._pumped_out, seal)
            except (OSError, RuntimeError) as e:  # no thread could be started
                self._close(f"cannot start an I/O thread: {e}")
                return True
            self._tx_busy = True
            return True
        parts = (header, payload) if len(payload) else (header,)
        if seal is not None:
            if not seal.encrypting:
                seal.begin(self._tx_seq)
                self._tx_seq += 1
                seal.absorb(header)
            else:
                header = self._begin_frame(seal, header)
                parts = (header,) + parts[1:]
            if len(parts) > 1:
                if seal.encrypting:  # ciphertext in a buffer of its own: the caller's memory is not ours
                    parts = (header, seal.crypt(payload))
                else:
                    seal.absorb(payload)
            parts += (seal.tag(),)
        self._written += sum(_nbytes(p) for p in parts)
        if self._vectored:
            tr.writelines(parts)  # uvloop: one writev, payload referenced, not copied
        else:  # stock asyncio's writelines joins (copies) its arguments
            for part in parts:
                tr.write(part)
        return True


def _nbytes(buf) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


_SEAL_WORDS = {F.SEAL_NONE: "sends frames without integrity tags", F.SEAL_TAG: "tags every frame",
               F.SEAL_ENCRYPT: "tags every frame and encrypts payloads"}


_LINUX_NOTSENT_LOWAT = 25 if sys.platform.startswith("linux") else None  # (not in the socket module)


def _tune(sock, user_timeout: float) -> None:
    """TCP_NODELAY, TCP_NOTSENT_LOWAT (see NOTSENT_LOWAT), and dead-link detection: a link
    whose sent data stays unacknowledged for ``user_timeout`` seconds (a path that silently
    drops everything) is closed by the kernel, and so is an idle one that stops answering
    keepalives, so it is reported and replaced instead of stalling every call until its
    deadline."""
    opts = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1), (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_NOTSENT_LOWAT", _LINUX_NOTSENT_LOWAT), NOTSENT_LOWAT)]
    if user_timeout > 0:
        idle = max(1, int(user_timeout / 2))
        opts += [(socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), int(user_timeout * 1000)),
                 (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), idle),
                 (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), max(1, idle // 2)),
                 (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), 2)]
    for level, name, value in opts:
        if name is None:  # not on this platform
            continue
        try:
            sock.setsockopt(level, name, value)
        except OSError:
            pass
