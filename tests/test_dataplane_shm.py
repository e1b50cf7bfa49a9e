"""The shared-memory all-reduce (co-located group): N DataPlanes in one event loop whose
tensors live in real POSIX shared-memory segments, as a daemon's client calls do.

Correctness over world x size x dtype x op (exact inputs), bit parity with rounding,
the lease check (a peer whose call ended while being read fails the call everywhere),
peers lost mid-call, and the refusal of bad READY frames.
"""

from __future__ import annotations

import _posixshmem
import asyncio
import mmap
import os
import time
import uuid
from multiprocessing import shared_memory

import numpy as np
import pytest
from test_dataplane import NP, assert_parity_near_exact, cluster, make_inputs, reference, run, topo

from pccl_py import kernels as K
from pccl_py.collectives import shm as S
from pccl_py.daemon.dataplane import DataPlaneConfig
from pccl_py.errors import Aborted, InvalidUsage, PeerLost, SegmentLost

pytestmark = pytest.mark.timeout(90)


class Seg:
    """One peer's input and output in a shared-memory segment, as a client lays them out."""

    def __init__(self, count: int, dtype: str, src: np.ndarray, in_place: bool = False):
        self.nbytes = count * K.itemsize(dtype)
        self.in_off = 64
        self.out_off = self.in_off if in_place else 64 + self.nbytes + 1024
        self.name = f"pccl_t{uuid.uuid4().hex[:12]}"
        size = self.out_off + self.nbytes + 64
        fd = _posixshmem.shm_open("/" + self.name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.src = np.frombuffer(self.mm, np.uint8, self.nbytes, self.in_off)
        self.dst = np.frombuffer(self.mm, np.uint8, self.nbytes, self.out_off)
        if not in_place:
            self.dst[:] = 0x55
        self.src[:] = src.view(np.uint8).reshape(-1)
        self.refs = (self.name, self.in_off, self.name, self.out_off)

    def out(self, dtype: str) -> np.ndarray:
        return self.dst.view(np.uint16 if dtype == "bfloat16" else NP[dtype]).copy()

    def close(self) -> None:  # the mapping itself goes with the last view
        _posixshmem.shm_unlink("/" + self.name)


def post(dp, seg: Seg, *, dtype, op, tag, algorithm="shm", timeout=20.0):
    return dp.all_reduce(seg.src, seg.dst, dtype=dtype, op=op, algorithm=algorithm, tag=tag, timeout=timeout,
                         shm_refs=seg.refs)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shm_matrix_exact_and_parity(world):
    failures = []

    async def body():
        async with cluster(world) as dps:
            tag = 0
            for count in (1, 2, 7, 1031, 300_007):
                for dtype in ("float32", "bfloat16", "int32", "float64", "uint8"):
                    for op in K.OPS:
                        if count > 2000 and op in ("prod", "min"):
                            continue
                        tag += 1
                        srcs = make_inputs(world, count, dtype, op, seed=tag)
                        segs = [Seg(count, dtype, s) for s in srcs]
                        try:
                            infos = await asyncio.gather(*(post(dps[i], segs[i], dtype=dtype, op=op, tag=tag)
                                                           for i in range(world)))
                            want = reference(srcs, dtype, op).tobytes()
                            for r in range(world):
                                if segs[r].dst.tobytes() != want:
                                    failures.append(f"N={world} {count} {dtype} {op}: rank {r} wrong")
                                if segs[r].src.tobytes() != srcs[r].view(np.uint8).tobytes():
                                    failures.append(f"N={world} {count} {dtype} {op}: src {r} modified")
                            assert all(i["algorithm"] == "shm" for i in infos)
                        finally:
                            for s in segs:
                                s.close()

    run(body(), timeout=80)
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shm_in_place_calls_mixed_with_two_region_calls(world):
    """A client reduces plain arrays in place in one region (output = input). Peers mix
    both layouts; results are exact and equal everywhere, over several fold blocks."""
    async def body():
        async with cluster(world) as dps:
            tag = 0
            for count in (1, 1031, 3 * (S._BLOCK // 4) + 5):
                for dtype, op in (("float32", "sum"), ("float32", "avg"), ("int32", "max"), ("float64", "sum")):
                    tag += 1
                    srcs = make_inputs(world, count, dtype, op, seed=tag)
                    segs = [Seg(count, dtype, s, in_place=(r + tag) % 3 != 0) for r, s in enumerate(srcs)]
                    assert any(s.in_off == s.out_off for s in segs)
                    try:
                        infos = await asyncio.gather(*(post(dps[i], segs[i], dtype=dtype, op=op, tag=tag)
                                                       for i in range(world)))
                        assert {i["algorithm"] for i in infos} == {"shm"}
                        want = reference(srcs, dtype, op).tobytes()
                        for r in range(world):
                            assert segs[r].dst.tobytes() == want, f"N={world} {count} {dtype} {op}: rank {r}"
                    finally:
                        for s in segs:
                            s.close()

    run(body(), timeout=80)


def test_in_place_calls_on_every_algorithm_and_partial_overlap_refused():
    """src and dst the same range: every algorithm gives the reference; a partial overlap
    is refused by the shared-memory path (whose owners read inputs while writing outputs)."""
    async def body():
        async with cluster(3) as dps:
            tag = 0
            for algorithm, count, quant in (("direct", 5, None), ("direct", 3000, None), ("ring", 40_000, None),
                                            ("auto", 40_000, "uint8"), ("shm", 40_000, None)):
                tag += 1
                srcs = make_inputs(3, count, "float32", "sum", seed=tag)
                segs = [Seg(count, "float32", s, in_place=True) for s in srcs]
                try:
                    await asyncio.gather(*(dps[i].all_reduce(segs[i].src, segs[i].dst, dtype="float32", op="sum",
                                                             quant=quant, algorithm=algorithm, tag=tag,
                                                             timeout=20, shm_refs=segs[i].refs)
                                           for i in range(3)))
                    outs = [s.out("float32") for s in segs]
                    for o in outs[1:]:
                        assert o.tobytes() == outs[0].tobytes(), (algorithm, quant)
                    want = reference(srcs, "float32", "sum")
                    if quant is None:
                        assert outs[0].tobytes() == want.tobytes(), algorithm
                    else:  # each input quantized once, the owner's sum once more (half a step each)
                        bound = (sum(float(np.ptp(s)) for s in srcs) + float(np.ptp(want))) / 255 / 2 + 1e-5
                        assert np.abs(outs[0] - want).max() <= bound
                finally:
                    for s in segs:
                        s.close()
            seg = Seg(1000, "float32", np.ones(1000, np.float32))
            try:
                with pytest.raises(InvalidUsage, match="apart or the same range"):
                    await dps[0].all_reduce(seg.src[:3000], seg.src[1000:], dtype="float32", op="sum",
                                            algorithm="shm", tag=99, timeout=5, shm_refs=seg.refs)
            finally:
                seg.close()

    run(body(), timeout=80)


@pytest.mark.parametrize("world", [3, 4])
def test_shm_bit_parity_with_rounding_and_auto_choice(world):
    async def body():
        async with cluster(world) as dps:
            rng = np.random.default_rng(world)
            for tag, (dtype, op) in enumerate([("float32", "sum"), ("float32", "avg"), ("float16", "sum"),
                                                ("float64", "prod")], 1):
                scale = 1.5 if op == "prod" else 100.0
                srcs = [(rng.standard_normal(50_001) * scale).astype(NP[dtype]) for _ in range(world)]
                segs = [Seg(50_001, dtype, s) for s in srcs]
                try:
                    infos = await asyncio.gather(*(post(dps[i], segs[i], dtype=dtype, op=op, tag=tag,
                                                        algorithm="auto") for i in range(world)))
                    assert {i["algorithm"] for i in infos} == {"shm"}  # 50k elements: above the direct exchange
                    outs = [s.out(dtype) for s in segs]
                    rel = assert_parity_near_exact(outs, srcs, dtype, op)
                    # the TCP ring on the same inputs: same values within rounding
                    ring_outs = [np.empty_like(x) for x in srcs]
                    ring = await asyncio.gather(*(dps[i].all_reduce(srcs[i], ring_outs[i], dtype=dtype,
                                                                    op=op, algorithm="ring", tag=100 + tag,
                                                                    timeout=20)
                                                  for i in range(world)))
                    assert {i["algorithm"] for i in ring} == {"ring"}
                    np.testing.assert_allclose(ring_outs[0].astype(np.float64), outs[0].astype(np.float64),
                                               rtol=rel, atol=rel * 100)
                finally:
                    for s in segs:
                        s.close()

    run(body())


def test_shm_needs_refs_and_a_shared_host():
    async def body():
        async with cluster(2) as dps:
            x = np.ones(100_000, np.float32)
            # no refs: auto takes the ring, an explicit shm is refused
            infos = await asyncio.gather(*(d.all_reduce(x, np.empty_like(x), dtype="float32", op="sum", tag=1,
                                                        timeout=20) for d in dps))
            assert {i["algorithm"] for i in infos} == {"ring"}
            with pytest.raises(InvalidUsage, match="shm"):
                await dps[0].all_reduce(x, np.empty_like(x), dtype="float32", op="sum", tag=2, timeout=5,
                                        algorithm="shm")
        async with cluster(2, config=DataPlaneConfig(shm=False)) as dps:
            segs = [Seg(100_000, "float32", np.ones(100_000, np.float32)) for _ in dps]
            try:
                infos = await asyncio.gather(*(post(d, s, dtype="float32", op="sum", tag=1, algorithm="auto")
                                               for d, s in zip(dps, segs)))
                assert {i["algorithm"] for i in infos} == {"ring"}  # shm disabled by configuration
                assert np.all(segs[0].out("float32") == 2.0)
            finally:
                for s in segs:
                    s.close()

    run(body())


@pytest.mark.parametrize("world", [2, 3, 4])
def test_the_last_finisher_alone_sends_fin_all(world, monkeypatch):
    """Every peer records its finished chunk on rank 0's arrival mask; the one that completes
    it sends FIN_ALL to each other peer, and nobody sends a plain FIN: N-1 FIN frames per
    call instead of N(N-1)."""
    from pccl_py.daemon.streams import Stream
    from pccl_py.wire import frames as F

    fins = []
    real = Stream.write

    def spy(self, header, payload):
        h = F.decode_header(header[:F.HEADER_SIZE])
        if h.kind == F.FIN:
            fins.append((self.dp.peer_id, h.tag, h.fin))
        return real(self, header, payload)

    monkeypatch.setattr(Stream, "write", spy)

    async def body():
        async with cluster(world) as dps:
            segs = [Seg(5000, "float32", np.full(5000, i + 1.0, np.float32)) for i in range(world)]
            try:
                for tag in (1, 2, 3):
                    await asyncio.gather(*(post(dps[i], segs[i], dtype="float32", op="sum", tag=tag)
                                           for i in range(world)))
                    want = world * (world + 1) / 2
                    assert all(np.all(s.out("float32") == want) for s in segs)
                    got = [f for f in fins if f[1] == tag]
                    assert len(got) == world - 1, got
                    assert {step for _, _, step in got} == {F.FIN_ALL}
                    assert len({sender for sender, _, _ in got}) == 1  # one peer speaks for all
                for dp in dps:  # every lease slot was given back
                    assert len(dp._shm._free) == S.LEASE_SLOTS
            finally:
                for s in segs:
                    s.close()

    run(body())


@pytest.mark.parametrize("who,word,text", [
    (1, 0, "being read"),  # peer 1's lease: its memory is no longer guaranteed while read
    (0, 8, "before every chunk was reduced"),  # rank 0's arrival word: another call's by now
])
def test_a_cleared_slot_word_fails_the_call_everywhere(who, word, text):
    """A word of a peer's lease slot is cleared under a running call, as if that peer had
    ended it: nobody may succeed with what was read, or mark another call's arrivals."""
    async def body():
        async with cluster(2) as dps:
            count = 1000
            segs = [Seg(count, "float32", np.full(count, i + 1.0, np.float32)) for i in range(2)]
            try:
                first = asyncio.ensure_future(post(dps[who], segs[who], dtype="float32", op="sum", tag=7))
                deadline = time.monotonic() + 10
                while 7 not in dps[who]._ops or dps[who]._ops[7].lease is None:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.001)
                slot = dps[who]._ops[7].lease[1]
                K.store_u64(dps[who]._shm._lease_seg.buf, slot * S.SLOT + word, 0)
                res = await asyncio.gather(first, post(dps[1 - who], segs[1 - who], dtype="float32", op="sum",
                                                       tag=7), return_exceptions=True)
                assert all(isinstance(r, Aborted) for r in res), res
                assert any(text in str(r) for r in res), res
                # the slots were given back: the next call succeeds
                await asyncio.gather(*(post(dps[i], segs[i], dtype="float32", op="sum", tag=8) for i in range(2)))
                assert np.all(segs[0].out("float32") == 3.0) and np.all(segs[1].out("float32") == 3.0)
                assert len(dps[0]._shm._free) == len(dps[1]._shm._free) == S.LEASE_SLOTS
            finally:
                for s in segs:
                    s.close()

    run(body())


def _crash(dp) -> None:
    """The peer's process dies: its links break, no ERROR is sent, and its memory stays as
    it was (a dead daemon clears no lease)."""
    dp._shm.release = lambda slot, name=None: None
    for c in list(dp._conns):
        if c.transport is not None:
            c.transport.abort()


def _slow_fold(dp, delay: float) -> None:
    loop = asyncio.get_running_loop()
    inline = dp._shm.run
    dp._shm.run = lambda lp, nbytes, fn, done: loop.call_later(delay, inline, lp, nbytes, fn, done)


@pytest.mark.parametrize("when", ["before its bit", "after its bit", "instead of FIN_ALL"])
def test_a_peer_lost_fails_the_call_only_before_its_chunk_is_in(when, monkeypatch):
    """A peer that dies once its bit is in rank 0's arrival mask has written its chunk
    everywhere: the others still succeed, also when it was the one completing the mask and
    died before its FIN_ALL went out (the others find the mask full when its link breaks).
    One that dies before its bit leaves the mask short for good: every survivor fails, and
    nobody can have succeeded."""
    async def body():
        async with cluster(3) as dps:
            victim = dps[2]
            arrive, complete = S.ShmAllReduce._arrive, S.ShmAllReduce.complete_all

            def patched_arrive(self):
                if self.link.dp is not victim:
                    arrive(self)
                elif when == "before its bit":
                    _crash(victim)
                else:
                    arrive(self)
                    if when == "after its bit":
                        _crash(victim)

            def patched_complete(self):
                if self.link.dp is victim and when == "instead of FIN_ALL":
                    _crash(victim)
                else:
                    complete(self)

            monkeypatch.setattr(S.ShmAllReduce, "_arrive", patched_arrive)
            monkeypatch.setattr(S.ShmAllReduce, "complete_all", patched_complete)
            # the victim arrives first, or (to be the one completing the mask) last
            for dp in ([victim] if when == "instead of FIN_ALL" else dps[:2]):
                _slow_fold(dp, 0.05)
            count = 300_000
            segs = [Seg(count, "float32", np.full(count, i + 1.0, np.float32)) for i in range(3)]
            try:
                futs = [asyncio.ensure_future(post(dps[i], segs[i], dtype="float32", op="sum", tag=5, timeout=10))
                        for i in range(3)]
                res = await asyncio.wait_for(asyncio.gather(*futs[:2], return_exceptions=True), 8)
                if when == "before its bit":
                    assert all(isinstance(r, PeerLost) for r in res), res
                else:
                    assert not any(isinstance(r, BaseException) for r in res), res
                    assert np.all(segs[0].out("float32") == 6.0) and np.all(segs[1].out("float32") == 6.0)
                futs[2].cancel()
            finally:
                for s in segs:
                    s.close()

    run(body())


def test_peer_lost_mid_call_then_retry():
    async def body():
        async with cluster(3) as dps:
            count = 2_000_000
            srcs = [np.full(count, i + 1.0, np.float32) for i in range(3)]
            segs = [Seg(count, "float32", s) for s in srcs]
            try:
                # the victim never posts: survivors wait for its READY, then it goes away
                futs = [asyncio.ensure_future(post(dps[i], segs[i], dtype="float32", op="sum", tag=1))
                        for i in (0, 1)]
                await asyncio.sleep(0.05)
                t0 = time.monotonic()
                await dps[2].close()
                res = await asyncio.gather(*futs, return_exceptions=True)
                assert all(isinstance(r, (PeerLost, Aborted)) for r in res), res
                assert time.monotonic() - t0 < 2.0
                for i in (0, 1):
                    assert segs[i].src.tobytes() == srcs[i].view(np.uint8).tobytes()
                t = topo(dps, 2, [0, 1])
                await asyncio.gather(*(dps[i].set_topology(t[i]) for i in (0, 1)))
                assert "peer2" not in dps[0]._shm._maps
                await asyncio.gather(*(post(dps[i], segs[i], dtype="float32", op="sum", tag=1) for i in (0, 1)))
                assert np.all(segs[0].out("float32") == 3.0) and np.all(segs[1].out("float32") == 3.0)
            finally:
                for s in segs:
                    s.close()

    run(body())


def test_a_missing_peer_segment_or_lease_fails_the_call_as_retryable():
    """A peer's segment can be missing from /dev/shm: its client retired it after the call
    failed there, or something removed the name. Either way the call fails as retryable
    (``SegmentLost``, an ``Aborted``, naming the segment where it was missing; the owner gets
    the peer's abort), whether it holds a call's tensors or the owner daemon's leases, and
    the next call with segments that exist succeeds."""
    async def body():
        async with cluster(2) as dps:
            segs = [Seg(1000, "float32", np.full(1000, i + 1.0, np.float32)) for i in range(2)]
            try:
                segs[1].close()  # unlinked, as after a failed call or by a tmpfs cleaner
                res = await asyncio.gather(*(post(dps[i], segs[i], dtype="float32", op="sum", tag=1)
                                             for i in range(2)), return_exceptions=True)
                assert all(isinstance(r, Aborted) for r in res), res
                assert isinstance(res[0], SegmentLost) and res[0].segment == segs[1].name, res[0]
                acquire = dps[1]._shm.acquire
                dps[1]._shm.acquire = lambda: ("pccl_lease_absent0", 0, 1)
                fresh = Seg(1000, "float32", np.full(1000, 2.0, np.float32))
                try:
                    res = await asyncio.gather(post(dps[0], segs[0], dtype="float32", op="sum", tag=2),
                                               post(dps[1], fresh, dtype="float32", op="sum", tag=2),
                                               return_exceptions=True)
                    assert all(isinstance(r, Aborted) for r in res), res
                    assert isinstance(res[0], SegmentLost) and res[0].segment == "pccl_lease_absent0", res[0]
                    dps[1]._shm.acquire = acquire
                    fresh.src[:] = np.full(1000, 2.0, np.float32).view(np.uint8)
                    segs[0].src[:] = np.full(1000, 1.0, np.float32).view(np.uint8)
                    await asyncio.gather(post(dps[0], segs[0], dtype="float32", op="sum", tag=3),
                                         post(dps[1], fresh, dtype="float32", op="sum", tag=3))
                    assert np.all(segs[0].out("float32") == 3.0) and np.all(fresh.out("float32") == 3.0)
                finally:
                    fresh.close()
            finally:
                segs[0].close()

    run(body())


def test_a_lease_segment_removed_from_dev_shm_is_replaced():
    """A daemon's lease segment whose name a cleaner removed is replaced at its next call, so
    peers that never mapped it (a newcomer) can; calls that held a slot in the old one keep
    it until they end, and then it is unmapped."""
    async def body():
        async with cluster(2) as dps:
            old = dps[0]._shm.lease_name
            _posixshmem.shm_unlink("/" + old)
            segs = [Seg(1000, "float32", np.full(1000, i + 1.0, np.float32)) for i in range(2)]
            try:
                await asyncio.gather(*(post(dps[i], segs[i], dtype="float32", op="sum", tag=1)
                                       for i in range(2)))
                assert all(np.all(s.out("float32") == 3.0) for s in segs)
                assert dps[0]._shm.lease_name != old
            finally:
                for s in segs:
                    s.close()

    run(body())
    ctx = S.ShmContext()
    try:
        first = ctx.acquire()  # a call in flight holds this slot
        _posixshmem.shm_unlink("/" + first[0])
        second = ctx.acquire()
        assert second[0] != first[0] and first[0] in ctx._old_leases
        assert K.load_u64(ctx.lease_buf(first[0]), first[1] * S.SLOT) == first[2]
        ctx.release(first[1], first[0])  # the last slot of the old one: it goes
        assert not ctx._old_leases
        ctx.release(second[1], second[0])
        assert len(ctx._free) == S.LEASE_SLOTS
    finally:
        ctx.close()


def test_bad_segment_names_are_refused():
    ctx = S.ShmContext()
    try:
        for bad in ("../etc/passwd", "psm_1234", "pccl_" + "x" * 200, "pccl_a/b"):
            with pytest.raises(InvalidUsage):
                ctx.view("p", bad, 0, 8)
        with pytest.raises(SegmentLost, match="not in /dev/shm"):  # e.g. retired after a failed call
            ctx.view("p", "pccl_doesnotexist0", 0, 8)
        seg = shared_memory.SharedMemory(create=True, size=4096, name=f"pccl_t{uuid.uuid4().hex[:12]}")
        try:
            with pytest.raises(InvalidUsage, match="bytes"):
                ctx.view("p", seg.name.lstrip("/"), 4000, 200)
            v = ctx.view("p", seg.name.lstrip("/"), 0, 16)
            assert v.readonly
            del v
        finally:
            seg.close()
            seg.unlink()
    finally:
        ctx.close()


def test_leases_are_checked_once_before_fin(monkeypatch):
    """Once FIN is out, a peer may finish and clear its lease at any moment: a second check
    after that would fail a call that succeeded (seen at N=3 as spurious 'torn' errors when
    frames arrived while the fold still ran)."""
    loads = []
    real = K.load_u64

    def counting(buf, off):
        loads.append(off)
        return real(buf, off)

    monkeypatch.setattr(S.K, "load_u64", counting)

    async def body():
        async with cluster(3) as dps:
            loop = asyncio.get_running_loop()
            inline = dps[0]._shm.run

            def slow_fold(lp, nbytes, fn, done):  # rank 0 folds late: its FIN comes last
                if nbytes > 100_000:
                    loop.call_later(0.05, inline, lp, nbytes, fn, done)
                else:
                    inline(lp, nbytes, fn, done)

            dps[0]._shm.run = slow_fold
            segs = [Seg(30_000, "float32", np.full(30_000, i + 1.0, np.float32)) for i in range(3)]
            try:
                for tag in (1, 2, 3):
                    await asyncio.gather(*(post(dps[i], segs[i], dtype="float32", op="sum", tag=tag)
                                           for i in range(3)))
                assert all(np.all(s.out("float32") == 6.0) for s in segs)
            finally:
                for s in segs:
                    s.close()

    run(body())
    assert len(loads) == 3 * 3 * 2  # calls x peers x (the other two peers' leases)
