"""The local plane between a trainer's :class:`~pccl_py.client.Client` and its daemon.

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

import errno
import mmap
import os
import struct
import uuid
from multiprocessing import shared_memory

try:
    import _posixshmem
except ImportError:  # pragma: no cover - not POSIX
    _posixshmem = None

import msgpack

from .errors import InvalidUsage, ProtocolError

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
        raise ProtocolError(f"undecodable local message: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("local message is not a map")
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
                raise ProtocolError(f"local message of {n} bytes exceeds {MAX_MESSAGE}")
            if len(self._buf) < LEN.size + n:
                break
            body = bytes(self._buf[LEN.size : LEN.size + n])
            del self._buf[: LEN.size + n]
            out.append(unpack(body))
        return out


class Mapping:
    """A shared-memory segment created by someone else, mapped here without owning it.

    Unlike ``SharedMemory(name=...)``, attaching does not involve Python's resource tracker
    (which would start a tracker process in the daemon, and unlink the segment when this
    process exits). ``close()`` unmaps once no view is left, else when the last view dies.
    """

    def __init__(self, name: str, *, writable: bool = True) -> None:
        if _posixshmem is None:  # pragma: no cover - not POSIX
            raise ProtocolError("shared memory needs a POSIX system")
        self.name = name.lstrip("/")
        fd = _posixshmem.shm_open("/" + self.name, os.O_RDWR if writable else os.O_RDONLY, mode=0)
        try:
            self.size = os.fstat(fd).st_size
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._mmap: mmap.mmap | None = mmap.mmap(fd, self.size, prot=prot) if self.size else None
        finally:
            os.close(fd)
        self.buf = memoryview(self._mmap) if self._mmap is not None else memoryview(b"")

    def close(self) -> None:
        try:
            self.buf.release()
        except BufferError:  # arrays made from it are alive: the mapping goes with them
            self._mmap = None
            return
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a view is still alive: unmapped with the last one
                pass
            self._mmap = None


def create_segment(size: int, name: str | None = None, prefix: str = "pccl_") -> shared_memory.SharedMemory:
    """A new shared-memory segment of ``size`` bytes whose pages are all reserved now.

    A segment is a sparse file in /dev/shm (tmpfs): without the reservation, the first
    write to a page that /dev/shm has no room for kills the writer with SIGBUS, and the
    writer may be a peer's daemon storing its chunk of a result. Reserving up front turns
    that into an ``InvalidUsage`` here, before anyone maps the segment. The name is
    ``name``, else ``prefix`` and a random suffix."""
    seg = shared_memory.SharedMemory(create=True, size=size, name=name or f"{prefix}{uuid.uuid4().hex[:16]}")
    fd = getattr(seg, "_fd", -1)
    try:
        if fd >= 0 and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return seg  # a file system that cannot reserve: pages come on first write, as before
        seg.close()
        seg.unlink()
        try:
            free = os.statvfs("/dev/shm")
            room = f"{free.f_bavail * free.f_frsize} bytes free"
        except OSError:
            room = "free space unknown"
        raise InvalidUsage(
            f"/dev/shm has no room for a {size}-byte shared-memory segment ({room}): tensors reach "
            f"the daemon through it. Give it more (a container: docker run --shm-size=...; a "
            f"host: mount -o remount,size=... /dev/shm) or all-reduce smaller tensors per call") from None
    return seg


def attach_segment(name: str) -> Mapping:
    """Map a segment created by the client (the client owns its lifetime)."""
    return Mapping(name)
