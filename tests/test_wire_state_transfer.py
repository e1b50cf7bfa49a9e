"""Shared-state transfer wire format without sockets: round trips, fixed bytes, every malformed input."""

from __future__ import annotations

import pytest

from pccl_py.errors import ProtocolError, Unauthenticated
from pccl_py.wire import state_transfer as w

pytestmark = pytest.mark.timeout(30)

SECRET = b"run-secret"
NONCE = bytes(range(32))


# ---------------------------------------------------------------- the handshake


def pair(server_id="src", client_id="me", expected=None, secret=SECRET, client_secret=None):
    """A server and a client handshake and the bytes of a whole good exchange."""
    srv = w.ServerHandshake(secret, server_id)
    cli = w.ClientHandshake(client_secret if client_secret is not None else secret, client_id,
                            server_id if expected is None else expected)
    return srv, cli


def run_handshake(srv, cli):
    """Drive both sides through the wire format; (server session, client session)."""
    hello = srv.hello()
    nonce_s, id_len = w.decode_hello(hello[:w.HELLO.size])
    auth = cli.auth(nonce_s, hello[w.HELLO.size:].decode())
    n = w.decode_auth_head(auth[:w.AUTH.size])
    client_id, nonce_c, proof_c = w.decode_auth_rest(auth[w.AUTH.size:], n)
    s_session = srv.check(client_id, nonce_c, proof_c)
    answer = srv.answer()
    assert w.decode_reply_head(answer[:w.RESP.size]) == (w.OK, w.PROOF_LEN)
    c_session = cli.finish(answer[w.RESP.size:])
    return s_session, c_session


@pytest.mark.parametrize("server_id", ["", "src", "ünï-" * 8, "x" * w.MAX_ID])
@pytest.mark.parametrize("client_id", ["", "p", "y" * w.MAX_ID])
def test_mutual_handshake_round_trip_and_session(server_id, client_id):
    s_sess, c_sess = run_handshake(*pair(server_id, client_id))
    # the session keys agree and differ per direction: what one side tags the other checks
    for _ in range(3):
        data = b"some request"
        c_sess.recv.check(data, s_sess.send.tag(data))
        s_sess.recv.check(data, c_sess.send.tag(data))
    with pytest.raises(Unauthenticated):
        s_sess.recv.check(b"x", s_sess.send.tag(b"x"))  # a reflected tag


def test_a_wrong_client_secret_is_refused_by_the_server():
    srv, cli = pair(client_secret=b"other secret")
    with pytest.raises(Unauthenticated, match="failed the run-secret proof"):
        run_handshake(srv, cli)


def test_a_server_without_the_secret_is_refused_by_the_client():
    # an impostor that accepts any client proof and answers with a proof under another secret
    impostor = w.ServerHandshake(b"not the secret", "src")
    cli = w.ClientHandshake(SECRET, "me", "src")
    auth = cli.auth(impostor.nonce, "src")
    _, nonce_c, _ = w.decode_auth_rest(auth[w.AUTH.size:], 2)
    args = (impostor.nonce, nonce_c, "src", "me")
    with pytest.raises(Unauthenticated, match="did not prove the run secret as peer 'src'"):
        cli.finish(w.proof(b"not the secret", "server", *args))
    # nor does a replayed client proof pass as the server's (the roles' proofs differ)
    with pytest.raises(Unauthenticated):
        cli.finish(w.proof(SECRET, "client", *args))


def test_a_secret_holder_cannot_stand_in_for_another_source():
    # a real member "evil" (it holds the secret) answers where the plan named "src"
    srv, cli = pair(server_id="evil", expected="src")
    with pytest.raises(Unauthenticated, match="introduced itself as peer 'evil', not the source 'src'"):
        run_handshake(srv, cli)
    # and lying about its id in the HELLO does not help: its proof is over its own id
    srv = w.ServerHandshake(SECRET, "evil")
    cli = w.ClientHandshake(SECRET, "me", "src")
    auth = cli.auth(srv.nonce, "src")  # it claimed to be "src"
    client_id, nonce_c, proof_c = w.decode_auth_rest(auth[w.AUTH.size:], 2)
    with pytest.raises(Unauthenticated):
        srv.check(client_id, nonce_c, proof_c)  # the client's proof names "src", not "evil"
    forged = w.proof(SECRET, "server", srv.nonce, nonce_c, "evil", "me")
    with pytest.raises(Unauthenticated):
        cli.finish(forged)


def test_proofs_are_fresh_per_connection():
    srv1, cli1 = pair()
    srv2, cli2 = pair()
    assert srv1.nonce != srv2.nonce and cli1.nonce != cli2.nonce
    auth1 = cli1.auth(srv1.nonce, "src")
    client_id, nonce_c, proof_c = w.decode_auth_rest(auth1[w.AUTH.size:], 2)
    with pytest.raises(Unauthenticated):  # connection 1's AUTH replayed on connection 2
        srv2.check(client_id, nonce_c, proof_c)
    srv1.check(client_id, nonce_c, proof_c)
    with pytest.raises(Unauthenticated):  # connection 1's server proof replayed on connection 2
        cli2.auth(srv2.nonce, "src")
        cli2.finish(srv1.answer()[w.RESP.size:])


def test_a_proof_before_the_hello_or_an_answer_before_a_check_is_refused():
    with pytest.raises(ProtocolError, match="before the hello"):
        w.ClientHandshake(SECRET, "me", "src").finish(bytes(32))
    with pytest.raises(ProtocolError, match="no AUTH"):
        w.ServerHandshake(SECRET, "src").answer()


def test_mac_detects_alteration_replay_and_reordering():
    s_sess, c_sess = run_handshake(*pair())
    t1, t2 = s_sess.send.tag(b"one"), s_sess.send.tag(b"two")
    with pytest.raises(Unauthenticated):
        c_sess.recv.check(b"two", t2)  # out of order (it expects the first message)
    s_sess, c_sess = run_handshake(*pair())
    t1 = s_sess.send.tag(b"one")
    c_sess.recv.check(b"one", t1)
    with pytest.raises(Unauthenticated):
        c_sess.recv.check(b"one", t1)  # replayed
    s_sess, c_sess = run_handshake(*pair())
    tag = s_sess.send.tag(b"payload")
    with pytest.raises(Unauthenticated):
        c_sess.recv.check(b"paylOad", tag)  # altered


# ---------------------------------------------------------------- round trips


def macs():
    """A fresh (sender, receiver) MAC pair of one direction."""
    s_sess, c_sess = run_handshake(*pair())
    return c_sess.send, s_sess.recv


@pytest.mark.parametrize("name", ["w", "layer.0/ü", "n" * w.MAX_NAME])
@pytest.mark.parametrize(("revision", "offset", "length"), [(0, 0, 0), (-1, 5, 7), (2**63 - 1, 2**64 - 1, 2**30)])
def test_request_round_trip(name, revision, offset, length):
    send, recv = macs()
    data = w.encode_request(name, revision, offset, length, send)
    n, partial = w.decode_request_head(data[:w.REQ.size])
    assert n == len(name.encode()) + w.TAG_LEN == len(data) - w.REQ.size
    req = w.finish_request(data[:w.REQ.size], partial, data[w.REQ.size:], recv)
    assert req == w.Request(name, revision, offset, length)


def test_a_request_with_a_bad_tag_is_refused():
    send, recv = macs()
    data = bytearray(w.encode_request("w", 1, 0, 10, send))
    data[w.REQ.size - 1] ^= 1  # the length, changed in flight
    n, partial = w.decode_request_head(bytes(data[:w.REQ.size]))
    with pytest.raises(Unauthenticated):
        w.finish_request(bytes(data[:w.REQ.size]), partial, bytes(data[w.REQ.size:]), recv)


@pytest.mark.parametrize("length", [0, 1, w.MAX_REQUEST])
def test_reply_head_round_trip(length):
    send, recv = macs()
    data = w.encode_reply_head(length, send)
    assert len(data) == w.RESP.size + w.TAG_LEN
    recv.check(data[:w.RESP.size], data[w.RESP.size:])
    assert w.decode_reply_head(data[:w.RESP.size]) == (w.OK, length)


def test_refusal_round_trip_and_cut():
    data = w.encode_refusal("no such tensor", None)  # before the handshake: untagged
    status, n = w.decode_reply_head(data[:w.RESP.size])
    assert (status, n) == (w.REFUSED, len("no such tensor"))
    assert w.decode_refusal_text(data[w.RESP.size:]) == "no such tensor"
    long = w.encode_refusal("x" + "é" * 1000, None)  # 2001 bytes of UTF-8, cut inside a character
    status, n = w.decode_reply_head(long[:w.RESP.size])
    assert n == w.MAX_TEXT == len(long) - w.RESP.size
    assert w.decode_refusal_text(long[w.RESP.size:]) == "x" + "é" * 511 + "\ufffd"
    send, recv = macs()
    tagged = w.encode_refusal("wrong revision", send)
    assert len(tagged) == w.RESP.size + w.TAG_LEN + len("wrong revision") + w.TAG_LEN
    assert w.encode_refusal("", send).startswith(w.RESP.pack(w.M_RESP, w.REFUSED, 0))


def test_bytes_on_the_wire_are_fixed():
    """The exact layout (a change here is a wire change)."""
    assert w.encode_hello(NONCE, "ab") == b"PXS2" + NONCE + b"\x02\x00ab"
    proof_c = w.proof(SECRET, "client", NONCE, NONCE[::-1], "ab", "id")
    assert w.encode_auth("id", NONCE[::-1], proof_c) == b"PXA2\x02\x00id" + NONCE[::-1] + proof_c
    import hashlib
    import hmac

    from pccl_py.wire import keys
    key = keys.derive(SECRET, "transfer/proof")
    transcript = NONCE + NONCE[::-1] + b"\x02\x00ab\x02\x00id"
    assert proof_c == hmac.new(key, b"client" + transcript, hashlib.sha256).digest()
    assert w.proof(SECRET, "server", NONCE, NONCE[::-1], "ab", "id") == hmac.new(
        key, b"server" + transcript, hashlib.sha256).digest()
    fixed_mac = w.Mac(bytes(32))
    body = (b"PXQ2" + b"\x02\x00" + (-2).to_bytes(8, "little", signed=True) + (3).to_bytes(8, "little")
            + (4).to_bytes(8, "little") + b"ab")
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    gmac = AESGCM(bytes(32)).encrypt(bytes(12), b"", body)  # the first tag: counter nonce 0
    assert w.encode_request("ab", -2, 3, 4, fixed_mac) == body + gmac
    head = b"PXR2\x00" + (5).to_bytes(8, "little")
    nonce_1 = bytes(4) + (1).to_bytes(8, "little")  # the second tag of that MAC
    assert w.encode_reply_head(5, fixed_mac) == head + AESGCM(bytes(32)).encrypt(nonce_1, b"", head)
    assert w.encode_refusal("no", None) == b"PXR2\x01" + (2).to_bytes(8, "little") + b"no"


def test_non_utf8_names_and_ids_decode_with_replacement():
    send, recv = macs()
    head = w.REQ.pack(w.M_REQ, 2, 1, 0, 0)
    _, partial = w.decode_request_head(head)
    rest = b"\xff\xfe" + send.tag(head + b"\xff\xfe")
    assert w.finish_request(head, partial, rest, recv).name == "\ufffd\ufffd"
    peer_id, nonce_c, mac = w.decode_auth_rest(b"\xff" + bytes(64), 1)
    assert peer_id == "\ufffd" and nonce_c == bytes(32) and mac == bytes(32)


def test_encode_hello_rejects_a_wrong_nonce_or_a_long_id():
    with pytest.raises(ValueError):
        w.encode_hello(b"short", "s")
    with pytest.raises(ValueError):
        w.encode_hello(NONCE, "x" * (w.MAX_ID + 1))


# ---------------------------------------------------------------- malformed input


def _wrong_sizes(good: bytes) -> list[bytes]:
    return [b"", good[:-1], good + b"\0"]


@pytest.mark.parametrize(
    ("decode", "good"),
    [
        (w.decode_hello, w.encode_hello(NONCE, "")),
        (w.decode_auth_head, w.AUTH.pack(w.M_AUTH, 1)),
        (w.decode_request_head, w.REQ.pack(w.M_REQ, 1, 0, 0, 0)),
        (w.decode_reply_head, w.RESP.pack(w.M_RESP, w.OK, 0)),
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
        (w.decode_hello, w.encode_hello(NONCE, "")),
        (w.decode_auth_head, w.AUTH.pack(w.M_AUTH, 1)),
        (w.decode_request_head, w.REQ.pack(w.M_REQ, 1, 0, 0, 0)),
        (w.decode_reply_head, w.RESP.pack(w.M_RESP, w.OK, 0)),
    ],
    ids=["hello", "auth", "request", "reply"],
)
def test_wrong_magic_and_version_are_rejected(decode, good):
    for magic in (w.M_HELLO, w.M_AUTH, w.M_REQ, w.M_RESP, b"PCDP", b"\0\0\0\0"):
        if magic == good[:4]:
            continue
        with pytest.raises(ProtocolError, match="magic"):
            decode(magic + good[4:])
    with pytest.raises(ProtocolError, match="version b'1'"):
        decode(good[:3] + b"1" + good[4:])  # the last version: no mutual handshake


def test_auth_bad_lengths():
    with pytest.raises(ProtocolError, match="exceeds"):
        w.decode_auth_head(w.AUTH.pack(w.M_AUTH, w.MAX_ID + 1))
    assert w.decode_auth_head(w.AUTH.pack(w.M_AUTH, w.MAX_ID)) == w.MAX_ID
    assert w.decode_auth_head(w.AUTH.pack(w.M_AUTH, 0)) == 0  # an empty id is allowed
    for rest, n in [(bytes(63), 0), (bytes(66), 1), (b"ab" + bytes(64), 1), (bytes(w.MAX_ID + 65), w.MAX_ID + 1)]:
        with pytest.raises(ProtocolError):
            w.decode_auth_rest(rest, n)
    assert w.auth_rest_size(3) == 3 + 64


def test_hello_bad_id_length():
    with pytest.raises(ProtocolError, match="exceeds"):
        w.decode_hello(w.HELLO.pack(w.M_HELLO, NONCE, w.MAX_ID + 1))
    assert w.decode_hello(w.HELLO.pack(w.M_HELLO, NONCE, w.MAX_ID)) == (NONCE, w.MAX_ID)


@pytest.mark.parametrize("name_len", [0, w.MAX_NAME + 1, 0xFFFF])
def test_request_bad_name_lengths(name_len):
    with pytest.raises(ProtocolError, match="tensor name"):
        w.decode_request_head(w.REQ.pack(w.M_REQ, name_len, 0, 0, 0))


def test_finish_request_checks_the_name_it_is_given():
    head = w.REQ.pack(w.M_REQ, 1, 0, 0, 0)
    _, partial = w.decode_request_head(head)
    send, recv = macs()
    for name in (b"", b"n" * (w.MAX_NAME + 1)):
        with pytest.raises(ProtocolError, match="tensor name"):
            w.finish_request(head, partial, name + bytes(w.TAG_LEN), recv)
    with pytest.raises(ProtocolError, match="tensor name"):
        w.finish_request(head, partial, bytes(5), recv)  # shorter than a tag


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

NONCE_C = bytes(range(100, 132))


class Conversation:
    """A server's side of one connection, its bytes made ahead (both nonces fixed)."""

    def __init__(self, server_id: str = "src", expected: str = "src") -> None:
        self.srv = w.ServerHandshake(SECRET, server_id, nonce=NONCE)
        self.cli = w.ClientHandshake(SECRET, "me", expected, nonce=NONCE_C)
        self.stream = self.srv.hello()
        self.session = None
        if server_id == expected:
            auth = self.cli.auth(NONCE, server_id)
            self.session = self.srv.check(*w.decode_auth_rest(auth[w.AUTH.size:], 2))
            self.stream += self.srv.answer()

    def reply(self, payload: bytes, tag: bytes | None = None) -> None:
        self.stream += w.encode_reply_head(len(payload), self.session.send) + payload
        if payload:  # its own tag (or a given one: a payload changed on the way)
            real = self.session.send.tag(payload)
            self.stream += real if tag is None else tag

    def refuse(self, text: str, tagged: bool = True) -> None:
        self.stream += w.encode_refusal(text, self.session.send if tagged else None)


def drive(reader: w.ReplyReader, conv: Conversation, dests: list[bytearray], split: int = 7,
          stream: bytes | None = None) -> list:
    """Feed the conversation's bytes the way the client's protocol does: ``need`` bytes into
    scratch, or into the oldest destination, in pieces of at most ``split`` bytes; answer the
    hello and key the reader with the session when the server's proof is in."""
    stream = conv.stream if stream is None else stream
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
        elif reader.mode == "ptag":
            event = reader.complete(bytes(got), payload=dests[dest_i - 1])
        else:
            event = reader.complete(bytes(got))
        if event[0] == "hello":
            conv.cli.auth(*event[1])
        elif event[0] == "proof":
            reader.keyed(conv.cli.finish(event[1]).recv)
        events.append(event)
    return events


def test_reader_follows_a_whole_conversation():
    conv = Conversation()
    for payload in (b"hello", b"", b"abc"):
        conv.reply(payload)
    r = w.ReplyReader()
    assert (r.mode, r.need) == ("hello", w.HELLO.size)
    r.asked(5)
    r.asked(0)  # an empty request
    r.asked(3)
    dests = [bytearray(5), bytearray(3)]
    events = drive(r, conv, dests)
    assert events == [("more", 3), ("hello", (NONCE, "src")), ("more", 32), ("proof", conv.srv.answer()[-32:]),
                      ("payload", 5), ("more", 16), ("answered", 5), ("answered", 0), ("payload", 3), ("more", 16),
                      ("answered", 3)]
    assert dests == [bytearray(b"hello"), bytearray(b"abc")]
    assert r.unanswered == 0 and r.authenticated and (r.mode, r.need) == ("head", w.RESP.size + w.TAG_LEN)


def test_a_payload_changed_on_the_way_fails_its_tag():
    """The elected hashes are not the only check: xxh3 is not collision-resistant, so a
    payload's own tag must fail when its bytes changed in transit."""
    conv = Conversation()
    conv.reply(b"hello")
    good_tag = conv.stream[-w.TAG_LEN:]
    conv.stream = conv.stream[:-w.TAG_LEN - 5] + b"jello" + good_tag
    r = w.ReplyReader()
    r.asked(5)
    with pytest.raises(ProtocolError):
        drive(r, conv, [bytearray(5)])


def test_reader_with_a_server_of_empty_id():
    conv = Conversation("", "")
    r = w.ReplyReader()
    events = drive(r, conv, [])
    assert events[:2] == [("hello", (NONCE, "")), ("more", 32)] and r.authenticated


@pytest.mark.parametrize("text", ["wrong revision", ""])
def test_reader_reports_a_refusal(text):
    conv = Conversation()
    conv.reply(b"")
    conv.refuse(text)
    r = w.ReplyReader()
    r.asked(0)
    r.asked(10)
    events = drive(r, conv, [])
    want = [("answered", 0)] + ([("more", len(text))] if text else []) + [("refused", text)]
    assert events[-len(want):] == want
    assert r.mode == "closed"
    with pytest.raises(ProtocolError, match="after the connection ended"):
        r.complete(b"")


def test_reader_reports_a_refused_proof_before_the_handshake():
    conv = Conversation()
    stream = conv.srv.hello() + w.encode_refusal("proof does not match the run secret", None)
    r = w.ReplyReader()
    events = drive(r, conv, [], stream=stream)
    assert events[-1] == ("refused", "proof does not match the run secret") and not r.authenticated


def test_reader_rejects_a_tagged_part_that_does_not_verify():
    conv = Conversation()
    conv.reply(b"abc")
    stream = bytearray(conv.stream)
    stream[-3 - w.TAG_LEN - 1] ^= 1  # the reply header's length, changed in flight
    r = w.ReplyReader()
    r.asked(3)
    with pytest.raises(Unauthenticated):
        drive(r, conv, [bytearray(3)], stream=bytes(stream))
    conv = Conversation()
    conv.refuse("wrong revision")
    stream = bytearray(conv.stream)
    stream[-w.TAG_LEN - 1] ^= 1  # the refusal text
    r = w.ReplyReader()
    r.asked(3)
    with pytest.raises(Unauthenticated):
        drive(r, conv, [], stream=bytes(stream))


def test_reader_rejects_replies_before_the_handshake_completed():
    conv = Conversation()
    conv.reply(b"")
    r = w.ReplyReader()
    r.asked(0)
    pos = 0
    while r.mode != "head":  # hello, id, the answer's head, the proof: but nobody keys the reader
        chunk = conv.stream[pos:pos + r.need]
        pos += len(chunk)
        r.complete(chunk)
    with pytest.raises(ProtocolError, match="before the handshake completed"):
        r.complete(conv.stream[pos:pos + r.need])
    with pytest.raises(ProtocolError, match="keyed outside"):
        w.ReplyReader().keyed(conv.session.recv)


def test_reader_rejects_an_unsolicited_reply():
    conv = Conversation()
    conv.reply(b"")
    with pytest.raises(ProtocolError, match="unsolicited"):
        drive(w.ReplyReader(), conv, [])


def test_reader_rejects_an_unsolicited_refusal():
    conv = Conversation()
    conv.refuse("x")
    with pytest.raises(ProtocolError, match="unsolicited"):
        drive(w.ReplyReader(), conv, [])


@pytest.mark.parametrize("answered", [0, 9, 11])
def test_reader_rejects_an_answer_of_the_wrong_length(answered):
    conv = Conversation()
    conv.stream += w.encode_reply_head(answered, conv.session.send)
    r = w.ReplyReader()
    r.asked(10)
    with pytest.raises(ProtocolError, match=f"answered {answered} bytes, asked 10"):
        drive(r, conv, [bytearray(10)])


def test_reader_rejects_an_auth_answer_that_is_not_a_proof():
    conv = Conversation()
    stream = conv.srv.hello() + w.RESP.pack(w.M_RESP, w.OK, 0)
    with pytest.raises(ProtocolError, match="not a 32-byte proof"):
        drive(w.ReplyReader(), conv, [], stream=stream)


def test_reader_rejects_bad_hello_and_bad_headers():
    with pytest.raises(ProtocolError, match="magic"):
        w.ReplyReader().complete(b"PXR2" + NONCE + b"\0\0")
    with pytest.raises(ProtocolError, match="expected 38"):
        w.ReplyReader().complete(w.encode_hello(NONCE, "")[:-1])
    with pytest.raises(ProtocolError, match="exceeds"):
        w.ReplyReader().complete(w.HELLO.pack(w.M_HELLO, NONCE, w.MAX_ID + 1))
    for bad, match in [(w.RESP.pack(w.M_RESP, 7, 0), "status"), (b"PXR1" + bytes(9), "version"),
                       (w.RESP.pack(w.M_RESP, w.REFUSED, w.MAX_TEXT + 1), "refusal")]:
        conv = Conversation()
        send = conv.session.send
        r = w.ReplyReader()
        r.asked(0)
        with pytest.raises(ProtocolError, match=match):
            drive(r, conv, [], stream=conv.stream + bad + send.tag(bad))
