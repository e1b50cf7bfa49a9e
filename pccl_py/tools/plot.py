"""A PNG of a training run from its trainers' events (see :mod:`pccl_py.tools.launch`):
loss against step, world size over time (kills and joins marked), bytes each peer sent
over sockets per outer step (on one host the data itself moves through shared memory). Needs matplotlib (``pip install matplotlib``)."""

from __future__ import annotations


def draw(events: list[dict], faults: list[dict], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e for e in events if e.get("event") == "step"]
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(8, 9), constrained_layout=True)
    fig.suptitle(title)
    for wid in sorted({e["worker"] for e in steps}):
        mine = [e for e in steps if e["worker"] == wid and "loss" in e]
        a.plot([e["step"] for e in mine], [e["loss"] for e in mine], lw=1, label=f"trainer {wid}")
    a.set_xlabel("outer step")
    a.set_ylabel("training loss")
    a.set_yscale("log")
    a.legend(fontsize="small", ncol=3)
    world = sorted(((e["t"], e.get("members") or e.get("world") or 0) for e in steps), key=lambda x: x[0])
    b.step([t for t, _ in world], [w for _, w in world], where="post")
    for f in faults:
        b.axvline(f["t"], color="red" if f["kind"] == "kill" else "green", ls="--", lw=1)
        b.annotate(f"{f['kind']} {f['worker']}", (f["t"], 0.2), rotation=90, fontsize="small")
    b.set_xlabel("seconds")
    b.set_ylabel("world size")
    b.set_ylim(bottom=0)
    sent: dict[int, list[int]] = {}
    for e in steps:
        if "bytes" in e:
            sent.setdefault(e["step"], []).append(e["bytes"])
    xs = sorted(sent)
    c.bar(xs, [sum(sent[s]) / len(sent[s]) for s in xs])
    c.set_xlabel("outer step")
    c.set_ylabel("bytes sent over sockets per peer")
    c.set_title("(peers on one host exchange their data through shared memory)", fontsize="small")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
