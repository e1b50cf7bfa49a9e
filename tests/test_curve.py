"""The control plane is authenticated end to end by zmq CURVE with keys from the run secret.

Each test attacks one claim: a daemon (or ``pccl status``) with another secret cannot join
and is told why before its deadline; a process without the secret on the coordinator's
address cannot make a daemon act; a stranger cannot speak for a member, whatever routing id
it claims; garbage on the port is counted and summarised, never logged line by line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import uvloop
import zmq
from conftest import REPO, Coordinator, free_port
from zmq.utils.monitor import recv_monitor_message

from pccl_py import AuthenticationFailed, Client
from pccl_py.coordinator.membership import MembershipConfig
from pccl_py.coordinator.server import Coordinator as CoordinatorServer
from pccl_py.coordinator.server import unprotected
from pccl_py.daemon.control import ControlChannel
from pccl_py.metrics import Metrics
from pccl_py.tools.status import query_status
from pccl_py.wire import control as protocol
from pccl_py.wire import keys

SECRET = "curve-test-secret"
OTHER = b"another run's secret"
ENV = {**os.environ, "PYTHONPATH": REPO}


# -------------------------------------------------------------------------- helpers

@pytest.fixture
def secured():
    """A coordinator process with the run secret; its recovery window leaves time to re-introduce."""
    c = Coordinator(free_port(), ["--secret", SECRET, "--heartbeat-deadline", "2.0", "--recovery-grace", "2.5"])
    c.start()
    try:
        yield c
    finally:
        c.stop()


@contextlib.asynccontextmanager
async def served(*, every: float = 10.0, metrics: Metrics | None = None, handshake_timeout: float = 5.0):
    """A coordinator in this process (its log lines reach caplog)."""
    coord = CoordinatorServer("127.0.0.1:0", secret=SECRET.encode(), metrics=metrics, reject_summary_every=every,
                              config=MembershipConfig(recovery_grace=0.0, heartbeat_deadline=3.0,
                                                      handshake_timeout=handshake_timeout))
    addr = await coord.start()
    try:
        yield coord, addr
    finally:
        await coord.close()


@contextlib.asynccontextmanager
async def channels():
    made: list[ControlChannel] = []

    async def make(addr: str, peer_id: str, secret: str = SECRET) -> ControlChannel:
        link = ControlChannel(addr, group=0, data_addr=("127.0.0.1", 10000 + len(made)), secret=secret.encode(),
                              peer_id=peer_id, coordinator_timeout=2.0)
        await link.start()
        made.append(link)
        return link

    try:
        yield make
    finally:
        for link in made:
            await link.close()


async def until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def pair(make, addr: str) -> tuple[ControlChannel, ControlChannel]:
    a, b = await make(addr, "a"), await make(addr, "b")
    await a.connect(5)
    join = asyncio.create_task(b.connect(5))
    await until(lambda: b.state == "pending", 5, "b registered")
    await a.update_topology(5)
    await join
    assert a.topology.world_size == b.topology.world_size == 2
    return a, b


def rejected(metrics: Metrics) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'pccl_rejected_connections_total\{port="control",reason="(\w+)"\} ([0-9.e+]+)', metrics.text())}


def join_all(ex, clients, timeout=20.0):
    def join(c):
        topo = c.connect()
        deadline = time.monotonic() + timeout
        while topo["world_size"] < len(clients):
            assert time.monotonic() < deadline, "peers did not all join"
            topo = c.update_topology()
        return topo

    return list(ex.map(join, clients))


def impostor(port: int, mechanism: str, seconds: float) -> dict:
    """Hold the coordinator's port for ``seconds`` as a hostile coordinator without the secret:
    every message that reaches it is answered with "you were removed" and an abort. ``mechanism``:
    "null" (no CURVE at all) or "curve" (a CURVE server with another run's keys, admitting any
    client key). What it received and how many connections it accepted come back."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    if mechanism == "curve":
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.curve_keypair(OTHER, "coordinator")[1])
    mon = sock.get_monitor_socket(zmq.EVENT_ACCEPTED)
    got, accepted = [], 0
    try:
        sock.bind(f"tcp://127.0.0.1:{port}")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if sock.poll(20):
                rid, *body = sock.recv_multipart()
                got.append(body)
                pid = rid.split(b"#")[0].decode(errors="replace")[:128] or "x"
                sock.send_multipart([rid, protocol.encode("removed", peer_id=pid, reason="impostor: you were removed")])
                sock.send_multipart([rid, protocol.encode("abort", error="Aborted", message="impostor: abort")])
            while mon.poll(0):
                accepted += recv_monitor_message(mon)["event"] == zmq.EVENT_ACCEPTED
    finally:
        sock.disable_monitor()
        mon.close(linger=0)
        sock.close(linger=0)
        ctx.term()
    return {"received": got, "accepted": accepted}


# -------------------------------------------------------------------------- a daemon with the wrong secret

@pytest.mark.timeout(60)
def test_client_with_the_wrong_secret_cannot_join_and_is_told_why(secured):
    good = Client(coordinator=secured.addr, secret=SECRET, timeout=15)
    bad = Client(coordinator=secured.addr, secret="not the secret", timeout=15)
    try:
        assert good.connect()["world_size"] == 1
        t0 = time.monotonic()
        with pytest.raises(AuthenticationFailed) as info:
            bad.connect(timeout=10)
        took = time.monotonic() - t0
        assert took < 5, f"failed after {took:.1f} s: at the deadline, not when the handshake failed"
        assert f"coordinator at {secured.addr} refused this daemon's credentials" in str(info.value)
        assert "is PCCL_SECRET the same on both?" in str(info.value)
        x = np.arange(16, dtype=np.float32)
        assert good.all_reduce(x)["world_size"] == 1 and np.array_equal(x, np.arange(16, dtype=np.float32))
        st = asyncio.run(query_status(secured.addr, 5, secret=SECRET.encode()))
        assert [m["peer_id"] for m in st["members"]] == [good.peer_id]
    finally:
        good.close()
        bad.close()


# -------------------------------------------------------------------------- an impostor coordinator

@pytest.mark.timeout(90)
def test_an_impostor_on_the_coordinators_address_is_ignored_and_the_run_goes_on(secured):
    clients = [Client(coordinator=secured.addr, secret=SECRET, timeout=30) for _ in range(2)]
    try:
        with cf.ThreadPoolExecutor(2) as ex:
            before = join_all(ex, clients)
            ids = {c.peer_id for c in clients}
            secured.kill()
            # no CURVE at all, then CURVE with another run's keys: neither completes a handshake
            for mechanism in ("null", "curve"):
                seen = impostor(secured.port, mechanism, 1.5)
                assert seen["accepted"] >= 2, f"the daemons never dialed the {mechanism} impostor: {seen}"
                assert seen["received"] == [], f"a daemon talked to the {mechanism} impostor"
            for c in clients:  # nobody acted on what the impostor would have said
                info = c.refresh()
                assert info["connected"] and info["world_size"] == 2 and info["peer_id"] in ids, info
            secured.start()  # the run's coordinator comes back: the members re-introduce themselves
            deadline = time.monotonic() + 20
            while True:
                infos = [c.refresh() for c in clients]
                if all(i.get("epoch", 0) > before[0]["epoch"] for i in infos):
                    break
                assert time.monotonic() < deadline, f"no new epoch after the restart: {infos}"
                time.sleep(0.1)
            assert {i["peer_id"] for i in infos} == ids and all(i["world_size"] == 2 for i in infos)
            xs = [np.full(1000, 1.5, np.float32), np.full(1000, 2.25, np.float32)]
            list(ex.map(lambda p: p[0].all_reduce(p[1], retry=True), zip(clients, xs)))
            assert all(np.all(x == 3.75) for x in xs)
    finally:
        for c in clients:
            c.close()


# -------------------------------------------------------------------------- strangers speaking for a member

@pytest.mark.timeout(30)
def test_a_stranger_with_a_members_routing_id_changes_nothing():
    """Without CURVE, with another run's keys, or with the coordinator's public key but not the
    member key pair: hello, leave, a failure report and a vote sent as member b (its routing
    id, taken over by the ROUTER if a handshake completed) reach nothing."""
    async def body():
        metrics = Metrics("coordinator")
        async with served(metrics=metrics) as (coord, addr), channels() as make:
            a, b = await pair(make, addr)
            epoch = a.topology.epoch
            rid_b = b._sock.getsockopt(zmq.ROUTING_ID)
            other_pub, other_sec = keys.curve_keypair(OTHER, "member")
            rand_pub, rand_sec = zmq.curve_keypair()
            attackers = {
                "no_curve": None,
                "wrong_secret": (keys.curve_keypair(OTHER, "coordinator")[0], other_pub, other_sec),
                "denied": (keys.curve_keypair(SECRET.encode(), "coordinator")[0], rand_pub, rand_sec),
            }
            as_b = [
                protocol.encode("hello", peer_id="b", group=0, host="10.9.9.9", port=1, claim="accepted", epoch=99,
                                ring_pos=0, world=1, revision=0, instance="", timeout=0.0),
                protocol.encode("leave", reason="b leaves (not really)"),
                protocol.encode("report_failure", peer_id="a", reason="a is dead (not really)", epoch=epoch),
                protocol.encode("vote", req=1, timeout=0.0, below=0, open=[]),
                protocol.encode("status_q", req=1),
            ]
            ctx = zmq.Context.instance()
            socks = []
            try:
                for curve in attackers.values():
                    s = ctx.socket(zmq.DEALER)
                    socks.append(s)
                    s.setsockopt(zmq.LINGER, 0)
                    s.setsockopt(zmq.ROUTING_ID, rid_b)
                    if curve is not None:
                        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = curve
                    s.connect(f"tcp://{addr}")
                    for m in as_b:
                        s.send(m, zmq.NOBLOCK)
                # (a client without CURVE may see the mismatch first and hang up: "incomplete")
                total = coord.handshakes.total
                await until(lambda: total["wrong_secret"] and total["denied"] and total["no_curve"] + total["incomplete"],
                            5, "every attacker rejected, each for its reason")
                await asyncio.sleep(0.5)  # time for anything that got through to act
                assert [s.poll(0) for s in socks] == [0, 0, 0], "the coordinator answered a stranger"
            finally:
                for s in socks:
                    s.close(linger=0)
            st = await query_status(addr, 5, secret=SECRET.encode())
            assert st["epoch"] == epoch and sorted((m["peer_id"], m["state"], m["host"]) for m in st["members"]) == [
                ("a", "accepted", "127.0.0.1"), ("b", "accepted", "127.0.0.1")]
            assert a.state == b.state == "accepted" and a.topology.epoch == b.topology.epoch == epoch
            vote = asyncio.create_task(a.update_topology(5))
            assert (await b.update_topology(5)).epoch == epoch
            await vote
            counted = rejected(metrics)
            assert counted.get("wrong_secret", 0) >= 1 and counted.get("denied", 0) >= 1, counted
            assert counted.get("no_curve", 0) + counted.get("incomplete", 0) >= 1, counted

    uvloop.run(body())


# -------------------------------------------------------------------------- garbage on the port

def _garbage(i: int) -> bytes:
    if i % 3 == 0:
        return b"GET / HTTP/1.0\r\n\r\n" + os.urandom(512)  # not ZMTP at all
    # a ZMTP 3.0 greeting: signature, version 3.0, mechanism, as-server, filler
    mechanism = b"NULL" if i % 3 == 1 else b"CURVE"
    greeting = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + mechanism.ljust(20, b"\0") + b"\0" + bytes(31)
    return greeting + os.urandom(300)  # then a command that is not one


@pytest.mark.timeout(30)
def test_garbage_on_the_port_is_counted_and_summarised_never_logged_per_connection(caplog):
    caplog.set_level(logging.INFO, logger="pccl.coordinator")
    n = 30

    async def dial(port: int, i: int) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(_garbage(i))
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(w.drain(), 3)
            while await asyncio.wait_for(r.read(4096), 3):  # until the coordinator hangs up
                pass
        w.close()

    async def body():
        metrics = Metrics("coordinator")
        async with served(every=0.5, metrics=metrics) as (coord, addr), channels() as make:
            a = await make(addr, "a")
            await a.connect(5)
            port = int(addr.rsplit(":", 1)[1])
            t0 = time.monotonic()
            await asyncio.gather(*(dial(port, i) for i in range(n)))
            await until(lambda: coord.handshakes.rejected >= n, 5, f"{n} rejections")
            await asyncio.sleep(0.7)  # the last window's line
            took = time.monotonic() - t0
            assert coord.handshakes.rejected == n and coord.handshakes.total["incomplete"] == 0, coord.handshakes.total
            assert sum(rejected(metrics).values()) == n
            assert (await a.update_topology(5)).world_size == 1  # nothing broke
            st = await query_status(addr, 5, secret=SECRET.encode())
            assert [m["peer_id"] for m in st["members"]] == ["a"]
            return took

    took = uvloop.run(body())
    warnings = [r.getMessage() for r in caplog.records if r.name == "pccl.coordinator" and r.levelno >= logging.WARNING]
    lines = [w for w in warnings if "failed authentication" in w]
    assert warnings == lines, f"lines other than the summary: {warnings}"
    assert 1 <= len(lines) <= took / 0.5 + 1, lines  # one per window at most, not one per connection
    assert sum(int(re.match(r"(\d+) connections?", line).group(1)) for line in lines) == n, lines
    assert all("127.0.0.1" in line or "unknown address" in line for line in lines), lines


@pytest.mark.timeout(30)
def test_a_stranger_that_never_finishes_its_handshake_is_hung_up_on_within_the_handshake_timeout():
    """Half-open control connections (a greeting, then silence; or nothing at all) are
    closed after handshake_timeout instead of libzmq's 30 s, and the run is unaffected."""
    async def body():
        async with served(handshake_timeout=0.5) as (coord, addr), channels() as make:
            a = await make(addr, "a")
            await a.connect(5)
            port = int(addr.rsplit(":", 1)[1])
            conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
            for i, (_, w) in enumerate(conns[:10]):
                w.write(_garbage(i)[:64])  # the greeting alone: a handshake that never goes on
            t0 = time.monotonic()
            for r, _ in conns:
                with contextlib.suppress(ConnectionError):
                    while await asyncio.wait_for(r.read(4096), 5):
                        pass
            took = time.monotonic() - t0
            for _, w in conns:
                w.close()
            assert took < 3.0, took  # all of them, well before libzmq's 30 s
            assert (await a.update_topology(5)).world_size == 1

    uvloop.run(body())


def test_an_empty_secret_off_loopback_is_warned_about():
    assert unprotected("0.0.0.0", b"") is not None and "unprotected" in unprotected("10.1.2.3", b"")
    assert unprotected("127.0.0.1", b"") is None and unprotected("localhost", b"") is None
    assert unprotected("0.0.0.0", b"s") is None


# -------------------------------------------------------------------------- pccl status

@pytest.mark.timeout(60)
def test_status_needs_the_run_secret_and_ends_at_once_without_it(secured):
    def status(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "pccl_py.tools.status", "--coordinator", secured.addr, *args],
                             capture_output=True, text=True, env=env or ENV, cwd=REPO, timeout=30)
        return out, time.monotonic() - t0

    out, _ = status("--secret", SECRET, "--json")
    assert out.returncode == 0 and '"members": []' in out.stdout, out.stderr
    out, _ = status(env={**ENV, "PCCL_SECRET": SECRET})
    assert out.returncode == 0 and "(no peers)" in out.stdout, out.stderr
    out, took = status("--secret", "wrong", "--timeout", "10")
    assert out.returncode == 1 and took < 8, (took, out.stderr)  # (8 s: interpreter start included)
    assert f"the coordinator at {secured.addr} refused pccl status's credentials" in out.stderr
    assert "--secret" in out.stderr and "no status" not in out.stderr
    out, _ = status(env={**ENV, "PCCL_SECRET": "wrong"})
    assert out.returncode == 1 and "refused" in out.stderr
    secured.stop()
    out, _ = status("--secret", SECRET, "--timeout", "0.5")  # nobody there: not a secret problem
    assert out.returncode == 1 and "is it running?" in out.stderr
