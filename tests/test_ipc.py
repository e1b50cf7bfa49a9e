"""The trainer-daemon IPC codec, tensor views, error mapping and backoff: no processes."""

from __future__ import annotations

import itertools

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pccl_py import errors
from pccl_py.client.tensors import flat
from pccl_py.retry import Backoff
from pccl_py.wire import ipc


def test_framebuffer_splits_any_chunking():
    msgs = [{"op": "info", "id": i, "pad": "x" * i} for i in range(20)]
    stream = b"".join(ipc.pack(m) for m in msgs)
    for step in (1, 3, 7, 64, len(stream)):
        fb = ipc.FrameBuffer()
        got = []
        for i in range(0, len(stream), step):
            got += fb.feed(stream[i : i + step])
        assert got == msgs


def test_framebuffer_rejects_oversized_and_garbage():
    fb = ipc.FrameBuffer()
    with pytest.raises(errors.ProtocolError):
        fb.feed(ipc.LEN.pack(ipc.MAX_MESSAGE + 1))
    fb = ipc.FrameBuffer()
    body = msgpack.packb([1, 2, 3])
    with pytest.raises(errors.ProtocolError, match="not a map"):
        fb.feed(ipc.LEN.pack(len(body)) + body)
    fb = ipc.FrameBuffer()
    with pytest.raises(errors.ProtocolError):
        fb.feed(ipc.LEN.pack(3) + b"\xc1\xc1\xc1")


@given(st.binary(max_size=200))
def test_framebuffer_fuzz_only_protocol_errors(data):
    fb = ipc.FrameBuffer()
    try:
        fb.feed(data)
    except errors.ProtocolError:
        pass


def test_error_wire_round_trip():
    for cls in (errors.PeerLost, errors.Aborted, errors.InvalidUsage, errors.RevisionError,
                errors.CoordinatorUnavailable, errors.DeadlineExceeded, errors.Diverged):
        back = errors.from_wire(errors.to_wire(cls("boom")))
        assert type(back) is cls and str(back) == "boom"
    other = errors.from_wire(errors.to_wire(KeyError("k")))
    assert isinstance(other, errors.InternalError) and "KeyError" in str(other)
    assert type(errors.from_wire({"error": "NoSuchThing", "message": "m"})) is errors.PcclError


def test_a_lost_segment_travels_with_its_name_and_is_retryable():
    back = errors.from_wire(errors.to_wire(errors.SegmentLost("gone", segment="pccl_abc")))
    assert type(back) is errors.SegmentLost and back.segment == "pccl_abc" and str(back) == "gone"
    assert isinstance(back, errors.Aborted)  # retry=True repeats it
    assert errors.error_code(back) == errors.ERR_ABORTED  # to the other peers of the call: an abort
    assert errors.from_wire({"error": "SegmentLost", "message": "m", "segment": 3}).segment is None


def test_backoff_respects_deadline_and_grows():
    b = Backoff(initial=0.01, maximum=0.08, factor=2.0, jitter=0.0, deadline=0.5)
    delays = list(itertools.islice(b.delays(), 5))
    assert delays == [0.01, 0.02, 0.04, 0.08, 0.08]
    assert list(Backoff(initial=1.0, deadline=0.5).delays()) == []


def test_flat_views_share_memory_and_name_dtypes():
    a = np.arange(10, dtype=np.float32)
    f = flat(a)
    assert f.dtype == "float32" and f.nbytes == 40
    f.data[:4] = 0
    assert a[0] == 0.0
    with pytest.raises(errors.InvalidUsage, match="contiguous"):
        flat(np.arange(10, dtype=np.float32)[::2])
    ro = np.arange(3, dtype=np.int32)
    ro.flags.writeable = False
    with pytest.raises(errors.InvalidUsage, match="read-only"):
        flat(ro)
    with pytest.raises(errors.InvalidUsage, match="dtype"):
        flat(np.zeros(2, dtype=np.complex64))


def test_flat_torch_bf16_and_strided():
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.bfloat16)
    f = flat(t)
    assert f.dtype == "bfloat16" and f.nbytes == 12 and f.staged is None
    s = torch.arange(12, dtype=torch.float32).reshape(3, 4)[:, 1]
    f = flat(s)
    assert f.staged is not None
    f.data.view(np.float32)[:] = -1
    f.finish()
    assert torch.equal(s, torch.full((3,), -1.0))


def _unshare_works() -> bool:
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.timeout(60)
@pytest.mark.skipif(not _unshare_works(), reason="needs root and unshare -m (a private /dev/shm)")
def test_a_full_dev_shm_is_an_error_not_a_sigbus():
    """In a private mount namespace whose /dev/shm is a 1 MiB tmpfs: a segment that does
    not fit fails with InvalidUsage naming /dev/shm and leaves no file behind; one that
    fits is reserved whole, so writing all of it cannot raise SIGBUS later."""
    import os
    import subprocess
    import sys

    script = (
        "from pccl_py import errors\n"
        "from pccl_py.transport import segments\n"
        "import os\n"
        "try:\n"
        "    segments.create_segment(4 << 20)\n"
        "    print('created')\n"
        "except errors.InvalidUsage as e:\n"
        "    print('refused:', e)\n"
        "print('left:', sorted(os.listdir('/dev/shm')))\n"
        "s = segments.create_segment(512 << 10)\n"
        "st = os.statvfs('/dev/shm')\n"
        "print('used:', (st.f_blocks - st.f_bfree) * st.f_frsize)\n"
        "s.buf[:] = b'x' * len(s.buf)\n"
        "s.close(); s.unlink()\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c",
         f"mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {sys.executable} -c \"$0\"", script],
        capture_output=True, text=True, timeout=50, cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("refused: /dev/shm has no room for a 4194304-byte"), lines
    assert "--shm-size" in lines[0]
    assert lines[1] == "left: []", lines
    assert int(lines[2].split()[1]) >= 512 << 10  # reserved before anything was written


def test_error_frame_codes_and_what_they_mean_to_the_other_peers():
    from pccl_py import errors as E

    cases = [(E.Diverged("d"), E.ERR_DIVERGED, E.Diverged), (E.InvalidUsage("u"), E.ERR_INVALID_USAGE, E.InvalidUsage),
             (E.RevisionError("r"), E.ERR_INVALID_USAGE, E.InvalidUsage),  # a subclass keeps its family
             (E.PeerLost("p"), E.ERR_PEER_LOST, E.Aborted), (E.DeadlineExceeded("t"), E.ERR_DEADLINE, E.Aborted),
             (E.Aborted("a"), E.ERR_ABORTED, E.Aborted), (E.ProtocolError("x"), E.ERR_ABORTED, E.Aborted)]
    for exc, code, there in cases:
        assert E.error_code(exc) == code, exc
        got = E.peer_failure(code, "peer rank 1 failed")
        assert type(got) is there and str(got) == "peer rank 1 failed"
    assert sorted(E.ERR_CODES) == [1, 2, 3, 4, 5]
