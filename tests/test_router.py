"""The router alone: headers, peer ids and clock values in, verdicts and reasons out."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from pccl_py.daemon.router import DELIVER, DIVERGED, DROP, PEND, STALL, Router
from pccl_py.errors import InvalidUsage
from pccl_py.wire import frames as F

MEMBERS = ["a", "b", "c"]  # we are "a", rank 0


def hdr(kind=F.DATA, *, epoch=1, group=0, tag=5, attempt=0, length=16) -> F.Header:
    step = 0
    if kind != F.DATA:
        length = 0
        step = F.ERR_ABORTED if kind == F.ERROR else 0
    return F.decode_header(F.pack_header(kind, group, epoch, tag, attempt, step, 0, length))


def router(**kw) -> Router:
    r = Router(stall_timeout=10.0, **kw)
    r.set_topology(1, 0, 0, MEMBERS)
    return r


def post(r: Router, tag: int, epoch: int = 1):
    op = SimpleNamespace(tag=tag, attempt=r.post(tag), done=False, link=SimpleNamespace(epoch=epoch))
    r.add(op)
    return op


def test_a_frame_of_a_posted_call_goes_to_it_with_the_senders_rank():
    r = router()
    op = post(r, 5)
    v = r.route(hdr(tag=5), "c")
    assert (v.action, v.op, v.src) == (DELIVER, op, 2)


def test_frames_of_no_call_yet_stall_or_are_remembered():
    r = router()
    assert r.route(hdr(tag=9), "b").action == STALL  # DATA: the stream waits (or the frame is held)
    assert r.route(hdr(F.FIN, tag=9), "b").action == PEND  # FIN/ERROR never stall a stream
    assert r.route(hdr(epoch=2), "b").action == STALL  # a newer epoch: our topology is behind


@pytest.mark.parametrize("h,pid,level,words", [
    (hdr(epoch=0), "b", logging.INFO, "stale epoch 0"),
    (hdr(group=3), "b", logging.WARNING, "group 3"),
    (hdr(), "x", logging.WARNING, "not a member"),
    (hdr(), "a", logging.WARNING, "not a member"),  # our own id on a link: never a member frame
])
def test_drops_say_why_once_per_burst(h, pid, level, words):
    r = router()
    r.set_topology(1, 0, 0, MEMBERS)
    first = r.route(h, pid)
    assert first.action == DROP and first.note[0] == level and words in first.note[1]
    again = r.route(h, pid)
    assert again.action == DROP and again.note is None


def test_attempts_number_the_posts_of_a_tag_and_keep_them_apart():
    r = router()
    op = post(r, 5)
    assert op.attempt == 0
    with pytest.raises(InvalidUsage, match="already in flight"):
        r.post(5)
    assert r.route(hdr(attempt=1), "b").action == STALL  # the sender's retry: wait for ours
    r.finish(op)
    assert r.route(hdr(attempt=0), "b").action == DROP  # a late frame of the finished attempt
    op2 = post(r, 5)
    assert op2.attempt == 1
    assert r.route(hdr(attempt=1), "b").action == DELIVER
    v = r.route(hdr(attempt=0), "b")
    assert v.action == DROP and "attempt 0 of tag 5" in v.note[1]


def test_a_peer_retrying_a_call_completed_here_is_told_once():
    r = router()
    r.behind = lambda tag: tag == 7
    v = r.route(hdr(tag=7), "c")
    assert v.action == DIVERGED and v.src == 2 and "diverged" in v.note[1]
    again = r.route(hdr(tag=7), "c")
    assert again.note is None and again.action == DROP  # told once per attempt
    assert r.route(hdr(tag=8), "c").action == STALL


def test_frames_of_a_count_a_vote_round_ended_are_dropped_not_stalled_on():
    """A call aborted before a vote round (its peers went to update_topology): its frames
    would hold their stream for stall_timeout, behind every frame of the new count."""
    from pccl_py.calls import auto_tag
    from pccl_py.daemon.tags import AutoTags

    tags = AutoTags()
    tags.reset(7)
    r = router()
    r.stale = tags.stale
    old = hdr(tag=auto_tag(7, 3))
    assert r.route(old, "b").action == STALL  # the count it belongs to is the current one
    tags.new_round(8)
    v = r.route(old, "b")
    assert v.action == DROP and "vote round" in v.note[1]
    assert r.route(hdr(tag=auto_tag(9, 1)), "b").action == STALL  # a round not reached yet: wait
    assert r.route(hdr(tag=auto_tag(8, 1)), "b").action == STALL
    assert r.route(hdr(tag=3), "b").action == STALL  # a caller's tag


def test_a_dropped_attempt_counts_as_made_so_the_next_post_pairs_with_the_retry():
    r = router()
    assert r.attempt_dropped(hdr(tag=4, attempt=0), "b")
    assert r.post(4) == 1
    assert not r.attempt_dropped(hdr(tag=4, epoch=0), "b")  # another epoch: nothing to tell
    assert not r.attempt_dropped(hdr(tag=4), "x")  # not a member


def test_held_frames_are_bounded_and_released_in_order_for_their_attempt():
    r = router(held_max=3, held_max_bytes=100)
    assert r.can_hold(hdr(length=40))
    assert not r.can_hold(hdr(F.FIN))
    assert not r.can_hold(hdr(length=F.TINY_BYTES + 1))
    assert not r.can_hold(hdr(epoch=2))  # only frames of this epoch: a new one drops them all
    r.hold(hdr(tag=5, attempt=0, length=40), "b", "s1", b"x", now=0.0)
    r.hold(hdr(tag=5, attempt=1, length=40), "c", "s2", b"y", now=1.0)
    assert not r.can_hold(hdr(length=40))  # 80 + 40 > 100 bytes
    r.hold(hdr(tag=5, attempt=0, length=10), "c", "s3", b"z", now=2.0)
    assert not r.can_hold(hdr(length=1))  # three frames
    op = post(r, 5)  # attempt 0
    got = r.take_held(op)
    assert [(src, h.source) for src, h in got] == [(1, "s1"), (2, "s3")]
    assert r.held_count == 1 and r.held_bytes == 40  # attempt 1's frame waits for its post
    assert r.next_deadline() == 11.0
    assert r.expired(10.9) == []
    (late,) = r.expired(11.0)
    assert late.source == "s2" and r.held_count == 0 and r.held_bytes == 0


def test_a_newer_epoch_ends_calls_and_forgets_what_belonged_to_the_old_one():
    r = router()
    op = post(r, 5)
    r.hold(hdr(tag=6), "b", None, b"", now=0.0)
    r.remember_ctrl(hdr(F.FIN, tag=6), "b", "")
    r.remember_ctrl(hdr(F.FIN, tag=6, epoch=3), "b", "")
    assert r.set_topology(1, 0, 0, MEMBERS) == []  # the same epoch again: nothing ends
    assert r.set_topology(2, 0, 1, ["b", "a"]) == [op]
    assert r.held_count == 0 and not r.ops
    assert r.post(5) == 0  # attempts count afresh
    assert r.route(hdr(epoch=2), "b").src == 0  # ranks of the new topology
    assert r.take_ctrl(SimpleNamespace(tag=6, attempt=0, link=SimpleNamespace(epoch=1))) == []
    kept = r.take_ctrl(SimpleNamespace(tag=6, attempt=0, link=SimpleNamespace(epoch=3)))
    assert kept == [("b", F.FIN, 0, "")]


def test_nothing_routes_before_a_topology():
    r = Router()
    assert r.route(hdr(), "b").action == STALL
    assert r.route(hdr(F.ERROR), "b").action == PEND
