"""Shared-state transfer wire format, sans-I/O: a mutual handshake, then MAC'd requests and replies.

A fetching daemon (client) dials another daemon's ``StateServer`` (server). All integers
are little-endian; the last character of each magic is the format version (2)::

    server -> client  HELLO  b"PXS2" nonce_s[32] u16 id_len, server_id[id_len]
    client -> server  AUTH   b"PXA2" u16 id_len, client_id[id_len], nonce_c[32], proof_c[32]
    server -> client  RESP   (untagged) OK with the 32-byte proof_s as payload,
                             or REFUSED with a text, then the server closes
    ---- from here on every message is followed by a 16-byte tag (see Mac) ----
    client -> server  REQ    b"PXQ2" u16 name_len, i64 revision, u64 offset, u64 length, name[name_len]
    server -> client  RESP   b"PXR2" u8 status, u64 length; then `length` bytes:
                             status OK (0): payload, its own tag after it
                             status REFUSED (1): refusal text (UTF-8), its own tag after
                             it; the server closes

    proof_c = HMAC-SHA256(K, "client" | T),  proof_s = HMAC-SHA256(K, "server" | T)
    T = nonce_s | nonce_c | u16 len | server_id | u16 len | client_id
    K = keys.derive(secret, "transfer/proof")

Both nonces are fresh per connection, so no proof is worth anything in another one. The
client proves over the server id *it expects* (the source its sync plan named, not the
one the HELLO claims; a HELLO naming another peer is refused before any proof goes out),
and accepts the connection only if proof_s verifies over that same id: a peer holding the
secret cannot stand in for another source. After the handshake both sides hold the
session keys of :func:`pccl_py.wire.keys.transfer_keys` (one per direction) and every
request, reply header and refusal text carries a GMAC tag under its direction's key
(:class:`Mac`), so no one else can ask, answer or refuse on an authenticated connection.

Payload bytes carry a tag of their own too (a GMAC over the payload, the next count of
the direction's MAC), checked before the reply counts as answered, and the fetch then
also checks the content hashes the coordinator elected. The hashes alone would not do
against someone who can alter the TCP stream: xxh3-128 is not collision-resistant, so
bytes crafted to the elected digest could slip in. The tag costs one more pass over the
state on each side (AES-GCM at ~9 GB/s over memory not in cache on the 2-core VM): the
loopback transfer bench (``pccl bench sync``, 256 MiB, 2 cores, 6 interleaved runs) lost
20-27% of its throughput to it (median 2.73 -> 2.18 GB/s from one source, 2.84 -> 2.08
from two); a sync is rare next to the all-reduces of a run, and state is what a run
must never take from a stranger.

Bounds: a peer id is at most ``MAX_ID`` bytes, a tensor name 1..``MAX_NAME`` bytes, a
refusal text at most ``MAX_TEXT`` bytes, one request or payload at most ``MAX_REQUEST``
bytes and inside its tensor (:func:`check_range`). The ``decode_*`` functions check a
message's fixed part before the variable part after it is read, and raise
:class:`~pccl_py.errors.ProtocolError` on anything off; a proof or tag that does not
verify raises :class:`~pccl_py.errors.Unauthenticated` (a ProtocolError).

The server reads with fixed-size reads, the ``decode_*`` functions and
:class:`ServerHandshake`. The client reads payload straight into the destination tensor,
so its side of the framing is :class:`ReplyReader`: it says how many bytes come next and
whether they are payload, and tells what they meant once they are in;
:class:`ClientHandshake` makes AUTH and checks the server's proof.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pccl_py.errors import ProtocolError, Unauthenticated
from pccl_py.wire import keys

VERSION = 2  # 2: mutual handshake (the server proves itself and its id), a MAC on every message
_V = str(VERSION).encode()
M_HELLO, M_AUTH, M_REQ, M_RESP = b"PXS" + _V, b"PXA" + _V, b"PXQ" + _V, b"PXR" + _V

HELLO = struct.Struct("<4s32sH")  # magic, nonce_s, id_len; then server_id
AUTH = struct.Struct("<4sH")  # magic, id_len; then client_id, nonce_c, proof_c
REQ = struct.Struct("<4sHqQQ")  # magic, name_len, revision, offset, length; then name
RESP = struct.Struct("<4sBQ")  # magic, status, length; then payload or refusal text

OK, REFUSED = 0, 1
NONCE_LEN = 32
PROOF_LEN = 32
TAG_LEN = 16
MAX_ID = 128
MAX_NAME = 1024
MAX_TEXT = 1024
MAX_REQUEST = 1 << 30  # bytes in one request (and so in one payload)


# ---------------------------------------------------------------- proofs and session keys


def _transcript(nonce_s: bytes, nonce_c: bytes, server_id: str, client_id: str) -> bytes:
    s, c = server_id.encode(), client_id.encode()
    return nonce_s + nonce_c + struct.pack("<H", len(s)) + s + struct.pack("<H", len(c)) + c


def proof(secret: bytes, role: str, nonce_s: bytes, nonce_c: bytes, server_id: str, client_id: str) -> bytes:
    """The proof of ``role`` ("client" or "server") for one connection: HMAC-SHA256 under a key
    derived from the run secret, over both nonces and both ids. The two roles' proofs differ,
    so one cannot be reflected as the other."""
    key = keys.derive(secret, "transfer/proof")
    return hmac.new(key, role.encode() + _transcript(nonce_s, nonce_c, server_id, client_id), hashlib.sha256).digest()


class Mac:
    """One direction's message authentication after the handshake.

    A tag is AES-256-GCM (``cryptography``) over no plaintext with the message as associated
    data, i.e. GMAC, under the direction's session key; the 96-bit nonce is a count of the
    tags made so far (every key belongs to one connection and direction, so a nonce never
    repeats under a key). A message that is replayed, dropped, reordered or altered fails
    its check."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._count = 0

    def _nonce(self) -> bytes:
        n = self._count
        self._count += 1
        return struct.pack("<4xQ", n)

    def tag(self, data) -> bytes:
        """The tag of the next part sent (``data``: bytes or any contiguous buffer)."""
        return self._aead.encrypt(self._nonce(), b"", data)

    def check(self, data, tag) -> None:
        """The next part received is ``data`` with ``tag``; Unauthenticated if it is not."""
        try:
            self._aead.decrypt(self._nonce(), bytes(tag), data)
        except InvalidTag:
            raise Unauthenticated("a state-transfer message failed its authentication tag") from None


@dataclass(frozen=True, slots=True)
class Session:
    """The MACs of one authenticated connection, from this side's point of view."""

    send: Mac
    recv: Mac


def session(secret: bytes, role: str, nonce_s: bytes, nonce_c: bytes, server_id: str, client_id: str) -> Session:
    c2s, s2c = keys.transfer_keys(secret, nonce_s, nonce_c, server_id, client_id)
    if role == "client":
        return Session(Mac(c2s), Mac(s2c))
    return Session(Mac(s2c), Mac(c2s))


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


def _check_id_len(n: int) -> None:
    if not 0 <= n <= MAX_ID:
        raise ProtocolError(f"peer id of {n} bytes exceeds {MAX_ID}")


# ---------------------------------------------------------------- HELLO


def encode_hello(nonce: bytes, server_id: str) -> bytes:
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"a nonce is {NONCE_LEN} bytes")
    sid = server_id.encode()
    if len(sid) > MAX_ID:
        raise ValueError(f"a peer id is at most {MAX_ID} bytes")
    return HELLO.pack(M_HELLO, nonce, len(sid)) + sid


def decode_hello(buf) -> tuple[bytes, int]:
    """HELLO's fixed part: (the server's nonce, the length of its id that follows)."""
    _sized(buf, HELLO.size, "hello")
    magic, nonce, id_len = HELLO.unpack(buf)
    _check_magic(magic, M_HELLO, "hello")
    _check_id_len(id_len)
    return nonce, id_len


# ---------------------------------------------------------------- AUTH


def encode_auth(client_id: str, nonce_c: bytes, proof_c: bytes) -> bytes:
    """AUTH. The id is not bounded here: a server refuses an id over MAX_ID bytes by closing."""
    pid = client_id.encode()
    return AUTH.pack(M_AUTH, len(pid)) + pid + nonce_c + proof_c


def decode_auth_head(buf) -> int:
    """AUTH's fixed part; returns the client id's length (``auth_rest_size(n)`` bytes follow)."""
    _sized(buf, AUTH.size, "auth")
    magic, id_len = AUTH.unpack(buf)
    _check_magic(magic, M_AUTH, "auth")
    _check_id_len(id_len)
    return id_len


def auth_rest_size(id_len: int) -> int:
    return id_len + NONCE_LEN + PROOF_LEN


def decode_auth_rest(buf, id_len: int) -> tuple[str, bytes, bytes]:
    """(client_id, nonce_c, proof_c) from the bytes after AUTH's fixed part. An id that is not
    UTF-8 is decoded with replacement characters (its proof then does not match)."""
    _check_id_len(id_len)
    _sized(buf, auth_rest_size(id_len), "auth id, nonce and proof")
    raw = bytes(buf)
    return raw[:id_len].decode(errors="replace"), raw[id_len:id_len + NONCE_LEN], raw[id_len + NONCE_LEN:]


class ServerHandshake:
    """The server's side of one connection's handshake: :meth:`hello` to send at once, then
    :meth:`check` the client's AUTH; on success send :meth:`answer` and use the session."""

    def __init__(self, secret: bytes, server_id: str, nonce: bytes | None = None) -> None:
        self.secret = secret
        self.server_id = server_id
        self.nonce = nonce if nonce is not None else os.urandom(NONCE_LEN)
        self._proof_s: bytes | None = None

    def hello(self) -> bytes:
        return encode_hello(self.nonce, self.server_id)

    def check(self, client_id: str, nonce_c: bytes, proof_c: bytes) -> Session:
        """The session keys if ``proof_c`` proves the secret for this connection; else
        Unauthenticated (answer it with a refusal and close)."""
        args = (self.nonce, nonce_c, self.server_id, client_id)
        if not hmac.compare_digest(proof(self.secret, "client", *args), bytes(proof_c)):
            raise Unauthenticated(f"peer {client_id[:MAX_ID]!r} failed the run-secret proof")
        self._proof_s = proof(self.secret, "server", *args)
        return session(self.secret, "server", *args)

    def answer(self) -> bytes:
        """The reply to a good AUTH: the server's own proof (untagged: the client checks it)."""
        if self._proof_s is None:
            raise ProtocolError("no AUTH has been checked")
        return RESP.pack(M_RESP, OK, PROOF_LEN) + self._proof_s


class ClientHandshake:
    """The fetcher's side of one connection's handshake with the source ``server_id``, the
    peer its sync plan named: :meth:`auth` answers the HELLO, :meth:`finish` checks the
    server's proof and returns the session."""

    def __init__(self, secret: bytes, client_id: str, server_id: str, nonce: bytes | None = None) -> None:
        self.secret = secret
        self.client_id = client_id
        self.server_id = server_id
        self.nonce = nonce if nonce is not None else os.urandom(NONCE_LEN)
        self._nonce_s: bytes | None = None

    def auth(self, nonce_s: bytes, hello_id: str) -> bytes:
        """AUTH for the server's HELLO; Unauthenticated when the HELLO names another peer
        than the expected source (no proof is sent to it)."""
        if hello_id != self.server_id:
            raise Unauthenticated(f"it introduced itself as peer {hello_id[:MAX_ID]!r}, not the source "
                                  f"{self.server_id!r} the sync plan named")
        self._nonce_s = bytes(nonce_s)
        return encode_auth(self.client_id, self.nonce,
                           proof(self.secret, "client", self._nonce_s, self.nonce, self.server_id, self.client_id))

    def finish(self, proof_s) -> Session:
        """The session if ``proof_s`` proves the secret under the expected source's id."""
        if self._nonce_s is None:
            raise ProtocolError("a proof arrived before the hello")
        args = (self._nonce_s, self.nonce, self.server_id, self.client_id)
        if not hmac.compare_digest(proof(self.secret, "server", *args), bytes(proof_s)):
            raise Unauthenticated(f"it did not prove the run secret as peer {self.server_id!r}")
        return session(self.secret, "client", *args)


# ---------------------------------------------------------------- REQ


@dataclass(frozen=True, slots=True)
class Request:
    """Bytes [offset, offset + length) of tensor ``name`` at ``revision``."""

    name: str
    revision: int
    offset: int
    length: int


def encode_request(name: str, revision: int, offset: int, length: int, mac: Mac) -> bytes:
    raw = name.encode()
    body = REQ.pack(M_REQ, len(raw), revision, offset, length) + raw
    return body + mac.tag(body)


def decode_request_head(buf) -> tuple[int, Request]:
    """REQ's fixed part: (bytes that follow it: the name and the tag, the request with an
    empty name). Authenticate it with :func:`finish_request` before acting on it."""
    _sized(buf, REQ.size, "request header")
    magic, name_len, revision, offset, length = REQ.unpack(buf)
    _check_magic(magic, M_REQ, "request")
    if not 0 < name_len <= MAX_NAME:
        raise ProtocolError(f"tensor name of {name_len} bytes (1..{MAX_NAME})")
    return name_len + TAG_LEN, Request("", revision, offset, length)


def finish_request(head, partial: Request, rest, mac: Mac) -> Request:
    """The request with its name (replacement characters for bytes that are not UTF-8), once
    ``rest`` (name and tag) is in and the tag verifies over ``head`` and the name."""
    n = len(rest) - TAG_LEN
    if not 0 < n <= MAX_NAME:
        raise ProtocolError(f"tensor name of {max(n, 0)} bytes (1..{MAX_NAME})")
    name_bytes, tag = bytes(rest[:n]), rest[n:]
    mac.check(bytes(head) + name_bytes, tag)
    return Request(name_bytes.decode(errors="replace"), partial.revision, partial.offset, partial.length)


def check_range(req: Request, size: int) -> None:
    """The request must fit MAX_REQUEST and lie inside its tensor of ``size`` bytes."""
    if req.length > MAX_REQUEST or req.offset > size or req.length > size - req.offset:
        raise ProtocolError(f"request {req.name!r} [{req.offset}, +{req.length}) outside its {size} bytes")


# ---------------------------------------------------------------- RESP


def encode_reply_head(length: int, mac: Mac) -> bytes:
    """The header of an OK reply, tagged; ``length`` payload bytes follow it."""
    head = RESP.pack(M_RESP, OK, length)
    return head + mac.tag(head)


def encode_refusal(text: str, mac: Mac | None) -> bytes:
    """A whole refusal, its text cut to MAX_TEXT bytes; ``mac`` None: before the handshake
    (untagged: a refusal of the client's proof)."""
    raw = text.encode()[:MAX_TEXT]
    head = RESP.pack(M_RESP, REFUSED, len(raw))
    if mac is None:
        return head + raw
    out = head + mac.tag(head)
    return out + raw + mac.tag(raw) if raw else out


def decode_reply_head(buf) -> tuple[int, int]:
    """(status, length) of a reply header (its fixed part, without a tag)."""
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

    ``mode`` says what the next ``need`` bytes from the server are: ``"payload"`` means read
    them straight into the destination of the oldest unanswered request; any other mode
    means read them into a scratch buffer of ``SCRATCH`` bytes. Once ``need`` bytes are in,
    :meth:`complete` says what they meant:

    * ``("more", n)``: the message goes on with ``n`` more bytes (read them into scratch):
      the HELLO's server id, the server's proof, a refusal's text;
    * ``("hello", (nonce_s, server_id))``: send AUTH (``ClientHandshake.auth``) now;
    * ``("proof", proof_s)``: check it (``ClientHandshake.finish``) and hand the session's
      receiving MAC to :meth:`keyed`; requests may be sent from then on;
    * ``("payload", n)``: the oldest request's ``n`` payload bytes come next;
    * ``("more", TAG_LEN)`` after the payload: its tag (complete it with ``payload=`` the
      destination the payload was read into);
    * ``("answered", n)``: the oldest request is answered, ``n`` bytes are in place and
      their tag checked;
    * ``("refused", text)``: the server refused the proof (``authenticated`` still False) or
      the oldest request, and closes.

    Tell the reader of every request sent with :meth:`asked`, in order, with the expected
    payload length. Anything else (bad magic, unknown status, a tag or proof that does not
    verify, an answer of the wrong length, a reply nobody asked for) raises ProtocolError;
    the connection is then of no further use.
    """

    SCRATCH = max(HELLO.size, MAX_ID, RESP.size + TAG_LEN, PROOF_LEN, MAX_TEXT + TAG_LEN)

    def __init__(self) -> None:
        self.mode = "hello"
        self.need = HELLO.size
        self.authenticated = False
        self._nonce = b""
        self._mac: Mac | None = None
        self._asked: collections.deque[int] = collections.deque()

    @property
    def unanswered(self) -> int:
        return len(self._asked)

    def asked(self, length: int) -> None:
        self._asked.append(length)

    def keyed(self, mac: Mac) -> None:
        """The handshake succeeded: every later part is checked with ``mac``."""
        if self.mode != "head" or self.authenticated:
            raise ProtocolError("keyed outside the handshake")
        self._mac = mac
        self.authenticated = True

    def _expect(self, mode: str, need: int) -> None:
        self.mode, self.need = mode, need

    def complete(self, data=None, payload=None) -> tuple[str, object]:
        """``data``: the ``need`` bytes just read (ignored for payload, read in place);
        ``payload``: with the payload's tag, the bytes the payload was read into."""
        mode = self.mode
        if mode == "payload":
            self._expect("ptag", TAG_LEN)
            return "more", TAG_LEN
        if mode == "ptag":
            if payload is None or data is None or len(payload) != self._asked[0]:
                raise ProtocolError("a payload's tag without that payload")
            self._mac.check(payload, data)  # type: ignore[union-attr]
            length = self._asked.popleft()
            self._expect("head", RESP.size + TAG_LEN)
            return "answered", length
        if data is None or len(data) != self.need:
            raise ProtocolError(f"{mode} of {0 if data is None else len(data)} bytes, expected {self.need}")
        if mode == "hello":
            self._nonce, n = decode_hello(data)
            self._expect("id", n)
            return ("more", n) if n else self.complete(b"")
        if mode == "id":
            self._expect("auth", RESP.size)
            return "hello", (self._nonce, bytes(data).decode(errors="replace"))
        if mode == "auth":  # the answer to AUTH, untagged: the proof or a refusal
            status, length = decode_reply_head(data)
            if status == REFUSED:
                return self._refused(length, tagged=False)
            if length != PROOF_LEN:
                raise ProtocolError(f"answered AUTH with {length} bytes, not a {PROOF_LEN}-byte proof")
            self._expect("proof", PROOF_LEN)
            return "more", length
        if mode == "proof":
            self._expect("head", RESP.size + TAG_LEN)
            return "proof", bytes(data)
        if mode == "text":
            raw = bytes(data[:len(data) - TAG_LEN]) if self.authenticated else bytes(data)
            if self.authenticated:
                self._mac.check(raw, data[-TAG_LEN:])  # type: ignore[union-attr]
            self._expect("closed", 0)
            return "refused", decode_refusal_text(raw)
        if mode != "head":
            raise ProtocolError(f"bytes after the connection ended ({mode})")
        if self._mac is None:
            raise ProtocolError("a reply arrived before the handshake completed")
        head = bytes(data[:RESP.size])
        self._mac.check(head, data[RESP.size:])
        status, length = decode_reply_head(head)
        if not self._asked:
            raise ProtocolError("sent an unsolicited reply")
        if status == REFUSED:
            return self._refused(length, tagged=True)
        want = self._asked[0]
        if length != want:
            raise ProtocolError(f"answered {length} bytes, asked {want}")
        if length == 0:
            self._asked.popleft()
            return "answered", 0
        self._expect("payload", length)
        return "payload", length

    def _refused(self, length: int, tagged: bool) -> tuple[str, object]:
        if length == 0:
            self._expect("closed", 0)
            return "refused", ""
        self._expect("text", length + (TAG_LEN if tagged else 0))
        return "more", length
