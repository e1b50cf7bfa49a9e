"""All-reduce through shared memory, for a group whose daemons all run on one host.

Every tensor a daemon reduces already lives in a shared-memory segment (the trainer put
it there), so co-located daemons need not send payload bytes at all: each maps its
peers' input regions read-only and their output regions writable. Small control frames
over the existing TCP links order the two phases:

1. READY: each peer tells the others where its input and output are (segment names and
   offsets) and which lease guards them (below).
2. Reduce and scatter: once every READY is in, peer i owns chunk i of the N near-equal
   chunks. Block by block (a block stays in cache), it folds the N inputs' block in rank
   order 0, 1, ..., N-1 into a scratch block, then copies that block into every output,
   its own included (an output may be its input: a client reduces plain arrays in
   place). Each chunk is computed once, by its owner, and every peer receives the
   owner's bytes, so every peer ends with the same bits. Then it checks the leases and
   sets its bit in rank 0's arrival mask (an atomic word in rank 0's lease slot). The
   peer whose bit completes the mask knows that every peer has written its chunk into
   every output and stopped reading every input: it sends FIN_ALL to the others, N-1
   frames where a FIN round would send N(N-1) (``Collective.complete_all``). A lost
   peer whose bit is set costs the call nothing (``peer_lost``).

Leases. A daemon's input and output stay untouched while its call runs, and it hands
them back to the trainer only when the call ends, successfully or not. A peer that read
them cannot tell by itself whether that happened before its read finished (the owner
may have failed the call, its trainer may already have written the next input). So each
call holds a lease: a random nonce in a slot of the owner's lease segment, written when
the call starts and cleared (with a fence) before the call ends. A peer checks, with a
fence after its reads and writes, that every peer's nonce is still in place before it
records its chunk; a cleared lease fails the call here too, so nobody succeeds with torn
data. Rank 0's arrival word carries the low 32 bits of its nonce: a peer never marks the
mask of another call (the slot may serve one by then).
Writes can land in the output of a call that has already failed: the client never reuses
the segment of a failed call (it retires it), so such writes reach nobody.

Segments are mapped by name, and a name can vanish from /dev/shm (a tmpfs cleaner, another
process, or the owner retiring the segment of a call that failed there). A peer that
cannot find a segment named in a READY fails the call with ``SegmentLost``, retryable:
the owner replaces it (a trainer its pool segment, a daemon its lease segment at the next
call, :meth:`ShmContext.acquire`), so the retry maps fresh names.

Heavy loops (the fold and the copies, which release the GIL) run on one worker thread so
the event loop keeps serving heartbeats and other calls; small ones run inline.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import re
from multiprocessing import shared_memory

import msgpack

from pccl_py import kernels as K
from pccl_py.collectives.base import Collective, Rx, expect, split
from pccl_py.errors import Aborted, InvalidUsage, PcclError, ProtocolError, SegmentLost
from pccl_py.transport.segments import Mapping, create_segment, discard, unlinked
from pccl_py.wire import frames as F

log = logging.getLogger("pccl.dataplane")

READY = 0
VERSION = 3  # part of the call descriptor: peers of other versions refuse each other's calls
LEASE_SLOTS = 1024
SLOT = 16  # bytes of a lease slot: the nonce, then the arrivals (rank 0's records who folded)
MAX_WORLD = 32  # ranks an arrival mask holds; larger co-located groups use the ring
_IDENT = (1 << 32) - 1
_NAME = re.compile(r"pccl_[A-Za-z0-9_]{1,80}")
_MAX_READY = 1024  # bytes of one READY payload
_BLOCK = 512 << 10  # fold this many bytes of all inputs at a time (stays in cache)
_INLINE = 32 << 20  # loops over fewer bytes run on the event loop (a thread hop costs ~0.3 ms)
_MAPS_PER_PEER = 16  # (segment, writable) mappings kept per peer


def attach_peer(name: str, writable: bool = False) -> Mapping:
    """Map another process's shared-memory segment, without owning it."""
    if not _NAME.fullmatch(name):
        raise InvalidUsage(f"refusing to map segment {name!r}: not a pccl segment name")
    return Mapping(name, writable=writable)


class ShmContext:
    """Per-data-plane state of the shared-memory path: leases, peers' mappings, worker thread."""

    def __init__(self) -> None:
        self._lease_seg: shared_memory.SharedMemory | None = None
        self._free: list[int] = []
        # lease segments replaced while calls still held slots in them: name -> (segment, slots held)
        self._old_leases: dict[str, tuple[shared_memory.SharedMemory, int]] = {}
        self._maps: dict[str, collections.OrderedDict[tuple[str, bool], Mapping]] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        # fold buffers: one for the event loop, one for the worker thread (8-byte multiple,
        # so a block is whole elements of every dtype)
        self._scratch = (memoryview(bytearray(_BLOCK)), memoryview(bytearray(_BLOCK)))

    # -- leases --------------------------------------------------------------------------
    def lease_buf(self, name: str) -> memoryview:
        """The buffer of our lease segment ``name`` (the current one, or one replaced while a
        call held a slot in it)."""
        if name in self._old_leases:
            return self._old_leases[name][0].buf
        return self._lease_seg.buf

    @property
    def lease_name(self) -> str:
        if self._lease_seg is not None and unlinked(self._lease_seg):
            # its name is gone from /dev/shm: peers could not map it by name any more
            self._replace_lease()
        if self._lease_seg is None:
            # zero-filled, and its pages reserved (a full /dev/shm is an error, not a SIGBUS)
            self._lease_seg = create_segment(LEASE_SLOTS * SLOT, prefix="pccl_lease_")
            self._free = list(range(LEASE_SLOTS - 1, -1, -1))
        return self._lease_seg.name.lstrip("/")

    def _replace_lease(self) -> None:
        """Give up the current lease segment (a fresh one is made next); calls holding a slot
        in it keep using it until they end."""
        seg, held = self._lease_seg, LEASE_SLOTS - len(self._free)
        self._lease_seg, self._free = None, []
        log.warning("lease segment %s was removed from /dev/shm; using a fresh one", seg.name.lstrip("/"))
        if held:
            self._old_leases[seg.name.lstrip("/")] = (seg, held)
        else:
            _close_lease(seg)

    def acquire(self) -> tuple[str, int, int]:
        name = self.lease_name
        if not self._free:
            raise InvalidUsage(f"more than {LEASE_SLOTS} shared-memory all-reduces in flight")
        slot = self._free.pop()
        nonce = int.from_bytes(os.urandom(8), "little") | 1
        K.store_u64(self._lease_seg.buf, slot * SLOT + 8, (nonce & _IDENT) << 32)  # arrivals: nobody yet
        K.store_u64(self._lease_seg.buf, slot * SLOT, nonce)
        return name, slot, nonce

    def release(self, slot: int, name: str | None = None) -> None:
        """Clear the lease in ``slot`` of lease segment ``name`` (the current one if None)."""
        if self._closed:
            return
        old = self._old_leases.get(name) if name is not None else None
        if old is not None:
            seg, held = old
            K.store_u64(seg.buf, slot * SLOT, 0)
            if held > 1:
                self._old_leases[name] = (seg, held - 1)
            else:
                del self._old_leases[name]
                _close_lease(seg)
            return
        if self._lease_seg is not None and (name is None or name == self._lease_seg.name.lstrip("/")):
            # the arrivals stay: a peer that lost the one who completed them still reads them
            # (a new call on this slot replaces them with its own ident)
            K.store_u64(self._lease_seg.buf, slot * SLOT, 0)
            self._free.append(slot)

    # -- peers' segments -----------------------------------------------------------------
    def view(self, peer_id: str, name: str, offset: int, nbytes: int, writable: bool = False) -> memoryview:
        """View of ``nbytes`` at ``offset`` of a peer's segment (mapped once, cached).
        A name missing from /dev/shm fails the call with ``SegmentLost`` (retryable): a
        client retires the segment of a call that failed there, and anything may remove a
        name from /dev/shm (its owner then replaces the segment). Only if it happens on
        every call do the daemons not share /dev/shm (the message says so)."""
        maps = self._maps.setdefault(peer_id, collections.OrderedDict())
        key = (name, writable)
        mm = maps.get(key)
        if mm is None:
            try:
                mm = attach_peer(name, writable)
            except (OSError, ValueError, ProtocolError) as e:
                if isinstance(e, FileNotFoundError):
                    raise SegmentLost(
                        f"peer {peer_id}'s shared memory {name} is not in /dev/shm (its call ended there, or "
                        f"something removed it): this call fails; a retry maps the fresh one that replaces it. "
                        f"If every call fails so, the daemons do not share /dev/shm: start them with --no-shm",
                        segment=name) from None
                raise InvalidUsage(
                    f"cannot map peer {peer_id}'s shared memory {name}: {e}. Daemons that share an "
                    f"address but not /dev/shm need the TCP path: start them with --no-shm") from None
            maps[key] = mm
            while len(maps) > _MAPS_PER_PEER:
                maps.popitem(last=False)[1].close()
        else:
            maps.move_to_end(key)
        if offset < 0 or nbytes < 0 or offset + nbytes > mm.size:
            raise InvalidUsage(f"peer {peer_id} named bytes {offset}..{offset + nbytes} of a "
                               f"{mm.size}-byte segment")
        return mm.buf[offset:offset + nbytes]

    def forget(self, keep: set[str]) -> None:
        """Unmap the segments of peers not in ``keep``."""
        for pid in [p for p in self._maps if p not in keep]:
            for mm in self._maps.pop(pid).values():
                mm.close()

    # -- work ----------------------------------------------------------------------------
    def run(self, loop, nbytes: int, fn, done) -> None:
        """Call ``fn(scratch)`` then ``done(exc_or_None)``: inline when small, else on the
        worker thread. ``scratch`` is a block-sized buffer of whichever thread runs it."""
        if nbytes < _INLINE:
            try:
                fn(self._scratch[0])
            except Exception as e:  # pragma: no cover - a bug
                done(e)
                return
            done(None)
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pccl-shm")
        fut = loop.run_in_executor(self._pool, fn, self._scratch[1])
        fut.add_done_callback(lambda f: done(f.exception()))

    def close(self) -> None:
        self._closed = True
        self.forget(set())
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        if self._lease_seg is not None:
            seg, self._lease_seg = self._lease_seg, None
            _close_lease(seg)
        for seg, _ in self._old_leases.values():
            _close_lease(seg)
        self._old_leases.clear()


def _close_lease(seg: shared_memory.SharedMemory) -> None:
    """Unlink (if still named) and unmap one of our lease segments."""
    try:
        discard(seg)
    except OSError:
        pass
    try:
        seg.close()
    except BufferError:  # a view is still alive: unmapped with it
        pass


class ShmAllReduce(Collective):
    fin_all = True
    name = "shm"

    def __init__(self, link, *, src, dst, dtype: str, op: str, count: int, refs: tuple, ctx: ShmContext,
                 loop, **kw):
        super().__init__(link, loop=loop, **kw)
        self.loop = loop
        self.ctx = ctx
        self.dtype, self.op = dtype, op
        self.item = K.itemsize(dtype)
        self.nbytes = count * self.item
        self.src, self.dst = src, dst
        self.refs = refs
        w = link.world
        self.bounds = [b * self.item for b in split(count, w)]
        self.peers: dict[int, tuple] = {}  # rank -> (src view, dst view, lease view, slot, nonce)
        self.lease: tuple[str, int, int] | None = None
        self._folding = False

    def chunk(self, r: int) -> tuple[int, int]:
        return self.bounds[r], self.bounds[r + 1]

    # -- phases ----------------------------------------------------------------------------
    def start(self) -> None:
        self.started = True
        self.lease = self.ctx.acquire()
        sname, soff, dname, doff = self.refs
        payload = msgpack.packb([sname, soff, dname, doff, *self.lease])
        lk = self.link
        for r in range(lk.world):
            if r != lk.rank:
                self.send_data(r, 0, READY, 0, payload, 0)
        self._maybe_fold()

    def on_data(self, src: int, h: F.Header, conn) -> Rx:
        self.check_desc(src, h)
        expect(h.quant == F.QUANT_NONE and h.offset == 0, "unexpected shared-memory all-reduce frame")
        expect(h.step == READY and 0 < h.length <= _MAX_READY and src not in self.peers, "bad READY frame")
        self.count_rx(h, 0)
        buf = bytearray(h.length)
        return Rx(memoryview(buf), None, lambda: self._on_ready(src, bytes(buf)))

    def _on_ready(self, src: int, payload: bytes) -> None:
        try:
            sname, soff, dname, doff, lname, slot, nonce = msgpack.unpackb(payload)
            ok = all(isinstance(x, str) for x in (sname, dname, lname)) and all(
                isinstance(x, int) for x in (soff, doff, slot, nonce))
        except (ValueError, TypeError, msgpack.UnpackException):
            ok = False
        if not ok or not 0 <= slot < LEASE_SLOTS:
            raise InvalidUsage(f"peer rank {src} sent a malformed READY")
        pid = self.link.ids[src]
        self.peers[src] = (self.ctx.view(pid, sname, soff, self.nbytes),
                           self.ctx.view(pid, dname, doff, self.nbytes, writable=True),
                           # rank 0's lease segment holds the arrival mask every peer marks
                           self.ctx.view(pid, lname, 0, LEASE_SLOTS * SLOT, writable=src == 0),
                           slot * SLOT, nonce)
        self._maybe_fold()

    def _maybe_fold(self) -> None:
        if self._folding or not self.started or len(self.peers) < self.link.world - 1 or self.done:
            return
        self._folding = True
        me, w = self.link.rank, self.link.world
        a, b = self.chunk(me)
        srcs = [(self.src if r == me else self.peers[r][0])[a:b] for r in range(w)]
        outs = [(self.dst if r == me else self.peers[r][1])[a:b] for r in range(w)]
        # A peer's output may be its input (an in-place call): ``fold`` reads each block of
        # every input before it writes any output, and only this owner touches these bytes.
        self.ctx.run(self.loop, (b - a) * 2 * w, lambda scratch: K.fold(srcs, outs, self.op, self.dtype, scratch),
                     self._folded_cb)

    def _folded_cb(self, exc) -> None:
        if self.done:
            return
        if exc is not None:
            self._internal(exc)
            return
        # Once the chunk is recorded, peers may end and clear their leases: check exactly once, here.
        for r, (_, _, lease, off, nonce) in self.peers.items():
            seen = K.load_u64(lease, off)
            if seen != nonce:
                self._fail_here(Aborted(f"peer rank {r} ended tag {self.tag} while its memory was "
                                         f"being read and written; its result here would be torn (lease {off // SLOT}: "
                                         f"{seen:#x}, expected {nonce:#x})"))
                return
        self._arrive()

    @property
    def _everyone(self) -> int:
        """The arrival mask once every rank has recorded its chunk."""
        return (1 << self.link.world) - 1

    def _arrivals(self) -> tuple[memoryview, int, int]:
        """Rank 0's arrival word for this call: (buffer, offset, ident)."""
        if self.link.rank == 0:
            return self.ctx.lease_buf(self.lease[0]), self.lease[1] * SLOT + 8, self.lease[2] & _IDENT
        _, _, lease, off, nonce = self.peers[0]
        return lease, off + 8, nonce & _IDENT

    def _arrive(self) -> None:
        """Record on rank 0's arrival mask that this peer's chunk is in every output. Whoever
        completes the mask tells every peer at once (one FIN_ALL each) that all outputs are
        complete; the others wait for it. N-1 frames in all instead of the N(N-1) FINs of
        the usual round."""
        buf, off, ident = self._arrivals()
        mask = K.arrive(buf, off, ident, self.link.rank)
        if mask < 0:
            self._fail_here(Aborted(f"rank 0 ended tag {self.tag} before every chunk was reduced"))
            return
        self.data_done = True
        if mask == self._everyone:
            self.complete_all()

    def peer_lost(self, rank: int) -> bool:
        """A peer whose READY we hold and whose bit is in the mask has written its chunk
        everywhere and stopped reading: losing it costs this call nothing (its memory stays
        mapped here for our own fold). If the mask is full, the peer that completed it may be
        the one lost before its FIN_ALL reached us: every output is complete, so the call
        succeeds here as it does everywhere else."""
        if rank in self._fins or rank not in self.peers or self.lease is None:
            return super().peer_lost(rank)
        buf, off, ident = self._arrivals()
        word = K.load_u64(buf, off)
        if word >> 32 != ident or not word >> rank & 1:
            return True
        if self.data_done and word & _IDENT == self._everyone:
            self.all_done()
        return False

    def _internal(self, exc: BaseException) -> None:
        if not isinstance(exc, PcclError):  # pragma: no cover - a bug
            log.error("shared-memory all-reduce failed: %r", exc)
            exc = Aborted(f"internal error in the shared-memory all-reduce: {exc!r}")
        self._fail_here(exc)

    def _fail_here(self, exc: PcclError) -> None:
        """Fail here and tell the peers (they would otherwise wait for our bit)."""
        self.link.fail_here(self, exc)

    def finished(self) -> None:
        """The call ended (either way): give the lease back, so readers stop trusting our memory."""
        if self.lease is not None:
            self.ctx.release(self.lease[1], self.lease[0])
            self.lease = None
