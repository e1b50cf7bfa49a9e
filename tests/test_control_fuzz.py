"""Fuzzing the control-plane schema (pccl_py/wire/control.py, SCHEMA and SYNC_SCHEMA):
messages built from the schema table itself, each field well-formed, at or past its
bounds, of another type or missing, go through msgpack and ``decode``. Only ProtocolError
may come out; whatever is accepted conforms to an independent reading of the schema and
re-encodes to itself; a message with every field well-formed is accepted.
``PCCL_FUZZ_EXAMPLES`` scales the case count (tests/fuzzing.py).
"""

from __future__ import annotations

import math

import msgpack
import pytest
from fuzzing import examples, fuzz_settings, timeout_for, values
from hypothesis import assume, given
from hypothesis import strategies as st

from pccl_py.errors import ProtocolError
from pccl_py.wire import control
from pccl_py.wire.control import F

N_ALL = examples(2000)
N_SYNC = examples(1000)


def good(spec: F):
    """Well-formed values of ``spec``."""
    if spec.kind is int:
        lo, hi = int(spec.lo), int(spec.hi)
        return st.sampled_from([lo, hi]) | st.integers(lo, hi)
    if spec.kind is float:
        return st.sampled_from([spec.lo, spec.hi]) | st.floats(spec.lo, spec.hi, allow_nan=False)
    if spec.kind is str:
        if spec.choices:
            return st.sampled_from(spec.choices)
        return st.text(max_size=min(spec.max_len, 8)) | st.just("é" * spec.max_len)
    if spec.kind is bytes:
        return st.binary(max_size=min(spec.max_len, 20)) | st.just(b"\xff" * spec.max_len)
    if spec.kind is bool:
        return st.booleans()
    if spec.kind is list:
        if isinstance(spec.items, tuple):
            return st.tuples(*(good_or_none(s) for s in spec.items)).map(list)
        return st.lists(good_or_none(spec.items), max_size=min(spec.max_len, 3))
    if spec.kind is dict:
        return st.fixed_dictionaries({k: good_or_none(s) for k, s in spec.fields.items()})
    raise AssertionError(spec)


def good_or_none(spec: F):
    return (st.none() | good(spec)) if spec.optional else good(spec)


def bad(spec: F):
    """Values of ``spec``'s kind just past its bounds, and values of other kinds."""
    out = [values]
    if spec.kind is int:
        out.append(st.sampled_from([int(spec.lo) - 1, int(spec.hi) + 1, True, float(spec.lo), str(spec.lo)]))
    elif spec.kind is float:
        out.append(st.sampled_from([spec.lo - 1, spec.hi * 2 + 1, math.nan, math.inf, -math.inf, True, "1"]))
    elif spec.kind in (str, bytes):
        filler = "x" if spec.kind is str else b"x"
        out.append(st.sampled_from([filler * ((spec.max_len or 8) + 1), b"x" if spec.kind is str else "x"]))
        if spec.choices:
            out.append(st.sampled_from([c.upper() for c in spec.choices] + [""]))
    elif spec.kind is list and isinstance(spec.items, tuple):
        out.append(st.tuples(*(good(s) for s in spec.items[:-1])).map(list))  # a short row
        out.append(st.tuples(*(field(s) for s in spec.items)).map(list))  # a row with a bad item
    elif spec.kind is list:
        out.append(st.lists(field(spec.items), min_size=1, max_size=3))
    elif spec.kind is dict:
        out.append(st.fixed_dictionaries({k: field(s) for k, s in spec.fields.items()}))
    return st.one_of(out)


def field(spec: F):
    """Mostly well-formed values of ``spec``, sometimes not (for the inside of rows)."""
    return st.one_of([good_or_none(spec)] * 9 + [bad(spec)])


@st.composite
def messages(draw, schema: dict[str, dict[str, F]]) -> tuple[dict, bool]:
    """(a message map of a type from ``schema``, whether it was built all well-formed)."""
    mtype = draw(st.sampled_from(sorted(schema)))
    clean = True
    msg = {"type": mtype, "v": control.VERSION}
    for key, spec in schema[mtype].items():
        how = draw(st.integers(0, 29))
        if how == 0:
            clean = False  # missing
        elif how == 1:
            msg[key] = draw(bad(spec))
            clean = False
        else:
            msg[key] = draw(good_or_none(spec))  # well-formed all the way down
    if draw(st.integers(0, 19)) == 0:
        msg[draw(st.text(max_size=6))] = draw(values)
        clean = False
    if draw(st.integers(0, 19)) == 0:
        msg["v"] = draw(st.sampled_from([control.VERSION - 1, control.VERSION + 1, None, True, str(control.VERSION)]))
        clean = False
    return msg, clean


def conforms(spec: F, v) -> bool:
    """An independent reading of one field's spec."""
    if v is None:
        return spec.optional
    if spec.kind is float:
        return type(v) in (int, float) and math.isfinite(v) and spec.lo <= v <= spec.hi
    if type(v) is not spec.kind:
        return False
    if spec.kind is int and not spec.lo <= v <= spec.hi:
        return False
    if spec.max_len is not None and len(v) > spec.max_len:
        return False
    if spec.choices is not None and v not in spec.choices:
        return False
    if spec.kind is list and spec.items is not None:
        if isinstance(spec.items, tuple):
            return len(v) == len(spec.items) and all(conforms(s, x) for s, x in zip(spec.items, v, strict=True))
        return all(conforms(spec.items, x) for x in v)
    if spec.kind is dict and spec.fields is not None:
        return set(v) == set(spec.fields) and all(conforms(s, v[k]) for k, s in spec.fields.items())
    return True


def check(msg: dict, clean: bool) -> None:
    try:
        data = msgpack.packb(msg, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        assume(False)
        return
    try:
        out = control.decode(data)
    except ProtocolError as exc:
        assert not clean or len(data) > control.MAX_MESSAGE, f"a well-formed message was refused: {exc}"
        return
    spec = control.SCHEMA[msg["type"]]
    assert set(msg) == set(spec) | {"type", "v"}, "extra or missing fields passed"
    assert type(msg["v"]) is int and msg["v"] == control.VERSION
    for key, f in spec.items():
        assert conforms(f, msg[key]), (key, msg[key])
    assert control.decode(control.encode_msg(out)) == out  # whatever passes re-encodes to itself


@pytest.mark.xfail(strict=True, reason="wire/control.py validate() compares the version with ==, so a float 3.0 "
                   "passes for 3 (harmless: decode returns no 'v'); not fixed here (others own that file)")
def test_a_float_version_is_refused():
    with pytest.raises(ProtocolError, match="version"):
        control.decode(msgpack.packb({"type": "pong", "v": float(control.VERSION), "nonce": 1}))


@pytest.mark.timeout(timeout_for(N_ALL, 0.008))
@fuzz_settings(N_ALL)
@given(messages(control.SCHEMA))
def test_every_control_message_is_validated_or_refused(case):
    check(*case)


@pytest.mark.timeout(timeout_for(N_SYNC, 0.008))
@fuzz_settings(N_SYNC)
@given(messages(control.SYNC_SCHEMA))
def test_every_sync_message_is_validated_or_refused(case):
    check(*case)
