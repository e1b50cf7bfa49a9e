"""Every mode on the same task, one after another, and a table of final held-out loss and
bytes on the wire per outer step beside the 4-peer fp32 DiLoCo run.

    python examples/compare.py                 # about 5 minutes on 2 cores
    python examples/compare.py --outer-steps 10 --json compare.json

Each run is ``examples/<mode>.py`` with ``--algorithm ring`` (so the all-reduce goes over
TCP and its bytes are counted even on one host) and ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

RUNS = [
    ("1 peer", "diloco.py", ["--peers", "1"]),
    ("4 peers, fp32 (baseline)", "diloco.py", []),
    ("4 peers, a kill and a join", "diloco.py", ["--kill-at", "10", "--join-at", "15"]),
    ("4 peers, uint8", "diloco.py", ["--quant", "uint8"]),
    ("4 peers, uint4", "diloco.py", ["--quant", "uint4"]),
    ("4 peers, one-step delayed", "delayed_diloco.py", []),
    ("4 peers, streaming (3 fragments)", "streaming_diloco.py", []),
    ("4 peers, sparse 1%, 4 bits", "sparse_loco.py", ["--density", "0.01"]),
    ("4 peers, sparse 2%, 4 bits", "sparse_loco.py", ["--density", "0.02"]),
    ("4 peers, sparse 3%, 4 bits", "sparse_loco.py", ["--density", "0.03"]),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--outer-steps", type=int, default=30)
    p.add_argument("--inner-steps", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, script, extra in RUNS:
            out = os.path.join(tmp, "run.json")
            cmd = [sys.executable, os.path.join(HERE, script), "--peers", "4", "--algorithm", "ring",
                   "--outer-steps", str(args.outer_steps), "--inner-steps", str(args.inner_steps), *extra,
                   "--json", out]
            print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0 or not os.path.exists(out):
                print(proc.stdout[-2000:], proc.stderr[-2000:])
                rows.append({"run": name, "failed": True})
                continue
            with open(out) as f:
                s = json.load(f)
            s["run"] = name
            rows.append(s)
            os.unlink(out)
            print(f"   final held-out loss {s['final_eval_loss']}, bytes/outer step {s['bytes_sent_per_peer_per_outer_step']}")
    base = next((r for r in rows if r["run"].endswith("(baseline)") and not r.get("failed")), None)
    floor = base["loss_floor"] if base else None
    print(f"\nloss floor (the text's entropy): {floor}\n")
    print("| run | final held-out loss | vs baseline | bytes sent per peer per outer step | vs baseline |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r.get("failed") or r.get("final_eval_loss") is None:
            print(f"| {r['run']} | failed | | | |")
            continue
        loss, sent = r["final_eval_loss"], r["bytes_sent_per_peer_per_outer_step"]
        dl = f"{(loss / base['final_eval_loss'] - 1) * 100:+.1f}%" if base else ""
        bb = base["bytes_sent_per_peer_per_outer_step"] if base else 0
        ds = f"{sent / bb:.3f}x" if bb and sent else ""
        print(f"| {r['run']} | {loss:.4f} | {dl} | {sent} | {ds} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(r.get("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
