"""Shared state end to end through the public API: Clients -> private daemons -> coordinator.

Every peer is a real ``Client`` with its own daemon process; the coordinator is a real
process (the ``coordinator`` fixture). Calls that every peer makes run in threads.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time

import numpy as np
import pytest

from pccl_py import Client, DeadlineExceeded, InvalidUsage, RevisionError
from pccl_py.daemon.state_hash import hash_buffer

pytestmark = pytest.mark.timeout(90)


def digest(state) -> bytes:
    return b"".join(hash_buffer(v) for v in state.views().values())


def content(seed: int, n: int = 10_000) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(n).astype(np.float32), "b": rng.integers(0, 100, 64).astype(np.int64)}


class Run:
    """Clients, their executor, and helpers for collective calls."""

    def __init__(self, coordinator) -> None:
        self.addr = coordinator.addr
        self.clients: list[Client] = []
        self.ex = cf.ThreadPoolExecutor(8)

    def add(self, n: int = 1) -> list[Client]:
        """Start n clients and admit them: whoever is accepted votes while the others connect."""
        new = list(self.ex.map(lambda _: Client(coordinator=self.addr, timeout=20.0), range(n)))
        want = len(self.clients) + n
        futs = [self.ex.submit(c.connect) for c in new]
        deadline = time.monotonic() + 40
        while True:
            cf.wait(futs, timeout=0.5)
            joined = [c for c, f in zip(new, futs) if f.done() and f.result()]
            voters = self.clients + joined
            sizes = list(self.ex.map(self._vote, voters))
            if len(joined) == n and min(sizes) >= want:
                break
            assert time.monotonic() < deadline, f"peers not admitted: {sizes}"
        self.clients += new
        return new

    @staticmethod
    def _vote(c: Client) -> int:
        try:
            return c.update_topology(timeout=3.0)["world_size"]
        except DeadlineExceeded:  # a peer accepted meanwhile has not voted: vote again
            return 0

    def each(self, fn, *args_per_client, timeout: float = 40.0) -> list:
        """fn(client, *args) on every client at once; returns results or exceptions."""
        futs = [self.ex.submit(fn, c, *a) for c, *a in zip(self.clients, *args_per_client)]
        out = []
        for f in futs:
            try:
                out.append(f.result(timeout=timeout))
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                out.append(exc)
        return out

    def sync(self, states, strategies=None, timeout: float = 30.0) -> list:
        strategies = strategies or ["enforce_popular"] * len(states)
        return self.each(lambda c, s, how: c.sync_shared_state(s, strategy=how, timeout=timeout),
                         states, strategies)

    def close(self) -> None:
        for c in self.clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        self.ex.shutdown(wait=False, cancel_futures=True)


@pytest.fixture
def run(coordinator):
    r = Run(coordinator)
    try:
        yield r
    finally:
        r.close()


def ok(results) -> list[dict]:
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def test_newcomer_repair_and_revision_rule(run):
    a, b = run.add(2)
    sa, sb = a.shared_state(content(1)), b.shared_state(content(1))
    assert [r["rx_bytes"] for r in ok(run.sync([sa, sb]))] == [0, 0]
    sa.revision += 1
    sb.revision += 1
    res = ok(run.sync([sa, sb]))
    assert [r["status"] for r in res] == ["in_sync", "in_sync"] and sa.revision == sb.revision == 1

    # a newcomer with other content joins; its first sync takes the run's state, byte for byte
    (c,) = run.add(1)
    sc = c.shared_state(content(99))
    assert digest(sc) != digest(sa)
    sa.revision += 1
    sb.revision += 1
    ra, rb, rc = ok(run.sync([sa, sb, sc]))
    assert ra["rx_bytes"] == rb["rx_bytes"] == 0 and ra["status"] == rb["status"] == "in_sync"
    assert rc["status"] == "fetched" and rc["rx_bytes"] == sa.nbytes and rc["revision"] == 2
    assert sc.revision == 2
    assert digest(sc) == digest(sa) == digest(sb)
    assert bytes(sc.buffer()[: sc.nbytes]) == bytes(sa.buffer()[: sa.nbytes])
    assert rc["sources_used"] >= 1

    # one peer's tensor gets corrupted: the popular state repairs exactly that tensor
    sb["w"][123] += 1.0
    for s in (sa, sb, sc):
        s.revision += 1
    ra, rb, rc = ok(run.sync([sa, sb, sc]))
    assert rb["status"] == "fetched" and rb["rx_bytes"] == sb["w"].nbytes
    assert ra["rx_bytes"] == rc["rx_bytes"] == 0
    assert digest(sa) == digest(sb) == digest(sc)

    # a revision that skips ahead fails for that peer alone, naming both revisions
    sa.revision += 1
    sb.revision += 1
    sc.revision += 2
    ra, rb, rc = run.sync([sa, sb, sc])
    assert isinstance(rc, RevisionError), rc
    assert "expected revision 4" in str(rc) and "offered 5" in str(rc)
    assert ra["status"] == rb["status"] == "in_sync" and sa.revision == sb.revision == 4
    # the offender's last synced revision is still 3: it offers 4, the others 5; same content,
    # so it is in sync and everyone ends at 5
    assert sc.revision == 5
    sc.revision = 4
    sa.revision += 1
    sb.revision += 1
    assert {r["status"] for r in ok(run.sync([sa, sb, sc]))} == {"in_sync"}
    assert sa.revision == sb.revision == sc.revision == 5


def test_strategies_and_sizes(run):
    a, b = run.add(2)
    mib = 3 << 20  # a few MiB, plus a tensor of size 0
    big = {"x": np.arange(mib // 4, dtype=np.float32), "empty": np.zeros(0, np.float32),
           "y": np.ones(7, np.int16)}
    sa = a.shared_state(big)
    sb = b.shared_state({k: np.zeros_like(v) for k, v in big.items()})
    # receive_only never wins (b's state is no candidate, though it would tie with a's)
    ra, rb = ok(run.sync([sa, sb], ["send_only", "receive_only"]))
    assert ra["status"] == "in_sync" and ra["tx_bytes"] == sa.nbytes
    assert rb["status"] == "fetched" and rb["rx_bytes"] == sa.nbytes == mib + 14
    assert np.array_equal(sb["x"], big["x"]) and sb["empty"].size == 0 and digest(sa) == digest(sb)
    # a send_only peer whose state lost the election fails with InvalidUsage; the winner is fine
    sa.revision += 1
    sb.revision += 1
    sb["y"][0] = 5
    ra, rb = run.sync([sa, sb], ["send_only", "send_only"])
    errors = [r for r in (ra, rb) if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], InvalidUsage) and "send_only" in str(errors[0])
    # nobody may win: every receive_only peer gets InvalidUsage (the winner advanced to
    # revision 1 and offers 2; the loser's revision stayed at 0, so it offers 1 again)
    winner, loser = (sb, sa) if errors[0] is ra else (sa, sb)
    assert (winner.revision, loser.revision) == (1, 1)
    winner.revision += 1
    ra, rb = run.sync([sa, sb], ["receive_only", "receive_only"])
    assert isinstance(ra, InvalidUsage) and isinstance(rb, InvalidUsage)


def test_parity_under_churn(run):
    run.add(3)
    states = [c.shared_state(content(7 + i, 4096)) for i, c in enumerate(run.clients)]
    ok(run.sync(states))
    assert len({digest(s) for s in states}) == 1
    for step in range(2):
        # kill one peer's daemon outright; the survivors sync without it
        victim = run.clients.pop(0)
        states.pop(0)
        os.kill(victim._proc.pid, signal.SIGKILL)
        victim._proc.wait(5)
        for s in states:
            w = s["w"]
            w *= 0.5
            w += step
            s.revision += 1
        res = ok(run.sync(states))
        assert len({digest(s) for s in states}) == 1, f"step {step}: parity broken after the death"
        assert all(r["rx_bytes"] == 0 for r in res)
        try:
            victim.close()
        except Exception:  # noqa: BLE001 - its daemon is gone
            pass
        # a newcomer joins and takes the state
        (new,) = run.add(1)
        states.append(new.shared_state(content(1000 + step, 4096)))
        for s in states[:-1]:
            s.revision += 1
        res = ok(run.sync(states))
        assert res[-1]["status"] == "fetched" and res[-1]["rx_bytes"] == states[0].nbytes
        assert len({digest(s) for s in states}) == 1, f"step {step}: newcomer not in parity"
        assert len({s.revision for s in states}) == 1


def test_newcomer_sees_progress_of_a_large_fetch(run):
    import io

    from pccl_py.client.progress import ProgressBar

    a, b = run.add(2)
    big = {"w": np.arange(6 << 20, dtype=np.float32)}  # 24 MiB: several fetch chunks
    sa, sb = a.shared_state(big), b.shared_state(big)
    ok(run.sync([sa, sb]))
    (c,) = run.add(1)
    sc = c.shared_state({"w": np.zeros(6 << 20, dtype=np.float32)})
    seen: list[tuple[int, int]] = []
    out = io.StringIO()
    bar = ProgressBar("sync", stream=out)

    def progress(done, total):
        seen.append((done, total))
        bar(done, total)

    for s in (sa, sb):
        s.revision += 1
    futs = [run.ex.submit(x.sync_shared_state, s, timeout=30.0) for x, s in ((a, sa), (b, sb))]
    rc = c.sync_shared_state(sc, timeout=30.0, progress=progress)
    for f in futs:
        f.result(timeout=30)
    assert rc["status"] == "fetched" and rc["rx_bytes"] == 24 << 20
    assert seen and seen[-1] == (24 << 20, 24 << 20)
    assert all(d1 <= d2 for (d1, _), (d2, _) in zip(seen, seen[1:]))
    assert "100.0%" in out.getvalue()
    assert digest(sc) == digest(sa)
