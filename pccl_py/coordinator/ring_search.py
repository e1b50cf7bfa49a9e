"""The ring-order heuristic above the exact solver's limit (see :mod:`ring_order`), sans I/O.

It works on the integer rates of ``ring_order`` (peer 0 is the smallest id) and returns
a ring as a list of peer indices starting at 0. Three tools, all deterministic for a given
``random.Random``:

* a depth-first search for a ring over links >= t, trying first the peer with the fewest
  onward links (Warnsdorff's rule), within a fixed number of steps;
* iterated local search: segment exchanges (a 3-opt move that keeps every link's
  direction, tried through each peer's fastest links), and a random segment exchange as
  the kick between local searches;
* a final polish that reorders the inside of every window of a few consecutive peers the
  best way.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

_CANDIDATES = 10  # fastest links per peer tried by the local search
_SPAN = 30  # longest segment (plus 3) a kick moves
_WINDOW = 6  # peers per window of the final polish
_KICK_PLAN = 60_000  # the planned work (see Heuristic.__init__)


def distinct(values: np.ndarray) -> np.ndarray:
    """The distinct values, ascending (np.unique by sorting: its hashing is slow here)."""
    v = np.sort(values, axis=None)
    return v[np.concatenate(([True], v[1:] != v[:-1]))] if len(v) else v


def _fastest(q: np.ndarray, k: int) -> list[list[int]]:
    """Per row, the columns of its k largest values, largest first, the smaller column first
    on a tie."""
    n = q.shape[1]
    # order by (-value, column): one key per element, value above column
    key = -q * n + np.arange(n)
    top = np.argpartition(key, k - 1, axis=1)[:, :k] if k < n else np.argsort(key, axis=1)
    rows = np.arange(len(q))[:, None]
    return np.take_along_axis(top, np.argsort(key[rows, top], axis=1), axis=1).tolist()


def bottleneck_of(q: np.ndarray, order: Sequence[int]) -> int:
    """The slowest link of the ring ``order`` in the integer rates ``q``."""
    return int(min(q[a, b] for a, b in zip(order, [*order[1:], order[0]])))


class Heuristic:
    """The search over the rings of one group (used above ``ring_order.EXACT_MAX`` peers).

    The bottleneck phase binary-searches a threshold t over the rates: a ring without a
    link below t comes from :meth:`_walk`, or else from :meth:`_search` on
    :meth:`_shortfall` values (the fewest links below t, then the nearest to t). The total
    phase then maximises :meth:`_costs` at the best t: a link below t costs more than any
    ring's total, so the bottleneck never drops, and the rates of the others add up."""

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
        self.outs = _fastest(off, k)
        self.ins = _fastest(off.T, k)
        self.values = distinct(off[off >= 0])
        self.kicks = 0
        # kicks in a row without progress before a search gives up, planned so that the
        # whole search takes about half of budget_s on one core whatever n (a kick and its
        # local search took about 30 + n microseconds here); the clock only stops a slower
        # or busier machine
        self.pa = self.pb = max(20, min(2000, int(budget_s * _KICK_PLAN / (30 + self.n))))

    def run(self) -> tuple[list[int], bool, str]:
        order = self._greedy()
        t = bottleneck_of(self.q, order)
        # bottleneck phase: binary search over the rates between the ring's bottleneck and
        # the bound; a threshold counts as reachable when the search finds a ring without a
        # link below it
        values = self.values[(self.values > t) & (self.values <= self.bound)]
        lo, hi, rounds = 0, len(values), 0  # values[:lo] reached (and more), values[hi:] not
        while lo < hi and not self._late():
            mid = (lo + hi) // 2
            goal = int(values[mid])
            found = self._walk(goal)
            if found is None:
                found = self._search(order, self._shortfall(goal), stop_at_clean=True, patience=self.pa)
            rounds += 1
            reached = bottleneck_of(self.q, found)
            if reached > t:  # even a search that fell short of goal may have raised it
                order, t = found, reached
                lo = int(np.searchsorted(values, t, side="right"))
            if reached < goal:
                hi = mid
        # total phase: the best ring at bottleneck t
        if not self._late():
            cost = self._costs(t)
            order = self._search(order, cost, stop_at_clean=False, patience=self.pb)
            order = self._polish(order, cost)
        how = (f"heuristic over {self.n} peers ({rounds} bottleneck rounds, {self.kicks} kicks"
               f"{', stopped at the budget' if self.timed_out else ''})")
        return _rotate(order), self.timed_out, how

    def _walk(self, t: int) -> list[int] | None:
        """A ring over links >= t by depth-first search from peer 0, always trying first the
        peer with the fewest onward links (Warnsdorff's rule), within a fixed number of
        steps; None if none was found."""
        n, w = self.n, self.w
        good = self.q >= t
        np.fill_diagonal(good, False)
        succ = [np.flatnonzero(row).tolist() for row in good]
        pred = [np.flatnonzero(col).tolist() for col in good.T]
        if not all(succ) or not all(pred):
            return None
        free = [True] * n
        free[0] = False
        left = (good[:, 1:].sum(axis=1)).tolist()  # onward links to peers not in the path
        path = [0]

        def options(v: int) -> list[int]:
            return sorted((u for u in succ[v] if free[u]), key=lambda u: (left[u], u))

        stack = [iter(options(0))]
        steps = 0
        limit = 10 * n
        while stack:
            steps += 1
            if steps > limit or (steps % 256 == 0 and self._late()):
                return None
            u = next(stack[-1], None)
            if u is None:
                stack.pop()
                v = path.pop()
                if v:
                    free[v] = True
                    for x in pred[v]:
                        left[x] += 1
                continue
            free[u] = False
            for x in pred[u]:
                left[x] -= 1
            path.append(u)
            if len(path) == n:
                if w[u][0] >= t:
                    return path
                stack.append(iter(()))
                continue
            stack.append(iter(options(u)))
        return None

    def _polish(self, order: list[int], cost: list[list[int]]) -> list[int]:
        """Reorder the inside of every window of consecutive peers the best way (its ends
        stay), until no window improves: what segment exchanges miss within a short path."""
        n = self.n
        size = min(_WINDOW, n)
        inner = list(itertools.permutations(range(1, size - 1)))
        improved = True
        while improved and not self._late():
            improved = False
            for i in range(n):
                seq = [order[(i + j) % n] for j in range(size)]
                now = sum(cost[a][b] for a, b in zip(seq, seq[1:]))
                best, pick = now, None
                for perm in inner:
                    path = [seq[0], *(seq[j] for j in perm), seq[-1]]
                    v = sum(cost[a][b] for a, b in zip(path, path[1:]))
                    if v > best:
                        best, pick = v, path
                if pick is not None:
                    for j, v in enumerate(pick):
                        order[(i + j) % n] = v
                    improved = True
        return order

    def _late(self) -> bool:
        if self.clock() >= self.deadline:
            self.timed_out = True
        return self.timed_out

    def _greedy(self) -> list[int]:
        """From peer 0, always over the fastest link to a peer not yet in the ring (the
        smallest such peer on a tie)."""
        order = [0]
        taken = np.zeros(self.n, dtype=bool)
        taken[0] = True
        for _ in range(self.n - 1):
            row = np.where(taken, -1, self.q[order[-1]])
            nxt = int(row.argmax())
            order.append(nxt)
            taken[nxt] = True
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
        best = walk = self._improve(list(order), cost, list(order))
        value = self._value(best, cost)
        quiet = 0
        while quiet < patience and not self._late():
            if stop_at_clean and value >= 0:
                break
            cand, touched = self._kick(walk)
            cand = self._improve(cand, cost, touched)
            self.kicks += 1
            v = self._value(cand, cost)
            if v > value:
                best, walk, value, quiet = cand, cand, v, 0
            else:
                quiet += 1
                if v == value:
                    walk = cand  # drift across equal rings; the first one found is kept
        return best

    def _kick(self, order: list[int]) -> tuple[list[int], list[int]]:
        n = self.n
        span = min(n - 1, 3 + self.rng.randrange(max(1, min(n // 2, _SPAN))))
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
