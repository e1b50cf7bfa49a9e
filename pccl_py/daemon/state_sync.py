"""Daemon side of ``sync_shared_state()``: hash, offer, serve or fetch, report, return stats.

:func:`daemon_sync` is the whole sync of one peer. It talks to the coordinator through a
:class:`SyncChannel` (two coroutines the daemon provides on top of its ControlChannel):

    send(msg: dict) -> None     sends ``sync_offer`` / ``sync_done`` (election.py has the fields)
    recv() -> dict              the next ``sync_plan`` / ``sync_complete`` addressed to this peer

and moves bytes with its :class:`~pccl_py.daemon.state_transfer.StateServer` and
:func:`~pccl_py.daemon.state_transfer.fetch`. :class:`LocalCoordinator` hosts a
:class:`~pccl_py.coordinator.election.SyncRound` in-process behind the same channel; tests and
``pccl bench sync`` use it, and it is the reference for wiring the real coordinator
(each ``_route`` line below is what the coordinator does with a message).

Steps of one sync:
1. hash the tensors that take part (allow_content_inequality ones are skipped) in the
   executor; publish the views at the offered revision (so the peer can serve as soon as
   any plan reaches anyone); send ``sync_offer``.
2. plan "error": unpublish, raise the named error (RevisionError, InvalidUsage, ...).
   plan "in_sync": keep serving until ``sync_complete``; 0 bytes received.
   plan "fetch": unpublish (this content lost), fetch the listed tensors striped over the
   sources into the tensors' own memory, verify, send ``sync_done`` (ok or not), await
   ``sync_complete`` (it comes when every fetcher of the round has reported), then
   return or raise.
3. return {"revision", "status", "tx_bytes", "rx_bytes", "seconds", "hash_seconds",
   "sources_used", "fetch"}; the client sets ``SharedState.revision`` to ``revision``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pccl_py.coordinator.election import SyncRound
from pccl_py.daemon.state_hash import hash_buffers_async
from pccl_py.daemon.state_transfer import StateServer, fetch
from pccl_py.errors import DeadlineExceeded, InvalidUsage, PcclError, from_wire, to_wire


class SyncChannel(Protocol):
    async def send(self, msg: dict) -> None: ...

    async def recv(self) -> dict: ...


async def daemon_sync(
    tensors: Sequence[tuple[str, memoryview, bool]],
    *,
    revision: int,
    channel: SyncChannel,
    server: StateServer,
    peer_id: str,
    secret: bytes = b"",
    strategy: str = "enforce_popular",
    timeout: float = 60.0,
    progress: Callable[[int, int], None] | None = None,
    fetch_options: dict[str, Any] | None = None,
    advertise: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """One peer's ``sync_shared_state()``; ``tensors`` is ``shared_state.layout_views(...)``.

    ``advertise``: the (host, port) other peers reach ``server`` at, when it differs from
    the bound address (a server bound to 0.0.0.0: give the data-plane host the daemon
    registered with). Other keyword arguments: see the module docstring and ``fetch``.
    """
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    deadline = t0 + timeout
    views = {n: v for n, v, _ in tensors}
    compared = {n: v for n, v, unequal in tensors if not unequal}
    hashes = await hash_buffers_async(compared)
    hash_seconds = loop.time() - t0
    if strategy != "receive_only":  # a receive_only peer is never a source
        server.publish(revision, compared)
    try:
        await channel.send({
            "type": "sync_offer", "round_hint": 0, "revision": revision, "strategy": strategy,
            "tensors": [[n, len(v), hashes[n]] for n, v in compared.items()],
            "host": (advertise or server.address)[0], "port": (advertise or server.address)[1],
            "timeout": float(timeout),
        })
        plan = await _recv(channel, "sync_plan", None, deadline)
        rid = plan["round"]
        if plan["status"] == "error":
            raise from_wire(plan)
        if plan["status"] == "in_sync":
            done = await _recv(channel, "sync_complete", rid, deadline)
            tx = server.tx_bytes
            if done["status"] != "ok":
                raise from_wire(done)
            return _stats("in_sync", plan["revision"], tx, 0, loop.time() - t0, hash_seconds, None)
        # fetch: our copy is outdated, stop serving it
        server.unpublish()
        try:
            want: dict[str, tuple[memoryview, bytes]] = {}
            for name, nbytes, digest in plan["tensors"]:
                view = views.get(name)
                if view is None or len(view) != nbytes:
                    raise InvalidUsage(f"elected tensor {name!r} ({nbytes} bytes) does not match the local layout")
                want[name] = (view, bytes(digest))
            sources = [(h, p) for _, h, p in plan["sources"]]
            st = await fetch(sources, want, secret=secret, peer_id=peer_id, revision=plan["revision"],
                             timeout=max(0.001, deadline - loop.time()), progress=progress,
                             **(fetch_options or {}))
        except PcclError as exc:
            # report, then end with the round like everyone else (so a retry is the next round)
            await channel.send({"type": "sync_done", "round": rid, "ok": False, "rx_bytes": 0, **to_wire(exc)})
            try:
                await _recv(channel, "sync_complete", rid, deadline + 1.0)
            except DeadlineExceeded:
                pass
            raise
        await channel.send({"type": "sync_done", "round": rid, "ok": True, "rx_bytes": st["rx_bytes"],
                            "error": "", "message": ""})
        done = await _recv(channel, "sync_complete", rid, deadline)
        if done["status"] != "ok":
            raise from_wire(done)
        return _stats("fetched", plan["revision"], 0, st["rx_bytes"], loop.time() - t0, hash_seconds, st)
    finally:
        server.unpublish()


def _stats(status, revision, tx, rx, seconds, hash_seconds, st) -> dict[str, Any]:
    return {
        "status": status,
        "revision": revision,
        "tx_bytes": tx,
        "rx_bytes": rx,
        "seconds": seconds,
        "hash_seconds": hash_seconds,
        "sources_used": st["sources_used"] if st else 0,
        "fetch": st,
    }


async def _recv(channel: SyncChannel, mtype: str, round_id: int | None, deadline: float) -> dict:
    loop = asyncio.get_running_loop()
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise DeadlineExceeded(f"no {mtype} from the coordinator before the sync deadline")
        try:
            msg = await asyncio.wait_for(channel.recv(), left)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"no {mtype} from the coordinator before the sync deadline") from None
        if msg.get("type") == mtype and (round_id is None or msg.get("round") == round_id):
            return msg
        # anything else (a stale message of an earlier round) is dropped


class LocalCoordinator:
    """In-process stand-in for the coordinator's shared-state part: one SyncRound at a time.

    ``channel(peer_id)`` gives the peer's :class:`SyncChannel`; ``gone(peer_id)`` reports a
    death; ``known`` is the coordinator's revision book; ``log`` keeps the reasons.
    """

    def __init__(self, members: Sequence[str], *, timeout: float = 30.0) -> None:
        self.members = list(members)
        self.timeout = timeout
        self.known: dict[str, int] = {}
        self.round: SyncRound | None = None
        self.rounds = 0
        self.queues: dict[str, asyncio.Queue] = {p: asyncio.Queue() for p in self.members}
        self.held: list[tuple[str, dict]] = []  # offers for the next round
        self.log: list[str] = []

    def channel(self, peer_id: str) -> _LocalChannel:
        return _LocalChannel(self, peer_id)

    def _now(self) -> float:
        return time.monotonic()

    def _route(self, peer_id: str, msg: dict) -> None:
        now = self._now()
        if msg["type"] == "sync_offer" and self.round is not None and self.round.phase == "transferring":
            self.held.append((peer_id, msg))  # belongs to the next round
            return
        if msg["type"] == "sync_offer" and (self.round is None or self.round.done):
            self.round = SyncRound(self.members, now, self.timeout, known=dict(self.known), round_id=self.rounds)
            self.rounds += 1
        r = self.round
        if r is None:
            return
        if msg["type"] == "sync_offer":
            d = r.offer(now, peer_id, msg["revision"], msg["tensors"], msg["strategy"], (msg["host"], msg["port"]))
        elif msg["type"] == "sync_done":
            d = r.transfer_done(now, peer_id, msg["ok"], msg["error"], msg["message"], round_id=msg["round"])
        else:
            raise InvalidUsage(f"unexpected message {msg['type']!r}")
        self._emit(d)

    def _emit(self, d) -> None:
        if d.reason:
            self.log.append(d.reason)
        for peer, out in d.out:
            if peer in self.queues:
                self.queues[peer].put_nowait(out)
        if self.round is not None and self.round.done:
            self.known.update(self.round.synced)
            held, self.held = self.held, []
            for peer, msg in held:
                self._route(peer, msg)

    def tick(self) -> None:
        if self.round is not None and not self.round.done:
            self._emit(self.round.tick(self._now()))

    def gone(self, peer_id: str) -> None:
        if peer_id in self.members:
            self.members.remove(peer_id)
        self.known.pop(peer_id, None)
        if self.round is not None and not self.round.done:
            self._emit(self.round.member_gone(self._now(), peer_id))


class _LocalChannel:
    def __init__(self, coord: LocalCoordinator, peer_id: str) -> None:
        self.coord = coord
        self.peer_id = peer_id

    async def send(self, msg: dict) -> None:
        self.coord._route(self.peer_id, msg)

    async def recv(self) -> dict:
        return await self.coord.queues[self.peer_id].get()
