"""Every example in examples/ runs at small scale: its trainers start together, train,
keep bit-identical outer state (checked through all_gather at every outer step) and end
with a held-out loss below the untrained model's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(240)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--peers", "2", "--outer-steps", "4", "--inner-steps", "6"]


@pytest.mark.parametrize("script,extra", [
    ("diloco.py", []),
    ("diloco.py", ["--quant", "uint8"]),
    ("delayed_diloco.py", []),
    ("streaming_diloco.py", ["--fragments", "2", "--overlap", "3", "--quant", "uint4"]),
    ("sparse_loco.py", ["--density", "0.05"]),
])
def test_example_runs_with_parity_and_learns(tmp_path, script, extra):
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", script), *SMALL, *extra,
                           "--json", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["failed"] == [] and summary["parity_breaks"] == 0
    assert len(summary["eval_losses"]) == 2
    assert summary["final_eval_loss"] < math.log(16) - 0.05  # below the untrained model's loss
    assert "done: final held-out loss" in proc.stdout


@pytest.mark.parametrize("script,extra", [
    ("delayed_diloco.py", []),
    ("streaming_diloco.py", ["--fragments", "2", "--overlap", "3"]),
    ("sparse_loco.py", ["--density", "0.05"]),
])
def test_example_survives_a_kill_and_a_join(tmp_path, script, extra):
    """A trainer SIGKILLed at outer step 2, a new one joining at step 4: the survivors go on
    with only the retries the modes make, the newcomer is admitted while they train, and
    parity holds at every step."""
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", script), "--peers", "3",
                           "--outer-steps", "10", "--inner-steps", "6", "--kill-at", "2", "--join-at", "4", *extra,
                           "--json", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["failed"] == [] and summary["parity_breaks"] == 0
    assert len(summary["eval_losses"]) == 3  # two survivors and the newcomer finished
    assert "SIGKILL trainer" in proc.stdout and "joins now" in proc.stdout
