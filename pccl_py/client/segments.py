"""The shared memory a client hands to its daemon: a pool of segments reused across calls,
and the arrays of :meth:`~pccl_py.client.Client.alloc` with their twins.

Every segment is mapped by the daemon (request ``map``) before a call names it. A segment
of a failed call is never used again (co-located peers may still be writing into it): it
is unlinked here and the daemon is asked to unmap it (:func:`unmap`).

A segment's name can vanish from /dev/shm while it is mapped here and in the daemon (a
tmpfs cleaner, another process): the daemon can no longer map it, nor can co-located
peers. So a segment is checked before each call: a pool segment without a name is dropped
for a fresh one; an ``alloc()`` array's twin is replaced; an ``alloc()`` array whose own
file lost its name is copied through the pool (warned once) until a call over the whole
array moves it into its twin (:meth:`Alloc.refresh`). A segment that vanishes before the
daemon maps it (``SegmentLost`` in the reply to ``map``) is replaced once
(:func:`fresh_segment`).

Pool segments that CUDA tensors are copied into are page-locked once for the GPU
(:class:`Pins`, ``cudaHostRegister``) and stay so while the pool reuses them; a segment is
unregistered before it is unmapped (``retire``, ``close``). ``alloc()`` arrays are never
registered: their pages move (``Alloc.swap``).
"""

from __future__ import annotations

import logging
import os
import threading
from multiprocessing import shared_memory

import numpy as np

from pccl_py.client.copies import copy_into
from pccl_py.client.rpc import Rpc
from pccl_py.errors import InvalidUsage, PcclError, SegmentLost
from pccl_py.transport.segments import create_segment, discard, named, unlinked
from pccl_py.wire import ipc

try:
    from pccl_py.kernels._native import map_at, remap
except ImportError:  # pragma: no cover - only without the extension: results are copied back
    map_at = remap = None

log = logging.getLogger("pccl.client")

PAGE = 4096
MIN_SEGMENT = 1 << 16
MAP_TIMEOUT = 10.0  # seconds the daemon may take to map or unmap a segment


def address(buf) -> int:
    return np.frombuffer(buf, np.uint8, 1).__array_interface__["data"][0]


def offset_near(user: np.ndarray, seg: shared_memory.SharedMemory, shift: int) -> int:
    """The offset in ``seg`` whose address is ``shift`` bytes past ``user``'s, modulo a page."""
    return (user.__array_interface__["data"][0] + shift - address(seg.buf)) % PAGE


def release(seg: shared_memory.SharedMemory) -> None:
    """Unlink a segment of ours; the mapping goes when the last view of it does."""
    try:
        seg.close()
    except BufferError:
        pass
    discard(seg)


def map_segment(rpc: Rpc, name: str, size: int) -> None:
    """Have the daemon map segment ``name`` of at least ``size`` bytes (calls may name it
    from then on)."""
    rpc.call({"op": "map", "name": name, "size": size}, timeout=MAP_TIMEOUT)


def fresh_segment(rpc: Rpc, size: int) -> shared_memory.SharedMemory:
    """A new segment of ``size`` bytes that the daemon has mapped. If its name vanished from
    /dev/shm before the daemon got to it (``SegmentLost``), it is dropped and a second one
    made; if that one vanishes too, the daemon evidently cannot see this process's
    /dev/shm: ``InvalidUsage``."""
    for attempt in range(2):
        seg = create_segment(size)
        try:
            map_segment(rpc, seg.name, size)
            return seg
        except SegmentLost as exc:
            release(seg)
            if attempt:
                raise InvalidUsage(
                    f"the daemon cannot map the shared memory this trainer creates (twice in a row the "
                    f"segment was not in its /dev/shm: {exc}). Do the trainer and its daemon share /dev/shm?"
                ) from exc
            log.warning("shared-memory segment %s vanished from /dev/shm before the daemon mapped it; "
                        "making a fresh one", seg.name)
        except BaseException:
            release(seg)
            raise
    raise AssertionError("unreachable")  # pragma: no cover


def unmap(rpc: Rpc, name: str) -> None:
    """Ask the daemon to unmap a segment this client dropped after a failed call."""
    try:
        rpc.call({"op": "unmap", "name": name}, timeout=MAP_TIMEOUT)
    except PcclError:
        pass  # the daemon is gone or stuck: the caller's error says so already


CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context of the process, not only the current one
_forks = 0  # bumped in a forked child: registrations made by the parent are not the child's


def _forked() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def _torch_cudart():
    import torch

    return torch.cuda.cudart()


class Pins:
    """Which pool segments are page-locked for CUDA copies (``cudaHostRegister``), so each
    is registered once and unregistered exactly once, before it is unmapped.

    The first failure to register (no CUDA, a kernel or ulimit that refuses to lock the
    pages) is logged once at INFO and turns registration off for this pool: CUDA tensors
    are then staged through pageable host memory, as without it. In a forked child the
    parent's registrations are forgotten, never unregistered (CUDA is not usable there)."""

    def __init__(self, cudart=None) -> None:
        self._rt = cudart  # () -> the CUDA runtime module; None: torch.cuda.cudart()
        self._addr: dict[str, int] = {}  # segment name -> registered address
        self._gen = _forks
        self.off = False  # registration failed once: not tried again
        self._lock = threading.Lock()

    def _cudart(self):
        return (self._rt or _torch_cudart)()

    def _fork_check(self) -> None:
        if self._gen != _forks:
            self._addr.clear()
            self._gen = _forks

    def pin(self, seg: shared_memory.SharedMemory) -> bool:
        """Page-lock ``seg`` (once); False when registration is off or fails."""
        with self._lock:
            self._fork_check()
            if seg.name in self._addr:
                return True
            if self.off:
                return False
            addr = address(seg.buf)
            try:
                rt = self._cudart()
                rc = int(rt.cudaHostRegister(addr, seg.size, CUDA_HOST_REGISTER_PORTABLE))
            except Exception as exc:  # no CUDA runtime in this torch, or it cannot start
                rc, why = -1, repr(exc)
            else:
                why = f"cudaHostRegister returned error {rc}"
            if rc != 0:
                self.off = True
                log.info("CUDA tensors are staged through pageable memory: the shared memory could not be "
                         "page-locked (%s)", why)
                _clear_cuda_error()
                return False
            self._addr[seg.name] = addr
            return True

    def pinned(self, seg: shared_memory.SharedMemory) -> bool:
        with self._lock:
            self._fork_check()
            return seg.name in self._addr

    def unpin(self, seg: shared_memory.SharedMemory) -> None:
        """Unregister ``seg`` if it is registered (before it is unmapped)."""
        with self._lock:
            self._fork_check()
            addr = self._addr.pop(seg.name, None)
            if addr is None:
                return
            try:
                rc = int(self._cudart().cudaHostUnregister(addr))
            except Exception as exc:  # pragma: no cover - the runtime went away
                rc = repr(exc)
            if rc != 0:
                log.warning("cudaHostUnregister of shared-memory segment %s failed (%s)", seg.name, rc)

    def count(self) -> int:
        with self._lock:
            self._fork_check()
            return len(self._addr)


def _clear_cuda_error() -> None:
    """A failed runtime call is also CUDA's "last error", which torch's next kernel launch
    would report as its own: one harmless launch takes it here."""
    try:
        import torch

        if torch.cuda.is_initialized():
            torch.zeros(1, device="cuda")
    except Exception:
        pass


class Pool:
    """Shared-memory segments reused across calls (a fresh segment costs page faults)."""

    def __init__(self, rpc: Rpc, pins: Pins | None = None) -> None:
        self.rpc = rpc
        self.pins = pins if pins is not None else Pins()
        self.free: dict[int, list[shared_memory.SharedMemory]] = {}
        self.all: list[shared_memory.SharedMemory] = []
        self._lock = threading.Lock()  # calls of several threads take and give segments

    def take(self, nbytes: int) -> shared_memory.SharedMemory:
        """A mapped segment of at least ``nbytes``: a free one whose name is still in
        /dev/shm (others are dropped), else a fresh one."""
        size = MIN_SEGMENT
        while size < nbytes:
            size *= 2
        while True:
            with self._lock:
                bucket = self.free.setdefault(size, [])
                seg = bucket.pop() if bucket else None
            if seg is None:
                break
            if not unlinked(seg):
                return seg
            log.warning("shared-memory segment %s was removed from /dev/shm (peers could not map it); "
                        "using a fresh one", seg.name)
            self.retire(seg)
        seg = fresh_segment(self.rpc, size)
        with self._lock:
            self.all.append(seg)
        return seg

    def give(self, seg: shared_memory.SharedMemory) -> None:
        with self._lock:
            self.free.setdefault(seg.size, []).append(seg)

    def retire(self, seg: shared_memory.SharedMemory) -> None:
        """Drop the segment of a failed call: unlinked here and unmapped by the daemon."""
        with self._lock:
            self.all.remove(seg)
        self.pins.unpin(seg)
        release(seg)
        unmap(self.rpc, seg.name)

    def close(self) -> None:
        with self._lock:
            for seg in self.all:
                self.pins.unpin(seg)
                release(seg)
            self.all.clear()
            self.free.clear()


class Alloc:
    """The shared memory behind one :meth:`Client.alloc` array, and its twin.

    The array lives at ``base``; the file mapped there is ``cur``. A call over the whole
    array reads ``cur`` and writes its result into the twin (the file ``spare``, mapped at
    ``spare_addr``). On success the twin's pages are moved to ``base`` (``mremap``), so the
    array holds the result without a copy, and ``cur`` is mapped where the twin was: the
    two files swap roles. On failure the array is untouched; the twin, which co-located
    peers may still be writing into, is replaced by a fresh segment. The two
    ``SharedMemory`` objects made first keep owning the two address ranges (they unmap
    them when closed); which file is mapped in each is tracked by name here.

    If the name of ``cur`` vanishes from /dev/shm, peers cannot map the array (``lost``):
    a call over the whole array then copies it into the twin and is reduced in place
    there, and on success the twin's pages take the array's address as usual, so the array
    lives in a named file again and a fresh twin is made; other calls copy through a pool
    segment, like a plain array's."""

    @classmethod
    def create(cls, rpc: Rpc, nbytes: int, double_buffer: bool) -> Alloc:
        """A fresh, mapped allocation of ``nbytes``; with ``double_buffer`` a twin too, when
        the extension can move pages and the array is too large to travel inline."""
        seg = fresh_segment(rpc, max(nbytes, 1))
        rec = cls(rpc, seg, nbytes)
        if double_buffer and remap is not None and nbytes > ipc.INLINE_BYTES:
            try:
                rec.add_twin()
            except BaseException:
                rec.close()
                raise
        return rec

    def __init__(self, rpc: Rpc, seg: shared_memory.SharedMemory, nbytes: int) -> None:
        self.rpc = rpc
        self.nbytes = nbytes
        self.base = address(seg.buf)
        self.span = -(-seg.size // PAGE) * PAGE
        self.owners = [seg]
        self.segs = {seg.name: seg}  # every live file of this allocation, by name
        self.cur = seg.name
        self.spare: str | None = None
        self.spare_addr = 0
        self.busy = False  # a call is writing the twin (or it is unusable)
        self.lost = False  # the name of ``cur`` is gone from /dev/shm: peers cannot map the array
        self._lock = threading.Lock()

    @property
    def buf(self) -> memoryview:
        """The array's memory."""
        return self.owners[0].buf

    @property
    def twin_buf(self) -> memoryview:
        """The memory at the twin's address."""
        return self.owners[1].buf

    def add_twin(self) -> None:
        twin = fresh_segment(self.rpc, self.owners[0].size)
        self.owners.append(twin)
        self.segs[twin.name] = twin
        self.spare, self.spare_addr = twin.name, address(twin.buf)

    def refresh(self) -> None:
        """Before a call: replace a twin whose name is gone from /dev/shm (peers write the
        result into it by name), and notice an array file whose name is gone (``lost``,
        warned once)."""
        if self.spare is not None and not named(self.spare) and self.take():
            log.warning("alloc(): the twin %s of an array was removed from /dev/shm; making a fresh one",
                        self.spare)
            self.retire()
        if not self.lost and not named(self.cur):
            self.lost = True
            log.warning("alloc(): the shared memory %s of a %d-byte array was removed from /dev/shm, so "
                        "peers cannot map it; its calls copy it through a fresh segment%s", self.cur,
                        self.nbytes, " until a call over the whole array moves it into its twin"
                        if self.spare is not None else "")

    def take(self) -> bool:
        """Reserve the twin for one call (False: none, or another call uses it)."""
        with self._lock:
            if self.spare is None or self.busy:
                return False
            self.busy = True
            return True

    def swap(self) -> None:
        """The call succeeded: its result (the twin) takes the array's address."""
        try:
            remap(self.spare_addr, self.base, self.span)
        except OSError:  # the result stays where it is: copy it, as without a twin
            # mremap(MREMAP_FIXED) unmaps the destination before it moves the pages, and a
            # move that then fails (ENOMEM: the process's map count) leaves the array's
            # range empty: copying into it would crash. Map the array's file there again.
            try:
                self._map(self.cur, self.base)
            except OSError:  # its name is gone too: zero pages keep the range, the array copies
                self._hold(self.base)
                self.lost = True
            copy_into(self.owners[0].buf[:self.nbytes], self.owners[1].buf[:self.nbytes])
            self.busy = False
            return
        old, self.cur, self.lost = self.cur, self.spare, False  # the array is the twin's file now
        try:
            self._map(old, self.spare_addr)
        except OSError:
            # The old file has no name left (or cannot be mapped): a fresh twin takes its
            # place. Until then the range stays ours, else the fresh segment's own mapping
            # could land there and take the range with it when closed.
            self._hold(self.spare_addr)
            self.spare = old
            self.retire()
            return
        self.spare = old
        self.busy = False

    def release(self) -> None:
        """The call ended without a result for this array (another part of it failed)."""
        self.busy = False

    def retire(self) -> None:
        """The call failed: a peer may still write into the twin, so it is dropped (unlinked
        here and unmapped by the daemon) and a fresh segment takes its place. (Also for a
        twin, or a file that was to become one, whose name is gone from /dev/shm.)"""
        old = self.spare
        try:
            fresh = fresh_segment(self.rpc, self.owners[0].size)
            self.segs[fresh.name] = fresh
            self._map(fresh.name, self.spare_addr)
            fresh.close()  # its own mapping; the file stays mapped where the twin was (and named, for unlink)
            self.spare = fresh.name
            self.busy = False
        except (PcclError, OSError) as exc:
            log.warning("alloc(): no fresh twin (%s); results are copied from now on", exc)
            self.spare = None
        self._drop(old)

    def _hold(self, addr: int) -> None:
        """Keep the range at ``addr`` mapped (zero pages that cost nothing until touched)."""
        try:
            fd = os.open("/dev/zero", os.O_RDWR)
        except OSError:  # pragma: no cover - no /dev/zero
            return
        try:
            map_at(addr, self.span, fd)
        except OSError:  # pragma: no cover
            pass
        finally:
            os.close(fd)

    def _map(self, name: str, addr: int) -> None:
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
        try:
            map_at(addr, self.span, fd)
        finally:
            os.close(fd)

    def _drop(self, name: str | None) -> None:
        seg = self.segs.pop(name, None) if name is not None else None
        if seg is None:
            return
        discard(seg)
        unmap(self.rpc, name)

    def close(self) -> None:
        for seg in self.segs.values():
            discard(seg)
        for seg in self.owners:
            try:
                seg.close()
            except BufferError:  # the caller still holds the array: the mapping goes with it
                pass
        self.segs.clear()
