"""Daemon side of ``sync_shared_state()``: hash, offer, serve or fetch, report, return stats.

:func:`daemon_sync` is the whole sync of one peer. It talks to the coordinator through a
:class:`SyncChannel` (two coroutines the daemon provides on top of its ControlChannel):

    send(msg: dict) -> None     sends ``sync_offer`` / ``sync_done`` (election.py has the fields)
    recv() -> dict              the next ``sync_plan`` / ``sync_complete`` addressed to this peer

and moves bytes with its :class:`~pccl_py.daemon.state_transfer.StateServer` and
:func:`~pccl_py.daemon.state_transfer.fetch`. Tests and ``pccl bench sync``
host the coordinator's rules in-process behind the same channel
(:class:`~pccl_py.coordinator.in_process.InProcessSyncHost`).

Steps of one sync:
1. hash the tensors that take part (allow_content_inequality ones are skipped) in the
   executor; publish the views at the offered revision (so the peer can serve as soon as
   any plan reaches anyone); send ``sync_offer``.
2. plan "error": unpublish, raise the named error (RevisionError, InvalidUsage, ...).
   plan "in_sync": keep serving until ``sync_complete``; 0 bytes received.
   plan "fetch": unpublish (this content lost), fetch the listed tensors striped over the
   sources into the tensors' own memory (each source proves the run secret as the peer
   the plan names; the plan came over the authenticated control channel), verify, send
   ``sync_done`` (ok or not), await
   ``sync_complete`` (it comes when every fetcher of the round has reported), then
   return or raise.
3. return {"revision", "status", "tx_bytes", "rx_bytes", "seconds", "hash_seconds",
   "sources_used", "fetch"}; the client sets ``SharedState.revision`` to ``revision``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pccl_py.daemon.state_hash import hash_buffers_async
from pccl_py.daemon.state_transfer import Source, StateServer, fetch
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
    """One peer's ``sync_shared_state()``; ``tensors`` is ``ipc.layout_views(...)``.

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
            done = await _in_sync_complete(channel, rid, plan["revision"], deadline)
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
            # each source must prove itself as the peer the plan names (state_transfer.fetch)
            sources = [Source(pid, h, p) for pid, h, p in plan["sources"]]
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


async def _in_sync_complete(channel: SyncChannel, rid: int, revision: int, deadline: float) -> dict:
    """The ``sync_complete`` of round ``rid``, for a peer in sync at ``revision``. An in-sync
    plan of another round at that revision takes its place: after a coordinator restart the
    resent offer is elected again in a round of the new instance, which knows nothing of
    ``rid`` (the old round's sync_complete was lost with the old coordinator)."""
    while True:
        msg = await _recv(channel, ("sync_complete", "sync_plan"), None, deadline)
        if msg["type"] == "sync_complete" and msg["round"] == rid:
            return msg
        if (msg["type"] == "sync_plan" and msg["status"] == "in_sync" and msg["revision"] == revision
                and msg["round"] != rid):
            rid = msg["round"]


async def _recv(channel: SyncChannel, mtype: str | tuple[str, ...], round_id: int | None, deadline: float) -> dict:
    loop = asyncio.get_running_loop()
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise DeadlineExceeded(f"no {mtype} from the coordinator before the sync deadline")
        try:
            msg = await asyncio.wait_for(channel.recv(), left)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"no {mtype} from the coordinator before the sync deadline") from None
        if msg.get("type") in ((mtype,) if isinstance(mtype, str) else mtype) \
                and (round_id is None or msg.get("round") == round_id):
            return msg
        # anything else (a stale message of an earlier round) is dropped
