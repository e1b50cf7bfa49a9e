"""What unauthenticated connections may cost a listener (pccl_py/transport/limits.py), without sockets."""

from __future__ import annotations

import pytest

from pccl_py.transport.limits import MAX_LINES, REASONS, Gate

pytestmark = pytest.mark.timeout(30)


def test_at_most_max_pending_per_address_and_other_addresses_are_not_affected():
    gate = Gate("srv", max_pending=3, evict_after=1.0)
    assert [gate.admit("a", i, 0.0) for i in range(3)] == [(True, None)] * 3
    assert gate.admit("a", 3, 0.5) == (False, None)  # the others are young: the newcomer goes
    assert gate.pending("a") == 3 and gate.total == {"too_many": 1}
    assert gate.admit("b", "b0", 0.5) == (True, None)  # another address has its own places
    gate.passed(1)  # a handshake completed: its place is free
    assert gate.admit("a", 4, 0.6) == (True, None) and gate.pending("a") == 3


def test_an_idle_connection_gives_its_place_to_a_newcomer():
    gate = Gate("srv", max_pending=2, evict_after=1.0)
    gate.admit("a", "idle1", 0.0)
    gate.admit("a", "idle2", 0.2)
    assert gate.admit("a", "new", 1.1) == (True, "idle1")  # the oldest, pending over 1 s
    assert gate.pending("a") == 2 and gate.total == {"too_many": 1}
    gate.failed("idle1", "closed", 1.2)  # its close afterwards is not counted again
    assert gate.total == {"too_many": 1}
    assert gate.admit("a", "new2", 1.25) == (True, "idle2")
    assert gate.admit("a", "new3", 1.3) == (False, None)  # "new" and "new2" are young


def test_failed_passed_and_dropped_settle_once():
    counted = []
    gate = Gate("srv", count=counted.append)
    gate.admit("a", "c1", 0.0)
    gate.admit("a", "c2", 0.0)
    gate.admit("a", "c3", 0.0)
    gate.failed("c1", "timeout", 5.0)
    gate.failed("c1", "closed", 5.0)  # already settled
    gate.passed("c2")
    gate.failed("c2", "closed", 6.0)  # an authenticated one's end is not a refusal
    gate.dropped("c3")  # closed by the listener itself
    gate.failed("c3", "closed", 6.0)
    assert counted == ["timeout"] and gate.pending("a") == 0
    gate.refuse("a", "full", 7.0)
    assert counted == ["timeout", "full"]
    with pytest.raises(ValueError):
        gate.refuse("a", "no such reason", 7.0)
    gate.admit("a", "c4", 8.0)
    with pytest.raises(ValueError):
        gate.admit("a", "c4", 8.0)
    with pytest.raises(ValueError):
        Gate("srv", max_pending=0)


def test_the_first_refusal_is_told_at_once_then_at_most_once_per_interval():
    gate = Gate("state server", max_pending=8, interval=10.0)
    assert gate.wake_at is None and gate.summary(0.0) == []
    gate.refuse("10.0.0.1", "bad_proof", 100.0)
    assert gate.wake_at == 100.0
    assert gate.summary(100.0) == ["state server: 1 connection from 10.0.0.1 refused in the last 1 s (1 bad proof)"]
    assert gate.wake_at is None
    for i in range(31):
        gate.refuse("127.0.0.1", "timeout", 101.0 + i * 0.1)
    for _ in range(6):
        gate.refuse("127.0.0.1", "bad_proof", 105.0)
    assert gate.wake_at == 110.0
    assert gate.summary(105.0) == [] and gate.summary(109.9) == []
    assert gate.summary(110.0) == [
        "state server: 37 connections from 127.0.0.1 refused in the last 10 s (31 handshake timeout, 6 bad proof)"]
    assert gate.summary(125.0) == [] and gate.wake_at is None
    gate.refuse("127.0.0.1", "malformed", 130.0)
    assert gate.wake_at == 130.0  # the interval since the last summary has passed: at once
    assert gate.summary(130.0) == ["state server: 1 connection from 127.0.0.1 refused in the last 20 s "
                                   "(1 malformed handshake)"]
    assert gate.total == {"timeout": 31, "bad_proof": 7, "malformed": 1}


def test_force_tells_what_waits_and_many_addresses_fit_in_a_few_lines():
    gate = Gate("srv", interval=10.0)
    gate.refuse("a", "timeout", 0.0)
    gate.summary(0.0)
    for i in range(20):
        for _ in range(i + 1):
            gate.refuse(f"10.0.0.{i}", "too_many", 1.0)
    assert gate.summary(2.0) == []
    lines = gate.summary(2.0, force=True)
    assert len(lines) == MAX_LINES + 1
    assert lines[0] == "srv: 20 connections from 10.0.0.19 refused in the last 2 s (20 too many pending)"
    assert lines[-1] == (f"srv: {sum(range(1, 16))} connections from 15 other addresses refused in the last 2 s "
                         f"({sum(range(1, 16))} too many pending)")


def test_every_reason_has_words():
    gate = Gate("srv")
    for reason in REASONS:
        gate.refuse("a", reason, 0.0)
    (line,) = gate.summary(0.0)
    assert all(words in line for words in REASONS.values()) and line.startswith(f"srv: {len(REASONS)} connections")
