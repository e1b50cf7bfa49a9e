"""Starting and stopping the private daemon of a ``Client(daemon=None)``.

The daemon runs as ``python -m pccl_py.daemon ... --exit-with-client`` and prints
``READY <ipc path> <peer id>`` once it listens. Its first IPC connection, the client's (it
dials as soon as it reads READY), holds the daemon: when that connection ends, the
daemon leaves the run and exits. Other connections to its socket end nothing.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time
import uuid

from pccl_py.errors import PcclError

START_TIMEOUT = 30.0  # seconds a daemon may take to print READY
STOP_TIMEOUT = 5.0  # seconds a daemon may take to exit once its client left


def spawn_daemon(
    coordinator: str,
    group: int,
    *,
    secret: str | None = None,
    streams: int | None = None,
    listen: str = "127.0.0.1:0",
    log_level: str | None = None,
    shm: bool = True,
    advertise: str | None = None,
    tcp_only: bool = False,
) -> tuple[subprocess.Popen, str]:
    """Start a daemon for one client; returns the process and the path of its Unix socket."""
    path = os.path.join(tempfile.gettempdir(), f"pccl-c{os.getpid()}-{uuid.uuid4().hex[:8]}.sock")
    cmd = [
        sys.executable, "-m", "pccl_py.daemon",
        "--coordinator", coordinator,
        "--group", str(group),
        "--listen", listen,
        "--ipc", path,
        "--exit-with-client",
    ]
    if streams is not None:
        cmd += ["--streams", str(streams)]
    if not shm:
        cmd += ["--no-shm"]
    if tcp_only:
        cmd += ["--tcp-only"]
    if advertise:
        cmd += ["--advertise", advertise]
    if log_level:
        cmd += ["--log-level", log_level]
    env = dict(os.environ)
    if secret is not None:
        env["PCCL_SECRET"] = secret
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], 0.1)
        if r and proc.stdout.readline().startswith(b"READY"):
            return proc, path
        if proc.poll() is not None:
            raise PcclError(f"the daemon exited with code {proc.returncode} while starting")
    proc.kill()
    raise PcclError(f"the daemon did not start within {START_TIMEOUT:.0f} s")


def stop_daemon(proc: subprocess.Popen) -> None:
    """Wait for a daemon whose client left (it exits with it); kill it if it does not."""
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)
    if proc.stdout is not None:
        proc.stdout.close()
