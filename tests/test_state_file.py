"""SharedState.save / load and the state file format (pccl_py/client/state_file.py),
without sockets: round trip, every bit flip and every truncation detected, layout
mismatches named, and a failed save leaving the previous file as it was."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pccl_py import CorruptStateFile, InvalidUsage
from pccl_py.client import state_file
from pccl_py.client.shared_state import SharedState

pytestmark = pytest.mark.timeout(60)


def tensors(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((3, 5)).astype(np.float32),
        "step": np.array(seed, np.int64),  # 0-d
        "empty": np.zeros(0, np.float64),
        "m": rng.integers(-9, 9, 7).astype(np.int8),
        "rng": rng.integers(0, 2**31, 4).astype(np.int32),
    }


@pytest.fixture
def states():
    made = []

    def make(ts=None, revision=0, unequal=("rng",)):
        st = SharedState(tensors() if ts is None else ts, revision=revision, allow_content_inequality=unequal)
        made.append(st)
        return st

    yield make
    for st in made:
        st.close()


def zeros_like(ts: dict) -> dict:
    return {k: np.zeros_like(v) for k, v in ts.items()}


def contents(st: SharedState) -> dict:
    return {k: bytes(v) for k, v in st.views().items()}


def test_round_trip_fills_in_place_and_sets_the_revision(states, tmp_path):
    src = states(tensors(1), revision=41)
    path = tmp_path / "state.pccl"
    size = src.save(path)
    assert size == os.path.getsize(path)
    dst = states(zeros_like(tensors(1)))
    views_before = {k: id(v) for k, v in dst.tensors.items()}
    assert dst.load(path) == 41
    assert dst.revision == 41
    assert contents(dst) == contents(src)
    assert {k: id(v) for k, v in dst.tensors.items()} == views_before  # the same arrays, filled
    assert np.array_equal(dst["w"], src["w"]) and dst["step"].item() == 1
    assert sorted(os.listdir(tmp_path)) == ["state.pccl"]  # no temporary file left


def test_a_second_save_replaces_the_first(states, tmp_path):
    st = states(tensors(2), revision=3)
    path = tmp_path / "s"
    st.save(path)
    st["w"][:] = 7.0
    st.revision = 4
    st.save(path)
    dst = states(zeros_like(tensors(2)))
    assert dst.load(path) == 4 and np.all(dst["w"] == 7.0)


def test_torch_tensors_bfloat16_included(tmp_path):
    torch = pytest.importorskip("torch")
    src = SharedState({"a": torch.linspace(-3, 3, 11, dtype=torch.bfloat16), "b": torch.arange(4.0)}, revision=9)
    dst = SharedState({"a": torch.zeros(11, dtype=torch.bfloat16), "b": torch.zeros(4)})
    try:
        src.save(tmp_path / "t")
        assert dst.load(tmp_path / "t") == 9
        assert torch.equal(dst["a"], src["a"]) and torch.equal(dst["b"], src["b"])
        saved = state_file.read(tmp_path / "t")
        assert saved.revision == 9 and saved.tensors["a"].dtype == torch.bfloat16
        assert torch.equal(saved.tensors["a"], src["a"])
    finally:
        src.close()
        dst.close()


def test_read_builds_the_tensors_without_a_model(states, tmp_path):
    src = states(tensors(3), revision=12)
    src.save(tmp_path / "s")
    saved = state_file.read(tmp_path / "s")
    assert saved.revision == 12 and saved.allow_content_inequality == {"rng"}
    assert list(saved.tensors) == list(src.tensors)
    for name, arr in saved.tensors.items():
        assert arr.dtype == src[name].dtype and arr.shape == src[name].shape
        assert arr.tobytes() == src[name].tobytes()
    again = states(saved.tensors, revision=saved.revision, unequal=saved.allow_content_inequality)
    assert contents(again) == contents(src)


def test_every_bit_flip_is_detected_and_leaves_the_state_untouched(states, tmp_path):
    path = tmp_path / "s"
    states(tensors(4), revision=5).save(path)
    good = path.read_bytes()
    dst = states(zeros_like(tensors(4)), revision=0)
    before = contents(dst)
    bad = tmp_path / "bad"
    for i in range(len(good)):
        for bit in range(8):
            flipped = bytearray(good)
            flipped[i] ^= 1 << bit
            bad.write_bytes(flipped)
            with pytest.raises(CorruptStateFile) as err:
                dst.load(bad)
            assert str(bad) in str(err.value), err.value
    assert contents(dst) == before and dst.revision == 0
    assert dst.load(path) == 5  # the intact file still loads


def test_every_truncation_and_an_extension_is_detected(states, tmp_path):
    path = tmp_path / "s"
    states(tensors(5), revision=1).save(path)
    good = path.read_bytes()
    dst = states(zeros_like(tensors(5)))
    bad = tmp_path / "bad"
    for n in range(len(good)):
        bad.write_bytes(good[:n])
        with pytest.raises(CorruptStateFile, match="truncated") as err:
            dst.load(bad)
        assert str(bad) in str(err.value)
    bad.write_bytes(good + b"\0")
    with pytest.raises(CorruptStateFile, match="longer than its table says"):
        dst.load(bad)
    assert dst.revision == 0 and not dst["w"].any()


def test_the_digest_is_what_catches_a_changed_payload(states, tmp_path):
    path = tmp_path / "s"
    states(tensors(6)).save(path)
    raw = bytearray(path.read_bytes())
    raw[-state_file.DIGEST - 1] ^= 0x80  # last payload byte
    path.write_bytes(raw)
    with pytest.raises(CorruptStateFile, match="SHA-256 mismatch"):
        states(zeros_like(tensors(6))).load(path)


@pytest.mark.parametrize("change, named", [
    (lambda ts: ts.update(w=np.zeros((5, 3), np.float32)), "'w'"),  # shape
    (lambda ts: ts.update(m=np.zeros(7, np.uint8)), "'m'"),  # dtype
    (lambda ts: ts.update(extra=np.zeros(1, np.float32)), "'extra'"),  # one more here
    (lambda ts: ts.pop("rng"), "'rng'"),  # one fewer here
    (lambda ts: ts.update(step=ts.pop("step")), "'empty'"),  # order: #1 is 'empty' here, 'step' there
])
def test_a_layout_mismatch_names_the_first_tensor_that_differs(states, tmp_path, change, named):
    path = tmp_path / "s"
    states(tensors(7), revision=2).save(path)
    ts = zeros_like(tensors(7))
    change(ts)
    dst = states(ts, unequal=("rng",) if "rng" in ts else ())
    with pytest.raises(InvalidUsage, match=named) as err:
        dst.load(path)
    assert str(path) in str(err.value)
    assert dst.revision == 0 and all(not bytes(v).strip(b"\0") for v in dst.views().values())


def test_the_allow_content_inequality_flag_is_part_of_the_layout(states, tmp_path):
    path = tmp_path / "s"
    states(tensors(8), unequal=("rng",)).save(path)
    with pytest.raises(InvalidUsage, match="'rng'.*allow_content_inequality"):
        states(zeros_like(tensors(8)), unequal=()).load(path)


@pytest.mark.parametrize("fail", ["os.replace", "os.fsync"])
def test_a_failed_save_leaves_the_previous_file_intact(states, tmp_path, monkeypatch, fail):
    path = tmp_path / "s"
    states(tensors(9), revision=1).save(path)
    good = path.read_bytes()
    newer = states(tensors(10), revision=2)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fail, boom)
    with pytest.raises(OSError, match="No space"):
        newer.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["s"]  # the temporary file is gone
    assert states(zeros_like(tensors(9))).load(path) == 1


def test_other_files_are_refused_by_name(states, tmp_path):
    dst = states(zeros_like(tensors(0)))
    (tmp_path / "npy").write_bytes(b"\x93NUMPY" + bytes(200))
    with pytest.raises(CorruptStateFile, match="not a shared-state file"):
        dst.load(tmp_path / "npy")
    with pytest.raises(FileNotFoundError):
        dst.load(tmp_path / "missing")
    dst.close()
    with pytest.raises(InvalidUsage, match="closed"):
        dst.save(tmp_path / "x")


@pytest.mark.parametrize("table", [
    b"not json",
    b"[]",
    json.dumps({"revision": -1, "tensors": []}).encode(),
    json.dumps({"revision": 0, "tensors": [["w", "float32", [2], -8, False]]}).encode(),
    json.dumps({"revision": 0, "tensors": [["w", "float32", [2], 8, 0]]}).encode(),
    json.dumps({"revision": 0, "tensors": [["w", "float32", [True], 8, False]]}).encode(),
    json.dumps({"revision": 0, "tensors": [["w", "float32", [2], 8]]}).encode(),
    b"\xff\xfe",
])
def test_the_table_parser_refuses_malformed_tables(table):
    with pytest.raises(CorruptStateFile, match="corrupted tensor table"):
        state_file.parse_table(table, "f")


def test_the_table_round_trips_without_files():
    entries = state_file.entries_of([["a", 0, 8, "float32", [2], False], ["b", 64, 0, "int8", [0, 3], True]])
    head = state_file.encode_table(17, entries)
    length = state_file.parse_prefix(head[:16], "f")
    table = state_file.parse_table(head[16:16 + length], "f")
    assert table.revision == 17 and table.entries == entries and table.payload_bytes == 8
    state_file.check_layout(table.entries, entries, "f")


def test_read_checks_a_shape_against_its_bytes_before_allocating(tmp_path):
    """A table whose digest is right (SHA-256 is no signature) but whose shape does not
    match its byte count: read() refuses it instead of allocating the shape."""
    import hashlib

    entries = [state_file.Entry("w", "float32", (10**12,), 8, False)]
    body = state_file.encode_table(0, entries) + bytes(8)
    path = tmp_path / "forged"
    path.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(CorruptStateFile, match="is not 8 bytes"):
        state_file.read(path)
