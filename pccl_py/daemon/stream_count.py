"""How many TCP streams a peer link should use, chosen by measurement (sans-I/O).

One TCP flow on an internet path is held back by its socket windows (a ~6 MiB receive
buffer moves ~0.5 Gbit/s at 100 ms round trip) or by per-flow policing; K flows move up
to K times as much, until the path itself is the limit. :class:`StreamCount` is fed one
sample per call and link -- the bytes the call moved over the link, its seconds, and the
streams in use -- and answers a :class:`Decision`: grow, hold or shrink, with a reason.

The search, per link:

* start from a count the link's round trip suggests (``long_paths``): one TCP flow's
  window moves less the longer the path, and a DiLoCo trainer, which all-reduces once per
  outer step, cannot spend a dozen steps finding the count. From such a start the search
  goes down first: it halves K while the median rate stays within ``shed`` (5 %) of the
  best rate measured on the way down, and settles at the last K that did. (Judged against
  the K just before, two drops of 4 % added up: on a 100 ms path a noisy sample at 8
  streams let 4 through, 61 % of the link against 89 %.) Too many flows into one
  bottleneck lose packets to each other: on a 100 ms path without a per-flow cap, 16
  streams moved 71-73 % of the link against 84-85 % with 8; a path whose flows are capped
  keeps them;
* leave out the first ``warmup`` calls after the streams grew (the new connections are
  still in slow start and their receive windows small);
* measure the current K over ``samples`` calls (their median rate: one slow call does
  not decide);
* then try the next K (``K * factor``, at most ``maximum``) and measure it the same way;
* keep growing while each step gains more than ``gain`` (10 %: a gain of a few percent is
  noise, and every stream costs sockets, buffers and threads); at the first step that
  does not, go back to the best K and stay there (settled);
* a settled link tries one step up again after ``reprobe_after`` seconds (a path may
  change), and otherwise never moves: no oscillation between two counts.

Calls that move fewer than ``min_bytes`` over a link say little about its bandwidth
(latency dominates) and are ignored, as are samples taken with another K than the one
decided (a grow that has not taken effect yet); after ``2 * samples`` calls in a row with
fewer streams than decided, the link settles at what it has (its dials failed, or, on the
side that accepts the link, the dialling side decided otherwise).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

GROW, HOLD, SHRINK = "grow", "hold", "shrink"
AUTO = "auto"


def streams_setting(value: int | str | None) -> int | None:
    """A daemon's ``--streams``: ``None`` or ``"auto"`` (chosen by measurement, the
    default) gives None; a count from 1 to 64 gives that count, fixed for every link."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or not 1 <= n <= 64:
        raise ValueError(f"streams must be 'auto' or a count from 1 to 64, not {value!r}")
    return n


@dataclass(frozen=True)
class StreamCountConfig:
    initial: int = 4  # K of a new link
    maximum: int = 16  # never more streams than this per link
    factor: int = 2  # a grow multiplies K by this
    gain: float = 0.10  # a grow is kept when the median rate rose by more than this
    # going down from a round-trip start, a halving is kept if its rate is at most this
    # below the best measured on the way down
    shed: float = 0.05
    samples: int = 3  # calls measured at each K before judging it
    min_bytes: int = 4 << 20  # calls moving fewer bytes over a link are ignored
    warmup: int = 2  # calls left out after a grow took effect
    # (round trip in seconds, K): a new link whose round trip is at least that starts at K
    # (at most ``maximum``); the largest that applies wins
    long_paths: tuple[tuple[float, int], ...] = ((0.015, 8), (0.050, 16))
    reprobe_after: float = 600.0  # seconds a settled link waits before trying one step up again

    def __post_init__(self) -> None:
        if not 1 <= self.initial <= self.maximum:
            raise ValueError(f"initial streams {self.initial} must be between 1 and maximum {self.maximum}")
        if (self.factor < 2 or self.samples < 1 or self.gain < 0 or not 0 <= self.shed < 1
                or self.reprobe_after <= 0 or self.warmup < 0):
            raise ValueError("factor >= 2, samples >= 1, gain >= 0, 0 <= shed < 1, warmup >= 0 and "
                             "reprobe_after > 0 are required")
        if any(rtt <= 0 or k < 1 for rtt, k in self.long_paths):
            raise ValueError(f"long_paths needs (round trip > 0, streams >= 1) pairs, not {self.long_paths}")

    def for_round_trip(self, rtt: float | None) -> int:
        """The K a new link with this round trip starts at (``initial`` when unknown)."""
        k = self.initial
        if rtt is not None:
            for at, n in self.long_paths:
                if rtt >= at:
                    k = max(k, n)
        return min(k, self.maximum)


@dataclass(frozen=True)
class Decision:
    action: str  # GROW, HOLD or SHRINK
    streams: int  # the K to use from now on
    reason: str


@dataclass
class _Link:
    k: int
    rates: dict[int, list[float]] = field(default_factory=dict)  # K -> recent rates (bytes/s)
    prev: int | None = None  # the K the current one is compared with (exploring)
    best: int | None = None
    settled_at: float | None = None  # None: exploring
    behind: int = 0  # samples in a row taken with fewer streams than decided
    warm: int = 0  # samples still to leave out at the current K (its new streams warm up)
    started: bool = False  # the link's round trip has been seen (start)
    down: bool = False  # searching downwards from a round-trip start
    top: float = 0.0  # searching downwards: the best median rate measured so far


class StreamCount:
    """Per-link stream counts (see module docstring). Deterministic: the same samples give
    the same decisions."""

    def __init__(self, config: StreamCountConfig | None = None) -> None:
        self.config = config or StreamCountConfig()
        self._links: dict[str, _Link] = {}

    def streams(self, link: str) -> int:
        """The K decided for ``link`` (``initial`` for a link not seen yet)."""
        st = self._links.get(link)
        return st.k if st is not None else self.config.initial

    def best(self, link: str) -> int | None:
        st = self._links.get(link)
        return st.best if st is not None else None

    def links(self) -> set[str]:
        return set(self._links)

    def forget(self, link: str) -> None:
        """The link is gone; a new one to the same peer starts over."""
        self._links.pop(link, None)

    def start(self, link: str, rtt: float | None) -> Decision:
        """The link is up and its round trip is ``rtt`` seconds (None: unknown): the K to
        begin with. Only the first time a link is seen counts: a link measured before (set up
        again in a new epoch) keeps what was decided."""
        st = self._state(link)
        if st.started or st.rates:
            return Decision(HOLD, st.k, f"{st.k} streams, as decided before")
        st.started = True
        k = self.config.for_round_trip(rtt)
        if k <= st.k:
            return Decision(HOLD, st.k, f"round trip {_ms(rtt)}: starting at {st.k} streams")
        self._start_high(st, k)
        return Decision(GROW, k, f"round trip {_ms(rtt)}: starting at {k} streams")

    def follow(self, link: str, streams: int) -> Decision:
        """(The accepting end of ``link``) the dialling end brought the link to ``streams``
        streams. Before this end has measured the link, it takes that count as its own start
        (the two ends read their round trips apart, and near a ``long_paths`` threshold they
        may disagree; the dialler's count is the one the link has)."""
        st = self._state(link)
        n = min(streams, self.config.maximum)
        if st.rates or n <= st.k:
            return Decision(HOLD, st.k, f"{st.k} streams")
        self._start_high(st, n)
        return Decision(GROW, n, f"the dialling end opened {n} streams: starting at {n}")

    def reached(self, link: str, streams: int, now: float) -> Decision:
        """The I/O layer could only bring ``link`` to ``streams`` (a dial failed): settle
        there, so the same grow is not tried again before ``reprobe_after``."""
        st = self._state(link)
        st.k = max(1, min(streams, self.config.maximum))
        st.best = st.k if st.best is None else min(st.best, st.k)
        st.prev, st.behind, st.warm, st.down = None, 0, 0, False
        st.settled_at = now
        return Decision(HOLD, st.k, f"link reached {st.k} streams only; settled there")

    def sample(self, link: str, now: float, nbytes: int, seconds: float, streams: int) -> Decision:
        """One call moved ``nbytes`` over ``link`` in ``seconds`` with ``streams`` streams."""
        cfg = self.config
        st = self._state(link)
        if nbytes < cfg.min_bytes or seconds <= 0:
            return Decision(HOLD, st.k, f"ignored: {nbytes} bytes is below min_bytes {cfg.min_bytes}"
                            if nbytes < cfg.min_bytes else "ignored: no duration")
        if streams != st.k:
            st.behind = st.behind + 1 if streams < st.k else 0
            if st.behind >= 2 * cfg.samples:  # the link never got the streams decided: settle there
                decided, calls = st.k, st.behind
                self.reached(link, streams, now)
                return Decision(SHRINK, st.k, f"{calls} calls with {streams} streams, not the {decided} "
                                              f"decided: settled at {st.k}")
            return Decision(HOLD, st.k, f"ignored: measured with {streams} streams, {st.k} decided")
        st.behind = 0
        if st.warm:
            st.warm -= 1
            return Decision(HOLD, st.k, f"ignored: {st.k} streams warming up ({st.warm} more to leave out)")
        window = st.rates.setdefault(st.k, [])
        window.append(nbytes / seconds)
        del window[:-cfg.samples]
        if st.settled_at is not None:
            return self._settled(st, now)
        if len(window) < cfg.samples:
            return Decision(HOLD, st.k, f"measuring {st.k} streams ({len(window)}/{cfg.samples} calls)")
        rate = statistics.median(window)
        if st.prev is None:  # the first K measured: the baseline
            st.best = st.k
            if st.down:
                st.top = rate
                return self._try_down(st, now, f"{_rate(rate)} with {st.k} streams")
            return self._try_up(st, now, f"{_rate(rate)} with {st.k} streams")
        if st.down:
            top = st.top
            if rate >= top * (1 - cfg.shed):
                st.best, st.top = st.k, max(top, rate)
                return self._try_down(st, now, f"{_rate(rate)} with {st.k} streams, {rate / top - 1:+.0%} "
                                               f"against the best so far")
            best = st.best = st.prev
            st.k, st.prev, st.settled_at, st.down = best, None, now, False
            return Decision(GROW, best, f"{_rate(rate)} with {streams} streams is {rate / top - 1:+.0%} against "
                                        f"the best so far, {_rate(top)} (at most -{cfg.shed:.0%} allowed): "
                                        f"settled at {best}")
        before = statistics.median(st.rates[st.prev])
        if rate > before * (1 + cfg.gain):
            st.best = st.k
            return self._try_up(st, now, f"{_rate(rate)} with {st.k} streams, {rate / before - 1:+.0%} "
                                         f"over {st.prev}")
        best = st.best if st.best is not None else st.prev
        st.k, st.prev, st.settled_at = best, None, now
        return Decision(SHRINK, best, f"{_rate(rate)} with {streams} streams is {rate / before - 1:+.0%} over "
                                      f"{_rate(before)} with {best} (gain {cfg.gain:.0%} needed): settled at {best}")

    # -- internals --------------------------------------------------------------------------
    def _state(self, link: str) -> _Link:
        st = self._links.get(link)
        if st is None:
            st = self._links[link] = _Link(k=self.config.initial)
        return st

    def _try_up(self, st: _Link, now: float, what: str) -> Decision:
        cfg = self.config
        if st.k >= cfg.maximum:
            st.prev, st.settled_at = None, now
            return Decision(HOLD, st.k, f"{what}: settled at the bound of {cfg.maximum} streams")
        nxt = min(cfg.maximum, st.k * cfg.factor)
        st.prev, st.k, st.warm = st.k, nxt, cfg.warmup
        st.rates.pop(nxt, None)  # measured afresh (an old window may be from another path)
        return Decision(GROW, nxt, f"{what}: trying {nxt}")

    def _start_high(self, st: _Link, k: int) -> None:
        """An unmeasured link begins at ``k`` streams, more than ``initial``: the new streams
        warm up, then the search goes down from there."""
        st.k, st.started, st.down, st.warm, st.prev = k, True, True, self.config.warmup, None

    def _try_down(self, st: _Link, now: float, what: str) -> Decision:
        cfg = self.config
        nxt = max(cfg.initial, st.k // cfg.factor)
        if nxt >= st.k:
            st.prev, st.settled_at, st.down = None, now, False
            return Decision(HOLD, st.k, f"{what}: settled at {st.k} streams")
        # the streams left carry more from now on: their windows grow for a call first
        st.prev, st.k, st.warm = st.k, nxt, min(1, cfg.warmup)
        st.rates.pop(nxt, None)
        return Decision(SHRINK, nxt, f"{what}: trying {nxt}")

    def _settled(self, st: _Link, now: float) -> Decision:
        cfg = self.config
        if now - st.settled_at < cfg.reprobe_after or st.k >= cfg.maximum:
            return Decision(HOLD, st.k, f"settled at {st.k} streams")
        if len(st.rates[st.k]) < cfg.samples:  # a fresh baseline before the step up
            return Decision(HOLD, st.k, f"settled at {st.k} streams; measuring before a re-probe")
        elapsed, st.settled_at = now - st.settled_at, None
        return self._try_up(st, now, f"re-probe after {elapsed:.0f} s settled: "
                                     f"{_rate(statistics.median(st.rates[st.k]))} with {st.k} streams")


def _ms(rtt: float | None) -> str:
    return "unknown" if rtt is None else f"{rtt * 1000:.1f} ms"


def _rate(bps: float) -> str:
    return f"{bps * 8 / 1e9:.2f} Gbit/s"
