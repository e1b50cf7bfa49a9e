"""Streams added to live links on 127.0.0.1 (DataPlane.add_streams, adapt_streams): results
stay bit-exact before, during and after; both sides stripe over the new streams; a peer
that dies while a stream is being added fails the link promptly."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import dataclasses
import socket
import time

import numpy as np
import pytest
from test_client import join_all

from pccl_py import Client
from pccl_py.daemon.dataplane import DataPlane, DataPlaneConfig
from pccl_py.daemon.service import Daemon
from pccl_py.daemon.stream_count import GROW, HOLD, SHRINK, Decision, StreamCountConfig
from pccl_py.errors import InvalidUsage, PcclError, PeerLost
from tests.test_dataplane import SECRET, cluster, families, run, topo

pytestmark = pytest.mark.timeout(90)


def inputs(world: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(count).astype(np.float32) for _ in range(world)]


async def ring_all(dps, xs, tag: int) -> list[np.ndarray]:
    outs = [np.full_like(x, np.nan) for x in xs]
    await asyncio.gather(*(d.all_reduce(x, o, dtype="float32", op="sum", algorithm="ring", tag=tag, timeout=30)
                           for d, x, o in zip(dps, xs, outs, strict=True)))
    return outs


def links(dps):
    """(connector, acceptor) PeerStreams of every link."""
    out = []
    for d in dps:
        for pid, p in d._peers.items():
            if p.connector:
                other = next(e for e in dps if e.peer_id == pid)
                out.append((d, p, other._peers[d.peer_id]))
    return out


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("same_host", [False, True])
def test_link_grows_between_calls_and_results_stay_bit_exact(world, same_host):
    config = DataPlaneConfig(io_threads=False)

    async def main():
        async with cluster(world, streams=1, config=config, tcp_only=() if same_host else range(world)) as dps:
            xs = inputs(world, 1 << 20, seed=world)
            first = await ring_all(dps, xs, 1)
            for o in first[1:]:
                assert o.tobytes() == first[0].tobytes()
            assert all(p.nstreams == 1 and q.nstreams == 1 for _, p, q in links(dps))
            # to 2 streams between calls, then to 4 while a call runs
            for d, p, _ in links(dps):
                assert await d.add_streams(p.peer_id, 2, 5.0) == 2
            assert all(p.nstreams == 2 and q.nstreams == 2 for _, p, q in links(dps))
            assert (await ring_all(dps, xs, 2))[0].tobytes() == first[0].tobytes()
            grows = [d.add_streams(p.peer_id, 4, 5.0) for d, p, _ in links(dps)]
            during, got = await asyncio.gather(ring_all(dps, xs, 3), asyncio.gather(*grows))
            assert got == [4] * len(grows)
            for o in during:
                assert o.tobytes() == first[0].tobytes()
            for _, p, q in links(dps):  # in use on both sides once no call runs
                assert p.nstreams == q.nstreams == 4 and p.attached == q.attached == 4
            family = "AF_UNIX" if same_host else "AF_INET"
            assert all(f == {family} for d in dps for f in families(d).values())  # added the same way
            written = {id(c): c._written for _, p, q in links(dps) for c in p.conns + q.conns}
            after = await ring_all(dps, xs, 4)
            for o in after:
                assert o.tobytes() == first[0].tobytes()
            for _, p, q in links(dps):  # a side that sends data stripes over all four
                sides = [[c._written - written[id(c)] for c in side.conns] for side in (p, q)]
                data = [s for s in sides if sum(s) > 1 << 20]
                assert len(data) == (2 if world == 2 else 1), sides  # (a ring of 3 sends one way per link)
                assert all(n > 0 for s in data for n in s), sides
            np.testing.assert_allclose(first[0], np.sum(xs, axis=0), rtol=1e-5, atol=1e-5)
    run(main())


def test_add_streams_misuse():
    async def main():
        async with cluster(2, streams=1, tcp_only=(0, 1)) as dps:
            with pytest.raises(InvalidUsage, match="does not dial"):
                await dps[1].add_streams(dps[0].peer_id, 2, 1.0)  # peer0 dials this link
            with pytest.raises(InvalidUsage):
                await dps[0].add_streams(dps[1].peer_id, 65, 1.0)
            assert await dps[0].add_streams(dps[1].peer_id, 1, 1.0) == 1  # nothing to add
    run(main())


class Scripted:
    """A stand-in for StreamCount that decides the counts it is given, one per call."""

    def __init__(self, counts):
        self.counts, self.k = iter(counts), 1

    def streams(self, link):
        return self.k

    def sample(self, link, now, nbytes, seconds, streams):
        k = next(self.counts, self.k)
        action = GROW if k > self.k else SHRINK if k < self.k else HOLD
        self.k = k
        return Decision(action, k, "scripted")

    def reached(self, link, streams, now):
        self.k = streams
        return Decision(HOLD, streams, "scripted")

    def start(self, link, rtt):
        return Decision(HOLD, self.k, "scripted")

    def follow(self, link, streams):
        return Decision(HOLD, self.k, "scripted")


def test_both_ends_follow_a_grow_and_a_shrink():
    config = DataPlaneConfig(io_threads=False, adapt_streams=True)

    async def main():
        async with cluster(2, streams=1, config=config, tcp_only=(0, 1)) as dps:
            for d in dps:
                d.stream_count = Scripted([4, 4, 2])
            xs = inputs(2, 1 << 20, seed=9)
            ref = (await ring_all(dps, xs, 1))[0].tobytes()  # -> grow to 4
            await asyncio.gather(*dps[0]._growing)
            (_, p, q), = links(dps)
            assert p.nstreams == q.nstreams == 4
            assert all(o.tobytes() == ref for o in await ring_all(dps, xs, 2))  # -> hold 4
            assert all(o.tobytes() == ref for o in await ring_all(dps, xs, 3))  # -> shrink to 2
            assert p.nstreams == q.nstreams == 2 and p.attached == q.attached == 4
            written = [[c._written for c in side.conns] for side in (p, q)]
            assert all(o.tobytes() == ref for o in await ring_all(dps, xs, 4))
            for side, w in zip((p, q), written, strict=True):
                moved = [c._written - w0 for c, w0 in zip(side.conns, w, strict=True)]
                assert moved[0] > 0 and moved[1] > 0 and moved[2] == moved[3] == 0, moved
    run(main())


def test_adapting_link_grows_from_one_and_stays_bit_exact():
    config = DataPlaneConfig(io_threads=False, adapt_streams=True, max_streams=4)

    async def main():
        async with cluster(2, streams=1, config=config, tcp_only=(0, 1)) as dps:
            for d in dps:
                d.stream_count.config = StreamCountConfig(initial=1, maximum=4, samples=1, min_bytes=1 << 20)
            xs = inputs(2, 1 << 20, seed=5)  # 4 MiB each way per call
            ref = None
            seen = set()
            for tag in range(1, 13):
                outs = await ring_all(dps, xs, tag)
                ref = ref if ref is not None else outs[0].tobytes()
                assert all(o.tobytes() == ref for o in outs)
                seen.add(len(dps[0]._peers[dps[1].peer_id].conns))
            assert max(seen) >= 2  # it tried more streams than it started with
            for d, other in ((dps[0], dps[1]), (dps[1], dps[0])):
                peer = d._peers[other.peer_id]
                assert d.stream_count.best(other.peer_id) is not None
                assert peer.nstreams == min(peer.attached, d.stream_count.streams(other.peer_id))
    run(main())


def test_a_link_of_a_long_path_starts_with_more_streams(monkeypatch):
    """Both ends read the link's round trip when it comes up (TCP_INFO; faked here, loopback's
    is microseconds): the dialler adds the streams the round trip calls for, the acceptor
    stripes over them once they are up, and every stream carries ring data."""
    import pccl_py.daemon.dataplane as D
    seen = []

    def long_path(sock):
        seen.append(sock is not None and sock.family == socket.AF_INET)
        return 0.1
    monkeypatch.setattr(D, "round_trip", long_path)
    config = DataPlaneConfig(io_threads=False, adapt_streams=True, max_streams=16)

    async def main():
        async with cluster(2, streams=4, config=config, tcp_only=(0, 1)) as dps:
            await asyncio.gather(*dps[0]._growing)
            (_, p, q), = links(dps)
            assert p.nstreams == q.nstreams == p.attached == q.attached == 16
            assert all(d.stream_count.streams(o.peer_id) == 16 for d, o in ((dps[0], dps[1]), (dps[1], dps[0])))
            xs = inputs(2, 1 << 21, seed=3)
            written = [[c._written for c in side.conns] for side in (p, q)]
            outs = await ring_all(dps, xs, 1)
            assert outs[0].tobytes() == outs[1].tobytes() == (xs[0] + xs[1]).tobytes()
            for side, w in zip((p, q), written, strict=True):
                assert all(c._written > w0 for c, w0 in zip(side.conns, w, strict=True))
        assert seen.count(True) == 2  # one reading per end of the link, on a TCP socket
    run(main())


def test_an_acceptor_that_reads_a_shorter_round_trip_follows_the_dialler(monkeypatch):
    """The two ends read their round trips apart; near a threshold they may disagree. The
    dialler (peer0) reads 100 ms and opens 16 streams; the acceptor (peer1) reads 1 ms and
    would stay at 4: it takes the dialler's count instead and stripes over all 16."""
    import pccl_py.daemon.dataplane as D
    ports = {}
    monkeypatch.setattr(D, "round_trip", lambda sock: 0.001 if sock.getsockname()[1] == ports["acceptor"] else 0.1)
    config = DataPlaneConfig(io_threads=False, adapt_streams=True, max_streams=16)

    async def body():  # (cluster() would link the peers before the acceptor's port is known here)
        dps = [DataPlane(f"peer{i}", secret=SECRET, streams=4,
                         config=dataclasses.replace(config, same_host_links=False)) for i in range(2)]
        try:
            for d in dps:
                await d.start()
            ports["acceptor"] = dps[1].port
            t = topo(dps, 1)
            await asyncio.gather(*(dps[i].set_topology(t[i]) for i in range(2)))
            await asyncio.gather(*dps[0]._growing)
            (_, p, q), = links(dps)
            assert dps[1].stream_count.streams(dps[0].peer_id) == 16
            assert p.nstreams == q.nstreams == q.attached == 16
        finally:
            for d in dps:
                await d.close()
    run(body())


def test_streams_added_at_once_past_the_handshake_gate_all_come_up():
    """An acceptor admits few unauthenticated connections per address at a time (here 1);
    a link adding more streams at once is turned away for the rest, and dials them again."""
    config = DataPlaneConfig(io_threads=False, max_pending_per_address=1)

    async def main():
        async with cluster(2, streams=1, config=config, tcp_only=(0, 1)) as dps:
            (d, p, q), = links(dps)
            assert await d.add_streams(p.peer_id, 12, 10.0) == 12
            assert p.attached == 12 and q.attached == 12
            assert dps[1].gate.total["too_many"] > 0  # the gate did turn some away
            xs = inputs(2, 1 << 20, seed=4)
            outs = await ring_all(dps, xs, 1)
            assert outs[0].tobytes() == outs[1].tobytes() == (xs[0] + xs[1]).tobytes()
    run(main())


@pytest.mark.parametrize("threads", [False, True])
def test_a_stalled_stream_carries_little_and_the_others_carry_the_rest(threads):
    """Stripes go to whichever stream has sent what it was given: while the receiver reads
    nothing from one of four streams, that stream takes a few stripes (what its buffers
    hold) and the other three carry the rest of the call, which completes once it reads
    again, bit-exact. (256 KiB stripes: with the default 2 MiB, a 32 MiB call is too few
    stripes to tell "a few" from a fair share.)"""
    config = DataPlaneConfig(io_threads=threads, min_stripe=256 << 10)

    async def main():
        async with cluster(2, streams=4, config=config, tcp_only=(0, 1)) as dps:
            (_, p, q), = links(dps)
            stalled = q.conns[1]  # the acceptor's end of stream 1: it stops reading
            stalled.transport.pause_reading()
            carried = [0] * 4  # payload bytes the dialler gave each stream

            def spy(i, write):
                def counted(header, payload):
                    carried[i] += len(payload)
                    write(header, payload)
                return counted
            for i, c in enumerate(p.conns):
                c.write = spy(i, c.write)
            xs = inputs(2, 8 << 20, seed=8)  # 32 MiB: 16 MiB each way per phase
            outs = [np.full_like(x, np.nan) for x in xs]
            calls = [asyncio.ensure_future(e.all_reduce(x, o, dtype="float32", op="sum", algorithm="ring",
                                                        tag=1, timeout=30)) for e, x, o in zip(dps, xs, outs)]
            await asyncio.sleep(1.0)
            assert not all(c.done() for c in calls)  # it waits for the stalled stream's stripes
            stalled.transport.resume_reading()
            await asyncio.gather(*calls)
            assert outs[0].tobytes() == outs[1].tobytes() == (xs[0] + xs[1]).tobytes()
            assert 0 < carried[1] and carried[1] * 4 < min(carried[i] for i in (0, 2, 3)), carried
    run(main())


def kill(dp) -> None:
    """``dp`` dies: nothing listens any more, every connection it had ends at once."""
    dp._server.close()
    if dp._unix is not None:
        dp._unix.close()
    for c in list(dp._conns):
        if c.transport is not None:
            c.transport.abort()


@pytest.mark.parametrize("when", ["dialling", "handshake"])
@pytest.mark.parametrize("same_host", [False, True])
def test_peer_killed_while_a_stream_is_added(same_host, when):
    config = DataPlaneConfig(io_threads=False)

    async def main():
        async with cluster(2, streams=1, config=config, tcp_only=() if same_host else (0, 1)) as dps:
            victim = dps[1]
            hellos = []
            if when == "handshake":  # dies as the first added stream's HELLO is read
                accept = victim._accept_peer

                def dying(hello):
                    if hello.stream == 0:
                        return accept(hello)
                    hellos.append(hello.stream)
                    kill(victim)
                    return None
                victim._accept_peer = dying
            task = asyncio.ensure_future(dps[0].add_streams(victim.peer_id, 8, 4.0))
            if when == "dialling":
                await asyncio.sleep(0)  # the dials are under way
                kill(victim)
            t0 = time.monotonic()
            try:
                n = await asyncio.wait_for(task, 10.0)
            except PeerLost:
                n = None
            assert time.monotonic() - t0 < 6.0
            assert n is None or n < 8
            assert when == "dialling" or hellos  # it did die mid-handshake
            # the link is down on the survivor, and its next call fails at once
            for _ in range(300):
                if victim.peer_id not in dps[0]._peers:
                    break
                await asyncio.sleep(0.01)
            assert victim.peer_id not in dps[0]._peers
            x = np.ones(1000, np.float32)
            t0 = time.monotonic()
            with pytest.raises(PcclError):
                await dps[0].all_reduce(x, np.empty_like(x), dtype="float32", op="sum", tag=9, timeout=10)
            assert time.monotonic() - t0 < 3.0
    run(main())


def test_daemons_choose_streams_by_default_and_take_a_fixed_count(coordinator, capfd):
    """Two daemons (processes) with the default --streams auto: ring all-reduces through the
    public API stay bit-exact while the dialling daemon grows its link; --streams 3 fixes K."""
    clients = [Client(coordinator=coordinator.addr, timeout=30.0, tcp_only=True, daemon_log_level="INFO")
               for _ in range(2)]
    try:
        with cf.ThreadPoolExecutor(2) as ex:
            topos = join_all(ex, clients)
            rng = np.random.default_rng(3)
            xs = {t["rank"]: rng.standard_normal(2 << 20).astype(np.float32) for t in topos}

            def calls(c, rank):
                outs = []
                for _ in range(6):
                    y = xs[rank].copy()
                    c.all_reduce(y, algorithm="ring", timeout=30.0)
                    outs.append(y.tobytes())
                return outs

            results = [f.result(60) for f in [ex.submit(calls, c, t["rank"]) for c, t in zip(clients, topos)]]
    finally:
        for c in clients:
            c.close()
    first = results[0][0]
    assert all(r == first for outs in results for r in outs)  # every call, both peers, bit for bit
    err = capfd.readouterr().err
    assert "streams to" in err and "trying 8" in err, err[-3000:]  # it measured 4 and dialled 4 more
    with pytest.raises(Exception, match="streams must be"):
        Daemon(coordinator=coordinator.addr, streams="many")
    assert Daemon(coordinator=coordinator.addr, streams="3")._dp_kwargs["streams"] == 3
    assert not Daemon(coordinator=coordinator.addr, streams=3)._dp_kwargs["config"].adapt_streams
    assert Daemon(coordinator=coordinator.addr)._dp_kwargs["config"].adapt_streams


def test_a_dial_that_gets_no_handshake_ends_at_its_deadline_and_the_link_lives_on():
    config = DataPlaneConfig(io_threads=False)

    async def main():
        async with cluster(2, streams=1, config=config, tcp_only=(0, 1)) as dps:
            other = dps[1]
            # the peer's port now accepts and says nothing (a frozen process's backlog)
            other._server.close()
            await other._server.wait_closed()
            loop = asyncio.get_running_loop()
            silent = await loop.create_server(asyncio.Protocol, "127.0.0.1", other.port)
            try:
                t0 = time.monotonic()
                assert await asyncio.wait_for(dps[0].add_streams(other.peer_id, 3, 1.0), 5.0) == 1
                assert time.monotonic() - t0 < 2.5
            finally:
                silent.close()
            (_, p, q), = links(dps)
            assert p.nstreams == q.nstreams == 1 and p.lost is None
            xs = inputs(2, 1 << 18, seed=2)
            outs = await ring_all(dps, xs, 1)
            assert outs[0].tobytes() == outs[1].tobytes()
            np.testing.assert_allclose(outs[0], xs[0] + xs[1], rtol=1e-6)
    run(main())
