"""Control-plane codec: the schema table, and fuzzing (nothing but ProtocolError ever escapes)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pccl_py.errors import ProtocolError
from pccl_py.wire import control as protocol

pytestmark = pytest.mark.timeout(60)


def good_hello(**over):
    fields = dict(peer_id="a", group=0, host="127.0.0.1", port=5, claim="new",
                  epoch=0, ring_pos=-1, world=0, revision=-1, instance="", timeout=0.0)
    fields.update(over)
    return fields


def raw(mtype, v=protocol.VERSION, **fields):
    return msgpack.packb({"type": mtype, "v": v, **fields}, use_bin_type=True)


def test_roundtrip_every_type_from_schema():
    samples = {
        "hello": good_hello(),
        "heartbeat": dict(activity=None, epoch=3, revision=-1, tx=5, rx=7, calls=[1 << 62 | 3]),
        "vote": dict(req=1, timeout=2, below=1 << 62 | 4, open=[1 << 62 | 2]),
        "optimize": dict(req=2, timeout=0, below=0, open=[]),
        "bw_report": dict(round=1, epoch=3, rows=[["b", 1.5e8, 0.05]]),
        "bw_probe": dict(round=1, epoch=3, targets=["b"], bytes=8 << 20, timeout=5.0),
        "unvote": dict(req=1),
        "pending_q": dict(req=1),
        "report_failure": dict(peer_id="b", reason="eof", epoch=3),
        "leave": dict(reason="bye"),
        "pong": dict(nonce=9),
        "status_q": dict(req=2),
        "welcome": dict(instance="i", peer_id="a", state="pending", heartbeat_interval=0.5,
                        heartbeat_deadline=3, reason="r"),
        "topology": dict(instance="i", epoch=2, group=0, peers=[["a", "h", 1], ["b", "h", 2]],
                         world_size=2, num_groups=1, req=3, reason="", round=17),
        "hb": dict(instance="i", epoch=1),
        "ping": dict(nonce=1),
        "pending_a": dict(req=1, pending=False),
        "error": dict(req=1, error="InvalidUsage", message="m"),
        "abort": dict(error="Aborted", message="m"),
        "removed": dict(peer_id="a", reason="r"),
        "reset": dict(instance="i", reason="r"),
        "refused": dict(reason="r"),
        "status_a": dict(req=1, instance="i", epoch=1, recovering=False, uptime=1.0, world_size=1,
                         num_groups=1, vote_open=False, voters=[],
                         members=[dict(peer_id="a", group=0, state="accepted", host="h", port=1,
                                       ring_pos=0, epoch=1, revision=-1, hb_age=0.1, activity=None, tx=0, rx=0)],
                         bandwidth=[["a", "b", 1e8, 2, 0.5]], optimizing=False),
        "sync_offer": dict(round_hint=0, revision=3, strategy="send_only", tensors=[["w", 8, b"h" * 16]],
                           host="h", port=5, timeout=10.0),
        "sync_done": dict(round=2, ok=False, rx_bytes=0, error="PeerLost", message="m"),
        "sync_plan": dict(round=2, status="fetch", revision=3, sources=[["a", "h", 5]],
                          tensors=[["w", 8, b"h" * 16]], error="", message=""),
        "sync_complete": dict(round=2, status="ok", revision=3, error="", message=""),
    }
    assert set(samples) == set(protocol.SCHEMA)
    for mtype, fields in samples.items():
        out = protocol.decode(protocol.encode(mtype, **fields))
        assert out["type"] == mtype
        for key, value in fields.items():
            assert out[key] == (float(value) if protocol.SCHEMA[mtype][key].kind is float else value)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "undecodable"),
        (b"\xc1", "undecodable"),
        (raw("hello", **good_hello())[:-3], "undecodable"),  # truncated
        (raw("hello", **good_hello()) + b"\x00", "undecodable"),  # trailing bytes
        (msgpack.packb([1, 2, 3]), "must be a map"),
        (raw("nope"), "unknown message type"),
        (raw("hello", v=protocol.VERSION - 1, **good_hello()), "version"),  # the previous version
        (raw("hello", v=3, **good_hello(ts=1.5, proof=b"x" * 32)), "version"),  # v3's hello, proof and all
        (raw("hello", v=protocol.VERSION + 1, **good_hello()), "version"),
        (raw("hello", v=True, **good_hello()), "version"),
        (raw("hello", **good_hello(port="5")), "must be an int"),
        (raw("hello", **good_hello(port=70000)), "above"),
        (raw("hello", **good_hello(group=True)), "must be an int"),
        (raw("hello", **good_hello(claim="boss")), "not one of"),
        (raw("hello", **good_hello(peer_id="x" * 129)), "longer"),
        (raw("hello", **good_hello(timeout=float("nan"))), "finite"),
        (raw("hello", **good_hello(ts=1.5, proof=b"x" * 32)), "unknown fields"),  # v3's proof is gone
        (raw("hello", **good_hello(extra=1)), "unknown fields"),
        (raw("heartbeat", activity=None, epoch=1), "missing field"),
        (raw("heartbeat", activity=None, epoch=-1, revision=0, tx=0, rx=0, calls=[]), "below"),
        (raw("vote", req=2**64 - 1, timeout=1), "above"),
        (raw("vote", req=1, timeout=None), "missing a value"),
        (raw("topology", instance="i", epoch=1, group=0, peers=[["a", "h"]], world_size=1, num_groups=1,
             req=3, reason="", round=1), "must have 3 items"),
        (msgpack.packb({"type": "leave", "v": protocol.VERSION, "reason": "x" * 5000}), "undecodable"),  # over MAX_STR
        (msgpack.packb({"type": "leave", "v": protocol.VERSION, "reason": ["x"] * 9000}), "undecodable"),  # over MAX_ARRAY
        (msgpack.packb({"type": "pong", "v": protocol.VERSION, "nonce": 1, **{f"k{i}": i for i in range(40)}}), "undecodable"),
        (msgpack.packb({"type": "pong", "v": protocol.VERSION, "nonce": msgpack.ExtType(1, b"x")}), "undecodable"),
        (b"\xdb\xff\xff\xff\xff", "undecodable"),  # str32 claiming 4 GiB
        (b"\xdd\xff\xff\xff\xff", "undecodable"),  # array32 claiming 4 G items
        (b"\xdf\xff\xff\xff\xff", "undecodable"),  # map32 claiming 4 G pairs
        (b"\x00" * (protocol.MAX_MESSAGE + 1), "exceeds"),
        (msgpack.packb({1: 2}), "undecodable"),  # non-string map key
    ],
)
def test_bad_input_is_protocol_error(data, words):
    with pytest.raises(ProtocolError) as info:
        protocol.decode(data)
    assert words in str(info.value)


def test_encode_refuses_what_decode_would_refuse():
    with pytest.raises(ProtocolError):
        protocol.encode("vote", req=-1, timeout=0)
    with pytest.raises(ProtocolError):
        protocol.encode("bogus")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    try:
        protocol.decode(data)
    except ProtocolError:
        pass


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=250, deadline=None)
@given(
    st.sampled_from(sorted(protocol.SCHEMA)),
    st.dictionaries(st.sampled_from(["peer_id", "epoch", "req", "reason", "peers", "activity", "ts", "x"]),
                    msgpack_values, max_size=6),
)
def test_fuzz_structured(mtype, fields):
    """Well-formed msgpack with the right type but random fields: validated or refused."""
    try:
        data = msgpack.packb({"type": mtype, "v": protocol.VERSION, **fields}, use_bin_type=True)
    except (OverflowError, ValueError):
        return
    try:
        out = protocol.decode(data)
    except ProtocolError:
        return
    protocol.encode_msg(out)  # whatever passes must also re-encode


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=1, max_size=400), st.integers(0, 399), st.integers(0, 255))
def test_fuzz_mutated_valid_messages(_seed, pos, byte):
    data = bytearray(protocol.encode("hello", **good_hello()))
    data[pos % len(data)] = byte
    for blob in (bytes(data), bytes(data[: pos % len(data)])):
        try:
            protocol.decode(blob)
        except ProtocolError:
            pass
