"""DiLoCo's outer step against a stand-in client: the update it applies, and a diverged
all-reduce that it must not apply."""

from __future__ import annotations

import pytest
import torch

from pccl_py.diloco import DiLoCo
from pccl_py.errors import Diverged


class OneClient:
    """A world of one: all_reduce leaves the buffers as they are (the average of one)."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.calls = 0

    def alloc(self, n, dtype, as_torch=True):
        return torch.zeros(n, dtype=getattr(torch, dtype))

    def all_reduce(self, tensors, **kw):
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return {"world_size": 1, "seconds": 0.0}


def _params():
    torch.manual_seed(0)
    return [torch.randn(3, 4), torch.randn(5)]


def test_an_outer_step_applies_nesterov_to_the_pseudo_gradient():
    params = _params()
    d = DiLoCo(OneClient(), params, outer_lr=0.5, outer_momentum=0.9)
    start = [p.clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.sub_(0.1)  # inner steps moved every parameter by -0.1
    info = d.outer_step()
    assert info["world_size"] == 1
    for p, o, s, m in zip(params, d.outer, start, d.momentum):
        delta = torch.full_like(s, 0.1)
        assert torch.allclose(m, delta)
        assert torch.allclose(o, s - 0.5 * (delta + 0.9 * delta))
        assert torch.equal(p, o)  # the local params restart from the new outer params


def test_a_diverged_step_is_not_applied_and_says_so(caplog):
    params = _params()
    client = OneClient(fail=Diverged("peer X completed it"))
    d = DiLoCo(client, params)
    start = [p.clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    info = d.outer_step()
    assert info["diverged"] and "peer X" in info["error"]
    assert client.calls == 1
    for p, o, m, s in zip(params, d.outer, d.momentum, start):
        assert torch.equal(o, s) and torch.equal(p, s)  # back to the outer params, unchanged
        assert not m.any()
    assert "not applied" in caplog.text


def test_other_failures_still_reach_the_caller():
    d = DiLoCo(OneClient(fail=RuntimeError("boom")), _params())
    with pytest.raises(RuntimeError, match="boom"):
        d.outer_step()
