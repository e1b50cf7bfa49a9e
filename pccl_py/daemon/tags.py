"""Automatic tags: which tag a call without one gets, so that peers never pair up calls
of different steps.

Peers that call collectives without a tag get tags in call order, and every peer must
make the same calls in the same order (lockstep). The tag of such a call counts the calls
that came before it, and a call that failed gives its tag back: the next call, normally
the caller's retry, takes it again. So:

* every peer fails call k: all retry it under tag k, and pair up;
* one peer completed call k while another failed it (it got every FIN but the other lost
  the last one, e.g. with a link reset): the first one's next call has tag k + 1, the
  other's retry tag k. They do not pair up: the data plane of the one ahead sees that its
  peer retries a call it completed (``behind``) and tells it so. The retry fails with
  ``Diverged``, which uses its tag up like a success, so that peer's next call has tag
  k + 1 too and pairs with the other's. Its state lacks call k's result until the peers
  resynchronise.

The count starts again only when the group gains a member (a vote admitted a peer, or
this peer joined): at that point every member is between calls, so all agree on zero.
Epochs that only remove peers or renew links keep the count, which is what keeps the
two cases above apart.
"""

from __future__ import annotations

import heapq

from pccl_py.calls import AUTO_TAG  # bit set in every automatic tag (user tags are below it)

__all__ = ["AUTO_TAG", "AutoTags"]


class AutoTags:
    def __init__(self) -> None:
        self._generation = 0  # counts resets: a token from before one is stale
        self.reset()

    def reset(self) -> None:
        """Start counting from 1 (the group gained a member); calls in flight are forgotten."""
        self._next = 1
        self._free: list[int] = []  # failed tags, taken again smallest first
        self._in_flight: set[int] = set()
        self._generation += 1

    def take(self) -> tuple[int, int]:
        """A tag for the next call, and the token to hand back to :meth:`done`."""
        n = heapq.heappop(self._free) if self._free else self._next
        if n == self._next:
            self._next += 1
        self._in_flight.add(n)
        return AUTO_TAG | n, self._generation

    def done(self, tag: int, token: int, ok: bool) -> None:
        """The call of ``tag`` ended; a failed call's tag goes to the next call, a completed
        one's (``ok``: it succeeded, or the other peers completed it) is used up."""
        if token != self._generation:  # taken before a reset: that count is gone
            return
        n = tag & ~AUTO_TAG
        if n not in self._in_flight:  # already handed back
            return
        self._in_flight.discard(n)
        if not ok:
            heapq.heappush(self._free, n)

    def behind(self, tag: int) -> bool:
        """A peer runs ``tag``, a call this peer has already completed since the count
        started: that peer is retrying a call whose success it never learnt."""
        if not tag & AUTO_TAG:
            return False
        n = tag & ~AUTO_TAG
        return n < self._next and n not in self._in_flight and n not in self._free
