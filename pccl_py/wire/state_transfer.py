"""Shared-state transfer wire format, sans-I/O: four messages, their bounds, a reply reader.

A fetching daemon (client) dials another daemon's ``StateServer`` (server). All integers
are little-endian; the last character of each magic is the format version::

    server -> client  HELLO  b"PXS1" nonce[32]
    client -> server  AUTH   b"PXA1" u16 id_len, peer_id[id_len], proof[32]
                             proof = HMAC-SHA256(secret, nonce | peer_id)
    client -> server  REQ    b"PXQ1" u16 name_len, i64 revision, u64 offset, u64 length, name[name_len]
    server -> client  RESP   b"PXR1" u8 status, u64 length, then `length` bytes:
                             status OK (0): payload (the answer to AUTH has length 0)
                             status REFUSED (1): refusal text (UTF-8); the server closes

Bounds: a peer id is at most ``MAX_ID`` bytes, a tensor name 1..``MAX_NAME`` bytes, a
refusal text at most ``MAX_TEXT`` bytes, one request or payload at most ``MAX_REQUEST``
bytes and inside its tensor (:func:`check_range`). The ``decode_*`` functions check a
message's fixed part before the variable part after it is read, and raise
:class:`~pccl_py.errors.ProtocolError` on anything off.

The server reads with fixed-size reads and the ``decode_*`` functions. The client reads
payload straight into the destination tensor, so its side of the framing is
:class:`ReplyReader`: it says how many bytes come next and whether they are payload, and
tells what they meant once they are in.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import struct
from dataclasses import dataclass

from pccl_py.errors import ProtocolError

VERSION = 1
_V = str(VERSION).encode()
M_HELLO, M_AUTH, M_REQ, M_RESP = b"PXS" + _V, b"PXA" + _V, b"PXQ" + _V, b"PXR" + _V

HELLO = struct.Struct("<4s32s")  # magic, nonce
AUTH = struct.Struct("<4sH")  # magic, id_len; then peer_id, proof
REQ = struct.Struct("<4sHqQQ")  # magic, name_len, revision, offset, length; then name
RESP = struct.Struct("<4sBQ")  # magic, status, length; then payload or refusal text

OK, REFUSED = 0, 1
NONCE_LEN = 32
PROOF_LEN = 32
MAX_ID = 128
MAX_NAME = 1024
MAX_TEXT = 1024
MAX_REQUEST = 1 << 30  # bytes in one request (and so in one payload)


def proof(secret: bytes, nonce: bytes, peer_id: str) -> bytes:
    """HMAC-SHA256(secret, nonce | peer_id)."""
    return hmac.new(secret, nonce + peer_id.encode(), hashlib.sha256).digest()


def proof_matches(secret: bytes, nonce: bytes, peer_id: str, mac: bytes) -> bool:
    """Constant-time check of a client's proof."""
    return hmac.compare_digest(proof(secret, nonce, peer_id), mac)


def _sized(buf, size: int, what: str) -> None:
    if len(buf) != size:
        raise ProtocolError(f"{what} must be {size} bytes, got {len(buf)}")


def _check_magic(magic: bytes, want: bytes, what: str) -> None:
    if magic == want:
        return
    if magic[:3] == want[:3]:
        raise ProtocolError(f"{what} of state-transfer version {bytes(magic[3:])!r} "
                            f"(this side speaks {VERSION})")
    raise ProtocolError(f"bad {what} magic {bytes(magic)!r}")


# ---------------------------------------------------------------- HELLO


def encode_hello(nonce: bytes) -> bytes:
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"a nonce is {NONCE_LEN} bytes")
    return HELLO.pack(M_HELLO, nonce)


def decode_hello(buf) -> bytes:
    """The server's nonce."""
    _sized(buf, HELLO.size, "hello")
    magic, nonce = HELLO.unpack(buf)
    _check_magic(magic, M_HELLO, "hello")
    return nonce


# ---------------------------------------------------------------- AUTH


def encode_auth(secret: bytes, nonce: bytes, peer_id: str) -> bytes:
    """AUTH with the proof for ``nonce``. The id is not bounded here: a server refuses an
    id over MAX_ID bytes by closing the connection."""
    pid = peer_id.encode()
    return AUTH.pack(M_AUTH, len(pid)) + pid + proof(secret, nonce, peer_id)


def decode_auth_head(buf) -> int:
    """AUTH's fixed part; returns the peer id's length (``id_len + PROOF_LEN`` bytes follow)."""
    _sized(buf, AUTH.size, "auth")
    magic, id_len = AUTH.unpack(buf)
    _check_magic(magic, M_AUTH, "auth")
    if id_len > MAX_ID:
        raise ProtocolError(f"peer id of {id_len} bytes exceeds {MAX_ID}")
    return id_len


def decode_auth_rest(buf, id_len: int) -> tuple[str, bytes]:
    """(peer_id, proof) from the bytes after AUTH's fixed part. An id that is not UTF-8 is
    decoded with replacement characters (its proof then does not match)."""
    if not 0 <= id_len <= MAX_ID:
        raise ProtocolError(f"peer id of {id_len} bytes exceeds {MAX_ID}")
    _sized(buf, id_len + PROOF_LEN, "auth id and proof")
    raw = bytes(buf)
    return raw[:id_len].decode(errors="replace"), raw[id_len:]


# ---------------------------------------------------------------- REQ


@dataclass(frozen=True, slots=True)
class Request:
    """Bytes [offset, offset + length) of tensor ``name`` at ``revision``."""

    name: str
    revision: int
    offset: int
    length: int


def encode_request(name: str, revision: int, offset: int, length: int) -> bytes:
    raw = name.encode()
    return REQ.pack(M_REQ, len(raw), revision, offset, length) + raw


def decode_request_head(buf) -> tuple[int, Request]:
    """REQ's fixed part: (name bytes that follow, the request with an empty name)."""
    _sized(buf, REQ.size, "request header")
    magic, name_len, revision, offset, length = REQ.unpack(buf)
    _check_magic(magic, M_REQ, "request")
    if not 0 < name_len <= MAX_NAME:
        raise ProtocolError(f"tensor name of {name_len} bytes (1..{MAX_NAME})")
    return name_len, Request("", revision, offset, length)


def finish_request(partial: Request, name_bytes) -> Request:
    """The request with its name (replacement characters for bytes that are not UTF-8)."""
    if not 0 < len(name_bytes) <= MAX_NAME:
        raise ProtocolError(f"tensor name of {len(name_bytes)} bytes (1..{MAX_NAME})")
    return Request(bytes(name_bytes).decode(errors="replace"), partial.revision, partial.offset, partial.length)


def check_range(req: Request, size: int) -> None:
    """The request must fit MAX_REQUEST and lie inside its tensor of ``size`` bytes."""
    if req.length > MAX_REQUEST or req.offset > size or req.length > size - req.offset:
        raise ProtocolError(f"request {req.name!r} [{req.offset}, +{req.length}) outside its {size} bytes")


# ---------------------------------------------------------------- RESP


def encode_reply_head(length: int) -> bytes:
    """The header of an OK reply; ``length`` payload bytes follow it."""
    return RESP.pack(M_RESP, OK, length)


def encode_refusal(text: str) -> bytes:
    """A whole refusal, its text cut to MAX_TEXT bytes."""
    raw = text.encode()[:MAX_TEXT]
    return RESP.pack(M_RESP, REFUSED, len(raw)) + raw


def decode_reply_head(buf) -> tuple[int, int]:
    """(status, length) of a reply header."""
    _sized(buf, RESP.size, "reply header")
    magic, status, length = RESP.unpack(buf)
    _check_magic(magic, M_RESP, "reply")
    if status == OK:
        if length > MAX_REQUEST:
            raise ProtocolError(f"reply of {length} bytes exceeds {MAX_REQUEST}")
    elif status == REFUSED:
        if length > MAX_TEXT:
            raise ProtocolError(f"refusal of {length} bytes exceeds {MAX_TEXT}")
    else:
        raise ProtocolError(f"unknown reply status {status}")
    return status, length


def decode_refusal_text(buf) -> str:
    return bytes(buf).decode(errors="replace")


class ReplyReader:
    """The client's side of one connection's framing, fed with completed reads.

    ``mode`` says what the next ``need`` bytes from the server are: ``"hello"``,
    ``"head"`` or ``"text"`` (read them into a scratch buffer of ``SCRATCH`` bytes) or
    ``"payload"`` (read them straight into the destination of the oldest unanswered
    request). Tell the reader of every request sent with :meth:`asked`, in order, the
    expected payload length (0 for AUTH); once ``need`` bytes are in, :meth:`complete`
    says what they meant:

    * ``("nonce", bytes)``: the server's HELLO;
    * ``("payload", n)``: the oldest request's ``n`` payload bytes come next;
    * ``("text", n)``: a refusal's ``n``-byte text comes next;
    * ``("answered", n)``: the oldest request is answered, ``n`` bytes are in place;
    * ``("refused", text)``: the server refused the oldest request and closes.

    Anything else (bad magic, unknown status, an answer of the wrong length, a reply
    nobody asked for) raises ProtocolError; the connection is then of no further use.
    """

    SCRATCH = max(HELLO.size, RESP.size, MAX_TEXT)

    def __init__(self) -> None:
        self.mode = "hello"
        self.need = HELLO.size
        self._asked: collections.deque[int] = collections.deque()

    @property
    def unanswered(self) -> int:
        return len(self._asked)

    def asked(self, length: int) -> None:
        self._asked.append(length)

    def _expect(self, mode: str, need: int) -> None:
        self.mode, self.need = mode, need

    def complete(self, data=None) -> tuple[str, object]:
        """``data``: the ``need`` bytes just read (ignored for payload, read in place)."""
        mode = self.mode
        if mode == "payload":
            length = self._asked.popleft()
            self._expect("head", RESP.size)
            return "answered", length
        if len(data) != self.need:
            raise ProtocolError(f"{mode} of {len(data)} bytes, expected {self.need}")
        if mode == "hello":
            nonce = decode_hello(data)
            self._expect("head", RESP.size)
            return "nonce", nonce
        if mode == "text":
            self._expect("closed", 0)
            return "refused", decode_refusal_text(data)
        if mode != "head":
            raise ProtocolError(f"bytes after the connection ended ({mode})")
        status, length = decode_reply_head(data)
        if not self._asked:
            raise ProtocolError("sent an unsolicited reply")
        if status == REFUSED:
            if length == 0:
                self._expect("closed", 0)
                return "refused", ""
            self._expect("text", length)
            return "text", length
        want = self._asked[0]
        if length != want:
            raise ProtocolError(f"answered {length} bytes, asked {want}")
        if length == 0:
            self._asked.popleft()
            return "answered", 0
        self._expect("payload", length)
        return "payload", length
