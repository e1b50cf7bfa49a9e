"""The end report of a churn run: a text table, JSON, and a PNG when matplotlib is there."""

from __future__ import annotations

import json
import statistics

from churn import schedule as S
from churn import tracker as T

OUTCOMES = (T.NEW_EPOCH, T.SAME_EPOCH, T.BACK, T.JOINED, T.NOT_TIMED, T.UNRESOLVED)


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def text(summary: dict, header: str, notes: list[str]) -> str:
    """The report as a few aligned tables."""
    lines = [header, ""]
    cols = ["applied", "skipped", *OUTCOMES]
    widths = [len(c) + 2 for c in cols]
    head = (f"{'kind':<14}" + "".join(f"{c:>{w}}" for c, w in zip(cols, widths))
            + f"{'median s':>10}{'p95 s':>8}{'max s':>8}")
    lines += ["faults (recovery: kill/crash/leave/freeze/link-cut -> a survivor's step in a newer epoch,",
              "        or in the same epoch after the fault ended, timed from the fault; coord-* -> the",
              "        first step after it returned, timed from its return; start -> the new peer's",
              "        first step)", head, "-" * len(head)]
    for kind, row in summary["faults"].items():
        lines.append(f"{kind:<14}" + "".join(f"{row[c]:>{w}}" for c, w in zip(cols, widths))
                     + f"{_s(row['median_s']):>10}{_s(row['p95_s']):>8}{_s(row['max_s']):>8}")
    lines += [f"  {n}" for n in notes]
    lines.append("")
    lines.append(f"steps {summary['steps']} in {summary['seconds']:.0f} s ({summary['steps_per_s']:.2f}/s, "
                 f"summed over peers), peers started {summary['peer_starts']}, largest world {summary['max_world']}")
    checks = ", ".join(f"{k} {summary['wrong'].get(k, 0)}/{n}" for k, n in sorted(summary["checks"].items()))
    lines.append(f"wrong results (wrong/checked): {checks or 'none checked'}")
    pv = summary["parity_violations"]
    lines.append(f"parity violations: collective {pv['collective']}, shared state {pv['shared_state']} "
                 f"({summary['state_reports']} reports over {summary['state_revisions']} revisions)")
    lines += [f"  {d}" for d in pv["shared_state_detail"]]
    errs = ", ".join(f"{k} {v}" for k, v in summary["errors"].items()) or "none"
    lines.append(f"errors by type: {errs}")
    for kind, samples in summary["error_samples"].items():
        for m in samples[:2]:
            lines.append(f"  {kind}: {m[:150]}")
    lines.append(f"hangs (a call past its deadline): {len(summary['hangs'])}"
                 + (f"  (late calls of frozen peers, not counted: {summary['late_calls_of_frozen_peers']})"
                    if summary["late_calls_of_frozen_peers"] else ""))
    for h in summary["hangs"][:10]:
        lines.append(f"  peer {h['peer']} {h['call']} from {h['t']:.1f} s: {h['seconds']:.1f} s "
                     f"(limit {h['limit_s']:.0f} s), {h['outcome']}")
    lines.append(f"crashes (exit not caused by the harness): {len(summary['crashes'])}")
    for c in summary["crashes"][:10]:
        lines.append(f"  peer {c['peer']} exited with {c['code']} at {c['t']:.1f} s")
    if summary["stalls"]:
        lines.append(f"stalled: no step completed for the stall limit, at {summary['stalls']} s")
    lines.append("")
    lines.append("result: " + ("PASS" if not summary["failures"] else "FAIL: " + "; ".join(summary["failures"])))
    return "\n".join(lines)


def write_json(path: str, doc: dict) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def write_png(path: str, summary: dict, series: dict) -> str:
    """Draw the run; returns what was done (the PNG is skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"PNG skipped: matplotlib is not installed (wanted {path})"
    kinds = [k for k in S.KINDS if k in summary["faults"]]
    colors = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(S.KINDS)}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7.5), gridspec_kw={"height_ratios": [3, 2]})
    top.bar(series["t"], series["steps_per_s"], width=1.0, align="edge", color="0.75", label="steps/s (all peers)")
    top.set_xlabel("seconds")
    top.set_ylabel("steps per second")
    world = top.twinx()
    world.step(series["t"], [float("nan") if w is None else w for w in series["world"]], where="post",
               color="black", label="world size")
    world.set_ylabel("world size")
    world.set_ylim(0, max([w for w in series["world"] if w is not None], default=1) + 1)
    seen = set()
    for row in summary["fault_log"]:
        if row["outcome"] == T.SKIPPED:
            continue
        k = row["kind"]
        top.axvline(row["t"], color=colors[k], lw=1.2, alpha=0.8, label=None if k in seen else k)
        seen.add(k)
    handles = top.get_legend_handles_labels()
    more = world.get_legend_handles_labels()
    top.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize=7, ncol=4)
    top.set_title("churn run: throughput, world size and faults")
    data = [[r["recovery_s"] for r in summary["fault_log"] if r["kind"] == k and r["recovery_s"] is not None]
            for k in kinds]
    for i, (k, ys) in enumerate(zip(kinds, data)):
        bottom.scatter([i] * len(ys), ys, color=colors[k], s=18)
        if ys:
            bottom.hlines(statistics.median(ys), i - 0.3, i + 0.3, color="black")
    bottom.set_xticks(range(len(kinds)), kinds, fontsize=8)
    bottom.set_ylabel("recovery / join, s")
    bottom.set_title("recovery time per kind (dots: faults, bar: median)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"PNG written to {path}"
