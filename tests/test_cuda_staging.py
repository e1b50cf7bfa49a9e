"""CUDA tensors staged through page-locked shared memory, and the on-device quantizer.

Runs on a CPU: registration goes to a fake CUDA runtime, and ``tensors.on_device`` is
patched so CPU torch tensors take the device path (plain copies instead of DMA). The last
test needs a GPU and skips without one.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time

import numpy as np
import pytest

from pccl_py import kernels as K
from pccl_py.client import segments, tensors
from pccl_py.client.segments import Alloc, Pool

torch = pytest.importorskip("torch")
from pccl_py import Client  # noqa: E402
from pccl_py.client import gpu_quant as G  # noqa: E402

pytestmark = pytest.mark.timeout(120)

QUANT = {"uint8": (K.quantize_u8, K.dequantize_u8), "uint4": (K.quantize_u4, K.dequantize_u4)}


class FakeCudart:
    """Records cudaHostRegister / cudaHostUnregister; ``fail`` makes registration fail."""

    def __init__(self, events: list, fail: bool = False) -> None:
        self.events = events
        self.fail = fail
        self.live: set[int] = set()

    def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 - the runtime's name
        self.events.append(("register", ptr))
        if self.fail:
            return 2  # cudaErrorMemoryAllocation
        assert ptr not in self.live, "registered twice"
        self.live.add(ptr)
        return 0

    def cudaHostUnregister(self, ptr):  # noqa: N802
        self.events.append(("unregister", ptr))
        assert ptr in self.live, "unregistered without registration (or twice)"
        self.live.remove(ptr)
        return 0


class FakeRpc:
    def __init__(self) -> None:
        self.ops: list[tuple[str, str]] = []

    def call(self, msg, timeout):
        self.ops.append((msg["op"], msg["name"]))
        return {}


@pytest.fixture
def fake(monkeypatch):
    """A fake runtime behind every Pins; segment releases recorded in the same event list."""
    events: list = []
    rt = FakeCudart(events)
    monkeypatch.setattr(segments, "_torch_cudart", lambda: rt)
    real_release = segments.release

    def release(seg):
        events.append(("release", segments.address(seg.buf)))
        real_release(seg)

    monkeypatch.setattr(segments, "release", release)
    return rt


def _check_order(events) -> None:
    """Every registered address is unregistered exactly once, before it is released."""
    live: set[int] = set()
    for kind, ptr in events:
        if kind == "register":
            live.add(ptr)
        elif kind == "unregister":
            live.remove(ptr)
        else:
            assert ptr not in live, "a registered segment was released before it was unregistered"
    assert not live


# -- registration bookkeeping ---------------------------------------------------------------

def test_pool_registers_a_segment_once_and_unregisters_it_before_retire_and_close(fake):
    rpc = FakeRpc()
    pool = Pool(rpc)
    a = pool.take(1 << 20)
    assert pool.pins.pin(a) and pool.pins.pin(a)  # the second is a no-op
    pool.give(a)
    again = pool.take(1 << 20)
    assert again is a and pool.pins.pinned(a) and pool.pins.pin(a)
    assert [e[0] for e in fake.events] == ["register"]
    pool.retire(a)  # a failed call: unregistered, then released and unmapped by the daemon
    assert [e[0] for e in fake.events] == ["register", "unregister", "release"]
    assert ("unmap", a.name) in rpc.ops
    b, c = pool.take(1 << 16), pool.take(1 << 22)
    pool.pins.pin(b)
    pool.pins.pin(c)
    pool.give(b)
    pool.close()
    _check_order(fake.events)
    assert [e[0] for e in fake.events].count("unregister") == 3
    assert pool.pins.count() == 0 and not fake.live


def test_a_segment_gone_from_dev_shm_is_unregistered_when_the_pool_drops_it(fake, monkeypatch):
    pool = Pool(FakeRpc())
    a = pool.take(1 << 20)
    pool.pins.pin(a)
    pool.give(a)
    monkeypatch.setattr(segments, "unlinked", lambda seg: seg is a)
    b = pool.take(1 << 20)
    assert b is not a and pool.pins.count() == 0
    pool.close()
    _check_order(fake.events)


def test_failed_registration_turns_pinning_off_with_one_info_line(fake, caplog):
    fake.fail = True
    pool = Pool(FakeRpc())
    a, b = pool.take(1 << 20), pool.take(1 << 20)
    with caplog.at_level(logging.INFO, logger="pccl.client"):
        assert not pool.pins.pin(a)
        assert not pool.pins.pin(b)
    assert [e[0] for e in fake.events] == ["register"]  # not tried again
    assert sum("pageable" in r.getMessage() for r in caplog.records) == 1
    pool.close()
    assert "unregister" not in [e[0] for e in fake.events]


def test_a_forked_child_forgets_the_parents_registrations(fake):
    pool = Pool(FakeRpc())
    a = pool.take(1 << 20)
    pool.pins.pin(a)
    segments._forked()  # what os.register_at_fork runs in a child
    assert pool.pins.count() == 0
    pool.close()
    assert [e[0] for e in fake.events] == ["register", "release"]  # never unregistered in the child


def test_alloc_arrays_are_never_registered(fake):
    rec = Alloc.create(FakeRpc(), 1 << 20, double_buffer=True)
    assert len(rec.owners) == 2  # with a twin, whose pages move
    rec.retire()
    rec.close()
    assert not [e for e in fake.events if e[0] != "release"]


# -- the codec on the device ------------------------------------------------------------

def _data(kind: str, n: int, rng) -> np.ndarray:
    x = (rng.standard_normal(n) * 3.0).astype(np.float32)
    if kind == "constant-block":
        x[: 300_000] = -0.0
    elif kind == "tiny-range":
        x[:] = np.float32(1e-38)
        x[1::3] = np.float32(1e-38) + np.float32(1e-44)
    elif kind == "wide":
        x *= np.float32(1e30)
    return x


@pytest.mark.parametrize("quant", ["uint8", "uint4"])
@pytest.mark.parametrize("n,world", [(1_000_003, 2), (300_001, 3), (9, 2), (700_001, 1)])
@pytest.mark.parametrize("kind", ["normal", "constant-block", "tiny-range", "wide"])
def test_device_quantizer_gives_the_kernels_codes_and_its_decoding_requantizes_to_them(quant, n, world, kind):
    quantize, dequantize = QUANT[quant]
    x = _data(kind, n, np.random.default_rng(n + world))
    bl = G.blocks(n, world)
    assert bl[0][0] == 0 and bl[-1][1] == n and all(p[1] == q[0] for p, q in zip(bl, bl[1:]))
    codes, lo, scale = G.quantize(torch, torch.from_numpy(x), bl, quant)
    codes = codes.numpy()
    dst = np.empty(n, np.float32)
    G.dequantize_into(codes, lo, scale, bl, quant, dst)
    for i, (a, b) in enumerate(bl):
        ref = np.empty(b - a if quant == "uint8" else (b - a + 1) // 2, np.uint8)
        rlo, rscale = quantize(x[a:b], ref)
        assert (np.float32(rlo), np.float32(rscale)) == (lo[i], scale[i])
        back = np.empty(b - a, np.float32)
        dequantize(ref, rlo, rscale, back)
        assert np.array_equal(back, dst[a:b])  # the daemon's own decoding of the original data
        # the daemon quantizes what the host decoded: same lo, same codes, scale within ulps
        # (not where the step is subnormal, as in tiny ranges: the grid itself is coarser
        # than the step there, and the kernel's own decoding loses as much)
        again = np.empty_like(ref)
        lo2, scale2 = quantize(dst[a:b], again)
        assert lo2 == rlo
        if rscale >= np.finfo(np.float32).tiny:
            assert np.array_equal(again, ref)
            assert abs(scale2 - rscale) <= 4 * float(np.spacing(np.float32(rscale)))
        bound = rscale / 2 * (1 + 1e-3) + 4 * float(np.spacing(np.float32(max(abs(rlo), abs(x[a:b]).max()))))
        assert np.max(np.abs(dst[a:b] - x[a:b])) <= bound + 1e-44


def test_non_finite_blocks_decode_to_nan_as_in_the_kernel():
    x = np.linspace(-1, 1, 600_000, dtype=np.float32)
    x[10] = np.inf
    bl = G.blocks(x.size, 2)
    codes, lo, scale = G.quantize(torch, torch.from_numpy(x), bl, "uint8")
    assert np.isnan(lo[0]) and np.isnan(scale[0]) and not np.isnan(lo[1:]).any()
    assert not codes[: bl[0][1]].any()
    dst = np.empty_like(x)
    G.dequantize_into(codes.numpy(), lo, scale, bl, "uint8", dst)
    assert np.isnan(dst[: bl[0][1]]).all()  # the daemon then refuses the call (finite values only)


# -- end to end, two peers ----------------------------------------------------------------

def _pair(coordinator, body):
    clients = [Client(coordinator=coordinator.addr, timeout=20.0) for _ in range(2)]
    try:
        with cf.ThreadPoolExecutor(2) as ex:
            def join(c):
                topo = c.connect()
                deadline = time.monotonic() + 30
                while topo["world_size"] < 2:
                    assert time.monotonic() < deadline
                    topo = c.update_topology()
                return topo["rank"]

            ranks = list(ex.map(join, clients))
            return [f.result(timeout=90) for f in [ex.submit(body, c, r) for c, r in zip(clients, ranks)]]
    finally:
        for c in clients:
            c.close()


def test_device_path_end_to_end_matches_the_host_path(coordinator, fake, monkeypatch):
    monkeypatch.setattr(tensors, "on_device", lambda t: True)  # CPU tensors take the device path

    def body(c, rank):
        gen = torch.Generator().manual_seed(7 + rank)
        big = torch.randn(700_001, generator=gen)
        strided = torch.randn(300, 400, generator=gen)[:, ::2]
        bf = torch.randn(50_000, generator=gen).to(torch.bfloat16)
        out = {}
        for stage in ("host", "pinned"):
            xs = [big.clone(), strided.clone(), bf.clone()]
            out[stage] = (c.all_reduce(xs, op="sum", stage=stage), [x.clone() for x in xs])
        for stage in ("host", "pinned", "gpu_quant"):
            q = big.clone()
            out["q-" + stage] = (c.all_reduce(q, op="avg", quant="uint8", stage=stage), q)
        q4 = big.clone()
        out["q4"] = (c.all_reduce(q4, op="sum", quant="uint4", stage="gpu_quant"), q4)
        out["small"] = (c.all_reduce(torch.ones(16) * (rank + 1), stage="pinned"), None)
        return out, big, bf

    results = _pair(coordinator, body)
    (r0, big0, bf0), (r1, big1, _) = results
    for out, _, _ in results:
        assert out["host"][0]["cuda_staging"] == "host"
        assert out["pinned"][0]["cuda_staging"] == "pinned"
        for x, y in zip(out["host"][1], out["pinned"][1]):
            assert torch.equal(x, y)  # the same bytes reached the daemon, the same came back
        assert out["q-gpu_quant"][0]["cuda_staging"] == "gpu_quant"
        assert out["q-pinned"][0]["cuda_staging"] == "pinned"
        assert torch.equal(out["q-host"][1], out["q-pinned"][1])
        assert out["small"][0]["cuda_staging"] == "host"  # inline: staged through host bytes
    exact = ((big0 + big1) / 2).numpy()
    # per block: a quantization of the input (once, here on the "device") and of the result
    span = big0.abs().max().item() + big1.abs().max().item()
    step = span * 2 / 255
    plain, gq = r0["q-host"][1].numpy(), r0["q-gpu_quant"][1].numpy()
    assert np.max(np.abs(plain - exact)) <= step
    assert np.max(np.abs(gq - exact)) <= step
    assert np.max(np.abs(gq - plain)) <= step
    assert torch.equal(r0["q-gpu_quant"][1], r1["q-gpu_quant"][1])  # every peer holds the same bytes
    q4 = r0["q4"][1].numpy()
    assert np.max(np.abs(q4 - 2 * exact)) <= span * 4 / 15
    _check_order(fake.events)
    assert fake.events and not fake.live  # segments were registered, and all unregistered at close


def test_cpu_tensors_never_touch_the_cuda_runtime(coordinator, fake):
    def body(c, rank):
        x = torch.full((500_000,), float(rank + 1))
        s = torch.arange(20, dtype=torch.float32).reshape(4, 5)[:, 1] * (rank + 1)
        info = c.all_reduce([x, s], stage="pinned")
        return info, x[:3].tolist(), s.tolist()

    for info, x, s in _pair(coordinator, body):
        assert "cuda_staging" not in info
        assert x == [3.0] * 3 and s == [3.0 * v for v in (1, 6, 11, 16)]
    assert fake.events == [e for e in fake.events if e[0] == "release"]  # no registration at all
    f = tensors.flat(torch.ones(8), device=True)
    assert f.data is not None and f.dev is None and f.how is None


def test_stage_is_checked(coordinator):
    from pccl_py import InvalidUsage

    with Client(coordinator=coordinator.addr, timeout=5.0) as c:
        with pytest.raises(InvalidUsage, match="stage"):
            c.all_reduce(np.ones(4, np.float32), stage="bogus")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_through_page_locked_shared_memory(coordinator):
    def body(c, rank):
        a = torch.full((1_000_003,), float(rank + 1), device="cuda")
        info = c.all_reduce(a)
        q = torch.linspace(-1, 1, 2_000_000, device="cuda") * (rank + 1)
        qi = c.all_reduce(q, op="avg", quant="uint8", stage="gpu_quant")
        return info, bool(torch.all(a == 3.0)), qi, q.cpu()

    for info, ok, qi, q in _pair(coordinator, body):
        assert ok and info["cuda_staging"] == "pinned"
        assert qi["cuda_staging"] == "gpu_quant"
        ref = torch.linspace(-1, 1, 2_000_000) * 1.5
        assert float((q - ref).abs().max()) < 2 * 3.0 / 255


@pytest.mark.parametrize("quant", ["uint8", "uint4"])
def test_decoding_over_copy_threads_gives_the_same_bytes(quant, monkeypatch):
    from pccl_py.client import copies

    n = (copies.PARALLEL_COPY_MIN // 4) + 12_345  # above the threshold; odd chunk bounds for 3 peers
    x = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    bl = G.blocks(n, 3)
    codes, lo, scale = G.quantize(torch, torch.from_numpy(x), bl, quant)
    codes = codes.numpy()
    one, many = np.empty(n, np.float32), np.empty(n, np.float32)
    monkeypatch.setattr(copies, "_copy_threads", lambda: 0)
    G.dequantize_into(codes, lo, scale, bl, quant, one)
    monkeypatch.setattr(copies, "_copy_threads", lambda: 3)
    used = []
    real = copies._pool
    monkeypatch.setattr(copies, "_pool", lambda t: used.append(t) or real(t))
    G.dequantize_into(codes, lo, scale, bl, quant, many)
    assert used and np.array_equal(one, many)
    assert np.max(np.abs(one - x)) <= float(scale.max()) / 2 * 1.001


def test_without_page_locking_device_tensors_take_the_host_path(coordinator, fake, monkeypatch, caplog):
    monkeypatch.setattr(tensors, "on_device", lambda t: True)
    fake.fail = True

    def body(c, rank):
        infos = []
        x = torch.full((300_001,), float(rank + 1))
        for _ in range(2):
            infos.append(c.all_reduce(x, stage="pinned")["cuda_staging"])
        q = torch.linspace(-1, 1, 300_001) * (rank + 1)
        infos.append(c.all_reduce(q, op="avg", quant="uint8", stage="gpu_quant")["cuda_staging"])
        return infos, x[:2].tolist(), float((q - 1.5 * torch.linspace(-1, 1, 300_001)).abs().max())

    with caplog.at_level(logging.INFO, logger="pccl.client"):
        results = _pair(coordinator, body)
    for infos, x, qerr in results:
        assert infos == ["host"] * 3
        assert x == [6.0, 6.0]  # 1 + 2, then 3 + 3
        assert qerr <= 2 * 3.0 / 255
    assert sum("pageable" in r.getMessage() for r in caplog.records) == 2  # once per client
    assert not fake.live
