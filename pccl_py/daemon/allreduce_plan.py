"""Which all-reduce a call gets, and the collective that runs it: decisions, no I/O.

:func:`choose` is the rule (a pure function of the call's size, the world, what the caller
asked for and what the group allows); :func:`plan_all_reduce` checks a call's arguments,
applies the rule and returns how to build the collective for each attempt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pccl_py import calls
from pccl_py import kernels as K
from pccl_py.collectives.base import Collective
from pccl_py.collectives.direct import DirectAllReduce, RootedAllReduce
from pccl_py.collectives.quant import QuantAllReduce
from pccl_py.collectives.ring import RingAllReduce
from pccl_py.collectives.shm import MAX_WORLD as SHM_MAX_WORLD
from pccl_py.collectives.shm import VERSION as SHM_VERSION
from pccl_py.collectives.shm import ShmAllReduce
from pccl_py.errors import InvalidUsage
from pccl_py.wire import frames as F


def choose(nbytes: int, algorithm: str, quant: str | None, *, shm_ok: bool, shm_on: bool,
           direct_max_bytes: int) -> str:
    """The algorithm a call runs: ``quant``, ``direct``, ``shm`` or ``ring``.

    ``auto`` takes the direct exchange up to ``direct_max_bytes``, then shared memory where
    the group allows it (``shm_ok``: every peer on this host, the tensors in shared memory)
    and it is on (``shm_on``), else the ring. A named algorithm is honoured, ``shm`` only
    where the group allows it."""
    if quant is not None:
        return "quant"
    if algorithm == "auto":
        return "direct" if nbytes <= direct_max_bytes else "shm" if shm_ok and shm_on else "ring"
    if algorithm == "shm" and not shm_ok:
        raise InvalidUsage(f"algorithm 'shm' needs every peer of the group on this host (the same data "
                           f"address), at most {SHM_MAX_WORLD} of them, and the tensors in shared memory "
                           f"(a daemon's client call)")
    return algorithm


def overlap(s: memoryview, d: memoryview) -> str | None:
    """None when ``s`` and ``d`` are apart, "same" for one range, "partial" otherwise."""
    if not len(s) or not len(d):
        return None
    a = np.frombuffer(s, np.uint8).__array_interface__["data"][0]
    b = np.frombuffer(d, np.uint8).__array_interface__["data"][0]
    if a + len(s) <= b or b + len(d) <= a:
        return None
    return "same" if a == b and len(s) == len(d) else "partial"


def plan_all_reduce(group: Callable[[], Any], src, dst, *, dtype: str, op: str, quant: str | None,
                    algorithm: str, tag: int, timeout: float, config: Any, shm_refs, shm, worker, loop
                    ) -> tuple[Callable[[int], Collective], int, str] | None:
    """``(make(attempt) -> Collective, world, algorithm)`` for one call over ``group()`` (the
    group's ``Link``, asked for once the arguments are checked), or None when the world is
    this peer alone (``dst`` then holds the result). ``config`` is the data plane's
    ``DataPlaneConfig``; bad arguments raise ``InvalidUsage`` here, in argument order."""
    calls.check_all_reduce(dtype, op, quant, algorithm)
    s = calls.byte_view(src, "src")
    d = calls.byte_view(dst, "dst", writable=True)
    if len(s) != len(d):
        raise InvalidUsage(f"src has {len(s)} bytes but dst has {len(d)}")
    calls.check_whole_elements(len(s), dtype)
    calls.check_tag(tag)
    calls.check_timeout(timeout)
    view = group()
    count = len(s) // K.itemsize(dtype)
    world = view.world
    if world == 1:
        np.copyto(np.frombuffer(d, np.uint8), np.frombuffer(s, np.uint8))
        return None
    cfg = config
    shm_ok = shm_refs is not None and view.colocated and len(s) > 0 and world <= SHM_MAX_WORLD
    algo = choose(len(s), algorithm, quant, shm_ok=shm_ok, shm_on=cfg.shm, direct_max_bytes=cfg.direct_max_bytes)
    both = None if type(src) is bytes else overlap(s, d)  # bytes cannot be written
    if both and algo not in ("ring", "shm"):
        s = bytes(s)  # an in-place call: these collectives read src after writing dst
    elif both == "partial" and algo == "shm":
        raise InvalidUsage("the shared-memory all-reduce takes src and dst either apart or the same range")
    common = dict(loop=loop, tag=tag)
    if algo == "ring":
        desc = F.descriptor("all_reduce", dtype, op, count, algo, None, cfg.sub_bytes, cfg.min_sub_bytes,
                            cfg.pipeline_depth)
        make = lambda attempt: RingAllReduce(view, src=s, dst=d, dtype=dtype, op=op, count=count,  # noqa: E731
                                             sub_bytes=cfg.sub_bytes, min_stripe=cfg.min_stripe,
                                             min_sub_bytes=cfg.min_sub_bytes, depth=cfg.pipeline_depth,
                                             attempt=attempt, desc=desc, **common)
    elif algo == "shm":
        desc = F.descriptor("all_reduce", dtype, op, count, algo, None, SHM_VERSION)
        make = lambda attempt: ShmAllReduce(view, src=s, dst=d, dtype=dtype, op=op, count=count,  # noqa: E731
                                            refs=shm_refs, ctx=shm, attempt=attempt, desc=desc, **common)
    elif algo == "direct" and world >= 3 and 0 < len(s) <= F.TINY_BYTES:
        desc = F.descriptor("all_reduce", dtype, op, count, "rooted", None)
        make = lambda attempt: RootedAllReduce(view, src=s, dst=d, dtype=dtype, op=op, count=count,  # noqa: E731
                                               attempt=attempt, desc=desc, **common)
    elif algo == "direct":
        desc = F.descriptor("all_reduce", dtype, op, count, algo, None)
        make = lambda attempt: DirectAllReduce(view, src=s, dst=d, dtype=dtype, op=op, count=count,  # noqa: E731
                                               min_stripe=cfg.min_stripe, attempt=attempt, desc=desc, **common)
    else:
        desc = F.descriptor("all_reduce", dtype, op, count, algo, quant, cfg.quant_block_bytes)
        make = lambda attempt: QuantAllReduce(view, src=s, dst=d, op=op, count=count, quant=quant,  # noqa: E731
                                              block_bytes=cfg.quant_block_bytes, worker=worker, attempt=attempt,
                                              desc=desc, **common)
    return make, world, algo
