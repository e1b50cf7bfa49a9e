"""The memory floor of a same-host all-reduce: ``pccl bench allreduce --floor``.

N processes of this host all-reduce float32 arrays of their own (private memory, like a
trainer's tensors) with no daemon, no control messages and no Python between the memory
passes beyond a few calls. Each call:

1. copies its array into its own input segment (shared memory);
2. waits at a barrier until every input is in;
3. sums its chunk (1/N of the elements) of every input, block by block, and writes the
   result once, into one shared output segment;
4. waits at a barrier until every chunk is written;
5. copies the whole output back into its array.

That is the least memory traffic a shared-memory all-reduce of private arrays can do
(each byte copied in once, read once by its folder, written once, copied out once) on as
few processes as there are peers, so it bounds what any same-host path can reach on this
machine. It is not a usable collective: no fault handling, no argument checks.

Barriers: an arrival mask (the native ``arrive``) in a control segment, and one FIFO per
rank to sleep on; the rank whose bit completes a mask prepares the mask after next and
wakes the others. Every wait has the benchmark's deadline.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

from pccl_py.transport.segments import Mapping, create_segment

_WORDS = 256  # barrier words, used in turn


class _Barrier:
    @staticmethod
    def prepare(ctl) -> None:
        """Ready the control words of barriers 1 and 2 (each completed barrier readies the
        one after next)."""
        from pccl_py import kernels as K

        K.store_u64(ctl, 0, 1 << 32)
        K.store_u64(ctl, 8, 2 << 32)

    def __init__(self, ctl, fifos: list[str], rank: int, deadline: float) -> None:
        from pccl_py import kernels as K

        self.K, self.ctl, self.rank, self.deadline = K, ctl, rank, deadline
        self.world = len(fifos)
        self.full = (1 << self.world) - 1
        # O_RDWR: a FIFO opened so never blocks and never reads end-of-file
        self.fds = [os.open(f, os.O_RDWR) for f in fifos]
        self.n = 0

    def wait(self) -> None:
        self.n += 1
        n = self.n
        mask = self.K.arrive(self.ctl, (n - 1) % _WORDS * 8, n, self.rank)
        if mask < 0:
            raise RuntimeError(f"floor barrier {n}: its word holds another barrier")
        if mask == self.full:
            self.K.store_u64(self.ctl, (n + 1) % _WORDS * 8, (n + 2) << 32)
            for r, fd in enumerate(self.fds):
                if r != self.rank:
                    os.write(fd, b"x")
            return
        left = self.deadline - time.monotonic()
        ready, _, _ = select.select([self.fds[self.rank]], [], [], max(0.0, left))
        if not ready:
            raise TimeoutError(f"floor barrier {n}: not every rank arrived in time")
        os.read(self.fds[self.rank], 1)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def worker(args) -> int:
    """One rank (``--role floor``): rank 0 prints the rows as one JSON line."""
    import json

    import numpy as np

    from pccl_py import kernels as K
    from pccl_py.collectives.base import split
    from pccl_py.collectives.shm import _BLOCK
    from pccl_py.tools.bench.allreduce import repeats_for, warmups_for

    names = args.floor_segments.split(",")
    ctl = Mapping(names[0])
    ins = [Mapping(n) for n in names[1:1 + args.world]]
    out = Mapping(names[1 + args.world])
    fifos = [os.path.join(args.floor_dir, f"r{r}") for r in range(args.world)]
    bar = _Barrier(ctl.buf, fifos, args.rank, time.monotonic() + args.timeout)
    me, w = args.rank, args.world
    scratch = memoryview(bytearray(_BLOCK))  # the daemons' fold block
    rows = []
    try:
        for n in args.sizes:
            x = np.full(n, 1.0 + me, dtype=np.float32)
            xb = memoryview(x).cast("B")
            nbytes = 4 * n
            bounds = split(n, w)
            a, b = 4 * bounds[me], 4 * bounds[me + 1]
            inputs = [m.buf[:nbytes] for m in ins]
            output = out.buf[:nbytes]
            chunks = [inp[a:b] for inp in inputs]
            copy_out = K.copy_stream if nbytes >= 4 << 20 else K.copy
            times = []
            reps = repeats_for(nbytes, args.repeat)
            for i in range(warmups_for(nbytes) + reps):
                x[:] = 1.0 + me  # the next call's input (untimed, as a trainer's new gradient)
                bar.wait()  # start together, as collective calls do
                t0 = time.perf_counter()
                K.copy(inputs[me], xb)
                bar.wait()
                K.fold(chunks, [output[a:b]], "sum", "float32", scratch)  # written once
                bar.wait()
                copy_out(xb, output)
                if i >= warmups_for(nbytes):
                    times.append(time.perf_counter() - t0)
            expect = w * (w + 1) / 2
            wrong = np.flatnonzero(x != expect)  # every rank's chunk, not only the ends
            if wrong.size:
                raise RuntimeError(f"floor all-reduce of {n} elements gave {x[wrong[0]]} at {wrong[0]}, "
                                   f"expected {expect}")
            rows.append({"size": n, "times": times})
    finally:
        bar.close()
    if me == 0:
        print(json.dumps(rows), flush=True)
    return 0


def run(args, collect) -> list[dict]:
    """Start the ranks (``collect`` waits for them and parses rank 0's rows)."""
    biggest = max(4 * max(args.sizes), 1)
    segs = [create_segment(_WORDS * 8, prefix="pccl_floor_")]
    segs += [create_segment(biggest, prefix="pccl_floor_") for _ in range(args.world + 1)]
    fifo_dir = tempfile.mkdtemp(prefix="pccl-floor-")
    try:
        _Barrier.prepare(segs[0].buf)
        for r in range(args.world):
            os.mkfifo(os.path.join(fifo_dir, f"r{r}"))
        names = ",".join(s.name.lstrip("/") for s in segs)
        procs = [
            subprocess.Popen([sys.executable, "-m", "pccl_py.tools.bench.allreduce", "--role", "floor",
                              "--rank", str(r), "--floor-segments", names, "--floor-dir", fifo_dir,
                              "--world", str(args.world), "--sizes", ",".join(map(str, args.sizes)),
                              "--repeat", str(args.repeat), "--timeout", str(args.timeout)],
                             stdout=subprocess.PIPE)
            for r in range(args.world)
        ]
        return collect(procs, args.timeout)
    finally:
        shutil.rmtree(fifo_dir, ignore_errors=True)
        for s in segs:
            s.close()
            s.unlink()
