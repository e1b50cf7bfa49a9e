"""Shared-memory segments: how tensors cross between a trainer and its daemon, and between
daemons of one host (:mod:`pccl_py.collectives.shm`), without passing through a socket.

The client creates (and owns) every segment; daemons attach to it without owning it.
Anything may remove a segment's name from /dev/shm while its processes keep it mapped (a
tmpfs cleaner, another process): nobody else can map it by name then. Owners check with
:func:`unlinked` and replace such a segment; :func:`named` asks by name.
"""

from __future__ import annotations

import errno
import mmap
import os
import uuid
from multiprocessing import resource_tracker, shared_memory

try:
    import _posixshmem
except ImportError:  # pragma: no cover - not POSIX
    _posixshmem = None

from pccl_py.errors import InvalidUsage, ProtocolError


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


def unlinked(seg: shared_memory.SharedMemory) -> bool:
    """Whether the name of ``seg``, a segment this process created and still holds open, is
    gone from /dev/shm (one fstat: the file has no link left)."""
    fd = getattr(seg, "_fd", -1)
    try:
        return fd >= 0 and os.fstat(fd).st_nlink == 0
    except OSError:
        return False


def named(name: str) -> bool:
    """Whether /dev/shm has a segment called ``name`` (an open and a close)."""
    if _posixshmem is None:  # pragma: no cover - not POSIX
        return True
    try:
        fd = _posixshmem.shm_open("/" + name.lstrip("/"), os.O_RDONLY, mode=0)
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True  # there, whatever else is wrong with it
    os.close(fd)
    return True


def discard(seg: shared_memory.SharedMemory) -> None:
    """Unlink a segment this process created, if its name is still there, and untrack it
    either way (else Python's resource tracker warns at exit about a segment someone else
    removed). The mapping stays until ``seg.close()`` and the last view."""
    try:
        seg.unlink()
    except FileNotFoundError:
        try:
            resource_tracker.unregister(getattr(seg, "_name", "/" + seg.name), "shared_memory")
        except Exception:  # pragma: no cover - best effort
            pass
