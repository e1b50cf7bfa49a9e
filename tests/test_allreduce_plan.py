"""Which all-reduce a call gets (daemon/allreduce_plan.py), without sockets."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pccl_py.daemon.allreduce_plan import choose, overlap
from pccl_py.errors import InvalidUsage

SMALL = 64 << 10


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()  # collectives make their futures on it; nothing runs
    yield lp
    lp.close()


@pytest.mark.parametrize("nbytes,shm_ok,shm_on,want", [
    (4, True, True, "direct"),
    (SMALL, True, True, "direct"),  # the crossover is inclusive
    (SMALL + 4, True, True, "shm"),
    (SMALL + 4, True, False, "ring"),  # shared memory turned off
    (SMALL + 4, False, True, "ring"),  # a peer elsewhere
    (1 << 30, False, False, "ring"),
])
def test_auto_takes_direct_then_shared_memory_then_the_ring(nbytes, shm_ok, shm_on, want):
    assert choose(nbytes, "auto", None, shm_ok=shm_ok, shm_on=shm_on, direct_max_bytes=SMALL) == want


@pytest.mark.parametrize("algorithm", ["ring", "direct", "auto", "shm"])
def test_quantization_decides_whatever_the_algorithm(algorithm):
    assert choose(1 << 20, algorithm, "uint8", shm_ok=True, shm_on=True, direct_max_bytes=SMALL) == "quant"


def test_a_named_algorithm_is_honoured_at_every_size():
    for nbytes in (4, SMALL, 1 << 26):
        assert choose(nbytes, "ring", None, shm_ok=True, shm_on=True, direct_max_bytes=SMALL) == "ring"
        assert choose(nbytes, "direct", None, shm_ok=False, shm_on=True, direct_max_bytes=SMALL) == "direct"
        assert choose(nbytes, "shm", None, shm_ok=True, shm_on=False, direct_max_bytes=SMALL) == "shm"


def test_shared_memory_asked_for_where_the_group_cannot_is_refused_with_the_reason():
    with pytest.raises(InvalidUsage, match="every peer of the group on this host"):
        choose(1 << 20, "shm", None, shm_ok=False, shm_on=True, direct_max_bytes=SMALL)


def test_overlap_tells_apart_same_and_partial_ranges():
    buf = memoryview(np.zeros(64, np.uint8))
    assert overlap(buf[:32], buf[32:]) is None
    assert overlap(buf[:32], buf[:32]) == "same"
    assert overlap(buf[:32], buf[16:48]) == "partial"
    assert overlap(buf[:0], buf[:32]) is None
    assert overlap(buf, memoryview(np.zeros(64, np.uint8))) is None


class _View:
    """What plan_all_reduce reads of the group's Link (nothing is sent)."""

    def __init__(self, world: int, colocated: bool = False) -> None:
        self.world, self.rank, self.colocated = world, 0, colocated
        self.group, self.epoch = 0, 1
        self.ids = [f"p{r}" for r in range(world)]


def _plan(world=2, n=16, dtype="float32", algorithm="auto", quant=None, src=None, dst=None, tag=1,
          timeout=5.0, shm_refs=None, group=None, loop=None):
    from pccl_py.daemon.allreduce_plan import plan_all_reduce
    from pccl_py.daemon.dataplane import DataPlaneConfig

    src = np.ones(n, np.float32) if src is None else src
    dst = np.zeros_like(src) if dst is None else dst
    return plan_all_reduce(group or (lambda: _View(world)), src, dst, dtype=dtype, op="sum", quant=quant,
                           algorithm=algorithm, tag=tag, timeout=timeout, config=DataPlaneConfig(),
                           shm_refs=shm_refs, shm=None, worker=None, loop=loop)


def test_a_world_of_one_is_the_input_copied_and_no_collective():
    src = np.arange(8, dtype=np.float32)
    dst = np.zeros_like(src)
    assert _plan(world=1, src=src, dst=dst) is None
    assert np.array_equal(dst, src)


@pytest.mark.parametrize("world,n,algorithm,quant,cls,name", [
    (2, 1, "auto", None, "DirectAllReduce", "direct"),
    (3, 1, "auto", None, "RootedAllReduce", "direct"),  # tiny, three or more: through rank 0
    (3, 4096, "auto", None, "DirectAllReduce", "direct"),  # above TINY_BYTES
    (3, 1 << 16, "auto", None, "RingAllReduce", "ring"),
    (2, 16, "ring", None, "RingAllReduce", "ring"),
    (2, 1 << 16, "auto", "uint8", "QuantAllReduce", "quant"),
])
def test_each_call_gets_its_collective_and_reports_its_algorithm(world, n, algorithm, quant, cls, name, loop):
    from pccl_py.wire import frames as F

    make, w, algo = _plan(world=world, n=n, algorithm=algorithm, quant=quant, loop=loop)
    coll = make(0)
    assert (type(coll).__name__, w, algo) == (cls, world, name)
    assert coll.attempt == 0 and make(3).attempt == 3
    if cls == "DirectAllReduce":  # the call's fingerprint names the algorithm peers compare
        assert coll.desc == F.descriptor("all_reduce", "float32", "sum", n, "direct", None)


def test_an_in_place_direct_call_reads_a_copy_of_its_input(loop):
    buf = np.arange(16, dtype=np.float32)
    make, _, _ = _plan(src=buf, dst=buf, loop=loop)
    make(0)
    buf[:] = -1  # the first attempt wrote its result into dst, which is src
    retry = make(1)  # a retry contributes the caller's input, not that result
    assert np.array_equal(np.frombuffer(retry.slot(0), np.float32), np.arange(16, dtype=np.float32))


def test_bad_arguments_are_refused_in_argument_order_before_the_group_is_asked():
    asked = []

    def group():
        asked.append(1)
        return _View(2)

    with pytest.raises(InvalidUsage, match="dtype"):
        _plan(dtype="complex64", tag=-1, group=group)
    with pytest.raises(InvalidUsage, match="bytes"):
        _plan(src=np.ones(4, np.float32), dst=np.ones(5, np.float32), tag=-1, group=group)
    with pytest.raises(InvalidUsage, match="tag"):
        _plan(tag=-1, timeout=-1, group=group)
    with pytest.raises(InvalidUsage, match="timeout"):
        _plan(timeout=-1, group=group)
    assert not asked
    with pytest.raises(InvalidUsage, match="every peer of the group on this host"):
        _plan(algorithm="shm", group=group)
    assert asked
