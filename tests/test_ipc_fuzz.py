"""Fuzzing the local plane (trainer -> daemon requests): every bad request is answered with
InvalidUsage, nothing invalid reaches the daemon, the session and the daemon keep serving.

Three levels: the sans-I/O validators (``ipc.check_request``, ``ipc.layout_views``), a
real :class:`TrainerSession` in front of a fake daemon that checks every argument it is
handed, and a real daemon process with two trainers in a run, fuzzed from a stray
connection (and with bad requests on the trainer's own). ``PCCL_FUZZ_EXAMPLES`` scales the
case counts (tests/fuzzing.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import math
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid

import msgpack
import numpy as np
import pytest
from conftest import REPO, stop_process
from fuzzing import examples, fuzz_settings, ints, texts, timeout_for, values
from hypothesis import assume, event, given
from hypothesis import strategies as st

from pccl_py import calls
from pccl_py import kernels as K
from pccl_py.daemon import session as session_mod
from pccl_py.daemon.session import TrainerSession
from pccl_py.errors import InvalidUsage
from pccl_py.wire import ipc

N_CHECK = examples(2000)
N_SESSION = examples(1000)
N_LAYOUT = examples(500)
N_DAEMON = examples(80, share=0.01)

ALLOWED_ERRORS = {"InvalidUsage", "SegmentLost"}  # what a bad request may be answered with
SEGMENTS = {"seg0": 1 << 16, "seg1": 1 << 12}

# -- requests: mostly well-formed, each field sometimes wrong, missing, or extra --------------

segment_names = st.sampled_from(["seg0", "seg1", "/seg0", "nope", "", "a/b", "..", "x\0"]) | texts
sizes = st.sampled_from([0, 4, 8, 16, 100, 1024, 4096, 4100, 1 << 12, 1 << 16]) | st.integers(0, 1 << 17) | ints


@st.composite
def describe(draw) -> dict:
    """A shared-state description (SharedState.describe()), often off in some way."""
    rows = []
    for i in range(draw(st.integers(0, 4))):
        row = [draw(st.sampled_from([f"t{i}", "t0", ""]) | texts), draw(sizes), draw(sizes),
               draw(st.sampled_from(calls.DTYPES) | texts), draw(st.lists(sizes, max_size=3) | values),
               draw(st.booleans() | values)]
        if draw(st.integers(0, 9)) == 0:
            row = draw(st.lists(values, max_size=7))
        rows.append(row)
    desc = {"segment": draw(segment_names), "size": draw(sizes), "revision": draw(st.integers(0, 9) | ints),
            "tensors": rows}
    if draw(st.integers(0, 9)) == 0:
        desc[draw(texts)] = draw(values)
    return desc


def good(op: str, key: str):
    """Values of ``key`` that pass the schema (and mostly the meaning checks) for ``op``."""
    return {
        "dtype": st.sampled_from(calls.DTYPES),
        "reduce": st.sampled_from(calls.OPS),
        "algorithm": st.sampled_from(calls.ALGORITHMS),
        "quant": st.sampled_from(calls.QUANTS),
        "strategy": st.sampled_from(calls.STRATEGIES),
        "name": segment_names, "shm": segment_names, "in_shm": st.none() | segment_names,
        "size": sizes, "nbytes": sizes, "in_off": sizes, "out_off": sizes,
        "timeout": st.sampled_from([None, 0, 0.001, 1, 5.0, 86400.0]),
        "tag": st.sampled_from([None, 0, 1, 77, (1 << 62) - 1, 1 << 62]),
        "data": st.binary(max_size=64) if op == "all_gather" else st.sampled_from(
            [b"", b"\0" * 4, b"\0" * 8, b"\0" * 16, b"\0" * 4096]),
        "progress": st.booleans(),
        "state": describe(),
    }[key]


@st.composite
def well_formed(draw, op: str) -> dict:
    """A request of ``op`` that a daemon should take (the deepest paths), mostly."""
    msg = {key: draw(good(op, key)) for key in ipc.REQUESTS[op]}
    if op == "all_reduce":
        dtype = msg["dtype"]
        item = K.itemsize(dtype)
        if msg["quant"] is not None:
            msg["dtype"], msg["reduce"], item = "float32", draw(st.sampled_from(calls.QUANT_OPS)), 4
        if draw(st.booleans()):  # inline
            n = draw(st.integers(0, ipc.INLINE_BYTES // item)) * item
            msg.update(nbytes=n, data=bytes(n), shm=None, in_shm=None, in_off=None, out_off=None)
        else:  # in shared memory, inside seg0 (64 KiB) and seg1 (4 KiB)
            n = draw(st.integers(0, 512)) * item
            msg.update(nbytes=n, data=None, shm="seg0", in_shm=draw(st.sampled_from([None, "seg0", "seg1"])))
            in_size = SEGMENTS[msg["in_shm"] or "seg0"]
            msg["in_off"] = draw(st.integers(0, max(0, in_size - n)))
            msg["out_off"] = draw(st.sampled_from([msg["in_off"], 0, SEGMENTS["seg0"] - n]))
    elif op == "sync_shared_state":
        rows, off = [], 0
        for i in range(draw(st.integers(1, 3))):
            n = draw(st.integers(0, 1000))
            rows.append([f"t{i}", off, n, "uint8", [n], draw(st.booleans())])
            off += n + 64
        msg["state"] = {"segment": "seg0", "size": SEGMENTS["seg0"], "revision": draw(st.integers(0, 9)),
                        "tensors": rows}
    elif op in ("map", "unmap"):
        msg["name"] = draw(st.sampled_from(["seg0", "seg1"]))
    return {k: v for k, v in msg.items() if v is not None or draw(st.booleans())}


OPS = tuple(sorted(ipc.REQUESTS))


@st.composite
def requests(draw, ops=OPS) -> dict:
    """Requests of every kind: half well-formed, a quarter with one field off, a quarter with
    any field anything (and now and then an unknown op, a missing op, an extra field)."""
    op = draw(st.sampled_from(ops) | (texts if draw(st.integers(0, 19)) == 0 else st.sampled_from(ops)))
    noise = draw(st.sampled_from([0, 0, 1, 2]))
    msg: dict = {"op": op, "id": draw(st.integers(0, 1 << 20) if draw(st.integers(0, 9)) else values)}
    spec = ipc.REQUESTS.get(op, {})
    if spec and noise < 2:
        msg.update(draw(well_formed(op)))
        if noise == 1 and spec:
            key = draw(st.sampled_from(sorted(spec)))
            if draw(st.booleans()):
                msg[key] = draw(values)
            else:
                msg.pop(key, None)
    else:
        for key in spec:
            how = draw(st.integers(0, 9))
            if how < 7:
                msg[key] = draw(good(op, key))
            elif how < 9:
                msg[key] = draw(values)
        if draw(st.integers(0, 19)) == 0:
            del msg["op"]
        if draw(st.integers(0, 9)) == 0:
            msg[draw(texts)] = draw(values)
    return msg


def wire(msg: dict) -> dict | None:
    """``msg`` as the daemon reads it off the socket (None: msgpack cannot carry it)."""
    try:
        return ipc.unpack(msgpack.packb(msg, use_bin_type=True))
    except (OverflowError, ValueError, TypeError):
        return None


# -- an independent reading of the schema (the oracle) ----------------------------------------

def conforms(f: ipc.Field, v) -> bool:
    if v is None:
        return f.optional
    if f.kind is float:
        return type(v) in (int, float) and math.isfinite(float(v))
    if type(v) is not f.kind:
        return False
    if f.kind is int and not ((f.lo is None or v >= f.lo) and (f.hi is None or v <= f.hi)):
        return False
    if f.max_len is not None and len(v) > f.max_len:
        return False
    if f.rule is not None and f.rule(v) is not None:
        return False
    if f.fields is not None:
        return set(v) <= set(f.fields) and all(conforms(g, v.get(k)) for k, g in f.fields.items())
    return True


@pytest.mark.timeout(timeout_for(N_CHECK, 0.006))
@fuzz_settings(N_CHECK)
@given(requests())
def test_check_request_answers_invalid_usage_or_exactly_the_schema(msg):
    msg = wire(msg)
    assume(msg is not None)
    try:
        req = ipc.check_request(msg)
    except InvalidUsage as exc:
        assert str(exc)
        return
    spec = ipc.REQUESTS[msg["op"]]
    assert set(msg) <= set(spec) | {"op", "id"}
    assert isinstance(msg["id"], int) and 0 <= msg["id"] < 1 << 63
    for key, f in spec.items():
        assert conforms(f, msg.get(key)), (key, msg.get(key))
        if f.kind is float and msg.get(key) is not None:  # numbers come out as floats
            assert type(req[key]) is float and req[key] == float(msg[key])
        else:
            assert req[key] == msg.get(key)
    if msg["op"] == "all_reduce":
        assert (req["data"] is None) != (req["shm"] is None)


@pytest.mark.timeout(timeout_for(N_LAYOUT, 0.008))
@fuzz_settings(N_LAYOUT)
@given(describe(), st.integers(0, 1 << 12))
def test_layout_views_answers_invalid_usage_or_views_inside_the_segment(desc, size):
    desc = wire(desc)
    assume(desc is not None)
    segment = memoryview(bytearray(size))
    try:
        views = ipc.layout_views(desc, segment)
    except InvalidUsage:
        return
    names = [n for n, _, _ in views]
    assert len(set(names)) == len(names) and all(isinstance(n, str) and n for n in names)
    for (_, view, unequal), row in zip(views, desc["tensors"], strict=True):
        assert type(unequal) is bool and view.nbytes == row[2] and row[1] + row[2] <= size


# -- a real session in front of a fake daemon -------------------------------------------------

class FakeSegment:
    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size
        self.buf = memoryview(bytearray(size))

    def close(self) -> None:
        pass


def fake_attach(name: str) -> FakeSegment:
    bare = name.lstrip("/")
    if bare not in SEGMENTS:
        raise FileNotFoundError(name)
    return FakeSegment(bare, SEGMENTS[bare])


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default=None):
        return self.extra.get(name, default) if hasattr(self, "extra") else default


class FakeDaemon:
    """Records every call the session makes and checks each argument it is handed; nothing
    invalid may get this far."""

    peer_id = "fake"

    def __init__(self, holder: bool) -> None:
        self.holder = holder
        self.session = None
        self.bad: list[str] = []
        self.calls: list[str] = []

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.bad.append(what)

    def check_timeout(self, timeout) -> None:
        self.check(type(timeout) is float and 0 < timeout <= calls.MAX_TIMEOUT, f"timeout {timeout!r}")

    def check_tag(self, tag) -> None:
        self.check(tag is None or (type(tag) is int and 0 <= tag < calls.AUTO_TAG), f"tag {tag!r}")

    def session_opened(self, session) -> None:
        self.session = session
        self.opened = True

    def session_closed(self, session) -> None:
        pass

    def require_holder(self, session):
        if not self.holder or session is not self.session:
            raise InvalidUsage("not the holder")

    async def settled(self, timeout) -> bool:
        self.check_timeout(timeout)
        return True

    async def connect(self, timeout, session=None) -> dict:
        self.check_timeout(timeout)
        if not self.holder:
            raise InvalidUsage("another trainer")
        return {"epoch": 1}

    async def update_topology(self, timeout) -> dict:
        self.check_timeout(timeout)
        self.calls.append("update_topology")
        return {"epoch": 1}

    async def optimize_topology(self, timeout) -> dict:
        self.check_timeout(timeout)
        self.calls.append("optimize_topology")
        return {"epoch": 1, "changed": False, "reason": "no gain"}

    async def are_peers_pending(self, timeout) -> bool:
        self.check_timeout(timeout)
        return False

    def summary(self) -> dict:
        return {"connected": True}

    async def all_gather(self, blob, *, user_tag, timeout) -> dict:
        self.calls.append("all_gather")
        self.check(type(blob) is bytes, f"blob {type(blob)}")
        self.check_tag(user_tag)
        self.check_timeout(timeout)
        return {"blobs": [blob], "epoch": 1}

    async def sync_shared_state(self, views, *, revision, strategy, timeout, progress) -> dict:
        self.calls.append("sync")
        self.check(type(revision) is int and 0 <= revision < 1 << 63, f"revision {revision!r}")
        self.check(strategy in calls.STRATEGIES, f"strategy {strategy!r}")
        self.check_timeout(timeout)
        for name, view, unequal in views:
            self.check(type(name) is str and isinstance(view, memoryview) and type(unequal) is bool, "views")
        if progress is not None:
            progress(1, 2)
        return {"status": "in_sync", "revision": revision}

    async def release(self, session) -> bool:
        return False

    def start_all_reduce(self, src, dst, *, dtype, op, quant, algorithm, user_tag, timeout, shm_refs, done):
        self.calls.append("all_reduce")
        try:
            calls.check_all_reduce(dtype, op, quant, algorithm)
        except InvalidUsage as exc:
            self.bad.append(f"all_reduce names: {exc}")
        self.check_tag(user_tag)
        self.check_timeout(timeout)
        n = len(src)
        self.check(len(dst) == n and dtype in calls.DTYPES and n % K.itemsize(dtype) == 0, f"sizes {n}")
        self.check(shm_refs is None or all(type(x) in (str, int) for x in shm_refs), f"refs {shm_refs}")
        done({"world_size": 1, "algorithm": "single"}, None)


LOOP = asyncio.new_event_loop()


def feed(sess: TrainerSession, data: bytes) -> list:
    """Feed ``data`` to ``sess`` (in the loop, until every task it started ended); the
    messages it wrote back."""
    async def go():
        sess.data_received(data)
        while sess.tasks:
            await asyncio.gather(*list(sess.tasks), return_exceptions=True)

    LOOP.run_until_complete(go())
    out = ipc.FrameBuffer().feed(bytes(sess.transport.written))
    sess.transport.written.clear()
    return out


def run_session(daemon: FakeDaemon, data: bytes) -> tuple[TrainerSession, list]:
    """A fresh session (seg0 and seg1 mapped) fed ``data``; the messages it wrote back."""
    sess = TrainerSession(daemon)
    sess.connection_made(FakeTransport())
    for name in SEGMENTS:
        sess.map(name, 0)
    return sess, feed(sess, data)


@pytest.fixture(scope="module", autouse=True)
def _fake_segments():
    mp = pytest.MonkeyPatch()
    mp.setattr(session_mod.segments, "attach_segment", fake_attach)
    yield
    mp.undo()


@pytest.mark.timeout(timeout_for(N_SESSION, 0.01))
@fuzz_settings(N_SESSION)
@given(requests(), st.sampled_from([True, True, True, False]))
def test_a_session_answers_every_request_once_and_hands_the_daemon_only_valid_calls(msg, holder):
    data = None
    try:
        data = ipc.pack(msg)
    except (OverflowError, ValueError, TypeError):
        pass
    assume(data is not None)
    daemon = FakeDaemon(holder)
    sess, out = run_session(daemon, data)
    assert daemon.bad == [], (msg, daemon.bad)
    replies = [m for m in out if "ok" in m]
    assert len(replies) == 1, (msg, out)
    reply = replies[0]
    event(f"{msg.get('op')!s:.20}: {'ok' if reply['ok'] else reply['error']}; reached the daemon: {daemon.calls}")
    assert reply["id"] == ipc.request_id(wire(msg))
    if not reply["ok"]:
        assert reply["error"] in ALLOWED_ERRORS, (msg, reply)
    if not holder:  # a session without the lease runs nothing on the membership
        assert daemon.calls == [], (msg, daemon.calls)
    # the session keeps serving
    last = feed(sess, ipc.pack({"op": "info", "id": 1}))
    assert last == [{"connected": True, "ok": True, "id": 1}] and not sess.transport.closed


@pytest.mark.timeout(timeout_for(examples(300), 0.005))
@fuzz_settings(examples(300))
@given(st.binary(max_size=64))
def test_a_framed_body_that_is_not_a_map_is_answered_and_the_session_goes_on(body):
    daemon = FakeDaemon(True)
    sess, out = run_session(daemon, struct.pack("<I", len(body)) + body + ipc.pack({"op": "hello", "id": 5}))
    assert not sess.transport.closed
    assert out[-1]["id"] == 5 and out[-1]["ok"]  # the next request is served
    for m in out[:-1]:  # whatever the body was, it got an InvalidUsage or was itself a request
        assert m["ok"] or m["error"] in ALLOWED_ERRORS


def test_a_process_of_another_user_is_refused_at_once(monkeypatch):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for trusted, refused in ((frozenset({os.geteuid()}), False), (frozenset({os.geteuid() + 12345}), True)):
            monkeypatch.setattr(session_mod, "trusted_uids", lambda trusted=trusted: trusted)
            daemon, transport = FakeDaemon(True), FakeTransport()
            transport.extra = {"socket": a}
            sess = TrainerSession(daemon)
            sess.connection_made(transport)
            assert transport.closed is refused and getattr(daemon, "opened", False) is not refused
            sess.connection_lost(None)  # a refused one touches no lease
    finally:
        a.close()
        b.close()


def test_a_broken_framing_closes_only_that_connection():
    daemon = FakeDaemon(True)
    sess, out = run_session(daemon, struct.pack("<I", ipc.MAX_MESSAGE + 1) + b"x")
    assert sess.transport.closed and out == []


# -- a real daemon in a real run ---------------------------------------------------------------

def start_daemon(coordinator, log_path: str) -> tuple[subprocess.Popen, str]:
    path = os.path.join(tempfile.gettempdir(), f"pccl-fuzz-{uuid.uuid4().hex[:8]}.sock")
    log = open(log_path, "wb")  # noqa: SIM115 - the daemon writes it until it ends
    proc = subprocess.Popen([sys.executable, "-m", "pccl_py.daemon", "--coordinator", coordinator.addr, "--ipc",
                             path], stdout=subprocess.PIPE, stderr=log, cwd=REPO)
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(b"READY"):
            return proc, path
        if not line and proc.poll() is not None:
            break
    stop_process(proc)
    raise AssertionError("the daemon did not start")


class Raw:
    """A connection to a daemon's IPC socket that sends what it is given."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10.0)
        self.sock.connect(path)
        self.frames = ipc.FrameBuffer()

    def ask(self, data: bytes) -> list[dict]:
        """Send ``data``, then a hello with id -> the replies up to that hello's."""
        marker = 1 << 40
        self.sock.sendall(data + ipc.pack({"op": "hello", "id": marker}))
        out: list[dict] = []
        deadline = time.monotonic() + 10.0
        while not any(m.get("id") == marker for m in out):
            assert time.monotonic() < deadline, f"no answer: {out}"
            chunk = self.sock.recv(1 << 16)
            assert chunk, "the daemon closed the connection"
            out += self.frames.feed(chunk)
        return [m for m in out if m.get("id") != marker]

    def close(self) -> None:
        self.sock.close()


@pytest.mark.timeout(timeout_for(N_DAEMON, 0.05) + 60)
def test_a_real_daemon_answers_fuzzed_requests_and_its_run_goes_on(coordinator, tmp_path):
    from pccl_py import Client

    log_path = str(tmp_path / "daemon.log")
    daemon, path = start_daemon(coordinator, log_path)
    trainer = other = stray = None
    try:
        trainer = Client(daemon=path, timeout=20.0)
        other = Client(coordinator=coordinator.addr, timeout=20.0)
        def join(c):
            topo = c.connect()
            deadline = time.monotonic() + 30
            while topo["world_size"] < 2:
                assert time.monotonic() < deadline, "the peers did not join"
                topo = c.update_topology()

        with cf.ThreadPoolExecutor(2) as ex:
            for f in [ex.submit(join, c) for c in (trainer, other)]:
                f.result(timeout=60)
        epoch = trainer.refresh()["epoch"]

        def paired(step: float) -> None:  # an untagged pair of calls: the numbering still agrees
            xs = [np.full(8, step, np.float32), np.full(8, 1.0, np.float32)]
            with cf.ThreadPoolExecutor(2) as ex2:
                list(ex2.map(lambda p: p[0].all_reduce(p[1], timeout=10.0), zip((trainer, other), xs)))
            assert np.all(xs[0] == step + 1) and np.all(xs[1] == step + 1)

        paired(1.0)
        # bad requests on the trainer's own connection: refused before they take a tag
        for bad in ({"nbytes": -4}, {"nbytes": 4.0}, {"nbytes": 8, "data": b"1234"}, {"timeout": float("nan")},
                    {"timeout": float("inf")}, {"timeout": -1}, {"tag": 7.5}, {"tag": -1}, {"tag": True},
                    {"reduce": "median"}, {"dtype": ["float32"]}, {"quant": 8}, {"extra": 1}):
            msg = {"op": "all_reduce", "nbytes": 4, "dtype": "float32", "data": bytes(4), "timeout": 5.0, **bad}
            with pytest.raises(InvalidUsage):
                trainer._call(msg)
        paired(2.0)

        stray = Raw(path)
        n_answered = [0]

        @fuzz_settings(N_DAEMON)
        @given(requests())
        def one(msg):
            try:
                data = ipc.pack(msg)
            except (OverflowError, ValueError, TypeError):
                return
            for reply in stray.ask(data):
                assert reply.get("ok") or reply.get("error") in ALLOWED_ERRORS, (msg, reply)
                n_answered[0] += 1

        one()
        assert stray.ask(b"\x03\x00\x00\x00\xc1\xc1\xc1")[0]["error"] == "InvalidUsage"  # framed garbage
        assert n_answered[0] >= N_DAEMON // 2, n_answered
        print(f"\n{n_answered[0]} fuzzed requests answered by a real daemon")
        paired(3.0)  # the run, the lease and the numbering are intact
        assert trainer.refresh()["epoch"] == epoch and daemon.poll() is None
    finally:
        for c in (stray, trainer, other):
            if c is not None:
                c.close()
        stop_process(daemon)
    text = open(log_path, errors="replace").read()
    assert "Traceback" not in text and "failed" not in text.lower().replace("failed to", ""), text[-3000:]
