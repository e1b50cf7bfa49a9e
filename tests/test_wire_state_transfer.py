"""Shared-state transfer wire format without sockets: round trips, fixed bytes, every malformed input."""

from __future__ import annotations

import pytest

from pccl_py.errors import ProtocolError
from pccl_py.wire import state_transfer as w

pytestmark = pytest.mark.timeout(30)

SECRET = b"run-secret"
NONCE = bytes(range(32))


# ---------------------------------------------------------------- round trips


def test_hello_round_trip():
    data = w.encode_hello(NONCE)
    assert len(data) == w.HELLO.size == 36
    assert w.decode_hello(data) == NONCE


@pytest.mark.parametrize("peer_id", ["", "p", "ünï-" * 8, "x" * w.MAX_ID])
def test_auth_round_trip_and_proof(peer_id):
    data = w.encode_auth(SECRET, NONCE, peer_id)
    n = w.decode_auth_head(data[:w.AUTH.size])
    assert n == len(peer_id.encode())
    rest = data[w.AUTH.size:]
    assert len(rest) == n + w.PROOF_LEN
    got_id, mac = w.decode_auth_rest(rest, n)
    assert got_id == peer_id
    assert w.proof_matches(SECRET, NONCE, got_id, mac)
    assert not w.proof_matches(b"other secret", NONCE, got_id, mac)
    assert not w.proof_matches(SECRET, bytes(32), got_id, mac)
    assert not w.proof_matches(SECRET, NONCE, got_id + "x", mac)


@pytest.mark.parametrize("name", ["w", "layer.0/ü", "n" * w.MAX_NAME])
@pytest.mark.parametrize(("revision", "offset", "length"), [(0, 0, 0), (-1, 5, 7), (2**63 - 1, 2**64 - 1, 2**30)])
def test_request_round_trip(name, revision, offset, length):
    data = w.encode_request(name, revision, offset, length)
    n, partial = w.decode_request_head(data[:w.REQ.size])
    assert n == len(name.encode()) == len(data) - w.REQ.size
    req = w.finish_request(partial, data[w.REQ.size:])
    assert req == w.Request(name, revision, offset, length)


@pytest.mark.parametrize("length", [0, 1, w.MAX_REQUEST])
def test_reply_head_round_trip(length):
    assert w.decode_reply_head(w.encode_reply_head(length)) == (w.OK, length)


def test_refusal_round_trip_and_cut():
    data = w.encode_refusal("no such tensor")
    status, n = w.decode_reply_head(data[:w.RESP.size])
    assert (status, n) == (w.REFUSED, len("no such tensor"))
    assert w.decode_refusal_text(data[w.RESP.size:]) == "no such tensor"
    long = w.encode_refusal("x" + "é" * 1000)  # 2001 bytes of UTF-8, cut inside a character
    status, n = w.decode_reply_head(long[:w.RESP.size])
    assert n == w.MAX_TEXT == len(long) - w.RESP.size
    assert w.decode_refusal_text(long[w.RESP.size:]) == "x" + "é" * 511 + "\ufffd"


def test_bytes_on_the_wire_are_fixed():
    """The exact layout (a change here is a wire change)."""
    assert w.encode_hello(NONCE) == b"PXS1" + NONCE
    assert w.encode_request("ab", -2, 3, 4) == (
        b"PXQ1" + b"\x02\x00" + (-2).to_bytes(8, "little", signed=True) + (3).to_bytes(8, "little")
        + (4).to_bytes(8, "little") + b"ab")
    assert w.encode_reply_head(5) == b"PXR1\x00" + (5).to_bytes(8, "little")
    assert w.encode_refusal("no") == b"PXR1\x01" + (2).to_bytes(8, "little") + b"no"
    import hashlib
    import hmac
    mac = hmac.new(SECRET, NONCE + b"id", hashlib.sha256).digest()
    assert w.encode_auth(SECRET, NONCE, "id") == b"PXA1\x02\x00id" + mac


def test_non_utf8_names_and_ids_decode_with_replacement():
    _, partial = w.decode_request_head(w.REQ.pack(w.M_REQ, 2, 1, 0, 0))
    assert w.finish_request(partial, b"\xff\xfe").name == "\ufffd\ufffd"
    peer_id, mac = w.decode_auth_rest(b"\xff" + bytes(32), 1)
    assert peer_id == "\ufffd" and mac == bytes(32)


def test_encode_hello_rejects_a_wrong_nonce():
    with pytest.raises(ValueError):
        w.encode_hello(b"short")


# ---------------------------------------------------------------- malformed input


def _wrong_sizes(good: bytes) -> list[bytes]:
    return [b"", good[:-1], good + b"\0"]


@pytest.mark.parametrize(
    ("decode", "good"),
    [
        (w.decode_hello, w.encode_hello(NONCE)),
        (w.decode_auth_head, w.AUTH.pack(w.M_AUTH, 1)),
        (w.decode_request_head, w.REQ.pack(w.M_REQ, 1, 0, 0, 0)),
        (w.decode_reply_head, w.encode_reply_head(0)),
    ],
    ids=["hello", "auth", "request", "reply"],
)
def test_truncated_or_oversized_fixed_parts_are_rejected(decode, good):
    decode(good)  # the good one passes
    for bad in _wrong_sizes(good):
        with pytest.raises(ProtocolError, match="must be"):
            decode(bad)


@pytest.mark.parametrize(
    ("decode", "good"),
    [
        (w.decode_hello, w.encode_hello(NONCE)),
        (w.decode_auth_head, w.AUTH.pack(w.M_AUTH, 1)),
        (w.decode_request_head, w.REQ.pack(w.M_REQ, 1, 0, 0, 0)),
        (w.decode_reply_head, w.encode_reply_head(0)),
    ],
    ids=["hello", "auth", "request", "reply"],
)
def test_wrong_magic_and_version_are_rejected(decode, good):
    for magic in (w.M_HELLO, w.M_AUTH, w.M_REQ, w.M_RESP, b"PCDP", b"\0\0\0\0"):
        if magic == good[:4]:
            continue
        with pytest.raises(ProtocolError, match="magic"):
            decode(magic + good[4:])
    with pytest.raises(ProtocolError, match="version b'2'"):
        decode(good[:3] + b"2" + good[4:])


def test_auth_bad_lengths():
    with pytest.raises(ProtocolError, match="exceeds"):
        w.decode_auth_head(w.AUTH.pack(w.M_AUTH, w.MAX_ID + 1))
    assert w.decode_auth_head(w.AUTH.pack(w.M_AUTH, w.MAX_ID)) == w.MAX_ID
    assert w.decode_auth_head(w.AUTH.pack(w.M_AUTH, 0)) == 0  # an empty id is allowed
    for rest, n in [(bytes(31), 0), (bytes(34), 1), (b"ab" + bytes(32), 1), (bytes(w.MAX_ID + 33), w.MAX_ID + 1)]:
        with pytest.raises(ProtocolError):
            w.decode_auth_rest(rest, n)


@pytest.mark.parametrize("name_len", [0, w.MAX_NAME + 1, 0xFFFF])
def test_request_bad_name_lengths(name_len):
    with pytest.raises(ProtocolError, match="tensor name"):
        w.decode_request_head(w.REQ.pack(w.M_REQ, name_len, 0, 0, 0))


def test_finish_request_checks_the_name_it_is_given():
    _, partial = w.decode_request_head(w.REQ.pack(w.M_REQ, 1, 0, 0, 0))
    for name in (b"", b"n" * (w.MAX_NAME + 1)):
        with pytest.raises(ProtocolError, match="tensor name"):
            w.finish_request(partial, name)


@pytest.mark.parametrize(
    ("offset", "length", "size", "ok"),
    [
        (0, 100, 100, True),
        (100, 0, 100, True),  # empty range at the end
        (4000, 96, 4096, True),
        (4000, 200, 4096, False),
        (101, 0, 100, False),
        (2**64 - 1, 2, 100, False),
        (0, w.MAX_REQUEST, w.MAX_REQUEST, True),
        (0, w.MAX_REQUEST + 1, 2 * w.MAX_REQUEST, False),
    ],
)
def test_check_range(offset, length, size, ok):
    req = w.Request("w", 0, offset, length)
    if ok:
        w.check_range(req, size)
    else:
        with pytest.raises(ProtocolError, match="outside"):
            w.check_range(req, size)


@pytest.mark.parametrize(
    ("status", "length", "match"),
    [
        (2, 0, "status"),
        (255, 0, "status"),
        (w.REFUSED, w.MAX_TEXT + 1, "refusal"),
        (w.OK, w.MAX_REQUEST + 1, "exceeds"),
        (w.OK, 2**64 - 1, "exceeds"),
    ],
)
def test_reply_head_bad_status_and_lengths(status, length, match):
    with pytest.raises(ProtocolError, match=match):
        w.decode_reply_head(w.RESP.pack(w.M_RESP, status, length))


# ---------------------------------------------------------------- the client's reader


def drive(reader: w.ReplyReader, stream: bytes, dests: list[bytearray], split: int = 7) -> list:
    """Feed ``stream`` the way the client's protocol does: ``need`` bytes into scratch, or
    into the oldest destination, in pieces of at most ``split`` bytes."""
    events: list = []
    pos = 0
    dest_i = 0
    while pos < len(stream):
        need = reader.need
        got = bytearray()
        while len(got) < need:
            if pos >= len(stream):
                return events  # the stream ended mid-read
            take = min(split, need - len(got), len(stream) - pos)
            got += stream[pos:pos + take]
            pos += take
        if reader.mode == "payload":
            dests[dest_i][:] = got
            event = reader.complete(None)
            dest_i += 1
        else:
            event = reader.complete(bytes(got))
        events.append(event)
    return events


def test_reader_follows_a_whole_conversation():
    r = w.ReplyReader()
    assert (r.mode, r.need) == ("hello", w.HELLO.size)
    r.asked(0)  # AUTH
    r.asked(5)
    r.asked(0)  # an empty request
    r.asked(3)
    stream = (w.encode_hello(NONCE) + w.encode_reply_head(0) + w.encode_reply_head(5) + b"hello"
              + w.encode_reply_head(0) + w.encode_reply_head(3) + b"abc")
    dests = [bytearray(5), bytearray(3)]
    events = drive(r, stream, dests)
    assert events == [("nonce", NONCE), ("answered", 0), ("payload", 5), ("answered", 5), ("answered", 0),
                      ("payload", 3), ("answered", 3)]
    assert dests == [bytearray(b"hello"), bytearray(b"abc")]
    assert r.unanswered == 0 and (r.mode, r.need) == ("head", w.RESP.size)


@pytest.mark.parametrize("text", ["wrong revision", ""])
def test_reader_reports_a_refusal(text):
    r = w.ReplyReader()
    r.asked(0)
    r.asked(10)
    events = drive(r, w.encode_hello(NONCE) + w.encode_reply_head(0) + w.encode_refusal(text), [])
    want = [("nonce", NONCE), ("answered", 0)]
    if text:
        want.append(("text", len(text)))
    assert events == want + [("refused", text)]
    assert r.mode == "closed"
    with pytest.raises(ProtocolError, match="after the connection ended"):
        r.complete(b"")


def test_reader_rejects_an_unsolicited_reply():
    r = w.ReplyReader()
    r.complete(w.encode_hello(NONCE))
    with pytest.raises(ProtocolError, match="unsolicited"):
        r.complete(w.encode_reply_head(0))


def test_reader_rejects_an_unsolicited_refusal():
    r = w.ReplyReader()
    r.complete(w.encode_hello(NONCE))
    with pytest.raises(ProtocolError, match="unsolicited"):
        r.complete(w.encode_refusal("x")[:w.RESP.size])


@pytest.mark.parametrize("answered", [0, 9, 11])
def test_reader_rejects_an_answer_of_the_wrong_length(answered):
    r = w.ReplyReader()
    r.complete(w.encode_hello(NONCE))
    r.asked(10)
    with pytest.raises(ProtocolError, match=f"answered {answered} bytes, asked 10"):
        r.complete(w.encode_reply_head(answered))


def test_reader_rejects_bad_hello_and_bad_headers():
    with pytest.raises(ProtocolError, match="magic"):
        w.ReplyReader().complete(b"PXR1" + NONCE)
    with pytest.raises(ProtocolError, match="expected 36"):
        w.ReplyReader().complete(w.encode_hello(NONCE)[:-1])
    r = w.ReplyReader()
    r.complete(w.encode_hello(NONCE))
    r.asked(0)
    with pytest.raises(ProtocolError, match="status"):
        r.complete(w.RESP.pack(w.M_RESP, 7, 0))
    with pytest.raises(ProtocolError, match="version"):
        r.complete(b"PXR2" + w.encode_reply_head(0)[4:])
    with pytest.raises(ProtocolError, match="refusal"):
        r.complete(w.RESP.pack(w.M_RESP, w.REFUSED, w.MAX_TEXT + 1))
