"""Decisions of a shared-state transfer, sans-I/O: chunks, the shared queue, failures, verdicts.

:func:`~pccl_py.daemon.state_transfer.fetch` and
:class:`~pccl_py.daemon.state_transfer.StateServer` drive these with what happens on
their connections; nothing here touches a socket, a clock or an event loop.

* :class:`TransferPlan` -- one striped pass. The bytes to move are cut into chunks (by
  tensor name, then offset) held in one queue. A stream (one connection to a source)
  takes the next chunks whenever it has room, so a faster source takes more of them
  (work stealing). A stream that ends gives its unanswered chunks back to the front of
  the queue, in order, for any other stream; if it ended by a failure, the reason is
  recorded against its source (and a source that failed authentication is marked so).
  :meth:`TransferPlan.verdict` says whether the pass moved every byte and, if not, which
  error ends it.
* :class:`Verification` -- after the pass every tensor is hashed; the mismatches decide
  what comes next: refetch them from one source at a time (each source tried once,
  sources that already failed skipped) until one delivers the elected bytes, list the
  sources whose bytes were other, and end with acceptance or :class:`HashMismatch`.
* :func:`refusal` -- what a server refuses to serve, and the text that says why.
"""

from __future__ import annotations

import collections
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pccl_py.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidUsage,
    PcclError,
    PeerLost,
    ProtocolError,
    Unauthenticated,
)
from pccl_py.wire.control import short
from pccl_py.wire.state_transfer import Request

DEFAULT_CHUNK = 4 << 20

# A stream is (source, index): the index-th connection to that source.
Stream = tuple[str, Hashable]


class HashMismatch(ProtocolError):
    """Fetched content does not hash to the elected hash (a corrupt or lying source)."""


class SourceRefused(ProtocolError):
    """A source answered a request with a refusal (wrong revision, unknown tensor)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes [offset, offset + length) of tensor ``name``."""

    name: str
    offset: int
    length: int


def cut(sizes: Mapping[str, int], chunk: int) -> list[Chunk]:
    """Every byte of every tensor in exactly one chunk of at most ``chunk`` bytes; tensors by
    name, offsets ascending. An empty tensor has no chunk."""
    if chunk <= 0:
        raise InvalidUsage("chunk must be positive")
    return [Chunk(name, off, min(chunk, sizes[name] - off))
            for name in sorted(sizes)
            for off in range(0, sizes[name], chunk)]


class TransferPlan:
    """One striped pass over ``sources`` (their labels) of the tensors of ``sizes``.

    Counters: ``total`` bytes to move, ``done_bytes`` moved, ``chunks`` cut, ``inflight``
    chunks asked for and not yet answered, ``retried`` chunks given back to the queue,
    ``per_source`` bytes each source delivered, ``failures`` the last reason each failed
    source gave, ``unauthenticated`` the sources that failed authentication.
    """

    def __init__(self, sizes: Mapping[str, int], chunk: int, sources: Sequence[str]) -> None:
        self.sources = list(sources)
        self.queue: collections.deque[Chunk] = collections.deque(cut(sizes, chunk))
        self.chunks = len(self.queue)
        self.total = sum(sizes.values())
        self.done_bytes = 0
        self.inflight = 0
        self.retried = 0
        self.per_source: dict[str, int] = {s: 0 for s in self.sources} if self.queue else {}
        self.failures: dict[str, str] = {}
        self.unauthenticated: set[str] = set()
        self._held: dict[Stream, collections.deque[Chunk]] = {}

    @property
    def finished(self) -> bool:
        """Every chunk has arrived."""
        return not self.queue and not self.inflight

    def take(self, stream: Stream, room: int) -> list[Chunk]:
        """The next chunks (at most ``room``) for ``stream`` to ask for, oldest first; an empty
        list when the queue is empty (then wait for :attr:`finished` or a chunk given back)."""
        held = self._held.setdefault(stream, collections.deque())
        out: list[Chunk] = []
        while len(out) < room and self.queue:
            out.append(self.queue.popleft())
        held.extend(out)
        self.inflight += len(out)
        return out

    def held(self, stream: Stream) -> list[Chunk]:
        """The chunks ``stream`` asked for and has not yet received, oldest first."""
        return list(self._held.get(stream, ()))

    def landed(self, stream: Stream) -> Chunk:
        """The oldest chunk ``stream`` asked for arrived whole (a stream's answers come in order)."""
        held = self._held.get(stream)
        if not held:
            raise InternalError(f"stream {stream} received a chunk it did not ask for")
        c = held.popleft()
        self.inflight -= 1
        self.done_bytes += c.length
        self.per_source[stream[0]] = self.per_source.get(stream[0], 0) + c.length
        return c

    def release(self, stream: Stream, reason: str | None = None, *, unauthenticated: bool = False) -> int:
        """``stream`` ends: its unanswered chunks go back to the front of the queue, in their
        order, for any stream to take. ``reason``: it ended by this failure of its source
        (``unauthenticated``: the source did not prove itself; it delivered nothing).
        Returns how many chunks went back (wake the waiting streams if any did)."""
        held = self._held.pop(stream, collections.deque())
        if reason is not None:
            self.failures[stream[0]] = reason
        if unauthenticated:
            self.unauthenticated.add(stream[0])
        self.queue.extendleft(reversed(held))
        self.inflight -= len(held)
        self.retried += len(held)
        return len(held)

    def verdict(self, *, timed_out: bool = False, timeout: float = 0.0) -> PcclError | None:
        """After every stream has ended: None if every byte arrived, else the error that ends
        the pass (``timed_out``: the pass ran out of its ``timeout`` seconds)."""
        if self.finished:
            return None
        if not self.sources:
            return PeerLost("no up-to-date peer to fetch the shared state from")
        left = self.total - self.done_bytes
        why = "; ".join(f"{s}: {r}" for s, r in self.failures.items()) or "no reason recorded"
        if timed_out:
            return DeadlineExceeded(
                f"shared-state fetch of {self.total} bytes did not finish within {timeout:g} s "
                f"({left} bytes left; failures: {why})")
        if self.unauthenticated:
            return Unauthenticated(
                f"shared-state sources {sorted(self.unauthenticated)} failed authentication and no other "
                f"source delivered the state ({left} of {self.total} bytes left: {why}); nothing they sent "
                "was used. Check that every daemon runs with the run's secret")
        return PeerLost(f"every state source failed with {left} of {self.total} bytes left: {why}; "
                        "retry sync_shared_state")


class Mismatch(NamedTuple):
    """A fetched tensor whose digest is not the elected one."""

    name: str
    expected: bytes
    got: bytes


class Verification:
    """The hash verdict on the content ``plan`` fetched, and the repair before it.

    ``mismatches``: the tensors whose digest differs after the pass. With ``repair`` and
    more than one source, :meth:`next_source` names the sources to refetch
    :attr:`wanted` from, one whole source at a time, until one delivers the elected
    bytes; report each attempt with :meth:`refetch_failed` or :meth:`refetched`. Then
    :meth:`verdict`. Tallies (``rx_bytes``, ``chunks``, ``retried``, ``per_source``,
    ``failures``, ``rejected``) cover every pass.
    """

    def __init__(self, plan: TransferPlan, mismatches: Sequence[Mismatch], repair: bool = True) -> None:
        self.bad = list(mismatches)
        self.rx_bytes = plan.done_bytes
        self.chunks = plan.chunks
        self.retried = plan.retried
        self.per_source = dict(plan.per_source)
        self.failures = dict(plan.failures)
        self.rejected: dict[str, str] = {}
        tries = plan.sources if self.bad and repair and len(plan.sources) > 1 else []
        self._tries = collections.deque(tries)

    @property
    def wanted(self) -> list[str]:
        """Names of the tensors a repair refetches."""
        return [m.name for m in self.bad]

    def next_source(self) -> str | None:
        """The source to refetch :attr:`wanted` from next, alone; None when there is nothing
        to repair or no source left to try."""
        if not self.bad:
            return None
        while self._tries:
            source = self._tries.popleft()
            if source not in self.failures:
                return source
        return None

    def refetch_failed(self, source: str, reason: str) -> None:
        self.failures[source] = reason

    def refetched(self, source: str, plan: TransferPlan, still: Sequence[Mismatch]) -> bool:
        """``source`` alone moved :attr:`wanted` again in ``plan``; ``still``: those that still
        mismatch. True: the content is now the elected one (no more repair)."""
        self.rx_bytes += plan.done_bytes
        self.chunks += plan.chunks
        self.per_source[source] = self.per_source.get(source, 0) + plan.done_bytes
        if not still:
            self.bad = []
            return True
        self.rejected[source] = "delivered " + ", ".join(f"{m.name!r} hashing to {short(m.got)}" for m in still[:4])
        return False

    @property
    def sources_used(self) -> int:
        return sum(1 for b in self.per_source.values() if b)

    def verdict(self) -> HashMismatch | None:
        """None: the content is accepted. Else the error naming (up to four of) the tensors
        that mismatched after the striped pass, both digests, and the sources used."""
        if not self.bad:
            return None
        used = [s for s, b in self.per_source.items() if b]
        return HashMismatch(
            "fetched shared state does not match the elected hashes: "
            + ", ".join(f"{m.name!r} expected {short(m.expected)} got {short(m.got)}" for m in self.bad[:4])
            + f" (sources {used}); the state was not accepted, retry sync_shared_state")


def refusal(server_id: str, published: int | None, names: Collection[str], req: Request) -> str | None:
    """None if a server publishing ``names`` at revision ``published`` (None: nothing) serves
    ``req`` (its range is checked apart, by ``check_range``); else the refusal text."""
    if published is not None and req.revision == published and req.name in names:
        return None
    if published is None:
        why = "it serves no shared state right now"
    elif req.revision != published:
        why = f"it serves revision {published}"
    else:
        why = f"it has no tensor of that name (it serves {len(names)} tensors)"
    return f"{server_id} cannot serve {req.name!r} at revision {req.revision}: {why}"
