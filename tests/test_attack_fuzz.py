"""Fuzzing the data plane's decoders and streams (DESIGN.md section 8: malformed input closes
that connection with a logged reason and never crashes a daemon).

* the handshake and frame decoders of ``wire/frames.py`` on arbitrary and on nearly valid
  bytes: only ``ProtocolError`` escapes, and whatever decodes is within every bound;
* the real :class:`Stream` state machine, fed through an in-memory transport by a peer that
  holds the secret and is a member (so its frames reach the router and the collective of a
  posted call): random headers, payloads and tags, cut into random reads; nothing escapes
  the stream and the data plane closes cleanly afterwards;
* a live data port: random bytes after a valid handshake (the right seal, the secret) close
  only that connection; the real link between two peers is untouched and still exact.

Examples per property: ``PCCL_FUZZ_EXAMPLES`` (default 1500) for each decoder, a third of it
for the in-memory stream, a tenth for the live port (at least 50 and 30).
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import struct
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dataplane import SECRET, cluster, reference

from pccl_py.daemon.dataplane import DataPlane, DataPlaneConfig
from pccl_py.daemon.streams import Stream
from pccl_py.daemon.topology import PeerInfo, Topology
from pccl_py.errors import ProtocolError
from pccl_py.transport.seal import PySeal
from pccl_py.wire import frames as F
from pccl_py.wire.keys import link_keys

FUZZ = int(os.environ.get("PCCL_FUZZ_EXAMPLES", "1500"))
STREAM_FUZZ = max(50, FUZZ // 3)
LIVE_FUZZ = max(30, FUZZ // 10)

pytestmark = pytest.mark.timeout(max(120, FUZZ // 100))  # (about 1-2 ms an example at most)


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- decoders

u8, u16, u32, u64 = (st.integers(0, 2**k - 1) for k in (8, 16, 32, 64))
f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


def _check_header(h: F.Header, limits: F.Limits) -> None:
    assert h.kind in F.FRAME_KINDS
    assert h.tag <= F.MAX_TAG and h.group <= limits.max_group and h.length <= limits.max_payload
    if h.kind == F.DATA:
        assert h.quant in (F.QUANT_NONE, F.QUANT_U8, F.QUANT_U4)
        if h.quant != F.QUANT_NONE:
            assert math.isfinite(h.lo) and math.isfinite(h.scale) and h.scale >= 0
            assert h.length == (h.elems if h.quant == F.QUANT_U8 else (h.elems + 1) // 2)
    else:
        assert h.quant == F.QUANT_NONE and h.elems == 0 and h.offset == 0
    if h.kind == F.FIN:
        assert h.length == 0 and h.fin in (0, F.FIN_ALL)
    if h.kind == F.ERROR:
        assert h.error_code in F.ERR_CODES and h.length <= F.MAX_ERROR_MESSAGE


def _decode_header(buf: bytes, limits: F.Limits = F.DEFAULT_LIMITS) -> None:
    try:
        h = F.decode_header(buf, limits)
    except ProtocolError:
        return
    _check_header(h, limits)
    again = F.decode_header(F.encode_header(h), limits)  # what decodes, encodes back to itself
    assert struct.pack("<ff", again.lo, again.scale) == struct.pack("<ff", h.lo, h.scale) or \
        (math.isnan(h.lo) or math.isnan(h.scale))
    assert (again.kind, again.tag, again.offset, again.length, again.desc) == (h.kind, h.tag, h.offset, h.length,
                                                                              h.desc)


@fuzz(FUZZ)
@given(st.binary(max_size=2 * F.HEADER_SIZE))
def test_fuzz_decode_header_arbitrary_bytes(buf):
    _decode_header(buf)


@fuzz(FUZZ)
@given(st.sampled_from([F.WIRE_VERSION, F.WIRE_VERSION - 1, 0, 255]), u8, u8, u8, u32, u64, u64, u32, u32, u64,
       u32, u32, f32, f32, u64, st.integers(1, 2**32 - 1))
def test_fuzz_decode_header_nearly_valid(version, kind, quant, flags, group, epoch, tag, attempt, arg, offset,
                                         length, elems, lo, scale, desc, max_payload):
    kind = kind % 5 if kind < 200 else kind  # mostly kinds 0..4: the three frame kinds and their neighbours
    quant, flags = (quant % 4, 0) if quant < 200 else (quant, flags % 2)
    buf = F.HEADER.pack(F.MAGIC, version, kind, quant, flags, group, epoch, tag, attempt, arg, offset, length,
                        elems, lo, scale, desc)
    _decode_header(buf, F.Limits(max_payload=max_payload))


@fuzz(FUZZ)
@given(st.one_of(st.binary(max_size=F.HELLO_FIXED.size + 8),
                 st.tuples(u8, u8, u8, u8, u16, u16, u64, u64).map(lambda t: F.HELLO_FIXED.pack(
                     F.MAGIC, F.WIRE_VERSION, F.HELLO, t[0], t[1] % 4, t[4], t[5], t[6], t[7], b"n" * 32, b"m" * 32))),
       st.binary(max_size=300), st.integers(1, 64))
def test_fuzz_hello(fixed, id_bytes, max_streams):
    """``decode_hello_fixed`` then ``finish_hello`` with a random proof: only ProtocolError,
    and never an accepted HELLO (the proof is 256 random bits)."""
    limits = F.Limits(max_streams=max_streams)
    try:
        n, partial = F.decode_hello_fixed(fixed, limits)
    except ProtocolError:
        return
    assert 0 < n <= F.MAX_PEER_ID and partial.seal in F.SEALS
    assert 0 < partial.nstreams <= max_streams and partial.stream < partial.nstreams
    with pytest.raises(ProtocolError):
        F.finish_hello(partial, id_bytes[:n], SECRET, b"c" * 32)


@fuzz(FUZZ)
@given(st.binary(max_size=F.HEADER_SIZE + 8), st.binary(min_size=0, max_size=255))
def test_fuzz_hello_with_the_secret(nonce_and_more, id_bytes):
    """A HELLO made with the secret over arbitrary id bytes is accepted exactly when the id
    is valid utf-8 (and then names that id); a changed byte anywhere fails."""
    ch = (nonce_and_more + b"x" * 32)[:32]
    try:
        pid = id_bytes.decode("utf-8")
    except UnicodeDecodeError:
        pid = None
    if not id_bytes:
        return
    mac = F.hello_mac(SECRET, ch, pid if pid is not None else "", 3, 0, 1, 9, b"n" * 32, F.SEAL_TAG)
    fixed = F.HELLO_FIXED.pack(F.MAGIC, F.WIRE_VERSION, F.HELLO, len(id_bytes), F.SEAL_TAG, 0, 1, 3, 9, b"n" * 32, mac)
    n, partial = F.decode_hello_fixed(fixed)
    if pid is None:
        with pytest.raises(ProtocolError):
            F.finish_hello(partial, id_bytes, SECRET, ch)
        return
    assert F.finish_hello(partial, id_bytes, SECRET, ch).peer_id == pid
    bad = bytearray(fixed + id_bytes)
    i = len(nonce_and_more) % len(bad)
    if i in (6,):  # the id length: it changes what is read, not only what is proved
        return
    bad[i] ^= 0x20
    try:
        n2, p2 = F.decode_hello_fixed(bytes(bad[:F.HELLO_FIXED.size]))
        with pytest.raises(ProtocolError):
            F.finish_hello(p2, bad[F.HELLO_FIXED.size:F.HELLO_FIXED.size + n2], SECRET, ch)
    except ProtocolError:
        pass


@fuzz(FUZZ)
@given(st.one_of(st.binary(max_size=F.WELCOME_FIXED.size + 8),
                 st.tuples(u8, u16).map(lambda t: F.WELCOME_FIXED.pack(F.MAGIC, F.WIRE_VERSION, F.WELCOME, t[0],
                                                                       t[1] % 3, b"m" * 32))),
       st.binary(max_size=300), st.one_of(st.none(), st.text(max_size=8)))
def test_fuzz_welcome(fixed, id_bytes, expected):
    try:
        n, mac = F.decode_welcome_fixed(fixed)
    except ProtocolError:
        return
    assert 0 < n <= F.MAX_PEER_ID and len(mac) == 32
    with pytest.raises(ProtocolError):
        F.finish_welcome(mac, id_bytes[:n], SECRET, b"n" * 32, 0, 1, expected, b"c" * 32)


@fuzz(FUZZ)
@given(st.one_of(st.binary(max_size=F.CHALLENGE_S.size + 8),
                 st.tuples(u8, u8, u16, st.binary(min_size=32, max_size=32)).map(
                     lambda t: F.CHALLENGE_S.pack(F.MAGIC, t[0] % 8 + 3, t[1] % 20, t[2] % 3, t[3]))))
def test_fuzz_challenge(buf):
    try:
        nonce = F.decode_challenge(buf)
    except ProtocolError:
        return
    assert len(nonce) == F.NONCE_LEN and buf[4] == F.WIRE_VERSION and buf[5] == F.CHALLENGE


# ----------------------------------------------------------------------------- the stream, in memory

class MemTransport(asyncio.Transport):
    """What a Stream is given instead of a socket: records writes; closing it (or ending our
    side of it) ends the connection, as a socket's would."""

    def __init__(self, proto):
        super().__init__()
        self.proto = proto
        self.out = bytearray()
        self.closed = False
        self.lost = False

    def _lose(self):
        if not self.lost:
            self.lost = True
            asyncio.get_running_loop().call_soon(self.proto.connection_lost, None)

    def write(self, data):
        self.out += bytes(data)

    def writelines(self, parts):
        for p in parts:
            self.write(p)

    def get_extra_info(self, name, default=None):
        return {"peername": ("10.0.0.9", 4242)}.get(name, default)

    def abort(self):
        self.closed = True
        self._lose()

    close = abort

    def is_closing(self):
        return self.closed

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_write_buffer_size(self):
        return 0

    def write_eof(self):  # the peer answers with its own EOF
        self._lose()


def feed(stream: Stream, data: bytes, cuts: list[int]) -> None:
    """Hand ``data`` to the stream as the event loop would, in reads of the sizes in ``cuts``
    (then as much as it asks for), until it is closed."""
    i, cuts = 0, list(cuts)
    while i < len(data) and not stream.transport.closed:
        buf = stream.get_buffer(-1)
        k = min(cuts.pop(0) if cuts else len(buf), len(buf), len(data) - i)
        k = max(k, 1)
        memoryview(buf)[:k] = data[i:i + k]
        stream.buffer_updated(k)
        i += k


frame_spec = st.fixed_dictionaries({
    "kind": st.sampled_from([F.DATA, F.DATA, F.DATA, F.FIN, F.ERROR, 0, 7]),
    "epoch": st.sampled_from([1, 1, 1, 0, 2]),
    "group": st.sampled_from([0, 0, 0, 1]),
    "tag": st.sampled_from([1, 1, 1, 2, 3, 2**62]),
    "attempt": st.sampled_from([0, 0, 0, 1, 2]),
    "arg": st.integers(0, 6),
    "offset": st.one_of(st.integers(0, 4100).map(lambda x: x - x % 4), st.integers(0, 2**64 - 1)),
    "length": st.one_of(st.integers(0, 2100), st.integers(0, 70_000)),
    "quant": st.sampled_from([0, 0, 0, 1, 2, 9]),
    "elems": st.integers(0, 3000),
    "desc": st.sampled_from(["call", "call", "other"]),
    "seal": st.sampled_from(["right", "right", "right", "wrong", "none"]),
    "payload": st.sampled_from(["zeros", "random", "nan"]),
    # "schedule": offset and length of a frame the call expects (sub-chunk k of the ring's
    # chunk, or the whole tiny exchange), so that some examples go all the way through
    "shape": st.sampled_from(["random", "schedule", "schedule"]),
    "k": st.integers(0, 3),
})


@fuzz(STREAM_FUZZ)
@given(st.lists(frame_spec, min_size=1, max_size=6), st.lists(st.integers(1, 5000), max_size=20),
       st.sampled_from(["ring", "direct"]), st.booleans())
def test_fuzz_a_members_frames_through_the_real_stream(frames, cuts, algorithm, encrypt):
    """peer0 holds the secret and is a member; peer1 (the data plane under test) has posted a
    call of tag 1. peer0's frames have random fields, payloads and seals. Whatever happens,
    nothing escapes the stream, the event loop logs nothing, the call ends typed or goes on,
    and the data plane closes."""
    async def body():
        loop = asyncio.get_running_loop()
        errors: list = []
        loop.set_exception_handler(lambda _, ctx: errors.append(ctx))
        cfg = DataPlaneConfig(io_threads=False, encrypt=encrypt, sub_bytes=2048, min_sub_bytes=512, min_stripe=512)
        dp = DataPlane("peer1", secret=SECRET, streams=1, config=cfg)
        dp._loop = loop  # not started: no socket, this stream is fed by hand
        topo = Topology(1, 0, 1, (PeerInfo("peer0", "127.0.0.1", 1), PeerInfo("peer1", "127.0.0.1", 2)), 2)
        up = asyncio.ensure_future(dp.set_topology(topo))
        await asyncio.sleep(0)
        s = Stream(dp)
        tr = MemTransport(s)
        s.connection_made(tr)
        ch = F.decode_challenge(bytes(tr.out[:F.CHALLENGE_S.size]))
        nonce, session = os.urandom(32), 77
        feed(s, F.encode_hello(SECRET, ch, "peer0", 1, 0, 1, session, nonce, seal=dp.seal), [])
        await asyncio.wait_for(up, 2)
        assert not tr.closed
        seal = PySeal(link_keys(SECRET, ch, nonce, "peer0", "peer1", 0, session)[0], True, encrypt)
        src = np.arange(1000, dtype=np.float32)
        dst = np.zeros_like(src)
        call = asyncio.ensure_future(dp.all_reduce(src, dst, dtype="float32", op="sum", algorithm=algorithm, tag=1,
                                                   timeout=5))
        await asyncio.sleep(0)
        desc = dp._ops[1].desc
        wire, seq = bytearray(), 0
        for f in frames:
            length = f["length"]
            if f["shape"] == "schedule":
                f = {**f, "kind": F.DATA, "quant": 0, "epoch": 1, "group": 0, "tag": 1, "attempt": 0, "desc": "call"}
                if algorithm == "ring":  # peer1 receives chunk 0 (2000 bytes) in sub-chunks of 512
                    f["offset"], f["arg"] = 512 * f["k"], f["arg"] % 2
                    length = min(512, 2000 - f["offset"])
                else:  # a tiny direct exchange: one frame of the whole input
                    f["offset"], f["arg"], length = 0, 0, 4000
            payload = {"zeros": bytes(length), "random": os.urandom(length),
                       "nan": (np.full(length // 4 + 1, np.nan, np.float32).tobytes())[:length]}[f["payload"]]
            h = F.HEADER.pack(F.MAGIC, F.WIRE_VERSION, f["kind"], f["quant"], 0, f["group"], f["epoch"], f["tag"],
                              f["attempt"], f["arg"], f["offset"] % 2**64, length, f["elems"], 0.5, 0.25,
                              desc if f["desc"] == "call" else desc ^ 1)
            if f["seal"] == "none":
                wire += h + payload
                continue
            seal.begin(seq)
            seq += 1
            seal.absorb(h)
            body_ = seal.crypt(payload) if encrypt and payload else payload
            if not encrypt:
                seal.absorb(payload)
            tag = seal.tag()
            wire += h + body_ + (tag if f["seal"] == "right" else bytes(16))
        feed(s, bytes(wire), cuts)
        for _ in range(3):
            await asyncio.sleep(0)
        await dp.close()
        await asyncio.wait([call], timeout=5)
        assert call.done()
        exc = call.exception() if not call.cancelled() else None
        if exc is not None:
            from pccl_py.errors import PcclError
            assert isinstance(exc, PcclError), repr(exc)
        assert errors == [], errors
        if os.environ.get("PCCL_FUZZ_TALLY"):
            print("TALLY", type(exc).__name__ if exc else "none", tr.closed, len(tr.out) > 200)

    asyncio.run(body())


# ----------------------------------------------------------------------------- a live data port

class LivePair:
    """Two data planes with a real link, on an event loop of their own (a thread), for the
    whole test; the fuzzer talks to peer1's TCP port with blocking sockets."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.failures: list = []
        self.errors: list = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.dps = None
        self._cm = None

    def call(self, coro, timeout: float = 20.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self):
        self.loop.set_exception_handler(lambda _, ctx: self.errors.append(ctx))
        self._cm = cluster(2, config=DataPlaneConfig(io_threads=True, bulk_min=64 << 10), failures=self.failures,
                           tcp_only=range(2))
        self.dps = await self._cm.__aenter__()

    async def _stop(self):
        await self._cm.__aexit__(None, None, None)

    async def reduce(self, tag: int):
        srcs = [np.random.default_rng(tag + i).standard_normal(1 << 17).astype(np.float32) for i in range(2)]
        dsts = [np.zeros_like(s) for s in srcs]
        await asyncio.gather(*(d.all_reduce(srcs[i], dsts[i], dtype="float32", op="sum", algorithm="ring", tag=tag,
                                            timeout=5) for i, d in enumerate(self.dps)))
        want = reference(srcs, "float32", "sum")
        return all(d.tobytes() == want.tobytes() for d in dsts)

    def close(self):
        try:
            self.call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


@pytest.fixture(scope="module")
def live():
    p = LivePair()
    p.call(p._start())
    try:
        yield p
    finally:
        p.close()


def _authenticated(port: int, peer_id: str = "fuzzer") -> tuple[socket.socket, PySeal]:
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    ch = F.decode_challenge(_read(s, F.CHALLENGE_S.size))
    nonce, session = os.urandom(32), int.from_bytes(os.urandom(8), "little")
    s.sendall(F.encode_hello(SECRET, ch, peer_id, 1, 0, 1, session, nonce, seal=F.SEAL_TAG))
    n, mac = F.decode_welcome_fixed(_read(s, F.WELCOME_FIXED.size))
    assert F.finish_welcome(mac, _read(s, n), SECRET, nonce, 0, session, "peer1", ch) == "peer1"
    return s, PySeal(link_keys(SECRET, ch, nonce, peer_id, "peer1", 0, session)[0], True)


def _read(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = s.recv(n - len(out))
        if not got:
            raise ConnectionError("closed during the handshake")
        out += got
    return bytes(out)


def _ended(s: socket.socket, within: float) -> bool:
    """Whether the data plane closed the connection (EOF or reset) within ``within`` seconds."""
    deadline = time.monotonic() + within
    s.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            if not s.recv(65536):
                return True
        except TimeoutError:
            continue
        except ConnectionError:
            return True
    return False


@fuzz(LIVE_FUZZ)
@given(st.binary(min_size=1, max_size=3000), st.sampled_from(["raw", "sealed-header", "valid-frames-then"]))
def test_fuzz_a_live_port_after_a_valid_handshake_closes_only_that_connection(live, data, mode):
    """An authenticated stranger (not a member) sends random bytes; or a sealed header of a
    real shape with random payload and tag bytes; or a few valid frames, then random bytes.
    The data plane closes that connection by itself (the first bad header or tag), or once we
    end ours; the real link is never touched."""
    port = live.dps[1].port
    s, seal = _authenticated(port)
    try:
        out = b""
        if mode == "valid-frames-then":
            for i in range(3):
                h = F.pack_header(F.DATA, 0, 1, 1, 0, 0, 0, 8)
                seal.begin(i)
                seal.absorb(h + bytes(8))
                out += h + bytes(8) + seal.tag()
        elif mode == "sealed-header":
            out = F.pack_header(F.DATA, 0, 1, 1, 0, 0, 0, min(len(data), 2000))
        s.sendall(out + data)
        # a random header fails at once; a sealed header's tag fails once its payload and tag are
        # in; fewer bytes are an unfinished frame, which the data plane waits for
        if mode == "sealed-header":
            bad_in_time = len(data) >= min(len(data), 2000) + 16
        else:
            bad_in_time = len(data) >= F.HEADER_SIZE and not data.startswith(F.MAGIC)
        if bad_in_time:
            assert _ended(s, 3.0), "the data plane did not close a connection that sent garbage"
        else:
            s.shutdown(socket.SHUT_WR)
            assert _ended(s, 3.0), "the data plane kept a connection its peer had ended"
    finally:
        s.close()
    assert live.failures == [], live.failures
    assert live.errors == [], live.errors


def test_the_live_port_is_still_exact_after_the_fuzzing(live):
    assert live.call(live.reduce(tag=1)), "the real link gave a wrong result after the fuzzing"
    assert live.failures == [] and live.errors == []
