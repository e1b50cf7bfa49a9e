"""SharedState (shm-backed tensors) and daemon_sync end to end against an in-process coordinator."""

from __future__ import annotations

import asyncio
from multiprocessing import shared_memory

import msgpack
import numpy as np
import pytest

from pccl_py.client.shared_state import ALIGN, SharedState
from pccl_py.coordinator.in_process import InProcessSyncHost
from pccl_py.daemon.state_hash import hash_buffer
from pccl_py.daemon.state_sync import daemon_sync
from pccl_py.daemon.state_transfer import StateServer
from pccl_py.errors import DeadlineExceeded, InvalidUsage, RevisionError
from pccl_py.wire.ipc import layout_views

pytestmark = pytest.mark.timeout(60)
SECRET = b"s"


def test_numpy_views_live_in_the_segment_and_describe_is_msgpackable():
    w = np.arange(1000, dtype=np.float32).reshape(10, 100)
    b = np.ones(3, dtype=np.int64)
    with SharedState({"w": w, "b": b}, revision=4, allow_content_inequality={"b"}) as st:
        assert isinstance(st["w"], np.ndarray) and st["w"].shape == (10, 100)
        assert np.array_equal(st["w"], w) and st.revision == 4
        st["w"][0, 0] = 42.0  # write through the view, read through the daemon's mapping
        d = st.describe()
        assert msgpack.unpackb(msgpack.packb(d), raw=False) == d
        views = dict((n, v) for n, v, _ in layout_views(d, st.buffer()))
        assert np.frombuffer(views["w"], np.float32)[0] == 42.0
        assert all(row[1] % ALIGN == 0 for row in d["tensors"])
        assert d["tensors"][1][5] is True and d["tensors"][0][5] is False
        assert w[0, 0] == 0.0  # the original is untouched: the state holds a copy
        name = st.segment_name
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=name)


def test_torch_tensors_stay_torch():
    torch = pytest.importorskip("torch")
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    h = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    with SharedState({"t": t, "h": h}) as st:
        assert isinstance(st["t"], torch.Tensor) and torch.equal(st["t"], t)
        assert st["h"].dtype == torch.bfloat16 and torch.equal(st["h"], h)
        st["t"].add_(1)
        views = {n: v for n, v, _ in layout_views(st.describe(), st.buffer())}
        assert np.frombuffer(views["t"], np.float32)[0] == 1.0
        assert st.describe()["tensors"][1][3] == "bfloat16"
        del views


def test_bad_arguments():
    with pytest.raises(InvalidUsage):
        SharedState({})
    with pytest.raises(InvalidUsage):
        SharedState({"a": np.zeros(2)}, allow_content_inequality={"b"})
    with pytest.raises(InvalidUsage):
        SharedState({"a": [1, 2]})
    with SharedState({"a": np.zeros(4)}) as st:
        d = st.describe()
        d["tensors"][0][2] = 1 << 40
        with pytest.raises(InvalidUsage):
            layout_views(d, st.buffer())


class CheckedChannel:
    """Every message both ways goes through msgpack and the control-plane schema checks."""

    def __init__(self, inner):
        self.inner = inner

    @staticmethod
    def check(msg):
        from pccl_py.wire import control as protocol
        from pccl_py.wire.control import SYNC_SCHEMA

        back = msgpack.unpackb(msgpack.packb(msg, use_bin_type=True), raw=False)
        body = {k: v for k, v in back.items() if k != "type"}
        protocol._check_map(back["type"], SYNC_SCHEMA[back["type"]], body)
        return back

    async def send(self, msg):
        await self.inner.send(self.check(msg))

    async def recv(self):
        return self.check(await self.inner.recv())


class Peer:
    def __init__(self, pid: str, tensors: dict, coord: InProcessSyncHost, unequal=()):
        self.pid = pid
        self.state = SharedState(tensors, allow_content_inequality=unequal)
        self.server = StateServer(pid, secret=SECRET)
        self.chan = CheckedChannel(coord.channel(pid))

    async def sync(self, strategy="enforce_popular", revision=None, timeout=30.0, progress=None):
        rev = self.state.revision + 1 if revision is None else revision
        out = await daemon_sync(layout_views(self.state.describe(), self.state.buffer()), revision=rev,
                                channel=self.chan, server=self.server, peer_id=self.pid, secret=SECRET,
                                strategy=strategy, timeout=timeout, progress=progress,
                                fetch_options={"chunk": 1 << 18})
        self.state.revision = out["revision"]
        return out

    async def close(self):
        await self.server.close()
        self.state.close()


async def sync_all(peers, **per_peer):
    res = await asyncio.gather(*(p.sync(**per_peer.get(p.pid, {})) for p in peers), return_exceptions=True)
    return dict(zip([p.pid for p in peers], res, strict=True))


def model(seed):
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((256, 300)).astype(np.float32), "b": rng.standard_normal(7),
            "step": np.array([seed], np.int64), "rng": rng.integers(0, 9, 16, dtype=np.uint8)}


async def test_sync_end_to_end():
    coord = InProcessSyncHost(["p0", "p1", "p2"])
    base = model(1)
    peers = [Peer("p0", base, coord, {"rng"}), Peer("p1", base, coord, {"rng"}),
             Peer("p2", {k: np.zeros_like(v) for k, v in base.items()}, coord, {"rng"})]
    for p in peers:
        await p.server.start()
    peers[1].state["rng"][:] = 5  # excluded from the comparison: stays different
    try:
        # 1. newcomer (p2) gets the full popular state; the others receive nothing
        res = await sync_all(peers)
        total = sum(v.nbytes for k, v in base.items() if k != "rng")
        assert res["p2"]["status"] == "fetched" and res["p2"]["rx_bytes"] == total
        assert res["p0"]["rx_bytes"] == res["p1"]["rx_bytes"] == 0
        assert res["p0"]["tx_bytes"] + res["p1"]["tx_bytes"] == total
        assert all(r["revision"] == 1 for r in res.values())
        for k in ("w", "b", "step"):
            assert hash_buffer(peers[2].state[k]) == hash_buffer(base[k])
        assert (peers[1].state["rng"] == 5).all() and (peers[2].state["rng"] == 0).all()

        # 2. everyone in step: zero bytes anywhere
        res = await sync_all(peers)
        assert all(r["status"] == "in_sync" and r["rx_bytes"] == 0 and r["tx_bytes"] == 0 for r in res.values())
        assert all(p.state.revision == 2 for p in peers)

        # 3. a corrupted tensor on p0 is repaired (only that tensor moves)
        peers[0].state["b"][3] += 1.0
        res = await sync_all(peers)
        assert res["p0"]["rx_bytes"] == base["b"].nbytes
        assert np.array_equal(peers[0].state["b"], base["b"])

        # 4. p1 breaks the revision rule: it alone fails, naming expected and offered revisions
        peers[0].state["w"][0, 0] = 7.0  # p0 and p2 train on; p2 equals p0 after this sync
        peers[2].state["w"][0, 0] = 7.0
        res = await sync_all(peers, p1={"revision": 9})
        assert isinstance(res["p1"], RevisionError)
        assert "expected revision 4" in str(res["p1"]) and "offered 9" in str(res["p1"])
        assert res["p0"]["revision"] == res["p2"]["revision"] == 4
        # ... and recovers on its next sync by offering last synced + 1 = 4; it fetches revision 5
        res = await sync_all(peers)
        assert res["p1"]["revision"] == 5 and res["p1"]["status"] == "fetched"
        assert peers[1].state["w"][0, 0] == 7.0

        # 5. send_only peer whose state lost the vote is told so; receive_only never wins
        peers[0].state["w"][1, 1] = -1.0
        peers[1].state["w"][1, 1] = -2.0
        peers[2].state["w"][1, 1] = -2.0
        res = await sync_all(peers, p0={"strategy": "send_only"})
        assert isinstance(res["p0"], InvalidUsage) and "send_only" in str(res["p0"])
        assert res["p1"]["status"] == "in_sync" and res["p2"]["status"] == "in_sync"
        assert "elected revision 6" in " ".join(coord.log)
        assert peers[0].state.revision == 5  # its failed sync left it at 5
        # p0 now alone with its own content but receive_only: it takes the others' state
        peers[1].state["w"][2, 2] = 3.0
        peers[2].state["w"][2, 2] = 3.0
        res = await sync_all(peers, p0={"strategy": "receive_only"})
        assert res["p0"]["status"] == "fetched" and res["p0"]["revision"] == 7
        assert peers[0].state["w"][1, 1] == -2.0 and peers[0].state["w"][2, 2] == 3.0
    finally:
        for p in peers:
            await p.close()


async def test_newcomer_with_source_dying_mid_sync_retries():
    coord = InProcessSyncHost(["a", "b", "new"])
    base = {"w": np.random.default_rng(3).integers(0, 255, 6 << 20, dtype=np.uint8)}
    a, b = Peer("a", base, coord), Peer("b", base, coord)
    new = Peer("new", {"w": np.zeros_like(base["w"])}, coord)
    for p in (a, b, new):
        await p.server.start()
    try:
        a.server.inject_death_after(300_000)  # a crashes while serving the newcomer
        seen = []
        res = await asyncio.gather(a.sync(), b.sync(), new.sync(progress=lambda d, t: seen.append((d, t))),
                                   return_exceptions=True)
        assert res[2]["status"] == "fetched" and np.array_equal(new.state["w"], base["w"]), res
        assert list(res[2]["fetch"]["sources_failed"]) == [a.server.source.label]
        assert seen[-1] == (base["w"].nbytes, base["w"].nbytes)
        coord.gone("a")  # the coordinator notices the death; the next sync goes on without a
        res = await asyncio.gather(b.sync(), new.sync())
        assert [r["status"] for r in res] == ["in_sync", "in_sync"]
        assert [r["revision"] for r in res] == [2, 2]
    finally:
        for p in (a, b, new):
            await p.close()


async def test_a_forged_offer_cannot_make_a_peer_take_the_attackers_state():
    """The attack: an offer in member b's name (forged, or sent by another member) names a
    state server at the attacker's address, holding the attacker's state, whose hashes are in
    the offer, so they match. The newcomer's fetch must refuse that server: it cannot prove
    the run secret as b. The newcomer's sync fails with Unauthenticated naming it, and none of
    the attacker's bytes land."""
    from pccl_py.errors import Unauthenticated

    evil = {"w": np.full(1 << 16, 0x66, np.uint8)}
    for holder in ("outsider", "member"):
        coord = InProcessSyncHost(["b", "new"])
        new = Peer("new", {"w": np.zeros_like(evil["w"])}, coord)
        # the attacker's server: without the secret, or a member's with it but another id
        attacker = StateServer("b" if holder == "outsider" else "mallory",
                               secret=b"guess" if holder == "outsider" else SECRET)
        await new.server.start()
        await attacker.start()
        attacker.publish(1, {"w": memoryview(evil["w"])})
        try:
            forged = {"type": "sync_offer", "round_hint": 0, "revision": 1, "strategy": "enforce_popular",
                      "tensors": [["w", evil["w"].nbytes, hash_buffer(evil["w"])]], "host": "127.0.0.1",
                      "port": attacker.port, "timeout": 30.0}
            await coord.channel("b").send(forged)
            with pytest.raises(Unauthenticated) as ei:
                await new.sync(timeout=10)
            assert f"b@127.0.0.1:{attacker.port}" in str(ei.value)
            assert not new.state["w"].any() and attacker.tx_bytes == 0 and new.state.revision == 0
        finally:
            await attacker.close()
            await new.close()


async def test_an_idle_connection_flood_does_not_stop_a_real_sync(caplog):
    """200 idle connections from 127.0.0.1 on the source's state server, then a sync between
    two peers (on 127.0.0.1 too): it succeeds, and the log has summaries, not 200 lines."""
    import logging

    caplog.set_level(logging.INFO, logger="pccl.state_transfer")
    coord = InProcessSyncHost(["a", "new"])
    coord.known = {"a": 0}  # a is established: its state wins, the newcomer fetches from it
    base = model(5)
    a = Peer("a", base, coord)
    new = Peer("new", {k: np.zeros_like(v) for k, v in base.items()}, coord)
    a.server.gate.interval = 1.0
    for p in (a, new):
        await p.server.start()
    flood = []
    try:
        for _ in range(200):
            flood.append((await asyncio.wait_for(asyncio.open_connection(*a.server.address), 5))[1])
        assert a.server.gate.pending("127.0.0.1") <= 8
        res = await sync_all([a, new])
        assert res["new"]["status"] == "fetched", res
        assert all(hash_buffer(new.state[k]) == hash_buffer(base[k]) for k in base)
        assert a.server.gate.total["too_many"] >= 192
        lines = [r.getMessage() for r in caplog.records if r.name == "pccl.state_transfer"
                 and r.levelno >= logging.WARNING]
        assert 1 <= len(lines) <= 4 and all("refused in the last" in m for m in lines), lines
    finally:
        for w in flood:
            w.close()
        for p in (a, new):
            await p.close()


async def test_a_peer_in_sync_takes_a_new_rounds_plan_at_its_revision_in_place_of_a_lost_complete():
    """The coordinator restarted after this peer got round 4's plan and before its
    sync_complete: the resent offer is elected again in round 1 of the new instance."""
    from pccl_py.daemon.state_sync import _in_sync_complete

    class Queue:
        def __init__(self, msgs):
            self.msgs = list(msgs)

        async def recv(self):
            if not self.msgs:
                await asyncio.sleep(10)
            return self.msgs.pop(0)

    def plan(rnd, rev, status="in_sync"):
        return {"type": "sync_plan", "round": rnd, "status": status, "revision": rev}

    def complete(rnd):
        return {"type": "sync_complete", "round": rnd, "status": "ok"}

    loop = asyncio.get_running_loop()
    got = await _in_sync_complete(Queue([complete(3), plan(1, 7), complete(1)]), 4, 7, loop.time() + 2)
    assert got["round"] == 1
    # a plan of another revision, or one that says fetch, does not stand in for it
    with pytest.raises(DeadlineExceeded):
        await _in_sync_complete(Queue([plan(1, 6), complete(1), plan(2, 7, "fetch"), complete(2)]), 4, 7,
                                loop.time() + 0.3)
