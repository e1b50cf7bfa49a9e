"""The trainer-daemon messages (IPC) between a trainer's :class:`~pccl_py.client.client.Client` and its daemon.

Control messages travel over an AF_UNIX stream socket as length-prefixed msgpack maps
(``<u32 little-endian length><msgpack map>``); DESIGN section 11 measured a plain unix
socket at ~16 us per round trip against 80-130 us for zmq ipc. Tensor payloads do not
cross the socket: the client copies them into a shared-memory segment that both
processes map (created once, reused) and the daemon writes results back into it. The
exception is an all-reduce of at most ``INLINE_BYTES``: its bytes ride in the request's
``data`` field and the result in the reply's, which spares the segment bookkeeping that
dominates a latency-bound call.

Requests are ``{"op": <name>, "id": <int>, ...}``; every reply carries the same ``id`` and
either ``"ok": True`` plus fields, or ``"ok": False`` plus :func:`pccl_py.errors.to_wire`'s
fields. Several requests may be in flight; replies can come in any order.

:data:`REQUESTS` is the one table of what each request may carry; :func:`check_request`
checks a request against it before the daemon reads any field (type, range, length,
missing and unknown keys) and raises :class:`~pccl_py.errors.InvalidUsage` naming the
field and what to pass. It checks the shape; what a value means (a known dtype, a tag
below the automatic ones, a timeout of at most a day) is :mod:`pccl_py.calls`' to check.
"""

from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from pccl_py.errors import InvalidUsage, ProtocolError
from pccl_py.wire.control import MAX_NAME, MAX_TENSORS

LEN = struct.Struct("<I")
MAX_MESSAGE = 1 << 24  # control messages only; payloads go through shared memory
INLINE_BYTES = 4096  # an all-reduce of at most this many bytes carries them in its request and reply


def pack(msg: dict) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return LEN.pack(len(body)) + body


def unpack(body: bytes) -> dict:
    try:
        msg = msgpack.unpackb(body, raw=False, max_str_len=1 << 20, max_bin_len=MAX_MESSAGE, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated classes
        raise ProtocolError(f"undecodable IPC message: {str(exc)[:100]}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("IPC message is not a map")
    return msg


class FrameBuffer:
    """Sans-I/O splitter of the length-prefixed stream into message bodies.

    ``feed`` raises ProtocolError when the stream itself is broken (a length over
    MAX_MESSAGE: nothing after it can be framed). A body that is not a msgpack map raises
    too, unless ``lenient``: it is then returned as a ProtocolError in the list, in its
    place, and the stream goes on (the daemon answers it and keeps serving the session)."""

    def __init__(self, lenient: bool = False) -> None:
        self._buf = bytearray()
        self.lenient = lenient

    def _unpack(self, body) -> dict | ProtocolError:
        try:
            return unpack(body)
        except ProtocolError as exc:
            if self.lenient:
                return exc
            raise

    def feed(self, data: bytes) -> list:
        if not self._buf and len(data) >= LEN.size:  # the usual case: exactly one whole message
            (n,) = LEN.unpack_from(data)
            if len(data) == LEN.size + n and n <= MAX_MESSAGE:
                return [self._unpack(memoryview(data)[LEN.size:])]
        self._buf += data
        out: list = []
        while len(self._buf) >= LEN.size:
            (n,) = LEN.unpack_from(self._buf)
            if n > MAX_MESSAGE:
                raise ProtocolError(f"IPC message of {n} bytes exceeds {MAX_MESSAGE}")
            if len(self._buf) < LEN.size + n:
                break
            body = bytes(self._buf[LEN.size : LEN.size + n])
            del self._buf[: LEN.size + n]
            out.append(self._unpack(body))
        return out


# ---- what each request may carry --------------------------------------------------------

MAX_BYTES = 1 << 48  # a size or an offset in shared memory (256 TiB)
MAX_ID = (1 << 63) - 1
MAX_SEGMENT_NAME = 250  # a POSIX shared-memory name, without its leading "/"
MAX_DIMS = 32


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a request: ``kind`` is ``int`` (an int, never a bool), ``float`` (a finite
    int or float, never a bool), ``str``, ``bytes``, ``bool`` or ``dict`` (checked by
    ``fields``); ``lo``/``hi`` bound numbers, ``max_len`` strings and bytes; ``optional``:
    the key may be absent or None (it reads as None)."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    max_len: int | None = None
    optional: bool = False
    fields: dict[str, Field] | None = None
    rule: Callable[[Any], str | None] | None = None  # what else is wrong with the value, if anything


def _opt(f: Field) -> Field:
    return Field(f.kind, f.lo, f.hi, f.max_len, True, f.fields, f.rule)


def _segment_rule(name: str) -> str | None:
    bare = name[1:] if name.startswith("/") else name
    if not bare or "/" in bare or "\0" in bare or bare in (".", ".."):
        return "must be a shared-memory segment name (one path component, no NUL)"
    return None


TIMEOUT = Field(float, optional=True)  # None or 0: the default (calls.request_timeout bounds it)
SIZE = Field(int, lo=0, hi=MAX_BYTES)
SEGMENT = Field(str, max_len=MAX_SEGMENT_NAME, rule=_segment_rule)
NAME = Field(str, max_len=32)  # dtype, op, quant, algorithm, strategy (calls.py says which)
TAG = Field(int, lo=0, hi=(1 << 63) - 1, optional=True)  # calls.user_tag bounds it further
STATE = Field(dict, fields={
    "segment": SEGMENT,
    "size": SIZE,
    "revision": Field(int, lo=0, hi=(1 << 63) - 1),
    "tensors": Field(list, max_len=MAX_TENSORS),  # rows: layout_views checks them
})

REQUESTS: dict[str, dict[str, Field]] = {
    "hello": {"timeout": TIMEOUT},
    "connect": {"timeout": TIMEOUT},
    "update_topology": {"timeout": TIMEOUT},
    "optimize_topology": {"timeout": TIMEOUT},
    "are_peers_pending": {"timeout": TIMEOUT},
    "info": {"timeout": TIMEOUT},
    "map": {"name": SEGMENT, "size": SIZE, "timeout": TIMEOUT},
    "unmap": {"name": SEGMENT, "timeout": TIMEOUT},
    # either ``data`` (at most INLINE_BYTES, in the request) or ``shm``, ``in_off``, ``out_off``
    "all_reduce": {
        "nbytes": SIZE, "dtype": NAME, "reduce": _opt(NAME), "algorithm": _opt(NAME), "quant": _opt(NAME),
        "tag": TAG, "timeout": TIMEOUT, "data": Field(bytes, max_len=INLINE_BYTES, optional=True),
        "shm": _opt(SEGMENT), "in_shm": _opt(SEGMENT), "in_off": _opt(SIZE), "out_off": _opt(SIZE),
    },
    "all_gather": {"data": Field(bytes, max_len=MAX_MESSAGE), "tag": TAG, "timeout": TIMEOUT},
    "sync_shared_state": {"state": STATE, "strategy": _opt(NAME), "progress": Field(bool, optional=True),
                          "timeout": TIMEOUT},
    "leave": {"timeout": TIMEOUT},
}
OPS = frozenset(REQUESTS)


def request_id(msg: Mapping) -> int | None:
    """The request's ``id`` when it is one (an int in [0, 2**63)), for its reply; else None."""
    rid = msg.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= MAX_ID:
        return rid
    return None


def check_request(msg: Mapping) -> dict[str, Any]:
    """The request's fields by :data:`REQUESTS` (``op`` and ``id`` included; an optional field
    that is absent reads as None), or InvalidUsage naming what is wrong."""
    op = msg.get("op")
    if not isinstance(op, str) or op not in REQUESTS:
        raise InvalidUsage(f"unknown request {_show(op)}; pass one of {sorted(REQUESTS)}")
    if request_id(msg) is None:
        raise InvalidUsage(f"{op}: id must be an int in [0, 2**63), got {_show(msg.get('id'))}")
    out = _fields(op, REQUESTS[op], msg, ("op", "id"))
    out["op"], out["id"] = op, msg["id"]
    if op == "all_reduce":
        inline = out["data"] is not None
        if inline == (out["shm"] is not None) or (not inline and (out["in_off"] is None or out["out_off"] is None)):
            raise InvalidUsage("all_reduce: pass either data (the bytes, at most "
                               f"{INLINE_BYTES}) or shm, in_off and out_off (tensors in shared memory)")
    return out


def _fields(where: str, spec: Mapping[str, Field], msg: Mapping, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    extra = [k for k in msg if k not in spec and k not in skip]
    if extra:
        raise InvalidUsage(f"{where}: unknown fields {sorted(map(_show, extra))[:5]}; pass only {sorted(spec)}")
    return {key: _value(f"{where}.{key}", f, msg.get(key), key in msg) for key, f in spec.items()}


def _value(name: str, f: Field, v: Any, present: bool) -> Any:
    t = type(v)
    if t is f.kind and f.rule is None and f.fields is None:  # the usual case, quickly
        if t is int:
            if (f.lo is None or v >= f.lo) and (f.hi is None or v <= f.hi):
                return v
        elif t is float:
            if math.isfinite(v):
                return v
        elif f.max_len is None or len(v) <= f.max_len:
            return v
    if v is None:
        if f.optional:
            return None
        raise InvalidUsage(f"{name} is {'missing' if not present else 'None'}: it is required")
    kind = f.kind
    if isinstance(v, bool) and kind is not bool:
        raise InvalidUsage(f"{name} must be {_what(f)}, got a bool")
    if kind is float:
        if not isinstance(v, numbers.Real):
            raise InvalidUsage(f"{name} must be {_what(f)}, got {type(v).__name__}")
        try:
            v = float(v)
        except OverflowError:  # an int past any float (msgpack carries none)
            v = math.inf
        if not math.isfinite(v):
            raise InvalidUsage(f"{name} must be a finite number, got {v!r}")
    elif not isinstance(v, kind):
        raise InvalidUsage(f"{name} must be {_what(f)}, got {type(v).__name__}")
    if (f.lo is not None and v < f.lo) or (f.hi is not None and v > f.hi):
        raise InvalidUsage(f"{name} must be {_what(f)}, got {v!r}")
    if f.max_len is not None and len(v) > f.max_len:
        raise InvalidUsage(f"{name} is longer than {f.max_len}")
    if f.rule is not None and (why := f.rule(v)) is not None:
        raise InvalidUsage(f"{name} {why}, got {_show(v)}")
    if f.fields is not None:
        v = _fields(name, f.fields, v)
    return v


def _what(f: Field) -> str:
    what = {int: "an int", float: "a number", str: "a string", bytes: "bytes", bool: "a bool", dict: "a map",
            list: "a list"}[f.kind]
    if f.lo is not None and f.hi is not None:
        what += f" in [{f.lo}, {f.hi}]"
    return what


def _show(v: Any) -> str:
    return repr(v)[:40]


# ---- a shared state's description (the client's SharedState.describe()) -------------


def state_row(name: str, offset: int, nbytes: int, dtype: str, shape: tuple, unequal: bool) -> list:
    """One tensor of a shared-state description: where it lies in the segment and whether
    it is left out of the comparison (``allow_content_inequality``)."""
    return [name, offset, nbytes, dtype, list(shape), bool(unequal)]


def describe_state(segment: str, size: int, revision: int, rows: list[list]) -> dict[str, Any]:
    """The map a client sends for ``sync_shared_state``; :func:`layout_views` reads it."""
    return {"segment": segment, "size": size, "revision": revision, "tensors": [list(r) for r in rows]}


ROW = {
    "name": Field(str, max_len=MAX_NAME),
    "offset": SIZE,
    "nbytes": SIZE,
    "dtype": NAME,
    "unequal": Field(bool),
}


def layout_views(desc: Mapping[str, Any], segment: memoryview) -> list[tuple[str, memoryview, bool]]:
    """The daemon's reading of a :meth:`~pccl_py.client.shared_state.SharedState.describe`
    map: (name, byte view into ``segment``, allow_content_inequality) per tensor, every row
    checked (a non-empty unique name of at most MAX_NAME characters, ints for offset and
    size, a list of at most MAX_DIMS ints >= 0 for the shape, a bool) and every range
    against the segment."""
    rows = desc.get("tensors")
    if not isinstance(rows, list) or len(rows) > MAX_TENSORS:
        raise InvalidUsage(f"a shared-state description has a list of at most {MAX_TENSORS} tensor rows")
    size = len(segment)
    out = []
    seen = set()
    for row in rows:
        if not isinstance(row, (list, tuple)) or len(row) != 6:
            raise InvalidUsage("each shared-state tensor row is [name, offset, nbytes, dtype, shape, unequal]")
        name, off, nbytes, _dtype, shape, unequal = (
            _value(f"tensor row.{k}", ROW[k], v, True) if k in ROW else v
            for k, v in zip(("name", "offset", "nbytes", "dtype", "shape", "unequal"), row, strict=True))
        if not name or name in seen:
            raise InvalidUsage(f"tensor names must be non-empty and distinct, got {name!r}")
        if (not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_BYTES for d in shape)):
            raise InvalidUsage(f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} ints >= 0")
        if off + nbytes > size:
            raise InvalidUsage(f"tensor {name!r} [{off}, +{nbytes}) lies outside the {size}-byte segment")
        seen.add(name)
        out.append((name, segment[off:off + nbytes], unequal))
    return out
