"""How the client copies tensors into shared memory and results back: which kernel, how
many threads.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from pccl_py import kernels as K

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


def _pool(threads: int) -> ThreadPoolExecutor:
    global _copiers
    with _copiers_lock:
        if _copiers is None:
            _copiers = ThreadPoolExecutor(threads, thread_name_prefix="pccl-copy")
        return _copiers


def run_all(jobs: list, nbytes: int) -> None:
    """Run the callables ``jobs`` (kernels that release the GIL), over the copy threads when
    they write ``nbytes`` >= PARALLEL_COPY_MIN in all, else one after another here."""
    threads = _copy_threads() if nbytes >= PARALLEL_COPY_MIN and len(jobs) > 1 else 0
    if not threads:
        for j in jobs:
            j()
        return
    futs = [_pool(threads).submit(j) for j in jobs[1:]]
    jobs[0]()
    for f in futs:
        f.result()


def copy_into(dst, src, stream: bool = False) -> None:
    """dst[:] = src for byte buffers of one size: large ones split over a few threads."""
    fn = K.copy_stream if stream else K.copy
    n = len(dst)
    threads = _copy_threads() if n >= PARALLEL_COPY_MIN else 0
    if not threads:
        fn(dst, src)
        return
    pool = _pool(threads)
    d, s_ = memoryview(dst).cast("B"), memoryview(src).cast("B")
    step = max(_COPY_PIECE, -(-n // threads))
    jobs = [pool.submit(fn, d[a:a + step], s_[a:a + step]) for a in range(step, n, step)]
    fn(d[:step], s_[:step])  # the caller's thread takes the first piece
    for j in jobs:
        j.result()
