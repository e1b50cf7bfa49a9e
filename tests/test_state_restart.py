"""A run starts again from a saved shared state after every peer and the coordinator
went: one run syncs to revision 3 and saves; a new coordinator and fresh clients with
zeroed tensors start, one loads the file, and one sync gives every peer the saved bytes
at revision 3. The run then goes on under the usual revision rule."""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest
from conftest import Coordinator, free_port

from pccl_py import Client

pytestmark = pytest.mark.timeout(120)

ARGS = ["--heartbeat-deadline", "2.0", "--recovery-grace", "0.2"]


def initial(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(200_000).astype(np.float32), "m": np.zeros(1000, np.float64),
            "rng": np.zeros(4, np.int64)}


def zeros() -> dict:
    return {k: np.zeros_like(v) for k, v in initial().items()}


def run(coordinator: Coordinator, n: int, body) -> list:
    """n clients joined by wait_for_peers; ``body(client, k)`` on each at once."""
    clients = [Client(coordinator=coordinator.addr, timeout=20.0) for _ in range(n)]
    try:
        with cf.ThreadPoolExecutor(n) as ex:
            list(ex.map(lambda c: (c.connect(), c.wait_for_peers(n, timeout=30.0)), clients))
            return [f.result(timeout=60) for f in [ex.submit(body, c, k) for k, c in enumerate(clients)]]
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("world, others", [(2, "enforce_popular"), (3, "receive_only"), (4, "enforce_popular")])
def test_a_saved_state_restarts_a_run_after_everyone_went(tmp_path, world, others):
    path = tmp_path / "state.pccl"

    def first_run(c: Client, k: int):
        st = c.shared_state(initial(), allow_content_inequality={"rng"})
        c.sync_shared_state(st)  # revision 0: the same tensors on both
        for _ in range(3):
            st["m"][...] += 1.0
            c.all_reduce(st["w"], op="avg")  # the same on both: bit parity
            st.revision += 1
            c.sync_shared_state(st)
        st["rng"][:] = k + 5  # this peer's own
        if k == 0:
            st.save(path)
        return st.revision, {name: v.tobytes() for name, v in st.tensors.items()}

    coord = Coordinator(free_port(), ARGS)
    coord.start()
    try:
        saved = run(coord, 2, first_run)
    finally:
        coord.stop()
    assert saved[0][0] == saved[1][0] == 3
    want = saved[0][1]
    assert np.all(np.frombuffer(want["m"]) == 3.0) and np.all(np.frombuffer(want["rng"], np.int64) == 5)

    def second_run(c: Client, k: int):
        st = c.shared_state(zeros(), allow_content_inequality={"rng"})
        if k == 0:
            assert st.load(path) == 3
        out = c.sync_shared_state(st, strategy="enforce_popular" if k == 0 else others)
        got = {name: v.tobytes() for name, v in st.tensors.items()}
        st.revision += 1  # established peers now: exactly one more
        nxt = c.sync_shared_state(st)
        return out, got, nxt

    coord = Coordinator(free_port(), ARGS)  # a new run: no memory of the first
    coord.start()
    try:
        results = run(coord, world, second_run)
    finally:
        coord.stop()
    for k, (out, got, nxt) in enumerate(results):
        assert out["revision"] == 3
        assert out["status"] == ("in_sync" if k == 0 else "fetched")
        assert got["w"] == want["w"] and got["m"] == want["m"]
        assert got["rng"] == (want["rng"] if k == 0 else np.zeros(4, np.int64).tobytes())  # never transferred
        assert nxt["revision"] == 4 and nxt["status"] == "in_sync"
