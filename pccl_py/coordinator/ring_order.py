"""Ring order: the cyclic order of a group's peers that moves data fastest, sans I/O.

A ring all-reduce sends every byte over every link ``a -> next(a)`` of the ring, in
lockstep, so its speed is that of its slowest directed link. :func:`solve` takes the
measured bandwidths (asymmetric: ``bw[(a, b)]`` is the rate from ``a`` to ``b``) and
returns the ring that maximises, in this order:

1. the bottleneck: the slowest link ``a -> next(a)`` of the ring;
2. the total: the sum of the ring's link bandwidths (among rings of the best
   bottleneck, the one whose other links are fastest).

Rules:

* A pair with no measurement (no key, or NaN) counts as bandwidth 0: a link never
  measured is assumed to be the worst, so a ring over measured links is preferred, and a
  coordinator measures first (``BandwidthMatrix.missing``). Negative or infinite values
  are refused (``InvalidUsage``).
* Bandwidths are compared at a resolution of 2**-40 of the largest one (each is rounded
  to an integer multiple of that step, so sums are exact and ties are real ties); the
  bottleneck and total reported are those of the original values on the returned ring.
* Up to :data:`EXACT_MAX` peers the answer is exact (``optimal=True``): the bottleneck by
  binary search over the distinct bandwidths, each step a Held-Karp dynamic programme
  over subsets (vectorised with numpy) that finds the largest total among rings whose
  links are all at least that fast; of the optimal rings, the lexicographically smallest
  is returned.
* Above it, a heuristic (:mod:`pccl_py.coordinator.ring_search`) runs within
  ``budget_s``. From a greedy ring (always the fastest link to a peer not yet in it) it
  binary-searches the bottleneck over the rates between that ring's bottleneck and the
  bound: each threshold is tried by a depth-first search for a ring over faster links,
  then by iterated local search that removes the slower links one by one; the total is
  then raised at the best bottleneck found, by iterated local search and a final polish of
  short windows. It draws from ``random.Random(seed)`` and stops after fixed amounts of
  work, so the same input and seed give the same ring unless the clock cut the search
  short (``Solution.timed_out``).
* Determinism: peers are handled in sorted order of their ids, so the order of the
  ``peers`` argument does not matter, and every ring starts at the smallest id.

:func:`propose` says whether a coordinator should leave its current ring for the solver's
(only for a clearly better bottleneck: a new ring costs an epoch).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pccl_py.coordinator.ring_search import Heuristic, bottleneck_of, distinct
from pccl_py.errors import InvalidUsage

EXACT_MAX = 12  # up to this many peers the ring is proven optimal
_BITS = 40  # resolution of the comparison: 2**-_BITS of the largest bandwidth
_NEG = -(1 << 60)  # "no such path" in the dynamic programme
_HALF = _NEG // 2  # anything below is no path (a sum of valid links is far above)


@dataclass(frozen=True)
class Solution:
    """A ring and its score.

    ``ring``: peer ids in ring order, starting at the smallest id; each sends to the next
    and the last to the first. ``bottleneck``: its slowest link (inf for one peer);
    ``total``: the sum of its links. ``optimal``: proven best for the objective.
    ``bound``: no ring's bottleneck exceeds it (equal to ``bottleneck`` when that is
    proven). ``timed_out``: the heuristic stopped at ``budget_s`` before its planned work.
    ``reason``: one line for the log."""

    ring: tuple[str, ...]
    bottleneck: float
    total: float
    optimal: bool
    bound: float
    timed_out: bool
    reason: str


Bandwidths = Mapping[tuple[str, str], float] | Sequence[Sequence[float]] | np.ndarray


def solve(
    bw: Bandwidths,
    peers: Sequence[str],
    *,
    budget_s: float = 0.5,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> Solution:
    """The best ring over ``peers`` for the bandwidths ``bw`` (see the module's rules).

    ``bw`` is a mapping ``(src, dst) -> rate`` (keys naming other peers are ignored) or a
    square matrix whose rows and columns follow ``peers`` as given. ``budget_s`` bounds
    the heuristic above :data:`EXACT_MAX` peers (the exact solver takes a few tens of ms);
    ``clock`` is what it reads to keep that budget."""
    start = clock()
    ids, m = matrix(bw, peers)
    n = len(ids)
    if n == 1:
        return Solution((ids[0],), math.inf, 0.0, True, math.inf, False, "one peer")
    q = _quantize(m)
    bound = _upper_bound(q)
    if n <= EXACT_MAX:
        order, steps = _exact(q, bound)
        optimal, timed_out = True, False
        how = f"exact over {n} peers ({steps} Held-Karp passes)"
    else:
        rng = random.Random(seed)
        order, timed_out, how = Heuristic(q, bound, budget_s, start + budget_s, clock, rng).run()
        optimal = False
    ring = tuple(ids[i] for i in order)
    bottleneck, total = _score(m, order)
    top = bottleneck if optimal or bottleneck_of(q, order) == bound else float(_upper_bound(m))
    took = clock() - start
    reason = (f"ring order: bottleneck {bottleneck:.4g}, total {total:.4g}"
              f"{'' if top == bottleneck else f', bound {top:.4g}'}; {how}; {took * 1e3:.0f} ms")
    return Solution(ring, bottleneck, total, optimal, top, timed_out, reason)


def score(bw: Bandwidths, ring: Sequence[str]) -> tuple[float, float]:
    """``(bottleneck, total)`` of ``ring`` (in its order) under :func:`solve`'s rules: how a
    coordinator compares the current ring with a proposed one."""
    ids, m = matrix(bw, ring)
    index = {p: i for i, p in enumerate(ids)}
    if len(ring) == 1:
        return math.inf, 0.0
    return _score(m, [index[p] for p in ring])


def propose(
    bw: Bandwidths,
    current: Sequence[str],
    *,
    min_gain: float = 0.1,
    budget_s: float = 0.5,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[tuple[str, ...] | None, str]:
    """Whether to leave the ring ``current`` (in its order) for :func:`solve`'s ring: that
    ring, or None to keep ``current``, and why (one line for the log).

    A new ring costs a new epoch (every call in flight restarts) and measured rates are
    noisy, so it is proposed only when its bottleneck beats the current one by more than
    ``min_gain`` of it (any gain over a bottleneck of 0); a better total alone never moves
    the ring."""
    if len(current) < 3:
        return None, f"ring of {len(current)} peers: one order only"
    now_b, _ = score(bw, current)
    sol = solve(bw, current, budget_s=budget_s, seed=seed, clock=clock)
    start = list(current).index(sol.ring[0])
    if tuple(current[start:]) + tuple(current[:start]) == sol.ring:
        return None, f"current ring is the best found (bottleneck {now_b:.4g}); {sol.reason}"
    gain = sol.bottleneck > (now_b * (1.0 + min_gain) if now_b > 0 else 0.0)
    if gain:
        return sol.ring, f"bottleneck {now_b:.4g} -> {sol.bottleneck:.4g}; {sol.reason}"
    return None, (f"kept: bottleneck {now_b:.4g}, best found {sol.bottleneck:.4g} "
                  f"(a move needs more than {min_gain:.0%} more); {sol.reason}")


def matrix(bw: Bandwidths, peers: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The sorted peer ids and the float matrix over them: missing pairs 0, diagonal 0."""
    ids = sorted(peers)
    n = len(ids)
    if n == 0:
        raise InvalidUsage("ring order of no peers: give at least one peer id")
    if len(set(ids)) != n:
        raise InvalidUsage(f"ring order: peer ids repeat in {list(peers)!r}")
    if isinstance(bw, Mapping):
        index = {p: i for i, p in enumerate(ids)}
        m = np.zeros((n, n))
        for key, value in bw.items():
            i, j = index.get(key[0]), index.get(key[1])
            if i is not None and j is not None:
                m[i, j] = value
    else:
        given = np.array(bw, dtype=np.float64)
        if given.shape != (n, n):
            raise InvalidUsage(f"ring order: a bandwidth matrix for {n} peers must be {n}x{n}, "
                               f"not {'x'.join(map(str, given.shape))}")
        perm = sorted(range(n), key=lambda i: peers[i])
        m = given[np.ix_(perm, perm)]
    m[np.isnan(m)] = 0.0
    bad = ~np.isfinite(m) | (m < 0)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise InvalidUsage(f"ring order: bandwidth {ids[i]} -> {ids[j]} is {m[i, j]!r}; "
                           f"rates are finite and >= 0 (leave a pair out when it is unknown)")
    np.fill_diagonal(m, 0.0)
    return ids, m


# ---------------------------------------------------------------------- scores


def _quantize(m: np.ndarray) -> np.ndarray:
    """Integer multiples of 2**-_BITS of the largest rate (exact sums, real ties)."""
    top = float(m.max())
    if top <= 0.0:
        return np.zeros(m.shape, dtype=np.int64)
    return np.rint(np.ldexp(m, _BITS - math.frexp(top)[1])).astype(np.int64)


def _score(m: np.ndarray, order: Sequence[int]) -> tuple[float, float]:
    links = [float(m[a, b]) for a, b in zip(order, [*order[1:], order[0]])]
    return min(links), math.fsum(links)


def _upper_bound(q: np.ndarray):
    """Every peer sends over one link and receives over one: no ring beats the slowest
    peer's fastest outgoing or incoming link (q: integer or float matrix)."""
    off = q.copy()
    np.fill_diagonal(off, -1)
    return min(off.max(axis=1).min(), off.max(axis=0).min()).item()


# ---------------------------------------------------------------------- exact


@lru_cache(maxsize=EXACT_MAX)
def _layers(k: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """For subsets of k peers (bit masks): per size >= 2 and per member v, the subsets of
    that size containing v, and the same subsets without v."""
    masks = np.arange(1 << k, dtype=np.int64)
    size = sum((masks >> b) & 1 for b in range(k)) if k else np.zeros(1, np.int64)
    out = []
    for c in range(2, k + 1):
        layer = masks[size == c]
        per = []
        for v in range(k):
            has = layer[(layer >> v) & 1 == 1]
            per.append((has, has ^ (1 << v)))
        out.append(per)
    return out


def _held_karp(q: np.ndarray, t: int) -> tuple[int, np.ndarray]:
    """Largest total of a ring using only links >= t (``_NEG`` if none), and the table
    ``f[S, v]``: the largest total of a path from peer v+1 through all of the peers in S
    (bit u: peer u+1; v in S) ending at peer 0, over links >= t."""
    n = len(q)
    k = n - 1
    w = np.where(q >= t, q, _NEG)
    np.fill_diagonal(w, _NEG)
    f = np.full((1 << k, k), _NEG, dtype=np.int64)
    f[1 << np.arange(k), np.arange(k)] = w[1:, 0]
    inner = w[1:, 1:]  # inner[v, u]: peer v+1 -> peer u+1
    for per in _layers(k):
        for v, (has, without) in enumerate(per):
            best = (f[without] + inner[v]).max(axis=1)
            best[best < _HALF] = _NEG
            f[has, v] = best
    totals = w[0, 1:] + f[(1 << k) - 1]
    best = int(totals.max())
    return (best if best > _HALF else _NEG), f


def _exact(q: np.ndarray, bound: int) -> tuple[list[int], int]:
    """The lexicographically smallest of the optimal rings, and how many passes it took."""
    n = len(q)
    off = q[~np.eye(n, dtype=bool)]
    values = distinct(off[off <= bound])  # the bottleneck is one of these
    lo, hi = 0, len(values) - 1  # values[lo] is always feasible: the graph is complete
    best, table = _held_karp(q, int(values[lo]))
    passes = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        total, f = _held_karp(q, int(values[mid]))
        passes += 1
        if total != _NEG:
            lo, best, table = mid, total, f
        else:
            hi = mid - 1
    t = int(values[lo])
    # walk from peer 0, each time to the smallest peer that still completes an optimal ring
    order, here, left, acc = [0], 0, (1 << (n - 1)) - 1, 0
    while left:
        for u in range(n - 1):
            if not (left >> u) & 1 or q[here, u + 1] < t:
                continue
            rest = int(table[left, u])
            link = int(q[here, u + 1])
            if rest > _HALF and acc + link + rest == best:
                order.append(u + 1)
                here, left, acc = u + 1, left & ~(1 << u), acc + link
                break
        else:  # pragma: no cover - the table says a completion exists
            raise AssertionError("ring order: no optimal completion found")
    return order, passes
