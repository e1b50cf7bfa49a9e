"""A trainer process attached to a running daemon, for tests that kill it.

usage: python tests/_trainer_proc.py IPC_PATH WORLD

It connects the daemon at IPC_PATH to the run, votes until the run has WORLD members,
prints ``JOINED <peer id>`` and then waits to be killed (it exits by itself after 120 s).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pccl_py import Client  # noqa: E402


def main() -> int:
    path, world = sys.argv[1], int(sys.argv[2])
    c = Client(daemon=path, timeout=20.0)
    topo = c.connect()
    deadline = time.monotonic() + 30.0
    while topo["world_size"] < world:
        if time.monotonic() > deadline:
            print(f"ONLY {topo['world_size']}", flush=True)
            return 1
        topo = c.update_topology()
    print(f"JOINED {topo['peer_id']}", flush=True)
    time.sleep(120.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
