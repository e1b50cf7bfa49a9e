"""Coordinator + ControlChannel integration on 127.0.0.1: joins, kills, freezes, restarts, bad input.

A real coordinator runs as a subprocess; peers are ControlChannels in this process, or
tests/_peer_proc.py subprocesses where a signal must hit them. Only PIDs started here
are signalled. Measured latencies are logged (pytest -s or the log on failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import uvloop
import zmq

from pccl_py.daemon.control import ControlChannel
from pccl_py.errors import AuthenticationFailed, CoordinatorUnavailable, InvalidUsage, PeerLost
from pccl_py.tools.status import query_status
from pccl_py.transport.zmq_io import curve_client
from pccl_py.wire import control as protocol

pytestmark = pytest.mark.timeout(60)
log = logging.getLogger("test.coordinator")
ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def on_uvloop(fn):
    """Run an async test on uvloop (as the daemon and coordinator do); close its links after."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        async def body():
            try:
                await fn(*args, **kwargs)
            finally:
                factory = kwargs.get("links")
                if factory is not None:
                    await factory.aclose()

        uvloop.run(body())

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(pred, timeout: float, what: str, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(step)


class CoordProc:
    def __init__(self, tmp: Path, port: int, opts: list[str]):
        self.port, self.opts, self.tmp = port, opts, tmp
        self.addr = f"127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        self.log_path = self.tmp / f"coordinator-{self.port}-{self.runs}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pccl_py.coordinator", "--listen", self.addr, "--secret", SECRET,
             *self.opts],
            stdout=subprocess.PIPE, stderr=open(self.log_path, "w"), env=ENV, cwd=ROOT, text=True,
        )
        line = self.proc.stdout.readline()
        assert "listening on" in line, f"coordinator did not start: {line!r} {self.log_text()}"

    def log_text(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class PeerProc:
    def __init__(self, tmp: Path, addr: str, peer_id: str, flags: list[str]):
        self.file = tmp / f"peer-{peer_id}.json"
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "_peer_proc.py"), addr, peer_id, str(self.file),
             "--secret", SECRET, *flags],
            env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp / f"peer-{peer_id}.log", "w"),
        )

    def state(self) -> dict:
        try:
            return json.loads(self.file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def coordinator(tmp_path):
    started: list[CoordProc] = []

    def make(*opts: str, start: bool = True) -> CoordProc:
        c = CoordProc(tmp_path, free_port(), list(opts))
        started.append(c)
        if start:
            c.start()
        return c

    yield make
    for c in started:
        c.kill()


@pytest.fixture
def peer_proc(tmp_path):
    started: list[PeerProc] = []

    def make(addr: str, peer_id: str, *flags: str) -> PeerProc:
        p = PeerProc(tmp_path, addr, peer_id, list(flags))
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


class Links:
    """Factory of started in-process ControlChannels; :func:`on_uvloop` closes them."""

    def __init__(self):
        self.made: list[ControlChannel] = []

    async def __call__(self, addr: str, peer_id: str, secret: str = SECRET, **kw) -> ControlChannel:
        link = ControlChannel(addr, group=kw.pop("group", 0), data_addr=("127.0.0.1", 10000 + len(self.made)),
                           secret=secret.encode(), peer_id=peer_id, **kw)
        link.seen = []  # every topology on_topology received
        link.aborts = []

        async def on_topology(topo, link=link):
            link.seen.append(topo)

        link.on_topology = on_topology
        link.on_abort = link.aborts.append
        await link.start()
        self.made.append(link)
        return link

    async def aclose(self) -> None:
        for link in self.made:
            await link.close()
        self.made.clear()


@pytest.fixture
def links():
    return Links()


async def wait_registered(addr: str, peer_ids: list[str], timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = await query_status(addr, 5, secret=SECRET.encode())
        if set(peer_ids) <= {m["peer_id"] for m in st["members"]}:
            return st
        assert time.monotonic() < deadline, f"{peer_ids} never registered: {st}"
        await asyncio.sleep(0.05)


def world(link: ControlChannel) -> int:
    return link.topology.world_size if link.topology is not None else 0


async def form(make, addr: str, n: int, prefix: str = "p") -> list[ControlChannel]:
    """n in-process peers: the first joins an empty run, the others are admitted by a vote."""
    ls = [await make(addr, f"{prefix}{i}") for i in range(n)]
    await ls[0].connect(10)
    joins = [asyncio.create_task(link.connect(10)) for link in ls[1:]]
    await wait_registered(addr, [link.peer_id for link in ls])
    await ls[0].update_topology(10)
    for j in joins:
        await j
    assert all(world(link) == n for link in ls)
    return ls


# ---------------------------------------------------------------------------- tests


@on_uvloop
async def test_four_join_then_sigkill_is_detected_fast(coordinator, peer_proc, links):
    coord = coordinator("--recovery-grace", "0.2")
    t0 = time.monotonic()
    ls = await form(links, coord.addr, 3)
    victim = peer_proc(coord.addr, "victim", "--vote")
    await wait_registered(coord.addr, ["victim"], timeout=20)
    t_join = time.monotonic()
    assert await ls[0].are_peers_pending(5)
    votes = [asyncio.create_task(link.update_topology(15)) for link in ls]
    for v in votes:
        await v
    await until(lambda: all(world(link) == 4 for link in ls) and victim.state().get("world_size") == 4,
                10, "4 members everywhere")
    log.info("4 peers formed in %.3f s (victim admitted %.3f s after it registered)",
             time.monotonic() - t0, time.monotonic() - t_join)
    members = [p.peer_id for p in ls[0].topology.peers]
    # p1 and p2 register concurrently in form(): the ring may hold them in either order
    assert members[0] == "p0" and sorted(members[1:3]) == ["p1", "p2"] and members[3] == "victim", members
    epoch = ls[0].topology.epoch

    t_kill = time.monotonic()
    victim.proc.kill()  # SIGKILL; the survivors' data links would see the reset: report it
    await ls[0].report_peer_failure("victim", "data link: connection reset by peer", epoch)
    await until(lambda: all(world(link) == 3 for link in ls), 3.0, "survivors at world size 3")
    took = time.monotonic() - t_kill
    log.info("SIGKILL with a failure report: survivors at world size 3 after %.3f s", took)
    print(f"\nSIGKILL+report -> world size 3 in {took:.3f} s")
    assert all(link.topology.epoch > epoch for link in ls)
    assert len({link.topology.epoch for link in ls}) == 1


@on_uvloop
async def test_sigkill_without_report_is_noticed_by_the_coordinator(coordinator, peer_proc, links):
    coord = coordinator("--recovery-grace", "0.2")
    victim = peer_proc(coord.addr, "victim", "--vote")
    await until(lambda: victim.state().get("world_size") == 1, 15, "victim accepted alone")
    a = await links(coord.addr, "a")
    await a.connect(10)
    assert world(a) == 2
    t_kill = time.monotonic()
    victim.proc.kill()
    await until(lambda: world(a) == 1, 3.5, "survivor at world size 1")
    took = time.monotonic() - t_kill
    print(f"\nSIGKILL, no report -> world size 1 in {took:.3f} s")
    log.info("SIGKILL without report: removed after %.3f s", took)


@on_uvloop
async def test_sigstop_removed_by_deadline_then_told_and_rejoins(coordinator, peer_proc, links):
    coord = coordinator("--recovery-grace", "0.2", "--heartbeat-deadline", "2.0")
    a = await links(coord.addr, "a")
    await a.connect(10)
    victim = peer_proc(coord.addr, "frozen", "--rejoin", "--vote")
    await wait_registered(coord.addr, ["frozen"], timeout=20)
    await a.update_topology(10)
    await until(lambda: victim.state().get("world_size") == 2, 10, "victim accepted")
    t_stop = time.monotonic()
    os.kill(victim.proc.pid, signal.SIGSTOP)
    await until(lambda: world(a) == 1, 2.0 + 2.0, "frozen peer removed")
    took = time.monotonic() - t_stop
    print(f"\nSIGSTOP -> removed in {took:.3f} s (deadline 2.0 s)")
    log.info("SIGSTOP: removed after %.3f s", took)
    assert took > 1.0, "removed long before its heartbeat deadline"
    os.kill(victim.proc.pid, signal.SIGCONT)
    await until(lambda: victim.state().get("state") == "removed" or any(
        e[0] == "removed" for e in victim.state().get("events", [])), 10, "victim told it was removed")
    assert "connect again" in victim.state()["reason"]
    # it registers again under a new peer_id and is admitted at the next vote
    for _ in range(50):
        if await a.are_peers_pending(5):
            break
        await asyncio.sleep(0.1)
    await a.update_topology(10)
    assert world(a) == 2
    new_id = a.topology.peers[1].peer_id
    assert new_id.startswith("frozen~") and new_id != "frozen"
    await until(lambda: victim.state().get("world_size") == 2 and victim.state().get("state") == "accepted",
                10, "victim back as a new member")


@on_uvloop
async def test_new_peer_waits_for_every_vote(coordinator, links):
    coord = coordinator("--recovery-grace", "0.2")
    ls = await form(links, coord.addr, 3)
    epoch = ls[0].topology.epoch
    ring = [p.peer_id for p in ls[0].topology.peers]  # p1 and p2 registered concurrently: either order
    newcomer = await links(coord.addr, "new")
    t0 = time.monotonic()
    join = asyncio.create_task(newcomer.connect(10))
    await until(lambda: newcomer.state == "pending", 5, "newcomer registered")
    assert await ls[2].are_peers_pending(5)
    v0 = asyncio.create_task(ls[0].update_topology(10))
    v1 = asyncio.create_task(ls[1].update_topology(10))
    await asyncio.sleep(0.3)
    assert not join.done() and not v0.done() and not v1.done(), "admitted without a unanimous vote"
    assert await ls[2].are_peers_pending(5)
    topo = await ls[2].update_topology(10)
    await v0, await v1
    got = await join
    print(f"\njoin latency (connect -> admitted, incl. 0.3 s held back): {time.monotonic() - t0:.3f} s")
    assert topo.epoch == epoch + 1 == got.epoch and got.world_size == 4 and got.rank == 3
    assert sorted(ring) == ["p0", "p1", "p2"]
    assert [p.peer_id for p in got.peers] == ring + ["new"]
    assert all(link.seen[-1] == link.topology for link in ls + [newcomer])
    assert not await ls[0].are_peers_pending(5)
    # a vote with nobody pending completes too, epoch unchanged
    votes = [asyncio.create_task(link.update_topology(10)) for link in ls + [newcomer]]
    for v in votes:
        assert (await v).epoch == epoch + 1
    # graceful leave: survivors get a new epoch at once
    t0 = time.monotonic()
    await newcomer.leave()
    await until(lambda: all(world(link) == 3 for link in ls), 2, "leave seen")
    print(f"graceful leave seen in {time.monotonic() - t0:.3f} s")
    with pytest.raises(InvalidUsage):
        await newcomer.update_topology(1)


@on_uvloop
async def test_coordinator_restart_keeps_members_and_epoch_moves_on(coordinator, links):
    coord = coordinator("--recovery-grace", "1.0", "--heartbeat-deadline", "3")
    ls = await form(links, coord.addr, 3)
    ring = [p.peer_id for p in ls[0].topology.peers]
    epoch = ls[0].topology.epoch
    coord.kill()
    await asyncio.sleep(0.3)
    # calls made while the coordinator is away succeed once it is back (a whole vote round too)
    pending = asyncio.create_task(ls[1].are_peers_pending(10))
    votes = [asyncio.create_task(link.update_topology(10)) for link in ls]
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    coord.start()
    await until(lambda: all(link.topology.epoch > epoch for link in ls), 8, "rebuilt topology")
    print(f"\ncoordinator restart: members back at a new epoch {time.monotonic() - t0:.3f} s after start")
    assert await pending is False
    for v in votes:
        assert (await v).epoch == ls[0].topology.epoch
    for link in ls:
        assert [p.peer_id for p in link.topology.peers] == ring
        assert link.topology.world_size == 3
        assert link.seen[-1].epoch == link.topology.epoch  # on_topology ran for the rebuild
    # the run goes on: a newcomer is admitted by the next vote
    newcomer = await links(coord.addr, "late")
    join = asyncio.create_task(newcomer.connect(10))
    await until(lambda: newcomer.state == "pending", 5, "late registered")
    votes = [asyncio.create_task(link.update_topology(10)) for link in ls]
    for v in votes:
        await v
    assert (await join).world_size == 4
    st = await query_status(coord.addr, 5, secret=SECRET.encode())
    assert st["epoch"] == ls[0].topology.epoch and not st["recovering"]


@on_uvloop
async def test_claims_after_the_recovery_window_rejoin_as_pending(coordinator, links):
    coord = coordinator("--recovery-grace", "0")  # restarts with no window: every claim is late
    ls = await form(links, coord.addr, 3)
    epoch = ls[0].topology.epoch
    coord.kill()
    coord.start()
    # the first re-introduction finds an empty run and is accepted; the others wait as pending
    await until(lambda: sum(link.state == "accepted" and link.topology.epoch > epoch for link in ls) == 1
                and sum(link.state == "pending" for link in ls) == 2, 10, "one accepted, two pending")
    waiting = [link for link in ls if link.state == "pending"]
    assert all(any("rejoins as pending" in str(e) for e in link.aborts) for link in waiting)
    votes = [asyncio.create_task(link.update_topology(10)) for link in ls]
    for v in votes:
        await v
    assert all(link.state == "accepted" and link.topology.world_size == 3 for link in ls)
    assert len({link.topology.epoch for link in ls}) == 1 and ls[0].topology.epoch > epoch


@on_uvloop
async def test_frozen_coordinator_loop_resumes_at_once_and_short_calls_fail_unavailable(coordinator, links):
    """SIGSTOP the coordinator for 5 s under an update_topology loop of three peers. Both
    sides' zmq heartbeats close the connections meanwhile, so the votes in flight and the
    answers to them are lost; the daemons resend, the coordinator answers again, and the loop
    goes on within a heartbeat interval of SIGCONT, nobody removed. A call whose deadline
    passes during the freeze fails with CoordinatorUnavailable."""
    coord = coordinator("--recovery-grace", "0.2", "--heartbeat-deadline", "2")
    ls = await form(links, coord.addr, 3)
    epoch = ls[0].topology.epoch
    rounds: list[float] = []  # when a peer's update_topology returned
    counts = [0] * len(ls)
    last: list[int | None] = [None]  # the round after which the loops stop (all at the same one)

    async def training(i: int, link: ControlChannel) -> None:
        while last[0] is None or counts[i] < last[0]:
            assert (await link.update_topology(20)).epoch == epoch
            counts[i] += 1
            rounds.append(time.monotonic())
            await asyncio.sleep(0.02)  # a training step

    loops = [asyncio.create_task(training(i, link)) for i, link in enumerate(ls)]
    try:
        await until(lambda: min(counts) >= 3 or any(t.done() for t in loops), 10, "three rounds")
        os.kill(coord.proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(1.5)
            t0 = time.monotonic()
            with pytest.raises(CoordinatorUnavailable, match="no answer from the coordinator"):
                await ls[1].are_peers_pending(1.0)
            assert 0.9 < time.monotonic() - t0 < 2.0
            await asyncio.sleep(5.0 - (time.monotonic() - t0) - 1.5)
            frozen = len(rounds)
        finally:
            os.kill(coord.proc.pid, signal.SIGCONT)
        t_cont = time.monotonic()
        await until(lambda: len(rounds) >= frozen + 9 or any(t.done() for t in loops), 5, "three more rounds")
        resumed = rounds[frozen] - t_cont
        print(f"\ncoordinator frozen 5 s: the update_topology loop resumed {resumed * 1000:.0f} ms after SIGCONT")
        log.info("frozen coordinator: loop resumed %.3f s after SIGCONT", resumed)
        assert resumed < 1.5, coord.log_text()
        last[0] = max(counts) + 1
        await asyncio.wait(loops, timeout=5)
        for t in loops:
            t.result()  # done, without an error
    finally:
        for t in loops:
            t.cancel()
        await asyncio.wait(loops, timeout=2)
    st = await query_status(coord.addr, 5, secret=SECRET.encode())
    assert st["epoch"] == epoch, coord.log_text()
    assert sorted(m["peer_id"] for m in st["members"] if m["state"] == "accepted") == ["p0", "p1", "p2"]
    assert all(link.state == "accepted" and link.topology.epoch == epoch and not link.aborts for link in ls)
    text = coord.log_path.read_text()
    assert "removed" not in text and "did not run" in text


@on_uvloop
async def test_calls_fail_with_coordinator_unavailable_not_hang(links):
    addr = f"127.0.0.1:{free_port()}"  # nobody listens
    link = await links(addr, "lonely", coordinator_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(CoordinatorUnavailable):
        await link.connect(1.0)
    assert time.monotonic() - t0 < 3
    with pytest.raises(CoordinatorUnavailable):
        await query_status(addr, 0.5, secret=SECRET.encode())


@on_uvloop
async def test_calls_while_coordinator_is_gone_fail_at_their_deadline(coordinator, links):
    coord = coordinator("--recovery-grace", "0.2")
    a, b = await form(links, coord.addr, 2)
    coord.kill()
    t0 = time.monotonic()
    with pytest.raises(CoordinatorUnavailable):
        await a.update_topology(1.5)
    with pytest.raises(CoordinatorUnavailable):
        await b.are_peers_pending(1.0)
    took = time.monotonic() - t0
    assert 2.4 < took < 6, took
    assert a.topology.world_size == 2  # the last membership stays in force


@on_uvloop
async def test_wrong_secret_is_refused_with_a_typed_error_before_the_deadline(coordinator, links):
    coord = coordinator("--recovery-grace", "0.2")
    a = await links(coord.addr, "a")
    await a.connect(10)
    intruder = await links(coord.addr, "intruder", secret="wrong")
    t0 = time.monotonic()
    with pytest.raises(AuthenticationFailed, match=f"coordinator at {coord.addr} refused this daemon's "
                       "credentials.*is PCCL_SECRET the same on both"):
        await intruder.connect(5)
    assert time.monotonic() - t0 < 2.5, "failed at the deadline, not when the handshake failed"
    assert intruder.state == "idle"
    await until(lambda: "failed authentication" in coord.log_text(), 3, "the coordinator's summary")
    st = await query_status(coord.addr, 5, secret=SECRET.encode())
    assert [m["peer_id"] for m in st["members"]] == ["a"]
    assert (await a.update_topology(5)).world_size == 1


@on_uvloop
async def test_lockstep_mismatch_is_an_error_not_a_hang(coordinator, links):
    coord = coordinator("--recovery-grace", "0.2", "--mismatch-grace", "1.0")
    a, b = await form(links, coord.addr, 2)
    b.set_activity("all_reduce tag=5")
    await asyncio.sleep(0.6)  # a heartbeat carries it
    t0 = time.monotonic()
    with pytest.raises(InvalidUsage) as info:
        await a.update_topology(10)
    took = time.monotonic() - t0
    print(f"\nlockstep mismatch reported after {took:.3f} s")
    assert "p1" in str(info.value) and "all_reduce tag=5" in str(info.value)
    await until(lambda: b.aborts, 2, "abort on the busy peer")
    assert str(b.aborts[0]) == str(info.value)
    assert took < 5


@on_uvloop
async def test_bad_input_leaves_others_unaffected(coordinator, links):
    coord = coordinator("--recovery-grace", "0.2")
    a, b = await form(links, coord.addr, 2)
    epoch = a.topology.epoch
    ctx = zmq.Context.instance()
    pid_before = coord.proc.pid

    def raw(mtype, **fields):
        return msgpack.packb({"type": mtype, "v": protocol.VERSION, **fields}, use_bin_type=True)

    good = protocol.encode("status_q", req=1)
    hello_as_p1 = dict(peer_id="p1", group=0, host="1.2.3.4", port=1,
                       claim="accepted", epoch=99, ring_pos=0, world=1, revision=0, instance="", timeout=0.0)
    junk = [
        b"", b"\x00\xff garbage", good[:-2], good + b"tail", raw("status_q", req="one"),
        raw("hello", peer_id=["x"], group=0), raw("launch_missiles", req=1), raw("status_q", v=99, req=1),
        b"\xdb\xff\xff\xff\xff", b"\xdd\x7f\xff\xff\xff", msgpack.packb({"type": "leave", "v": protocol.VERSION, "reason": "x" * 100000}),
        msgpack.packb([[[[[[[[[[[[]]]]]]]]]]]] * 1000), raw("heartbeat", activity=None, epoch=-5, revision=0, tx=0, rx=0),
        raw("report_failure", peer_id="p0", reason="x", epoch=1),  # well-formed but from a stranger
        protocol.encode("hello", **hello_as_p1),  # a stolen id without the secret
    ]
    socks = []
    for i, blob in enumerate(junk * 2):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if i < len(junk):  # from a process with the secret (a buggy member); then from strangers
            curve_client(s, SECRET.encode())
        s.connect(f"tcp://{coord.addr}")
        s.send(blob)
        socks.append(s)
        if i % 3 == 0:
            s.send_multipart([b"a", b"b", b"c"])
    big = ctx.socket(zmq.DEALER)  # over MAXMSGSIZE: zmq closes that connection
    big.setsockopt(zmq.LINGER, 0)
    curve_client(big, SECRET.encode())
    big.connect(f"tcp://{coord.addr}")
    big.send(b"\x00" * (protocol.MAX_MESSAGE + 10))
    socks.append(big)
    raw_tcp = socket.create_connection(("127.0.0.1", coord.port))  # not even zmq
    raw_tcp.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(4096))
    await asyncio.sleep(1.0)
    raw_tcp.close()
    for s in socks:
        s.close(linger=0)
    assert coord.proc.poll() is None and coord.proc.pid == pid_before, coord.log_text()
    st = await query_status(coord.addr, 5, secret=SECRET.encode())
    assert st["epoch"] == epoch and sorted(m["peer_id"] for m in st["members"]) == ["p0", "p1"]
    assert a.topology.epoch == epoch and b.topology.epoch == epoch
    v = asyncio.create_task(a.update_topology(10))
    assert (await b.update_topology(10)).epoch == epoch
    await v
    assert "bad input" in coord.log_text()
    await until(lambda: "failed authentication" in coord.log_text(), 3, "the strangers' summary")


def test_status_cli(coordinator):
    coord = coordinator("--recovery-grace", "0.2")
    out = subprocess.run([sys.executable, "-m", "pccl_py.tools.status", "--coordinator", coord.addr, "--json",
                          "--secret", SECRET],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=30)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["members"] == [] and "instance" in st
    out = subprocess.run([sys.executable, "-m", "pccl_py.tools.status", "--coordinator", coord.addr],
                         capture_output=True, text=True, env={**ENV, "PCCL_SECRET": SECRET}, cwd=ROOT, timeout=30)
    assert out.returncode == 0 and "epoch" in out.stdout and "(no peers)" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pccl_py.tools.status", "--coordinator", f"127.0.0.1:{free_port()}",
                          "--timeout", "0.3"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=30)
    assert out.returncode == 1 and "no status" in out.stderr


def test_status_watch_refreshes_and_rides_out_a_silent_coordinator(coordinator):
    coord = coordinator("--recovery-grace", "0.2")
    out = subprocess.run([sys.executable, "-m", "pccl_py.tools.status", "--coordinator", coord.addr, "--watch",
                          "0.2", "--count", "3", "--secret", SECRET], capture_output=True, text=True, env=ENV,
                         cwd=ROOT, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("pccl status --watch 0.2") == 3 and out.stdout.count("(no peers)") == 3
    out = subprocess.run([sys.executable, "-m", "pccl_py.tools.status", "--coordinator", f"127.0.0.1:{free_port()}",
                          "--watch", "0.1", "--count", "2", "--timeout", "0.2"],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=30)
    assert out.returncode == 0 and out.stdout.count("no status") == 2 and "asking again" in out.stdout


@on_uvloop
async def test_removed_peer_calls_fail_with_peer_lost(coordinator, links):
    coord = coordinator("--recovery-grace", "0.2", "--heartbeat-deadline", "1.0")
    a, b = await form(links, coord.addr, 2)
    removed = []
    b.on_removed = removed.append
    # b stops heartbeating (its loop is alive, but we silence its sends) -> removed by deadline
    b._send_msg = lambda msg: None
    await until(lambda: world(a) == 1, 4, "b removed")
    b._send_msg = ControlChannel._send_msg.__get__(b)
    b._send_msg({"type": "heartbeat", "activity": None, "epoch": 0, "revision": -1, "tx": 0, "rx": 0, "calls": []})
    await until(lambda: removed, 3, "b told it was removed")
    with pytest.raises(PeerLost, match="connect again"):
        await b.update_topology(1)
    # it may connect again, as a new member with a new peer_id
    new_ids = []
    b.on_peer_id = new_ids.append
    join = asyncio.create_task(b.connect(10))
    await until(lambda: b.peer_id != "p1", 2, "a new peer_id")
    await wait_registered(coord.addr, [b.peer_id])
    assert b.peer_id.startswith("p1~")
    await a.update_topology(10)
    topo = await join
    assert topo.world_size == 2 and [p.peer_id for p in topo.peers] == ["p0", b.peer_id]
    assert new_ids == [b.peer_id]


def test_module_entry_points_exit_with_the_status_of_main():
    """``python -m pccl_py.coordinator`` / ``pccl_py`` report a bad invocation by their exit
    status, as a supervisor or a shell script sees it."""
    bad = [[sys.executable, "-m", "pccl_py.coordinator", "--listen", "badaddr:xx"],
           [sys.executable, "-m", "pccl_py", "nosuch"],
           [sys.executable, "-m", "pccl_py.daemon", "--no-such-flag"]]
    for cmd in bad:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode != 0, (cmd, out.stdout, out.stderr)


def test_status_table_shows_each_members_throughput_between_snapshots():
    from pccl_py.tools.status import format_status

    def snap(tx, rx):
        return {"instance": "c", "epoch": 2, "world_size": 1, "num_groups": 1, "uptime": 3.0, "recovering": False,
                "vote_open": False, "voters": [],
                "members": [{"peer_id": "p1", "group": 0, "state": "accepted", "ring_pos": 0, "host": "h",
                             "port": 1, "epoch": 2, "revision": 0, "hb_age": 0.1, "activity": None,
                             "tx": tx, "rx": rx}]}

    plain = format_status(snap(0, 0))
    assert "SENT/RECEIVED" not in plain
    table = format_status(snap(30_000_000, 10_000_000), prev=snap(10_000_000, 0), seconds=2.0)
    assert "SENT/RECEIVED" in table and "10.0/5.0 MB/s" in table
