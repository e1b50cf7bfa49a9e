"""Attacks on the control plane (zmq CURVE with keys from the run secret) that
tests/test_curve.py does not make.

Claims attacked (docs/protocol.md "Authentication: CURVE"; DESIGN.md section 8): a process
without the secret cannot join, cannot make the coordinator drop or change a member, and a
process on the coordinator's address cannot make daemons act, even when it

* knows the coordinator's public key and the member *public* key (not its secret key);
* replays, byte for byte, the TCP stream a legitimate daemon sent the coordinator (its
  CURVE handshake, hello, heartbeats, a leave), paced as the original was or all at once;
* plays back to daemons, during a coordinator restart, the TCP stream the real coordinator
  sent a daemon (its CURVE handshake with the coordinator's long-term key, then a topology
  and a "removed");
* floods the port with failed handshakes under a member's routing id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import pytest
import uvloop
import zmq
from conftest import free_port
from test_curve import OTHER, SECRET, channels, pair, rejected, served, until

from pccl_py.coordinator.membership import MembershipConfig
from pccl_py.coordinator.server import Coordinator as CoordinatorServer
from pccl_py.daemon.control import ControlChannel
from pccl_py.metrics import Metrics
from pccl_py.tools.status import query_status
from pccl_py.wire import control as protocol
from pccl_py.wire import keys

pytestmark = pytest.mark.timeout(60)


class ByteRelay:
    """A TCP relay that records each direction as the chunks it read (for replays)."""

    def __init__(self, target: int):
        self.target = target
        self.up: list[bytes] = []  # client -> server
        self.down: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None
        self._writers: list = []
        self._tasks: set = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, r1, w1):
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            w1.transport.abort()
            return
        self._writers += [w1, w2]
        pumps = [asyncio.ensure_future(self._pump(r1, w2, self.up)), asyncio.ensure_future(self._pump(r2, w1, self.down))]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for t in pumps:
            t.cancel()
        for w in (w1, w2):
            w.transport.abort()

    async def _pump(self, r, w, log: list):
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await r.read(1 << 16):
                log.append(data)
                w.write(data)
                await w.drain()

    async def close(self):
        if self.server is not None:
            self.server.close()
        for t in self._tasks:
            t.cancel()
        for w in self._writers:
            w.transport.abort()


async def replay(port: int, chunks: list[bytes], paced: bool, within: float = 3.0) -> bytes:
    """Send ``chunks`` on a new connection (``paced``: one chunk per answer from the server,
    as the original exchange went; else all at once); returns what the server said."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    got = bytearray()
    deadline = time.monotonic() + within
    try:
        for c in chunks:
            w.write(c)
            if paced:
                with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                    data = await asyncio.wait_for(r.read(1 << 16), 0.2)
                    if not data:
                        break
                    got += data
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(r.read(1 << 16), max(0.01, deadline - time.monotonic()))
            except (asyncio.TimeoutError, ConnectionError):
                break
            if not data:
                break
            got += data
    finally:
        w.transport.abort()
    return bytes(got)


def count_handshakes(coord) -> list:
    """Every CURVE handshake the coordinator completes from now on (instrumented)."""
    done: list = []
    orig = coord.handshakes.succeeded

    def succeeded():
        done.append(time.monotonic())
        orig()
    coord.handshakes.succeeded = succeeded
    return done


def members(st: dict) -> list[tuple[str, str]]:
    return sorted((m["peer_id"], m["state"]) for m in st["members"])


# ----------------------------------------------------------------------------- key knowledge

def test_the_member_public_key_without_its_secret_key_completes_no_handshake():
    """The public keys are not secrets (logs, a core dump, a leaked status line): a client
    presenting the member public key with a secret key of its own, to the coordinator whose
    public key it also knows, must not get through, whatever it then sends as member b."""
    async def body():
        metrics = Metrics("coordinator")
        async with served(metrics=metrics) as (coord, addr), channels() as make:
            a, b = await pair(make, addr)
            epoch = a.topology.epoch
            done = count_handshakes(coord)
            member_pub, _ = keys.curve_keypair(SECRET.encode(), "member")
            coord_pub, _ = keys.curve_keypair(SECRET.encode(), "coordinator")
            _, random_sec = zmq.curve_keypair()
            _, other_member_sec = keys.curve_keypair(OTHER, "member")
            ctx = zmq.Context.instance()
            socks = []
            try:
                for sec in (random_sec, other_member_sec, coord_pub):  # (the last: a public key as the secret)
                    s = ctx.socket(zmq.DEALER)
                    socks.append(s)
                    s.setsockopt(zmq.LINGER, 0)
                    s.setsockopt(zmq.ROUTING_ID, b._sock.getsockopt(zmq.ROUTING_ID))
                    s.curve_serverkey, s.curve_publickey, s.curve_secretkey = coord_pub, member_pub, sec
                    s.connect(f"tcp://{addr}")
                    for m in (protocol.encode("leave", reason="b leaves (not really)"),
                              protocol.encode("hello", peer_id="mallory", group=0, host="10.9.9.9", port=1,
                                              claim="new", epoch=0, ring_pos=0, world=0, revision=0, instance="",
                                              timeout=0.0),
                              protocol.encode("status_q", req=1)):
                        s.send(m, zmq.NOBLOCK)
                await until(lambda: coord.handshakes.rejected >= 3, 5, "three rejections")
                await asyncio.sleep(0.5)
                assert [s.poll(0) for s in socks] == [0, 0, 0], "the coordinator answered"
            finally:
                for s in socks:
                    s.close(linger=0)
            assert done == [], "a client without the member secret key completed a CURVE handshake"
            st = await query_status(addr, 5, secret=SECRET.encode())
            assert st["epoch"] == epoch and members(st) == [("a", "accepted"), ("b", "accepted")]
            assert a.state == b.state == "accepted"

    uvloop.run(body())


# ----------------------------------------------------------------------------- replayed daemon session

@pytest.mark.parametrize("paced", [False, True], ids=["at-once", "paced"])
def test_a_replayed_daemon_session_reaches_nothing(paced, caplog):
    """Member b talks to the coordinator through a recording relay; member c joins through
    it and leaves. Their recorded client-to-coordinator bytes are replayed on new
    connections (c's stream would re-join c and then leave; b's would take over b's
    routing id). No replay completes a handshake; membership and epoch stay as they were;
    the rejections are counted."""
    caplog.set_level(logging.INFO, logger="pccl.coordinator")

    async def body():
        metrics = Metrics("coordinator")
        async with served(metrics=metrics) as (coord, addr), channels() as make:
            port = int(addr.rsplit(":", 1)[1])
            relay = ByteRelay(port)
            rport = await relay.start()
            try:
                a, b = await pair(make, addr)
                c = await make(f"127.0.0.1:{rport}", "c")
                join = asyncio.create_task(c.connect(5))
                await until(lambda: c.state == "pending", 5, "c registered")
                await asyncio.gather(a.update_topology(5), b.update_topology(5))
                await join
                await c.leave()
                await c.close()
                await until(lambda: a.topology.world_size == 2, 5, "c gone")
                recorded = list(relay.up)
                assert len(recorded) >= 4, recorded
            finally:
                await relay.close()
            st0 = await query_status(addr, 5, secret=SECRET.encode())
            assert members(st0) == [("a", "accepted"), ("b", "accepted")]
            done = count_handshakes(coord)
            before = coord.handshakes.rejected
            answers = await asyncio.gather(*(replay(port, recorded, paced) for _ in range(3)))
            await until(lambda: coord.handshakes.rejected >= before + 3, 5, "the replays rejected")
            await asyncio.sleep(0.3)
            assert done == [], "a replayed session completed a CURVE handshake"
            st = await query_status(addr, 5, secret=SECRET.encode())
            assert members(st) == members(st0) and st["epoch"] == st0["epoch"], (st0, st)
            assert a.state == b.state == "accepted" and a.topology.epoch == st0["epoch"]
            assert sum(rejected(metrics).values()) >= 3
            d = await make(addr, "d")  # the instrument works: a real daemon's handshake is counted
            await until(lambda: done, 5, "a legitimate handshake counted")
            await d.close()
            return answers

    answers = uvloop.run(body())
    # the coordinator only ever sent its greeting and handshake messages, never a message body
    assert all(len(x) < 400 for x in answers), [len(x) for x in answers]


# ----------------------------------------------------------------------------- replayed coordinator

def test_a_replayed_coordinator_cannot_make_members_act_during_a_restart():
    """Record what the real coordinator sent daemon c (CURVE handshake under the
    coordinator's long-term key, welcome, topology, and "removed" after c sent a malformed
    message). Kill the coordinator; something plays that recording back to every daemon
    that dials its port. The members must read nothing of it (no removal, no abort, no new
    topology) and carry on when the real coordinator returns."""
    port = free_port()
    events: dict[str, list] = {"removed": [], "abort": [], "topology": []}
    cfg = MembershipConfig(recovery_grace=2.5, heartbeat_deadline=3.0)

    async def body():
        coord = CoordinatorServer(f"127.0.0.1:{port}", secret=SECRET.encode(), config=cfg)
        await coord.start()
        made: list[ControlChannel] = []

        async def make(target: str, pid: str, watch: bool) -> ControlChannel:
            async def on_topology(topo):
                if watch:
                    events["topology"].append((pid, topo.epoch))
            ch = ControlChannel(target, group=0, data_addr=("127.0.0.1", 20000 + len(made)),
                                secret=SECRET.encode(), peer_id=pid, coordinator_timeout=2.0,
                                on_topology=on_topology,
                                on_removed=(lambda why, pid=pid: events["removed"].append((pid, why))) if watch else None,
                                on_abort=(lambda exc, pid=pid: events["abort"].append((pid, exc))) if watch else None)
            await ch.start()
            made.append(ch)
            return ch

        impostor = None
        try:
            a, b = await make(f"127.0.0.1:{port}", "a", True), await make(f"127.0.0.1:{port}", "b", True)
            await a.connect(5)
            join = asyncio.create_task(b.connect(5))
            await until(lambda: b.state == "pending", 5, "b registered")
            await a.update_topology(5)
            await join
            # c, through a recording relay: joins, then sends garbage and is removed (and told so)
            relay = ByteRelay(port)
            rport = await relay.start()
            c = await make(f"127.0.0.1:{rport}", "c", False)
            join = asyncio.create_task(c.connect(5))
            await until(lambda: c.state == "pending", 5, "c registered")
            await asyncio.gather(a.update_topology(5), b.update_topology(5))
            await join
            c._sock.send(b"\xc1 not msgpack")
            await until(lambda: c.state == "removed", 5, "c removed")
            await c.close()
            await relay.close()
            recording = b"".join(relay.down)
            assert len(recording) > 300
            await until(lambda: a.topology.world_size == b.topology.world_size == 2, 5, "c gone for a and b")
            epoch = a.topology.epoch
            events["topology"].clear()

            await coord.close()  # the coordinator dies; something else takes its port
            accepted = []

            async def playback(r, w):
                accepted.append(1)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(r.read(64), 1)  # the daemon's greeting
                    w.write(recording)
                    while await asyncio.wait_for(r.read(1 << 16), 2):
                        pass
                w.transport.abort()

            impostor = await asyncio.start_server(playback, "127.0.0.1", port)
            await asyncio.sleep(1.5)
            impostor.close()
            assert len(accepted) >= 2, f"the daemons never dialed the impostor ({len(accepted)} connections)"
            assert events == {"removed": [], "abort": [], "topology": []}, events
            assert a.state != "removed" and b.state != "removed"
            assert a.topology.epoch == b.topology.epoch == epoch

            coord = CoordinatorServer(f"127.0.0.1:{port}", secret=SECRET.encode(), config=cfg)  # it returns
            await coord.start()
            deadline = time.monotonic() + 15
            while not (a.state == b.state == "accepted" and a.topology.epoch > epoch and b.topology.epoch > epoch):
                assert time.monotonic() < deadline, (a.state, b.state, a.topology, b.topology)
                await asyncio.sleep(0.05)
            assert a.topology.world_size == b.topology.world_size == 2
            assert events["removed"] == [] and events["abort"] == []
        finally:
            if impostor is not None:
                impostor.close()
            for ch in made:
                await ch.close()
            await coord.close()

    uvloop.run(body())


# ----------------------------------------------------------------------------- a flood under a member's id

def test_a_flood_of_failed_handshakes_under_a_members_routing_id_removes_no_one(caplog):
    """For one and a half heartbeat deadlines, 40 attacker sockets at a time (no CURVE, another
    run's keys, the member public key with a wrong secret key, a key pair of their own) dial with member b's routing
    id, send as b, and hang up. Nobody is removed or probed out, the epoch stays, votes still
    complete, and the coordinator's log gets summaries, not a line per connection."""
    caplog.set_level(logging.INFO, logger="pccl.coordinator")

    async def body():
        async with served(every=1.0) as (coord, addr), channels() as make:
            a, b = await pair(make, addr)
            epoch = a.topology.epoch
            rid_b = b._sock.getsockopt(zmq.ROUTING_ID)
            member_pub, _ = keys.curve_keypair(SECRET.encode(), "member")
            coord_pub, _ = keys.curve_keypair(SECRET.encode(), "coordinator")
            other = (keys.curve_keypair(OTHER, "coordinator")[0], *keys.curve_keypair(OTHER, "member"))
            creds = [None, other, (coord_pub, member_pub, zmq.curve_keypair()[1]),
                     (coord_pub, *zmq.curve_keypair())]  # (the last: a key pair of its own, refused by ZAP)
            ctx = zmq.Context.instance()
            sent = 0
            t_end = time.monotonic() + 1.5 * 3.0  # the served coordinator's heartbeat deadline is 3 s
            while time.monotonic() < t_end:
                socks = []
                for i in range(40):
                    s = ctx.socket(zmq.DEALER)
                    s.setsockopt(zmq.LINGER, 0)
                    s.setsockopt(zmq.ROUTING_ID, rid_b)
                    cred = creds[i % len(creds)]
                    if cred is not None:
                        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = cred
                    s.connect(f"tcp://{addr}")
                    s.send(protocol.encode("leave", reason="b leaves (not really)"), zmq.NOBLOCK)
                    socks.append(s)
                    sent += 1
                await asyncio.sleep(0.25)
                for s in socks:
                    s.close(linger=0)
                assert a.state == b.state == "accepted"
            st = await query_status(addr, 5, secret=SECRET.encode())
            assert st["epoch"] == epoch and members(st) == [("a", "accepted"), ("b", "accepted")], st
            vote = asyncio.create_task(a.update_topology(5))
            assert (await b.update_topology(5)).epoch == epoch
            await vote
            return sent, coord.handshakes.rejected

    sent, rejected_n = uvloop.run(body())
    lines = [r.getMessage() for r in caplog.records if r.name == "pccl.coordinator" and r.levelno >= logging.WARNING]
    assert rejected_n >= sent // 2, (sent, rejected_n)
    assert all("failed authentication" in line for line in lines), lines[:5]
    assert len(lines) <= 12, f"{len(lines)} warning lines for {sent} connections"
