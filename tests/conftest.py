"""Shared fixtures: free ports, a coordinator process, loop-error hygiene."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Property tests draw the same cases on every run (a CI run that passes once passes again);
# HYPOTHESIS_PROFILE=explore draws new ones, as does a long fuzz run (PCCL_FUZZ_EXAMPLES).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE",
                                     "explore" if os.environ.get("PCCL_FUZZ_EXAMPLES") else "repeatable"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop_process(p: subprocess.Popen, timeout: float = 5.0) -> None:
    """End a process this test started, by its PID: SIGCONT (if frozen), SIGTERM, then SIGKILL."""
    if p.poll() is not None:
        return
    try:
        os.kill(p.pid, signal.SIGCONT)
        p.terminate()
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout)


class Coordinator:
    def __init__(self, port: int, extra: list[str]) -> None:
        self.port = port
        self.addr = f"127.0.0.1:{port}"
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pccl_py.coordinator", "--listen", self.addr, *self.extra],
            cwd=REPO,
        )
        wait_port(self.port)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


@pytest.fixture
def coordinator():
    c = Coordinator(free_port(), ["--heartbeat-deadline", "2.0", "--recovery-grace", "0.2"])
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(autouse=True)
def _no_loop_errors(caplog):
    """A test fails if asyncio logged an unhandled exception during it."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    yield
    bad = [r for r in caplog.get_records("call") if r.name == "asyncio" and r.levelno >= logging.ERROR]
    if bad:
        pytest.fail("event loop logged errors: " + "; ".join(r.getMessage() for r in bad))
