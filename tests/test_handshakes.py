"""The coordinator's ledger of rejected control connections (pccl_py.coordinator.handshakes), without sockets."""

from __future__ import annotations

import re

import pytest

from pccl_py.coordinator.handshakes import SHOWN_SOURCES, Handshakes

pytestmark = pytest.mark.timeout(30)


def reject(h: Handshakes, now: float, fd: int, ip: str, reason: str | None) -> str | None:
    """One connection from ``ip`` that fails its handshake (``reason``; None: closes without
    any handshake event, as bytes that are not ZMTP do)."""
    h.accepted(fd, ip)
    if reason is not None:
        h.failed(reason)
    return h.disconnected(now, fd)


def test_a_failure_is_the_next_disconnections_and_a_connection_that_talked_is_not_rejected():
    h = Handshakes()
    h.accepted(7, "10.0.0.1")
    h.accepted(8, "10.0.0.2")
    h.succeeded()
    h.talked(8)
    h.failed("wrong_secret")
    assert h.disconnected(0.0, 7) == "wrong_secret"
    assert h.disconnected(0.1, 8) is None  # a member that went away: not a rejection
    assert h.total["wrong_secret"] == 1 and h.rejected == 1


def test_a_silent_close_is_rejected_unless_a_handshake_that_succeeded_is_unaccounted_for():
    h = Handshakes()
    assert reject(h, 0.0, 5, "10.0.0.9", None) == "malformed"  # GET / HTTP/1.0 and the like
    h.accepted(5, "127.0.0.1")
    h.succeeded()  # completed the handshake, left without a word (a daemon that never connected)
    assert h.disconnected(0.1, 5) is None
    assert reject(h, 0.2, 5, "10.0.0.9", None) == "malformed"  # that success was used up
    assert h.total["malformed"] == 2


def test_messages_that_overtake_their_acceptance_still_count_as_talk():
    h = Handshakes()
    h.talked(9)  # the frames were pumped before the monitor's event
    h.accepted(9, "127.0.0.1")
    h.succeeded()
    assert h.disconnected(0.0, 9) is None
    assert reject(h, 0.1, 9, "127.0.0.1", None) == "malformed"  # nothing left unaccounted
    assert h.rejected == 1


def test_a_connection_gone_before_its_address_was_read_is_from_an_unknown_address():
    h = Handshakes(every=10.0)
    reject(h, 0.0, 3, "", "no_curve")
    assert "from an unknown address" in h.summary(0.05)


def test_the_log_gets_one_line_per_window_never_one_per_connection():
    h = Handshakes(every=10.0)
    for i in range(3):
        reject(h, 0.0, 10 + i, "10.0.0.1", "wrong_secret")
    line = h.summary(0.05)  # the first one at once
    assert line.startswith("3 connections from 10.0.0.1 failed authentication within a second (wrong_secret 3)")
    for i in range(495):  # one dialing every 20 ms with the wrong secret, for 10 s
        reject(h, 0.1 + i * 0.02, 100, "10.0.0.1", "wrong_secret")
        assert h.summary(0.1 + i * 0.02) is None
    assert h.summary(10.0) is None  # ten seconds after the last line, not before
    line = h.summary(10.05)
    assert re.match(r"495 connections from 10\.0\.0\.1 failed authentication in the last 10 s \(wrong_secret 495\)",
                    line), line
    assert h.summary(30.0) is None  # nothing new: nothing to say
    assert h.total["wrong_secret"] == 498


def test_several_sources_share_one_line_with_the_busiest_first():
    h = Handshakes(every=1.0)
    fd = 0
    for n, ip in enumerate(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.0.7"]):
        for _ in range(n + 1):
            fd += 1
            reject(h, 0.0, fd, ip, "no_curve" if n % 2 else "malformed")
    line = h.summary(0.5)
    assert line.startswith("28 connections failed authentication within a second: 7 from 10.0.0.7 (malformed 7), "
                           "6 from 10.0.0.6 (no_curve 6)"), line
    assert line.count(" from 10.0.0.") == SHOWN_SOURCES and "3 from 2 other addresses" in line


def test_a_client_that_hangs_up_mid_handshake_is_counted_but_not_logged():
    h = Handshakes(every=1.0)
    assert reject(h, 0.0, 4, "127.0.0.1", "incomplete") == "incomplete"  # a port probe, a health check
    assert h.summary(5.0) is None and h.total["incomplete"] == 1


def test_memory_is_bounded_by_connections_and_sources():
    h = Handshakes(every=1.0, max_conns=10, max_sources=3)
    for fd in range(100):
        h.accepted(fd, f"10.0.{fd}.1")
    assert len(h._conns) == 10
    for fd in range(20):
        reject(h, 0.0, 1000 + fd, f"10.1.{fd}.1", "denied")
    assert len(h._window) == 4  # three addresses and "other addresses"
    assert "17 from other addresses" in h.summary(0.0)
