"""The trainer-side API: a thin client of its peer daemon.

    with Client(coordinator="10.0.0.1:48148") as c:   # spawns a private daemon
        c.connect()
        info = c.all_reduce(grad, op="avg")

Everything networked happens in the daemon; this class only sends small requests over a
unix socket and copies tensors into and out of shared memory.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np

from pccl_py import calls
from pccl_py import kernels as K
from pccl_py.client.shared_state import SharedState
from pccl_py.client.tensors import Flat, flat, numpy_dtype
from pccl_py.errors import (
    Aborted,
    CoordinatorUnavailable,
    DeadlineExceeded,
    InvalidUsage,
    PcclError,
    PeerLost,
    from_wire,
)
from pccl_py.retry import Backoff
from pccl_py.transport import segments
from pccl_py.wire import ipc

log = logging.getLogger("pccl_py.client")

SLACK = 5.0  # the daemon enforces deadlines; the client waits this much longer before giving up
MIN_SEGMENT = 1 << 16
RECV_SLICE = 0.25  # seconds a wait for the daemon blocks before it checks its deadline


PAGE = 4096


# Results of at least this many bytes are copied back with stores that bypass the cache:
# they do not read the destination's lines first nor evict what the cache holds.
# `pccl bench kernels --size-mib 1|4|64`, row copy_stream against numpy's copy: 1.48x,
# 1.70x, 1.39x on the 2-core AMD VM; 0.73x, 1.08x, 1.17x on an Intel Xeon host pinned
# to 2 cores, where a 1 MiB destination stays in cache
STREAM_MIN = 4 << 20

# Copies of at least this many bytes are split over threads (the kernels release the GIL)
# on machines with more than two CPUs: one core's copy reaches a fraction of the memory
# bandwidth of a server.
PARALLEL_COPY_MIN = 16 << 20
_COPY_PIECE = 4 << 20
_copiers: ThreadPoolExecutor | None = None
_copiers_lock = threading.Lock()


def _forget_copiers() -> None:
    global _copiers
    _copiers = None  # a forked child has the pool object but none of its threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_copiers)


def _copy_threads() -> int:
    cpus = K.usable_cpus()
    return 0 if cpus <= 2 else min(8, cpus // 2)


def copy_into(dst, src, stream: bool = False) -> None:
    """dst[:] = src for byte buffers of one size: large ones split over a few threads."""
    global _copiers
    fn = K.copy_stream if stream else K.copy
    n = len(dst)
    threads = _copy_threads() if n >= PARALLEL_COPY_MIN else 0
    if not threads:
        fn(dst, src)
        return
    with _copiers_lock:
        if _copiers is None:
            _copiers = ThreadPoolExecutor(threads, thread_name_prefix="pccl-copy")
    d, s_ = memoryview(dst).cast("B"), memoryview(src).cast("B")
    step = max(_COPY_PIECE, -(-n // threads))
    jobs = [_copiers.submit(fn, d[a:a + step], s_[a:a + step]) for a in range(step, n, step)]
    fn(d[:step], s_[:step])  # the caller's thread takes the first piece
    for j in jobs:
        j.result()


class _NoAnswer(DeadlineExceeded):
    """The daemon sent no reply before the client's own deadline (timeout + SLACK)."""


def _address(buf) -> int:
    return np.frombuffer(buf, np.uint8, 1).__array_interface__["data"][0]


def _offset_near(user: np.ndarray, seg: shared_memory.SharedMemory, shift: int) -> int:
    """The offset in ``seg`` whose address is ``shift`` bytes past ``user``'s, modulo a page."""
    return (user.__array_interface__["data"][0] + shift - _address(seg.buf)) % PAGE


def _release(seg: shared_memory.SharedMemory) -> None:
    """Unlink a segment of ours; the mapping goes when the last view of it does."""
    try:
        seg.close()
    except BufferError:
        pass
    try:
        seg.unlink()
    except FileNotFoundError:
        pass


class _Pool:
    """Shared-memory segments reused across calls (a fresh segment costs page faults)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.free: dict[int, list[shared_memory.SharedMemory]] = {}
        self.all: list[shared_memory.SharedMemory] = []
        self._lock = threading.Lock()  # calls of several threads take and give segments

    def take(self, nbytes: int) -> shared_memory.SharedMemory:
        size = MIN_SEGMENT
        while size < nbytes:
            size *= 2
        with self._lock:
            bucket = self.free.setdefault(size, [])
            if bucket:
                return bucket.pop()
            seg = segments.create_segment(size)
            self.all.append(seg)
        self.client._call({"op": "map", "name": seg.name, "size": size}, timeout=10.0)
        return seg

    def give(self, seg: shared_memory.SharedMemory) -> None:
        with self._lock:
            self.free.setdefault(seg.size, []).append(seg)

    def retire(self, seg: shared_memory.SharedMemory) -> None:
        """Drop the segment of a failed call: unlinked here and unmapped by the daemon."""
        with self._lock:
            self.all.remove(seg)
        _release(seg)
        self.client._unmap(seg.name)

    def close(self) -> None:
        with self._lock:
            for seg in self.all:
                _release(seg)
            self.all.clear()
            self.free.clear()


try:
    from pccl_py.kernels._native import map_at, remap
except ImportError:  # pragma: no cover - only without the extension: results are copied back
    map_at = remap = None


class _Alloc:
    """The shared memory behind one :meth:`Client.alloc` array, and its twin.

    The array lives at ``base``; the file mapped there is ``cur``. A call over the whole
    array reads ``cur`` and writes its result into the twin (the file ``spare``, mapped at
    ``spare_addr``). On success the twin's pages are moved to ``base`` (``mremap``), so the
    array holds the result without a copy, and ``cur`` is mapped where the twin was: the
    two files swap roles. On failure the array is untouched; the twin, which co-located
    peers may still be writing into, is replaced by a fresh segment. The two
    ``SharedMemory`` objects made first keep owning the two address ranges (they unmap
    them when closed); which file is mapped in each is tracked by name here."""

    def __init__(self, client: Client, seg: shared_memory.SharedMemory, nbytes: int) -> None:
        self.client = client
        self.nbytes = nbytes
        self.base = _address(seg.buf)
        self.span = -(-seg.size // PAGE) * PAGE
        self.owners = [seg]
        self.segs = {seg.name: seg}  # every live file of this allocation, by name
        self.cur = seg.name
        self.spare: str | None = None
        self.spare_addr = 0
        self.busy = False  # a call is writing the twin (or it is unusable)
        self._lock = threading.Lock()

    def add_twin(self) -> None:
        twin = segments.create_segment(self.owners[0].size)
        try:
            self.client._call({"op": "map", "name": twin.name, "size": twin.size}, timeout=10.0)
        except BaseException:
            _release(twin)
            raise
        self.owners.append(twin)
        self.segs[twin.name] = twin
        self.spare, self.spare_addr = twin.name, _address(twin.buf)

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
            copy_into(self.owners[0].buf[:self.nbytes], self.owners[1].buf[:self.nbytes])
            self.busy = False
            return
        try:
            self._map(self.cur, self.spare_addr)
        except OSError:
            log.warning("alloc(): cannot map the old buffer where the twin was; this array's calls copy "
                        "their results from now on")
            self.spare = None  # (busy stays set: nothing is mapped at spare_addr any more)
            return
        self.cur, self.spare = self.spare, self.cur
        self.busy = False

    def release(self) -> None:
        """The call ended without a result for this array (another part of it failed)."""
        self.busy = False

    def retire(self) -> None:
        """The call failed: a peer may still write into the twin, so it is dropped (unlinked
        here and unmapped by the daemon) and a fresh segment takes its place."""
        old = self.spare
        try:
            fresh = segments.create_segment(self.owners[0].size)
            self.client._call({"op": "map", "name": fresh.name, "size": fresh.size}, timeout=10.0)
            self.segs[fresh.name] = fresh
            self._map(fresh.name, self.spare_addr)
            fresh.close()  # its own mapping; the file stays mapped where the twin was (and named, for unlink)
            self.spare = fresh.name
            self.busy = False
        except (PcclError, OSError) as exc:
            log.warning("alloc(): no fresh twin after a failed call (%s); results are copied from now on", exc)
            self.spare = None
        self._drop(old)

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
        try:
            seg.unlink()
        except FileNotFoundError:
            pass
        self.client._unmap(name)

    def close(self) -> None:
        for seg in self.segs.values():
            try:
                seg.unlink()
            except FileNotFoundError:
                pass
        for seg in self.owners:
            try:
                seg.close()
            except BufferError:  # the caller still holds the array: the mapping goes with it
                pass
        self.segs.clear()


def _request(nbytes: int, dtype: str, op: str, quant, algorithm: str, tag, timeout: float) -> dict:
    """The all_reduce request for one bucket (checks the arguments every peer must share)."""
    calls.check_reduction(op, quant, algorithm)
    msg = {"op": "all_reduce", "nbytes": nbytes, "dtype": dtype, "reduce": op, "algorithm": algorithm,
           "timeout": timeout}
    if quant is not None:
        msg["quant"] = quant
    if tag is not None:
        msg["tag"] = tag
    return msg


_TWIN = "twin"  # a part whose result lands in an alloc() array's twin (see _Alloc)


class Handle:
    """An all-reduce in flight. ``wait()`` returns its info dict or raises its error."""

    def __init__(self, client: Client, parts: list, timeout: float) -> None:
        self._client = client
        self._parts = parts  # [(request id, segment, [(Flat, offset)], (in_off, out_off, copied in))]
        self._timeout = timeout
        self._result: dict | None = None
        self._error: BaseException | None = None
        self._done = False

    def done(self) -> bool:
        return self._done

    def wait(self, timeout: float | None = None) -> dict:
        if not self._done:
            self._finish(self._timeout + SLACK if timeout is None else timeout)
        if self._error is not None:
            raise self._error
        return self._result

    def _finish(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        infos, error = [], None
        done = []  # (segment, members, layout, info) of the parts that succeeded
        for rid, seg, members, layout in self._parts:
            try:
                info = self._client._wait_reply(rid, deadline)
            except _NoAnswer:
                # the daemon may still write into this segment: it is not given back to the pool
                # (nor is a twin: its allocation copies results from now on)
                error = error or DeadlineExceeded(f"all_reduce: the daemon gave no answer within {timeout:.1f}s")
                continue
            except PcclError as exc:
                # co-located peers may still write their chunks into this segment's output
                # region for a moment (see collectives/shm.py): never reuse it
                error = error or exc
                if layout is _TWIN:
                    seg.retire()
                elif seg is not None:
                    self._client._pool.retire(seg)
                continue
            infos.append(info)
            done.append((seg, members, layout, info))
        # results land only once every part (one per dtype) succeeded: a failed call
        # leaves all the caller's tensors untouched
        for seg, members, layout, info in done:
            if layout is _TWIN:  # the result is in the twin: it takes the array's pages
                if error is None:
                    seg.swap()
                    for f, _ in members:
                        f.finish()
                else:
                    seg.release()
                continue
            if seg is None:  # an inline call: the result came in the reply
                data = info.pop("data")
                if error is None:
                    for f, off in members:
                        f.data[:] = np.frombuffer(data, np.uint8, f.nbytes, off)
                        f.finish()
                continue
            if error is None:
                _, out_off, _ = layout
                for f, off in members:
                    src = seg.buf[out_off + off:out_off + off + f.nbytes]
                    # a large result: stores that bypass the cache, over several threads
                    copy_into(f.data, src, stream=f.nbytes >= STREAM_MIN)
                    f.finish()
            self._client._pool.give(seg)
        self._done = True
        if error is not None:
            self._error = error
            return
        total = infos[0] if infos else {"world_size": self._client.world_size}  # each reply is a fresh dict
        total["input_copied"] = any(layout is None or (layout is not _TWIN and layout[2]) for *_, layout in self._parts)
        total["result_copied"] = any(layout is not _TWIN for *_, layout in self._parts)
        for extra in infos[1:]:
            for k in ("seconds", "tx_bytes", "rx_bytes", "tx_logical", "rx_logical"):
                if k in extra:
                    total[k] = total.get(k, 0) + extra[k]
        self._result = total


class Client:
    """Connection of one trainer to the run, through its peer daemon.

    ``daemon``: path of a running daemon's unix socket (``pccl daemon --ipc PATH``), or
    None to spawn a private daemon that exits with this client.
    """

    def __init__(
        self,
        coordinator: str = "127.0.0.1:48148",
        group: int = 0,
        daemon: str | None = None,
        *,
        timeout: float = 60.0,
        secret: str | None = None,
        streams: int | None = None,
        listen: str = "127.0.0.1:0",
        daemon_log_level: str | None = None,
        shm: bool = True,
        advertise: str | None = None,
        tcp_only: bool = False,
    ) -> None:
        self.coordinator = coordinator
        self.group = group
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._replies: dict[int, dict] = {}
        # Several threads may have calls in flight. One of the waiting threads at a time
        # reads the socket (``_reading``) and files every reply under its request id; the
        # others wait on ``_cond`` for theirs. No lock is held across a receive.
        self._cond = threading.Condition(threading.Lock())
        self._reading = False
        self._waiting = 0  # threads waiting on _cond
        self._send_lock = threading.Lock()
        self._buf = ipc.FrameBuffer()
        self._proc: subprocess.Popen | None = None
        self._info: dict = {"connected": False}
        self._sock: socket.socket | None = None
        # the tracker that unlinks our segments if this process dies starts with the first
        # segment; start it now, not in the middle of the first timed calls
        resource_tracker.ensure_running()
        if daemon is None:
            daemon = self._spawn(secret, streams, listen, daemon_log_level, shm, advertise, tcp_only)
        self.daemon_path = daemon
        self._sock = self._dial(daemon)
        self._rcvtimeo = 0  # microseconds; set before each wait
        hello = self._call({"op": "hello"}, timeout=10.0)
        self.peer_id: str = hello["peer_id"]
        self.daemon_pid: int = int(hello["pid"])  # for operators and stress tools
        self._pool = _Pool(self)
        self._states: list[SharedState] = []
        self._progress: dict[int, Any] = {}  # request id -> progress callback
        self._allocs: list[_Alloc] = []  # alloc() arrays

    # -- plumbing --------------------------------------------------------------------
    def _spawn(self, secret, streams, listen, log_level, shm, advertise, tcp_only) -> str:
        path = os.path.join(tempfile.gettempdir(), f"pccl-c{os.getpid()}-{uuid.uuid4().hex[:8]}.sock")
        cmd = [
            sys.executable, "-m", "pccl_py.daemon",
            "--coordinator", self.coordinator,
            "--group", str(self.group),
            "--listen", listen,
            "--ipc", path,
            "--exit-with-client",
        ]
        if streams is not None:
            cmd += ["--streams", str(streams)]
        if not shm:
            cmd += ["--no-shm"]
        if tcp_only:
            cmd += ["--tcp-only"]
        if advertise:
            cmd += ["--advertise", advertise]
        if log_level:
            cmd += ["--log-level", log_level]
        env = dict(os.environ)
        if secret is not None:
            env["PCCL_SECRET"] = secret
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 30.0
        line = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self._proc.stdout], [], [], 0.1)
            if r:
                line = self._proc.stdout.readline()
                if line.startswith(b"READY"):
                    return path
            if self._proc.poll() is not None:
                raise PcclError(f"the daemon exited with code {self._proc.returncode} while starting")
        self._proc.kill()
        raise PcclError("the daemon did not start within 30 s")

    @staticmethod
    def _dial(path: str) -> socket.socket:
        # A blocking socket whose receives give up after SO_RCVTIMEO (see _recv_timeout): one
        # recv() per wait, where a Python-level timeout costs an ioctl and a poll() besides.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except OSError as exc:
            s.close()
            raise PcclError(f"cannot reach the daemon at {path}: {exc}") from exc
        return s

    def _send(self, msg: dict, progress: Callable[[int, int], None] | None = None) -> int:
        if self._sock is None:
            raise InvalidUsage("client is closed")
        rid = next(self._ids)  # (itertools.count is atomic under the GIL)
        msg["id"] = rid
        if progress is not None:  # before the request: another thread may read its first report
            self._progress[rid] = progress
        data = ipc.pack(msg)
        with self._send_lock:
            self._sock.sendall(data)
        return rid

    def _recv_timeout(self, seconds: float) -> None:
        """Make the next receives give up after ``seconds`` (a syscall only when it changes)."""
        us = max(1, int(seconds * 1e6))  # a zero SO_RCVTIMEO would mean "never"
        if us != self._rcvtimeo:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", *divmod(us, 1_000_000)))
            self._rcvtimeo = us

    def _wait_reply(self, rid: int, deadline: float) -> dict:
        cond = self._cond
        while True:
            with cond:
                while rid not in self._replies and self._reading:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise _NoAnswer("the daemon did not answer in time")
                    self._waiting += 1
                    try:
                        cond.wait(min(left, RECV_SLICE))
                    finally:
                        self._waiting -= 1
                reply = self._replies.pop(rid, None)
                if reply is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _NoAnswer("the daemon did not answer in time")
                self._reading = True  # this thread reads for everyone until its next receive ends
            try:
                self._read_once(min(left, RECV_SLICE))
            finally:
                with cond:
                    self._reading = False
                    if self._waiting:  # (one thread alone, the usual case, skips the wake-up)
                        cond.notify_all()
        if not reply.pop("ok", False):
            raise from_wire(reply)
        reply.pop("id", None)
        return reply

    def _read_once(self, seconds: float) -> None:
        """One receive of at most ``seconds`` (by the reading thread): replies are filed."""
        self._recv_timeout(seconds)
        try:
            data = self._sock.recv(1 << 16)
        except BlockingIOError:  # SO_RCVTIMEO passed: the waiters look at their deadlines
            return
        if not data:
            raise PeerLost("the daemon closed the connection (did it crash? see its log)")
        for m in self._buf.feed(data):
            if "progress" in m and "ok" not in m:
                self._on_progress(m)
            else:
                with self._cond:
                    self._replies[m.get("id")] = m

    def _on_progress(self, msg: dict) -> None:
        callback = self._progress.get(msg.get("id"))
        done_total = msg.get("progress")
        if callback is not None and isinstance(done_total, list) and len(done_total) == 2:
            try:  # runs on whichever thread reads: an error must not lose other threads' replies
                callback(int(done_total[0]), int(done_total[1]))
            except Exception:
                log.exception("progress callback failed")

    def _call(self, msg: dict, timeout: float | None = None) -> dict:
        timeout = self.timeout if timeout is None else timeout
        msg.setdefault("timeout", timeout)
        rid = self._send(msg)
        return self._wait_reply(rid, time.monotonic() + timeout + SLACK)

    def _unmap(self, name: str) -> None:
        """Ask the daemon to unmap a segment this client dropped after a failed call."""
        try:
            self._call({"op": "unmap", "name": name}, timeout=10.0)
        except PcclError:
            pass  # the daemon is gone or stuck: the caller's error says so already

    def _remember(self, info: dict) -> dict:
        self._info = info
        return info

    # -- membership ------------------------------------------------------------------
    def connect(self, timeout: float | None = None) -> dict:
        """Register with the run and wait until accepted (until the peers vote us in)."""
        return self._remember(self._call({"op": "connect"}, timeout))

    def update_topology(self, timeout: float | None = None) -> dict:
        """Vote to admit pending peers; every accepted peer of the run must call it."""
        return self._remember(self._call({"op": "update_topology"}, timeout))

    def are_peers_pending(self, timeout: float | None = None) -> bool:
        return bool(self._call({"op": "are_peers_pending"}, timeout)["pending"])

    def refresh(self) -> dict:
        return self._remember(self._call({"op": "info"}, 10.0))

    @property
    def world_size(self) -> int:
        return int(self.refresh().get("world_size", 0))

    @property
    def group_world_size(self) -> int:
        return int(self.refresh().get("group_world_size", 0))

    @property
    def num_groups(self) -> int:
        return int(self.refresh().get("num_groups", 0))

    @property
    def rank(self) -> int:
        return int(self.refresh().get("rank", -1))

    @property
    def epoch(self) -> int:
        return int(self.refresh().get("epoch", -1))

    # -- collectives -----------------------------------------------------------------
    def all_reduce_async(
        self,
        tensors: Any,
        op: str = "sum",
        *,
        quant: str | None = None,
        algorithm: str = "auto",
        tag: int | None = None,
        timeout: float | None = None,
    ) -> Handle:
        """Start an all-reduce of one tensor or a list of tensors; returns a :class:`Handle`.

        Tensors of one dtype travel as one flat bucket; each dtype is a separate collective.
        Calls in flight at once need distinct ``tag`` values (or none: tags are then assigned
        in call order, which every peer must share).
        """
        timeout = self.timeout if timeout is None else float(timeout)
        items = list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]
        flats = [flat(t) for t in items]
        buckets: dict[str, list[Flat]] = {}
        for f in flats:
            buckets.setdefault(f.dtype, []).append(f)
        if tag is not None and len(buckets) > 1:
            raise InvalidUsage("a tagged call takes tensors of one dtype")
        parts = []
        for dtype, group in buckets.items():
            nbytes = sum(f.nbytes for f in group)
            members, off = [], 0
            for f in group:
                members.append((f, off))
                off += f.nbytes
            msg = _request(nbytes, dtype, op, quant, algorithm, tag, timeout)
            if nbytes <= ipc.INLINE_BYTES:
                # latency-bound: the bytes ride in the request and its reply (no segment)
                msg["data"] = b"".join([f.data for f in group])
                parts.append((self._send(msg), None, members, None))
                continue
            span = -(-max(nbytes, 1) // PAGE) * PAGE
            resident = self._resident(group)
            if resident is not None and resident[1] == 0 and nbytes == resident[0].nbytes and resident[0].take():
                # the whole of an alloc() array: the result goes into its twin, which then
                # takes the array's pages (Handle._finish): no copy in, no copy back
                rec = resident[0]
                msg.update(shm=rec.spare, in_shm=rec.cur, in_off=0, out_off=0)
                parts.append((self._send(msg), rec, members, _TWIN))
                continue
            if resident is not None:
                # the input already lives in a segment the daemon maps: no copy in
                rec, in_off = resident
                in_name = rec.cur
                seg = self._pool.take(span + 2 * PAGE)
                out_off = _offset_near(group[0].data, seg, 3 * PAGE // 4)
            else:
                # one region, reduced in place: the caller's tensors stay untouched until the
                # call has succeeded, and the call touches half the memory of two regions.
                # It starts a quarter page past the user's buffer (mod 4096): copies between
                # addresses a few bytes apart modulo the page run at a third of the speed
                # on some CPUs (4K aliasing)
                seg = self._pool.take(span + PAGE)
                in_name = seg.name
                in_off = out_off = _offset_near(group[0].data, seg, PAGE // 4)
                for f, moff in members:
                    copy_into(seg.buf[in_off + moff : in_off + moff + f.nbytes], f.data)
            msg.update(shm=seg.name, in_shm=in_name, in_off=in_off, out_off=out_off)
            parts.append((self._send(msg), seg, members, (in_off, out_off, resident is None)))
        return Handle(self, parts, timeout)

    def all_reduce(
        self,
        tensors: Any,
        op: str = "sum",
        *,
        quant: str | None = None,
        algorithm: str = "auto",
        tag: int | None = None,
        timeout: float | None = None,
        retry: bool | Backoff = False,
    ) -> dict:
        """All-reduce in place; returns per-call info (world size, algorithm, seconds, bytes).

        On failure the tensors are untouched. With ``retry`` the call is repeated on the new
        membership after ``PeerLost``/``Aborted`` until it succeeds; when this peer is left
        alone, the result is its own input (the reduction over a world of one).
        """
        if type(tensors) is np.ndarray and tensors.nbytes <= ipc.INLINE_BYTES:
            once = lambda: self._small_all_reduce(tensors, op, quant, algorithm, tag, timeout)  # noqa: E731
        else:
            once = lambda: self.all_reduce_async(  # noqa: E731
                tensors, op, quant=quant, algorithm=algorithm, tag=tag, timeout=timeout).wait()
        return self._retrying(once, retry, "all_reduce")

    def _retrying(self, once: Callable[[], Any], retry: bool | Backoff, what: str):
        """``once()``; with ``retry``, again on the new membership after ``PeerLost``,
        ``Aborted`` or ``CoordinatorUnavailable`` until it succeeds or the backoff's deadline."""
        backoff = delays = None  # made at the first retry
        while True:
            try:
                return once()
            except (PeerLost, Aborted, CoordinatorUnavailable) as exc:
                if not retry:
                    raise
                failed_epoch = self._info.get("epoch", -1)
                if backoff is None:
                    backoff = retry if isinstance(retry, Backoff) else Backoff(deadline=self.timeout)
                    delays = backoff.delays()
                pause = next(delays, None)
                if pause is None:
                    raise DeadlineExceeded(f"{what} kept failing until the retry deadline: {exc}") from exc
                time.sleep(pause)
                self._wait_new_epoch(failed_epoch, backoff)

    def _small_all_reduce(self, x: np.ndarray, op, quant, algorithm, tag, timeout) -> dict:
        """``all_reduce`` of one numpy array of at most ``INLINE_BYTES``: the latency-bound
        case, without the bucketing and the :class:`Handle` (same checks, errors and info)."""
        dtype = numpy_dtype(x)
        timeout = self.timeout if timeout is None else float(timeout)
        msg = _request(x.nbytes, dtype, op, quant, algorithm, tag, timeout)
        msg["data"] = x.tobytes()
        rid = self._send(msg)
        try:
            info = self._wait_reply(rid, time.monotonic() + timeout + SLACK)
        except _NoAnswer:
            raise DeadlineExceeded(f"all_reduce: the daemon gave no answer within {timeout + SLACK:.1f}s") from None
        x.reshape(-1).view(np.uint8)[:] = np.frombuffer(info.pop("data"), np.uint8)
        info["input_copied"] = info["result_copied"] = True
        return info

    def _wait_new_epoch(self, epoch: int, backoff: Backoff) -> dict:
        deadline = time.monotonic() + min(backoff.deadline, 10.0)
        info = self.refresh()
        while info.get("epoch", -1) <= epoch and time.monotonic() < deadline:
            time.sleep(0.02)
            info = self.refresh()
        return info

    def all_gather(self, blob: bytes, *, tag: int | None = None, timeout: float | None = None,
                   retry: bool | Backoff = False) -> list[bytes]:
        """Every peer's ``blob`` in rank order (for sparse exchanges of indices and values).
        ``retry`` as for :meth:`all_reduce`: after ``PeerLost``/``Aborted`` the gather runs
        again on the new membership (so the list then has the survivors' blobs)."""
        calls.check_blob(blob)
        msg = {"op": "all_gather", "data": bytes(blob), "tag": tag}
        return self._retrying(lambda: list(self._call(msg, timeout)["blobs"]), retry, "all_gather")

    def alloc(self, shape, dtype="float32", *, as_torch: bool = False, double_buffer: bool = True):
        """A zeroed array (or torch tensor) in shared memory that the daemon maps.

        All-reducing it (alone, or with other views that follow each other in the same
        allocation) skips the copy into shared memory, and the input is untouched on
        failure. With ``double_buffer`` (the default) the allocation has a twin of the same
        size: a call over the whole array writes its result into the twin, whose pages then
        take the array's place, so the result lands without a copy either (``info
        ["result_copied"]`` is False); other calls copy the result back. The twin doubles
        the shared memory the array takes. ``dtype`` is a numpy dtype or name;
        ``as_torch`` returns a torch tensor (``dtype="bfloat16"`` only with ``as_torch``).
        """
        bf16 = str(dtype) == "bfloat16"
        if bf16 and not as_torch:
            raise InvalidUsage("bfloat16 allocations need as_torch=True")
        np_dtype = np.dtype(np.int16 if bf16 else dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        seg = segments.create_segment(max(nbytes, 1))
        try:
            self._call({"op": "map", "name": seg.name, "size": seg.size}, timeout=10.0)
        except BaseException:
            seg.close()
            seg.unlink()
            raise
        rec = _Alloc(self, seg, nbytes)
        if double_buffer and remap is not None and nbytes > ipc.INLINE_BYTES:
            try:
                rec.add_twin()
            except BaseException:
                rec.close()
                raise
        self._allocs.append(rec)
        arr = np.ndarray(shape, np_dtype, buffer=seg.buf)
        if not as_torch:
            return arr
        import torch

        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if bf16 else t

    def _resident(self, group: list[Flat]):
        """(allocation, offset) when the group's bytes are one run inside an :meth:`alloc` array."""
        if not self._allocs or any(f.staged is not None for f in group):
            return None
        start = group[0].data.__array_interface__["data"][0]
        end = start
        for f in group:
            if f.data.__array_interface__["data"][0] != end:
                return None
            end += f.nbytes
        for rec in self._allocs:
            if rec.base <= start and end <= rec.base + rec.span:
                return rec, start - rec.base
        return None

    # -- shared state ----------------------------------------------------------------
    def shared_state(self, tensors: dict, *, revision: int = 0, allow_content_inequality=()) -> SharedState:
        """Register named tensors as shared state; returns a :class:`SharedState`.

        The tensors' contents are copied into one shared-memory segment that the daemon
        hashes and serves without further copies; use ``state[name]`` (same type as given)
        from then on. ``allow_content_inequality`` names tensors that may differ between
        peers (never compared, never transferred).
        """
        st = SharedState(tensors, revision=revision, allow_content_inequality=allow_content_inequality)
        try:
            self._call({"op": "map", "name": st.segment_name, "size": st.buffer().nbytes}, timeout=10.0)
        except BaseException:
            st.close()
            raise
        self._states.append(st)
        return st

    def sync_shared_state(self, state: SharedState, *, strategy: str = "enforce_popular",
                          timeout: float | None = None,
                          progress: Callable[[int, int], None] | None = None) -> dict:
        """Bring every peer's shared state to the most popular (revision, content).

        Offer ``state.revision``: it must be exactly one more than this peer's last synced
        revision (``RevisionError`` otherwise, for this peer alone); a newcomer may offer
        any. Outdated peers fetch from several up-to-date peers at once and verify the hash.
        ``strategy``: ``enforce_popular``, ``receive_only`` (never sends, never wins) or
        ``send_only`` (never receives; an error if this peer's state is not the winner).
        ``progress(done, total)`` is called with the bytes received so far while this peer
        fetches (a :class:`pccl_py.client.progress.ProgressBar` draws a bar on stderr).
        Returns ``status`` (``in_sync``/``fetched``), ``revision``, ``tx_bytes``,
        ``rx_bytes``, ``seconds``.
        """
        if not isinstance(state, SharedState):
            raise InvalidUsage("sync_shared_state takes the object returned by shared_state()")
        msg = {"op": "sync_shared_state", "state": state.describe(), "strategy": strategy,
               "progress": progress is not None}
        timeout = self.timeout if timeout is None else timeout
        msg["timeout"] = timeout
        rid = self._send(msg, progress)
        try:
            res = self._wait_reply(rid, time.monotonic() + timeout + SLACK)
        finally:
            self._progress.pop(rid, None)
        state.revision = int(res["revision"])
        return res

    # -- teardown --------------------------------------------------------------------
    def close(self) -> None:
        """Leave the run (announced, so nobody waits for a timeout) and release resources."""
        if self._sock is None:
            return
        if self._proc is not None:
            try:
                self._call({"op": "leave"}, timeout=3.0)
            except (PcclError, OSError):  # the daemon may be gone (killed): release the rest anyway
                pass
        try:
            self._pool.close()
            for st in self._states:
                st.close()
            for rec in self._allocs:
                rec.close()
            self._allocs.clear()
        finally:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5.0)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort for forgotten clients
        try:
            if self._sock is not None:
                self.close()
        except Exception:
            pass
