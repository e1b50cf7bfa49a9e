"""Hostile traffic on data links: a relay that changes payload bits (TCP and same-host
links, event-loop and I/O-thread paths), a squatter on a same-host socket that answers
nothing, another local user, an unsafe socket directory. Each checks that no peer gets a
wrong result (a typed error instead) and that the run goes on afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

import numpy as np
import pytest
from test_dataplane import SECRET, families, make_inputs, reference, run

from pccl_py.daemon.dataplane import DataPlane, DataPlaneConfig, same_host_address
from pccl_py.daemon.topology import PeerInfo, Topology
from pccl_py.errors import PcclError
from pccl_py.transport import local

pytestmark = pytest.mark.timeout(60)

COUNT = 1 << 20  # float32: 4 MiB a peer, so frames run to megabytes and past the I/O-thread threshold


class Relay:
    """Forwards TCP or Unix connections to ``target``; with ``flip`` set to (direction,
    offset), flips one bit of the byte at that offset of one direction of the first
    connection ("up": dialler to listener, "down": back), once."""

    def __init__(self, target, flip: tuple[str, int] | None = None):
        self.target = target
        self.flip = flip
        self.flipped = False
        self.seen = bytearray()  # the first 16 MiB that passed, both directions
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start_tcp(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def start_unix(self, path: str) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path)

    async def _connect(self):
        if isinstance(self.target, int):
            return await asyncio.open_connection("127.0.0.1", self.target)
        return await asyncio.open_unix_connection(self.target)

    async def _serve(self, r1, w1) -> None:
        r2, w2 = await self._connect()
        flip, self.flip = self.flip, None  # the first connection only
        pumps = [asyncio.ensure_future(self._pump(r1, w2, flip if flip and flip[0] == "up" else None)),
                 asyncio.ensure_future(self._pump(r2, w1, flip if flip and flip[0] == "down" else None))]
        self.tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for t in pumps:
            t.cancel()
        for w in (w1, w2):
            w.close()

    async def _pump(self, r, w, flip) -> None:
        seen = 0
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await r.read(1 << 16):
                if flip is not None and seen <= flip[1] < seen + len(data):
                    data = bytearray(data)
                    data[flip[1] - seen] ^= 0x04
                    self.flipped = True
                    flip = None
                seen += len(data)
                if len(self.seen) < 16 << 20:
                    self.seen += data
                w.write(data)
                await w.drain()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in self.tasks:
            t.cancel()


async def reduce_all(dps, srcs, tag: int, timeout: float = 15.0):
    dsts = [np.zeros_like(s) for s in srcs]
    res = await asyncio.gather(*(d.all_reduce(srcs[i], dsts[i], dtype="float32", op="sum", algorithm="ring",
                                              tag=tag, timeout=timeout) for i, d in enumerate(dps)),
                               return_exceptions=True)
    return dsts, res


def topologies(dps, epoch: int, dial_b_at: int) -> list[Topology]:
    """peer0 dials peer1 (the lower id dials) at port ``dial_b_at``; peer1 sees the truth."""
    a, b = dps
    seen_by_a = (PeerInfo(a.peer_id, "127.0.0.1", a.port), PeerInfo(b.peer_id, "127.0.0.1", dial_b_at))
    truth = (PeerInfo(a.peer_id, "127.0.0.1", a.port), PeerInfo(b.peer_id, "127.0.0.1", b.port))
    return [Topology(epoch, 0, 0, seen_by_a, 2), Topology(epoch, 0, 1, truth, 2)]


async def two_peers(io_threads: bool, same_host: bool, encrypt: bool = False):
    cfg = DataPlaneConfig(io_threads=io_threads, bulk_min=64 << 10, same_host_links=same_host, encrypt=encrypt)
    dps = [DataPlane(f"peer{i}", secret=SECRET, streams=2, config=cfg) for i in range(2)]
    for d in dps:
        await d.start()
    return dps


def check_outcome(dsts, res, want) -> None:
    """Every peer either failed with a typed error or holds the right result."""
    for d, r in zip(dsts, res):
        if isinstance(r, BaseException):
            assert isinstance(r, PcclError), r
        else:
            assert d.tobytes() == want.tobytes(), "a changed frame gave a result"


@pytest.mark.parametrize("encrypt", [False, True], ids=["tagged", "encrypted"])
@pytest.mark.parametrize("io_threads", [False, True], ids=["loop", "threads"])
@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("link", ["tcp", "unix"])
def test_a_relay_that_flips_a_payload_bit_fails_the_call_and_the_next_epoch_works(link, direction, io_threads,
                                                                                   encrypt, caplog):
    caplog.set_level(logging.WARNING, logger="pccl.dataplane")
    srcs = [np.random.default_rng(i).standard_normal(COUNT).astype(np.float32) for i in range(2)]
    want = reference(srcs, "float32", "sum")

    async def body():
        dps = await two_peers(io_threads, same_host=link == "unix", encrypt=encrypt)
        a, b = dps
        relay = Relay(b.port, flip=(direction, 300_000))  # well past the handshake: inside a payload
        try:
            if link == "tcp":
                dial = await relay.start_tcp()
            else:  # the relay takes peer1's same-host socket; peer1's listener moves aside
                dial = b.port
                path = same_host_address("127.0.0.1", b.port)
                os.rename(path, path + ".real")
                relay.target = path + ".real"
                await relay.start_unix(path)
            topos = topologies(dps, 1, dial)
            await asyncio.gather(*(d.set_topology(t) for d, t in zip(dps, topos)))
            if link == "unix":
                assert families(a)[b.peer_id] == {"AF_UNIX"}
            dsts, res = await reduce_all(dps, srcs, tag=1)
            assert relay.flipped
            check_outcome(dsts, res, want)
            assert any(isinstance(r, PcclError) for r in res), "a flipped bit went unnoticed"
            # the run goes on: a new epoch, new links (the relay passes bytes unchanged now)
            topos = topologies(dps, 2, dial)
            await asyncio.gather(*(d.set_topology(t) for d, t in zip(dps, topos)))
            dsts, res = await reduce_all(dps, srcs, tag=1)
            assert not any(isinstance(r, BaseException) for r in res), res
            for d in dsts:
                assert d.tobytes() == want.tobytes()
            # what an eavesdropper on the link saw: the inputs in clear, unless encrypted
            probe = srcs[0][1000:1004].tobytes() + srcs[0][1004:1008].tobytes()
            assert (probe in relay.seen) is not encrypt
        finally:
            await relay.close()
            for d in dps:
                await d.close()

    run(body())
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "failed its integrity check" in text


def test_a_silent_squatter_on_a_same_host_socket_costs_a_second_then_tcp(caplog):
    caplog.set_level(logging.WARNING, logger="pccl.dataplane")
    srcs = make_inputs(2, 5000, "float32", "sum", seed=1)

    async def body():
        dps = await two_peers(False, same_host=True)
        a, b = dps
        path = same_host_address("127.0.0.1", b.port)
        os.unlink(path)  # someone with this user's rights put a listener that never answers there
        squatter = await asyncio.start_unix_server(lambda r, w: None, path)
        try:
            topos = topologies(dps, 1, b.port)
            t0 = asyncio.get_running_loop().time()
            await asyncio.gather(*(d.set_topology(t) for d, t in zip(dps, topos)))
            dsts, res = await reduce_all(dps, srcs, tag=1)
            took = asyncio.get_running_loop().time() - t0
            assert not any(isinstance(r, BaseException) for r in res), res
            assert dsts[0].tobytes() == reference(srcs, "float32", "sum").tobytes()
            assert families(a)[b.peer_id] == {"AF_INET"}
            assert took < 4.0, took
        finally:
            squatter.close()
            for d in dps:
                await d.close()

    run(body())
    assert "no handshake within" in "\n".join(r.getMessage() for r in caplog.records)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_local_user_can_neither_reach_nor_replace_a_same_host_socket():
    async def body():
        dps = await two_peers(False, same_host=True)
        try:
            path = same_host_address("127.0.0.1", dps[1].port)
            assert os.path.exists(path)
            pid = os.fork()
            if pid == 0:  # the other user: nobody
                code = 0
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    for attempt in (lambda: s.connect(path), lambda: os.unlink(path),
                                    lambda: s.bind(path + ".mine")):
                        try:
                            attempt()
                            code = 1  # it got through
                        except PermissionError:
                            pass
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, "another user reached the private socket directory"
        finally:
            for d in dps:
                await d.close()

    run(body())


def test_a_socket_directory_others_can_enter_is_not_used(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="pccl.dataplane")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    monkeypatch.setenv("PCCL_SOCKET_DIR", str(shared))
    assert local.private_dir() is None
    assert same_host_address("127.0.0.1", 1234) is None
    private = tmp_path / "private"
    monkeypatch.setenv("PCCL_SOCKET_DIR", str(private))
    assert local.private_dir() == str(private)  # made, mode 700
    assert os.stat(private).st_mode & 0o777 == 0o700
    assert "same-host links are off" in caplog.text

    async def body():  # with no private directory, peers on one host still reach each other (TCP)
        monkeypatch.setenv("PCCL_SOCKET_DIR", str(shared))
        dps = await two_peers(False, same_host=True)
        try:
            topos = topologies(dps, 1, dps[1].port)
            await asyncio.gather(*(d.set_topology(t) for d, t in zip(dps, topos)))
            srcs = make_inputs(2, 100, "float32", "sum", seed=2)
            _, res = await reduce_all(dps, srcs, tag=1)
            assert not any(isinstance(r, BaseException) for r in res)
            assert families(dps[0])[dps[1].peer_id] == {"AF_INET"}
        finally:
            for d in dps:
                await d.close()

    run(body())


@pytest.mark.parametrize("io_threads", [False, True], ids=["loop", "threads"])
@pytest.mark.parametrize("links", ["tcp", "unix"])
def test_encrypted_links_give_exact_results(links, io_threads):
    """Payloads encrypted on the wire: every size path (staged, direct, I/O threads) and
    algorithm decrypts to the same bytes."""
    from test_dataplane import all_reduce_all
    from test_dataplane import cluster as dp_cluster

    cfg = DataPlaneConfig(encrypt=True, io_threads=io_threads, bulk_min=64 << 10)

    async def body():
        async with dp_cluster(3, config=cfg, tcp_only=range(3) if links == "tcp" else ()) as dps:
            tag = 0
            for dtype in ("float32", "int64"):
                for count in (1, 1031, 300_000):
                    for algorithm in ("ring", "direct"):
                        tag += 1
                        srcs = make_inputs(3, count, dtype, "sum", seed=tag)
                        dsts, _ = await all_reduce_all(dps, srcs, dtype=dtype, op="sum", algorithm=algorithm, tag=tag)
                        want = reference(srcs, dtype, "sum")
                        assert all(d.tobytes() == want.tobytes() for d in dsts), (dtype, count, algorithm)

    run(body())


@pytest.mark.parametrize("kind", ["idle", "garbage", "slow"])
def test_a_flood_of_strangers_on_a_data_port_costs_the_run_nothing_and_the_log_little(kind, caplog):
    """300 connections that never authenticate (idle, garbage, or a byte now and then)
    while two peers all-reduce: every call is exact, and the log has a few summary lines,
    not one per connection."""
    caplog.set_level(logging.INFO, logger="pccl.dataplane")
    cfg = DataPlaneConfig(handshake_timeout=1.0, same_host_links=False)
    srcs = make_inputs(2, 200_000, "float32", "sum", seed=5)
    want = reference(srcs, "float32", "sum")

    async def body():
        dps = [DataPlane(f"peer{i}", secret=SECRET, streams=2, config=cfg) for i in range(2)]
        for d in dps:
            await d.start()
        flood: list[asyncio.StreamWriter] = []
        try:
            async def stranger():
                with contextlib.suppress(OSError, RuntimeError):  # (closed by the listener meanwhile)
                    r, w = await asyncio.open_connection("127.0.0.1", dps[1].port)
                    flood.append(w)
                    if kind == "garbage":
                        w.write(os.urandom(300))
                    elif kind == "slow":
                        for _ in range(3):
                            w.write(b"P")
                            await asyncio.sleep(0.5)
            strangers = asyncio.ensure_future(asyncio.gather(*(stranger() for _ in range(300))))
            await asyncio.sleep(0.2)
            topos = topologies(dps, 1, dps[1].port)
            await asyncio.gather(*(d.set_topology(t) for d, t in zip(dps, topos)))
            for tag in range(1, 6):
                dsts, res = await reduce_all(dps, srcs, tag=tag)
                assert not any(isinstance(r, BaseException) for r in res), res
                assert all(d.tobytes() == want.tobytes() for d in dsts)
            await strangers
            await asyncio.sleep(1.5)  # the handshake timeout ends those still waiting
            assert sum(dps[1].gate.total.values()) >= 100, dps[1].gate.total  # (some never got past the backlog)
        finally:
            for w in flood:
                w.close()
            for d in dps:
                await d.close()

    run(body())
    lines = [r.getMessage() for r in caplog.records if "data connection" in r.getMessage() or "refused in" in
             r.getMessage()]
    assert 1 <= len(lines) <= 6, lines


@pytest.mark.parametrize("io_threads", [False, True], ids=["loop", "threads"])
def test_encrypted_quantized_calls_decode_their_hidden_block_parameters(io_threads):
    """With encryption a quantized frame's lo and scale travel encrypted (the header's only
    fields that say something of the data): the peers decode them and agree."""
    from test_dataplane import all_reduce_all
    from test_dataplane import cluster as dp_cluster

    cfg = DataPlaneConfig(encrypt=True, io_threads=io_threads, bulk_min=64 << 10, same_host_links=False)
    rng = np.random.default_rng(3)
    srcs = [(rng.standard_normal(300_000) * 3 + 11).astype(np.float32) for _ in range(3)]

    async def body():
        async with dp_cluster(3, config=cfg) as dps:
            dsts, _ = await all_reduce_all(dps, srcs, dtype="float32", op="sum", algorithm="ring", quant="uint8")
            assert all(d.tobytes() == dsts[0].tobytes() for d in dsts)
            exact = np.sum(np.stack(srcs).astype(np.float64), axis=0)
            assert np.max(np.abs(dsts[0] - exact)) < 0.5  # uint8 steps of a block's range / 255, three peers

    run(body())
