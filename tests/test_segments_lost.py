"""Shared-memory segments whose name vanishes from /dev/shm (a tmpfs cleaner, another
process), end to end: two trainers on this host, whose daemons all-reduce through each
other's segments (calls over 64 KiB: ``algorithm="auto"`` takes the shared-memory path).

  (a) a pool segment removed after its daemon mapped it: while idle in the pool (replaced
      before the next call), or between the mapping and the peers' (the call fails with
      ``SegmentLost`` on both sides, its retry runs at once on a fresh segment);
  (b) a segment removed before the daemon maps it (made again, the call never fails);
  (c) an ``alloc()`` array's own file removed (the array is copied, into its twin when the
      call covers it whole, after which it lives in a named file again).

Every test checks the results, that later calls keep working, and that no segment its
clients made is left in /dev/shm.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time

import numpy as np
import pytest
from test_client import joined_pair

from pccl_py import Aborted, InvalidUsage, SegmentLost
from pccl_py.client import segments as CS

pytestmark = pytest.mark.timeout(120)

N = 1 << 17  # float32: 512 KiB per call, well past the direct exchange's 64 KiB


@pytest.fixture
def made(monkeypatch):
    """Names of every segment the clients of the test create; none may be left at the end."""
    names: list[str] = []
    create = CS.create_segment

    def recording(size, *a, **kw):
        seg = create(size, *a, **kw)
        names.append(seg.name)
        return seg

    monkeypatch.setattr(CS, "create_segment", recording)
    yield names
    left = [n for n in names if os.path.exists(f"/dev/shm/{n}")]
    assert not left, f"segments left in /dev/shm: {left}"


def remove(name: str) -> None:
    """What a tmpfs cleaner does: the name goes, the mappings stay."""
    os.unlink(f"/dev/shm/{name}")


def both(a, b, xa, xb, **kw) -> list:
    """One all-reduce on both peers at once; each side's info or exception."""
    with cf.ThreadPoolExecutor(2) as ex:
        futs = [ex.submit(c.all_reduce, x, **kw) for c, x in ((a, xa), (b, xb))]
        out = []
        for f in futs:
            try:
                out.append(f.result(timeout=60))
            except Exception as exc:  # noqa: BLE001 - the test looks at it
                out.append(exc)
        return out


def summed(a, b, xa, xb, step: int, **kw) -> list[dict]:
    """Fill both inputs for ``step``, all-reduce, check the sum on both; the infos."""
    xa[...] = step + 1.0
    xb[...] = 2.0 * (step + 1)
    infos = both(a, b, xa, xb, **kw)
    for info in infos:
        assert isinstance(info, dict), info
        assert info["algorithm"] == "shm", info
    assert np.all(xa == 3.0 * (step + 1)) and np.all(xb == 3.0 * (step + 1))
    return infos


# -- (a) a pool segment loses its name after the daemon mapped it ------------------------


def test_a_pool_segment_removed_while_idle_is_replaced_before_the_next_call(coordinator, made):
    with joined_pair(coordinator) as (a, b):
        xa, xb = np.zeros(N, np.float32), np.zeros(N, np.float32)
        summed(a, b, xa, xb, 0)  # the peer's daemon has mapped a's segment by now
        for seg in list(a._pool.all):
            remove(seg.name)
        for step in range(1, 4):  # no call fails: the segment is replaced before it is named
            summed(a, b, xa, xb, step)


@pytest.mark.parametrize("retry", [False, True])
def test_a_pool_segment_removed_before_the_peers_map_it_fails_once_retryably(coordinator, made, monkeypatch,
                                                                              retry):
    """Its daemon mapped it, then the name went: the peer cannot map it. Both sides fail
    with ``SegmentLost`` (an ``Aborted``); the owner's names its own segment. With
    ``retry=True`` the call is repeated at once (no new membership to wait for) on a fresh
    segment and succeeds."""
    with joined_pair(coordinator, timeout=20.0) as (a, b):
        original, used = CS.map_segment, []

        def mapped_then_removed(rpc, name, size):
            original(rpc, name, size)
            if rpc is a._rpc and not used:
                used.append(name)
                remove(name)

        xa, xb = np.full(N, 1.0, np.float32), np.full(N, 2.0, np.float32)
        with monkeypatch.context() as m:
            m.setattr(CS, "map_segment", mapped_then_removed)
            t0 = time.monotonic()
            res = both(a, b, xa, xb, retry=retry)
            took = time.monotonic() - t0
        assert used
        if retry:
            assert all(isinstance(r, dict) for r in res), res
            assert np.all(xa == 3.0) and np.all(xb == 3.0)
            assert took < 5.0, took  # waited for no new epoch (that wait is up to 10 s)
        else:
            assert all(isinstance(r, SegmentLost) and isinstance(r, Aborted) for r in res), res
            assert res[0].segment == res[1].segment == used[0]  # both name a's segment
            assert used[0] not in [s.name for s in a._pool.all]  # dropped from the pool
            assert np.all(xa == 1.0) and np.all(xb == 2.0)  # untouched
        for step in range(3):
            summed(a, b, xa, xb, step)


# -- (b) a segment loses its name before the daemon maps it ------------------------------


def test_a_segment_removed_before_the_daemon_maps_it_is_made_again(coordinator, made, monkeypatch):
    """The daemon's ``map`` answers ``SegmentLost``: the client drops the segment, makes a
    fresh one and maps that; nothing reaches the peers, so the call never fails (nor does
    ``alloc()``)."""
    with joined_pair(coordinator) as (a, b):
        original, used, callers = CS.create_segment, [], set()

        def created_then_removed(size, *args, **kw):
            seg = original(size, *args, **kw)
            # the first segment of each side's call (each runs in a thread of its own), or of
            # alloc(): not "the first two made", which under load may both be one side's
            if threading.get_ident() not in callers:
                callers.add(threading.get_ident())
                used.append(seg.name)
                remove(seg.name)
            return seg

        xa, xb = np.full(N, 1.0, np.float32), np.full(N, 2.0, np.float32)
        with monkeypatch.context() as m:
            m.setattr(CS, "create_segment", created_then_removed)
            res = both(a, b, xa, xb)
            assert len(used) == 2 and all(isinstance(r, dict) for r in res), res
            assert np.all(xa == 3.0) and np.all(xb == 3.0)
            used.pop()
            ya = a.alloc(N)
            assert len(used) == 2
        yb = b.alloc(N)
        for step in range(3):
            summed(a, b, xa, xb, step)
            infos = summed(a, b, ya, yb, step)
            assert not infos[0]["input_copied"] and not infos[0]["result_copied"]
        del ya, yb


def test_a_daemon_that_never_finds_our_segments_is_misuse(coordinator, made, monkeypatch):
    """Twice in a row the daemon cannot find a fresh segment: it does not see this
    process's /dev/shm, which no retry fixes."""
    with joined_pair(coordinator) as (a, _):
        create = CS.create_segment

        def vanishing(size, *args, **kw):
            seg = create(size, *args, **kw)
            remove(seg.name)
            return seg

        with monkeypatch.context() as m:
            m.setattr(CS, "create_segment", vanishing)
            with pytest.raises(InvalidUsage, match="share /dev/shm"):
                a.alloc(N)


# -- (c) an alloc() array's own file loses its name ----------------------------------------


def test_an_allocated_array_whose_file_was_removed_moves_into_its_twin(coordinator, made):
    """A call over the whole array copies it into its twin (peers cannot map the array's
    file) and reduces it there; the twin's pages then take the array's place as usual, so
    the array lives in a named file again and the next calls copy nothing."""
    with joined_pair(coordinator) as (a, b):
        xa, xb = a.alloc(N), b.alloc(N)
        addr = xa.__array_interface__["data"][0]
        summed(a, b, xa, xb, 0)
        remove(a._allocs[0].cur)
        infos = summed(a, b, xa, xb, 1)
        assert infos[0]["input_copied"] and not infos[0]["result_copied"]
        assert not a._allocs[0].lost
        for step in range(2, 5):
            infos = summed(a, b, xa, xb, step)
            assert not infos[0]["input_copied"] and not infos[0]["result_copied"]
        assert xa.__array_interface__["data"][0] == addr
        del xa, xb


def test_an_allocated_array_without_a_twin_is_copied_once_its_file_was_removed(coordinator, made):
    """Without a twin (``double_buffer=False``), or for a call over part of the array, the
    array is reduced through a pool segment like a plain array, call after call."""
    with joined_pair(coordinator) as (a, b):
        xa, xb = a.alloc(N, double_buffer=False), b.alloc(N, double_buffer=False)
        ya, yb = a.alloc(2 * N), b.alloc(2 * N)
        remove(a._allocs[0].cur)
        remove(a._allocs[1].cur)
        for step in range(3):
            infos = summed(a, b, xa, xb, step)
            assert infos[0]["input_copied"] and infos[0]["result_copied"]
            infos = summed(a, b, ya[:N], yb[:N], step)  # a part of a double-buffered array
            assert infos[0]["input_copied"] and infos[0]["result_copied"]
        del xa, xb, ya, yb


def test_an_allocated_array_removed_during_a_call_is_retried_through_its_twin(coordinator, made, monkeypatch):
    """The array's file loses its name after the client checked it and before the peer
    maps it: the call fails with ``SegmentLost`` on both sides, its retry copies the array
    into a fresh twin and succeeds, and so do the calls after it."""
    with joined_pair(coordinator, timeout=20.0) as (a, b):
        xa, xb = a.alloc(N), b.alloc(N)
        original, used = CS.Alloc.refresh, []

        def checked_then_removed(rec):
            original(rec)
            if rec is a._allocs[0] and not used:
                used.append(rec.cur)
                remove(rec.cur)

        xa[:] = 1.0
        xb[:] = 2.0
        with monkeypatch.context() as m:
            m.setattr(CS.Alloc, "refresh", checked_then_removed)
            res = both(a, b, xa, xb)
        assert used and all(isinstance(r, SegmentLost) for r in res), res
        assert res[0].segment == used[0]
        assert np.all(xa == 1.0) and np.all(xb == 2.0)
        res = both(a, b, xa, xb, retry=True)
        assert all(isinstance(r, dict) for r in res), res
        assert np.all(xa == 3.0) and np.all(xb == 3.0)
        for step in range(3):
            infos = summed(a, b, xa, xb, step)
            assert not infos[0]["input_copied"]
        del xa, xb


def test_a_failed_page_move_leaves_the_array_in_its_file_with_the_result(coordinator, made, monkeypatch):
    """mremap(MREMAP_FIXED) unmaps its destination first; when the move then fails, the
    array's range may be empty (here: zero pages standing in for the hole, so that a
    copy into it does not crash the test). The array's file is mapped there again and
    the result copied into it, so peers that map the file see what the array holds."""
    import errno
    import mmap

    with joined_pair(coordinator) as (a, b):
        xa, xb = a.alloc(N), b.alloc(N)
        rec = a._allocs[0]

        def failed_move(src, dst, size):
            if dst == rec.base:
                fd = os.open("/dev/zero", os.O_RDWR)
                try:
                    CS.map_at(dst, size, fd)  # the destination is gone
                finally:
                    os.close(fd)
            raise OSError(errno.ENOMEM, "mremap: cannot allocate memory")

        with monkeypatch.context() as m:
            m.setattr(CS, "remap", failed_move)
            summed(a, b, xa, xb, 0)
        with open(f"/dev/shm/{rec.cur}", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m_:
            in_file = np.frombuffer(m_, np.float32, N).copy()
        assert np.array_equal(in_file, xa), "the array's range no longer maps its file"
        for step in range(1, 3):  # and the calls after it work as before
            summed(a, b, xa, xb, step)
        del xa, xb
