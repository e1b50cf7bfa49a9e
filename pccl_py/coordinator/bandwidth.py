"""The coordinator's bandwidth matrix, sans I/O.

Peers measure the rate of their data links with short probes and report
``(src, dst, bytes_per_s)``; :class:`BandwidthMatrix` keeps one smoothed rate per
direction (links are asymmetric: an upload and a download differ), tells which pairs still
need a probe (:meth:`~BandwidthMatrix.missing`) and hands the rates to the ring-order
solver (:meth:`~BandwidthMatrix.snapshot`, :func:`pccl_py.coordinator.ring_order.solve`).

Smoothing: each sample moves the stored rate by ``weight`` of the difference (an
exponentially weighted mean; ``weight=1`` keeps the latest sample only). A sample older
than the one stored for its pair (a probe result that arrived late) is ignored. Times are
whatever clock the caller uses; nothing here reads one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from pccl_py.errors import InvalidUsage


@dataclass
class Link:
    """One direction: the smoothed rate, when its last sample was taken, how many."""

    bytes_per_s: float
    at: float
    samples: int


class BandwidthMatrix:
    """Measured rates between peers, one per direction.

    ``weight``: the share of a new sample in the stored rate, in (0, 1]. ``max_age``: a
    rate measured longer ago than this (at the ``now`` given to :meth:`missing`) needs a new
    probe; inf: never."""

    def __init__(self, *, weight: float = 0.5, max_age: float = math.inf) -> None:
        if not 0.0 < weight <= 1.0:
            raise InvalidUsage(f"BandwidthMatrix weight must be in (0, 1], not {weight!r}")
        if not max_age > 0:
            raise InvalidUsage(f"BandwidthMatrix max_age must be > 0, not {max_age!r}")
        self.weight = weight
        self.max_age = max_age
        self._links: dict[str, dict[str, Link]] = {}  # src -> dst -> link

    def __len__(self) -> int:
        return sum(len(row) for row in self._links.values())

    def record(self, src: str, dst: str, bytes_per_s: float, at_time: float) -> bool:
        """A sample of the rate from ``src`` to ``dst`` taken at ``at_time``. Returns False
        (and keeps nothing) when a newer sample of that direction is already stored."""
        if src == dst:
            raise InvalidUsage(f"a bandwidth sample from {src} to itself")
        if not (math.isfinite(bytes_per_s) and bytes_per_s >= 0):
            raise InvalidUsage(f"bandwidth {src} -> {dst} is {bytes_per_s!r}; rates are finite and >= 0")
        if not math.isfinite(at_time):
            raise InvalidUsage(f"bandwidth {src} -> {dst} sampled at {at_time!r}")
        row = self._links.setdefault(src, {})
        link = row.get(dst)
        if link is None:
            row[dst] = Link(float(bytes_per_s), at_time, 1)
            return True
        if at_time < link.at:
            return False
        link.bytes_per_s += self.weight * (bytes_per_s - link.bytes_per_s)
        link.at = at_time
        link.samples += 1
        return True

    def rate(self, src: str, dst: str) -> float | None:
        """The stored rate from ``src`` to ``dst`` (bytes/s), None if never measured."""
        link = self._links.get(src, {}).get(dst)
        return None if link is None else link.bytes_per_s

    def forget(self, peer: str) -> int:
        """Drop every rate to or from ``peer`` (it left the run); returns how many."""
        gone = len(self._links.pop(peer, {}))
        for src in list(self._links):
            row = self._links[src]
            if row.pop(peer, None) is not None:
                gone += 1
            if not row:
                del self._links[src]
        return gone

    def missing(self, peers: Iterable[str], now: float | None = None) -> list[tuple[str, str]]:
        """The ordered pairs among ``peers`` (sorted) that need a probe: never measured, or
        (``now`` given) measured more than ``max_age`` before ``now``."""
        ids = sorted(set(peers))
        out = []
        for a in ids:
            row = self._links.get(a, {})
            for b in ids:
                if a == b:
                    continue
                link = row.get(b)
                if link is None or (now is not None and now - link.at > self.max_age):
                    out.append((a, b))
        return out

    def snapshot(self, peers: Iterable[str]) -> dict[tuple[str, str], float]:
        """The rates among ``peers``, as :func:`~pccl_py.coordinator.ring_order.solve` takes
        them (pairs never measured are left out: the solver counts them as 0)."""
        ids = set(peers)
        return {
            (a, b): link.bytes_per_s
            for a, row in self._links.items() if a in ids
            for b, link in row.items() if b in ids
        }

    def as_dict(self) -> dict[str, dict[str, dict[str, float | int]]]:
        """Everything stored, for a status display: ``{src: {dst: {"bytes_per_s", "at",
        "samples"}}}``, sorted by peer id (plain types: fits msgpack and JSON)."""
        return {
            a: {
                b: {"bytes_per_s": link.bytes_per_s, "at": link.at, "samples": link.samples}
                for b, link in sorted(self._links[a].items())
            }
            for a in sorted(self._links)
        }
