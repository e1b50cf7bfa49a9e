"""The processes of a churn run, and the faults done to them. Every signal goes to a
process this run started, by PID (or to the process group it created for a peer)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def owned_daemon(pid: int, coordinator: str) -> bool:
    """The PID still belongs to a pccl daemon of this run (its command line names the
    daemon module and this run's coordinator), not a process that reused the number."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return b"pccl_py.daemon" in cmd and coordinator.encode() in cmd


class PeerProc:
    """A peer: its trainer (our child, leader of its own process group) and the daemon the
    trainer spawned (in that group)."""

    def __init__(self, ident: int, proc: subprocess.Popen, slot: int | None, coordinator: str) -> None:
        self.id = ident
        self.proc = proc
        self.slot = slot  # namespace slot with --hosts
        self.coordinator = coordinator
        self.buf = b""
        self.daemon_pid: int | None = None
        self.expected_exit = False  # the harness killed it or asked it to leave
        self.exit_seen = False
        self.frozen = False
        os.set_blocking(proc.stdout.fileno(), False)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def lines(self) -> list[bytes]:
        """Complete lines read so far from the trainer's stdout."""
        try:
            chunk = self.proc.stdout.read()
        except (OSError, ValueError):
            chunk = b""
        self.buf += chunk or b""
        *lines, self.buf = self.buf.split(b"\n")
        return lines

    def _group(self, sig: int) -> bool:
        """``sig`` to the trainer's whole group, while the trainer is not reaped (so the
        group id is still ours); False if it is reaped."""
        if self.proc.returncode is not None:
            return False
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def machine(self, sig: int) -> None:
        """``sig`` to daemon and trainer."""
        if not self._group(sig) and self.daemon_pid is not None and owned_daemon(self.daemon_pid, self.coordinator):
            os.kill(self.daemon_pid, sig)

    def trainer(self, sig: int) -> None:
        if self.proc.returncode is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def command(self, line: str) -> None:
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def stop(self) -> None:
        """End it for good (the end of the run)."""
        self.machine(signal.SIGCONT)
        self.machine(signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def wait_listening(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Coordinator:
    """The run's coordinator on a fixed address: started, killed, restarted, frozen."""

    def __init__(self, log: str, hosts=None, address: str | None = None) -> None:
        self.hosts = hosts
        self.log = log
        self.address = hosts.coordinator if hosts is not None else address
        self.proc: subprocess.Popen | None = None
        self.stopped = False

    def start(self, wait: bool) -> None:
        """Start it (``wait``: until it listens)."""
        if self.hosts is not None and wait:
            self.proc = self.hosts.start_coordinator(log=self.log)
            return
        argv = [sys.executable, "-m", "pccl_py.coordinator", "--listen", self.address]
        with open(self.log, "ab") as out:
            if self.hosts is not None:
                self.proc = self.hosts.spawn(None, argv, stdout=out, stderr=out)
            else:
                self.proc = subprocess.Popen(argv, stdout=out, stderr=out)
        if wait:
            host, port = self.address.rsplit(":", 1)
            if not wait_listening(host, int(port), 15.0):
                raise RuntimeError(f"the coordinator does not listen on {self.address} after 15 s (log: {self.log})")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self.stopped = False

    def freeze(self, on: bool) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP if on else signal.SIGCONT)
            self.stopped = on

    def close(self) -> None:
        self.kill()


def set_link(hosts, slot: int, up: bool) -> str | None:
    """Peer slot's link (eth0 in its namespace, which this run created) up or down; None,
    or why it could not."""
    r = subprocess.run(["ip", "-n", hosts.names[slot], "link", "set", "eth0", "up" if up else "down"],
                       capture_output=True, timeout=10)
    return None if r.returncode == 0 else r.stderr.decode(errors="replace").strip()
