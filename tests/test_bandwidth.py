"""BandwidthMatrix without sockets: smoothing, late samples, forgetting, missing pairs."""

from __future__ import annotations

import itertools
import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pccl_py.coordinator.bandwidth import BandwidthMatrix
from pccl_py.coordinator.ring_order import solve
from pccl_py.errors import InvalidUsage

pytestmark = pytest.mark.timeout(60)

MBIT = 1e6 / 8


def test_first_sample_is_kept_then_smoothed():
    bw = BandwidthMatrix(weight=0.25)
    assert bw.rate("a", "b") is None
    assert bw.record("a", "b", 100.0, at_time=1.0)
    assert bw.rate("a", "b") == 100.0
    assert bw.record("a", "b", 200.0, at_time=2.0)
    assert bw.rate("a", "b") == 125.0  # moved a quarter of the way
    assert bw.rate("b", "a") is None  # the other direction is another link
    assert bw.as_dict()["a"]["b"] == {"bytes_per_s": 125.0, "at": 2.0, "samples": 2}


def test_weight_one_keeps_the_latest():
    bw = BandwidthMatrix(weight=1.0)
    for at, rate in enumerate([5.0, 900.0, 7.0]):
        bw.record("x", "y", rate, at_time=float(at))
    assert bw.rate("x", "y") == 7.0


def test_late_sample_is_ignored():
    bw = BandwidthMatrix()
    bw.record("a", "b", 10.0, at_time=5.0)
    assert not bw.record("a", "b", 1000.0, at_time=4.0)
    assert bw.rate("a", "b") == 10.0 and bw.as_dict()["a"]["b"]["samples"] == 1
    assert bw.record("a", "b", 30.0, at_time=5.0)  # same time: a second probe of that moment
    assert bw.rate("a", "b") == 20.0


@pytest.mark.parametrize(
    "args, words",
    [
        (("a", "a", 1.0, 0.0), "itself"),
        (("a", "b", -1.0, 0.0), "-1.0"),
        (("a", "b", math.nan, 0.0), "nan"),
        (("a", "b", math.inf, 0.0), "inf"),
        (("a", "b", 1.0, math.nan), "sampled at"),
    ],
)
def test_bad_samples_are_refused(args, words):
    bw = BandwidthMatrix()
    with pytest.raises(InvalidUsage, match=words):
        bw.record(*args)
    assert len(bw) == 0


@pytest.mark.parametrize("kwargs", [{"weight": 0.0}, {"weight": 1.5}, {"max_age": 0.0}, {"max_age": math.nan}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(InvalidUsage):
        BandwidthMatrix(**kwargs)


def test_missing_lists_every_unmeasured_direction_in_order():
    bw = BandwidthMatrix()
    peers = ["c", "a", "b"]
    assert bw.missing(peers) == [("a", "b"), ("a", "c"), ("b", "a"), ("b", "c"), ("c", "a"), ("c", "b")]
    bw.record("a", "b", 1.0, 0.0)
    bw.record("c", "a", 1.0, 0.0)
    bw.record("a", "z", 1.0, 0.0)  # a peer outside the list changes nothing
    assert bw.missing(peers) == [("a", "c"), ("b", "a"), ("b", "c"), ("c", "b")]
    for a, b in bw.missing(peers):
        bw.record(a, b, 2.0, 1.0)
    assert bw.missing(peers) == []
    assert bw.missing(["a"]) == [] and bw.missing([]) == []


def test_stale_rates_are_missing_again():
    bw = BandwidthMatrix(max_age=10.0)
    bw.record("a", "b", 1.0, at_time=0.0)
    bw.record("b", "a", 1.0, at_time=5.0)
    assert bw.missing(["a", "b"], now=10.0) == []
    assert bw.missing(["a", "b"], now=12.0) == [("a", "b")]
    assert bw.missing(["a", "b"], now=16.0) == [("a", "b"), ("b", "a")]
    assert bw.missing(["a", "b"]) == []  # no time given: only pairs never measured


def test_forget_drops_both_directions():
    bw = BandwidthMatrix()
    for a, b in itertools.permutations("abc", 2):
        bw.record(a, b, 1.0, 0.0)
    assert len(bw) == 6
    assert bw.forget("b") == 4
    assert len(bw) == 2 and bw.rate("a", "c") == 1.0 and bw.rate("c", "a") == 1.0
    assert "b" not in bw.as_dict() and all("b" not in row for row in bw.as_dict().values())
    assert bw.forget("b") == 0
    assert bw.missing(["a", "b", "c"]) == [("a", "b"), ("b", "a"), ("b", "c"), ("c", "b")]
    bw.forget("a")
    bw.forget("c")
    assert len(bw) == 0 and bw.as_dict() == {}


def test_snapshot_feeds_the_solver():
    """Five peers in join order across two sites: the snapshot of what probes reported gives
    the solver the 500 Mbit/s ring; unknown pairs count as 0 until probed."""
    site = {"a1": 0, "b1": 1, "a2": 0, "b2": 1, "a3": 0}
    join = list(site)
    bw = BandwidthMatrix(weight=1.0)
    for at, (x, y) in enumerate(bw.missing(join)):
        fast = site[x] == site[y] or {x, y} in ({"a3", "b1"}, {"a1", "b2"})
        bw.record(x, y, (500 if fast else 50) * MBIT, float(at))
    bw.record("a1", "zz", 1.0, 0.0)  # not a member: not in the snapshot
    snap = bw.snapshot(join)
    assert len(snap) == 20 and ("a1", "zz") not in snap
    sol = solve(snap, join)
    assert sol.bottleneck == 500 * MBIT and sol.ring == ("a1", "a2", "a3", "b1", "b2")
    bw.forget("b1")
    assert solve(bw.snapshot(join), join).bottleneck == 0.0  # b1's links are unknown now


def test_as_dict_is_plain_data():
    bw = BandwidthMatrix()
    bw.record("b", "a", 3.5, 1.0)
    bw.record("a", "b", 2.0, 1.5)
    d = bw.as_dict()
    assert list(d) == ["a", "b"]
    assert msgpack.unpackb(msgpack.packb(d)) == d


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from("abcd"),
                          st.floats(0, 1e10), st.floats(0, 100)), max_size=40),
       st.sampled_from("abcd"))
def test_invariants(samples, gone):
    """Rates stay within the range of their samples; forgetting a peer leaves no trace of it;
    missing and snapshot split the ordered pairs between them."""
    bw = BandwidthMatrix(weight=0.3)
    seen: dict[tuple[str, str], list[float]] = {}
    for a, b, rate, at in samples:
        if a != b and bw.record(a, b, rate, at):
            seen.setdefault((a, b), []).append(rate)
    for (a, b), rates in seen.items():
        assert min(rates) * (1 - 1e-12) <= bw.rate(a, b) <= max(rates) * (1 + 1e-12)
    peers = "abcd"
    pairs = set(itertools.permutations(peers, 2))
    assert set(bw.missing(peers)) | set(bw.snapshot(peers)) == pairs
    assert not set(bw.missing(peers)) & set(bw.snapshot(peers))
    bw.forget(gone)
    assert all(gone not in pair for pair in bw.snapshot(peers))
    assert {p for p in pairs if gone in p} <= set(bw.missing(peers))
