"""A peer process for fault-injection tests: one ControlChannel, its state written to a JSON file.

usage: python tests/_peer_proc.py COORDINATOR PEER_ID STATE_FILE [--secret S] [--rejoin] [--vote]

It connects, then (with --vote) admits pending peers whenever asked, and (with
--rejoin) connects again as a new member after being removed. Every topology and
removal rewrites STATE_FILE atomically, so the test can be SIGKILLed/SIGSTOPped at
any point and still read a consistent file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pccl_py.daemon.control import ControlChannel  # noqa: E402
from pccl_py.errors import PcclError  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("coordinator")
    p.add_argument("peer_id")
    p.add_argument("state_file")
    p.add_argument("--secret", default="")
    p.add_argument("--rejoin", action="store_true")
    p.add_argument("--vote", action="store_true")
    args = p.parse_args()
    state = {"pid": os.getpid(), "state": "starting", "events": []}

    def write() -> None:
        tmp = args.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, args.state_file)

    async def on_topology(topo) -> None:
        state.update(state="accepted", epoch=topo.epoch, world_size=topo.world_size,
                     members=[p.peer_id for p in topo.peers], peer_id=link.peer_id)
        state["events"].append(["topology", time.time(), topo.epoch, topo.world_size])
        write()

    removed = asyncio.Event()

    def on_removed(reason: str) -> None:
        state.update(state="removed", reason=reason)
        state["events"].append(["removed", time.time(), reason])
        write()
        removed.set()

    link = ControlChannel(args.coordinator, group=0, data_addr=("127.0.0.1", 1), secret=args.secret.encode(),
                       peer_id=args.peer_id, on_topology=on_topology, on_removed=on_removed)

    async def run() -> None:
        await link.start()
        write()
        while True:
            removed.clear()
            try:
                await link.connect(timeout=30)
            except PcclError as exc:
                state["events"].append(["connect_failed", time.time(), str(exc)])
                write()
                await asyncio.sleep(0.2)
                continue
            while not removed.is_set():
                await asyncio.sleep(0.1)
                if args.vote:
                    try:
                        if await link.are_peers_pending(timeout=2):
                            await link.update_topology(timeout=5)
                    except PcclError as exc:
                        state["events"].append(["vote_failed", time.time(), str(exc)])
            if not args.rejoin:
                await asyncio.sleep(3600)

    import uvloop

    uvloop.run(run())


if __name__ == "__main__":
    main()
