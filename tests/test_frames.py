"""Frame codec and handshake: round trips, every bound, fuzz (only ProtocolError escapes)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pccl_py.errors import ProtocolError
from pccl_py.wire import frames as F


class FrameReader:
    """Incremental frame parser fed with arbitrary byte chunks (here: a plain byte stream).

    The data plane itself reads headers and payloads straight into their destinations;
    this class applies the same checks to a plain byte stream and yields (Header, payload).
    """

    def __init__(self, limits: F.Limits = F.DEFAULT_LIMITS):
        self.limits = limits
        self._buf = bytearray()
        self._hdr: F.Header | None = None

    def feed(self, data: bytes) -> list[tuple[F.Header, bytes]]:
        self._buf += data
        out: list[tuple[F.Header, bytes]] = []
        while True:
            if self._hdr is None:
                if len(self._buf) < F.HEADER_SIZE:
                    return out
                self._hdr = F.decode_header(bytes(self._buf[:F.HEADER_SIZE]), self.limits)
                del self._buf[:F.HEADER_SIZE]
            h = self._hdr
            if len(self._buf) < h.length:
                return out
            payload = bytes(self._buf[: h.length])
            del self._buf[: h.length]
            self._hdr = None
            out.append((h, payload))

pytestmark = pytest.mark.timeout(60)


def _hdr(**kw) -> F.Header:
    base = dict(kind=F.DATA, group=3, epoch=7, tag=2**62 + 5, attempt=1, arg=2, offset=4096, length=1024)
    base.update(kw)
    return F.Header(**base)


def test_header_size_and_round_trip():
    assert F.HEADER_SIZE == 68
    h = _hdr(elems=0, desc=0xDEADBEEF12345678)
    assert F.decode_header(F.encode_header(h)) == h


def test_quantized_header_round_trip():
    h = _hdr(quant=F.QUANT_U4, elems=2047, length=1024, lo=-1.5, scale=0.25)
    assert F.decode_header(F.encode_header(h)) == h
    h8 = _hdr(quant=F.QUANT_U8, elems=1024, length=1024, lo=2.0, scale=0.5)
    assert F.decode_header(F.encode_header(h8)) == h8


def test_control_frames_round_trip():
    fin = _hdr(kind=F.FIN, arg=0, offset=0, length=0)
    assert F.decode_header(F.encode_header(fin)) == fin
    fin_all = _hdr(kind=F.FIN, arg=F.FIN_ALL, offset=0, length=0)
    assert F.decode_header(F.encode_header(fin_all)) == fin_all
    raw = F.encode_error(1, 2, 3, 0, F.ERR_INVALID_USAGE, "mismatch")
    (h, payload), = FrameReader().feed(raw)
    assert h.kind == F.ERROR and h.error_code == F.ERR_INVALID_USAGE and payload == b"mismatch"


def _mutate(h: F.Header, fmt_index: int, value) -> bytes:
    fields = list(F.HEADER.unpack(F.encode_header(h)))
    fields[fmt_index] = value
    return F.HEADER.pack(*fields)


# indices into HEADER's fields
MAGIC, VERSION, KIND, QUANT, FLAGS, GROUP, EPOCH, TAG, ATTEMPT, ARG, OFFSET, LENGTH, ELEMS, LO, SCALE, DESC = range(16)


@pytest.mark.parametrize("index,value,match", [
    (MAGIC, b"XXXX", "magic"),
    (VERSION, 99, "version"),
    (KIND, 0, "kind"),
    (KIND, F.HELLO, "kind"),
    (FLAGS, 1, "flags"),
    (TAG, 2**63, "tag"),
    (LENGTH, (64 << 20) + 1, "exceeds"),
    (QUANT, 7, "quantization"),
])
def test_header_bounds(index, value, match):
    with pytest.raises(ProtocolError, match=match):
        F.decode_header(_mutate(_hdr(), index, value))


def test_length_bound_is_configurable():
    raw = F.encode_header(_hdr(length=2048))
    with pytest.raises(ProtocolError, match="exceeds"):
        F.decode_header(raw, F.Limits(max_payload=1024))
    assert F.decode_header(raw, F.Limits(max_payload=2048)).length == 2048


def test_quant_fields_checked():
    with pytest.raises(ProtocolError, match="bytes"):
        F.decode_header(F.encode_header(_hdr(quant=F.QUANT_U8, elems=10, length=11, scale=1.0)))
    with pytest.raises(ProtocolError, match="bytes"):
        F.decode_header(F.encode_header(_hdr(quant=F.QUANT_U4, elems=10, length=6, scale=1.0)))
    with pytest.raises(ProtocolError, match="parameters"):
        F.decode_header(F.encode_header(_hdr(quant=F.QUANT_U8, elems=4, length=4, lo=float("nan"))))
    with pytest.raises(ProtocolError, match="parameters"):
        F.decode_header(F.encode_header(_hdr(quant=F.QUANT_U8, elems=4, length=4, scale=-1.0)))


def test_control_frame_bounds():
    with pytest.raises(ProtocolError, match="FIN"):
        F.decode_header(F.encode_header(_hdr(kind=F.FIN, offset=0, arg=0, length=5)))
    with pytest.raises(ProtocolError, match="data fields"):
        F.decode_header(F.encode_header(_hdr(kind=F.FIN, offset=8, length=0)))
    with pytest.raises(ProtocolError, match="FIN frame with argument 2"):
        F.decode_header(F.encode_header(_hdr(kind=F.FIN, offset=0, arg=2, length=0)))
    with pytest.raises(ProtocolError, match="error code"):
        F.decode_header(F.encode_header(_hdr(kind=F.ERROR, offset=0, arg=99, length=0)))
    with pytest.raises(ProtocolError, match="message"):
        F.decode_header(F.encode_header(_hdr(kind=F.ERROR, offset=0, arg=F.ERR_ABORTED,
                                             length=F.MAX_ERROR_MESSAGE + 1)))


def test_check_range():
    h = _hdr(offset=8, length=8)
    F.check_range(h, 0, 16, 4)
    with pytest.raises(ProtocolError, match="outside"):
        F.check_range(h, 0, 12, 4)
    with pytest.raises(ProtocolError, match="outside"):
        F.check_range(h, 12, 32, 4)
    with pytest.raises(ProtocolError, match="aligned"):
        F.check_range(_hdr(offset=6, length=8), 0, 32, 4)


def test_frame_reader_splits_anywhere():
    frames = [(_hdr(length=3), b"abc"), (_hdr(kind=F.FIN, offset=0, arg=0, length=0), b""),
              (_hdr(length=0), b"")]
    wire = b"".join(F.encode_header(h) + p for h, p in frames)
    for cut in range(0, len(wire) + 1, 7):
        r = FrameReader()
        got = r.feed(wire[:cut]) + r.feed(wire[cut:])
        assert got == frames


def test_handshake_round_trip_and_wrong_secret():
    nonce_a = b"a" * 32
    nonce_c = b"c" * 32
    raw = F.encode_hello(b"secret", nonce_a, "peer-1", 5, 2, 4, 1234, nonce_c)
    n, partial = F.decode_hello_fixed(raw[:F.HELLO_FIXED.size])
    hello = F.finish_hello(partial, raw[F.HELLO_FIXED.size:], b"secret", nonce_a)
    assert (hello.peer_id, hello.epoch, hello.stream, hello.nstreams, hello.session) == ("peer-1", 5, 2, 4, 1234)
    assert n == len("peer-1")
    with pytest.raises(ProtocolError, match="authentication"):
        F.finish_hello(partial, raw[F.HELLO_FIXED.size:], b"wrong", nonce_a)
    with pytest.raises(ProtocolError, match="authentication"):
        F.finish_hello(partial, raw[F.HELLO_FIXED.size:], b"secret", b"b" * 32)  # replayed on another nonce
    assert hello.seal == F.SEAL_TAG
    # the seal choice is proved too: flipping it breaks the proof
    flipped = raw[:5 + 2] + bytes([F.SEAL_NONE]) + raw[8:]
    n, partial = F.decode_hello_fixed(flipped[:F.HELLO_FIXED.size])
    with pytest.raises(ProtocolError, match="authentication"):
        F.finish_hello(partial, flipped[F.HELLO_FIXED.size:], b"secret", nonce_a)
    w = F.encode_welcome(b"secret", nonce_c, "peer-0", 2, 1234, nonce_a)
    n, mac = F.decode_welcome_fixed(w[:F.WELCOME_FIXED.size])
    assert F.finish_welcome(mac, w[F.WELCOME_FIXED.size:], b"secret", nonce_c, 2, 1234, "peer-0", nonce_a) == "peer-0"
    with pytest.raises(ProtocolError):
        F.finish_welcome(mac, w[F.WELCOME_FIXED.size:], b"other", nonce_c, 2, 1234, "peer-0", nonce_a)
    with pytest.raises(ProtocolError):  # a welcome recorded on another connection (another challenge)
        F.finish_welcome(mac, w[F.WELCOME_FIXED.size:], b"secret", nonce_c, 2, 1234, "peer-0", b"z" * 32)
    with pytest.raises(ProtocolError, match="answered"):
        F.finish_welcome(mac, w[F.WELCOME_FIXED.size:], b"secret", nonce_c, 2, 1234, "peer-9", nonce_a)
    assert F.decode_challenge(F.encode_challenge(nonce_a)) == nonce_a


def test_hello_bounds():
    ok = F.encode_hello(b"", b"n" * 32, "p", 0, 0, 1, 1, b"c" * 32)
    fields = list(F.HELLO_FIXED.unpack(ok[:F.HELLO_FIXED.size]))
    for i, v, match in [(3, 0, "peer id"), (4, 7, "seal"), (5, 4, "stream"), (6, 0, "stream"), (6, 65, "stream"),
                        (0, b"NOPE", "magic"), (2, F.WELCOME, "handshake")]:
        bad = list(fields)
        bad[i] = v
        with pytest.raises(ProtocolError, match=match):
            F.decode_hello_fixed(F.HELLO_FIXED.pack(*bad))


def test_descriptor_distinguishes_arguments():
    a = F.descriptor("all_reduce", "float32", "sum", 10, "ring", None, 1 << 20)
    assert a == F.descriptor("all_reduce", "float32", "sum", 10, "ring", None, 1 << 20)
    assert a != F.descriptor("all_reduce", "float32", "avg", 10, "ring", None, 1 << 20)
    assert a != F.descriptor("all_reduce", "float32", "sum", 11, "ring", None, 1 << 20)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 64))
def test_fuzz_random_bytes_only_raise_protocol_error(data, cut):
    r = FrameReader(F.Limits(max_payload=256))
    try:
        r.feed(data[:cut])
        r.feed(data[cut:])
    except ProtocolError:
        pass
    for fn in (F.decode_challenge, F.decode_welcome_fixed, F.decode_hello_fixed):
        try:
            fn(data[:F.HELLO_FIXED.size] if fn is F.decode_hello_fixed else data)
        except ProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=F.HEADER_SIZE - 20, max_size=F.HEADER_SIZE - 20), st.sampled_from(F.FRAME_KINDS))
def test_fuzz_valid_prefix_random_fields(rest, kind):
    raw = struct.pack("<4sBB", F.MAGIC, F.WIRE_VERSION, kind) + b"\0\0" + rest[: F.HEADER_SIZE - 8] + b"\0" * 12
    raw = raw[: F.HEADER_SIZE]
    try:
        h = F.decode_header(raw)
    except ProtocolError:
        return
    assert h.length <= F.DEFAULT_LIMITS.max_payload and h.tag <= F.MAX_TAG


def test_the_call_key_is_where_the_header_names_its_call():
    h = _hdr(epoch=9, tag=2**62 + 7, attempt=3)
    raw = F.encode_header(h)
    assert raw[F.CALL_KEY_AT] == F.call_key(9, 2**62 + 7, 3)
    assert F.encode_header(_hdr(epoch=9, tag=2**62 + 7, attempt=4))[F.CALL_KEY_AT] != F.call_key(9, 2**62 + 7, 3)
