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
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import msgpack

from pccl_py.errors import InvalidUsage, ProtocolError

LEN = struct.Struct("<I")
MAX_MESSAGE = 1 << 24  # control messages only; payloads go through shared memory
INLINE_BYTES = 4096  # an all-reduce of at most this many bytes carries them in its request and reply

OPS = frozenset(
    {
        "hello",
        "connect",
        "update_topology",
        "are_peers_pending",
        "info",
        "map",
        "unmap",
        "all_reduce",
        "all_gather",
        "sync_shared_state",
        "leave",
    }
)


def pack(msg: dict) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return LEN.pack(len(body)) + body


def unpack(body: bytes) -> dict:
    try:
        msg = msgpack.unpackb(body, raw=False, max_str_len=1 << 20, max_bin_len=MAX_MESSAGE)
    except Exception as exc:  # msgpack raises several unrelated classes
        raise ProtocolError(f"undecodable IPC message: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("IPC message is not a map")
    return msg


class FrameBuffer:
    """Sans-I/O splitter of the length-prefixed stream into message bodies."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict]:
        if not self._buf and len(data) >= LEN.size:  # the usual case: exactly one whole message
            (n,) = LEN.unpack_from(data)
            if len(data) == LEN.size + n and n <= MAX_MESSAGE:
                return [unpack(memoryview(data)[LEN.size:])]
        self._buf += data
        out: list[dict] = []
        while len(self._buf) >= LEN.size:
            (n,) = LEN.unpack_from(self._buf)
            if n > MAX_MESSAGE:
                raise ProtocolError(f"IPC message of {n} bytes exceeds {MAX_MESSAGE}")
            if len(self._buf) < LEN.size + n:
                break
            body = bytes(self._buf[LEN.size : LEN.size + n])
            del self._buf[: LEN.size + n]
            out.append(unpack(body))
        return out


# ---- a shared state's description (the client's SharedState.describe()) -------------


def state_row(name: str, offset: int, nbytes: int, dtype: str, shape: tuple, unequal: bool) -> list:
    """One tensor of a shared-state description: where it lies in the segment and whether
    it is left out of the comparison (``allow_content_inequality``)."""
    return [name, offset, nbytes, dtype, list(shape), bool(unequal)]


def describe_state(segment: str, size: int, revision: int, rows: list[list]) -> dict[str, Any]:
    """The map a client sends for ``sync_shared_state``; :func:`layout_views` reads it."""
    return {"segment": segment, "size": size, "revision": revision, "tensors": [list(r) for r in rows]}


def layout_views(desc: Mapping[str, Any], segment: memoryview) -> list[tuple[str, memoryview, bool]]:
    """The daemon's reading of a :meth:`~pccl_py.client.shared_state.SharedState.describe` map: (name, byte view into ``segment``, allow_content_inequality) per tensor of
    ``describe()``'s map, with every offset and size checked against the segment."""
    rows = desc.get("tensors")
    if not isinstance(rows, list):
        raise InvalidUsage("shared-state description has no tensor list")
    size = len(segment)
    out = []
    seen = set()
    for row in rows:
        if not isinstance(row, (list, tuple)) or len(row) != 6:
            raise InvalidUsage("each shared-state tensor row is [name, offset, nbytes, dtype, shape, unequal]")
        name, off, nbytes, _dtype, _shape, unequal = row
        if not isinstance(name, str) or name in seen:
            raise InvalidUsage(f"bad or repeated tensor name {name!r}")
        if not isinstance(off, int) or not isinstance(nbytes, int) or off < 0 or nbytes < 0 or off + nbytes > size:
            raise InvalidUsage(f"tensor {name!r} [{off}, +{nbytes}) lies outside the {size}-byte segment")
        seen.add(name)
        out.append((name, segment[off:off + nbytes], bool(unequal)))
    return out
