"""ControlChannel.sync_channel() against an in-process coordinator (uvloop, 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest
import uvloop

from pccl_py.coordinator.membership import MembershipConfig
from pccl_py.coordinator.server import serve
from pccl_py.daemon.control import ControlChannel
from pccl_py.errors import CoordinatorUnavailable, RevisionError

pytestmark = pytest.mark.timeout(40)

ROW = ["w", 4, b"\x07" * 16]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offer(revision: int, timeout: float = 5.0) -> dict:
    return {"type": "sync_offer", "round_hint": 0, "revision": revision, "strategy": "enforce_popular",
            "tensors": [ROW], "host": "127.0.0.1", "port": 1, "timeout": timeout}


class Coord:
    """A coordinator task that can be stopped and started again on the same port."""

    def __init__(self, cfg: MembershipConfig) -> None:
        self.addr = f"127.0.0.1:{free_port()}"
        self.cfg = cfg
        self.stop_ev: asyncio.Event | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        for _ in range(50):  # zmq releases a closed socket's port asynchronously: retry the bind
            self.stop_ev = asyncio.Event()
            ready = asyncio.get_running_loop().create_future()
            self.task = asyncio.ensure_future(serve(self.addr, config=self.cfg, stop=self.stop_ev,
                                                    ready=lambda a, f=ready: f.set_result(a)))
            await asyncio.wait([ready, self.task], timeout=10, return_when=asyncio.FIRST_COMPLETED)
            if ready.done():
                return
            with contextlib.suppress(Exception):
                self.task.result()
            await asyncio.sleep(0.1)
        raise AssertionError(f"coordinator could not listen on {self.addr}")

    async def stop(self) -> None:
        if self.task is not None:
            self.stop_ev.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 10)
            self.task = None


async def recv(chan, timeout: float = 5.0) -> dict:
    return await asyncio.wait_for(chan.recv(), timeout)


def test_channel_round_trip_stale_plans_dropped_and_not_connected():
    async def body():
        coord = Coord(MembershipConfig(recovery_grace=0.0))
        await coord.start()
        link = ControlChannel(coord.addr, group=0, data_addr=("127.0.0.1", 1), heartbeat_interval=0.1)
        await link.start()
        try:
            chan = link.sync_channel()
            with pytest.raises(CoordinatorUnavailable):
                await chan.send(offer(0))  # not registered yet
            await link.connect(10)
            # a plan left over from an abandoned sync must not answer the next one
            link._sync_q.put_nowait({"type": "sync_plan", "round": 999, "status": "error", "revision": -1,
                                     "sources": [], "tensors": [], "error": "DeadlineExceeded",
                                     "message": "stale"})
            await chan.send(offer(0))
            plan = await recv(chan)
            assert plan["type"] == "sync_plan" and plan["status"] == "in_sync" and plan["round"] != 999
            done = await recv(chan)
            assert done["type"] == "sync_complete" and done["status"] == "ok" and done["revision"] == 0
            await chan.send(offer(3))  # revision rule enforced by the coordinator
            plan = await recv(chan)
            assert plan["status"] == "error" and plan["error"] == "RevisionError"
            assert "expected revision 1" in plan["message"]
        finally:
            await link.close()
            await coord.stop()

    uvloop.run(body())


def test_restarted_coordinator_rebuilds_revision_book_from_reintroduction():
    async def body():
        coord = Coord(MembershipConfig(recovery_grace=0.6, heartbeat_interval=0.1))
        await coord.start()
        link = ControlChannel(coord.addr, group=0, data_addr=("127.0.0.1", 1), heartbeat_interval=0.1,
                           coordinator_timeout=1.0)
        await link.start()
        try:
            await asyncio.sleep(0.7)  # past the first instance's recovery window
            await link.connect(10)
            chan = link.sync_channel()
            await chan.send(offer(4))
            assert (await recv(chan))["status"] == "in_sync"
            assert (await recv(chan))["revision"] == 4
            link.set_revision(4)  # as the daemon does after a successful sync
            epoch = link.topology.epoch
            await coord.stop()
            await coord.start()
            for _ in range(100):  # re-introduced and rebuilt: a new epoch
                if link.topology is not None and link.topology.epoch > epoch and link.state == "accepted":
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("no new epoch after the coordinator restart")
            await chan.send(offer(7))
            plan = await recv(chan)
            assert plan["status"] == "error"
            err = RevisionError(plan["message"])
            assert "expected revision 5" in str(err) and "offered 7" in str(err)
            await chan.send(offer(5))
            assert (await recv(chan))["status"] == "in_sync"
        finally:
            await link.close()
            await coord.stop()

    uvloop.run(body())
