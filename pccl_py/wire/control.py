"""Control-plane wire format: msgpack maps with ``type`` and ``v``, one schema table.

Every message between a daemon (zmq DEALER) and the coordinator (zmq ROUTER) is one
zmq frame holding a msgpack map ``{"type": <name>, "v": VERSION, <fields>...}``.
:data:`SCHEMA` is the only place message types and their fields are defined;
:func:`decode` validates a frame against it before anything else sees it and raises
:class:`~pccl_py.errors.ProtocolError` (and nothing else) on any deviation: bad
bytes, truncated data, trailing data, wrong version, unknown type, missing or extra
fields, wrong types, out-of-range numbers, oversized strings, bytes or lists.
Lengths are bounded inside the unpacker, before it allocates.

No message carries a credential: the transport authenticates. Both ends of every control
connection complete a zmq CURVE handshake with keys derived from the run secret
(:func:`pccl_py.wire.keys.curve_keypair`) before a message passes, and CURVE encrypts and
authenticates each message under keys of that connection, so nothing can be replayed
from one connection into another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack

from pccl_py.errors import ProtocolError

# 2: report_failure carries the epoch of the broken link; 3: topology names the vote it answers;
# 4: CURVE authenticates the connection, hello lost its timestamped proof (ts, proof)
# 5: optimize_topology (optimize, bw_probe, bw_report); status_a carries the bandwidth matrix
# 6: automatic tags count from each vote round: topology carries the round's id, a vote what
#    its peer made of the count (below, open), a heartbeat the automatic tags in flight;
#    hello the world size of its epoch (a restarted coordinator stops collecting claims
#    once every member of the newest epoch has made one)
VERSION = 6
MAX_MESSAGE = 1 << 20  # bytes in one control frame (also the ROUTER's MAXMSGSIZE)
MAX_STR = 4096  # unpacker bound for any string; fields have tighter bounds below
MAX_BIN = 256
MAX_ARRAY = 8192
MAX_MAP = 32
MAX_PEERS = 4096  # peers in one topology or status message
MAX_TAGS = 64  # automatic tags in one heartbeat or vote (pccl_py.calls.TAGS_REPORTED)

I64 = (-(1 << 63), (1 << 63) - 1)
U31 = (0, (1 << 31) - 1)
U63 = (0, (1 << 63) - 1)


@dataclass(frozen=True)
class F:
    """One field: python type plus bounds. ``items`` types list elements (one F, or a
    tuple of F for fixed-shape rows); ``fields`` types a nested map."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    max_len: int | None = None
    optional: bool = False  # None allowed
    choices: tuple[Any, ...] | None = None
    items: F | tuple[F, ...] | None = None
    fields: dict[str, F] | None = field(default=None, hash=False)


def _i(lo_hi: tuple[int, int] = I64, optional: bool = False) -> F:
    return F(int, lo=lo_hi[0], hi=lo_hi[1], optional=optional)


def _s(max_len: int, optional: bool = False, choices: tuple[str, ...] | None = None) -> F:
    return F(str, max_len=max_len, optional=optional, choices=choices)


def _f(lo: float = 0.0, hi: float = 1e9) -> F:
    return F(float, lo=lo, hi=hi)


PEER_ID = _s(128)
REQ = _i(U63)
EPOCH = _i(U63)
REASON = _s(1024)
ERROR_NAME = _s(64)
INSTANCE = _s(64)
TIMEOUT = _f(0.0, 1e7)  # seconds; 0 means "no deadline"
ACTIVITY = _s(256, optional=True)
PEER_ROW = F(list, max_len=3, items=(PEER_ID, _s(255), _i((0, 65535))))
TAGS = F(list, max_len=MAX_TAGS, items=_i(U63))  # automatic tags (pccl_py.daemon.tags)

STATUS_MEMBER = F(
    dict,
    fields={
        "peer_id": PEER_ID,
        "group": _i(U31),
        "state": _s(16),
        "host": _s(255),
        "port": _i((0, 65535)),
        "ring_pos": _i((-1, MAX_PEERS)),
        "epoch": EPOCH,
        "revision": _i(),
        "hb_age": _f(0.0, 1e9),
        "activity": ACTIVITY,
        "tx": _i(U63),
        "rx": _i(U63),
    },
)

# The one schema table: message type -> field -> spec. Direction is in the comment.
SCHEMA: dict[str, dict[str, F]] = {
    # daemon -> coordinator
    "hello": {  # register, or re-introduce after a coordinator restart
        "peer_id": PEER_ID,
        "group": _i(U31),
        "host": _s(255),
        "port": _i((0, 65535)),
        "claim": _s(16, choices=("new", "accepted")),
        "epoch": EPOCH,  # last epoch seen (0: none)
        "ring_pos": _i((-1, MAX_PEERS)),  # -1: none
        "world": _i((0, 1 << 20)),  # the world size at that epoch (0: none)
        "revision": _i(),  # shared-state revision, -1: none
        "instance": INSTANCE,  # last coordinator instance seen ("": none)
        "timeout": TIMEOUT,  # how long a pending peer waits to be accepted
    },
    # tx, rx: data-plane bytes this daemon sent and received so far (for throughput views)
    # calls: the automatic tags of the calls in flight (the lockstep check reads them)
    "heartbeat": {"activity": ACTIVITY, "epoch": EPOCH, "revision": _i(), "tx": _i(U63), "rx": _i(U63),
                  "calls": TAGS},
    # below, open: what the voter made of its automatic tags (AutoTags.progress; below 0: unknown)
    "vote": {"req": REQ, "timeout": TIMEOUT, "below": _i(U63), "open": TAGS},  # update_topology
    # optimize_topology (a vote; unvote withdraws it)
    "optimize": {"req": REQ, "timeout": TIMEOUT, "below": _i(U63), "open": TAGS},
    # the rates measured for a bw_probe: [dst, bytes_per_s, seconds] per target it reached
    "bw_report": {"round": _i(U63), "epoch": EPOCH,
                  "rows": F(list, max_len=MAX_PEERS, items=F(list, max_len=3, items=(PEER_ID, _f(0.0, 1e15),
                                                                                    _f(0.0, 1e7))))},
    "unvote": {"req": REQ},  # the caller gave up waiting
    "pending_q": {"req": REQ},  # are_peers_pending
    "report_failure": {"peer_id": PEER_ID, "reason": REASON, "epoch": EPOCH},
    "leave": {"reason": REASON},
    "pong": {"nonce": _i(U63)},
    "status_q": {"req": REQ},  # read-only; any authenticated connection (pccl status)
    # coordinator -> daemon
    "welcome": {
        "instance": INSTANCE,
        "peer_id": PEER_ID,
        "state": _s(16, choices=("pending", "accepted", "recovering")),
        "heartbeat_interval": _f(0.001, 3600.0),
        "heartbeat_deadline": _f(0.001, 36000.0),
        "reason": REASON,
    },
    "topology": {
        "instance": INSTANCE,
        "epoch": EPOCH,
        "group": _i(U31),
        "peers": F(list, max_len=MAX_PEERS, items=PEER_ROW),
        "world_size": _i((0, 1 << 20)),
        "num_groups": _i((0, 1 << 20)),
        "req": REQ,  # the vote (update_topology) of the receiver this push answers; 0: none
        "reason": REASON,
        "round": _i(U63),  # the last vote round completed: automatic tags count from there
    },
    "hb": {"instance": INSTANCE, "epoch": EPOCH},
    "ping": {"nonce": _i(U63)},
    # measure the data links to targets (in order): send `bytes` to each, time the acknowledgement
    "bw_probe": {"round": _i(U63), "epoch": EPOCH, "targets": F(list, max_len=MAX_PEERS, items=PEER_ID),
                 "bytes": _i((1, 1 << 34)), "timeout": _f(0.001, 3600.0)},
    "pending_a": {"req": REQ, "pending": F(bool)},
    "error": {"req": REQ, "error": ERROR_NAME, "message": REASON},  # fails request `req`
    "abort": {"error": ERROR_NAME, "message": REASON},  # fails what the daemon is doing
    "removed": {"peer_id": PEER_ID, "reason": REASON},  # about peer_id (not some later id)
    "reset": {"instance": INSTANCE, "reason": REASON},  # "introduce yourself again"
    "refused": {"reason": REASON},  # hello refused (the run is full)
    "status_a": {
        "req": REQ,
        "instance": INSTANCE,
        "epoch": EPOCH,
        "recovering": F(bool),
        "uptime": _f(0.0, 1e11),
        "world_size": _i((0, 1 << 20)),
        "num_groups": _i((0, 1 << 20)),
        "vote_open": F(bool),
        "voters": F(list, max_len=MAX_PEERS, items=PEER_ID),
        "members": F(list, max_len=MAX_PEERS, items=STATUS_MEMBER),
        # the measured rates: [src, dst, bytes_per_s, samples, age in seconds]
        "bandwidth": F(list, max_len=MAX_ARRAY, items=F(list, max_len=5, items=(
            PEER_ID, PEER_ID, _f(0.0, 1e15), _i(U63), _f(0.0, 1e11)))),
        "optimizing": F(bool),  # an optimize_topology round is measuring or solving
    },
}


def _check(name: str, spec: F, value: Any) -> Any:
    if value is None:
        if spec.optional:
            return None
        raise ProtocolError(f"field {name!r} is missing a value")
    kind = spec.kind
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"field {name!r} must be a number, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise ProtocolError(f"field {name!r} must be finite")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"field {name!r} must be an int, got {type(value).__name__}")
    elif kind is list:
        if not isinstance(value, (list, tuple)):
            raise ProtocolError(f"field {name!r} must be a list, got {type(value).__name__}")
    elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    if spec.lo is not None and value < spec.lo:
        raise ProtocolError(f"field {name!r} = {value!r} is below {spec.lo}")
    if spec.hi is not None and value > spec.hi:
        raise ProtocolError(f"field {name!r} = {value!r} is above {spec.hi}")
    if spec.max_len is not None and len(value) > spec.max_len:
        raise ProtocolError(f"field {name!r} is longer than {spec.max_len}")
    if spec.choices is not None and value not in spec.choices:
        raise ProtocolError(f"field {name!r} = {value!r} is not one of {spec.choices}")
    if kind is list and spec.items is not None:
        if isinstance(spec.items, tuple):
            if len(value) != len(spec.items):
                raise ProtocolError(f"field {name!r} must have {len(spec.items)} items")
            value = [_check(f"{name}[{i}]", s, v) for i, (s, v) in enumerate(zip(spec.items, value, strict=False))]
        else:
            value = [_check(f"{name}[{i}]", spec.items, v) for i, v in enumerate(value)]
    if kind is dict and spec.fields is not None:
        value = _check_map(name, spec.fields, value)
    return value


def _check_map(name: str, fields: dict[str, F], obj: dict) -> dict:
    extra = set(obj) - set(fields)
    if extra:
        raise ProtocolError(f"{name}: unknown fields {sorted(map(str, extra))[:5]}")
    out = {}
    for key, spec in fields.items():
        if key not in obj:
            raise ProtocolError(f"{name}: missing field {key!r}")
        out[key] = _check(f"{name}.{key}", spec, obj[key])
    return out


def validate(msg: dict) -> dict:
    """Check a decoded map against :data:`SCHEMA`; return it with floats normalised."""
    if not isinstance(msg, dict):
        raise ProtocolError(f"a message must be a map, got {type(msg).__name__}")
    mtype = msg.get("type")
    if not isinstance(mtype, str) or mtype not in SCHEMA:
        raise ProtocolError(f"unknown message type {str(mtype)[:40]!r}")
    version = msg.get("v")
    if version != VERSION or isinstance(version, bool):
        raise ProtocolError(
            f"protocol version {str(version)[:20]!r} is not supported (this side speaks v{VERSION})"
        )
    body = {k: v for k, v in msg.items() if k not in ("type", "v")}
    out = _check_map(mtype, SCHEMA[mtype], body)
    out["type"] = mtype
    return out


def decode(data: bytes | bytearray | memoryview) -> dict:
    """Bytes off the wire -> validated message dict (``type`` included, ``v`` dropped)."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_STR,
            max_bin_len=MAX_BIN,
            max_array_len=MAX_ARRAY,
            max_map_len=MAX_MAP,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise ProtocolError(f"undecodable message: {type(exc).__name__}: {str(exc)[:100]}") from None
    return validate(obj)


def encode(mtype: str, **fields: Any) -> bytes:
    """Validated message -> bytes. Raises ProtocolError for a message that decode() would refuse."""
    msg = {"type": mtype, "v": VERSION, **fields}
    validate(msg)
    return msgpack.packb(msg, use_bin_type=True)


def encode_msg(msg: dict) -> bytes:
    """Encode a dict holding ``type`` and fields (the form the membership core returns)."""
    fields = {k: v for k, v in msg.items() if k != "type"}
    return encode(msg["type"], **fields)


# Shared-state sync messages (sync_offer, sync_done: daemon -> coordinator; sync_plan,
# sync_complete: coordinator -> daemon); pccl_py/coordinator/election.py says what each
# field means.
STRATEGIES = ("enforce_popular", "receive_only", "send_only")
MAX_TENSORS = 8192
MAX_NAME = 256


def _sync_schema() -> dict[str, dict[str, F]]:
    rev = F(int, lo=-1, hi=(1 << 63) - 1)
    rnd = F(int, lo=0, hi=(1 << 63) - 1)
    name = F(str, max_len=MAX_NAME)
    nbytes = F(int, lo=0, hi=(1 << 63) - 1)
    digest = F(bytes, max_len=64)
    row = F(list, max_len=3, items=(name, nbytes, digest))
    err = F(str, max_len=64)
    msg = F(str, max_len=1024)
    return {
        "sync_offer": {
            "round_hint": rnd,
            "revision": F(int, lo=0, hi=(1 << 63) - 1),
            "strategy": F(str, max_len=32, choices=STRATEGIES),
            "tensors": F(list, max_len=MAX_TENSORS, items=row),
            "host": F(str, max_len=255),
            "port": F(int, lo=0, hi=65535),
            "timeout": F(float, lo=0.0, hi=1e7),
        },
        "sync_done": {"round": rnd, "ok": F(bool), "rx_bytes": nbytes, "error": err, "message": msg},
        "sync_plan": {
            "round": rnd,
            "status": F(str, max_len=16, choices=("in_sync", "fetch", "error")),
            "revision": rev,
            "sources": F(list, max_len=MAX_PEERS,
                         items=F(list, max_len=3, items=(F(str, max_len=128), F(str, max_len=255),
                                                          F(int, lo=0, hi=65535)))),
            "tensors": F(list, max_len=MAX_TENSORS, items=row),
            "error": err,
            "message": msg,
        },
        "sync_complete": {
            "round": rnd,
            "status": F(str, max_len=16, choices=("ok", "error")),
            "revision": rev,
            "error": err,
            "message": msg,
        },
    }


SYNC_SCHEMA = _sync_schema()
SCHEMA.update(SYNC_SCHEMA)


def short(digest: bytes) -> str:
    """First 8 hex digits of a content hash, for log lines and error messages."""
    return digest.hex()[:8] if digest else "-"
