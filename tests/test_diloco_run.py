"""Every DiLoCo mode through real clients (a daemon each, a real coordinator): two peers
train, a third joins mid-run; every peer ends with the same outer state, the newcomer's
model holds the run's parameters after join() and its inner optimiser the state of an
established peer."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest
import torch

from pccl_py import Client
from pccl_py.diloco import DelayedDiLoCo, DiLoCo, SparseLoCo, StreamingDiLoCo

pytestmark = pytest.mark.timeout(180)

INNER = 3  # inner steps per outer step
EVERY = 4  # streaming: inner steps between sync points


def make(kind, client, model, opt):
    if kind == "diloco":
        return DiLoCo(client, model, inner_optimizer=opt, timeout=30.0)
    if kind == "uint8":
        return DiLoCo(client, model, inner_optimizer=opt, quant="uint8", timeout=30.0)
    if kind == "delayed":
        return DelayedDiLoCo(client, model, inner_optimizer=opt, timeout=30.0)
    if kind == "streaming":
        return StreamingDiLoCo(client, model, fragments=2, sync_every=EVERY, overlap=1, quant="uint4",
                               inner_optimizer=opt, timeout=30.0)
    return SparseLoCo(client, model, density=0.1, bits=4, chunk=64, inner_optimizer=opt, timeout=30.0)


def train(kind, client, seed, until, started=None, joined=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mode = make(kind, client, model, opt)
    if joined is not None:  # a newcomer: model and optimiser as they were before join()
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
    mode.join()
    at_join = {"step": mode.step,
               "model_is_outer": all(torch.equal(p.detach(), o) for p, o in zip(model.parameters(), mode.outer)),
               "adam_steps": [float(s["step"]) for s in opt.state.values()]}
    if joined is not None:
        joined.set()
    gen = torch.Generator().manual_seed(seed)
    streaming = isinstance(mode, StreamingDiLoCo)
    members = client.world_size
    deadline = time.monotonic() + 90
    # every peer sees the same members at the same step, so all stop at the same step: the
    # first one at or after `until` where the newcomer is in
    while mode.step < until or members < 3:
        assert time.monotonic() < deadline, "the newcomer never joined"
        for _ in range(1 if streaming else INNER):
            x = torch.randn(32, 8, generator=gen)
            loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin())
            opt.zero_grad()
            loss.backward()
            opt.step()
        info = mode.inner_step() if streaming else mode.outer_step()
        members = info.get("members", members)
        if started is not None and mode.step >= (2 * EVERY if streaming else 2):
            started.set()
    if hasattr(mode, "finish"):
        mode.finish()
    outer = torch.cat([o.reshape(-1) for o in mode.outer]).clone()
    return {"outer": outer, "model": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone(),
            "step": mode.step, "at_join": at_join}


@pytest.mark.parametrize("kind", ["diloco", "uint8", "delayed", "streaming", "sparse"])
def test_every_mode_keeps_peers_identical_and_hands_a_newcomer_the_run(coordinator, kind):
    until = 6 * EVERY if kind == "streaming" else 6
    clients = [Client(coordinator=coordinator.addr, timeout=30.0) for _ in range(2)]
    late = None
    started, joined = threading.Event(), threading.Event()
    try:
        with cf.ThreadPoolExecutor(3) as ex:
            clients[0].connect()
            f1 = ex.submit(lambda: (clients[1].connect(), train(kind, clients[1], 2, until))[1])
            f0 = ex.submit(train, kind, clients[0], 1, until, started)
            deadline = time.monotonic() + 120
            while not started.wait(0.05):
                for f in (f0, f1):
                    if f.done():
                        f.result()  # raises what a peer raised
                assert time.monotonic() < deadline, "the first peers made no progress"
            late = Client(coordinator=coordinator.addr, timeout=30.0)
            f2 = ex.submit(lambda: (late.connect(), train(kind, late, 3, until, joined=joined))[1])
            results = [f.result(timeout=150) for f in (f0, f1, f2)]
    finally:
        for c in clients + ([late] if late else []):
            c.close()
    first, second, new = results
    for r in results:
        assert r["step"] == first["step"] >= until
        assert torch.equal(r["outer"], first["outer"]), "outer state differs between peers"
    if kind != "streaming":  # the model holds the run's parameters (streaming mixes them)
        for r in results:
            assert torch.equal(r["model"], r["outer"])
    assert new["at_join"]["model_is_outer"] and new["at_join"]["step"] > 0
    # the inner optimiser came from an established peer: Adam has counted its steps
    assert new["at_join"]["adam_steps"] and min(new["at_join"]["adam_steps"]) >= 2 * INNER


def test_a_run_whose_peers_all_went_resumes_from_a_saved_state(coordinator, tmp_path):
    path = str(tmp_path / "run.pccl")


    def peer(seed, restore, steps):
        client = Client(coordinator=coordinator.addr, timeout=30.0)
        try:
            client.connect()
            client.wait_for_peers(2, timeout=30.0)
            torch.manual_seed(seed)
            model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
            mode = DiLoCo(client, model, timeout=30.0)
            mode.join(restore=restore)
            at_join = (mode.step, torch.cat([o.reshape(-1) for o in mode.outer]).clone())
            with torch.no_grad():
                while mode.step < steps:
                    for p in model.parameters():
                        p.add_(0.01 * seed)
                    mode.outer_step()
            if restore is None and seed == 1:
                mode.save(path)
            return at_join, torch.cat([o.reshape(-1) for o in mode.outer]).clone(), mode.step
        finally:
            client.close()

    with cf.ThreadPoolExecutor(2) as ex:
        a, b = ex.map(lambda s: peer(s, None, 3), [1, 2])
    assert torch.equal(a[1], b[1]) and a[2] == 3
    # everyone went; a new run: only one peer has the file, the other starts fresh
    with cf.ThreadPoolExecutor(2) as ex:
        c, d = ex.map(lambda args: peer(*args), [(3, path, 5), (4, str(tmp_path / "none.pccl"), 5)])
    for at_join, _outer, step in (c, d):
        assert at_join[0] == 3 and torch.equal(at_join[1], a[1])  # resumed where the first run saved
        assert step == 5
    assert torch.equal(c[1], d[1])
