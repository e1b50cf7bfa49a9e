"""What every collective shares: the link it is written against, frames, FIN agreement, errors.

A collective is a plain object driven by the data plane: ``start()`` issues the first
sends, ``on_data(src, header, conn)`` says where an incoming payload goes (an ``Rx``),
and the collective calls ``data_complete()`` once its local result is final. It then
sends FIN to every peer and succeeds only when every peer's FIN has arrived, so a call
never succeeds on one peer while another is still missing data.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from typing import Protocol

from pccl_py.errors import (
    InvalidUsage,
    PcclError,
    ProtocolError,
    peer_failure,
)
from pccl_py.wire import frames as F

# A stream index meaning "whichever of the link's streams is free first": the link keeps
# such frames and hands each to the next stream that has sent what it was given, so a
# stream slowed by a loss or an unfair share carries less instead of holding up the call.
SPREAD = -1


def split(n: int, parts: int) -> list[int]:
    """Boundaries of ``parts`` near-equal pieces of ``n``: piece i is [b[i], b[i+1])."""
    return [i * n // parts for i in range(parts + 1)]


def pieces(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) cut into consecutive pieces of at most ``size`` (size >= 1)."""
    return [(a, min(a + size, stop)) for a in range(start, stop, size)]


class Ranges:
    """Disjoint byte ranges, merged and sorted: the bytes of a region that frames have
    brought (added when a header arrives, not when its payload is in, so two frames in
    flight at once that overlap are caught too), or that were forwarded."""

    __slots__ = ("_lo", "_hi")

    def __init__(self):
        self._lo: list[int] = []  # starts of the ranges, ascending
        self._hi: list[int] = []  # their ends

    def add(self, a: int, b: int) -> bool:
        """Add [a, b) (a < b): False, adding nothing, if it overlaps a range already in."""
        i = bisect_right(self._lo, a)
        if (i and self._hi[i - 1] > a) or (i < len(self._lo) and self._lo[i] < b):
            return False
        # merge with a neighbour that touches it, so a region added stripe by stripe stays short
        if i and self._hi[i - 1] == a:
            i -= 1
            a = self._lo[i]
            del self._lo[i], self._hi[i]
        if i < len(self._lo) and self._lo[i] == b:
            b = self._hi[i]
            del self._lo[i], self._hi[i]
        self._lo.insert(i, a)
        self._hi.insert(i, b)
        return True

    def covers(self, a: int, b: int) -> bool:
        """Whether [a, b) lies inside one range."""
        i = bisect_right(self._lo, a) - 1
        return i >= 0 and self._hi[i] >= b


class Link(Protocol):
    """What a collective needs from the data plane (one group, one epoch)."""

    rank: int
    world: int
    group: int
    epoch: int

    def send(self, rank: int, stream: int, header: bytes, payload) -> None:
        """A frame on stream ``stream`` (modulo the link's count) of the link to ``rank``, or on
        whichever stream is free first (``SPREAD``)."""

    def nstreams(self, rank: int) -> int: ...

    def fail_here(self, op: Collective, exc: PcclError) -> None:
        """Fail ``op`` because of something that happened on this peer, and tell the others."""


class Rx:
    """Where one incoming payload goes: fill ``view``; ``progress(got)`` after each read
    (may be None), ``finish()`` once the whole payload is in. ``reduction`` (may be None)
    describes what ``progress`` computes when it is a plain ``acc (op)= other`` over the
    bytes received (``pair()``, ``done``, ``progress``): an I/O thread then runs it in C
    together with the reads (transport/pump.py)."""

    __slots__ = ("view", "progress", "finish", "reduction")

    def __init__(self, view, progress, finish, reduction=None):
        self.view = view
        self.progress = progress
        self.finish = finish
        self.reduction = reduction


class Collective:
    """Base of every collective: bookkeeping, FIN agreement, failure, byte accounting."""

    name = "collective"
    agree = True  # the FIN round: succeed only once every peer confirmed it has all its data
    # whether one peer's FIN_ALL stands for every peer's FIN: only in a call whose peers send
    # it (``complete_all``); in any other it counts as its sender's FIN alone
    fin_all = False

    def __init__(self, link: Link, *, tag: int, attempt: int, desc: int, loop: asyncio.AbstractEventLoop):
        self.link = link
        self.tag = tag
        self.attempt = attempt
        self.desc = desc
        self.future: asyncio.Future = loop.create_future()
        self.timer: asyncio.TimerHandle | None = None  # the deadline, set by the data plane
        self.started = False
        self.data_done = False
        self._fins: set[int] = set()
        self.tx_bytes = 0
        self.rx_bytes = 0
        self.tx_logical = 0
        self.rx_logical = 0

    # -- to implement ---------------------------------------------------------------------
    def start(self) -> None:
        raise NotImplementedError

    def on_data(self, src: int, h: F.Header, conn) -> Rx:
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.future.done()

    def header(self, kind: int, step: int, offset: int, length: int, elems: int = 0,
               quant: int = F.QUANT_NONE, lo: float = 0.0, scale: float = 0.0) -> bytes:
        lk = self.link
        return F.pack_header(kind, lk.group, lk.epoch, self.tag, self.attempt, step, offset, length,
                             elems, quant, lo, scale, self.desc)

    def send_data(self, rank: int, stream: int, step: int, offset: int, payload, logical: int,
                  elems: int = 0, quant: int = F.QUANT_NONE, lo: float = 0.0, scale: float = 0.0) -> None:
        n = len(payload)
        self.link.send(rank, stream, self.header(F.DATA, step, offset, n, elems, quant, lo, scale), payload)
        self.tx_bytes += F.HEADER_SIZE + n
        self.tx_logical += logical

    def count_rx(self, h: F.Header, logical: int) -> None:
        self.rx_bytes += F.HEADER_SIZE + h.length
        self.rx_logical += logical

    def check_desc(self, src: int, h: F.Header) -> None:
        if h.desc != self.desc:
            raise InvalidUsage(
                f"peer rank {src} called tag {self.tag} with different arguments "
                f"(dtype/op/count/algorithm/quant differ); every peer must call it identically")

    # -- agreement ----------------------------------------------------------------------------
    def data_complete(self) -> None:
        if self.data_done or self.done:
            return
        self.data_done = True
        if not self.agree:
            self.future.set_result(self.result())
            return
        lk = self.link
        for r in range(lk.world):
            if r != lk.rank:
                lk.send(r, 0, self.header(F.FIN, 0, 0, 0), b"")
                self.tx_bytes += F.HEADER_SIZE
        self._maybe_succeed()

    def peer_lost(self, rank: int) -> bool:
        """Peer ``rank``'s link broke while this call runs: True if the call must fail."""
        return self.needs(rank)

    def needs(self, rank: int) -> bool:
        """Whether this call still waits for anything from peer ``rank`` (if that peer is
        lost, the call fails): its FIN, and before that its data."""
        return not (self.data_done and rank in self._fins)

    def complete_all(self) -> None:
        """This peer knows that every peer has all its data (the shared-memory arrival mask): one
        FIN_ALL to each peer stands for the whole FIN round, and this call succeeds."""
        if self.done:
            return
        self.data_done = True
        lk = self.link
        for r in range(lk.world):
            if r != lk.rank:
                lk.send(r, 0, self.header(F.FIN, F.FIN_ALL, 0, 0), b"")
                self.tx_bytes += F.HEADER_SIZE
        self.all_done()

    def all_done(self) -> None:
        """Every peer has all its data: as if every peer's FIN were in."""
        self._fins.update(r for r in range(self.link.world) if r != self.link.rank)
        self._maybe_succeed()

    def on_fin(self, src: int, step: int = 0) -> None:
        """A FIN from ``src``; with step FIN_ALL, in a call that sends them (``fin_all``),
        ``src`` knows every peer has all its data."""
        self.rx_bytes += F.HEADER_SIZE
        if step == F.FIN_ALL and self.fin_all:
            self.all_done()
        else:
            self._fins.add(src)
            self._maybe_succeed()

    def _maybe_succeed(self) -> None:
        if self.data_done and len(self._fins) == self.link.world - 1 and not self.done:
            self.future.set_result(self.result())

    def result(self):
        return None

    def on_error(self, src: int, code: int, message: str) -> None:
        text = f"peer rank {src} failed tag {self.tag}: {message}"
        self.fail(peer_failure(code, text))

    def fail(self, exc: PcclError) -> None:
        if not self.done:
            self.future.set_exception(exc)
            self.future.exception()  # mark retrieved: the caller may already be gone

    def finished(self) -> None:
        """Called once the call has ended, successfully or not, before its caller resumes."""

    def info(self) -> dict:
        return {"tx_bytes": self.tx_bytes, "rx_bytes": self.rx_bytes,
                "tx_logical": self.tx_logical, "rx_logical": self.rx_logical}


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(what)
