"""The sparse pseudo-gradient codec: selection, quantization, blob checks, aggregation
parity, error feedback; and one exchange through a real ``Client.all_gather``."""

from __future__ import annotations

import concurrent.futures as cf
import struct
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pccl_py.diloco.sparse import HEADER, SparseCodec, decode_parts, parse_header
from pccl_py.errors import InvalidUsage

pytestmark = pytest.mark.timeout(120)


# -- a reference written the slow, obvious way ------------------------------------------
def reference_pick(x: np.ndarray, chunk: int, k: int) -> np.ndarray:
    """Global indices the codec must send: per chunk, sort by (-|v|, index), keep the first
    k (the last chunk its proportional share), return them in rising order."""
    out = []
    n = len(x)
    for start in range(0, n, chunk):
        part = np.abs(x[start:start + chunk])
        kk = k if len(part) == chunk else min(len(part), max(1, (2 * k * len(part) + chunk) // (2 * chunk)))
        order = np.lexsort((np.arange(len(part)), -part))  # last key first: -|v|, then index
        out.append(np.sort(order[:kk]) + start)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def dense(idx: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n)
    out[idx] = values
    return out


values_f32 = st.floats(-1e6, 1e6, allow_nan=False, width=32)
small_ints = st.integers(-3, 3).map(float)  # many ties and zeros


@st.composite
def cases(draw):
    n = draw(st.integers(0, 600))
    chunk = draw(st.sampled_from([1, 2, 7, 64, 100, 257, 70_000]))
    density = draw(st.sampled_from([0.001, 0.02, 0.1, 0.5, 1.0]))
    bits = draw(st.sampled_from([2, 4]))
    xs = draw(st.lists(st.one_of(values_f32, small_ints), min_size=n, max_size=n))
    return np.array(xs, np.float32), chunk, density, bits


# -- layout and round trip ---------------------------------------------------------------
@pytest.mark.parametrize("numel,chunk,density,want_k,want_sent", [
    (4096, 4096, 0.02, 82, 82),
    (10_000, 4096, 0.02, 82, 82 + 82 + 36),  # last chunk 1808 long: round(82 * 1808 / 4096 = 36.2)
    (5, 4096, 0.02, 82, 1),                  # a tiny last chunk still sends one
    (3, 2, 1.0, 2, 3),
    (0, 64, 0.5, 32, 0),
])
def test_k_and_sizes(numel, chunk, density, want_k, want_sent):
    c = SparseCodec(numel, chunk=chunk, density=density)
    lay = c.layout
    assert (lay.k, lay.sent) == (want_k, want_sent)
    blob = c.encode(torch.randn(numel))
    assert len(blob) == c.wire_bytes() == lay.size
    assert decode_parts(blob)[1].numel() == lay.sent


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
@example((np.zeros(9, np.float32), 4, 0.5, 2))                      # all ties, all zero
@example((np.full(9, 2.0, np.float32), 4, 0.5, 4))                  # all ties, nonzero
@example((np.array([1, -1, 1, -1, 5], np.float32), 5, 0.4, 2))      # ties below the maximum
@example((np.array([0, 0, 0, 1, 2], np.float32), 7, 0.5, 2))        # 1 rounds to the zero level
def test_round_trip_matches_reference(case):
    x, chunk, density, bits = case
    codec = SparseCodec(len(x), chunk=chunk, density=density, bits=bits)
    acc = torch.from_numpy(x.copy())
    blob = codec.encode(acc)
    lay, idx, values = decode_parts(blob, len(x))
    assert lay.bits == bits and lay.chunk == chunk and lay.numel == len(x)
    assert np.array_equal(idx.numpy(), reference_pick(x, chunk, lay.k))
    sent = x[idx.numpy()]
    # signs survive (unless the value rounds to a zero level), magnitudes stay in the
    # chunk's [lo, hi] and within half a step of the value
    assert np.all((np.sign(values.numpy()) == np.sign(sent)) | (values.numpy() == 0))
    for c0 in range(0, len(x), chunk):
        sel = (idx >= c0) & (idx < c0 + chunk)
        if not sel.any():
            continue
        mags = np.abs(sent[sel.numpy()]).astype(np.float64)
        lo, hi = mags.min(), mags.max()
        half_step = (hi - lo) / (2 * ((1 << (bits - 1)) - 1))
        got = np.abs(values[sel].numpy()).astype(np.float64)
        tol = 1e-6 * hi
        assert np.all(got >= lo - tol) and np.all(got <= hi + tol)
        assert np.all(np.abs(got - mags) <= half_step + tol)
    # the residual is exactly what the blob does not carry
    assert torch.equal(codec.error, acc - dense(idx, values, len(x)))
    # and it is smaller than the input (the compressor is contractive)
    assert codec.error.double().norm() <= acc.double().norm()
    # decoding is a pure function of the bytes
    again = SparseCodec.decode(blob)
    assert torch.equal(again[0], idx) and torch.equal(again[1], values)


def test_selection_is_deterministic_where_topk_is_free_to_choose():
    # chunk 0: many equal magnitudes straddle the k-th place, only the lower indices may
    # win; chunk 1: no ties; chunk 2: all zero; chunk 3 (short): ties again
    x = torch.tensor(([1.0, -1.0] * 2048)[:4096])
    x[[5, 900, 3000]] = 2.0
    x = torch.cat([x, torch.randn(4096, generator=torch.Generator().manual_seed(0)),
                   torch.zeros(4096), torch.ones(1000)])
    blob = SparseCodec(x.numel(), chunk=4096, density=0.02).encode(x)
    idx, _ = SparseCodec.decode(blob)
    assert idx.tolist() == reference_pick(x.numpy(), 4096, 82).tolist()
    assert idx[:82].tolist() == sorted([5, 900, 3000] + [i for i in range(82) if i != 5][:79])
    assert idx[164:246].tolist() == list(range(8192, 8192 + 82))
    assert idx[246:].tolist() == list(range(12288, 12288 + 20))
    # the same input gives the same bytes on a fresh codec, whatever the thread count
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = SparseCodec(x.numel(), chunk=4096, density=0.02).encode(x)
    finally:
        torch.set_num_threads(threads)
    assert again == blob


def test_chunk_over_65536_uses_32_bit_indices():
    c = SparseCodec(70_000, chunk=70_000, density=0.001)
    assert c.layout.index_bytes == 4
    x = torch.zeros(70_000)
    x[69_999] = 3.0
    idx, values = SparseCodec.decode(c.encode(x))
    assert 69_999 in idx.tolist() and values[idx.tolist().index(69_999)] == 3.0


def test_encode_rejects_bad_input():
    c = SparseCodec(10, chunk=4)
    with pytest.raises(InvalidUsage, match="11 elements"):
        c.encode(torch.zeros(11))
    with pytest.raises(InvalidUsage, match="NaN or infinity"):
        c.encode(torch.tensor([float("nan")] + [0.0] * 9))
    with pytest.raises(InvalidUsage, match="floating-point"):
        c.encode(torch.zeros(10, dtype=torch.int32))
    assert torch.equal(c.error, torch.zeros(10)), "a rejected delta must leave the residual alone"
    for kw in ({"density": 0.0}, {"density": 1.5}, {"bits": 3}, {"chunk": 0}):
        with pytest.raises(InvalidUsage):
            SparseCodec(10, **kw)


@pytest.mark.parametrize("error_feedback", [True, False])
def test_encode_leaves_the_delta_alone(error_feedback):
    x = torch.randn(1000)
    before = x.clone()
    codec = SparseCodec(1000, chunk=100, error_feedback=error_feedback)
    codec.encode(x)
    codec.encode(x)
    assert torch.equal(x, before)


def test_other_float_dtypes_and_shapes_are_flattened_to_float32():
    x = torch.randn(4, 25)
    a = SparseCodec(100, chunk=32).encode(x.to(torch.bfloat16))
    b = SparseCodec(100, chunk=32).encode(x.to(torch.bfloat16).float().reshape(-1))
    assert a == b


# -- aggregation parity ------------------------------------------------------------------
def peer_blobs(world: int, numel: int, **kw) -> list[bytes]:
    out = []
    for r in range(world):
        g = torch.Generator().manual_seed(r)
        out.append(SparseCodec(numel, **kw).encode(torch.randn(numel, generator=g) * (r + 1)))
    return out


@pytest.mark.parametrize("op", ["sum", "avg"])
@pytest.mark.parametrize("bits", [2, 4])
def test_aggregate_is_the_left_fold_in_list_order_bitwise(op, bits):
    numel, world = 50_000, 4
    blobs = peer_blobs(world, numel, chunk=1000, density=0.1, bits=bits)
    got = SparseCodec.aggregate(blobs, numel, op=op)
    # reference: numpy float32, element by element, blob after blob
    ref = np.zeros(numel, np.float32)
    for b in blobs:
        idx, values = SparseCodec.decode(b)
        ref[idx.numpy()] = ref[idx.numpy()] + values.numpy()
    if op == "avg":
        ref = ref / np.float32(world)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), ref)
    # two independent aggregations, and one on a single thread, give the same bits
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = SparseCodec.aggregate(list(blobs), numel, op=op)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(SparseCodec.aggregate(blobs, numel, op=op), got)
    assert torch.equal(single, got)


def test_aggregate_depends_on_order_only_through_float_rounding():
    numel = 20_000
    blobs = peer_blobs(3, numel, chunk=500, density=0.2)
    a = SparseCodec.aggregate(blobs, numel, op="sum")
    b = SparseCodec.aggregate(blobs[::-1], numel, op="sum")
    # the same order gives the same bits (above); another order gives the same sum up to
    # rounding: peers must all use the gather's rank order
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_aggregate_rejects_bad_calls_before_adding_anything():
    good = peer_blobs(1, 100, chunk=10)[0]
    with pytest.raises(InvalidUsage, match="op="):
        SparseCodec.aggregate([good], 100, op="max")
    with pytest.raises(InvalidUsage, match="no blobs"):
        SparseCodec.aggregate([], 100)
    with pytest.raises(InvalidUsage, match="expected 101"):
        SparseCodec.aggregate([good], 101)
    with pytest.raises(InvalidUsage, match="magic"):
        SparseCodec.aggregate([good, b"X" + good[1:]], 100)


def test_aggregate_mixes_codecs_of_different_chunk_k_bits():
    numel = 3000
    x = [torch.randn(numel), torch.randn(numel)]
    blobs = [SparseCodec(numel, chunk=256, density=0.05, bits=2).encode(x[0]),
             SparseCodec(numel, chunk=1000, density=0.01, bits=4).encode(x[1])]
    got = SparseCodec.aggregate(blobs, numel, op="sum")
    want = sum(dense(*SparseCodec.decode(b), numel) for b in blobs)
    assert torch.equal(got, want)


# -- blobs from the network --------------------------------------------------------------
def small_blob(numel=10, chunk=4, density=0.5, bits=4) -> bytes:
    return SparseCodec(numel, chunk=chunk, density=density, bits=bits).encode(
        torch.arange(numel, dtype=torch.float32) - numel / 2)


def with_header(blob: bytes, **fields) -> bytes:
    names = ["magic", "version", "bits", "reserved", "numel", "chunk", "k"]
    vals = dict(zip(names, HEADER.unpack_from(blob)))
    vals.update(fields)
    return HEADER.pack(*(vals[n] for n in names)) + blob[HEADER.size:]


def test_every_truncation_and_extension_is_rejected():
    blob = small_blob()
    for n in range(len(blob)):
        with pytest.raises(InvalidUsage, match="truncated|shorter than"):
            SparseCodec.decode(blob[:n])
    with pytest.raises(InvalidUsage, match="trailing"):
        SparseCodec.decode(blob + b"\0")


@pytest.mark.parametrize("fields,message", [
    ({"magic": b"NOPE"}, "magic"),
    ({"version": 2}, "version 2"),
    ({"reserved": 1}, "reserved"),
    ({"bits": 3}, "bits=3"),
    ({"bits": 8}, "bits=8"),
    ({"chunk": 0}, "chunk=0"),
    ({"k": 0}, "k=0"),
    ({"k": 5}, "k=5"),                 # more than chunk=4
    ({"numel": 11}, "needs"),          # sizes no longer add up
    ({"numel": 2**63}, "needs"),
])
def test_bad_header_fields(fields, message):
    with pytest.raises(InvalidUsage, match=message):
        SparseCodec.decode(with_header(small_blob(), **fields))


def body_offsets(blob: bytes):
    lay = parse_header(blob)
    ranges = HEADER.size
    indices = ranges + 8 * lay.chunks
    values = indices + lay.index_bytes * lay.sent
    return lay, ranges, indices, values


def test_bad_bodies():
    blob = small_blob(numel=10, chunk=4, density=0.5, bits=2)  # chunks 4, 4, 2; k 2, 2, 1
    lay, r, i, v = body_offsets(blob)
    assert (lay.chunks, lay.sent) == (3, 5)

    def patched(off, fmt, value):
        b = bytearray(blob)
        struct.pack_into(fmt, b, off, value)
        return bytes(b)

    cases = [
        (patched(r, "<f", float("nan")), "range"),
        (patched(r + 4, "<f", float("inf")), "range"),
        (patched(r, "<f", -1.0), "range"),
        (patched(r, "<f", 1e9), "range"),                 # lo above hi
        (patched(i, "<H", 4), "outside its chunk"),        # chunk 0 holds 0..3
        (patched(i + 8, "<H", 2), "outside its chunk"),    # the last chunk holds 0..1
        (patched(i + 2, "<H", struct.unpack_from("<H", blob, i)[0]), "increasing"),  # duplicate
        (patched(v + 1, "<B", 0xFF), "unused bits"),       # 5 codes of 2 bits: the top 6 bits are padding
    ]
    for bad, message in cases:
        with pytest.raises(InvalidUsage, match=message):
            SparseCodec.decode(bad)
    # a chunk may start lower than the one before ended
    idx, _ = SparseCodec.decode(blob)
    assert idx.tolist() == sorted(idx.tolist())


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_blobs_are_rejected_or_decode_cleanly(data):
    blob = bytearray(small_blob(numel=data.draw(st.integers(1, 40)), chunk=data.draw(st.sampled_from([3, 8, 64])),
                                bits=data.draw(st.sampled_from([2, 4]))))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    try:
        lay, idx, values = decode_parts(bytes(blob))
    except InvalidUsage:
        return
    # whatever passes the checks is a well-formed contribution
    assert torch.isfinite(values).all()
    assert idx.numel() == len(set(idx.tolist())) == lay.sent
    assert bool(((idx >= 0) & (idx < lay.numel)).all())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_else(raw):
    try:
        SparseCodec.aggregate([raw], 16)
    except InvalidUsage:
        pass


# -- error feedback ----------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4])
def test_error_feedback_tracks_the_true_sum(bits):
    numel, steps = 8192, 300
    delta = torch.randn(numel, generator=torch.Generator().manual_seed(1))
    on = SparseCodec(numel, chunk=1024, density=0.02, bits=bits)
    off = SparseCodec(numel, chunk=1024, density=0.02, bits=bits, error_feedback=False)
    sums = {"on": torch.zeros(numel, dtype=torch.float64), "off": torch.zeros(numel, dtype=torch.float64)}
    residual = []
    for _ in range(steps):
        for name, codec in (("on", on), ("off", off)):
            sums[name] += dense(*SparseCodec.decode(codec.encode(delta)), numel).double()
        residual.append(float(on.error.norm() / delta.norm()))
    truth = delta.double() * steps
    rel = {name: float((s - truth).norm() / truth.norm()) for name, s in sums.items()}
    # with feedback, sent = truth - residual, and the residual stays bounded
    assert torch.allclose(sums["on"], truth - on.error.double(), rtol=0, atol=1e-2)
    assert max(residual) < 40 and max(residual[200:]) < 1.1 * max(residual[100:200]), residual[::30]
    assert rel["on"] < 0.2, rel
    # without it the same 2% of coordinates are sent every step and the rest never
    assert rel["off"] > 0.9, rel
    assert off.state_tensors() == {} and off.error.numel() == 0


def test_error_feedback_stays_bounded_on_heavy_tailed_noise():
    numel = 4096
    codec = SparseCodec(numel, chunk=512, density=0.01, bits=2)
    g = torch.Generator().manual_seed(3)
    norms = []
    for _ in range(200):
        d = torch.randn(numel, generator=g) / torch.rand(numel, generator=g).clamp_min(1e-3)  # Cauchy-like
        codec.encode(d)
        norms.append(float(codec.error.norm()))
    # the residual grows at first, then levels off instead of growing with the step count
    # (a random walk would grow by sqrt(2) = 1.41 from the first window to the second)
    assert max(norms[150:]) < 1.25 * max(norms[50:100]), (norms[50:100:10], norms[150::10])


def test_state_tensors_expose_the_live_buffer():
    codec = SparseCodec(100, chunk=10, density=0.1)
    st_ = codec.state_tensors()
    assert list(st_) == ["sparse.error_feedback"]
    buf = st_["sparse.error_feedback"]
    codec.encode(torch.randn(100))
    assert buf is codec.error and buf.abs().sum() > 0, "encode updates the exposed tensor in place"
    codec.reset()
    assert buf.abs().sum() == 0


def test_wire_bytes_against_dense():
    n = 1 << 20
    for density in (0.01, 0.02, 0.03):
        for bits in (2, 4):
            c = SparseCodec(n, density=density, bits=bits)
            ratio = c.wire_bytes() / (4 * n)
            # indices dominate: 2 bytes each, plus bits/8, plus 8 bytes per chunk
            assert ratio < density * (2 + bits / 8 + 0.5) / 4 + 8 / (4 * 4096) + 1e-4, (density, bits, ratio)


# -- through the runtime -----------------------------------------------------------------
def join(client, world=2, timeout=30.0):
    topo = client.connect()
    deadline = time.monotonic() + timeout
    while topo["world_size"] < world:
        assert time.monotonic() < deadline, "the peers did not all join"
        topo = client.update_topology()
    return topo


def test_exchange_through_all_gather_with_two_peers(coordinator):
    from pccl_py import Client

    numel = 100_000
    deltas = [torch.randn(numel, generator=torch.Generator().manual_seed(10 + r)) for r in range(2)]
    clients = [Client(coordinator=coordinator.addr, timeout=20.0) for _ in range(2)]

    def peer(c, rank):
        codec = SparseCodec(numel, chunk=4096, density=0.02, bits=4)
        blob = codec.encode(deltas[rank])
        blobs = c.all_gather(blob, timeout=20.0)
        return blob, blobs, SparseCodec.aggregate(blobs, numel, op="avg")

    try:
        with cf.ThreadPoolExecutor(2) as ex:
            topos = list(ex.map(join, clients))
            futs = [ex.submit(peer, c, t["rank"]) for c, t in zip(clients, topos)]
            results = {t["rank"]: f.result(timeout=60) for t, f in zip(topos, futs)}
    finally:
        for c in clients:
            c.close()
    own = [results[r][0] for r in range(2)]
    assert results[0][1] == results[1][1] == own, "the gather returns every blob in rank order"
    assert torch.equal(results[0][2], results[1][2]), "both peers hold the same bits"
    want = (dense(*SparseCodec.decode(own[0]), numel) + dense(*SparseCodec.decode(own[1]), numel)) / 2
    assert torch.equal(results[0][2], want)


@pytest.mark.parametrize("density,bits,size", [
    (0.01, 2, 25_688), (0.01, 4, 28_312), (0.02, 2, 49_304), (0.02, 4, 54_552),
    (0.03, 2, 72_920), (0.03, 4, 80_792)])
def test_the_wire_cost_table_of_the_docs(density, bits, size):
    """docs/diloco_sparse.md's table: the blob of 1M elements in chunks of 4096."""
    codec = SparseCodec(1 << 20, chunk=4096, density=density, bits=bits)
    assert codec.wire_bytes() == size
    assert len(codec.encode(torch.randn(1 << 20, generator=torch.Generator().manual_seed(1)))) == size
