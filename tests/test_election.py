"""SyncRound (shared-state election) without sockets: plans, errors, deaths, deadlines."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pccl_py.coordinator.election import STRATEGIES, SyncRound, rank

pytestmark = pytest.mark.timeout(60)

A = b"\xaa" * 16
B = b"\xbb" * 16
C = b"\xcc" * 16


def rows(*hashes, size=64):
    return [[f"t{i}", size, h] for i, h in enumerate(hashes)]


def by_peer(out):
    got = {}
    for peer, msg in out:
        got.setdefault(peer, []).append(msg)
    return got


def addr(p):
    return ("127.0.0.1", 1000 + (int(p[1:]) if p[1:].isdigit() else len(p)))


def run_offers(r, offers, now=0.0):
    out = []
    for peer, rev, tensors, strategy in offers:
        d = r.offer(now, peer, rev, tensors, strategy, addr(peer))
        assert isinstance(d.reason, str)
        out += d.out
    return by_peer(out)


def test_popular_state_wins_and_outdated_fetch_from_all_holders():
    r = SyncRound(["p1", "p2", "p3", "p4"], 0.0, 10.0)
    got = run_offers(r, [
        ("p1", 1, rows(A, B), "enforce_popular"),
        ("p2", 1, rows(A, B), "enforce_popular"),
        ("p3", 1, rows(A, C), "enforce_popular"),
        ("p4", 1, rows(A, B), "enforce_popular"),
    ])
    assert r.phase == "transferring"
    for p in ("p1", "p2", "p4"):
        assert got[p][0]["status"] == "in_sync" and got[p][0]["revision"] == 1
    plan = got["p3"][0]
    assert plan["status"] == "fetch"
    assert plan["tensors"] == [["t1", 64, B]]  # only the differing tensor moves
    assert [s[0] for s in plan["sources"]] == ["p1", "p2", "p4"]
    assert plan["sources"][0] == ["p1", "127.0.0.1", 1001]
    d = r.transfer_done(1.0, "p3", True, round_id=0)
    done = by_peer(d.out)
    assert set(done) == {"p1", "p2", "p3", "p4"}
    assert all(m[0]["type"] == "sync_complete" and m[0]["status"] == "ok" for m in done.values())
    assert r.done and r.synced == {"p1": 1, "p2": 1, "p3": 1, "p4": 1}


def test_in_step_peers_complete_at_once():
    r = SyncRound(["p1", "p2"], 0.0, 10.0)
    got = run_offers(r, [("p1", 3, rows(A), "enforce_popular"), ("p2", 3, rows(A), "enforce_popular")])
    assert r.done
    assert [m["type"] for m in got["p1"]] == ["sync_plan", "sync_complete"]
    assert got["p2"][0]["status"] == "in_sync"


def test_messages_fit_msgpack_and_the_schema():
    from pccl_py.wire import control as protocol
    from pccl_py.wire.control import SYNC_SCHEMA

    r = SyncRound(["p1", "p2"], 0.0, 10.0, known={"p1": 0, "p2": 5})
    got = run_offers(r, [("p1", 1, rows(A), "enforce_popular"), ("p2", 1, rows(B), "enforce_popular")])
    msgs = [m for ms in got.values() for m in ms]
    r2 = SyncRound(["p1", "p2"], 0.0, 10.0)
    msgs += [m for ms in run_offers(r2, [("p1", 1, rows(A), "enforce_popular"),
                                         ("p2", 1, rows(B), "receive_only")]).values() for m in ms]
    msgs += [m for _, m in r2.transfer_done(0.0, "p2", True).out]
    assert {m["type"] for m in msgs} == {"sync_plan", "sync_complete"}
    for m in msgs:
        back = msgpack.unpackb(msgpack.packb(m, use_bin_type=True), raw=False)
        body = {k: v for k, v in back.items() if k != "type"}
        protocol._check_map(m["type"], SYNC_SCHEMA[m["type"]], body)
    offer = {"round_hint": 0, "revision": 1, "strategy": "send_only", "tensors": rows(A, B),
             "host": "127.0.0.1", "port": 5, "timeout": 3.0}
    protocol._check_map("sync_offer", SYNC_SCHEMA["sync_offer"], offer)
    protocol._check_map("sync_done", SYNC_SCHEMA["sync_done"],
                        {"round": 0, "ok": True, "rx_bytes": 5, "error": "", "message": ""})


def test_receive_only_never_wins():
    # two receive_only peers agree, one enforce_popular peer differs: the lone sender wins
    r = SyncRound(["p1", "p2", "p3"], 0.0, 10.0)
    got = run_offers(r, [
        ("p1", 1, rows(A), "receive_only"),
        ("p2", 1, rows(A), "receive_only"),
        ("p3", 1, rows(B), "enforce_popular"),
    ])
    assert got["p3"][0]["status"] == "in_sync"
    for p in ("p1", "p2"):
        assert got[p][0]["status"] == "fetch"
        assert [s[0] for s in got[p][0]["sources"]] == ["p3"]


def test_receive_only_in_sync_is_not_a_source():
    r = SyncRound(["p1", "p2", "p3"], 0.0, 10.0)
    got = run_offers(r, [
        ("p1", 1, rows(A), "receive_only"),
        ("p2", 1, rows(A), "enforce_popular"),
        ("p3", 1, rows(B), "enforce_popular"),
    ])
    # tie 1:1 between A (p2) and B (p3): same revision, smallest bytes wins -> A
    assert got["p1"][0]["status"] == "in_sync"
    assert got["p3"][0]["status"] == "fetch"
    assert [s[0] for s in got["p3"][0]["sources"]] == ["p2"]


def test_only_receive_only_peers_is_an_error_for_all():
    r = SyncRound(["p1", "p2"], 0.0, 10.0)
    got = run_offers(r, [("p1", 1, rows(A), "receive_only"), ("p2", 1, rows(A), "receive_only")])
    assert all(got[p][0]["status"] == "error" and got[p][0]["error"] == "InvalidUsage" for p in got)
    assert r.done


def test_send_only_mismatch_is_told():
    r = SyncRound(["p1", "p2", "p3"], 0.0, 10.0)
    got = run_offers(r, [
        ("p1", 1, rows(A), "enforce_popular"),
        ("p2", 1, rows(A), "enforce_popular"),
        ("p3", 1, rows(B), "send_only"),
    ])
    assert got["p3"][0]["status"] == "error" and got["p3"][0]["error"] == "InvalidUsage"
    assert "send_only" in got["p3"][0]["message"]
    assert got["p1"][0]["status"] == "in_sync" and got["p2"][0]["status"] == "in_sync"
    assert r.done and "p3" not in r.synced


def test_send_only_matching_winner_serves():
    r = SyncRound(["p1", "p2"], 0.0, 10.0)
    got = run_offers(r, [("p1", 1, rows(A), "send_only"), ("p2", 1, rows(B), "receive_only")])
    assert got["p1"][0]["status"] == "in_sync"
    assert got["p2"][0]["sources"][0][0] == "p1"


def test_revision_violation_fails_that_peer_alone():
    r = SyncRound(["p1", "p2", "p3"], 0.0, 10.0, known={"p1": 4, "p2": 4, "p3": 4})
    got = run_offers(r, [
        ("p1", 5, rows(A), "enforce_popular"),
        ("p2", 7, rows(A), "enforce_popular"),
        ("p3", 5, rows(B), "enforce_popular"),
    ])
    bad = got["p2"][0]
    assert bad["status"] == "error" and bad["error"] == "RevisionError"
    assert "expected revision 5" in bad["message"] and "offered 7" in bad["message"]
    assert got["p1"][0]["status"] in ("in_sync", "fetch")
    assert got["p3"][0]["status"] in ("in_sync", "fetch")
    assert {got["p1"][0]["status"], got["p3"][0]["status"]} == {"in_sync", "fetch"}


def test_newcomers_cannot_outvote_established_peers():
    r = SyncRound(["old", "n1", "n2"], 0.0, 10.0, known={"old": 9})
    got = run_offers(r, [
        ("old", 10, rows(A), "enforce_popular"),
        ("n1", 0, rows(B), "enforce_popular"),
        ("n2", 0, rows(B), "enforce_popular"),
    ])
    assert got["old"][0]["status"] == "in_sync"
    for p in ("n1", "n2"):
        assert got[p][0]["status"] == "fetch" and got[p][0]["revision"] == 10
    r.transfer_done(1.0, "n1", True)
    r.transfer_done(1.0, "n2", False, "PeerLost", "sources gone")
    assert r.done and r.synced == {"old": 10, "n1": 10}


def test_a_restored_state_wins_the_first_sync_of_a_run_over_more_fresh_peers():
    """No established peer: the highest revision wins before the most peers, so a run
    restarted from a saved state (one peer offers revision 7) resumes from it."""
    r = SyncRound(["saved", "f1", "f2"], 0.0, 10.0)
    got = run_offers(r, [
        ("saved", 7, rows(A), "enforce_popular"),
        ("f1", 0, rows(B), "enforce_popular"),
        ("f2", 0, rows(B), "enforce_popular"),
    ])
    assert got["saved"][0]["status"] == "in_sync" and got["saved"][0]["revision"] == 7
    for p in ("f1", "f2"):
        assert got[p][0]["status"] == "fetch" and got[p][0]["revision"] == 7
    assert rank((7, (("a", 1, A),)), 1, established=False) < rank((0, (("a", 1, B),)), 2, established=False)
    assert rank((0, (("a", 1, B),)), 2) < rank((7, (("a", 1, A),)), 1)  # established: most peers first


def test_same_content_older_revision_is_in_sync():
    r = SyncRound(["p1", "p2"], 0.0, 10.0, known={"p1": 4, "p2": 3})
    got = run_offers(r, [("p1", 5, rows(A), "enforce_popular"), ("p2", 4, rows(A), "enforce_popular")])
    assert got["p2"][0]["status"] == "in_sync" and got["p2"][0]["revision"] == 5
    assert r.done


def test_layout_mismatch_is_an_error():
    r = SyncRound(["p1", "p2", "p3"], 0.0, 10.0)
    got = run_offers(r, [
        ("p1", 1, rows(A, B), "enforce_popular"),
        ("p2", 1, rows(A, B), "enforce_popular"),
        ("p3", 1, rows(A, B, size=32), "enforce_popular"),
    ])
    assert got["p3"][0]["status"] == "error" and "sizes differ" in got["p3"][0]["message"]


def test_ties_are_deterministic_whatever_the_order():
    offers = [("p1", 1, rows(B), "enforce_popular"), ("p2", 1, rows(A), "enforce_popular"),
              ("p3", 2, rows(C), "enforce_popular"), ("p4", 2, rows(C), "receive_only")]
    winners = set()
    for order in (offers, offers[::-1], offers[1:] + offers[:1]):
        r = SyncRound(["p1", "p2", "p3", "p4"], 0.0, 10.0)
        got = run_offers(r, order)
        winners.add(tuple(sorted(p for p in got if got[p][0]["status"] == "in_sync")))
    assert winners == {("p3", "p4")}  # one vote each: the higher revision wins
    assert rank((1, (("a", 1, A),)), 2) < rank((5, (("a", 1, A),)), 1)


def test_member_death_before_and_during_transfer():
    r = SyncRound(["p1", "p2", "p3"], 0.0, 10.0)
    run_offers(r, [("p1", 1, rows(A), "enforce_popular"), ("p2", 1, rows(B), "enforce_popular")])
    d = r.member_gone(0.5, "p3")  # the last one dies before offering: election happens now
    got = by_peer(d.out)
    assert {m["status"] for m in (got["p1"][0], got["p2"][0])} == {"in_sync", "fetch"}
    fetcher = "p2" if got["p2"][0]["status"] == "fetch" else "p1"
    src = "p1" if fetcher == "p2" else "p2"
    d = r.member_gone(1.0, src)  # a source dies: the fetcher deals with it; round waits
    assert d.out == [] and not r.done
    d = r.member_gone(1.5, fetcher)  # the fetcher dies: round ends with nobody left
    assert r.done


def test_deadline_waiting_for_offers():
    r = SyncRound(["p1", "p2"], 0.0, 2.0)
    run_offers(r, [("p1", 1, rows(A), "enforce_popular")])
    assert r.tick(1.0).out == []
    d = r.tick(2.5)
    assert d.out[0][0] == "p1" and d.out[0][1]["error"] == "DeadlineExceeded"
    assert "p2" in d.out[0][1]["message"] and r.done


def test_deadline_waiting_for_fetchers():
    r = SyncRound(["p1", "p2"], 0.0, 2.0, transfer_timeout=5.0)
    run_offers(r, [("p1", 1, rows(A), "enforce_popular"), ("p2", 1, rows(B), "receive_only")], now=1.0)
    assert r.tick(5.0).out == []
    got = by_peer(r.tick(6.5).out)
    assert got["p2"][0]["error"] == "DeadlineExceeded"
    assert got["p1"][0]["status"] == "ok" and r.done


def test_bad_and_late_offers():
    r = SyncRound(["p1"], 0.0, 2.0)
    d = r.offer(0.0, "stranger", 1, rows(A))
    assert d.out[0][1]["status"] == "error"
    d = r.offer(0.0, "p1", 1, [["t0", -1, A]], "enforce_popular")
    assert d.out[0][1]["status"] == "error" and "bad sync offer" in d.out[0][1]["message"]
    assert r.done or r.phase == "done"
    d = r.offer(0.0, "p1", 1, rows(A))
    assert d.out[0][1]["status"] == "error"


def test_allow_content_inequality_tensors_are_simply_absent():
    # the daemon leaves excluded tensors out of its offer: differing excluded content is no fetch
    r = SyncRound(["p1", "p2"], 0.0, 10.0)
    got = run_offers(r, [("p1", 1, [["w", 8, A]], "enforce_popular"),
                         ("p2", 1, {"w": (8, A)}, "enforce_popular")])
    assert got["p1"][0]["status"] == got["p2"][0]["status"] == "in_sync"


offer_st = st.tuples(
    st.integers(0, 3),  # revision offset
    st.sampled_from([A, B, C]),
    st.sampled_from(STRATEGIES),
    st.booleans(),  # known
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(offer_st, min_size=1, max_size=7), st.randoms(use_true_random=False))
def test_invariants(specs, rnd):
    peers = [f"p{i}" for i in range(len(specs))]
    known = {p: 4 for p, s in zip(peers, specs, strict=True) if s[3]}
    r = SyncRound(peers, 0.0, 10.0, known=known)
    order = list(zip(peers, specs, strict=True))
    rnd.shuffle(order)
    out = []
    for p, (roff, h, strat, _) in order:
        out += r.offer(0.0, p, 4 + roff, rows(h), strat, addr(p)).out
    plans = by_peer(out)
    assert set(plans) == set(peers)
    for p in peers:
        assert plans[p][0]["type"] == "sync_plan"
    offers = dict(order)
    in_sync = [p for p in peers if plans[p][0]["status"] == "in_sync"]
    fetchers = [p for p in peers if plans[p][0]["status"] == "fetch"]
    for p in peers:
        roff, h, strat, kn = offers[p]
        plan = plans[p][0]
        if kn and roff != 1:
            assert plan["error"] == "RevisionError"
        if strat == "send_only":
            assert plan["status"] in ("in_sync", "error")
        if plan["status"] == "error":
            assert plan["error"] in ("RevisionError", "InvalidUsage")
    if in_sync or fetchers:
        # the winner is held by at least one non-receive_only peer
        winner = (r.winner[0], r.winner[1][0][2])
        holders = [p for p in in_sync if (4 + offers[p][0], offers[p][1]) == winner]
        assert any(offers[p][2] != "receive_only" for p in holders)
        for p in fetchers:
            srcs = [s[0] for s in plans[p][0]["sources"]]
            assert srcs and p not in srcs
            for s in srcs:
                assert offers[s][2] != "receive_only" and (4 + offers[s][0], offers[s][1]) == winner
            assert plans[p][0]["revision"] == r.revision
    # finish the round (fetchers report, fail or die; sources may die): every surviving
    # non-error peer gets exactly one sync_complete, and nothing goes to the dead
    fin = [m for m in out if m[1]["type"] == "sync_complete"]
    dead = set()
    for p in fetchers + in_sync:
        x = rnd.random()
        if p in fetchers and x < 0.6:
            fin += r.transfer_done(1.0, p, x < 0.4).out
        elif x < 0.8 and not r.done:
            dead.add(p)
            fin += r.member_gone(1.0, p).out
    fin += r.tick(100.0).out  # fetchers that never reported time out
    assert r.done
    done = by_peer(fin)
    assert set(done) == (set(in_sync) | set(fetchers)) - dead
    assert all(len(v) == 1 for v in done.values())
    assert set(r.synced) <= set(done)


def test_completes_come_together_with_each_fetchers_result():
    r = SyncRound(["p1", "p2", "p3"], 0.0, 10.0)
    run_offers(r, [("p1", 1, rows(A), "enforce_popular"), ("p2", 1, rows(B), "receive_only"),
                   ("p3", 1, rows(C), "receive_only")])
    assert r.transfer_done(1.0, "p2", False, "PeerLost", "sources gone").out == []
    got = by_peer(r.transfer_done(1.0, "p3", True).out)
    assert set(got) == {"p1", "p2", "p3"} and r.done
    assert got["p2"][0]["status"] == "error" and got["p2"][0]["error"] == "PeerLost"
    assert got["p1"][0]["status"] == got["p3"][0]["status"] == "ok"
    assert r.synced == {"p1": 1, "p3": 1}


def test_refused_offer_may_be_replaced_while_collecting():
    r = SyncRound(["p1", "p2"], 0.0, 10.0, known={"p1": 1, "p2": 1})
    got = run_offers(r, [("p1", 5, rows(A), "enforce_popular")])
    assert got["p1"][0]["error"] == "RevisionError"
    got = run_offers(r, [("p1", 2, rows(A), "enforce_popular"), ("p2", 2, rows(A), "enforce_popular")])
    assert got["p1"][0]["status"] == "in_sync" and r.done
