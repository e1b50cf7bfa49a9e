"""The collectives' schedules against an in-memory link (tests/fakenet.py): no sockets, no
event loop running. Frames arrive in random interleavings across streams and in pieces;
results are checked against the reference with bit parity, and a peer killed after each
possible number of delivered frames must fail every survivor that still needed it with
PeerLost (never a wrong result, never a touched input)."""

from __future__ import annotations

import collections
import dataclasses

import fakenet
import numpy as np
import pytest
from fakenet import FakeNet
from test_dataplane import reference as dp_reference

from pccl_py.collectives.base import SPREAD, Ranges
from pccl_py.collectives.direct import DirectAllReduce, RootedAllReduce
from pccl_py.collectives.gather import BlobAllGather
from pccl_py.collectives.quant import QuantAllReduce
from pccl_py.collectives.ring import RingAllReduce
from pccl_py.errors import Aborted, PeerLost, ProtocolError
from pccl_py.wire import frames as F

DESC = 1234


def ring(srcs, dsts, op="sum", dtype="float32", sub=96, stripe=24):
    def make(lk):
        r = lk.rank
        return RingAllReduce(lk, src=memoryview(srcs[r]).cast("B"), dst=memoryview(dsts[r]).cast("B"),
                             dtype=dtype, op=op, count=srcs[r].size, sub_bytes=sub, min_stripe=stripe,
                             min_sub_bytes=16, depth=3, loop=lk.net.loop, tag=1, attempt=0, desc=DESC)
    return make


def direct(srcs, dsts, op="sum", dtype="float32"):
    def make(lk):
        r = lk.rank
        return DirectAllReduce(lk, src=memoryview(srcs[r]).cast("B"), dst=memoryview(dsts[r]).cast("B"),
                               dtype=dtype, op=op, count=srcs[r].size, min_stripe=24, loop=lk.net.loop, tag=1,
                               attempt=0, desc=DESC)
    return make


def rooted(srcs, dsts, op="sum", dtype="float32"):
    def make(lk):
        r = lk.rank
        return RootedAllReduce(lk, src=memoryview(srcs[r]).cast("B"), dst=memoryview(dsts[r]).cast("B"),
                               dtype=dtype, op=op, count=srcs[r].size, loop=lk.net.loop, tag=1, attempt=0, desc=DESC)
    return make


def quant(srcs, dsts, op="sum", q="uint8"):
    def make(lk):
        r = lk.rank
        return QuantAllReduce(lk, src=memoryview(srcs[r]).cast("B"), dst=memoryview(dsts[r]).cast("B"), op=op,
                              count=srcs[r].size, quant=q, block_bytes=64, loop=lk.net.loop, tag=1, attempt=0,
                              desc=DESC)
    return make


def inputs(world, count, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [rng.integers(-3, 4, count).astype(dtype) for _ in range(world)]


def reference(srcs, op, dtype="float32"):
    return dp_reference(srcs, dtype, op)


def settle(net):
    try:
        net.run()
        return [c.future for c in net.colls]
    finally:
        net.close()


@pytest.mark.parametrize("world", [2, 3, 4, 5])
@pytest.mark.parametrize("count", [0, 1, 7, 100, 1031])
@pytest.mark.parametrize("op", ["sum", "avg", "max", "prod"])
@pytest.mark.parametrize("make", [ring, direct])
def test_all_reduce_schedules_in_random_interleavings(world, count, op, make):
    for seed in range(3):
        srcs = inputs(world, count, seed)
        before = [s.copy() for s in srcs]
        dsts = [np.full(count, np.nan, np.float32) for _ in range(world)]
        net = FakeNet(world, streams=3, seed=seed)
        net.start(make(srcs, dsts, op))
        futs = settle(net)
        want = reference(srcs, op)
        for r in range(world):
            assert futs[r].done() and futs[r].exception() is None, futs[r]
            assert dsts[r].tobytes() == want.tobytes(), (r, dsts[r][:5], want[:5])
            assert srcs[r].tobytes() == before[r].tobytes()


@pytest.mark.parametrize("world", [3, 4])
@pytest.mark.parametrize("count", [1, 5, 1000])
def test_rooted_schedule(world, count):
    srcs = inputs(world, count, 1)
    dsts = [np.zeros(count, np.float32) for _ in range(world)]
    net = FakeNet(world, seed=2)
    net.start(rooted(srcs, dsts, "sum"))
    futs = settle(net)
    want = reference(srcs, "sum")
    assert all(f.exception() is None for f in futs)
    assert all(d.tobytes() == want.tobytes() for d in dsts)


def test_quantized_schedule_gives_every_peer_the_same_bytes():
    world, count = 4, 777
    rng = np.random.default_rng(0)
    srcs = [rng.standard_normal(count).astype(np.float32) for _ in range(world)]
    dsts = [np.zeros(count, np.float32) for _ in range(world)]
    net = FakeNet(world, seed=5)
    net.start(quant(srcs, dsts, "avg"))
    futs = settle(net)
    assert all(f.exception() is None for f in futs)
    assert all(d.tobytes() == dsts[0].tobytes() for d in dsts)
    exact = np.mean(np.stack(srcs).astype(np.float64), axis=0)
    assert np.max(np.abs(dsts[0] - exact)) < 0.05


def test_gather_schedule():
    world = 4
    net = FakeNet(world, seed=3)
    net.start(lambda lk: BlobAllGather(lk, blob=bytes([lk.rank]) * (lk.rank * 10), max_blob=1 << 20,
                                       loop=net.loop, tag=1, attempt=0, desc=DESC))
    futs = settle(net)
    for f in futs:
        assert f.result() == [bytes([r]) * (r * 10) for r in range(world)]


def test_ring_and_quantized_stripes_leave_the_stream_to_the_link():
    """The ring's and the quantized call's data go on whichever stream of the link is free
    first (SPREAD: the link decides, PeerStreams.feed); control frames name stream 0."""
    world, count = 2, 4000
    for make, kw in ((ring, {"sub": 800, "stripe": 200}), (quant, {})):
        srcs = inputs(world, count, 0)
        dsts = [np.zeros(count, np.float32) for _ in range(world)]
        net = FakeNet(world, streams=8, seed=0)
        named = collections.Counter()
        send = net.links[0].send

        def spy(rank, stream, header, payload, send=send, named=named):
            named[(F.decode_header(header).kind, stream)] += 1
            send(rank, stream, header, payload)

        net.links[0].send = spy
        net.start(make(srcs, dsts, **kw))
        futs = settle(net)
        assert all(f.exception() is None for f in futs)
        assert {stream for kind, stream in named if kind == F.DATA} == {SPREAD}, named
        assert named[(F.DATA, SPREAD)] > 2 and named[(F.FIN, 0)] == 1


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("make", [ring, direct, quant])
def test_a_peer_lost_at_every_step(world, make):
    """Kill each rank after each possible number of delivered frames: a survivor either
    fails (PeerLost, or Aborted when another survivor failed first) or (when it already had
    all it needed from the victim) succeeds
    with the right result; its input is untouched either way."""
    count = 300
    srcs = inputs(world, count, 7)
    want = reference(srcs, "sum")
    clean = FakeNet(world, seed=0)
    clean.start(make(srcs, [np.zeros(count, np.float32) for _ in range(world)]))
    clean.run()
    total = clean.delivered
    clean.close()
    outcomes = set()
    for victim in range(world):
        for after in range(0, total + 1, max(1, total // 40)):
            before = [s.copy() for s in srcs]
            dsts = [np.zeros(count, np.float32) for _ in range(world)]
            net = FakeNet(world, seed=after)
            net.start(make(srcs, dsts))
            net.run(kill=(victim, after))
            for r in range(world):
                if r == victim:
                    continue
                f = net.colls[r].future
                assert f.done(), f"rank {r} neither failed nor finished (victim {victim} after {after})"
                if f.exception() is not None:
                    assert isinstance(f.exception(), (PeerLost, Aborted))
                    outcomes.add("failed")
                else:
                    if make is not quant:
                        assert dsts[r].tobytes() == want.tobytes()
                    outcomes.add("ok")
                assert srcs[r].tobytes() == before[r].tobytes()
            net.close()
    assert "failed" in outcomes


def test_a_stripe_that_completes_after_the_call_failed_is_not_forwarded():
    """The call fails while a stripe is coming in (its bytes on an I/O thread); the stripe's
    end must not forward anything: the data plane has withdrawn the call's queued frames
    and reported the error, and a frame queued now would read the caller's memory later."""
    world, count = 2, 3000
    srcs = inputs(world, count, 2)
    dsts = [np.zeros(count, np.float32) for _ in range(world)]
    net = FakeNet(world, streams=2, seed=5)
    colls = net.start(ring(srcs, dsts, sub=100, stripe=100))  # one stripe per sub-chunk
    key = next(k for k, q in net.queues.items() if k[:2] == (1, 0) and q)
    header, payload = net.queues[key].popleft()  # a reduce-scatter stripe from rank 1 to rank 0
    rx = colls[0].on_data(1, F.decode_header(header), fakenet._Conn)
    rx.view[:len(payload)] = payload
    colls[0].fail(Aborted("failed here"))
    sent = []
    net.links[0].send = lambda rank, stream, h, p: sent.append(F.decode_header(h).kind)
    rx.finish()
    assert sent == []
    net.close()


def _first_frame(net, src, dst):
    key = next(k for k, q in net.queues.items() if k[:2] == (src, dst) and q)
    return net.queues[key][0]


@pytest.mark.parametrize("make,part", [(ring, "same"), (ring, "tail"), (ring, "head"), (direct, "same"),
                                       (direct, "tail"), (direct, "head"), (rooted, "same")])
def test_a_frame_overlapping_one_still_arriving_is_refused(make, part):
    """A frame's bytes are taken when its header arrives, so a peer that sends a range again
    (whole, or a part of it) while the first copy is still coming in on another stream is
    refused at once: counting only finished bytes would let both through, and the call would
    end with some bytes reduced twice and others never received."""
    world, count = 2, 3000
    srcs = inputs(world, count, 3)
    dsts = [np.zeros(count, np.float32) for _ in range(world)]
    net = FakeNet(world, streams=2, seed=1)
    colls = net.start(make(srcs, dsts))
    h = F.decode_header(_first_frame(net, 1, 0)[0])
    assert h.length > 8
    colls[0].on_data(1, h, fakenet._Conn)  # the first copy: accepted, and not yet finished
    again = {"same": h, "tail": dataclasses.replace(h, offset=h.offset + 4, length=h.length - 4),
             "head": dataclasses.replace(h, length=h.length - 4)}[part]
    with pytest.raises(ProtocolError, match="repeats|unexpected"):
        colls[0].on_data(1, again, fakenet._Conn)
    net.close()


def test_ranges_refuse_every_overlap_and_merge_neighbours():
    rng = np.random.default_rng(7)
    for _ in range(300):
        c, taken = Ranges(), np.zeros(64, bool)
        for _ in range(40):
            a = int(rng.integers(0, 63))
            b = int(rng.integers(a + 1, 65))
            ok = c.add(a, b)
            assert ok == (not taken[a:b].any()), (a, b)
            if ok:
                taken[a:b] = True
        # what was added is exactly the union, held as maximal disjoint ranges
        want, i = [], 0
        while i < 64:
            if taken[i]:
                j = i
                while j < 64 and taken[j]:
                    j += 1
                want.append((i, j))
                i = j
            else:
                i += 1
        assert list(zip(c._lo, c._hi)) == want
