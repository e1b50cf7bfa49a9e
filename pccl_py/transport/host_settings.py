"""Host settings that decide how TCP behaves on long paths, read once at start so a daemon
can say what to change (it changes nothing itself: these are the host's)."""

from __future__ import annotations

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
