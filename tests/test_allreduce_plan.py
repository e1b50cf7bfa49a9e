"""Which all-reduce a call gets (daemon/allreduce_plan.py), without sockets."""

from __future__ import annotations

import numpy as np
import pytest

from pccl_py.daemon.allreduce_plan import choose, overlap
from pccl_py.errors import InvalidUsage

SMALL = 64 << 10


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
