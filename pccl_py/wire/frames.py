"""Data-plane wire format, sans-I/O: frame headers, the connection handshake, bounds.

Every data-plane connection starts with a handshake and then carries frames. A frame
is a fixed 68-byte little-endian header followed by ``length`` payload bytes::

    magic    4s  b"PCDP"
    version  B   WIRE_VERSION
    kind     B   DATA | FIN | ERROR | PROBE | PROBE_ACK
    quant    B   QUANT_NONE | QUANT_U8 | QUANT_U4   (DATA only)
    flags    B   0 (reserved)
    group    I   peer group
    epoch    Q   membership epoch the sender's operation belongs to
    tag      Q   operation tag (< 2**63)
    attempt  I   attempt number of this tag within the epoch
    arg      I   by kind: the schedule step (DATA), the error code (ERROR), 0 or FIN_ALL (FIN)
    offset   Q   byte offset into the operation's buffer (DATA); the probe's total bytes
                 (PROBE) or the bytes received of it (PROBE_ACK)
    length   I   payload bytes that follow
    elems    I   elements the payload represents (DATA)
    lo       f   quantization minimum (float32)
    scale    f   quantization scale (float32)
    desc     Q   descriptor check: hash of (collective, dtype, op, count, algorithm, ...)

Handshake (acceptor = listening side, connector = dialling side)::

    acceptor  -> CHALLENGE: magic, version, kind=CHALLENGE, pad(2), nonce_a(32)
    connector -> HELLO:     magic, version, kind=HELLO, id_len(B), seal(B), stream(H), nstreams(H),
                            epoch(Q), session(Q), nonce_c(32), mac(32), peer_id(id_len)
                            mac = HMAC-SHA256(secret, "hello" | nonce_a | peer_id | epoch | stream | nstreams | session | nonce_c | seal)
    acceptor  -> WELCOME:   magic, version, kind=WELCOME, id_len(B), pad(2), mac(32), peer_id(id_len)
                            mac = HMAC-SHA256(secret, "welcome" | nonce_c | peer_id | stream | session | nonce_a)

Both proofs are checked with a constant-time compare; a wrong proof closes the
connection with a logged reason. ``seal`` is SEAL_TAG (every frame after the handshake is
followed by a 16-byte tag under keys derived from both nonces, see transport/seal.py),
SEAL_ENCRYPT (the same, and payloads encrypted) or SEAL_NONE; the acceptor refuses a
connector whose choice differs from its own. Everything read off the wire goes through the
``decode_*`` functions below, which raise :class:`ProtocolError` on anything off.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct
from dataclasses import dataclass

from pccl_py.errors import ERR_ABORTED as ERR_ABORTED  # the codes of ERROR frames live with
from pccl_py.errors import ERR_CODES as ERR_CODES  # the errors they stand for (errors.py)
from pccl_py.errors import ERR_DEADLINE as ERR_DEADLINE
from pccl_py.errors import ERR_DIVERGED as ERR_DIVERGED
from pccl_py.errors import ERR_INVALID_USAGE as ERR_INVALID_USAGE
from pccl_py.errors import ERR_PEER_LOST as ERR_PEER_LOST
from pccl_py.errors import ProtocolError

MAGIC = b"PCDP"
# 2: ERROR code 5 (Diverged); 3: a direct exchange of <= TINY_BYTES has no FIN round;
# 4: FIN_ALL (the shared-memory all-reduce's last finisher speaks for every peer)
# 5: the direct exchange is named "direct" in the call descriptor (was "tree"), so a call
# of an older daemon would not match one of this version
# 6: frames carry a 16-byte tag (transport/seal.py); HELLO's former padding byte says so
# 7: PROBE / PROBE_ACK (bandwidth probes: filler bytes, and their receipt)
WIRE_VERSION = 7

# frame kinds
DATA = 1
FIN = 2
ERROR = 3
# A bandwidth probe (DataPlane.probe): PROBE frames carry filler (tag: the probe's id, epoch:
# the sender's, offset: the probe's total bytes) over every stream of a link; the receiver
# discards them and, once it has counted the total, answers one PROBE_ACK (same tag).
PROBE = 4
PROBE_ACK = 5
MAX_PROBE = 1 << 34  # bytes of one probe
# handshake kinds
CHALLENGE = 16
HELLO = 17
WELCOME = 18

FRAME_KINDS = (DATA, FIN, ERROR, PROBE, PROBE_ACK)
# what follows each frame (HELLO's seal byte)
SEAL_NONE = 0
SEAL_TAG = 1  # a tag over header and payload
SEAL_ENCRYPT = 2  # a tag over the header, the payload encrypted
SEALS = (SEAL_NONE, SEAL_TAG, SEAL_ENCRYPT)
# FIN arguments: this peer is done; or (FIN_ALL) every peer of the call is done
FIN_ALL = 1

QUANT_NONE = 0
QUANT_U8 = 1
QUANT_U4 = 2
QUANT_BY_NAME = {None: QUANT_NONE, "uint8": QUANT_U8, "uint4": QUANT_U4}


MAX_TAG = 2**63 - 1
MAX_PEER_ID = 255
MAX_ERROR_MESSAGE = 1024
# A direct all-reduce of 1..TINY_BYTES bytes sends one DATA frame to each peer and has no
# FIN round: a single frame per link leaves the same window for a one-sided completion
# as the FIN it would be followed by (docs/dataplane.md, "Agreement and failures").
TINY_BYTES = 4096
NONCE_LEN = 32

HEADER = struct.Struct("<4sBBBBIQQIIQIIffQ")
HEADER_SIZE = HEADER.size  # 68
# lo and scale: the only header fields that say something of the data; an encrypting seal
# encrypts them (transport/seal.py), the rest routes the frame and stays in clear
QUANT_AT = 52
QUANT_LEN = 8

CHALLENGE_S = struct.Struct("<4sBBH32s")
HELLO_FIXED = struct.Struct("<4sBBBBHHQQ32s32s")
WELCOME_FIXED = struct.Struct("<4sBBBH32s")


@dataclass(frozen=True)
class Limits:
    """Bounds applied to everything read off the wire."""

    max_payload: int = 64 << 20  # one frame's payload
    max_streams: int = 64
    max_group: int = 2**32 - 1


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Header:
    kind: int
    group: int
    epoch: int
    tag: int
    attempt: int
    arg: int  # read it as step, error_code or fin (below), whichever the kind means
    offset: int
    length: int
    elems: int = 0
    quant: int = QUANT_NONE
    lo: float = 0.0
    scale: float = 0.0
    desc: int = 0

    @property
    def step(self) -> int:
        """DATA: the schedule step the payload belongs to."""
        return self.arg

    @property
    def error_code(self) -> int:
        """ERROR: one of ``ERR_CODES``."""
        return self.arg

    @property
    def fin(self) -> int:
        """FIN: 0 (this peer is done) or ``FIN_ALL`` (every peer of the call is done)."""
        return self.arg


# The bytes of a header that name its call (epoch, tag, attempt): frames still queued for a
# failed call are found by them.
_CALL_KEY = struct.Struct("<QQI")
CALL_KEY_AT = slice(12, 12 + _CALL_KEY.size)


def call_key(epoch: int, tag: int, attempt: int) -> bytes:
    """``header[CALL_KEY_AT]`` of every frame of that call."""
    return _CALL_KEY.pack(epoch, tag, attempt)


def encode_header(h: Header) -> bytes:
    return HEADER.pack(
        MAGIC, WIRE_VERSION, h.kind, h.quant, 0, h.group, h.epoch, h.tag, h.attempt, h.arg,
        h.offset, h.length, h.elems, h.lo, h.scale, h.desc,
    )


def pack_header(kind: int, group: int, epoch: int, tag: int, attempt: int, arg: int, offset: int,
                length: int, elems: int = 0, quant: int = QUANT_NONE, lo: float = 0.0,
                scale: float = 0.0, desc: int = 0) -> bytes:
    """Fast path of :func:`encode_header` without building a Header."""
    return HEADER.pack(MAGIC, WIRE_VERSION, kind, quant, 0, group, epoch, tag, attempt, arg,
                       offset, length, elems, lo, scale, desc)


def decode_header(buf, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Parse and bounds-check one header; ProtocolError on anything off."""
    if len(buf) != HEADER_SIZE:
        raise ProtocolError(f"frame header must be {HEADER_SIZE} bytes, got {len(buf)}")
    (magic, version, kind, quant, flags, group, epoch, tag, attempt, arg, offset, length, elems,
     lo, scale, desc) = HEADER.unpack(buf)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}")
    if version != WIRE_VERSION:
        raise ProtocolError(f"unsupported wire version {version} (this side speaks {WIRE_VERSION})")
    if kind not in FRAME_KINDS:
        raise ProtocolError(f"unknown frame kind {kind}")
    if flags != 0:
        raise ProtocolError(f"reserved flags set: {flags:#x}")
    if tag > MAX_TAG:
        raise ProtocolError(f"tag {tag} out of range")
    if group > limits.max_group:
        raise ProtocolError(f"group {group} out of range")
    if length > limits.max_payload:
        raise ProtocolError(f"frame length {length} exceeds the maximum {limits.max_payload}")
    if kind == DATA:
        if quant not in (QUANT_NONE, QUANT_U8, QUANT_U4):
            raise ProtocolError(f"unknown quantization kind {quant}")
        if quant != QUANT_NONE:
            if not (_finite(lo) and _finite(scale)) or scale < 0:
                raise ProtocolError(f"bad quantization parameters lo={lo} scale={scale}")
            need = elems if quant == QUANT_U8 else (elems + 1) // 2
            if need != length:
                raise ProtocolError(f"{elems} quantized elements need {need} bytes, frame has {length}")
    elif kind in (PROBE, PROBE_ACK):
        if quant != QUANT_NONE or elems != 0 or arg != 0:
            raise ProtocolError(f"probe frame kind {kind} with data fields set")
        if offset > MAX_PROBE or (kind == PROBE and (length == 0 or length > offset)):
            raise ProtocolError(f"probe frame of {length} bytes in a probe of {offset}")
        if kind == PROBE_ACK and length != 0:
            raise ProtocolError("PROBE_ACK frame with a payload")
    else:
        if quant != QUANT_NONE or elems != 0 or offset != 0:
            raise ProtocolError(f"control frame kind {kind} with data fields set")
        if kind == FIN and length != 0:
            raise ProtocolError("FIN frame with a payload")
        if kind == FIN and arg not in (0, FIN_ALL):
            raise ProtocolError(f"FIN frame with argument {arg} (0 or FIN_ALL)")
        if kind == ERROR:
            if arg not in ERR_CODES:
                raise ProtocolError(f"unknown error code {arg}")
            if length > MAX_ERROR_MESSAGE:
                raise ProtocolError(f"error message of {length} bytes exceeds {MAX_ERROR_MESSAGE}")
    return Header(kind, group, epoch, tag, attempt, arg, offset, length, elems, quant, lo, scale, desc)


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


def check_range(h: Header, lo: int, hi: int, align: int) -> None:
    """The frame's payload range must lie inside [lo, hi) and be aligned."""
    if h.offset < lo or h.offset + (h.elems * align if h.quant else h.length) > hi:
        raise ProtocolError(
            f"frame range [{h.offset}, +{h.length}) outside the expected [{lo}, {hi}) (step {h.step})")
    if h.offset % align or (not h.quant and h.length % align):
        raise ProtocolError(f"frame range [{h.offset}, +{h.length}) not aligned to {align} bytes")


def decode_error_message(payload) -> str:
    try:
        return bytes(payload).decode("utf-8", "replace")
    except Exception as e:  # pragma: no cover - bytes() of a buffer does not fail
        raise ProtocolError(f"bad error payload: {e}") from None


def encode_error(group: int, epoch: int, tag: int, attempt: int, code: int, message: str, desc: int = 0) -> bytes:
    msg = message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE]
    return pack_header(ERROR, group, epoch, tag, attempt, code, 0, len(msg), desc=desc) + msg


@functools.lru_cache(maxsize=1024)
def descriptor(*parts: object) -> int:
    """64-bit hash of an operation's arguments; peers calling with different ones disagree."""
    text = "|".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


# ---------------------------------------------------------------- handshake


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"|".join(parts), hashlib.sha256).digest()


def _u64(x: int) -> bytes:
    return x.to_bytes(8, "little")


def encode_challenge(nonce: bytes) -> bytes:
    return CHALLENGE_S.pack(MAGIC, WIRE_VERSION, CHALLENGE, 0, nonce)


def decode_challenge(buf) -> bytes:
    if len(buf) != CHALLENGE_S.size:
        raise ProtocolError("short challenge")
    magic, version, kind, pad, nonce = CHALLENGE_S.unpack(buf)
    _check_prefix(magic, version, kind, CHALLENGE)
    if pad:
        raise ProtocolError("challenge padding not zero")
    return nonce


def _check_prefix(magic: bytes, version: int, kind: int, want: int) -> None:
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}")
    if version != WIRE_VERSION:
        raise ProtocolError(f"unsupported wire version {version}")
    if kind != want:
        raise ProtocolError(f"expected handshake message {want}, got kind {kind}")


@dataclass(frozen=True)
class Hello:
    peer_id: str
    epoch: int
    stream: int
    nstreams: int
    session: int
    nonce: bytes
    mac: bytes
    seal: int = SEAL_TAG


def hello_mac(secret: bytes, challenge: bytes, peer_id: str, epoch: int, stream: int, nstreams: int,
              session: int, nonce: bytes, seal: int) -> bytes:
    return _mac(secret, b"hello", challenge, peer_id.encode(), _u64(epoch), _u64(stream), _u64(nstreams),
                _u64(session), nonce, _u64(seal))


def encode_hello(secret: bytes, challenge: bytes, peer_id: str, epoch: int, stream: int, nstreams: int,
                 session: int, nonce: bytes, seal: int = SEAL_TAG) -> bytes:
    pid = peer_id.encode()
    if not 0 < len(pid) <= MAX_PEER_ID:
        raise ValueError("peer_id must be 1..255 bytes of utf-8")
    mac = hello_mac(secret, challenge, peer_id, epoch, stream, nstreams, session, nonce, seal)
    return HELLO_FIXED.pack(MAGIC, WIRE_VERSION, HELLO, len(pid), seal, stream, nstreams, epoch, session,
                            nonce, mac) + pid


def decode_hello_fixed(buf, limits: Limits = DEFAULT_LIMITS) -> tuple[int, Hello]:
    """Parse HELLO's fixed part; returns (bytes of peer_id still to read, partial Hello)."""
    if len(buf) != HELLO_FIXED.size:
        raise ProtocolError("short hello")
    magic, version, kind, id_len, seal, stream, nstreams, epoch, session, nonce, mac = HELLO_FIXED.unpack(buf)
    _check_prefix(magic, version, kind, HELLO)
    if seal not in SEALS:
        raise ProtocolError(f"unknown frame seal {seal}")
    if not 0 < id_len <= MAX_PEER_ID:
        raise ProtocolError(f"peer id length {id_len} out of range")
    if not 0 < nstreams <= limits.max_streams or stream >= nstreams:
        raise ProtocolError(f"stream {stream} of {nstreams} out of range (max {limits.max_streams})")
    return id_len, Hello("", epoch, stream, nstreams, session, nonce, mac, seal)


def finish_hello(partial: Hello, id_bytes, secret: bytes, challenge: bytes) -> Hello:
    """Decode the peer id and verify the proof; ProtocolError if it is wrong."""
    try:
        peer_id = bytes(id_bytes).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("peer id is not utf-8") from None
    want = hello_mac(secret, challenge, peer_id, partial.epoch, partial.stream, partial.nstreams,
                     partial.session, partial.nonce, partial.seal)
    if not hmac.compare_digest(want, partial.mac):
        raise ProtocolError(f"authentication failed for peer {peer_id!r} (wrong secret?)")
    return Hello(peer_id, partial.epoch, partial.stream, partial.nstreams, partial.session,
                 partial.nonce, partial.mac, partial.seal)


def welcome_mac(secret: bytes, nonce: bytes, peer_id: str, stream: int, session: int, challenge: bytes) -> bytes:
    return _mac(secret, b"welcome", nonce, peer_id.encode(), _u64(stream), _u64(session), challenge)


def encode_welcome(secret: bytes, nonce: bytes, peer_id: str, stream: int, session: int, challenge: bytes) -> bytes:
    """``nonce``: the connector's (from its hello); ``challenge``: the acceptor's own."""
    pid = peer_id.encode()
    return WELCOME_FIXED.pack(MAGIC, WIRE_VERSION, WELCOME, len(pid), 0,
                              welcome_mac(secret, nonce, peer_id, stream, session, challenge)) + pid


def decode_welcome_fixed(buf) -> tuple[int, bytes]:
    if len(buf) != WELCOME_FIXED.size:
        raise ProtocolError("short welcome")
    magic, version, kind, id_len, pad, mac = WELCOME_FIXED.unpack(buf)
    _check_prefix(magic, version, kind, WELCOME)
    if pad:
        raise ProtocolError("welcome padding not zero")
    if not 0 < id_len <= MAX_PEER_ID:
        raise ProtocolError(f"peer id length {id_len} out of range")
    return id_len, mac


def finish_welcome(mac: bytes, id_bytes, secret: bytes, nonce: bytes, stream: int, session: int,
                   expected_peer: str | None, challenge: bytes) -> str:
    try:
        peer_id = bytes(id_bytes).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("peer id is not utf-8") from None
    if not hmac.compare_digest(welcome_mac(secret, nonce, peer_id, stream, session, challenge), mac):
        raise ProtocolError(f"peer {peer_id!r} failed to prove the secret")
    if expected_peer is not None and peer_id != expected_peer:
        raise ProtocolError(f"dialled {expected_peer!r} but {peer_id!r} answered")
    return peer_id
