"""Attacks on same-host links (transport/local.py, docs/dataplane.md "Links on one host").

Claims attacked: the Unix sockets of data planes live in a directory of the daemon's user
with mode 700, so another local user (here: a child that drops to uid 65534 as root) can
neither connect to them nor replace them, nor plant the directory before the daemon makes
it; and a same-user listener at a socket's path that does not complete the handshake
(silence, garbage, a bad WELCOME, an instant hang-up, a full backlog) costs the dialler at
most a second or two before it dials TCP, with exact results.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil
import socket
import tempfile
import time

import numpy as np
import pytest
from test_dataplane import SECRET, families, reference, run

from pccl_py.daemon.dataplane import DataPlane, DataPlaneConfig, same_host_address
from pccl_py.daemon.topology import PeerInfo, Topology
from pccl_py.transport import local
from pccl_py.wire import frames as F

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


async def pair(streams: int = 2):
    dps = [DataPlane(f"peer{i}", secret=SECRET, streams=streams, config=DataPlaneConfig(io_threads=False))
           for i in range(2)]
    for d in dps:
        await d.start()
    return dps


async def link_and_reduce(dps, epoch: int = 1, count: int = 5000):
    peers = tuple(PeerInfo(d.peer_id, "127.0.0.1", d.port) for d in dps)
    await asyncio.gather(*(d.set_topology(Topology(epoch, 0, i, peers, 2)) for i, d in enumerate(dps)))
    srcs = [np.arange(count, dtype=np.float32) * (i + 1) for i in range(2)]
    dsts = [np.zeros_like(s) for s in srcs]
    await asyncio.gather(*(d.all_reduce(srcs[i], dsts[i], dtype="float32", op="sum", algorithm="ring", tag=epoch,
                                        timeout=10) for i, d in enumerate(dps)))
    want = reference(srcs, "float32", "sum")
    assert all(d.tobytes() == want.tobytes() for d in dsts)


def as_nobody(attempts: dict) -> dict[str, str]:
    """Run each callable in a child process as uid/gid 65534; what each one did ("ok" or the
    exception's class name), by name."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = []
            for name, fn in attempts.items():
                try:
                    fn()
                    out.append(f"{name}=ok")
                except Exception as e:
                    out.append(f"{name}={type(e).__name__}")
            os.write(wfd, "\n".join(out).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        data = r.read().decode()
    deadline = time.monotonic() + 10
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        assert time.monotonic() < deadline, "the child acting as another user did not end"
        time.sleep(0.01)
    return dict(line.split("=", 1) for line in data.splitlines() if line)


@pytest.fixture
def open_tmp():
    """A directory every user may traverse (pytest's tmp_path sits under a 700 directory of
    root's, where another user would be stopped by the parents, not by what is tested)."""
    d = tempfile.mkdtemp(prefix="pccl-attack-")
    os.chmod(d, 0o755)
    try:
        yield pathlib.Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def socket_dir(open_tmp, monkeypatch):
    """PCCL_SOCKET_DIR under a parent every user may traverse (so what stops another user is
    the socket directory's own mode, not its parents')."""
    path = open_tmp / "pccl"
    monkeypatch.setenv("PCCL_SOCKET_DIR", str(path))
    return path


# ----------------------------------------------------------------------------- another user

@root_only
def test_another_user_can_neither_reach_nor_replace_nor_plant_beside_a_same_host_socket(socket_dir):
    async def body():
        dps = await pair()
        try:
            path = same_host_address("127.0.0.1", dps[1].port)
            assert os.path.dirname(path) == str(socket_dir) and os.path.exists(path)
            assert os.stat(socket_dir).st_mode & 0o777 == 0o700
            d = str(socket_dir)

            def connect():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(1)
                    s.connect(path)

            def bind_beside():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.bind(os.path.join(d, "dp-planted.sock"))

            got = as_nobody({
                "see_dir": lambda: os.lstat(d),  # the parent is open: the directory can be seen...
                "stat_socket": lambda: os.stat(path),  # ...but not entered
                "list": lambda: os.listdir(d),
                "connect": connect,
                "unlink": lambda: os.unlink(path),
                "rename": lambda: os.rename(path, path + ".moved"),
                "bind_beside": bind_beside,
                "symlink_beside": lambda: os.symlink("/tmp", os.path.join(d, "x")),
                "chmod_dir": lambda: os.chmod(d, 0o777),
                "rename_dir": lambda: os.rename(d, d + ".moved"),
            })
            assert got.pop("see_dir") == "ok", "the test's parent directory is not open to other users"
            assert got == {k: "PermissionError" for k in got}, got
            # the real socket is still there and still the daemon's: the link comes up over it
            await link_and_reduce(dps)
            assert families(dps[0])[dps[1].peer_id] == {"AF_UNIX"}
        finally:
            for dp in dps:
                await dp.close()

    run(body())


@root_only
@pytest.mark.parametrize("planted", ["dir-of-theirs", "open-dir-of-theirs", "symlink", "file"])
def test_a_socket_directory_planted_by_another_user_is_not_used(open_tmp, monkeypatch, planted):
    """Another user creates the socket directory's path first (in a shared sticky directory,
    as /tmp is): the daemon must not use it (same-host links off, peers link over TCP), and
    nothing of the daemon's appears in it."""
    shared = open_tmp / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    target = str(shared / "pccl_py-0")
    mine = open_tmp / "mine"
    mine.mkdir(mode=0o700)  # a directory of the daemon's user, which a link could point at

    def plant():
        if planted == "dir-of-theirs":
            os.mkdir(target, 0o700)
        elif planted == "open-dir-of-theirs":
            os.mkdir(target)
            os.chmod(target, 0o777)
        elif planted == "symlink":
            os.symlink(str(mine), target)
        else:
            with open(target, "w"):
                pass

    assert as_nobody({"plant": plant}) == {"plant": "ok"}
    assert os.lstat(target).st_uid == NOBODY
    monkeypatch.setenv("PCCL_SOCKET_DIR", target)
    assert local.private_dir() is None

    async def body():
        dps = await pair()
        try:
            await link_and_reduce(dps)
            assert families(dps[0])[dps[1].peer_id] == {"AF_INET"}
        finally:
            for d in dps:
                await d.close()

    run(body())
    if os.path.isdir(target) and not os.path.islink(target):
        assert os.listdir(target) == []
    assert os.listdir(mine) == []


# ----------------------------------------------------------------------------- a listener of this user

def _squatter(kind: str):
    """A protocol factory (or, for "backlog-full", None) for what answers at the socket's path."""

    class Squat(asyncio.Protocol):
        def connection_made(self, transport):
            self.t = transport
            if kind == "garbage":
                transport.write(os.urandom(4096))
            elif kind in ("bad-welcome", "challenge-then-silence"):
                transport.write(F.encode_challenge(os.urandom(32)))
            elif kind == "hang-up":
                transport.close()

        def data_received(self, data):
            if kind == "bad-welcome":  # a well-formed WELCOME without the secret
                self.t.write(F.encode_welcome(b"guess", b"n" * 32, "peer1", 0, 0, b"c" * 32))

    return Squat


@pytest.mark.parametrize("kind", ["garbage", "bad-welcome", "hang-up", "challenge-then-silence", "backlog-full"])
def test_a_same_user_listener_that_does_not_complete_the_handshake_costs_at_most_two_seconds(kind, open_tmp,
                                                                                            monkeypatch):
    monkeypatch.setenv("PCCL_SOCKET_DIR", str(open_tmp / "sock"))  # (a short path: AF_UNIX allows 107 bytes)

    async def body():
        dps = await pair(streams=3)
        path = same_host_address("127.0.0.1", dps[1].port)
        os.unlink(path)  # the daemon's listener goes on, unreachable; something else answers there
        held: list[socket.socket] = []
        server = None
        try:
            if kind == "backlog-full":  # listening, never accepting, its queue full
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(path)
                s.listen(0)
                held.append(s)
                for _ in range(64):
                    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    c.setblocking(False)
                    held.append(c)
                    try:
                        c.connect(path)
                    except BlockingIOError:
                        break
                else:
                    pytest.fail("the backlog never filled")
            else:
                server = await asyncio.get_running_loop().create_unix_server(_squatter(kind), path)
            t0 = time.monotonic()
            await link_and_reduce(dps)
            took = time.monotonic() - t0
            assert families(dps[0])[dps[1].peer_id] == {"AF_INET"}
            assert took < 2.5, f"{kind}: the link took {took:.1f} s"
        finally:
            if server is not None:
                server.close()
            for s in held:
                s.close()
            for d in dps:
                await d.close()

    run(body())


def test_the_socket_directory_is_made_private_even_under_a_permissive_umask(tmp_path, monkeypatch):
    """mkdir's mode is masked by the umask, never widened by it; the check afterwards refuses
    whatever is not 700 (a umask of 0 must not give an open directory)."""
    monkeypatch.setenv("PCCL_SOCKET_DIR", str(tmp_path / "sock"))
    old = os.umask(0)
    try:
        assert local.private_dir() == str(tmp_path / "sock")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "sock").st_mode & 0o777 == 0o700
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(tmp_path / "sock")
