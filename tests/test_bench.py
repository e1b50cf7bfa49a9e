"""`pccl bench allreduce` end to end (coordinator, daemons, trainers; gloo beside them)."""

from __future__ import annotations

import json
import statistics

import pytest


@pytest.mark.timeout(240)
def test_bench_allreduce_rounds_against_gloo(capsys):
    pytest.importorskip("torch")
    from pccl_py.bench.allreduce import main

    assert main(["--world", "2", "--sizes", "1,70000", "--repeat", "1", "--rounds", "2",
                 "--compare", "gloo", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["size"] for r in rows] == [1, 70000]
    assert [r["algorithm"] for r in rows] == ["tree", "shm"]  # 4 B direct; 280 KB through shared memory
    for r in rows:
        assert r["rounds"] == 2 and r["links"] == "unix"
        assert len(r["seconds_by_round"]) == 2 and len(r["ratios"]) == 2
        assert r["seconds"] == statistics.median(r["seconds_by_round"]) > 0
        assert r["ratio"] == pytest.approx(statistics.median(r["ratios"]))
        assert r["gloo_seconds"] > 0
