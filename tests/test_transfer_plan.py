"""The decisions of a shared-state transfer without sockets: chunks, work stealing, failures, verdicts."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from pccl_py.daemon.transfer_plan import (
    Chunk,
    HashMismatch,
    Mismatch,
    TransferPlan,
    Verification,
    cut,
    refusal,
)
from pccl_py.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidUsage,
    PeerLost,
    ProtocolError,
    Unauthenticated,
)
from pccl_py.wire.state_transfer import Request

pytestmark = pytest.mark.timeout(30)

H = {n: bytes([i]) * 16 for i, n in enumerate("abcdef", 1)}  # stand-in digests


def coverage(sizes: dict[str, int], chunks) -> dict[str, np.ndarray]:
    seen = {n: np.zeros(s, np.int64) for n, s in sizes.items()}
    for c in chunks:
        assert 0 <= c.offset and c.offset + c.length <= sizes[c.name]
        seen[c.name][c.offset:c.offset + c.length] += 1
    return seen


# ---------------------------------------------------------------- the chunk plan


SMALL = [{"x": 1}, {"a": 4096, "c": 4095, "b": 4097}, {}]
LARGE = {"w": 3_000_001, "b": 17, "empty": 0, "big": 5 << 20}


@pytest.mark.parametrize(
    ("sizes", "chunk"),
    [(s, c) for s in SMALL for c in (1, 3, 4096, 1 << 20)] + [(LARGE, c) for c in (4096, 1 << 20, 4 << 20, 10 << 20)],
)
def test_chunks_cover_every_byte_exactly_once(sizes, chunk):
    chunks = cut(sizes, chunk)
    for n, seen in coverage(sizes, chunks).items():
        assert (seen == 1).all(), n
    assert all(0 < c.length <= chunk for c in chunks)
    assert chunks == sorted(chunks, key=lambda c: (c.name, c.offset))  # tensors by name, offsets ascending
    assert len(chunks) == sum(-(-s // chunk) for s in sizes.values())


def test_chunk_must_be_positive():
    for bad in (0, -1):
        with pytest.raises(InvalidUsage):
            cut({"w": 10}, bad)
        with pytest.raises(InvalidUsage):
            TransferPlan({"w": 10}, bad, ["s"])


def test_take_hands_out_the_queue_in_order_up_to_room():
    plan = TransferPlan({"w": 10}, 3, ["s"])
    assert plan.total == 10 and plan.chunks == 4 and not plan.finished
    first = plan.take(("s", 0), 2)
    assert first == [Chunk("w", 0, 3), Chunk("w", 3, 3)]
    assert plan.take(("s", 1), 5) == [Chunk("w", 6, 3), Chunk("w", 9, 1)]
    assert plan.take(("s", 0), 1) == []
    assert plan.inflight == 4 and not plan.finished
    assert plan.landed(("s", 0)) == Chunk("w", 0, 3)  # answers come in order
    assert plan.held(("s", 0)) == [Chunk("w", 3, 3)]
    for stream in (("s", 0), ("s", 1), ("s", 1)):
        plan.landed(stream)
    assert plan.finished and plan.done_bytes == 10 and plan.per_source == {"s": 10}


def test_a_stream_cannot_land_what_it_did_not_ask_for():
    plan = TransferPlan({"w": 10}, 4, ["s"])
    plan.take(("s", 0), 1)
    with pytest.raises(InternalError):
        plan.landed(("s", 1))


def simulate(plan: TransferPlan, speeds: dict[str, float], streams: int, depth: int,
             fail_at: dict[str, int] | None = None) -> list[Chunk]:
    """Drive ``plan`` as fetch's streams would, in virtual time: a source answers one chunk
    per stream every ``speeds[source]`` time units; ``fail_at[source]``: its streams break
    at that time. Returns every chunk that landed."""
    fail_at = fail_at or {}
    landed: list[Chunk] = []
    events: list[tuple[float, int, tuple[str, int]]] = []  # (time, seq, stream)
    seq = 0
    waiting: list[tuple[str, int]] = []
    busy: dict[tuple[str, int], int] = {}

    def refill(now: float, stream):
        nonlocal seq
        if stream[0] in fail_at and now >= fail_at[stream[0]]:
            return
        got = plan.take(stream, depth - busy.get(stream, 0))
        busy[stream] = busy.get(stream, 0) + len(got)
        if busy[stream] and got and busy[stream] == len(got):
            seq += 1
            heapq.heappush(events, (now + speeds[stream[0]], seq, stream))
        if not busy[stream] and stream not in waiting:
            waiting.append(stream)

    for src in speeds:
        for k in range(streams):
            refill(0.0, (src, k))
    while events:
        now, _, stream = heapq.heappop(events)
        if stream[0] in fail_at and now >= fail_at[stream[0]]:
            if plan.release(stream, f"{stream[0]} died"):
                for other in list(waiting):  # woken: chunks came back
                    waiting.remove(other)
                    refill(now, other)
            busy[stream] = 0
            continue
        landed.append(plan.landed(stream))
        busy[stream] -= 1
        if busy[stream]:
            seq += 1
            heapq.heappush(events, (now + speeds[stream[0]], seq, stream))
        refill(now, stream)
    for stream in list(busy):
        plan.release(stream)
    return landed


@pytest.mark.parametrize("depth", [1, 2])
def test_work_stealing_gives_the_faster_source_more_chunks(depth):
    sizes = {"w": 100 << 10}
    plan = TransferPlan(sizes, 1 << 10, ["fast", "slow"])
    landed = simulate(plan, {"fast": 1.0, "slow": 4.0}, streams=2, depth=depth)
    assert plan.finished and plan.verdict() is None
    assert (coverage(sizes, landed)["w"] == 1).all()
    fast, slow = plan.per_source["fast"], plan.per_source["slow"]
    assert fast + slow == 100 << 10
    assert fast >= 3 * slow, (fast, slow)  # about 4:1; a fixed split would give 1:1
    assert slow > 0  # the slow source still helps
    assert plan.retried == 0 and plan.failures == {}


def test_a_failing_sources_chunks_go_back_to_the_front_for_the_others():
    plan = TransferPlan({"w": 10}, 1, ["a", "b"])
    mine = plan.take(("a", 0), 3)
    assert [c.offset for c in mine] == [0, 1, 2]
    assert plan.landed(("a", 0)).offset == 0
    assert plan.release(("a", 0), "a: connection reset") == 2
    assert plan.failures == {"a": "a: connection reset"} and plan.retried == 2 and plan.inflight == 0
    # the given-back chunks come first, in their order, then the rest
    assert [c.offset for c in plan.take(("b", 0), 4)] == [1, 2, 3, 4]
    for _ in range(4):
        plan.landed(("b", 0))
    while chunk := plan.take(("b", 1), 1):
        assert plan.landed(("b", 1)) == chunk[0]
    assert plan.finished and plan.verdict() is None
    assert plan.per_source == {"a": 1, "b": 9} and plan.done_bytes == 10


def test_a_source_dying_mid_transfer_is_covered_by_the_others():
    sizes = {"w": 64 << 10, "v": 1000}
    plan = TransferPlan(sizes, 1 << 10, ["a", "b", "c"])
    landed = simulate(plan, {"a": 1.0, "b": 1.5, "c": 2.0}, streams=2, depth=2, fail_at={"a": 5})
    assert plan.finished and plan.verdict() is None
    for n, seen in coverage(sizes, landed).items():
        assert (seen == 1).all(), n  # nothing lost, nothing twice
    assert set(plan.failures) == {"a"} and plan.retried >= 1
    assert 0 < plan.per_source["a"] < plan.per_source["b"]
    assert sum(plan.per_source.values()) == plan.total


def test_a_stream_ending_without_a_failure_records_none():
    plan = TransferPlan({"w": 10}, 5, ["a"])
    plan.take(("a", 0), 2)
    assert plan.release(("a", 0)) == 2  # cancelled: the chunks go back, nobody is blamed
    assert plan.failures == {} and plan.retried == 2 and len(plan.queue) == 2
    assert plan.release(("a", 7), "never took anything") == 0
    assert plan.failures == {"a": "never took anything"}


def test_every_source_failing_ends_with_peer_lost_naming_them():
    plan = TransferPlan({"w": 1000}, 100, ["a", "b"])
    plan.take(("a", 0), 2)
    plan.landed(("a", 0))
    plan.release(("a", 0), "closed the connection")
    plan.take(("b", 0), 2)
    plan.release(("b", 0), "refused: it serves revision 6")
    err = plan.verdict()
    assert type(err) is PeerLost
    text = str(err)
    assert "every state source failed with 900 of 1000 bytes left" in text
    assert "a: closed the connection" in text and "b: refused: it serves revision 6" in text
    assert "retry sync_shared_state" in text


def test_sources_that_failed_authentication_are_named_by_a_typed_error():
    plan = TransferPlan({"w": 1000}, 100, ["a", "b", "c"])
    plan.take(("a", 0), 2)
    plan.release(("a", 0), "it did not prove the run secret as peer 'a'", unauthenticated=True)
    plan.take(("b", 0), 2)
    plan.release(("b", 0), "closed the connection")
    plan.release(("a", 1), "refused this peer's proof", unauthenticated=True)  # a's other stream
    assert plan.unauthenticated == {"a"}
    # another source can still move everything: nothing is wrong then
    while plan.queue:
        plan.take(("c", 0), 1)
        plan.landed(("c", 0))
    assert plan.finished and plan.verdict() is None and plan.per_source["a"] == 0
    # none can: the error names the source that failed authentication, and why the others failed
    plan = TransferPlan({"w": 1000}, 100, ["a", "b"])
    plan.release(("a", 0), "it introduced itself as peer 'm'", unauthenticated=True)
    plan.release(("b", 0), "closed the connection")
    err = plan.verdict()
    assert type(err) is Unauthenticated and isinstance(err, ProtocolError)
    assert "['a'] failed authentication" in str(err) and "b: closed the connection" in str(err)
    assert "1000 of 1000 bytes left" in str(err)
    # out of time first: the deadline is what ended it
    assert type(plan.verdict(timed_out=True, timeout=1.0)) is DeadlineExceeded


def test_a_pass_out_of_time_ends_with_deadline_exceeded():
    plan = TransferPlan({"w": 1000}, 100, ["a"])
    plan.take(("a", 0), 1)
    plan.release(("a", 0))
    err = plan.verdict(timed_out=True, timeout=2.5)
    assert type(err) is DeadlineExceeded
    assert "did not finish within 2.5 s" in str(err) and "1000 bytes left" in str(err)
    assert "no reason recorded" in str(err)


def test_no_source_and_nothing_to_move():
    assert type(TransferPlan({"w": 1}, 4, []).verdict()) is PeerLost
    assert "no up-to-date peer" in str(TransferPlan({"w": 1}, 4, []).verdict())
    empty = TransferPlan({"e": 0}, 4, [])
    assert empty.finished and empty.chunks == 0 and empty.verdict() is None and empty.per_source == {}
    # with bytes to move every source starts with a zero count
    assert TransferPlan({"w": 1}, 4, ["a", "b"]).per_source == {"a": 0, "b": 0}


# ---------------------------------------------------------------- verification and repair


def finished_plan(sources: list[str], sizes: dict[str, int], failed: dict[str, str] | None = None) -> TransferPlan:
    plan = TransferPlan(sizes, 1 << 20, sources)
    for s, why in (failed or {}).items():
        plan.release((s, 0), why)
    live = [s for s in sources if s not in (failed or {})]
    i = 0
    while chunks := plan.take((live[i % len(live)], 0), 1):
        assert plan.landed((live[i % len(live)], 0)) == chunks[0]
        i += 1
    assert plan.finished
    return plan


def test_matching_content_is_accepted():
    check = Verification(finished_plan(["a", "b"], {"w": 3 << 20}), [])
    assert check.next_source() is None and check.verdict() is None
    assert check.rx_bytes == 3 << 20 and check.chunks == 3 and check.sources_used == 2


@pytest.mark.parametrize(("sources", "repair"), [(["a", "b"], False), (["a"], True)])
def test_a_mismatch_without_repair_is_rejected(sources, repair):
    bad = [Mismatch("w", H["a"], H["b"]), Mismatch("v", H["c"], H["d"])]
    check = Verification(finished_plan(sources, {"w": 10, "v": 10}), bad, repair)
    assert check.next_source() is None  # no repair: with one source there is nobody else to ask
    err = check.verdict()
    assert isinstance(err, HashMismatch) and isinstance(err, ProtocolError)
    text = str(err)
    assert "'w' expected 01010101" in text and "got 02020202" in text and "'v' expected" in text
    assert "sources ['a'" in text and "not accepted" in text


def test_repair_tries_each_healthy_source_alone_until_one_delivers_the_elected_bytes():
    plan = finished_plan(["a", "b", "c", "d"], {"w": 2 << 20, "v": 5}, failed={"b": "reset"})
    bad = [Mismatch("w", H["a"], H["e"])]
    check = Verification(plan, bad)
    assert check.wanted == ["w"]
    assert check.next_source() == "a"  # b failed during the pass: skipped
    assert not check.refetched("a", finished_plan(["a"], {"w": 2 << 20}), [Mismatch("w", H["a"], H["e"])])
    assert "a" in check.rejected and "'w' hashing to 05050505" in check.rejected["a"]
    assert check.next_source() == "c"
    check.refetch_failed("c", "c: closed the connection")
    assert check.failures["c"] == "c: closed the connection"
    assert check.next_source() == "d"
    assert check.refetched("d", finished_plan(["d"], {"w": 2 << 20}), [])
    assert check.next_source() is None and check.verdict() is None
    assert list(check.rejected) == ["a"]
    assert check.rx_bytes == plan.done_bytes + 2 * (2 << 20)
    assert check.chunks == plan.chunks + 4
    assert check.per_source["d"] == plan.per_source["d"] + (2 << 20)


def test_repair_that_finds_no_honest_source_ends_with_hash_mismatch():
    plan = finished_plan(["a", "b"], {"w": 100})
    check = Verification(plan, [Mismatch("w", H["a"], H["b"])])
    tried = []
    while (s := check.next_source()) is not None:
        tried.append(s)
        check.refetched(s, finished_plan([s], {"w": 100}), [Mismatch("w", H["a"], H["c"])])
    assert tried == ["a", "b"]
    assert set(check.rejected) == {"a", "b"}
    assert isinstance(check.verdict(), HashMismatch)


# ---------------------------------------------------------------- what a server refuses


def test_refusal_rule():
    names = {"w": 1, "v": 2}
    assert refusal("srv", 7, names, Request("w", 7, 0, 1)) is None
    assert refusal("srv", None, names, Request("w", 7, 0, 1)) == (
        "srv cannot serve 'w' at revision 7: it serves no shared state right now")
    assert refusal("srv", 7, names, Request("w", 8, 0, 1)) == (
        "srv cannot serve 'w' at revision 8: it serves revision 7")
    assert refusal("srv", 7, names, Request("x", 7, 0, 1)) == (
        "srv cannot serve 'x' at revision 7: it has no tensor of that name (it serves 2 tensors)")
