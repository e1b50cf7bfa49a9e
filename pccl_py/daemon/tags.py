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

The count starts again at every completed vote round (update_topology or
optimize_topology answered for every member) and when the group gains a member: at those
points every member is between calls, so all agree on zero. The round's id, which the
coordinator sends with the topology, is the tags' generation (``pccl_py.calls.auto_tag``),
so a frame of the new count is never taken for one of the old. After one peer diverged
and went to update_topology while the others went on to their next call, the round that
brings them back together also brings their counts back together. Epochs that only
remove peers or renew links keep the count, which is what keeps the two cases above
apart (a retry waits for such an epoch without voting).

:meth:`AutoTags.progress` is what a vote tells the coordinator about this count, so that
it can tell (``pccl_py.calls.never_made``) a peer that waits in a call no voter will make
(it would wait for ever) from one still finishing a call the voters made: the first is
aborted at once.
"""

from __future__ import annotations

import collections
import heapq

from pccl_py.calls import AUTO_TAG, TAG_GEN_MASK, TAGS_REPORTED, auto_tag, tag_count, tag_gen

__all__ = ["AUTO_TAG", "AutoTags"]


class AutoTags:
    def __init__(self) -> None:
        self._generation = 0  # counts resets: a token from before one is stale
        self.round: int | None = None  # the vote round the count started at (None: none yet)
        self._past: collections.deque[int] = collections.deque(maxlen=16)  # generations left behind
        self.reset()

    @property
    def gen(self) -> int:
        return 0 if self.round is None else self.round & TAG_GEN_MASK

    def reset(self, round_id: int | None = None) -> None:
        """Start counting from 1 (a vote round completed, or the group gained a member);
        calls in flight are forgotten. ``round_id``: the coordinator's id of that round."""
        if round_id is not None and round_id != self.round:
            if self.gen != round_id & TAG_GEN_MASK:
                self._past.append(self.gen)
            self.round = round_id
        self._next = 1
        self._free: list[int] = []  # failed counts, taken again smallest first
        self._in_flight: set[int] = set()
        self._generation += 1

    def new_round(self, round_id: int | None) -> bool:
        """A vote of this peer was answered in round ``round_id``: start counting again
        unless the count already started there (True when it did now)."""
        if round_id is None or round_id == self.round:
            return False
        self.reset(round_id)
        return True

    def take(self) -> tuple[int, int]:
        """A tag for the next call, and the token to hand back to :meth:`done`."""
        n = heapq.heappop(self._free) if self._free else self._next
        if n == self._next:
            self._next += 1
        self._in_flight.add(n)
        return auto_tag(self.gen, n), self._generation

    def done(self, tag: int, token: int, ok: bool) -> None:
        """The call of ``tag`` ended; a failed call's tag goes to the next call, a completed
        one's (``ok``: it succeeded, or the other peers completed it) is used up."""
        if token != self._generation:  # taken before a reset: that count is gone
            return
        n = tag_count(tag)
        if n not in self._in_flight:  # already handed back
            return
        self._in_flight.discard(n)
        if not ok:
            heapq.heappush(self._free, n)

    def behind(self, tag: int) -> bool:
        """A peer runs ``tag``, a call this peer has already completed since the count
        started: that peer is retrying a call whose success it never learnt."""
        if tag_gen(tag) != self.gen:
            return False  # a caller's tag, or another count (a frame from before a round)
        n = tag_count(tag)
        return n < self._next and n not in self._in_flight and n not in self._free

    def stale(self, tag: int) -> bool:
        """An automatic tag of a count this peer left at a vote round: no call of it will be
        posted here again (a frame of it is dropped, not held). A generation never seen
        may be the next round's, which a peer can reach first: not stale."""
        gen = tag_gen(tag)
        return gen is not None and gen != self.gen and gen in self._past

    def progress(self) -> tuple[int, list[int]]:
        """What a vote reports: ``(below, open)``. Every automatic tag of this count below
        ``below`` was made by this peer and has ended here, completed unless it is in
        ``open`` (failed, not retried yet; the smallest ``TAGS_REPORTED``)."""
        return auto_tag(self.gen, self._next), [auto_tag(self.gen, n) for n in sorted(self._free)[:TAGS_REPORTED]]

