"""What every example trains: a small language model on text it generates, and the
loop that runs it with one of the DiLoCo modes.

The text comes from a fixed random Markov chain over 32 symbols (each pair of symbols
is followed by one of four symbols), so its entropy, the best loss any model can reach,
is known; each trainer draws its own stream from the same chain. The model reads 8
symbols and predicts the next: embeddings, one hidden layer, 41k parameters.

``main(mode)`` is the command line of every example: without ``--coordinator`` it starts
a coordinator and ``--peers`` trainers on this machine (one killed and one added when
``--kill-at`` / ``--join-at`` say so) and prints the final loss; with ``--coordinator
HOST:PORT`` it runs one trainer of a run whose coordinator is elsewhere.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

VOCAB, CONTEXT, EMBED, HIDDEN = 16, 8, 16, 256
BATCH = 64


def chain(seed: int = 1234):
    """Transition table: (a, b) -> four likely next symbols with their probabilities."""
    import torch

    g = torch.Generator().manual_seed(seed)
    nexts = torch.stack([torch.randperm(VOCAB, generator=g)[:4] for _ in range(VOCAB * VOCAB)])
    probs = torch.tensor([0.55, 0.25, 0.15, 0.05])
    return nexts, probs


def entropy() -> float:
    """The loss floor: the chain's entropy per symbol, in nats."""
    return -sum(p * math.log(p) for p in (0.55, 0.25, 0.15, 0.05))


class Text:
    """Batches of (context, next symbol) from the chain, from one seed's stream."""

    def __init__(self, seed: int) -> None:
        import torch

        self.torch = torch
        self.nexts, self.probs = chain()
        self.g = torch.Generator().manual_seed(seed)

    def batch(self, n: int = BATCH):
        torch = self.torch
        length = CONTEXT + 1
        seq = torch.empty(n, length, dtype=torch.long)
        seq[:, :2] = torch.randint(0, VOCAB, (n, 2), generator=self.g)
        for t in range(2, length):
            pick = torch.multinomial(self.probs.expand(n, 4), 1, generator=self.g).squeeze(1)
            seq[:, t] = self.nexts[seq[:, t - 2] * VOCAB + seq[:, t - 1], pick]
        return seq[:, :CONTEXT], seq[:, CONTEXT]


def model():
    import torch

    torch.manual_seed(0)  # every peer builds the same initial model
    return torch.nn.Sequential(
        torch.nn.Embedding(VOCAB, EMBED), torch.nn.Flatten(), torch.nn.Linear(CONTEXT * EMBED, HIDDEN),
        torch.nn.GELU(), torch.nn.Linear(HIDDEN, VOCAB))


def evaluate(net) -> float:
    """Loss on a fixed held-out set (the same on every peer)."""
    import torch

    x, y = Text(seed=99).batch(2048)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(net(x), y))


# ------------------------------------------------------------------------------ trainer
def trainer(make, args) -> int:
    """One peer: connect, join, train ``--outer-steps`` outer steps, report JSON lines."""
    import torch
    import xxhash

    from pccl_py import Client
    from pccl_py.diloco import StreamingDiLoCo

    torch.set_num_threads(1)
    net = model().to(args.device)
    inner = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    data = Text(seed=1000 + args.worker_id + 100 * args.data_seed)

    def emit(**kw):
        print(json.dumps({"worker": args.worker_id, **kw}), flush=True)

    with Client(coordinator=args.coordinator, timeout=60.0) as client:
        if args.hold:  # started early by the launcher: join when it says so
            sys.stdin.readline()
        topo = client.connect()
        if args.wait_for:
            topo = client.wait_for_peers(args.wait_for, timeout=60.0)
        mode = make(client, net, inner, args)
        streaming = isinstance(mode, StreamingDiLoCo)
        def same_everywhere() -> tuple[bool, int]:
            """Every peer's hash of its outer state, gathered: (all equal, how many peers).
            Every peer calls it at the same points: after join() (where the members' outer
            step or sync point admitted it) and after each outer step."""
            digest = xxhash.xxh64()
            for t in mode.outer:
                digest.update(t.numpy().tobytes())
            hashes = client.all_gather(digest.digest(), timeout=60.0, retry=True)
            return len(set(hashes)) == 1, len(hashes)

        res = mode.join(restore=args.restore)
        parity, world = same_everywhere()
        emit(event="joined", epoch=topo["epoch"], world=world, step=mode.step, rx=res["rx_bytes"],
             revision=mode.state.revision, parity=parity)
        # an outer step is `inner_steps` inner steps; streaming counts inner steps itself
        per_outer = args.inner_steps
        until = args.outer_steps * (per_outer if streaming else 1)
        sent = 0
        t_start, steps_here = time.monotonic(), 0
        members = world
        # with --until-world every peer also goes on until the world after a vote is back
        # to that size (all see the same world at the same step, so all stop together)
        while mode.step < until or members < args.until_world:
            if time.monotonic() - t_start > args.deadline:
                emit(event="error", message=f"the world did not reach {args.until_world} within {args.deadline}s")
                return 2
            for _ in range(1 if streaming else per_outer):
                x, y = data.batch()
                loss = torch.nn.functional.cross_entropy(net(x.to(args.device)), y.to(args.device))
                inner.zero_grad()
                loss.backward()
                inner.step()
            info = mode.inner_step() if streaming else mode.outer_step()
            members = info.get("members", members)
            if streaming:
                sent += sum(int(f.get("tx_bytes", 0)) for f in info["finished"])
                if mode.step % per_outer:
                    continue
            else:
                sent = int(info.get("tx_bytes", 0))
            parity, world = same_everywhere()
            step = mode.step // per_outer if streaming else mode.step
            steps_here += 1
            emit(event="step", step=step, loss=round(loss.item(), 5), world=info.get("members", world),
                 members=world, parity=parity, bytes=sent)
            sent = 0
            if args.save and step % 5 == 0:
                mode.save(args.save)
        if hasattr(mode, "finish"):
            mode.finish()
        emit(event="done", step=mode.step, eval=round(evaluate(net.to("cpu")), 5),
             seconds_per_outer_step=round((time.monotonic() - t_start) / max(1, steps_here), 4))
    return 0


# ----------------------------------------------------------------------------- command
def outer(args, lr: float, momentum: float) -> dict:
    """The outer optimiser's settings: the command line's, else the mode's defaults."""
    return {"outer_lr": lr if args.outer_lr is None else args.outer_lr,
            "outer_momentum": momentum if args.outer_momentum is None else args.outer_momentum}


def main(mode_name: str, make, describe: str, options=None) -> int:
    """The command line of an example: ``make(client, model, inner_optimizer, args)`` builds
    its mode; ``options(parser)`` adds the mode's own options."""
    p = argparse.ArgumentParser(description=describe)
    if options is not None:
        options(p)
    p.add_argument("--peers", type=int, default=4, help="trainers started on this machine (default 4)")
    p.add_argument("--outer-steps", type=int, default=30)
    p.add_argument("--inner-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3, help="the inner AdamW's learning rate")
    p.add_argument("--outer-lr", type=float, default=None, help="the outer optimiser's rate (default: the mode's)")
    p.add_argument("--outer-momentum", type=float, default=None, help="its momentum (default: the mode's)")
    p.add_argument("--quant", choices=["uint8", "uint4"], default=None, help="quantize the exchange")
    p.add_argument("--algorithm", default="auto", help="all-reduce algorithm (ring: over TCP on one host too)")
    p.add_argument("--kill-at", type=int, default=None, help="SIGKILL a trainer at this outer step")
    p.add_argument("--join-at", type=int, default=None, help="then start a new one at this outer step")
    p.add_argument("--json", default=None, help="write the summary here")
    p.add_argument("--png", default=None, help="draw the run here (matplotlib)")
    p.add_argument("--coordinator", default=None, help="join the run of this coordinator (HOST:PORT) as one trainer")
    p.add_argument("--restore", default=None, help="a file written by --save: resume the run from it if present")
    p.add_argument("--save", default=None, help="save the run's state here every 5 outer steps")
    p.add_argument("--wait-for", type=int, default=0, help="wait for this many peers before training")
    p.add_argument("--until-world", type=int, default=0, help="go on past --outer-steps until the world is this big")
    p.add_argument("--deadline", type=float, default=300.0, help="give up training after this many seconds")
    p.add_argument("--device", default="cpu", help="where the model trains (cuda: the outer state stays on the host)")
    p.add_argument("--data-seed", type=int, default=0, help="draws other text streams (the run-to-run spread)")
    p.add_argument("--worker-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--hold", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.coordinator:
        return trainer(make, args)
    return launch(mode_name, args)


def launch(mode_name: str, args) -> int:
    """Start a coordinator and the trainers on this machine; print and return the result."""
    from pccl_py.tools import launch as L

    here = os.path.abspath(sys.argv[0])

    def worker_cmd(wid: int, addr: str) -> list[str]:
        # a trainer takes this command line as it is (the options that only the launcher
        # reads do nothing there), and where its run is
        cmd = [sys.executable, here, *sys.argv[1:], "--coordinator", addr, "--worker-id", str(wid)]
        if wid < args.peers:  # the first trainers start together
            cmd += ["--wait-for", str(args.peers)]
        if args.join_at is not None:  # the run ends back at full strength
            cmd += ["--until-world", str(args.peers)]
        return cmd

    def show(ev: dict, run) -> None:
        if ev["event"] == "step" and ev["worker"] == min(run.procs):
            print(f"[{mode_name}] outer step {ev['step']:3d}  loss {ev['loss']:.4f}  world {ev['world']}  "
                  f"sent {ev['bytes']} B  parity {'ok' if ev['parity'] else 'BROKEN'}", flush=True)

    t0 = time.monotonic()
    plan = L.Plan(peers=args.peers, kill_at=args.kill_at, join_at=args.join_at, deadline=600.0, stall=120.0,
                  name=mode_name)
    out = L.run(worker_cmd, plan, show)
    evals = [e["eval"] for e in out.events if e.get("event") == "done"]
    steps = [e for e in out.events if e.get("event") == "step"]
    sent = [e["bytes"] for e in steps if e.get("bytes")]
    summary = {"mode": mode_name, "peers": args.peers, "quant": args.quant, "outer_steps": args.outer_steps,
               "inner_steps": args.inner_steps, "kill_at": args.kill_at, "join_at": args.join_at,
               "final_eval_loss": evals[0] if evals else None, "eval_losses": evals,
               "loss_floor": round(entropy(), 5),
               "bytes_sent_per_peer_per_outer_step": sorted(sent)[len(sent) // 2] if sent else 0,
               "parity_breaks": sum(1 for e in steps if not e.get("parity", True)),
               "seconds_per_outer_step": sorted(e.get("seconds_per_outer_step", 0) for e in out.events
                                                if e.get("event") == "done")[len(evals) // 2] if evals else None,
               "seconds": round(time.monotonic() - t0, 1), "failed": out.failed}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    if args.png and steps:
        from pccl_py.tools.plot import draw

        print(f"[{mode_name}] picture: {draw(out.events, out.faults, args.png, mode_name)}")
    if out.failed:
        print(f"[{mode_name}] FAILED: " + "; ".join(out.failed))
        return 1
    print(f"[{mode_name}] done: final held-out loss {summary['final_eval_loss']} (floor {entropy():.4f}), "
          f"median bytes sent per peer per outer step {summary['bytes_sent_per_peer_per_outer_step']}, "
          f"{summary['seconds']} s")
    return 0
