"""Host settings that decide how TCP behaves on long paths, read once at start so a daemon
can say what to change (it changes nothing itself: these are the host's)."""

from __future__ import annotations

import socket
import sys

SLOW_START_AFTER_IDLE = "/proc/sys/net/ipv4/tcp_slow_start_after_idle"


def read_flag(path: str) -> bool | None:
    """A 0/1 sysctl as a bool; None where it cannot be read (not Linux, no /proc)."""
    try:
        with open(path) as f:
            return f.read().strip() != "0"
    except (OSError, ValueError):
        return None


def slow_start_advice(coordinator_is_loopback: bool, path: str = SLOW_START_AFTER_IDLE) -> str | None:
    """What to tell a user whose links leave this host and whose kernel restarts slow start
    on a connection idle for one retransmission timeout: a DiLoCo trainer all-reduces once
    per outer step, after seconds or minutes of compute, so on a long path every exchange
    would start from a small window. None when it does not apply."""
    if coordinator_is_loopback or read_flag(path) is not True:
        return None
    return ("this host restarts TCP slow start on connections idle for one retransmission timeout "
            "(net.ipv4.tcp_slow_start_after_idle=1): on long paths the first all-reduce after a pause "
            "(an outer step after minutes of compute) starts from a small window; set "
            "`sysctl -w net.ipv4.tcp_slow_start_after_idle=0` on every peer's host")


# struct tcp_info (linux/tcp.h): eight one-byte fields, then 32-bit fields of which
# tcpi_rtt, the smoothed round trip in microseconds, is the 16th
_TCPI_RTT_AT = 8 + 15 * 4


def round_trip(sock) -> float | None:
    """The kernel's smoothed round-trip time of a TCP connection, in seconds (TCP_INFO);
    None where there is none (a Unix socket, not Linux, no sample yet)."""
    opt = getattr(socket, "TCP_INFO", None)
    if opt is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, opt, _TCPI_RTT_AT + 8)
    except OSError:
        return None
    if len(raw) < _TCPI_RTT_AT + 4:
        return None
    rtt = int.from_bytes(raw[_TCPI_RTT_AT:_TCPI_RTT_AT + 4], sys.byteorder)
    return rtt / 1e6 if rtt else None
