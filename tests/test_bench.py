"""`pccl bench allreduce` end to end (coordinator, daemons, trainers; gloo beside them)."""

from __future__ import annotations

import json
import statistics

import pytest


@pytest.mark.timeout(240)
def test_bench_allreduce_rounds_against_gloo(capsys):
    pytest.importorskip("torch")
    from pccl_py.tools.bench.allreduce import main

    assert main(["--world", "2", "--sizes", "1,70000", "--repeat", "1", "--rounds", "2",
                 "--compare", "gloo", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["size"] for r in rows] == [1, 70000]
    assert [r["algorithm"] for r in rows] == ["direct", "shm"]  # 4 B direct; 280 KB through shared memory
    for r in rows:
        assert r["rounds"] == 2 and r["links"] == "unix"
        assert len(r["seconds_by_round"]) == 2 and len(r["ratios"]) == 2
        assert r["seconds"] == statistics.median(r["seconds_by_round"]) > 0
        assert r["ratio"] == pytest.approx(statistics.median(r["ratios"]))
        assert r["gloo_seconds"] > 0


@pytest.mark.timeout(120)
def test_bench_floor_is_a_correct_all_reduce_timed_beside_ours(capsys):
    from pccl_py.tools.bench.allreduce import main

    # each floor rank checks its result against the exact sum and exits non-zero otherwise
    assert main(["--world", "3", "--sizes", "0,1,70001", "--repeat", "1", "--floor", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["size"] for r in rows] == [0, 1, 70001]
    for r in rows:
        assert r["floor_seconds"] > 0 and r["gloo_seconds"] is None
        assert r["floor_ratio"] == pytest.approx(r["floor_seconds"] / r["seconds"])


def test_floor_barrier_gives_up_at_its_deadline(tmp_path):
    import os
    import time

    from pccl_py.tools.bench.floor import _Barrier
    from pccl_py.transport.segments import create_segment

    seg = create_segment(4096, prefix="pccl_test_")
    try:
        _Barrier.prepare(seg.buf)
        fifos = [str(tmp_path / f"r{r}") for r in range(2)]
        for f in fifos:
            os.mkfifo(f)
        bar = _Barrier(seg.buf, fifos, 0, time.monotonic() + 0.2)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="not every rank arrived"):
            bar.wait()  # rank 1 never comes
        assert 0.15 < time.monotonic() - t0 < 2.0
        bar.close()
    finally:
        seg.close()
        seg.unlink()
