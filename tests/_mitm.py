"""A man in the middle for data links: an asyncio relay on 127.0.0.1 that parses what passes.

The dialler of a link is given the relay's port instead of the acceptor's; every connection
the relay accepts it forwards to the real listener, reading each direction as the data plane
writes it (docs/dataplane.md): the handshake (CHALLENGE, HELLO and WELCOME, sizes from
``wire/frames.py``), then frames of a 68-byte header, ``length`` payload bytes and a 16-byte
tag. Each frame is handed, whole, to the relay's ``policy``, which says what goes on the wire
instead: a list of byte strings (the frame, nothing, something else), in which ``CUT`` means
"close both sides here" (a policy may also return a coroutine giving that list). Whatever passes
is recorded per (connection, direction) so that a policy can replay or splice frames, and so
that a test can look for plaintext in what an eavesdropper saw.

The relay holds no secret: it can only move, change, drop or repeat bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import struct
from collections.abc import Callable

from pccl_py.errors import ProtocolError
from pccl_py.transport.seal import TAG_BYTES
from pccl_py.wire import frames as F

UP, DOWN = "up", "down"  # dialler -> acceptor, and back
CUT = object()  # in a policy's answer: forward nothing more, close both sides with a reset


@dataclasses.dataclass
class Frame:
    conn: int  # index of the relayed connection, in accept order
    stream: int  # the stream number its HELLO named
    direction: str
    n: int  # the frame's number in this direction of this connection (its IV)
    header: bytes
    payload: bytes
    tag: bytes

    @property
    def h(self) -> F.Header:
        """The header as the wire shows it: with encryption on, lo and scale are ciphertext
        (read here as the floats those bytes would be)."""
        try:
            return F.decode_header(self.header)
        except ProtocolError:
            a, b = F.QUANT_AT, F.QUANT_AT + F.QUANT_LEN
            lo, scale = struct.unpack("<ff", self.header[a:b])
            blank = self.header[:a] + struct.pack("<ff", 0.0, 1.0) + self.header[b:]
            return dataclasses.replace(F.decode_header(blank), lo=lo, scale=scale)

    @property
    def wire(self) -> bytes:
        return self.header + self.payload + self.tag


Policy = Callable[[Frame, "Relay"], object]


def passthrough(frame: Frame, relay: Relay):
    return [frame.wire]


class Relay:
    """See the module docstring. ``target``: the acceptor's TCP port."""

    def __init__(self, target: int, policy: Policy = passthrough, *, keep: int = 64 << 20):
        self.target = target
        self.policy = policy
        self.hello_hook: Callable[[bytes], bytes] | None = None  # rewrites each HELLO in flight
        self.keep = keep  # bytes of frames kept for replays and eavesdropping, all connections
        self.kept = 0
        self.frames: dict[tuple[int, str], list[Frame]] = {}  # (conn, direction) -> frames seen
        self.handshakes: dict[tuple[int, str], list[bytes]] = {}  # handshake messages seen
        self.streams: dict[int, int] = {}  # conn -> stream number
        self.conns = 0
        self.cut = 0  # connections the policy cut
        self.changed = asyncio.Event()  # set whenever a frame is recorded
        self.server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()  # one per relayed connection
        self._pumps: set[asyncio.Future] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self._pumps):  # (a connection's own task ends with its pumps)
            t.cancel()
        for w in self._writers:
            _abort(w)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)

    def seen(self) -> bytes:
        """Every byte of every frame that passed, both directions (as far as kept)."""
        return b"".join(f.wire for fs in self.frames.values() for f in fs)

    async def frame(self, conn_stream: int, direction: str, n: int, timeout: float = 5.0) -> Frame:
        """Frame ``n`` of ``direction`` on the connection of stream ``conn_stream`` (the first
        such connection), once it has passed (waits at most ``timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for (c, d), fs in self.frames.items():
                if d == direction and self.streams.get(c) == conn_stream and len(fs) > n:
                    return fs[n]
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"frame {n} {direction} of stream {conn_stream} never passed")
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    # -- relaying -------------------------------------------------------------------------
    async def _serve(self, r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        conn = self.conns
        self.conns += 1
        try:
            try:
                r2, w2 = await asyncio.open_connection("127.0.0.1", self.target)
            except OSError:
                _abort(w1)
                return
            self._writers += [w1, w2]
            hello = asyncio.get_running_loop().create_future()  # (seal, stream) once HELLO passed
            pumps = [asyncio.ensure_future(self._pump(conn, UP, r1, w2, hello, (w1, w2))),
                     asyncio.ensure_future(self._pump(conn, DOWN, r2, w1, hello, (w1, w2)))]
            self._pumps.update(pumps)
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in pumps:
                    t.cancel()
                await asyncio.wait(pumps, timeout=2)
                self._pumps.difference_update(pumps)
                for w in (w1, w2):
                    _abort(w)
        finally:
            self._tasks.discard(task)

    async def _pump(self, conn: int, direction: str, r, w, hello: asyncio.Future, both) -> None:
        hs = self.handshakes.setdefault((conn, direction), [])
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            if direction == UP:
                fixed = await r.readexactly(F.HELLO_FIXED.size)
                peer_id = await r.readexactly(fixed[6])
                seal = fixed[7]
                stream = struct.unpack_from("<H", fixed, 8)[0]
                self.streams[conn] = stream
                hello.set_result((seal, stream))
                hs.append(fixed + peer_id)
                w.write(self.hello_hook(fixed + peer_id) if self.hello_hook else fixed + peer_id)
            else:
                challenge = await r.readexactly(F.CHALLENGE_S.size)
                hs.append(challenge)
                w.write(challenge)
                fixed = await r.readexactly(F.WELCOME_FIXED.size)
                peer_id = await r.readexactly(fixed[6])
                hs.append(fixed + peer_id)
                w.write(fixed + peer_id)
            seal, stream = await hello
            tag_len = TAG_BYTES if seal != F.SEAL_NONE else 0
            frames = self.frames.setdefault((conn, direction), [])
            n = 0
            while True:
                header = await r.readexactly(F.HEADER_SIZE)
                length = struct.unpack_from("<I", header, 44)[0]
                payload = await r.readexactly(length) if length else b""
                tag = await r.readexactly(tag_len) if tag_len else b""
                frame = Frame(conn, stream, direction, n, header, payload, tag)
                n += 1
                if self.kept < self.keep:
                    frames.append(frame)
                    self.kept += len(frame.wire)
                    self.changed.set()
                out = self.policy(frame, self)
                if asyncio.iscoroutine(out):
                    out = await out
                for part in out:
                    if part is CUT:
                        await w.drain()
                        self.cut += 1
                        for x in both:
                            _abort(x)
                        return
                    w.write(part)
                await w.drain()


def _abort(w: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        w.transport.abort()


# -- policies -----------------------------------------------------------------------------
# Each acts once, on frame ``n`` of ``direction`` on the first connection of stream ``stream``
# (the relay's connections of a later epoch pass unchanged), and sets ``done`` when it did.


class Once:
    """``n``: the frame's number on its connection, or with ``kind`` (DATA, FIN, ERROR) the
    first frame of that kind from number ``n`` on."""

    def __init__(self, direction: str = UP, stream: int = 0, n: int = 1, kind: int | None = None):
        self.direction, self.stream, self.n, self.kind = direction, stream, n, kind
        self.conn: int | None = None
        self.done = False

    def hit(self, f: Frame) -> bool:
        if self.done or f.direction != self.direction or f.stream != self.stream:
            return False
        if self.conn is None:
            self.conn = f.conn
        if f.conn != self.conn:
            return False
        if self.kind is not None:
            return f.n >= self.n and f.header[5] == self.kind
        return f.n == self.n

    def __call__(self, f: Frame, relay: Relay):
        if not self.hit(f):
            return [f.wire]
        self.done = True
        return self.act(f, relay)

    def act(self, f: Frame, relay: Relay):  # pragma: no cover - overridden
        raise NotImplementedError


class Flip(Once):
    """Flip one bit: ``part`` "header" (byte ``at`` of the header), "payload" or "tag"."""

    def __init__(self, part: str, at: int, bit: int = 0x04, **kw):
        super().__init__(**kw)
        self.part, self.at, self.bit = part, at, bit

    def act(self, f, relay):
        b = bytearray(f.wire)
        base = {"header": 0, "payload": F.HEADER_SIZE, "tag": F.HEADER_SIZE + len(f.payload)}[self.part]
        b[base + self.at] ^= self.bit
        return [bytes(b)]


class Truncate(Once):
    """Forward the header and half the payload, then cut the connection."""

    def act(self, f, relay):
        return [f.header + f.payload[: len(f.payload) // 2], CUT]


class Drop(Once):
    def act(self, f, relay):
        return []


class Duplicate(Once):
    def act(self, f, relay):
        return [f.wire, f.wire]


class Reorder(Once):
    """Hold frame n back and send it after frame n+1."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.held: Frame | None = None

    def __call__(self, f, relay):
        if self.held is not None and f.conn == self.conn and f.direction == self.direction:
            held, self.held = self.held, None
            return [f.wire, held.wire]
        if not self.hit(f):
            return [f.wire]
        self.done = True
        self.held = f
        return []


class Replay(Once):
    """Send frame ``source`` of this connection (already passed) again, in place of frame n."""

    def __init__(self, source: int = 0, **kw):
        super().__init__(**kw)
        self.source = source

    def act(self, f, relay):
        return [relay.frames[(f.conn, f.direction)][self.source].wire]


class Splice(Once):
    """Put another frame in place of frame n: ``frame`` (recorded in another run), or else
    frame ``n`` of direction ``source`` (default: the same) on the connection of stream
    ``other`` of this run (waited for). With ``other`` the same stream and the other
    direction, the peer's own frame is reflected back at it."""

    def __init__(self, frame: Frame | None = None, other: int = 1, source: str | None = None, **kw):
        super().__init__(**kw)
        self.frame, self.other, self.source = frame, other, source

    def act(self, f, relay):
        if self.frame is not None:
            return [self.frame.wire]

        async def later():
            other = await relay.frame(self.other, self.source or f.direction, f.n)
            assert (other.conn, other.direction) != (f.conn, f.direction)
            self.frame = other
            return [other.wire]
        return later()
