"""The trainer's IPC connection is its daemon's lease on the membership: a daemon started by
hand leaves the run as soon as the trainer that connected it goes, however it goes, and a
connection that never connected ends nothing."""

from __future__ import annotations

import concurrent.futures as cf
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np
import pytest
from conftest import REPO, stop_process

from pccl_py import Client, InvalidUsage
from pccl_py.daemon import service
from pccl_py.daemon.lease import Lease, Mode
from pccl_py.wire import ipc

TRAINER = os.path.join(REPO, "tests", "_trainer_proc.py")
SEEN_WITHIN = 2.0  # seconds a survivor may take to see the new epoch after the trainer went


# -- the rule, without sockets -------------------------------------------------------------

def test_connect_takes_the_lease_and_only_its_end_counts():
    lease = Lease(Mode.EXIT)
    lease.opened("probe")
    lease.opened("trainer")
    assert lease.end("probe", "closed") is None  # never connected: holds nothing
    lease.take("trainer")
    lease.take("trainer")  # connecting again (after a removal, say) keeps it
    with pytest.raises(InvalidUsage, match="another trainer"):
        lease.take("second")
    assert lease.end("second", "closed") is None and lease.holder == "trainer"
    ended = lease.end("trainer", "its trainer's IPC connection closed")
    assert ended is not None and ended.exit and "connection closed" in ended.reason
    with pytest.raises(InvalidUsage, match="--serve-successive"):
        lease.take("second")  # it left the run and exits: no successor


def test_only_the_holder_runs_calls_on_the_membership():
    lease = Lease(Mode.EXIT)
    with pytest.raises(InvalidUsage, match="does not hold"):
        lease.require("trainer")  # nobody connected yet
    lease.take("trainer")
    lease.require("trainer")
    with pytest.raises(InvalidUsage, match="does not hold"):
        lease.require("probe")
    spawned = Lease(Mode.SPAWNED)
    spawned.opened("client")
    spawned.opened("stray")
    spawned.require("client")  # the spawning client holds it from the start
    with pytest.raises(InvalidUsage, match="does not hold"):
        spawned.require("stray")


def test_serving_successive_trainers_frees_the_lease_for_the_next():
    lease = Lease(Mode.SERVE_SUCCESSIVE)
    lease.take("first")
    ended = lease.end("first", "its trainer asked to leave")
    assert ended is not None and not ended.exit and "next trainer" in ended.reason
    assert lease.end("first", "closed") is None  # its connection closing afterwards: nothing more
    lease.take("second")
    assert lease.holder == "second"


def test_a_spawned_daemon_is_held_by_its_first_connection():
    lease = Lease(Mode.SPAWNED)
    lease.opened("client")
    lease.opened("stray")
    assert lease.end("stray", "closed") is None
    ended = lease.end("client", "closed")  # without ever connecting: the daemon still goes
    assert ended is not None and ended.exit


def test_exit_with_client_and_serve_successive_exclude_each_other(capsys):
    with pytest.raises(InvalidUsage, match="exclude each other"):
        Mode.of(exit_with_client=True, serve_successive=True)
    assert Mode.of(exit_with_client=False, serve_successive=False) is Mode.EXIT
    with pytest.raises(SystemExit) as exc:
        service.main(["--exit-with-client", "--serve-successive"])
    assert exc.value.code == 2 and "exclude each other" in capsys.readouterr().err


# -- daemons, trainers and a coordinator ---------------------------------------------------

def read_line(proc: subprocess.Popen, prefix: bytes, timeout: float) -> str:
    """The first line of ``proc``'s stdout that starts with ``prefix``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        line = proc.stdout.readline() if ready else b""
        if line.startswith(prefix):
            return line.decode().strip()
        if not line and proc.poll() is not None:
            raise AssertionError(f"{proc.args[1:3]} exited with code {proc.returncode} before {prefix!r}")
    raise AssertionError(f"no {prefix!r} line within {timeout} s")


def start_daemon(coordinator, *extra: str) -> tuple[subprocess.Popen, str]:
    """A daemon started by hand, as operations.md shows; returns it and its IPC path."""
    path = os.path.join(tempfile.gettempdir(), f"pccl-lease-{uuid.uuid4().hex[:8]}.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pccl_py.daemon", "--coordinator", coordinator.addr,
                             "--ipc", path, *extra], stdout=subprocess.PIPE, cwd=REPO)
    try:
        read_line(proc, b"READY", 30.0)
    except BaseException:
        stop_process(proc)
        raise
    return proc, path


def start_trainer(path: str, world: int) -> subprocess.Popen:
    """A trainer process on the daemon at ``path`` that joins a run of ``world`` peers."""
    return subprocess.Popen([sys.executable, TRAINER, path, str(world)], stdout=subprocess.PIPE, cwd=REPO)


def join(ex, clients, world: int, timeout: float = 30.0) -> list[dict]:
    """Connect every client and vote until the run has ``world`` members (other trainers
    may be joining at the same time)."""
    def one(c):
        topo = c.connect()
        deadline = time.monotonic() + timeout
        while topo["world_size"] < world:
            assert time.monotonic() < deadline, "peers did not all join"
            topo = c.update_topology()
        return topo

    return list(ex.map(one, clients))


def until_world(clients, world: int, timeout: float) -> float:
    """Seconds until every client's daemon has a topology of ``world`` members."""
    t0 = time.monotonic()
    while not all(c.refresh().get("world_size") == world for c in clients):
        assert time.monotonic() - t0 < timeout, [c.refresh() for c in clients]
        time.sleep(0.01)
    return time.monotonic() - t0


def all_reduce_ones(ex, clients) -> list[np.ndarray]:
    xs = [np.ones(100_000, np.float32) for _ in clients]
    infos = list(ex.map(lambda p: p[0].all_reduce(p[1], timeout=10.0), zip(clients, xs)))
    assert all(i["world_size"] == len(clients) for i in infos)
    return xs


def read_replies(sock: socket.socket, n: int) -> list[dict]:
    """The next ``n`` messages the daemon sends on ``sock`` (its timeout bounds each wait)."""
    frames, out = ipc.FrameBuffer(), []
    while len(out) < n:
        data = sock.recv(1 << 16)
        assert data, "the daemon closed the connection"
        out += frames.feed(data)
    return out


def close_all(clients) -> None:
    for c in clients:
        try:
            c.close()
        except Exception:  # noqa: BLE001 - the test's own failure is what matters
            pass


@pytest.mark.timeout(90)
def test_sigkilled_trainer_its_daemon_leaves_at_once_and_exits(coordinator):
    daemon, path = start_daemon(coordinator)
    trainer = start_trainer(path, 3)
    clients: list[Client] = []
    try:
        clients = [Client(coordinator=coordinator.addr, timeout=20.0) for _ in range(2)]
        with cf.ThreadPoolExecutor(2) as ex:
            join(ex, clients, 3)
            read_line(trainer, b"JOINED", 30.0)
            epoch = clients[0].refresh()["epoch"]
            os.kill(trainer.pid, signal.SIGKILL)
            seen = until_world(clients, 2, 10.0)
            assert clients[0].refresh()["epoch"] > epoch
            xs = all_reduce_ones(ex, clients)
            assert all(np.all(x == 2.0) for x in xs)
        print(f"\ntrainer SIGKILLed -> both survivors in the new epoch after {seen:.3f} s")
        assert seen < SEEN_WITHIN, f"the survivors saw the new epoch after {seen:.2f} s"
        assert daemon.wait(10.0) == 0  # a hand-started daemon exits once its trainer is gone
    finally:
        close_all(clients)
        stop_process(trainer)
        stop_process(daemon)


@pytest.mark.timeout(90)
def test_closing_a_client_attached_to_a_running_daemon_leaves_the_run(coordinator):
    daemon, path = start_daemon(coordinator)
    a = trainer = None
    try:
        a = Client(coordinator=coordinator.addr, timeout=20.0)
        trainer = Client(daemon=path, timeout=20.0)
        with cf.ThreadPoolExecutor(2) as ex:
            join(ex, [a, trainer], 2)
        t0 = time.monotonic()
        trainer.close()  # returns once the daemon has announced the leave
        closed = time.monotonic() - t0
        seen = until_world([a], 1, 10.0) + closed
        print(f"\nclose() took {closed:.3f} s; the other peer in the new epoch {seen:.3f} s after it began")
        assert seen < SEEN_WITHIN
        assert daemon.wait(10.0) == 0
        x = np.ones(10, np.float32)
        assert a.all_reduce(x)["world_size"] == 1  # the survivor goes on alone
    finally:
        close_all([c for c in (a, trainer) if c is not None])
        stop_process(daemon)


@pytest.mark.timeout(120)
def test_a_daemon_serving_successive_trainers_takes_the_next_one_as_a_new_member(coordinator):
    daemon, path = start_daemon(coordinator, "--serve-successive")
    first = start_trainer(path, 2)
    clients: list[Client] = []
    try:
        a = Client(coordinator=coordinator.addr, timeout=20.0)
        clients.append(a)
        with cf.ThreadPoolExecutor(2) as ex:
            join(ex, [a], 2)
            first_id = read_line(first, b"JOINED", 30.0).split()[1]
            os.kill(first.pid, signal.SIGKILL)
            seen = until_world([a], 1, 10.0)
            print(f"\nfirst trainer SIGKILLed -> the other peer alone after {seen:.3f} s")
            assert seen < SEEN_WITHIN
            assert daemon.poll() is None  # it stays for the next trainer

            second = Client(daemon=path, timeout=20.0)
            clients.append(second)
            topos = join(ex, [a, second], 2)
            assert topos[1]["peer_id"] != first_id and first_id not in topos[0]["peers"]
            assert second.peer_id == topos[1]["peer_id"]  # the membership it connected, not the last one
            xs = all_reduce_ones(ex, [a, second])
            assert all(np.all(x == 2.0) for x in xs)

            second.close()  # the same path: the run goes on without it, the daemon stays
            until_world([a], 1, SEEN_WITHIN)
            third = Client(daemon=path, timeout=20.0)
            clients.append(third)
            assert third.refresh()["connected"] is False  # a fresh membership, not yet in the run
            topos = join(ex, [a, third], 2)
            assert len({topos[1]["peer_id"], first_id, second.peer_id}) == 3
        assert daemon.poll() is None
    finally:
        close_all(clients)
        stop_process(first)
        stop_process(daemon)


@pytest.mark.timeout(90)
def test_stray_connections_end_no_lease_and_no_daemon(coordinator):
    daemon, path = start_daemon(coordinator)
    a = trainer = None
    try:
        a = Client(coordinator=coordinator.addr, timeout=20.0)
        trainer = Client(daemon=path, timeout=20.0)
        with cf.ThreadPoolExecutor(2) as ex:
            join(ex, [a, trainer], 2)
            epoch = a.refresh()["epoch"]
            for where in (path, a.daemon_path):  # a hand-started daemon, a client-spawned one
                assert stat.S_IMODE(os.stat(where).st_mode) == 0o600  # other users cannot connect
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # a probe that says nothing
                    s.connect(where)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # garbage: a length over the limit
                    s.connect(where)
                    s.sendall(b"\xff\xfe garbage \x00" * 64)
                    s.settimeout(10.0)
                    assert s.recv(1 << 16) == b""  # that connection is closed, nothing else
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # framed garbage, then a request
                    s.connect(where)
                    s.settimeout(10.0)
                    s.sendall(ipc.LEN.pack(3) + b"\xc1\xc1\xc1" + ipc.pack({"op": "info", "id": 9}))
                    replies = read_replies(s, 2)
                    assert replies[0]["error"] == "InvalidUsage" and replies[1]["id"] == 9 and replies[1]["ok"]
                    # a connection that does not hold the lease runs nothing on the membership: no
                    # vote, no call that would take the trainer's next automatic tag
                    s.sendall(ipc.pack({"op": "all_reduce", "id": 10, "nbytes": 4, "dtype": "float32",
                                        "data": bytes(4)}) + ipc.pack({"op": "update_topology", "id": 11}))
                    for r in read_replies(s, 2):
                        assert r["error"] == "InvalidUsage" and "does not hold" in r["message"], r
            probe = Client(daemon=path, timeout=5.0)  # a second client that reads the view
            try:
                assert probe.refresh()["world_size"] == 2
                with pytest.raises(InvalidUsage, match="another trainer"):
                    probe.connect()
                with pytest.raises(InvalidUsage, match="does not hold"):
                    probe.all_reduce(np.ones(4, np.float32))
            finally:
                probe.close()  # its leave leaves nothing: it never connected
            time.sleep(1.0)  # a lease that ended would have moved the run on by now
            assert daemon.poll() is None and a._proc.poll() is None
            for c in (a, trainer):
                info = c.refresh()
                assert info["world_size"] == 2 and info["epoch"] == epoch, info
            xs = all_reduce_ones(ex, [a, trainer])
            assert all(np.all(x == 2.0) for x in xs)
    finally:
        close_all([c for c in (a, trainer) if c is not None])
        stop_process(daemon)

