"""StateServer + fetch in one event loop: striping, dead sources, lying sources, bad input."""

from __future__ import annotations

import asyncio
import logging
import struct

import numpy as np
import pytest

from pccl_py.daemon.state_hash import hash_buffer
from pccl_py.daemon.state_transfer import HashMismatch, StateServer, fetch
from pccl_py.errors import DeadlineExceeded, PeerLost, ProtocolError
from pccl_py.wire.state_transfer import AUTH, HELLO, M_AUTH, M_REQ, REQ, RESP, proof

pytestmark = pytest.mark.timeout(60)

SECRET = b"run-secret"
REV = 7


def make_state(seed: int, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.integers(0, 256, size=s, dtype=np.uint8) for n, s in sizes.items()}


async def start_servers(state: dict[str, np.ndarray], n: int, revision: int = REV) -> list[StateServer]:
    servers = []
    for i in range(n):
        s = StateServer(f"src{i}", secret=SECRET)
        await s.start()
        s.publish(revision, {k: memoryview(v) for k, v in state.items()})
        servers.append(s)
    return servers


async def close_all(servers):
    for s in servers:
        await s.close()


def dests_for(state, out):
    return {n: (memoryview(out[n]), hash_buffer(state[n])) for n in state}


SIZES = {"w": 3_000_001, "b": 17, "empty": 0, "big": 5 << 20}


@pytest.mark.parametrize("n_sources", [1, 2, 3])
async def test_newcomer_gets_exactly_the_popular_bytes(n_sources):
    state = make_state(1, SIZES)
    servers = await start_servers(state, n_sources)
    try:
        out = {n: np.zeros_like(v) for n, v in state.items()}
        seen = []
        stats = await fetch([s.address for s in servers], dests_for(state, out), secret=SECRET, peer_id="new",
                            revision=REV, chunk=1 << 20, timeout=30, progress=lambda d, t: seen.append((d, t)))
        for n in state:
            assert np.array_equal(out[n], state[n])
            assert hash_buffer(out[n]) == hash_buffer(state[n])
        total = sum(v.nbytes for v in state.values())
        assert stats["rx_bytes"] == total
        assert sum(s.tx_bytes for s in servers) == total
        assert seen[-1] == (total, total) and all(a <= b for (a, _), (b, _) in zip(seen, seen[1:], strict=False))
        assert stats["sources_used"] >= 1
    finally:
        await close_all(servers)


async def test_nothing_to_fetch_receives_zero_bytes():
    state = make_state(2, {"w": 1000})
    servers = await start_servers(state, 2)
    try:
        stats = await fetch([s.address for s in servers], {}, secret=SECRET, peer_id="p", revision=REV, timeout=10)
        assert stats["rx_bytes"] == 0 and stats["sources_used"] == 0
        assert all(s.tx_bytes == 0 for s in servers)
        # an empty tensor needs no source at all, but its hash is still checked
        e = np.zeros(0, np.uint8)
        stats = await fetch([], {"e": (memoryview(e), hash_buffer(b""))}, revision=REV, timeout=10)
        assert stats["rx_bytes"] == 0
    finally:
        await close_all(servers)


async def test_corrupted_tensor_is_repaired():
    state = make_state(3, {"w": 1 << 20, "v": 4096})
    servers = await start_servers(state, 2)
    try:
        mine = {n: v.copy() for n, v in state.items()}
        mine["w"][12345] ^= 0xFF
        assert hash_buffer(mine["w"]) != hash_buffer(state["w"])
        stats = await fetch([s.address for s in servers], {"w": (memoryview(mine["w"]), hash_buffer(state["w"]))},
                            secret=SECRET, peer_id="p", revision=REV, timeout=20)
        assert np.array_equal(mine["w"], state["w"]) and stats["rx_bytes"] == state["w"].nbytes
    finally:
        await close_all(servers)


async def test_large_state_striped_over_three_sources():
    state = make_state(4, {"w": 64 << 20})
    servers = await start_servers(state, 3)
    try:
        out = {"w": np.empty_like(state["w"])}
        stats = await fetch([s.address for s in servers], dests_for(state, out), secret=SECRET, peer_id="p",
                            revision=REV, timeout=50)
        assert np.array_equal(out["w"], state["w"])
        assert stats["sources_used"] >= 2  # striped, not one source doing all
        assert sum(stats["per_source"].values()) == 64 << 20
    finally:
        await close_all(servers)


async def test_source_dies_mid_transfer_others_finish():
    state = make_state(5, {"w": 24 << 20})
    servers = await start_servers(state, 3)
    victim = servers[0]
    try:
        out = {"w": np.zeros_like(state["w"])}
        victim.inject_death_after((1 << 20) + 12345)  # dies in the middle of its second chunk
        stats = await fetch([s.address for s in servers], dests_for(state, out), secret=SECRET, peer_id="p",
                            revision=REV, chunk=1 << 20, timeout=50)
        assert np.array_equal(out["w"], state["w"])
        label = f"{victim.host}:{victim.port}"
        assert label in stats["sources_failed"] and stats["retried_chunks"] >= 1
        assert stats["per_source"][label] <= 1 << 20
    finally:
        await close_all(servers)


async def test_all_sources_gone_is_a_clean_error_and_retry_succeeds():
    state = make_state(6, {"w": 8 << 20})
    servers = await start_servers(state, 2)
    out = {"w": np.zeros_like(state["w"])}
    try:
        def progress(done, total):
            for s in servers:
                s.unpublish()

        with pytest.raises(PeerLost) as ei:
            await fetch([s.address for s in servers], dests_for(state, out), secret=SECRET, peer_id="p",
                        revision=REV, chunk=1 << 18, timeout=30, progress=progress)
        assert "every state source failed" in str(ei.value)
        # nobody listening at all
        dead = StateServer("dead")
        await dead.start()
        addr = dead.address
        await dead.close()
        with pytest.raises(PeerLost):
            await fetch([addr], dests_for(state, out), secret=SECRET, peer_id="p", revision=REV, timeout=10)
        # the retry, once a source serves again, succeeds
        for s in servers:
            s.publish(REV, {"w": memoryview(state["w"])})
        stats = await fetch([s.address for s in servers], dests_for(state, out), secret=SECRET, peer_id="p",
                            revision=REV, timeout=30)
        assert np.array_equal(out["w"], state["w"]) and stats["rx_bytes"] == state["w"].nbytes
    finally:
        await close_all(servers)


async def test_lying_source_is_rejected():
    state = make_state(7, {"w": 2 << 20})
    lie = {"w": state["w"].copy()}
    lie["w"][-1] ^= 1
    servers = await start_servers(lie, 1)
    try:
        out = {"w": np.zeros_like(state["w"])}
        with pytest.raises(HashMismatch) as ei:
            await fetch([s.address for s in servers], dests_for(state, out), secret=SECRET, peer_id="p",
                        revision=REV, timeout=20)
        assert isinstance(ei.value, ProtocolError) and "'w' expected" in str(ei.value)
    finally:
        await close_all(servers)


async def test_lying_source_among_honest_ones_is_found_and_bypassed():
    state = make_state(11, {"w": 2 << 20, "v": 1000})
    lie = {"w": state["w"].copy(), "v": state["v"]}
    lie["w"][:: 1 << 16] ^= 1  # every chunk the liar serves is wrong
    liar = (await start_servers(lie, 1))[0]
    honest = await start_servers(state, 2)
    try:
        out = {n: np.zeros_like(v) for n, v in state.items()}
        stats = await fetch([liar.address] + [s.address for s in honest], dests_for(state, out), secret=SECRET,
                            peer_id="p", revision=REV, chunk=1 << 16, timeout=30)
        assert all(np.array_equal(out[n], state[n]) for n in state)
        # work stealing decides who serves what; whenever the liar served a chunk it is found out
        label = f"127.0.0.1:{liar.port}"
        assert list(stats["rejected_sources"]) in ([label], [])
        if liar.tx_bytes > state["v"].nbytes:  # it served some of "w"
            assert list(stats["rejected_sources"]) == [label]
        assert bool(stats["rejected_sources"]) == (stats["rx_bytes"] > sum(v.nbytes for v in state.values()))
        # without repair the lie is only rejected
        out = {n: np.zeros_like(v) for n, v in state.items()}
        with pytest.raises(HashMismatch):
            await fetch([liar.address, honest[0].address], dests_for(state, out), secret=SECRET, peer_id="p",
                        revision=REV, chunk=1 << 18, timeout=30, repair=False)
    finally:
        await close_all([liar, *honest])


async def test_wrong_revision_and_wrong_secret_are_refused():
    state = make_state(8, {"w": 1 << 16})
    servers = await start_servers(state, 1)
    try:
        out = {"w": np.zeros_like(state["w"])}
        with pytest.raises(PeerLost) as ei:
            await fetch([servers[0].address], dests_for(state, out), secret=SECRET, peer_id="p",
                        revision=REV + 1, timeout=10)
        assert "revision" in str(ei.value)
        with pytest.raises(PeerLost) as ei:
            await fetch([servers[0].address], dests_for(state, out), secret=b"wrong", peer_id="p",
                        revision=REV, timeout=10)
        assert "proof" in str(ei.value)
        assert servers[0].refused >= 1
    finally:
        await close_all(servers)


async def test_stalled_source_times_out():
    # a listener that accepts and never speaks: the fetch ends by its deadline
    async def silent(reader, writer):
        await asyncio.sleep(30)

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        out = np.zeros(1000, np.uint8)
        with pytest.raises((PeerLost, DeadlineExceeded)):
            await fetch([srv.sockets[0].getsockname()[:2]], {"w": (memoryview(out), b"x" * 16)},
                        revision=REV, timeout=1.0, connect_timeout=0.5)
    finally:
        srv.close()


async def _raw(server: StateServer):
    reader, writer = await asyncio.open_connection(*server.address)
    magic, nonce = HELLO.unpack(await asyncio.wait_for(reader.readexactly(HELLO.size), 5))
    return reader, writer, nonce


async def _closed(reader) -> bool:
    try:
        while await asyncio.wait_for(reader.read(1 << 16), 5):
            pass
        return True
    except ConnectionError:
        return True


@pytest.mark.parametrize("case", ["garbage", "wrong_proof", "out_of_range", "huge_name", "truncated"])
async def test_bad_input_drops_the_connection_and_server_lives(case, caplog):
    caplog.set_level(logging.INFO, logger="pccl.state_transfer")
    state = make_state(9, {"w": 4096})
    servers = await start_servers(state, 1)
    srv = servers[0]
    try:
        reader, writer, nonce = await _raw(srv)
        good_auth = AUTH.pack(M_AUTH, 1) + b"x" + proof(SECRET, nonce, "x")
        if case == "garbage":
            writer.write(b"\x00garbage" * 100)
        elif case == "wrong_proof":
            writer.write(AUTH.pack(M_AUTH, 1) + b"x" + b"\0" * 32)
        elif case == "out_of_range":
            writer.write(good_auth + REQ.pack(M_REQ, 1, REV, 4000, 200) + b"w")
        elif case == "huge_name":
            writer.write(good_auth + REQ.pack(M_REQ, 60000, REV, 0, 1))
        elif case == "truncated":
            writer.write(good_auth + REQ.pack(M_REQ, 1, REV, 0, 1)[:10])
            writer.write_eof()
        assert await _closed(reader)
        writer.close()
        if case != "truncated":
            assert srv.refused == 1
            assert any("closing connection" in r.getMessage() for r in caplog.records)
        # the server still serves a good client
        out = {"w": np.zeros_like(state["w"])}
        await fetch([srv.address], dests_for(state, out), secret=SECRET, peer_id="p", revision=REV, timeout=10)
        assert np.array_equal(out["w"], state["w"])
    finally:
        await close_all(servers)


async def test_server_answers_in_range_request_exactly():
    state = make_state(10, {"w": 4096})
    servers = await start_servers(state, 1)
    try:
        reader, writer, nonce = await _raw(servers[0])
        writer.write(AUTH.pack(M_AUTH, 1) + b"x" + proof(SECRET, nonce, "x"))
        writer.write(REQ.pack(M_REQ, 1, REV, 4000, 96) + b"w")
        ok = RESP.unpack(await reader.readexactly(RESP.size))
        assert ok[1:] == (0, 0)
        head = RESP.unpack(await reader.readexactly(RESP.size))
        assert head[1:] == (0, 96)
        assert await reader.readexactly(96) == state["w"][4000:].tobytes()
        writer.close()
        assert struct.calcsize("<4sBQ") == RESP.size
    finally:
        await close_all(servers)


def test_bench_sync_smoke(capsys):
    import json

    from pccl_py.tools.bench.sync import main

    assert main(["--size", "2M", "--sources", "1", "2", "--repeat", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["bench"] for r in rows] == ["sync_fetch", "sync_fetch", "sync_no_transfer"]
    assert rows[1]["sources"] == 2 and rows[1]["gbytes_per_s"] > 0 and rows[2]["rx_bytes"] == 0


@pytest.mark.parametrize(
    "body",
    [
        lambda caplog: test_newcomer_gets_exactly_the_popular_bytes(3),
        lambda caplog: test_source_dies_mid_transfer_others_finish(),
        lambda caplog: test_all_sources_gone_is_a_clean_error_and_retry_succeeds(),
        lambda caplog: test_lying_source_is_rejected(),
        lambda caplog: test_wrong_revision_and_wrong_secret_are_refused(),
        lambda caplog: test_bad_input_drops_the_connection_and_server_lives("out_of_range", caplog),
        lambda caplog: test_bad_input_drops_the_connection_and_server_lives("garbage", caplog),
    ],
    ids=["striped", "source_dies", "all_gone", "liar", "refused", "out_of_range", "garbage"],
)
def test_on_uvloop(body, caplog):
    """The daemon runs uvloop, whose transports differ from the stdlib's (writes after close raise)."""
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(body(caplog))


async def test_fuzzed_connections_never_hurt_the_server():
    state = make_state(12, {"w": 1 << 16})
    srv = (await start_servers(state, 1))[0]
    rng = np.random.default_rng(0)
    try:
        for i in range(40):
            reader, writer, nonce = await _raw(srv)
            blob = rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes()
            if i % 2:  # authenticated, then a random request-shaped header or garbage
                blob = AUTH.pack(M_AUTH, 1) + b"x" + proof(SECRET, nonce, "x") + (
                    REQ.pack(M_REQ, int(rng.integers(0, 2000)), int(rng.integers(-5, 10)),
                             int(rng.integers(0, 1 << 40)), int(rng.integers(0, 1 << 40))) if i % 4 == 1 else b""
                ) + blob
            writer.write(blob)
            writer.write_eof()
            assert await _closed(reader)
            writer.close()
        out = {"w": np.zeros_like(state["w"])}
        await fetch([srv.address], dests_for(state, out), secret=SECRET, peer_id="p", revision=REV, timeout=10)
        assert np.array_equal(out["w"], state["w"])
    finally:
        await close_all([srv])


async def test_source_process_sigkilled_mid_transfer():
    """Real processes: one of two sources is killed by SIGKILL while the fetch runs."""
    import os
    import signal

    from pccl_py.tools.bench.sync import REVISION, _start_sources, _stop_sources
    from pccl_py.tools.bench.sync import SECRET as BSECRET
    from pccl_py.tools.bench.sync import make_state as bstate

    n = 48 << 20
    state = bstate(n)
    procs, addrs = _start_sources(2, n)
    try:
        out = np.zeros(n, np.uint8)
        killed = []

        def progress(done, total):
            if not killed and done >= total // 4:
                os.kill(procs[0].pid, signal.SIGKILL)
                killed.append(done)

        stats = await fetch(addrs, {"state": (memoryview(out), hash_buffer(state))}, secret=BSECRET, peer_id="p",
                            revision=REVISION, chunk=1 << 20, timeout=50, progress=progress)
        assert killed and np.array_equal(out, state)
        assert stats["per_source"][f"127.0.0.1:{addrs[1][1]}"] > 0
        procs[0].wait(10)
        assert procs[0].returncode == -signal.SIGKILL
    finally:
        _stop_sources(procs)
