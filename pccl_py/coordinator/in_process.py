"""The coordinator's shared-state rules hosted in this process, for tests and ``pccl bench sync``.

:class:`InProcessSyncHost` drives the coordinator's own :class:`~pccl_py.coordinator.state_sync.SyncHost`
(no copy of its rules) for one group of fixed members, and hands each peer a channel with
the two coroutines :func:`~pccl_py.daemon.state_sync.daemon_sync` talks through. Messages
pass through the control codec (so the schema checks them) but no socket; no
membership, no heartbeats.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from pccl_py.coordinator.decision import Decision
from pccl_py.coordinator.state_sync import SyncHost
from pccl_py.errors import InvalidUsage
from pccl_py.wire import control

GROUP = 0


class InProcessSyncHost:
    """One group of ``members``; ``channel(peer_id)`` is that peer's end.

    ``known`` is the revision book (settable, as a restarted coordinator rebuilds it);
    ``gone(peer_id)`` reports a death; ``log`` keeps every reason.
    """

    def __init__(self, members: Sequence[str]) -> None:
        self.members = list(members)
        self.host = SyncHost(lambda group: list(self.members))
        self.queues: dict[str, asyncio.Queue] = {p: asyncio.Queue() for p in self.members}
        self.log: list[str] = []

    @property
    def known(self) -> dict[str, int]:
        return self.host.book

    @known.setter
    def known(self, book: dict[str, int]) -> None:
        self.host.book = dict(book)

    def channel(self, peer_id: str) -> _Channel:
        return _Channel(self, peer_id)

    def route(self, peer_id: str, msg: dict) -> None:
        msg = _wire(msg)  # through the codec, as the real coordinator reads it
        now = time.monotonic()
        if msg["type"] == "sync_offer":
            self._emit(self.host.offer(now, GROUP, peer_id, msg))
        elif msg["type"] == "sync_done":
            self._emit(self.host.done(now, GROUP, peer_id, msg))
        else:
            raise InvalidUsage(f"unexpected message {msg['type']!r}")

    def tick(self) -> None:
        self._emit(self.host.tick(time.monotonic()))

    def gone(self, peer_id: str) -> None:
        if peer_id in self.members:
            self.members.remove(peer_id)
        self._emit(self.host.gone(time.monotonic(), GROUP, peer_id))

    def _emit(self, d: Decision) -> None:
        if d.reason:
            self.log.append(d.reason)
        for peer, out in d.out:
            if peer in self.queues:
                self.queues[peer].put_nowait(_wire(out))


def _wire(msg: dict) -> dict:
    """``msg`` encoded and decoded again: what the schema refuses raises ``ProtocolError``."""
    return control.decode(control.encode_msg(msg))


class _Channel:
    def __init__(self, host: InProcessSyncHost, peer_id: str) -> None:
        self.host = host
        self.peer_id = peer_id

    async def send(self, msg: dict) -> None:
        self.host.route(self.peer_id, msg)

    async def recv(self) -> dict:
        return await self.host.queues[self.peer_id].get()
