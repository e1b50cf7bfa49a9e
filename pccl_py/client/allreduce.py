"""One all-reduce from the client's side: where each bucket's bytes travel, and the
:class:`Handle` that lands the results.

Tensors of one dtype travel as one bucket, one request each. A bucket's bytes go
  * inline, in the request and its reply, when at most ``INLINE_BYTES`` (latency-bound);
  * nowhere, when they are the whole of an :meth:`~pccl_py.client.Client.alloc` array:
    the result goes into the array's twin, which then takes the array's pages;
  * nowhere in, when they lie in an ``alloc()`` array: the result is copied back from a
    pool segment;
  * otherwise into one region of a pool segment, reduced in place and copied back; CUDA
    tensors are copied there and back by the GPU, the segment page-locked
    (:mod:`~pccl_py.client.cuda`).
An ``alloc()`` array whose file lost its name in /dev/shm (``Alloc.lost``: peers cannot
map it) is copied into its twin when the call covers it whole (it then moves into the
twin's named file), else treated as a plain array.
Results land only once every bucket of the call succeeded: a failed call leaves all the
caller's tensors untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from pccl_py import calls
from pccl_py.client import cuda
from pccl_py.client.copies import STREAM_MIN, copy_into
from pccl_py.client.rpc import SLACK, NoAnswer, Rpc
from pccl_py.client.segments import PAGE, Alloc, Pool, offset_near
from pccl_py.client.tensors import Flat, numpy_dtype
from pccl_py.errors import DeadlineExceeded, PcclError
from pccl_py.wire import ipc

TWIN = "twin"  # a part whose result lands in an alloc() array's twin (see segments.Alloc)
TWIN_COPIED = "twin copied"  # the same, its input copied into the twin first (the array's file was lost)
TWINS = (TWIN, TWIN_COPIED)


def request(nbytes: int, dtype: str, op: str, quant, algorithm: str, tag, timeout: float) -> dict:
    """The all_reduce request for one bucket (checks the arguments every peer must share)."""
    calls.check_reduction(op, quant, algorithm)
    msg = {"op": "all_reduce", "nbytes": nbytes, "dtype": dtype, "reduce": op, "algorithm": algorithm,
           "timeout": timeout}
    if quant is not None:
        msg["quant"] = quant
    if tag is not None:
        msg["tag"] = tag
    return msg


def resident(allocs: list[Alloc], group: list[Flat]) -> tuple[Alloc, int] | None:
    """(allocation, offset) when the group's bytes are one run inside an ``alloc()`` array."""
    if not allocs or any(f.staged is not None or f.data is None for f in group):
        return None
    start = group[0].data.__array_interface__["data"][0]
    end = start
    for f in group:
        if f.data.__array_interface__["data"][0] != end:
            return None
        end += f.nbytes
    for rec in allocs:
        if rec.base <= start and end <= rec.base + rec.span:
            return rec, start - rec.base
    return None


def post(rpc: Rpc, pool: Pool, allocs: list[Alloc], dtype: str, group: list[Flat], *,
         op: str, quant, algorithm: str, tag, timeout: float, stage: str = "pinned", world: int = 1) -> tuple:
    """Send the request for one bucket; returns its part for :class:`Handle`:
    (request id, segment or allocation or None, [(Flat, offset)], layout).

    Device tensors (``Flat.dev``) are copied straight into a page-locked pool segment
    (:mod:`~pccl_py.client.cuda`; ``stage`` "gpu_quant": quantized on the device for
    ``world`` peers), or staged through host copies when the call travels inline or the
    segment cannot be page-locked."""
    nbytes = sum(f.nbytes for f in group)
    if nbytes <= ipc.INLINE_BYTES:
        for f in group:
            f.to_host()
    members, off = [], 0
    for f in group:
        members.append((f, off))
        off += f.nbytes
    msg = request(nbytes, dtype, op, quant, algorithm, tag, timeout)
    if nbytes <= ipc.INLINE_BYTES:
        # latency-bound: the bytes ride in the request and its reply (no segment)
        msg["data"] = b"".join([f.data for f in group])
        return rpc.send(msg), None, members, None
    span = -(-max(nbytes, 1) // PAGE) * PAGE
    found = resident(allocs, group)
    if found is not None:
        found[0].refresh()  # names still in /dev/shm? (peers map them by name)
    if found is not None and found[1] == 0 and nbytes == found[0].nbytes and found[0].take():
        # the whole of an alloc() array: the result goes into its twin, which then
        # takes the array's pages (Handle._finish): no copy in, no copy back
        rec = found[0]
        if rec.lost:  # peers cannot map the array: its bytes go into the twin, reduced there in place
            copy_into(rec.twin_buf[:nbytes], rec.buf[:nbytes])
            msg.update(shm=rec.spare, in_shm=rec.spare, in_off=0, out_off=0)
            return rpc.send(msg), rec, members, TWIN_COPIED
        msg.update(shm=rec.spare, in_shm=rec.cur, in_off=0, out_off=0)
        return rpc.send(msg), rec, members, TWIN
    if found is not None and found[0].lost:
        found = None  # copied through a pool segment, like a plain array
    if found is not None:
        # the input already lives in a segment the daemon maps: no copy in
        rec, in_off = found
        in_name = rec.cur
        seg = pool.take(span + 2 * PAGE)
        out_off = offset_near(group[0].data, seg, 3 * PAGE // 4)
    else:
        # one region, reduced in place: the caller's tensors stay untouched until the
        # call has succeeded, and the call touches half the memory of two regions.
        # It starts a quarter page past the user's buffer (mod 4096): copies between
        # addresses a few bytes apart modulo the page run at a third of the speed
        # on some CPUs (4K aliasing)
        # (device tensors start the region at 0: page-locking pins every page of the
        # segment, so it is not made a power of two larger for the quarter-page shift)
        seg = pool.take(span if all(f.data is None for f in group) else span + PAGE)
        try:
            in_off = out_off = _fill(pool, seg, dtype, members, quant, stage, world)
        except BaseException:
            pool.give(seg)
            raise
        in_name = seg.name
    msg.update(shm=seg.name, in_shm=in_name, in_off=in_off, out_off=out_off)
    return rpc.send(msg), seg, members, (in_off, out_off, found is None)


def _fill(pool: Pool, seg, dtype: str, members: list, quant, stage: str, world: int) -> int:
    """Copy a bucket into its region of the pool segment ``seg``; returns the region's offset."""
    devs = [f for f, _ in members if f.data is None]
    if devs and not pool.pins.pin(seg):
        for f in devs:
            f.to_host()
        devs = []
    first = members[0][0]
    room = seg.size - sum(f.nbytes for f, _ in members)
    off = offset_near(first.data, seg, PAGE // 4) if first.data is not None and room >= PAGE else 0
    if (stage == "gpu_quant" and quant is not None and dtype == "float32" and len(devs) == len(members)
            and len({f.dev.device for f in devs}) == 1):
        nbytes = sum(f.nbytes for f in devs)
        cseg = pool.take(cuda.code_bytes(nbytes, quant))
        try:
            if pool.pins.pin(cseg):
                codes = np.frombuffer(cseg.buf, np.uint8, cuda.code_bytes(nbytes, quant))
                dst = np.frombuffer(seg.buf, np.uint8, nbytes, off)
                cuda.quantized_to_segment([f.dev for f in devs], quant, world, codes, dst)
                del codes, dst
                for f in devs:
                    f.how = "gpu_quant"
                return off
        finally:
            pool.give(cseg)
    on_dev = []
    for f, moff in members:
        if f.data is None:
            on_dev.append((f.dev, np.frombuffer(seg.buf, np.uint8, f.nbytes, off + moff)))
        else:
            copy_into(seg.buf[off + moff : off + moff + f.nbytes], f.data)
    if on_dev:
        cuda.to_segment(on_dev)
    return off


def small(rpc: Rpc, x: np.ndarray, op, quant, algorithm, tag, timeout: float) -> dict:
    """The all-reduce of one numpy array of at most ``INLINE_BYTES``: the latency-bound
    case, without the bucketing and the :class:`Handle` (same checks, errors and info)."""
    msg = request(x.nbytes, numpy_dtype(x), op, quant, algorithm, tag, timeout)
    msg["data"] = x.tobytes()
    rid = rpc.send(msg)
    try:
        info = rpc.wait(rid, time.monotonic() + timeout + SLACK)
    except NoAnswer:
        raise DeadlineExceeded(f"all_reduce: the daemon gave no answer within {timeout + SLACK:.1f}s") from None
    x.reshape(-1).view(np.uint8)[:] = np.frombuffer(info.pop("data"), np.uint8)
    info["input_copied"] = info["result_copied"] = True
    return info


class Handle:
    """An all-reduce in flight. ``wait()`` returns its info dict or raises its error."""

    def __init__(self, rpc: Rpc, pool: Pool, parts: list, timeout: float,
                 world_size: Callable[[], int]) -> None:
        self._rpc = rpc
        self._pool = pool
        self._parts = parts  # [(request id, segment, [(Flat, offset)], (in_off, out_off, copied in))]
        self._timeout = timeout
        self._world_size = world_size  # (for a call without tensors)
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
                info = self._rpc.wait(rid, deadline)
            except NoAnswer:
                # the daemon may still write into this segment: it is not given back to the pool
                # (nor is a twin: its allocation copies results from now on)
                error = error or DeadlineExceeded(f"all_reduce: the daemon gave no answer within {timeout:.1f}s")
                continue
            except PcclError as exc:
                # co-located peers may still write their chunks into this segment's output
                # region for a moment (see collectives/shm.py): never reuse it
                error = error or exc
                if layout in TWINS:
                    seg.retire()
                elif seg is not None:
                    self._pool.retire(seg)
                continue
            infos.append(info)
            done.append((seg, members, layout, info))
        # results land only once every part (one per dtype) succeeded: a failed call
        # leaves all the caller's tensors untouched
        for seg, members, layout, info in done:
            if layout in TWINS:  # the result is in the twin: it takes the array's pages
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
                on_dev = []
                try:
                    for f, off in members:
                        if f.data is None:  # a device tensor: copied back from the page-locked segment
                            on_dev.append((f.dev, np.frombuffer(seg.buf, np.uint8, f.nbytes, out_off + off)))
                            continue
                        src = seg.buf[out_off + off:out_off + off + f.nbytes]
                        # a large result: stores that bypass the cache, over several threads
                        copy_into(f.data, src, stream=f.nbytes >= STREAM_MIN)
                        f.finish()
                    if on_dev:
                        cuda.from_segment(on_dev)
                        on_dev.clear()
                        for f, _ in members:
                            if f.data is None:
                                f.finish()
                finally:
                    on_dev.clear()
                    self._pool.give(seg)
                continue
            self._pool.give(seg)
        self._done = True
        if error is not None:
            self._error = error
            return
        total = infos[0] if infos else {"world_size": self._world_size()}  # each reply is a fresh dict
        total["input_copied"] = any(layout is None or layout is TWIN_COPIED or (layout is not TWIN and layout[2])
                                    for *_, layout in self._parts)
        total["result_copied"] = any(layout not in TWINS for *_, layout in self._parts)
        hows = sorted({f.how for _, _, members, _ in self._parts for f, _ in members if f.how})
        if hows:  # how CUDA tensors travelled: "host", "pinned", "gpu_quant"
            total["cuda_staging"] = ",".join(hows)
        for extra in infos[1:]:
            for k in ("seconds", "tx_bytes", "rx_bytes", "tx_logical", "rx_logical"):
                if k in extra:
                    total[k] = total.get(k, 0) + extra[k]
        self._result = total


class Retrying:
    """An all-reduce posted with ``retry``: the same ``wait()`` and ``done()`` as a
    :class:`Handle`. ``wait()`` waits for the attempt in flight; after a failure that the
    client's retry rule covers (``retrying``, the one loop ``all_reduce`` uses too: it
    waits for the new membership and gives up at the backoff's deadline), it posts the
    call again (``post``) and waits for that attempt. ``timeout`` bounds each attempt's
    wait. Every attempt leaves the tensors untouched when it fails."""

    def __init__(self, first: Handle, post: Callable[[], Handle],
                 retrying: Callable[[Callable[[], dict]], dict]) -> None:
        self._attempt: Handle | None = first
        self._post = post
        self._retrying = retrying
        self.attempts = 1  # calls posted so far, the first included
        self._result: dict | None = None
        self._error: BaseException | None = None
        self._done = False

    def done(self) -> bool:
        return self._done

    def wait(self, timeout: float | None = None) -> dict:
        if not self._done:
            def once() -> dict:
                if self._attempt is None:
                    self.attempts += 1
                    self._attempt = self._post()
                attempt, self._attempt = self._attempt, None  # a failed one is not waited for again
                return attempt.wait(timeout)

            try:
                self._result = self._retrying(once)
            except PcclError as exc:
                self._error = exc
            self._done = True
        if self._error is not None:
            raise self._error
        return self._result
