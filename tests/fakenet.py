"""Collectives wired together in memory: the ``Link`` of collectives/base.py without sockets.

``FakeNet(world)`` gives each rank a :class:`FakeLink`; every frame a collective sends is
queued per (sender, receiver, stream), in order, as a TCP stream keeps it (a ``SPREAD``
frame on a stream drawn at random), and
:meth:`FakeNet.run` delivers them in a seeded random interleaving across streams, the way
the data plane would: DATA into the ``Rx`` the collective names, filled in pieces of random
size with ``progress`` after each, then ``finish``; FIN to ``on_fin``; ERROR to
``on_error``. ``kill(rank)`` (or ``run(kill=(rank, after))``: after that many deliveries)
drops the rank's queued frames and tells every survivor's collective, as the data plane
does when a link breaks: a collective that still ``needs`` the rank fails with PeerLost
and sends ERROR to the others (who fail with Aborted).
"""

from __future__ import annotations

import asyncio
import collections
import random

from pccl_py.collectives.base import SPREAD
from pccl_py.errors import PeerLost, error_code
from pccl_py.wire import frames as F


class FakeLink:
    """What a collective sees: its rank, the world, and ``send``."""

    def __init__(self, net: FakeNet, rank: int):
        self.net = net
        self.rank = rank
        self.world = net.world
        self.group = 0
        self.epoch = 1
        self.ids = [f"r{i}" for i in range(net.world)]
        self.colocated = False

    def send(self, rank: int, stream: int, header: bytes, payload) -> None:
        if self.rank in self.net.dead or rank in self.net.dead:
            return
        if stream == SPREAD:  # whichever stream is free first: any of them
            stream = self.net.rng.randrange(self.net.streams)
        assert rank != self.rank and 0 <= stream < self.net.streams
        self.net.queues[(self.rank, rank, stream)].append((bytes(header), bytes(payload)))
        self.net.sent += 1

    def nstreams(self, rank: int) -> int:
        return self.net.streams

    def fail_here(self, op, exc) -> None:
        op.fail(exc)


class _Conn:
    """The stream argument of ``on_data``: staging of its own for each frame."""

    @staticmethod
    def staging(n: int) -> memoryview:
        return memoryview(bytearray(n))


class FakeNet:
    def __init__(self, world: int, *, streams: int = 2, seed: int = 0):
        self.world = world
        self.streams = streams
        self.rng = random.Random(seed)
        self.queues: dict[tuple[int, int, int], collections.deque] = collections.defaultdict(collections.deque)
        self.links = [FakeLink(self, r) for r in range(world)]
        self.colls: list = [None] * world
        self.dead: set[int] = set()
        self.sent = 0
        self.delivered = 0
        self.loop = asyncio.new_event_loop()  # for the collectives' futures; never run

    def close(self) -> None:
        self.loop.close()

    def start(self, make) -> list:
        """``make(link)`` builds rank ``link.rank``'s collective; all are started."""
        self.colls = [make(lk) for lk in self.links]
        for c in self.colls:
            c.start()
        return self.colls

    def kill(self, rank: int) -> None:
        self.dead.add(rank)
        for key in [k for k in self.queues if rank in k[:2]]:
            del self.queues[key]
        for r, c in enumerate(self.colls):
            if r not in self.dead and not c.done and c.peer_lost(rank):
                self.fail(r, PeerLost(f"lost peer r{rank}"))

    def fail(self, rank: int, exc) -> None:
        """Rank ``rank``'s call fails here; like the data plane, it tells the others (ERROR)."""
        c = self.colls[rank]
        c.fail(exc)
        frame = F.encode_error(0, 1, c.tag, c.attempt, error_code(exc), str(exc), c.desc)
        for r in range(self.world):
            if r != rank:
                self.links[rank].send(r, 0, frame[:F.HEADER_SIZE], frame[F.HEADER_SIZE:])

    def run(self, *, kill: tuple[int, int] | None = None, limit: int = 1_000_000) -> None:
        """Deliver until nothing is queued (or ``limit`` frames); ``kill=(rank, n)`` kills
        ``rank`` once ``n`` frames have been delivered."""
        while self.delivered < limit:
            if kill is not None and self.delivered >= kill[1] and kill[0] not in self.dead:
                self.kill(kill[0])
            live = [k for k, q in self.queues.items() if q]
            if not live:
                if kill is not None and kill[0] not in self.dead:
                    self.kill(kill[0])
                return
            src, dst, stream = self.rng.choice(live)
            header, payload = self.queues[(src, dst, stream)].popleft()
            self.delivered += 1
            self._deliver(src, dst, header, payload)

    def _deliver(self, src: int, dst: int, header: bytes, payload: bytes) -> None:
        c = self.colls[dst]
        h = F.decode_header(header)
        assert h.length == len(payload)
        if c.done:
            return  # a finished or failed call: the data plane drops its late frames
        if h.kind == F.FIN:
            c.on_fin(src, h.fin)
        elif h.kind == F.ERROR:
            c.on_error(src, h.error_code, F.decode_error_message(payload))
        else:
            rx = c.on_data(src, h, _Conn)
            view = rx.view
            pos = 0
            while pos < len(payload):  # arrives in pieces, as reads from a socket do
                n = self.rng.randint(1, max(1, len(payload) - pos))
                view[pos:pos + n] = payload[pos:pos + n]
                pos += n
                if rx.progress is not None:
                    rx.progress(pos)
            rx.finish()
