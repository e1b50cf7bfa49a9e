"""StateServer + fetch in one event loop: striping, dead sources, lying sources, bad input."""

from __future__ import annotations

import asyncio
import logging
import struct

import numpy as np
import pytest

from pccl_py.daemon.state_hash import hash_buffer
from pccl_py.daemon.state_transfer import HashMismatch, Source, StateServer, fetch
from pccl_py.errors import DeadlineExceeded, PcclError, PeerLost, ProtocolError, Unauthenticated
from pccl_py.wire import state_transfer as wire

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
        stats = await fetch([s.source for s in servers], dests_for(state, out), secret=SECRET, peer_id="new",
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
        stats = await fetch([s.source for s in servers], {}, secret=SECRET, peer_id="p", revision=REV, timeout=10)
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
        stats = await fetch([s.source for s in servers], {"w": (memoryview(mine["w"]), hash_buffer(state["w"]))},
                            secret=SECRET, peer_id="p", revision=REV, timeout=20)
        assert np.array_equal(mine["w"], state["w"]) and stats["rx_bytes"] == state["w"].nbytes
    finally:
        await close_all(servers)


async def test_large_state_striped_over_three_sources():
    state = make_state(4, {"w": 64 << 20})
    servers = await start_servers(state, 3)
    try:
        out = {"w": np.empty_like(state["w"])}
        stats = await fetch([s.source for s in servers], dests_for(state, out), secret=SECRET, peer_id="p",
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
        stats = await fetch([s.source for s in servers], dests_for(state, out), secret=SECRET, peer_id="p",
                            revision=REV, chunk=1 << 20, timeout=50)
        assert np.array_equal(out["w"], state["w"])
        label = victim.source.label
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
            await fetch([s.source for s in servers], dests_for(state, out), secret=SECRET, peer_id="p",
                        revision=REV, chunk=1 << 18, timeout=30, progress=progress)
        assert "every state source failed" in str(ei.value)
        # nobody listening at all
        dead = StateServer("dead")
        await dead.start()
        addr = dead.source
        await dead.close()
        with pytest.raises(PeerLost):
            await fetch([addr], dests_for(state, out), secret=SECRET, peer_id="p", revision=REV, timeout=10)
        # the retry, once a source serves again, succeeds
        for s in servers:
            s.publish(REV, {"w": memoryview(state["w"])})
        stats = await fetch([s.source for s in servers], dests_for(state, out), secret=SECRET, peer_id="p",
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
            await fetch([s.source for s in servers], dests_for(state, out), secret=SECRET, peer_id="p",
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
        stats = await fetch([liar.source] + [s.source for s in honest], dests_for(state, out), secret=SECRET,
                            peer_id="p", revision=REV, chunk=1 << 16, timeout=30)
        assert all(np.array_equal(out[n], state[n]) for n in state)
        # work stealing decides who serves what; whenever the liar served a chunk it is found out
        label = liar.source.label
        assert list(stats["rejected_sources"]) in ([label], [])
        if liar.tx_bytes > state["v"].nbytes:  # it served some of "w"
            assert list(stats["rejected_sources"]) == [label]
        assert bool(stats["rejected_sources"]) == (stats["rx_bytes"] > sum(v.nbytes for v in state.values()))
        # without repair the lie is only rejected
        out = {n: np.zeros_like(v) for n, v in state.items()}
        with pytest.raises(HashMismatch):
            await fetch([liar.source, honest[0].source], dests_for(state, out), secret=SECRET, peer_id="p",
                        revision=REV, chunk=1 << 18, timeout=30, repair=False)
    finally:
        await close_all([liar, *honest])


async def test_wrong_revision_and_wrong_secret_are_refused():
    state = make_state(8, {"w": 1 << 16})
    servers = await start_servers(state, 1)
    try:
        out = {"w": np.zeros_like(state["w"])}
        with pytest.raises(PeerLost) as ei:
            await fetch([servers[0].source], dests_for(state, out), secret=SECRET, peer_id="p",
                        revision=REV + 1, timeout=10)
        assert "revision" in str(ei.value)
        with pytest.raises(Unauthenticated) as ei:
            await fetch([servers[0].source], dests_for(state, out), secret=b"wrong", peer_id="p",
                        revision=REV, timeout=10)
        assert "proof" in str(ei.value) and servers[0].source.label in str(ei.value)
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
            await fetch([("silent", *srv.sockets[0].getsockname()[:2])], {"w": (memoryview(out), b"x" * 16)},
                        revision=REV, timeout=1.0, connect_timeout=0.5)
    finally:
        srv.close()


async def _raw(server: StateServer):
    """A hand-driven connection past the server's HELLO: (reader, writer, nonce_s, server id)."""
    reader, writer = await asyncio.open_connection(*server.address)
    nonce, n = wire.decode_hello(await asyncio.wait_for(reader.readexactly(wire.HELLO.size), 5))
    sid = (await asyncio.wait_for(reader.readexactly(n), 5)).decode()
    return reader, writer, nonce, sid


async def _authed(server: StateServer, client_id: str = "x"):
    """A hand-driven connection past the whole handshake: (reader, writer, session)."""
    reader, writer, nonce, sid = await _raw(server)
    cli = wire.ClientHandshake(SECRET, client_id, sid)
    writer.write(cli.auth(nonce, sid))
    head = await asyncio.wait_for(reader.readexactly(wire.RESP.size), 5)
    assert wire.decode_reply_head(head) == (wire.OK, wire.PROOF_LEN)
    session = cli.finish(await asyncio.wait_for(reader.readexactly(wire.PROOF_LEN), 5))
    return reader, writer, session


async def _closed(reader) -> bool:
    try:
        while await asyncio.wait_for(reader.read(1 << 16), 5):
            pass
        return True
    except ConnectionError:
        return True


BEFORE_AUTH = ["garbage", "wrong_proof", "wrong_server_id", "huge_id"]
AFTER_AUTH = ["out_of_range", "huge_name", "bad_tag", "truncated"]


@pytest.mark.parametrize("case", BEFORE_AUTH + AFTER_AUTH)
async def test_bad_input_drops_the_connection_and_server_lives(case, caplog):
    caplog.set_level(logging.INFO, logger="pccl.state_transfer")
    state = make_state(9, {"w": 4096})
    servers = await start_servers(state, 1)
    srv = servers[0]
    try:
        if case in BEFORE_AUTH:
            reader, writer, nonce, sid = await _raw(srv)
            cli = wire.ClientHandshake(SECRET, "x", sid)
            if case == "garbage":
                writer.write(b"\x00garbage" * 100)
            elif case == "wrong_proof":
                writer.write(wire.encode_auth("x", bytes(32), bytes(32)))
                # the refusal arrives (untagged: there is no session) before the close
                status, n = wire.decode_reply_head(await asyncio.wait_for(reader.readexactly(wire.RESP.size), 5))
                assert status == wire.REFUSED and b"proof" in await reader.readexactly(n)
            elif case == "wrong_server_id":  # a proof for another source than this server
                cli = wire.ClientHandshake(SECRET, "x", "someone-else")
                writer.write(cli.auth(nonce, "someone-else"))
            elif case == "huge_id":
                writer.write(wire.AUTH.pack(wire.M_AUTH, 60000))
        else:
            reader, writer, session = await _authed(srv)
            if case == "out_of_range":
                writer.write(wire.encode_request("w", REV, 4000, 200, session.send))
            elif case == "huge_name":
                writer.write(wire.REQ.pack(wire.M_REQ, 60000, REV, 0, 1))
            elif case == "bad_tag":
                writer.write(wire.encode_request("w", REV, 0, 10, wire.Mac(bytes(32))))  # not the session key
            elif case == "truncated":
                writer.write(wire.encode_request("w", REV, 0, 1, session.send)[:10])
                writer.write_eof()
        assert await _closed(reader)
        writer.close()
        await asyncio.sleep(0.05)  # the server's side of the connection ends
        if case != "truncated":
            assert srv.refused == 1
        messages = [r.getMessage() for r in caplog.records]
        if case in BEFORE_AUTH:  # told in a summary, with its reason
            why = {"garbage": "malformed", "huge_id": "malformed"}.get(case, "bad proof")
            assert any("refused in the last" in m and why in m for m in messages), messages
            assert not any("closing connection" in m for m in messages)
        elif case != "truncated":  # an authenticated peer misbehaved: a line of its own naming it
            assert any("closing connection from x@127.0.0.1" in m for m in messages), messages
        # the server still serves a good client
        out = {"w": np.zeros_like(state["w"])}
        await fetch([srv.source], dests_for(state, out), secret=SECRET, peer_id="p", revision=REV, timeout=10)
        assert np.array_equal(out["w"], state["w"])
    finally:
        await close_all(servers)


async def test_server_answers_in_range_request_exactly():
    state = make_state(10, {"w": 4096})
    servers = await start_servers(state, 1)
    try:
        reader, writer, session = await _authed(servers[0])
        writer.write(wire.encode_request("w", REV, 4000, 96, session.send))
        head = await reader.readexactly(wire.RESP.size + wire.TAG_LEN)
        session.recv.check(head[:wire.RESP.size], head[wire.RESP.size:])
        assert wire.decode_reply_head(head[:wire.RESP.size]) == (wire.OK, 96)
        assert await reader.readexactly(96) == state["w"][4000:].tobytes()
        writer.close()
        assert struct.calcsize("<4sBQ") == wire.RESP.size
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
            blob = rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes()
            if i % 2:  # authenticated, then a random request-shaped header or garbage
                reader, writer, session = await _authed(srv)
                if i % 4 == 1:
                    blob = wire.encode_request("w" * int(rng.integers(1, 2000)), int(rng.integers(-5, 10)),
                                               int(rng.integers(0, 1 << 40)), int(rng.integers(0, 1 << 40)),
                                               session.send) + blob
            else:
                reader, writer, _, _ = await _raw(srv)
            writer.write(blob)
            writer.write_eof()
            assert await _closed(reader)
            writer.close()
        out = {"w": np.zeros_like(state["w"])}
        await fetch([srv.source], dests_for(state, out), secret=SECRET, peer_id="p", revision=REV, timeout=10)
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
        assert stats["per_source"][addrs[1].label] > 0
        procs[0].wait(10)
        assert procs[0].returncode == -signal.SIGKILL
    finally:
        _stop_sources(procs)


# ---------------------------------------------------------------- every source authenticated


async def _liar_server(state: np.ndarray, claimed_id: str):
    """A server that speaks the protocol and claims ``claimed_id`` without the secret: it
    answers any AUTH with a made-up proof, then serves its own bytes to anyone who asks."""
    served = []

    async def handle(reader, writer):
        try:
            writer.write(wire.encode_hello(bytes(32), claimed_id))
            n = wire.decode_auth_head(await reader.readexactly(wire.AUTH.size))
            await reader.readexactly(wire.auth_rest_size(n))
            writer.write(wire.RESP.pack(wire.M_RESP, wire.OK, wire.PROOF_LEN) + bytes(range(32)))
            while True:
                head = await reader.readexactly(wire.REQ.size)
                n, req = wire.decode_request_head(head)
                await reader.readexactly(n)
                served.append(req)
                writer.write(wire.RESP.pack(wire.M_RESP, wire.OK, req.length) + bytes(16)
                             + state[req.offset:req.offset + req.length].tobytes())
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, served


@pytest.mark.parametrize("impostor", ["no_secret", "other_member", "fake_proof"])
async def test_a_source_that_cannot_prove_itself_is_dropped_and_never_read(impostor):
    """The attack: a forged sync offer names a source at an attacker's address. The attacker's
    bytes hash to what it offered, so only authentication keeps them out."""
    state = make_state(13, {"w": 1 << 20})
    evil = make_state(14, {"w": 1 << 20})
    honest = (await start_servers(state, 1))[0]
    closers = [honest]
    served: list = []
    if impostor == "no_secret":  # claims the named id, lacks the secret
        srv = StateServer("src9", secret=b"not the run secret")
        await srv.start()
        srv.publish(REV, {"w": memoryview(evil["w"])})
        bad, closers = srv.source, closers + [srv]
    elif impostor == "other_member":  # holds the secret, but is not the peer the plan named
        srv = StateServer("mallory", secret=SECRET)
        await srv.start()
        srv.publish(REV, {"w": memoryview(evil["w"])})
        bad, closers = Source("src9", *srv.address), closers + [srv]
    else:  # speaks the protocol with a made-up proof
        raw, served = await _liar_server(evil["w"], "src9")
        bad = Source("src9", "127.0.0.1", raw.sockets[0].getsockname()[1])
    try:
        # with an honest source beside it: the fetch goes on with the honest one alone
        out = {"w": np.zeros_like(state["w"])}
        stats = await fetch([bad, honest.source], dests_for(state, out), secret=SECRET,
                            peer_id="p", revision=REV, chunk=1 << 16, timeout=20)
        assert np.array_equal(out["w"], state["w"])
        assert stats["per_source"][bad.label] == 0 and bad.label in stats["sources_failed"]
        # alone: the sync fails with a typed error naming it, and none of its bytes land
        out = {"w": np.zeros_like(state["w"])}
        with pytest.raises(Unauthenticated) as ei:
            await fetch([bad], dests_for(evil, out), secret=SECRET, peer_id="p", revision=REV, timeout=20)
        assert bad.label in str(ei.value) and not out["w"].any()
        assert served == [] and all(s.tx_bytes == 0 for s in closers[1:])
    finally:
        await close_all(closers)
        if impostor == "fake_proof":
            raw.close()


async def _idle(server: StateServer, n: int) -> list[asyncio.StreamWriter]:
    """``n`` connections that never say a word (their reader is never read: the hello stays
    in the kernel's buffers)."""
    out = []
    for _ in range(n):
        _, writer = await asyncio.wait_for(asyncio.open_connection(*server.address), 5)
        out.append(writer)
    return out


async def _wait_for(cond, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_connection_that_does_not_prove_itself_in_time_is_closed(caplog):
    caplog.set_level(logging.INFO, logger="pccl.state_transfer")
    state = make_state(15, {"w": 4096})
    srv = StateServer("s", secret=SECRET, handshake_timeout=0.3, log_interval=60.0)
    await srv.start()
    srv.publish(REV, {"w": memoryview(state["w"])})
    try:
        reader, writer = await asyncio.open_connection(*srv.address)
        t0 = asyncio.get_running_loop().time()
        assert await _closed(reader)  # the hello, then the server's close
        assert 0.25 < asyncio.get_running_loop().time() - t0 < 3.0
        writer.close()
        await _wait_for(lambda: srv.gate.total["timeout"] == 1, 5)
        assert srv.refused == 1 and srv.gate.pending("127.0.0.1") == 0
        assert any("1 handshake timeout" in r.getMessage() for r in caplog.records)
    finally:
        await srv.close()


async def test_too_many_pending_connections_from_one_address_are_closed_at_once():
    srv = StateServer("s", secret=SECRET, handshake_timeout=30.0, max_pending_per_address=4, log_interval=60.0)
    await srv.start()
    try:
        writers = await _idle(srv, 10)
        await _wait_for(lambda: srv.gate.total["too_many"] == 6, 5)  # young: the newcomers go
        assert srv.gate.pending("127.0.0.1") == 4 and len(srv._writers) == 4
        for w in writers:
            w.close()
    finally:
        await srv.close()


async def test_an_idle_flood_does_not_stop_a_fetch_and_is_told_in_summaries(caplog):
    """200 idle connections from the fetcher's own address, then a fetch: it gets through (an
    idle connection gives its place up after a second), and the log has a few summaries."""
    caplog.set_level(logging.INFO, logger="pccl.state_transfer")
    state = make_state(16, {"w": 1 << 20})
    srv = StateServer("s", secret=SECRET, log_interval=1.0)
    await srv.start()
    srv.publish(REV, {"w": memoryview(state["w"])})
    writers = []
    try:
        writers = await _idle(srv, 200)
        await _wait_for(lambda: srv.gate.total["too_many"] >= 192, 10)
        out = {"w": np.zeros_like(state["w"])}
        stats = await fetch([srv.source], dests_for(state, out), secret=SECRET, peer_id="p", revision=REV,
                            timeout=20)
        assert np.array_equal(out["w"], state["w"]) and stats["rx_bytes"] == state["w"].nbytes
        await asyncio.sleep(1.1)  # the next summary is due
        lines = [r.getMessage() for r in caplog.records if r.name == "pccl.state_transfer"
                 and r.levelno >= logging.WARNING]
        assert 1 <= len(lines) <= 4, lines
        told = sum(int(m.split(": ")[1].split()[0]) for m in lines if "refused in the last" in m)
        assert told >= 192 and all("too many pending" in m for m in lines), lines
    finally:
        for w in writers:
            w.close()
        await srv.close()


async def test_refused_connections_are_counted_in_the_metrics():
    pytest.importorskip("prometheus_client")
    from pccl_py.metrics import Metrics

    m = Metrics("daemon")
    state = make_state(17, {"w": 4096})
    srv = StateServer("s", secret=SECRET, count=m.rejected("state"))
    await srv.start()
    srv.publish(REV, {"w": memoryview(state["w"])})
    try:
        out = {"w": np.zeros_like(state["w"])}
        with pytest.raises(Unauthenticated):
            await fetch([srv.source], dests_for(state, out), secret=b"wrong", peer_id="p", revision=REV,
                        streams_per_source=3, timeout=10)
        reader, writer, session = await _authed(srv)
        writer.write(wire.encode_request("w", REV, 4000, 200, session.send))  # out of range
        assert await _closed(reader)
        writer.close()
        await _wait_for(lambda: srv.bad_requests == 1, 5)
        text = m.text()
        assert 'pccl_rejected_connections_total{port="state",reason="bad_proof"} 3.0' in text
        assert 'pccl_rejected_connections_total{port="state",reason="bad_request"} 1.0' in text
    finally:
        await srv.close()


async def test_a_payload_bit_flipped_on_the_way_is_never_accepted():
    """A relay in front of one source flips one payload bit: that source's connection
    fails its payload tag and its share comes from the other source; alone, the fetch
    fails with a typed error and nothing changed is accepted."""
    from test_hostile_dataplane import Relay

    state = make_state(21, {"w": 4 << 20})
    servers = await start_servers(state, 2)
    relay = Relay(servers[0].address[1], flip=("down", 5000))  # past the handshake, in the first payload
    try:
        port = await relay.start_tcp()
        relayed = Source(servers[0].source.peer_id, "127.0.0.1", port)
        out = {"w": np.zeros_like(state["w"])}
        stats = await fetch([relayed, servers[1].source], dests_for(state, out), secret=SECRET, peer_id="p",
                            revision=REV, chunk=1 << 20, streams_per_source=1, timeout=20)
        assert relay.flipped and np.array_equal(out["w"], state["w"])
        assert relayed.label in stats["sources_failed"], stats
        relay.flip, relay.flipped = ("down", 5000), False
        out = {"w": np.zeros_like(state["w"])}
        with pytest.raises(PcclError):
            await fetch([relayed], dests_for(state, out), secret=SECRET, peer_id="p", revision=REV,
                        chunk=1 << 20, streams_per_source=1, timeout=10)
        assert relay.flipped
    finally:
        await relay.close()
        await close_all(servers)
