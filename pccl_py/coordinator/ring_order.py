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
* Above it, a heuristic runs within ``budget_s``: a greedy ring, then iterated local
  search (segment exchanges, a 3-opt move that keeps every link's direction, found
  through each peer's fastest links) that first raises the bottleneck step by step and
  then the total at the best bottleneck found. It draws from ``random.Random(seed)`` and
  stops on fixed amounts of work, so the same input and seed give the same ring unless the
  clock cut the search short (``Solution.timed_out``).
* Determinism: peers are handled in sorted order of their ids, so the order of the
  ``peers`` argument does not matter, and every ring starts at the smallest id.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pccl_py.errors import InvalidUsage

EXACT_MAX = 12  # up to this many peers the ring is proven optimal
_BITS = 40  # resolution of the comparison: 2**-_BITS of the largest bandwidth
_NEG = -(1 << 60)  # "no such path" in the dynamic programme
_HALF = _NEG // 2  # anything below is no path (a sum of valid links is far above)
_CANDIDATES = 10  # fastest links per peer tried by the local search
_KICK_PLAN = 60_000  # the heuristic's planned work (see _Heuristic.__init__)


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
        order, timed_out, how = _Heuristic(q, bound, budget_s, start + budget_s, clock, rng).run()
        optimal = False
    ring = tuple(ids[i] for i in order)
    bottleneck, total = _score(m, order)
    top = bottleneck if optimal or _bottleneck(q, order) == bound else float(_upper_bound(m))
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


def _bottleneck(q: np.ndarray, order: Sequence[int]) -> int:
    return int(min(q[a, b] for a, b in zip(order, [*order[1:], order[0]])))


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
    values = np.unique(off[off <= bound])  # the bottleneck is one of these
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


# ---------------------------------------------------------------------- heuristic


class _Heuristic:
    """Iterated local search over rings of more than EXACT_MAX peers.

    At a threshold t a link's value is its rate if >= t, and its rate minus ``big`` (more
    than any ring's total) if not: maximising a ring's value first removes links below t,
    then raises the total. The bottleneck phase raises t past the current bottleneck while
    a ring without links below t is found; the total phase then keeps the best t."""

    def __init__(self, q: np.ndarray, bound: int, budget_s: float, deadline: float,
                 clock: Callable[[], float], rng: random.Random) -> None:
        self.q = q
        self.n = len(q)
        self.w = q.tolist()
        self.bound = bound
        self.deadline = deadline
        self.clock = clock
        self.rng = rng
        self.big = int(q.max()) * self.n + 1
        self.timed_out = False
        k = min(_CANDIDATES, self.n - 1)
        off = np.where(np.eye(self.n, dtype=bool), -1, q)
        # fastest outgoing links of each peer, and fastest incoming; ties: smaller id first
        self.outs = np.argsort(-off, axis=1, kind="stable")[:, :k].tolist()
        self.ins = np.argsort(-off.T, axis=1, kind="stable")[:, :k].tolist()
        self.values = np.unique(off[off >= 0])
        self.kicks = 0
        # kicks in a row without progress before a search gives up, planned so that the
        # whole search takes about half of budget_s on one core whatever n (a kick and its
        # local search took about 30 + n microseconds here); the clock only stops a slower
        # or busier machine
        self.pa = self.pb = max(20, min(2000, int(budget_s * _KICK_PLAN / (30 + self.n))))

    def run(self) -> tuple[list[int], bool, str]:
        order = self._greedy()
        t = _bottleneck(self.q, order)
        # bottleneck phase: binary search over the rates between the ring's bottleneck and
        # the bound; a threshold counts as reachable when the search finds a ring without a
        # link below it
        values = self.values[(self.values > t) & (self.values <= self.bound)]
        lo, hi, rounds = 0, len(values), 0  # values[:lo] reached (and more), values[hi:] not
        while lo < hi and not self._late():
            mid = (lo + hi) // 2
            goal = int(values[mid])
            found = self._search(order, self._shortfall(goal), stop_at_clean=True, patience=self.pa)
            rounds += 1
            if self._bad(found, goal):
                hi = mid
            else:
                order, t = found, _bottleneck(self.q, found)
                lo = int(np.searchsorted(values, t, side="right"))
        # total phase: the best ring at bottleneck t
        if not self._late():
            order = self._search(order, self._costs(t), stop_at_clean=False, patience=self.pb)
        how = (f"heuristic over {self.n} peers ({rounds} bottleneck rounds, {self.kicks} kicks"
               f"{', stopped at the budget' if self.timed_out else ''})")
        return _rotate(order), self.timed_out, how

    def _late(self) -> bool:
        if self.clock() >= self.deadline:
            self.timed_out = True
        return self.timed_out

    def _greedy(self) -> list[int]:
        """From peer 0, always over the fastest link to a peer not yet in the ring."""
        order, seen = [0], {0}
        for _ in range(self.n - 1):
            row = self.w[order[-1]]
            nxt = max((u for u in range(self.n) if u not in seen), key=lambda u: (row[u], -u))
            order.append(nxt)
            seen.add(nxt)
        return order

    def _costs(self, t: int) -> list[list[int]]:
        """Links >= t are worth their rate; one below t costs more than any ring's total."""
        return np.where(self.q >= t, self.q, self.q - self.big).tolist()

    def _shortfall(self, t: int) -> list[list[int]]:
        """Links >= t are worth 0, one below t costs ``big`` plus its shortfall: fewer links
        below t first, then nearer to t (the rates themselves would pull towards rings with
        a high total instead of a ring without a link below t)."""
        return np.where(self.q >= t, 0, self.q - t - self.big).tolist()

    def _bad(self, order: list[int], t: int) -> bool:
        w = self.w
        return any(w[a][b] < t for a, b in zip(order, order[1:] + order[:1]))

    def _value(self, order: list[int], cost: list[list[int]]) -> int:
        return sum(cost[a][b] for a, b in zip(order, order[1:] + order[:1]))

    def _search(self, order: list[int], cost: list[list[int]], *,
                stop_at_clean: bool, patience: int) -> list[int]:
        """Local search, then kicks (a random segment exchange) each followed by local
        search around it; the best ring wins. Stops after ``patience`` kicks in a row
        without a better ring, at the first ring without a bad link (``stop_at_clean``),
        or at the deadline."""
        best = self._improve(list(order), cost, list(order))
        value = self._value(best, cost)
        quiet = 0
        while quiet < patience and not self._late():
            if stop_at_clean and value >= 0:
                break
            cand, touched = self._kick(best)
            cand = self._improve(cand, cost, touched)
            self.kicks += 1
            v = self._value(cand, cost)
            if v > value:
                best, value, quiet = cand, v, 0
            else:
                quiet += 1
                if v == value:
                    best = cand  # drift across equal rings
        return best

    def _kick(self, order: list[int]) -> tuple[list[int], list[int]]:
        n = self.n
        span = min(n - 1, 3 + self.rng.randrange(max(1, min(n // 2, 30))))
        i = self.rng.randrange(n)
        cuts = sorted(self.rng.sample(range(1, span + 1), 2)) if span >= 2 else [1, 1]
        seq = order[i:] + order[:i]
        j, k = cuts
        new = seq[:1] + seq[j:k + 1] + seq[1:j] + seq[k + 1:]
        touched = [seq[0], seq[1], seq[j - 1], seq[j], seq[k], seq[(k + 1) % n]]
        return new, touched

    def _improve(self, order: list[int], cost: list[list[int]], start: list[int]) -> list[int]:
        """Apply improving segment exchanges until none of those tried from the peers in the
        queue improves. The move cuts links a->a1, b->d and c->e (in ring order) and joins
        a->d, c->a1, b->e: the segment a1..b and the segment d..c change places, every link
        keeps its direction. Tried: d among a's fastest outgoing links, c among a1's fastest
        incoming ones."""
        n = self.n
        pos = [0] * n
        for i, v in enumerate(order):
            pos[v] = i
        queue = deque(dict.fromkeys(start))
        queued = [False] * n
        for v in queue:
            queued[v] = True
        outs, ins = self.outs, self.ins
        checks = 0
        while queue:
            a = queue.popleft()
            queued[a] = False
            checks += 1
            if checks % 64 == 0 and self._late():
                break
            i = pos[a]
            a1 = order[(i + 1) % n]
            base = cost[a][a1]
            done = False
            for d in outs[a]:
                if cost[a][d] <= base:
                    break  # the first new link must beat the link it replaces
                rd = (pos[d] - i) % n
                if rd < 2:
                    continue
                b = order[(pos[d] - 1) % n]
                g1 = cost[a][d] - base - cost[b][d]
                for c in ins[a1]:
                    rc = (pos[c] - i) % n
                    if rc < rd:
                        continue
                    e = order[(pos[c] + 1) % n]
                    if g1 + cost[c][a1] - cost[c][e] + cost[b][e] > 0:
                        seq = order[i:] + order[:i]
                        order = seq[:1] + seq[rd:rc + 1] + seq[1:rd] + seq[rc + 1:]
                        for p, v in enumerate(order):
                            pos[v] = p
                        for v in (a, a1, b, d, c, e):
                            if not queued[v]:
                                queued[v] = True
                                queue.append(v)
                        done = True
                        break
                if done:
                    break
        return order


def _rotate(order: list[int]) -> list[int]:
    i = order.index(0)
    return order[i:] + order[:i]
