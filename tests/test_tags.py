"""Automatic tags (pccl_py.daemon.tags): counts of calls, failed tags taken again, resets at a
completed vote round or when the group gains a member, the 'peer is behind' test the data plane
asks, and what a vote reports so the coordinator can tell a call no voter will make."""

from __future__ import annotations

from pccl_py.calls import TAGS_REPORTED, auto_tag, never_made, tag_count, tag_gen
from pccl_py.daemon.tags import AUTO_TAG, AutoTags


def n(tag: int) -> int:
    assert tag & AUTO_TAG
    return tag_count(tag)


def test_tags_count_calls_and_a_failed_tag_is_taken_again():
    t = AutoTags()
    a, ta = t.take()
    b, tb = t.take()  # two calls in flight
    assert (n(a), n(b)) == (1, 2)
    t.done(a, ta, ok=True)
    t.done(b, tb, ok=False)
    c, tc = t.take()  # the retry of the failed call
    assert n(c) == 2
    t.done(c, tc, ok=True)
    assert n(t.take()[0]) == 3


def test_the_smallest_failed_tag_goes_first():
    t = AutoTags()
    taken = [t.take() for _ in range(3)]
    for tag, tok in reversed(taken):
        t.done(tag, tok, ok=False)
    assert [n(t.take()[0]) for _ in range(4)] == [1, 2, 3, 4]


def test_handing_a_tag_back_twice_changes_nothing():
    t = AutoTags()
    a, ta = t.take()
    t.done(a, ta, ok=True)
    t.done(a, ta, ok=False)  # e.g. an error path after the call had ended
    assert n(t.take()[0]) == 2


def test_one_sided_completion_gives_different_tags():
    """Peer A completed call 1, peer B failed it: A's next call and B's retry never pair."""
    a, b = AutoTags(), AutoTags()
    (ta, ka), (tb, kb) = a.take(), b.take()
    a.done(ta, ka, ok=True)
    b.done(tb, kb, ok=False)
    next_a, retry_b = a.take()[0], b.take()[0]
    assert next_a != retry_b
    assert a.behind(retry_b)  # A can tell that B retries what A completed
    assert not b.behind(next_a)  # B is the one behind, not A
    # A says so; B's retry fails with Diverged, which uses call 1 up: B's next call pairs
    # with A's next one, which is still waiting for it
    b.done(retry_b, kb, ok=True)
    assert b.take()[0] == next_a


def test_behind_is_false_for_calls_in_flight_failed_or_not_yet_made_and_user_tags():
    t = AutoTags()
    done_tag, tok = t.take()
    t.done(done_tag, tok, ok=True)
    flying, _ = t.take()
    failed, tf = t.take()
    t.done(failed, tf, ok=False)
    assert t.behind(done_tag)
    assert not t.behind(flying)
    assert not t.behind(failed)
    assert not t.behind(auto_tag(t.gen, 10))  # a call we have not made yet
    assert not t.behind(1)  # a user tag


def test_reset_forgets_the_count_and_calls_taken_before_it():
    t = AutoTags()
    a, ta = t.take()
    t.reset()  # the group gained a member while a call was in flight (it gets aborted)
    t.done(a, ta, ok=False)  # must not be taken again after the reset
    assert [n(t.take()[0]) for _ in range(2)] == [1, 2]
    assert not t.behind(auto_tag(t.gen, 1))


def test_the_daemon_uses_a_diverged_calls_tag_up_and_gives_a_failed_ones_back():
    """The daemon's glue: a call that failed with Diverged was completed by the others, so
    the next call moves on; any other failure gives the tag to the next call (its retry)."""
    from pccl_py.daemon.service import Daemon
    from pccl_py.errors import Aborted, Diverged

    d = Daemon(coordinator="127.0.0.1:1")
    d.topology = object()  # connected, as far as tags are concerned
    tag, token = d.next_tag(None)
    d.tag_done(tag, token, Aborted("link reset"))
    retry, token = d.next_tag(None)
    assert retry == tag
    d.tag_done(retry, token, Diverged("peer X completed it"))
    nxt, token = d.next_tag(None)
    assert n(nxt) == n(tag) + 1
    d.tag_done(nxt, token, None)
    assert n(d.next_tag(None)[0]) == n(tag) + 2
    assert d.next_tag(5) == (5, None)  # a user tag is the caller's business


def test_a_vote_round_starts_every_member_at_one_under_the_rounds_generation():
    """The divergence above, then both peers vote: the round realigns their counts, and the
    tags of the new count carry the round, so they are never taken for the old count's."""
    a, b = AutoTags(), AutoTags()
    (ta, ka), (tb, kb) = a.take(), b.take()
    a.done(ta, ka, ok=True)
    b.done(tb, kb, ok=False)
    b.done(*b.take(), ok=True)  # b's retry: Diverged (uses the tag up)
    a_next, ka2 = a.take()  # a went on to its next call; b went to update_topology
    a.done(a_next, ka2, ok=False)  # aborted: no voter makes it
    assert a.progress()[0] != b.progress()[0] or a.progress()[1]  # the counts disagree
    assert a.new_round(1 << 40 | 7) and b.new_round(1 << 40 | 7)
    assert not a.new_round(1 << 40 | 7)  # the same round again (its answer came twice): no reset
    x, y = a.take()[0], b.take()[0]
    assert x == y and n(x) == 1 and tag_gen(x) == (1 << 40 | 7) & ((1 << 30) - 1)
    assert not a.behind(auto_tag(0, 1))  # the old count's tag 1: another generation, not "behind"
    assert not b.behind(ta)


def test_progress_and_never_made_tell_a_call_the_voter_will_not_make():
    v = AutoTags()
    v.reset(5)
    done = [v.take() for _ in range(3)]  # calls 1, 2, 3
    v.done(*done[0], ok=True)
    v.done(*done[1], ok=False)  # failed, not retried: it votes instead
    v.done(*done[2], ok=True)
    below, open_tags = v.progress()
    assert tag_count(below) == 4 and open_tags == [auto_tag(5, 2)]
    assert never_made(auto_tag(5, 4), below, open_tags) is True  # the next call: not made
    assert never_made(auto_tag(5, 9), below, open_tags) is True
    assert never_made(auto_tag(5, 2), below, open_tags) is True  # failed there, not retried
    assert never_made(auto_tag(5, 3), below, open_tags) is False  # completed there: finishing
    assert never_made(auto_tag(5, 1), below, open_tags) is False
    assert never_made(auto_tag(6, 4), below, open_tags) is None  # another generation
    assert never_made(77, below, open_tags) is None  # a caller's tag
    assert never_made(auto_tag(5, 4), 0, []) is None  # a voter that reported nothing


def test_a_long_list_of_failed_tags_is_cut_and_beyond_it_nothing_is_claimed():
    v = AutoTags()
    taken = [v.take() for _ in range(TAGS_REPORTED + 10)]
    for tag, tok in taken:
        v.done(tag, tok, ok=False)
    below, open_tags = v.progress()
    assert len(open_tags) == TAGS_REPORTED
    assert never_made(open_tags[-1], below, open_tags) is True
    assert never_made(auto_tag(0, TAGS_REPORTED + 5), below, open_tags) is None  # not in the list: unknown
