"""The trainer-side API: a thin client of its peer daemon.

    with Client(coordinator="10.0.0.1:48148") as c:   # spawns a private daemon
        c.connect()
        info = c.all_reduce(grad, op="avg")

Everything networked happens in the daemon; this class only sends small requests over a
unix socket (:mod:`~pccl_py.client.rpc`) and hands tensors over in shared memory
(:mod:`~pccl_py.client.segments`, :mod:`~pccl_py.client.allreduce`). A private daemon is
started and stopped by :mod:`~pccl_py.client.spawn`.
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Callable
from multiprocessing import resource_tracker
from typing import Any

import numpy as np

from pccl_py import calls
from pccl_py.client import allreduce, cuda
from pccl_py.client.allreduce import Handle, Retrying
from pccl_py.client.rpc import SLACK, Rpc
from pccl_py.client.segments import Alloc, Pool, map_segment
from pccl_py.client.shared_state import SharedState
from pccl_py.client.spawn import spawn_daemon, stop_daemon
from pccl_py.client.tensors import Flat, flat
from pccl_py.errors import (
    Aborted,
    CoordinatorUnavailable,
    DeadlineExceeded,
    InvalidUsage,
    PcclError,
    PeerLost,
    SegmentLost,
)
from pccl_py.retry import Backoff
from pccl_py.transport.addresses import refuse_unreachable
from pccl_py.transport.zmq_io import parse_addr
from pccl_py.wire import ipc

__all__ = ["Client", "Handle", "Retrying"]

LEAVE_TIMEOUT = 3.0  # seconds the daemon has to close its links and announce the leave
WAIT_VOTE = 5.0  # longest vote of wait_for_peers before it looks again whether anyone is pending


class Client:
    """Connection of one trainer to the run, through its peer daemon.

    ``daemon``: path of a running daemon's unix socket (``pccl daemon --ipc PATH``), or
    None to spawn a private daemon that exits with this client. This client's connection
    to its daemon is the daemon's lease on its membership: once this client has called
    :meth:`connect`, the daemon leaves the run when the connection ends, by :meth:`close`
    or because this process died.
    """

    def __init__(
        self,
        coordinator: str = "127.0.0.1:48148",
        group: int = 0,
        daemon: str | None = None,
        *,
        timeout: float = 60.0,
        secret: str | None = None,
        streams: int | str | None = None,
        listen: str = "127.0.0.1:0",
        daemon_log_level: str | None = None,
        shm: bool = True,
        advertise: str | None = None,
        tcp_only: bool = False,
    ) -> None:
        self.coordinator = coordinator
        self.group = group
        self.timeout = calls.call_timeout(timeout)
        self._proc: subprocess.Popen | None = None
        self._info: dict = {"connected": False}
        self._rpc: Rpc | None = None
        # the tracker that unlinks our segments if this process dies starts with the first
        # segment; start it now, not in the middle of the first timed calls
        resource_tracker.ensure_running()
        if daemon is None:
            # a setting its daemon would refuse: said here, before a process is spawned
            refuse_unreachable(parse_addr(listen, 0)[0], coordinator, advertise)
            self._proc, daemon = spawn_daemon(
                coordinator, group, secret=secret, streams=streams, listen=listen, log_level=daemon_log_level,
                shm=shm, advertise=advertise, tcp_only=tcp_only)
        self.daemon_path = daemon
        self._rpc = Rpc(daemon)
        hello = self._call({"op": "hello"}, timeout=10.0)
        self.peer_id: str = hello["peer_id"]
        self.daemon_pid: int = int(hello["pid"])  # for operators and stress tools
        self._pool = Pool(self._rpc)
        self._states: list[SharedState] = []
        self._allocs: list[Alloc] = []  # alloc() arrays

    def _timeout(self, timeout: Any) -> float:
        """A call's timeout: this client's when None, else checked as the daemon checks it
        (a finite number of seconds in (0, a day])."""
        return self.timeout if timeout is None else calls.call_timeout(timeout)

    def _call(self, msg: dict, timeout: float | None = None) -> dict:
        return self._rpc.call(msg, self._timeout(timeout))

    def _remember(self, info: dict) -> dict:
        self._info = info
        if info.get("peer_id"):  # a daemon serving successive trainers: the membership connected
            self.peer_id = info["peer_id"]
        return info

    # -- membership ------------------------------------------------------------------
    def connect(self, timeout: float | None = None) -> dict:
        """Register with the run and wait until accepted (until the peers vote us in)."""
        return self._remember(self._call({"op": "connect"}, timeout))

    def update_topology(self, timeout: float | None = None) -> dict:
        """Vote to admit pending peers; every accepted peer of the run must call it."""
        return self._remember(self._call({"op": "update_topology"}, timeout))

    def optimize_topology(self, timeout: float | None = None) -> dict:
        """Measure the data links of this peer's group and reorder its ring for bandwidth.

        Like :meth:`update_topology` every accepted peer must call it at the same point (no
        collective in flight); it admits nobody. The coordinator probes the directed pairs
        it has not measured yet, then moves the ring only for a clearly faster one (a new
        epoch). Returns this member's view (as :meth:`refresh`) plus ``changed`` (whether
        the ring order changed) and ``reason`` (the coordinator's)."""
        return self._remember(self._call({"op": "optimize_topology"}, timeout))

    def are_peers_pending(self, timeout: float | None = None) -> bool:
        return bool(self._call({"op": "are_peers_pending"}, timeout)["pending"])

    def wait_for_peers(self, n: int, *, timeout: float | None = None, poll: float = 0.05) -> dict:
        """Return this member's view (as :meth:`refresh`) once the run has at least ``n``
        peers. Meanwhile it admits newcomers: whenever peers are pending it votes
        (:meth:`update_topology`). Like ``update_topology``, every member must call it at
        the same point (a vote completes only once every member has voted), newcomers
        right after their ``connect()``; all then leave it at the same epoch.
        ``DeadlineExceeded`` after ``timeout`` says how many peers there are."""
        n = calls.peer_count(n)
        poll = calls.poll_interval(poll)
        timeout = self._timeout(timeout)
        deadline = time.monotonic() + timeout
        info = self.refresh()
        if not info.get("connected"):
            raise InvalidUsage("wait_for_peers: not connected; call connect() first")
        while info["world_size"] < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(
                    f"wait_for_peers: {info['world_size']} of the {n} peers awaited are in the run after "
                    f"{timeout:g} s (epoch {info['epoch']}); start the others, or wait longer")
            if self.are_peers_pending(timeout=min(left, 10.0)):
                try:
                    # bounded: a newcomer that gave up its connect() after another member saw it
                    # pending leaves that member's vote alone; it is withdrawn and taken again
                    info = self.update_topology(timeout=min(left, WAIT_VOTE))
                except DeadlineExceeded:
                    info = self.refresh()
                continue
            time.sleep(min(poll, left))
            info = self.refresh()
        return info

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
        retry: bool | Backoff = False,
        stage: str | None = None,
    ) -> Handle | Retrying:
        """Start an all-reduce of one tensor or a list of tensors; returns a :class:`Handle`.

        Tensors of one dtype travel as one flat bucket; each dtype is a separate collective.
        Calls in flight at once need distinct ``tag`` values (or none: tags are then assigned
        in call order, which every peer must share). With ``retry`` (as for
        :meth:`all_reduce`) the handle's ``wait()`` posts the call again on the new
        membership after a failure the retry rule covers, and returns the info of the
        attempt that succeeded; peers must wait their handles in the same order.
        ``stage`` (CUDA tensors only, see :meth:`all_reduce`).
        """
        timeout = self._timeout(timeout)
        stage = cuda.stage_of(stage)
        tag = None if tag is None else calls.user_tag(tag)
        items = list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]

        def post() -> Handle:  # every attempt views the tensors afresh: a failed one left them untouched
            buckets: dict[str, list[Flat]] = {}
            for f in [flat(t, device=stage != "host") for t in items]:
                buckets.setdefault(f.dtype, []).append(f)
            if tag is not None and len(buckets) > 1:
                raise InvalidUsage("a tagged call takes tensors of one dtype")
            parts = [allreduce.post(self._rpc, self._pool, self._allocs, dtype, group, op=op, quant=quant,
                                    algorithm=algorithm, tag=tag, timeout=timeout, stage=stage,
                                    world=int(self._info.get("world_size") or 1))
                     for dtype, group in buckets.items()]
            return Handle(self._rpc, self._pool, parts, timeout, lambda: self.world_size)

        epoch = self._info.get("epoch", -1)  # what this client knew when the first attempt went out
        first = post()
        if not retry:
            return first
        return Retrying(first, post, lambda once: self._retrying(once, retry, "all_reduce", epoch=epoch))

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
        stage: str | None = None,
    ) -> dict:
        """All-reduce in place; returns per-call info (world size, algorithm, seconds, bytes).

        On failure the tensors are untouched. With ``retry`` the call is repeated on the new
        membership after ``PeerLost``/``Aborted`` until it succeeds; when this peer is left
        alone, the result is its own input (the reduction over a world of one). After
        ``SegmentLost`` (an ``Aborted``: a shared-memory segment of the call vanished from
        /dev/shm; its owner replaces it) the retry comes at once, on the same membership.

        ``stage`` says how CUDA tensors reach the daemon (default ``$PCCL_CUDA_STAGE``, else
        ``"pinned"``): ``"pinned"`` copies them by DMA straight into page-locked shared
        memory and back; ``"host"`` through a pageable host copy; ``"gpu_quant"`` (only
        for quantized float32 calls, else as ``"pinned"``) quantizes them on the GPU so only
        codes cross PCIe. ``info["cuda_staging"]`` says which ran. CPU tensors ignore it.
        """
        stage = cuda.stage_of(stage)
        if type(tensors) is np.ndarray and tensors.nbytes <= ipc.INLINE_BYTES:
            once = lambda: self._small_all_reduce(tensors, op, quant, algorithm, tag, timeout)  # noqa: E731
            return self._retrying(once, retry, "all_reduce")
        return self.all_reduce_async(tensors, op, quant=quant, algorithm=algorithm, tag=tag, timeout=timeout,
                                     retry=retry, stage=stage).wait()

    def _retrying(self, once: Callable[[], Any], retry: bool | Backoff, what: str, *, epoch: int | None = None):
        """``once()``; with ``retry``, again on the new membership after ``PeerLost``,
        ``Aborted`` or ``CoordinatorUnavailable`` until it succeeds or the backoff's deadline.
        A retry waits for an epoch newer than the one this client knew when the failed
        attempt was posted (``epoch`` for a first attempt posted before this call: an
        asynchronous one). ``SegmentLost`` changes no membership: its retry waits for no new
        epoch."""
        backoff = delays = None  # made at the first retry
        while True:
            posted_at = self._info.get("epoch", -1) if epoch is None else epoch
            epoch = None
            try:
                return once()
            except (PeerLost, Aborted, CoordinatorUnavailable) as exc:
                if not retry:
                    raise
                if backoff is None:
                    backoff = retry if isinstance(retry, Backoff) else Backoff(deadline=self.timeout)
                    delays = backoff.delays()
                pause = next(delays, None)
                if pause is None:
                    raise DeadlineExceeded(f"{what} kept failing until the retry deadline: {exc}") from exc
                time.sleep(pause)
                if not isinstance(exc, SegmentLost):
                    self._wait_new_epoch(posted_at, backoff)

    def _small_all_reduce(self, x: np.ndarray, op, quant, algorithm, tag, timeout) -> dict:
        timeout = self._timeout(timeout)
        tag = None if tag is None else calls.user_tag(tag)
        return allreduce.small(self._rpc, x, op, quant, algorithm, tag, timeout)

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
        msg = {"op": "all_gather", "data": bytes(blob), "tag": None if tag is None else calls.user_tag(tag)}
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
        shape = calls.shape_of(shape)
        nbytes = math.prod(shape) * np_dtype.itemsize
        if not 0 < nbytes <= ipc.MAX_BYTES:
            raise InvalidUsage(f"alloc of shape {shape} ({nbytes} bytes): an allocation holds 1 to "
                               f"{ipc.MAX_BYTES} bytes")
        rec = Alloc.create(self._rpc, nbytes, double_buffer)
        self._allocs.append(rec)
        arr = np.ndarray(shape, np_dtype, buffer=rec.buf)
        if not as_torch:
            return arr
        import torch

        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if bf16 else t

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
            map_segment(self._rpc, st.segment_name, st.buffer().nbytes)
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
        calls.check_strategy(strategy)
        timeout = self._timeout(timeout)
        msg = {"op": "sync_shared_state", "state": state.describe(), "strategy": strategy,
               "progress": progress is not None}
        msg["timeout"] = timeout
        rid = self._rpc.send(msg, progress)
        try:
            res = self._rpc.wait(rid, time.monotonic() + timeout + SLACK)
        finally:
            self._rpc.forget(rid)
        state.revision = int(res["revision"])
        return res

    # -- teardown --------------------------------------------------------------------
    def close(self) -> None:
        """Leave the run (announced, so nobody waits for a timeout) and release resources.

        The daemon leaves if this client connected it (or spawned it); it then exits, unless
        it was started with ``--serve-successive``. A client that never called
        :meth:`connect` on a shared daemon leaves nothing: the trainer that did stays.
        """
        if self._rpc is None or self._rpc.closed:
            return
        try:  # returns once the leave is announced; closing the connection alone would also do
            self._call({"op": "leave"}, timeout=LEAVE_TIMEOUT)
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
            self._rpc.close()
        if self._proc is not None:
            stop_daemon(self._proc)
            self._proc = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort for forgotten clients
        try:
            if self._rpc is not None and not self._rpc.closed:
                self.close()
        except Exception:
            pass
