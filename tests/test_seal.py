"""Frame seals (transport/seal.py, native/seal.c): the C seal and the ``cryptography`` one
make the same AES-256-GCM tags, and a tag checks only for the exact bytes, frame number and
key it was made for; the I/O threads' loops seal and check whole frames."""

from __future__ import annotations

import os
import socket

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from pccl_py.transport import seal as S

try:
    from pccl_py.kernels._native import recv_fill, send_all
except ImportError:  # pragma: no cover
    recv_fill = send_all = None

needs_native = pytest.mark.skipif(S.Seal is None or S.SEAL_UNAVAILABLE is not None,
                                  reason=f"no native seal: {S.SEAL_UNAVAILABLE}")
KINDS = [pytest.param("native", marks=needs_native), "python"]
KEY = bytes(range(32))


def make(kind: str, key: bytes, sending: bool):
    return S.Seal(key, sending) if kind == "native" else S.PySeal(key, sending)


def tag_of(kind: str, key: bytes, seq: int, parts) -> bytes:
    s = make(kind, key, True)
    s.begin(seq)
    for p in parts:
        s.absorb(p)
    return s.tag()


def checks(kind: str, key: bytes, seq: int, parts, tag) -> bool:
    s = make(kind, key, False)
    s.begin(seq)
    for p in parts:
        s.absorb(p)
    return s.check(tag)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=5), seq=st.integers(0, 2**64 - 1))
def test_tags_equal_aes_gcm_of_the_frame_however_its_bytes_are_split(data, cuts, seq):
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    parts = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    want = AESGCM(KEY).encrypt(S.iv(seq), b"", data)
    kinds = ["python"] + (["native"] if S.Seal is not None and S.SEAL_UNAVAILABLE is None else [])
    for kind in kinds:
        assert tag_of(kind, KEY, seq, parts) == want
        assert checks(kind, KEY, seq, parts, want)


@pytest.mark.parametrize("kind", KINDS)
def test_a_tag_checks_only_for_its_bytes_its_frame_number_and_its_key(kind):
    frame = os.urandom(68) + os.urandom(5000)
    tag = tag_of(kind, KEY, 7, [frame])
    assert checks(kind, KEY, 7, [frame], tag)
    for i in (0, 67, 68, 2500, len(frame) - 1):  # any flipped bit, header or payload
        bad = bytearray(frame)
        bad[i] ^= 0x10
        assert not checks(kind, KEY, 7, [bytes(bad)], tag)
    assert not checks(kind, KEY, 7, [frame[:-1]], tag)  # truncated
    assert not checks(kind, KEY, 7, [frame + b"\0"], tag)  # extended
    assert not checks(kind, KEY, 8, [frame], tag)  # replayed as another frame / reordered
    assert not checks(kind, bytes(32), 7, [frame], tag)  # another key (another connection or secret)
    assert not checks(kind, KEY, 7, [frame], bytes(tag[:-1]) + bytes([tag[-1] ^ 1]))


@needs_native
def test_the_native_seal_refuses_bad_use():
    with pytest.raises(ValueError, match="32 bytes"):
        S.Seal(b"short", True)
    s = S.Seal(KEY, True)
    with pytest.raises(RuntimeError):
        s.absorb(b"x")  # not begun
    r = S.Seal(KEY, False)
    r.begin(0)
    with pytest.raises(RuntimeError):
        r.tag()  # the receiving side checks, it does not make tags
    with pytest.raises(ValueError):
        r.check(b"too short")
    s.begin(1)
    s.absorb(b"abc")
    assert s.tag() == s.tag()  # asked twice for one frame: the same tag


@pytest.mark.skipif(send_all is None, reason="no C extension")
@needs_native
def test_the_native_loops_seal_a_frame_and_check_it_as_it_arrives():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    header, payload = os.urandom(68), os.urandom(3 << 20)
    tx, rx = S.Seal(KEY, True), S.Seal(KEY, False)
    tx.begin(3)
    rx.begin(3)
    rx.absorb(header)
    got = bytearray(len(payload))
    tag = bytearray(S.TAG_BYTES)
    sent = pos = 0
    total = len(header) + len(payload) + S.TAG_BYTES
    hdr = bytearray(len(header))
    hpos = 0
    try:
        while sent < total or pos < len(got):  # both ends in one thread, in turns
            if sent < total:
                sent = send_all(a.fileno(), header, payload, sent, 1, None, tx)
            if hpos < len(hdr):
                hpos, _ = recv_fill(b.fileno(), hdr, hpos, 1)
            elif pos < len(got):
                pos, _ = recv_fill(b.fileno(), got, pos, 1, seal=rx)
        tpos = 0
        while tpos < S.TAG_BYTES:
            tpos, _ = recv_fill(b.fileno(), tag, tpos, 100)
    finally:
        a.close()
        b.close()
    assert bytes(hdr) == header and bytes(got) == payload
    assert bytes(tag) == AESGCM(KEY).encrypt(S.iv(3), b"", header + payload)
    assert rx.check(tag)


@pytest.mark.parametrize("kind", KINDS)
def test_an_encrypting_seal_is_aes_gcm_of_the_payload_with_the_header_as_associated_data(kind):
    header, payload = os.urandom(68), os.urandom(100_003)
    want = AESGCM(KEY).encrypt(S.iv(9), payload, header)  # ciphertext + tag
    tx = S.Seal(KEY, True, True) if kind == "native" else S.PySeal(KEY, True, True)
    assert tx.encrypting
    tx.begin(9)
    tx.absorb(header)
    ct = tx.crypt(payload[:777]) + tx.crypt(payload[777:])
    assert ct + tx.tag() == want
    rx = S.Seal(KEY, False, True) if kind == "native" else S.PySeal(KEY, False, True)
    rx.begin(9)
    rx.absorb(header)
    buf = bytearray(ct)
    rx.crypt(memoryview(buf)[:5000], memoryview(buf)[:5000])  # in place, in pieces
    rx.crypt(memoryview(buf)[5000:], memoryview(buf)[5000:])
    assert bytes(buf) == payload and rx.check(want[-16:])
    rx.begin(9)  # one flipped ciphertext bit: the tag fails
    rx.absorb(header)
    bad = bytearray(ct)
    bad[50_000] ^= 1
    rx.crypt(bytes(bad))
    assert not rx.check(want[-16:])


@pytest.mark.skipif(send_all is None, reason="no C extension")
@needs_native
def test_the_native_send_encrypts_from_its_own_buffer_and_leaves_the_payload_alone():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    header, payload = os.urandom(68), os.urandom((1 << 20) + 5)
    original = bytes(payload)
    tx = S.Seal(KEY, True, True)
    tx.begin(4)
    tx.absorb(header)  # an encrypting seal's header is taken by its stream, before the send thread
    wire = bytearray(len(header) + len(payload) + S.TAG_BYTES)
    sent = pos = 0
    try:
        while sent < len(wire) or pos < len(wire):
            if sent < len(wire):
                sent = send_all(a.fileno(), header, payload, sent, 1, None, tx)
            if pos < len(wire):
                pos, _ = recv_fill(b.fileno(), wire, pos, 1)
    finally:
        a.close()
        b.close()
    assert payload == original
    assert bytes(wire[:68]) == header
    assert bytes(wire[68:]) == AESGCM(KEY).encrypt(S.iv(4), payload, header)
