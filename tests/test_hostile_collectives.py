"""Hostile traffic against the collectives' frame handling: ring, direct, rooted, quantized
all-reduce and the blob all-gather, driven sans-I/O over the in-memory link of fakenet.py.

One peer of the call is authenticated but misbehaves: it sends well-formed headers (each
one passes ``frames.decode_header``) with any payload, on any stream, in any order, at any
time. Whatever it does, an honest peer's call must never

  (a) succeed with a result other than the reduction of the honest inputs, bit for bit;
  (b) write outside its output buffer or touch its input (canary bytes surround both, and
      no receive view may overlap an input);
  (c) raise anything but ProtocolError or InvalidUsage from ``on_data`` (a PcclError from
      an ``Rx``'s ``finish``, as the data plane catches there);
  (d) succeed while bytes are missing (outputs start as a fill no reduction can produce).

Targeted cases take a legitimate header from the queues and change one field, or replay,
split, reorder and inject frames; the random cases mutate the hostile peer's frames with a
seeded numpy generator and check (a)-(d) on every honest peer. The data plane's reactions
are modelled as it acts: a ProtocolError closes the link (a call that still needs that peer
fails with PeerLost), InvalidUsage fails the call; either way the peers are told (ERROR).

A peer can always lie about its own bytes (send other values, an empty blob), and no check
can tell; the random cases keep that apart from what the schedules must catch: they allow at
most one "lie" (a frame moved to other bytes, another step, another size) per run, and
none together with a dropped frame, so every lie meets the honest frame it displaces."""

from __future__ import annotations

import dataclasses

import fakenet
import numpy as np
import pytest
from fakenet import FakeNet

from pccl_py import kernels as K
from pccl_py.collectives.direct import DirectAllReduce, RootedAllReduce
from pccl_py.collectives.gather import BlobAllGather
from pccl_py.collectives.quant import QuantAllReduce
from pccl_py.collectives.ring import RingAllReduce
from pccl_py.errors import InvalidUsage, PcclError, PeerLost, ProtocolError
from pccl_py.wire import frames as F

pytestmark = pytest.mark.timeout(60)

DESC = 4321
GUARD = 32  # canary bytes before and after every input and output
CANARY = 0xA5
FILL = 0x7F  # an output's bytes before the call: float32 3.4e38, int16 32639; no sum of inputs here
MAX_BLOB = 1 << 12


# -- buffers and collectives -----------------------------------------------------------------


class Buffers:
    """Each rank's input and output, each inside a larger byte array with canaries on both
    sides; inputs are small integers (every reduction order gives the same bits)."""

    def __init__(self, world: int, count: int, dtype: str = "float32", seed: int = 0, *,
                 inplace: bool = False, values=None):
        self.dtype = dtype
        self.count = count
        self.item, npdt = K.DTYPES[dtype]
        n = count * self.item
        rng = np.random.default_rng(seed)
        self.whole, self.src, self.dst = [], [], []
        for _ in range(world):
            ws = np.full(n + 2 * GUARD, CANARY, np.uint8)
            s = ws[GUARD:GUARD + n].view(npdt)
            s[...] = values(rng, count) if values is not None else rng.integers(-3, 4, count)
            if inplace:
                wd, d = ws, s
            else:
                wd = np.full(n + 2 * GUARD, CANARY, np.uint8)
                wd[GUARD:GUARD + n] = FILL
                d = wd[GUARD:GUARD + n].view(npdt)
                self.whole.append(wd)
            self.whole.append(ws)
            self.src.append(s)
            self.dst.append(d)
        self.inplace = inplace
        self.inputs = [s.copy() for s in self.src]
        self.before = [w.copy() for w in self.whole]

    def reference(self, op: str = "sum") -> np.ndarray:
        acc = self.inputs[0].copy()
        for s in self.inputs[1:]:
            K.reduce(acc, s, "sum" if op == "avg" else op, self.dtype)
        if op == "avg":
            K.finish_avg(acc, len(self.inputs), self.dtype)
        return acc

    def guard(self) -> list[np.ndarray]:
        """What no receive view may overlap: the callers' inputs (unless the call is in place)."""
        return [] if self.inplace else self.src

    def check_memory(self) -> None:
        """(b): every canary is intact and (unless in place) every input untouched."""
        for w, b in zip(self.whole, self.before):
            assert w[:GUARD].tobytes() == b[:GUARD].tobytes(), "a write before a buffer"
            assert w[-GUARD:].tobytes() == b[-GUARD:].tobytes(), "a write past a buffer"
        if not self.inplace:
            for s, i in zip(self.src, self.inputs):
                assert s.tobytes() == i.tobytes(), "an input was written"


def maker(algo: str, bufs: Buffers, op: str = "sum", **kw):
    """``make(link)`` for FakeNet.start: rank ``link.rank``'s call of ``algo`` on ``bufs``."""

    def make(lk):
        r = lk.rank
        src = memoryview(bufs.src[r]).cast("B")
        dst = memoryview(bufs.dst[r]).cast("B")
        common = dict(loop=lk.net.loop, tag=1, attempt=0, desc=DESC)
        if algo == "ring":
            return RingAllReduce(lk, src=src, dst=dst, dtype=bufs.dtype, op=op, count=bufs.count,
                                 sub_bytes=kw.get("sub", 96), min_stripe=kw.get("stripe", 24),
                                 min_sub_bytes=16, depth=3, **common)
        if algo == "direct":
            return DirectAllReduce(lk, src=src, dst=dst, dtype=bufs.dtype, op=op, count=bufs.count,
                                   min_stripe=24, **common)
        if algo == "rooted":
            return RootedAllReduce(lk, src=src, dst=dst, dtype=bufs.dtype, op=op, count=bufs.count,
                                   **common)
        if algo == "quant":
            return QuantAllReduce(lk, src=src, dst=dst, op=op, count=bufs.count, quant=kw.get("q", "uint8"),
                                  block_bytes=64, worker=kw.get("worker"), **common)
        raise AssertionError(algo)

    return make


def blob_of(r: int) -> bytes:
    return bytes([0x30 + r]) * (7 * r + 3)


def gather_maker(lk):
    return BlobAllGather(lk, blob=blob_of(lk.rank), max_blob=MAX_BLOB, loop=lk.net.loop, tag=1, attempt=0,
                         desc=DESC)


def sync_worker(fn, done, key):
    """A data-plane worker that runs each job at once (the quantized call's other path)."""
    try:
        res = fn()
    except Exception as e:
        done(None, e)
        return
    done(res, None)


def quant_values(q: str):
    """Inputs that uint8 / uint4 codes carry exactly (0 or the top code), so that the owner's
    float32 sums do not depend on the order contributions arrive in."""
    top = 255.0 if q == "uint8" else 15.0
    return lambda rng, n: rng.integers(0, 2, n) * top


# -- the network ---------------------------------------------------------------------------------


class HostileNet(FakeNet):
    """FakeNet whose deliveries check what the collective hands back and react as the data
    plane does: a header that fails ``decode_header`` or a ProtocolError from ``on_data``
    closes the link (a call that still needs the sender fails with PeerLost); InvalidUsage
    from ``on_data``, or any PcclError from ``finish``, fails the call; both tell the peers.
    Any other exception escapes (c). Frames set aside in ``held`` go out once the queues
    run dry (a peer that delays them as long as it likes)."""

    def __init__(self, world: int, *, streams: int = 2, seed: int = 0, guard=()):
        super().__init__(world, streams=streams, seed=seed)
        self.guard = [np.frombuffer(memoryview(g).cast("B"), np.uint8) for g in guard]
        self.refused: list[tuple[int, int, PcclError]] = []  # (receiver, sender, error)
        self.cut: set[frozenset] = set()
        self.held: list[tuple[int, int, int, bytes, bytes]] = []  # (src, dst, stream, header, payload)
        for lk in self.links:  # a failure found on a worker's result: the peers are told too
            lk.fail_here = lambda op, exc, r=lk.rank: op.done or self.fail(r, exc)

    def run_all(self) -> None:
        while True:
            self.run()
            if not self.held:
                return
            held, self.held = self.held, []
            for src, dst, stream, header, payload in held:
                self.queues[(src, dst, stream)].append((header, payload))

    def _deliver(self, src: int, dst: int, header: bytes, payload: bytes) -> None:
        if frozenset((src, dst)) in self.cut:
            return
        try:
            h = F.decode_header(header)
        except ProtocolError as e:
            self.refused.append((dst, src, e))
            self._close(dst, src, e)
            return
        assert h.length == len(payload)
        self.deliver(src, dst, h, payload)

    def deliver(self, src: int, dst: int, h: F.Header, payload: bytes) -> None:
        """One decoded frame from ``src`` to ``dst``, with the data plane's reactions."""
        c = self.colls[dst]
        if c.done:
            return  # the data plane drops frames of a finished call
        if h.kind == F.FIN:
            c.on_fin(src, h.fin)
            return
        if h.kind == F.ERROR:
            c.on_error(src, h.error_code, F.decode_error_message(payload))
            return
        try:
            rx = c.on_data(src, h, fakenet._Conn)
        except ProtocolError as e:
            self.refused.append((dst, src, e))
            self._close(dst, src, e)
            return
        except InvalidUsage as e:
            self.refused.append((dst, src, e))
            self.fail(dst, e)
            return
        self.fill(dst, rx, h, payload)

    def fill(self, dst: int, rx, h: F.Header, payload: bytes) -> None:
        view = rx.view
        assert len(view) == h.length, f"receive view of {len(view)} bytes for a {h.length}-byte payload"
        if len(view):
            v8 = np.frombuffer(view, np.uint8)
            assert not any(np.shares_memory(v8, g) for g in self.guard), "a receive view inside an input"
        pos = 0
        while pos < len(payload):  # in pieces, as reads from a socket are
            n = self.rng.randint(1, max(1, len(payload) - pos))
            view[pos:pos + n] = payload[pos:pos + n]
            pos += n
            if rx.progress is not None:
                rx.progress(pos)
        try:
            rx.finish()
        except PcclError as e:  # e.g. a non-finite quantized result: the data plane fails the call
            self.fail(dst, e)

    def _close(self, dst: int, src: int, e: ProtocolError) -> None:
        self.cut.add(frozenset((src, dst)))
        c = self.colls[dst]
        if not c.done and c.peer_lost(src):
            self.fail(dst, PeerLost(f"link to r{src} closed: {e}"))


def hostile(net: HostileNet, rank: int, tamper) -> None:
    """Rank ``rank`` sends whatever ``tamper(dst, stream, header, payload)`` returns for each
    frame its own (honest) collective sends: a list of (dst, stream, Header, payload)."""
    send = net.links[rank].send

    def hostile_send(dst, stream, header, payload):
        for d, s, h, p in tamper(dst, stream, F.decode_header(header), bytes(payload)):
            send(d, s, F.encode_header(h), p)

    net.links[rank].send = hostile_send


def forge(h: F.Header, **changes) -> F.Header:
    """``h`` with ``changes``, as the receiver decodes it: a well-formed header."""
    return F.decode_header(F.encode_header(dataclasses.replace(h, **changes)))


def queued(net: FakeNet, src: int, dst: int, kind: int = F.DATA) -> list[tuple[F.Header, bytes]]:
    """Every frame of ``kind`` queued from ``src`` to ``dst``, decoded, taken off the queues."""
    out = []
    for (s, d, _), q in net.queues.items():
        if (s, d) != (src, dst):
            continue
        keep = [(hd, p) for hd, p in q if F.decode_header(hd).kind != kind]
        out += [(F.decode_header(hd), p) for hd, p in q if F.decode_header(hd).kind == kind]
        q.clear()
        q.extend(keep)
    return sorted(out, key=lambda f: (f[0].step, f[0].offset))


def refuses(coll, src: int, h: F.Header, exc=ProtocolError, what: str = "") -> None:
    """``coll`` refuses ``h`` from ``src`` at its header with ``exc`` (another exception escapes)."""
    try:
        coll.on_data(src, h, fakenet._Conn)
    except exc:
        return
    pytest.fail(f"{type(coll).__name__} accepted {what or h} from rank {src}")


def take(coll, src: int, h: F.Header, payload: bytes) -> None:
    """Hand ``coll`` one whole frame (on_data, the payload, finish)."""
    rx = coll.on_data(src, h, fakenet._Conn)
    assert len(rx.view) == h.length == len(payload)
    rx.view[:] = payload
    if rx.progress is not None:
        rx.progress(len(payload))
    rx.finish()


def honest_outcome(net: HostileNet, bufs: Buffers | None, want, honest) -> dict[int, str]:
    """(a) and (d): every honest call that succeeded holds ``want`` bit for bit; one that
    failed failed with a PcclError; one still running waits (its deadline would end it).
    (b) too. Returns rank -> "ok" | "failed" | "waiting"."""
    out = {}
    for r in honest:
        f = net.colls[r].future
        if not f.done():
            out[r] = "waiting"
        elif f.exception() is not None:
            assert isinstance(f.exception(), PcclError), f.exception()
            out[r] = "failed"
        else:
            if bufs is None:  # the all-gather: its result is the blobs
                assert f.result() == want, (r, f.result())
            else:
                assert bufs.dst[r].tobytes() == want.tobytes(), (r, bufs.dst[r][:8], want[:8])
            out[r] = "ok"
    if bufs is not None:
        bufs.check_memory()
    return out


def all_right(net: HostileNet, bufs: Buffers, want=None) -> bool:
    """Every peer's call succeeded with ``want`` (default: the reference) bit for bit."""
    world = len(net.colls)
    want = bufs.reference() if want is None else want
    return honest_outcome(net, bufs, want, range(world)) == {r: "ok" for r in range(world)}


def start(algo: str, world: int, count: int, *, streams: int = 2, seed: int = 0, dtype: str = "float32",
          inplace: bool = False, op: str = "sum", tamper=None, **kw):
    """Every rank's call of ``algo``, started; ``tamper=(rank, fn)`` makes ``rank`` hostile
    (``hostile``) before anything is sent."""
    values = quant_values(kw.get("q", "uint8")) if algo == "quant" else None
    bufs = Buffers(world, count, dtype, seed, inplace=inplace, values=values)
    net = HostileNet(world, streams=streams, seed=seed, guard=bufs.guard())
    launch(net, maker(algo, bufs, op, **kw), tamper)
    return net, bufs


def launch(net: HostileNet, make, tamper=None) -> None:
    net.colls = [make(lk) for lk in net.links]
    if tamper is not None:
        hostile(net, *tamper)
    for c in net.colls:
        c.start()


def quant_reference(world: int, count: int, q: str, seed: int, op: str = "sum") -> np.ndarray:
    """What an honest quantized call gives (every peer the same bytes, in any arrival order)."""
    outs = []
    for s in (seed, seed + 1):
        net, bufs = start("quant", world, count, seed=seed, q=q, op=op)
        net.rng.seed(s)
        net.run_all()
        assert all(c.future.exception() is None for c in net.colls)
        assert all(d.tobytes() == bufs.dst[0].tobytes() for d in bufs.dst)
        outs.append(bufs.dst[0].copy())
        net.close()
    assert outs[0].tobytes() == outs[1].tobytes(), "the reference depends on the arrival order"
    return outs[0]


# -- the ring ------------------------------------------------------------------------------------


V, L = 2, 1  # the ring's victim and its left neighbour, the hostile peer (its step-0 chunk is not the first)


def ring_victim(world: int = 4, count: int = 1000, **kw):
    """A ring call; rank V is the victim, rank L (its left) the hostile peer. Returns the net,
    the buffers, the victim's collective and the frames rank L has queued for it."""
    net, bufs = start("ring", world, count, **kw)
    return net, bufs, net.colls[V], queued(net, L, V)


def ring_cases(coll) -> dict[str, dict]:
    """Changes to a legitimate step-0 frame that the victim must refuse."""
    plan, it = coll.plan, coll.item
    a, b = plan.chunk(plan.recv_chunk(0))
    sub = plan.sub_elems
    other = next(t for t in range(plan.steps) if plan.recv_chunk(t) != plan.recv_chunk(0))
    return {
        "step past the schedule": dict(arg=plan.steps),
        "step 2**32-1": dict(arg=2**32 - 1),
        "a step of another chunk": dict(arg=other),
        "quantized": dict(quant=F.QUANT_U8, elems=it * 2, length=it * 2, lo=0.0, scale=1.0),
        "zero length": dict(length=0),
        "zero length at the chunk end": dict(offset=b * it, length=0),
        "misaligned offset": dict(offset=a * it + 1, length=it),
        "misaligned length": dict(offset=a * it, length=it + 1),
        "before the chunk": dict(offset=(a - 1) * it, length=it),
        "at the chunk end": dict(offset=b * it, length=it),
        "over the chunk end": dict(offset=(b - 1) * it, length=2 * it),
        "across two sub-chunks": dict(offset=(a + sub - 1) * it, length=2 * it),
        "a whole sub-chunk and one more": dict(offset=a * it, length=(sub + 1) * it),
        "far away": dict(offset=2**40, length=it),
        "offset wraps": dict(offset=2**64 - it, length=it),
    }


def _ring_case_names() -> list[str]:
    net, _, victim, _ = ring_victim()
    net.close()
    return list(ring_cases(victim))


@pytest.mark.parametrize("case", _ring_case_names())
def test_ring_refuses_a_frame_outside_its_schedule(case):
    """Each change is refused with ProtocolError, and the refusal claims nothing: the
    legitimate frames that follow are all taken and the call ends with the right bytes."""
    net, bufs, victim, frames = ring_victim()
    h0, _ = frames[0]
    assert victim.plan.chunk(victim.plan.recv_chunk(0))[0] > 0
    refuses(victim, L, forge(h0, **ring_cases(victim)[case]))
    for h, p in frames:  # nothing of the refused frame was claimed
        net.deliver(L, V, h, p)
    net.run_all()
    assert not net.refused
    assert all_right(net, bufs)
    net.close()


@pytest.mark.parametrize("src", [0, 2, 3])
def test_ring_refuses_a_frame_from_anyone_but_its_left_neighbour(src):
    net, bufs, victim, frames = ring_victim()
    refuses(victim, src, frames[0][0])
    net.close()


def test_ring_refuses_another_descriptor_as_misuse():
    net, bufs, victim, frames = ring_victim()
    refuses(victim, L, forge(frames[0][0], desc=DESC + 1), InvalidUsage)
    net.close()


@pytest.mark.parametrize("part", ["same", "head", "tail", "inner", "superset"])
def test_ring_refuses_bytes_sent_again_after_the_first_frame_finished(part):
    """A frame replayed after its first copy was received, reduced and forwarded (whole, a
    part of it, or a larger range around it) is refused; the bytes next to it that the
    larger range reached for are still free."""
    net, bufs, victim, frames = ring_victim(count=4000, sub=800, stripe=400)
    h, p = frames[0]
    it = victim.item
    assert h.length >= 4 * it
    a, b = victim.plan.chunk(victim.plan.recv_chunk(0))
    sub_end = min(b, a + victim.plan.sub_elems) * it
    take(victim, L, h, p)
    again = {"same": {}, "head": dict(length=it), "tail": dict(offset=h.offset + h.length - it, length=it),
             "inner": dict(offset=h.offset + it, length=h.length - 2 * it),
             "superset": dict(length=h.length + it)}[part]
    refuses(victim, L, forge(h, **again))
    nxt = next(((g, q) for g, q in frames if g.step == 0 and g.offset == h.offset + h.length), None)
    if part == "superset":
        assert nxt is not None and nxt[0].offset < sub_end
        take(victim, L, nxt[0], nxt[1])  # the byte after h: not claimed by the refused superset
    net.close()


def test_ring_accepts_any_split_of_a_sub_chunk():
    """The sender may cut a sub-chunk as it likes (item-aligned, inside it): every frame of
    rank 0 cut into single items, sent in reverse order, still gives the right bytes."""
    it = 4

    def tamper(dst, stream, h, p):
        if dst != 1 or h.kind != F.DATA:
            return [(dst, stream, h, p)]
        return [(dst, 0, forge(h, offset=h.offset + k, length=it), p[k:k + it])
                for k in reversed(range(0, h.length, it))]

    net, bufs = start("ring", 4, 500, tamper=(0, tamper))
    net.run_all()
    assert not net.refused
    assert all_right(net, bufs)
    net.close()


def test_ring_reduce_scatter_steps_in_any_order():
    """Rank 0 holds back every frame of its step 0 to rank 1 until nothing else can move (its
    later steps do not depend on rank 1): rank 1 receives steps out of order and ends right."""
    net, bufs = start("ring", 4, 700)
    net.held = [(0, 1, 0, F.encode_header(h), p) for h, p in queued(net, 0, 1)]
    net.run_all()
    assert all_right(net, bufs)
    net.close()


@pytest.mark.parametrize("inplace", [False, True])
def test_ring_all_gather_before_the_bytes_were_reduced_here(inplace):
    """World 3, victim rank 1, hostile rank 0 (its left). Rank 1 receives chunk 0 twice: to
    reduce it at step 0 and, fully reduced, at step 3. No honest left neighbour can send the
    step-3 bytes before rank 1 forwarded its step-0 sum of them. Rank 0 sends exactly the
    bytes an honest peer sends, only the step-3 frames first (the correct result, taken from
    the reference). Rank 1 must refuse them or end right. It takes them, then lets the step-0
    frames overwrite them and succeeds: with src0 + src1 in chunk 0, or, in place, with the
    full sum + src0 (which it also forwarded, so rank 2 and rank 0 end wrong as well)."""
    world, count = 3, 300
    net, bufs = start("ring", world, count, inplace=inplace)
    victim, want = net.colls[1], bufs.reference()
    plan, it = victim.plan, victim.item
    assert plan.recv_chunk(0) == plan.recv_chunk(3) == 0
    early = []
    for a, b in plan.subs(0):
        h = F.decode_header(victim.header(F.DATA, 3, a * it, (b - a) * it))
        early.append((h, want.view(np.uint8)[a * it:b * it].tobytes()))
    hostile(net, 0, lambda dst, stream, h, p: [] if (dst, h.kind, h.step) == (1, F.DATA, 3)
            else [(dst, stream, h, p)])  # those bytes went out already
    refused = False
    for h, p in early:
        try:
            take(victim, 0, h, p)
        except ProtocolError:
            refused = True
    net.run_all()
    out = honest_outcome(net, bufs, want, [1, 2])  # (a): no peer succeeds with other bytes
    assert refused or out[1] == "ok"


# -- direct exchange and rooted -------------------------------------------------------------------


def direct_victim(world: int = 3, count: int = 1000, dtype: str = "float32"):
    net, bufs = start("direct", world, count, dtype=dtype)
    return net, bufs, net.colls[1], queued(net, 0, 1)


def direct_cases(nbytes: int, it: int) -> dict[str, dict]:
    return {
        "step 1": dict(arg=1),
        "quantized": dict(quant=F.QUANT_U8, elems=it, length=it, lo=0.0, scale=1.0),
        "zero length": dict(offset=0, length=0),
        "zero length at the end": dict(offset=nbytes, length=0),
        "misaligned offset": dict(offset=1, length=it),
        "misaligned length": dict(offset=0, length=it + 1),
        "at the end": dict(offset=nbytes, length=it),
        "over the end": dict(offset=nbytes - it, length=2 * it),
        "all and one more": dict(offset=0, length=nbytes + it),
        "far away": dict(offset=2**40, length=it),
        "offset wraps": dict(offset=2**64 - it, length=it),
    }


@pytest.mark.parametrize("count,dtype", [(3000, "float32"), (9, "float64"), (33, "int16")])
def test_direct_refuses_a_frame_outside_the_buffer(count, dtype):
    """3000 float32: striped, with a FIN round; 9 and 33: one tiny frame per peer, none.
    Refused frames claim nothing; every byte sent again (after it arrived) is refused."""
    net, bufs, victim, frames = direct_victim(count=count, dtype=dtype)
    it, nbytes = victim.item, victim.nbytes
    assert victim.agree == (nbytes > F.TINY_BYTES) and len(frames) == (2 if victim.agree else 1)
    for case, change in direct_cases(nbytes, it).items():
        refuses(victim, 0, forge(frames[0][0], **change), what=case)
    refuses(victim, 0, forge(frames[0][0], desc=DESC + 1), InvalidUsage)
    refuses(victim, 1, frames[0][0])  # from itself
    for h, p in frames:
        take(victim, 0, h, p)
    for h, _ in frames:  # sequential duplicates, whole and in part
        refuses(victim, 0, h)
        refuses(victim, 0, forge(h, offset=h.offset + h.length - it, length=it))
    refuses(victim, 0, forge(frames[0][0], offset=0, length=nbytes))
    net.run_all()
    assert not net.refused
    assert all_right(net, bufs)
    net.close()


def test_direct_with_no_bytes_refuses_every_frame():
    net, bufs = start("direct", 3, 0)
    h = F.decode_header(net.colls[0].header(F.DATA, 0, 0, 4))
    for change in ({}, dict(length=0)):
        refuses(net.colls[1], 0, forge(h, **change))
    net.run_all()
    assert all(c.future.exception() is None for c in net.colls)
    net.close()


@pytest.mark.parametrize("count", [9, 1000])
def test_direct_accepts_any_split_of_its_input(count):
    """Direct exchange lets the sender cut its input as it likes (a tiny call too)."""
    it = 4

    def tamper(dst, stream, h, p):
        cut = (h.length // it // 2) * it
        if h.kind != F.DATA or not cut:
            return [(dst, stream, h, p)]
        return [(dst, 1, forge(h, offset=h.offset + cut, length=h.length - cut), p[cut:]),
                (dst, 0, forge(h, length=cut), p[:cut])]

    net, bufs = start("direct", 3, count, tamper=(0, tamper))
    net.run_all()
    assert not net.refused
    assert all_right(net, bufs)
    net.close()


def test_rooted_refuses_what_the_root_does_not_expect():
    net, bufs = start("rooted", 3, 10)
    root, leaf = net.colls[0], net.colls[2]
    (h, p), = queued(net, 1, 0)
    nbytes = root.nbytes
    for change in (dict(arg=1), dict(offset=4), dict(length=nbytes - 4), dict(length=0),
                   dict(quant=F.QUANT_U8, elems=nbytes, lo=0.0, scale=1.0)):
        refuses(root, 1, forge(h, **change))
    refuses(root, 1, forge(h, desc=DESC + 1), InvalidUsage)
    refuses(root, 0, h)  # from itself
    refuses(leaf, 1, h)  # a leaf hears only from the root
    refuses(leaf, 1, forge(h, arg=1))
    refuses(leaf, 0, h)  # the root's result is step 1
    take(root, 1, h, p)
    refuses(root, 1, h)  # a second contribution, after the first finished
    net.run_all()
    assert not net.refused
    assert all_right(net, bufs)
    net.close()


def test_rooted_leaf_refuses_a_second_result_while_the_first_arrives():
    net, bufs = start("rooted", 3, 10)
    root, leaf = net.colls[0], net.colls[1]
    for s in (1, 2):
        (h, p), = queued(net, s, 0)
        take(root, s, h, p)
    (h, p), = queued(net, 0, 1)
    rx = leaf.on_data(0, h, fakenet._Conn)
    refuses(leaf, 0, h)
    rx.view[:] = p
    rx.finish()
    assert leaf.future.result() is None
    assert bufs.dst[1].tobytes() == bufs.reference().tobytes()
    net.close()


# -- quantized all-reduce -------------------------------------------------------------------------


def quant_victim(q: str = "uint8", world: int = 3, count: int = 200, worker=None):
    """Victim rank 1, hostile rank 0; returns the net, the buffers, rank 1's call and the
    frames rank 0 queued for it at start (its contributions to the blocks of rank 1's chunk)."""
    net, bufs = start("quant", world, count, q=q, worker=worker)
    return net, bufs, net.colls[1], queued(net, 0, 1)


@pytest.mark.parametrize("q", ["uint8", "uint4"])
def test_quant_refuses_a_contribution_that_is_not_a_block_of_its_chunk(q):
    net, bufs, victim, frames = quant_victim(q)
    h, p = frames[0]
    assert h.step == 0 and h.quant == F.QUANT_BY_NAME[q]
    other_q = F.QUANT_U4 if q == "uint8" else F.QUANT_U8
    per = (lambda e: e) if q == "uint8" else (lambda e: (e + 1) // 2)
    a0, b0, _ = victim.blocks[1][0]
    a2, _, _ = victim.blocks[2][0]
    cases = {
        "other quantization": dict(quant=other_q, length=(h.elems if other_q == F.QUANT_U8 else (h.elems + 1) // 2)),
        "unquantized": dict(quant=F.QUANT_NONE, elems=0, length=h.elems * 4),
        "step 2": dict(arg=2),
        "step 1 (a result of rank 1's chunk, from rank 0)": dict(arg=1),
        "not a block start": dict(offset=h.offset + 4),
        "inside the block by one byte": dict(offset=h.offset + 1),
        "a block of rank 2's chunk": dict(offset=a2 * 4),
        "fewer elements": dict(elems=h.elems - 2, length=per(h.elems - 2)),
        "more elements": dict(elems=h.elems + 2, length=per(h.elems + 2)),
        "no elements": dict(elems=0, length=0),
        "far away": dict(offset=2**40),
    }
    assert h.offset == a0 * 4 and h.elems == b0 - a0
    for case, change in cases.items():
        refuses(victim, 0, forge(h, **change), what=case)
    refuses(victim, 0, forge(h, desc=DESC + 1), InvalidUsage)
    rx = victim.on_data(0, h, fakenet._Conn)  # accepted: nothing above claimed the block
    refuses(victim, 0, h)  # a duplicate while the first is still arriving
    rx.view[:] = p
    rx.finish()
    refuses(victim, 0, h)  # and after it finished
    for g, pg in frames[1:]:
        take(victim, 0, g, pg)
    net.run_all()
    assert not net.refused
    want = quant_reference(3, 200, q, 0)
    assert all_right(net, bufs, want)
    net.close()


def quant_results(worker) -> dict[int, list[tuple[F.Header, bytes]]]:
    """Of a complete honest call: the result frames (step 1) ranks 0 and 2 sent rank 1."""
    got = {0: [], 2: []}
    net, bufs = start("quant", 3, 200, worker=worker)
    for r in got:
        send = net.links[r].send

        def spy(dst, stream, header, payload, r=r, send=send):
            h = F.decode_header(header)
            if h.kind == F.DATA and h.step == 1 and dst == 1:
                got[r].append((h, bytes(payload)))
            send(dst, stream, header, payload)

        net.links[r].send = spy
    net.run_all()
    assert all(c.future.exception() is None for c in net.colls)
    net.close()
    return got


@pytest.mark.parametrize("worker", [None, sync_worker])
def test_quant_refuses_a_result_block_from_anyone_but_its_owner(worker):
    """A result block (step 1) names its owner by its sender: rank 0 may not send rank 2's
    blocks, nor one of its own twice (while the first arrives, or after), nor relabel a
    result as a contribution; the refusals before the legitimate frame claimed nothing."""
    got = quant_results(worker)
    net, bufs = start("quant", 3, 200, worker=worker)
    victim = net.colls[1]
    (h0, p0), (h2, _) = got[0][0], got[2][0]
    refuses(victim, 0, h2)  # rank 2's block, from rank 0
    refuses(victim, 2, h0)  # and the other way round
    refuses(victim, 0, forge(h0, arg=0))  # a result relabelled as a contribution to rank 1's chunk
    refuses(victim, 0, forge(h0, offset=h0.offset + 4))
    rx = victim.on_data(0, h0, fakenet._Conn)
    refuses(victim, 0, h0)
    rx.view[:] = p0
    rx.progress(len(p0))
    rx.finish()
    refuses(victim, 0, h0)
    assert victim._units == sum(len(b) for b in victim.blocks) - 1  # that block, counted once
    net.close()


@pytest.mark.parametrize("worker", [None, sync_worker])
def test_quant_non_finite_contribution_fails_the_call(worker):
    """A contribution whose finite lo/scale decode to infinity: the owner's block is not
    finite, so the call fails (InvalidUsage, as for a caller's non-finite input) instead of
    sending it; no honest peer succeeds."""
    def tamper(dst, stream, h, p):
        if h.kind == F.DATA and h.step == 0 and dst == 1:
            return [(dst, stream, forge(h, lo=3e38, scale=3e38), b"\xff" * len(p))]
        return [(dst, stream, h, p)]

    net, bufs = start("quant", 3, 200, worker=worker, tamper=(0, tamper))
    net.run_all()
    assert isinstance(net.colls[1].future.exception(), InvalidUsage)
    assert isinstance(net.colls[2].future.exception(), PcclError)
    bufs.check_memory()
    net.close()


# -- all-gather ---------------------------------------------------------------------------------


def test_gather_refuses_a_second_blob_and_odd_frames():
    world = 3
    net = HostileNet(world, seed=1)
    net.start(gather_maker)
    victim = net.colls[1]
    (h, p), = queued(net, 0, 1)
    for change in (dict(arg=1), dict(offset=1), dict(quant=F.QUANT_U8, elems=h.length, lo=0.0, scale=1.0),
                   dict(length=MAX_BLOB + 1)):
        refuses(victim, 0, forge(h, **change))
    refuses(victim, 0, forge(h, desc=DESC + 1), InvalidUsage)
    refuses(victim, 1, h)  # its own blob, from the wire
    rx = victim.on_data(0, h, fakenet._Conn)
    refuses(victim, 0, h)  # again, while the first is still arriving
    refuses(victim, 0, forge(h, length=0))
    rx.view[:] = p
    rx.finish()
    refuses(victim, 0, h)  # and once it is in
    net.run_all()
    want = [blob_of(r) for r in range(world)]
    assert honest_outcome(net, None, want, range(world)) == {r: "ok" for r in range(world)}
    net.close()


def test_gather_takes_an_empty_blob_and_a_fin_before_data():
    """A FIN ahead of the blob neither completes the call nor is lost; an empty blob is a blob."""
    world = 3
    net = HostileNet(world, seed=2)
    net.start(lambda lk: BlobAllGather(lk, blob=b"" if lk.rank == 0 else blob_of(lk.rank), max_blob=MAX_BLOB,
                                       loop=net.loop, tag=1, attempt=0, desc=DESC))
    victim = net.colls[1]
    victim.on_fin(0)
    victim.on_fin(2)
    assert not victim.done
    net.run_all()
    want = [b"", blob_of(1), blob_of(2)]
    assert honest_outcome(net, None, want, range(world)) == {r: "ok" for r in range(world)}
    net.close()


# -- FIN ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["ring", "direct", "quant"])
def test_fins_before_data_and_repeated_do_not_complete_a_call(algo):
    """Rank 0 sends FIN to rank 1 first, and three times: rank 1 still waits for its data
    and for rank 2's FIN, then ends right."""
    net, bufs = start(algo, 3, 3000)  # 12000 bytes: a direct exchange with a FIN round
    victim = net.colls[1]
    for _ in range(3):
        victim.on_fin(0)
    assert not victim.done
    fins = queued(net, 2, 1, F.FIN)
    assert not fins
    held = []
    send = net.links[2].send

    def hold_fin(dst, stream, header, payload):
        if dst == 1 and F.decode_header(header).kind == F.FIN:
            held.append((stream, header, payload))
            return
        send(dst, stream, header, payload)

    net.links[2].send = hold_fin
    net.run_all()
    assert victim.data_done and not victim.done, "succeeded without rank 2's FIN"
    for stream, header, payload in held:
        net.queues[(2, 1, stream)].append((header, payload))
    net.run_all()
    want = quant_reference(3, 3000, "uint8", 0) if algo == "quant" else bufs.reference()
    assert all_right(net, bufs, want)
    net.close()


@pytest.mark.parametrize("algo", ["ring", "direct", "quant"])
def test_a_fin_all_from_one_peer_does_not_speak_for_the_others(algo):
    """Rank 0 sends FIN_ALL to rank 1 in a call that has a FIN round: rank 1 must still wait
    for rank 2's FIN (rank 2 may still be missing data), not succeed once its own is in."""
    net, bufs = start(algo, 3, 3000)
    victim = net.colls[1]
    victim.on_fin(0, F.FIN_ALL)
    send = net.links[2].send
    net.links[2].send = lambda dst, stream, header, payload: None if (
        dst == 1 and F.decode_header(header).kind == F.FIN) else send(dst, stream, header, payload)
    net.run_all()
    assert victim.data_done
    assert not victim.done, "succeeded on rank 0's word for rank 2"
    net.close()


# -- random mutations ---------------------------------------------------------------------------

# What the hostile peer does to one frame. "legit": an honest peer may do it, the call must
# still succeed everywhere; "refused": the call may fail or wait, never end wrong;
# "lie": moves bytes elsewhere (at most one per run, and not with "drop": the honest frame
# it displaces always arrives, so the lie is refused or the call never completes).
LEGIT, REFUSED, LIE = "legit", "refused", "lie"


def kinds(algo: str) -> dict[str, str]:
    k = {"pass": LEGIT, "delay": LEGIT, "dup": REFUSED, "drop": REFUSED, "desc": REFUSED,
         "step": LIE, "offset": LIE, "length": LIE, "quant": LIE, "redirect": LIE, "zero": LIE,
         "split": LEGIT if algo in ("ring", "direct") else REFUSED}
    if algo == "gather":  # a blob is whatever its one frame says: an empty or cut blob is a lie
        k.update(zero="skip", split="skip", length="skip")  # that no receiver can catch
    if algo == "quant":
        k.update(elems=LIE)
    return {m: c for m, c in k.items() if c != "skip"}


class Mutator:
    """The hostile peer's tamper: each DATA frame is mutated with probability ``p``, by at
    most ``budget`` mutations that are not legitimate; with ``lie`` set, the first mutation
    is that lie (and there is no other, and no drop)."""

    def __init__(self, algo: str, net: HostileNet, rank: int, item: int, rng, p: float, budget: float,
                 lie: str | None):
        self.algo, self.net, self.rank, self.item, self.rng, self.p = algo, net, rank, item, rng, p
        self.kinds = {m: c for m, c in kinds(algo).items() if c != LIE and not (lie and m == "drop")}
        self.lie = lie if budget else None
        self.budget = budget
        self.used: list[str] = []

    def pick(self) -> str:
        if self.lie is not None and not self.used:
            self.kinds[self.lie] = LIE
            return self.lie
        bad = [u for u in self.used if self.kinds[u] != LEGIT]
        names = [m for m, c in self.kinds.items() if m != "pass" and c != LIE and (c == LEGIT or len(bad) < self.budget)]
        cats = sorted({self.kinds[m] for m in names})  # a class first, so that neither is rare
        cat = cats[self.rng.integers(len(cats))]
        names = [m for m in names if self.kinds[m] == cat]
        return names[self.rng.integers(len(names))]

    def fit(self, p: bytes, n: int) -> bytes:
        return p[:n] + self.rng.integers(0, 256, max(0, n - len(p)), np.uint8).tobytes()

    def __call__(self, dst, stream, h, p):
        if h.kind != F.DATA or self.rng.random() >= self.p:
            return [(dst, stream, h, p)]
        m = self.pick()
        self.used.append(m)
        rng, it = self.rng, self.item
        steps = 2 * (self.net.world - 1)
        if m == "delay":
            self.net.held.append((self.rank, dst, stream, F.encode_header(h), p))
            return []
        if m == "dup":
            return [(dst, stream, h, p), (dst, int(rng.integers(self.net.streams)), h, p)]
        if m == "drop":
            return []
        if m == "desc":
            return [(dst, stream, forge(h, desc=h.desc ^ 1), p)]
        if m == "split":  # item-aligned where the schedule allows splits, anywhere where not
            unit = 1 if h.quant or self.kinds["split"] != LEGIT else it
            if h.length < 2 * unit:
                return [(dst, stream, h, p)]
            cut = int(rng.integers(1, h.length // unit)) * unit
            return [(dst, int(rng.integers(self.net.streams)), forge(h, offset=h.offset + cut, length=h.length - cut,
                                                                      elems=_elems_for(h, h.length - cut)), p[cut:]),
                    (dst, stream, forge(h, length=cut, elems=_elems_for(h, cut)), p[:cut])]
        if m == "redirect":
            others = [r for r in range(self.net.world) if r not in (self.rank, dst)]
            if not others:
                return [(dst, stream, h, p)]
            return [(others[rng.integers(len(others))], stream, h, p)]
        if m == "step":
            choices = [h.arg + 1, h.arg - 1, h.arg + self.net.world, h.arg - self.net.world,
                       int(rng.integers(0, steps + 2)), 2**32 - 1]
            s = choices[rng.integers(len(choices))] % 2**32
            return [(dst, stream, forge(h, arg=s), p)]
        if m == "offset":
            d = [it, -it, 2 * it, -2 * it, 1, -1, h.length, -h.length, 64, -64]
            choices = [h.offset + x for x in d] + [int(rng.integers(0, 1 << 16)), 2**40]
            o = max(0, choices[rng.integers(len(choices))])
            return [(dst, stream, forge(h, offset=o), p)]
        if m == "length":
            choices = [h.length + it, h.length - it, h.length + 1, h.length - 1, 2 * h.length, it, 1]
            n = max(1, choices[rng.integers(len(choices))])
            if h.quant:  # keep it well-formed: elems that need n bytes
                return [(dst, stream, forge(h, length=n, elems=n if h.quant == F.QUANT_U8 else 2 * n), self.fit(p, n))]
            return [(dst, stream, forge(h, length=n), self.fit(p, n))]
        if m == "elems":
            e = max(0, h.elems + int(rng.choice([-2, -1, 1, 2])))
            n = e if h.quant == F.QUANT_U8 else (e + 1) // 2
            return [(dst, stream, forge(h, elems=e, length=n), self.fit(p, n))]
        if m == "quant":
            q = int(rng.choice([x for x in (F.QUANT_NONE, F.QUANT_U8, F.QUANT_U4) if x != h.quant]))
            if q == F.QUANT_NONE:
                return [(dst, stream, forge(h, quant=q, elems=0, lo=0.0, scale=0.0), p)]
            e = h.length if q == F.QUANT_U8 else 2 * h.length
            return [(dst, stream, forge(h, quant=q, elems=e, lo=0.0, scale=1.0), p)]
        if m == "zero":
            return [(dst, stream, forge(h, length=0, elems=0), b""), (dst, stream, h, p)]
        raise AssertionError(m)


def _elems_for(h: F.Header, n: int) -> int:
    if not h.quant:
        return h.elems
    return n if h.quant == F.QUANT_U8 else 2 * n


ALGOS = {
    # name: (algo, world sizes, counts, extra keyword arguments)
    "ring": ("ring", (2, 3, 4, 5), (1, 7, 100, 1031), {}),
    "ring-inplace": ("ring", (3, 4), (100, 1031), {"inplace": True}),
    "ring-f64": ("ring", (3, 4), (50, 333), {"dtype": "float64"}),
    "ring-i16": ("ring", (3, 4), (50, 333), {"dtype": "int16"}),
    "direct": ("direct", (2, 3, 4), (7, 1031), {}),
    "rooted": ("rooted", (3, 4, 5), (1, 7, 100), {}),
    "quant-u8": ("quant", (2, 3, 4), (100, 333), {"q": "uint8"}),
    "quant-u4": ("quant", (2, 3, 4), (99, 333), {"q": "uint4", "worker": sync_worker}),
    "gather": ("gather", (2, 3, 4), (0,), {}),
}
SEEDS = 100


@pytest.mark.parametrize("name", list(ALGOS))
def test_random_mutations_never_give_a_wrong_result(name):
    """Per seed: a world, a size, a hostile rank, how many of its mutations may be other
    than legitimate (none, one, any), whether the first is a lie (which), and the
    probability (0.05, 0.2, 0.6 or 1) that each of its DATA frames is mutated. Every honest call then ends right, fails
    with a PcclError, or waits (a deadline would end it), never wrong; nothing escapes
    on_data but ProtocolError/InvalidUsage; no canary is touched; a run of legitimate
    mutations only (splits, delays) ends right everywhere."""
    algo, worlds, counts, extra = ALGOS[name]
    seen = {"ok": 0, "failed": 0, "waiting": 0, "refused": 0}
    used = set()
    for seed in range(SEEDS):
        rng = np.random.default_rng([seed, len(name)])
        world = int(worlds[rng.integers(len(worlds))])
        count = int(counts[rng.integers(len(counts))])
        bad = int(rng.integers(world))
        kw = dict(extra)
        if algo == "gather":
            net, bufs = HostileNet(world, streams=3, seed=seed), None
            want = [blob_of(r) for r in range(world)]
            make, item = gather_maker, 1
        else:
            values = quant_values(kw.get("q", "uint8")) if algo == "quant" else None
            bufs = Buffers(world, count, kw.pop("dtype", "float32"), seed, inplace=kw.pop("inplace", False),
                           values=values)
            net = HostileNet(world, streams=3, seed=seed, guard=bufs.guard())
            make, item = maker(algo, bufs, **kw), bufs.item
            want = quant_reference(world, count, kw["q"], seed) if algo == "quant" else bufs.reference()
        budget = (0, 1, float("inf"))[seed % 3]
        lies = [m for m, c in kinds(algo).items() if c == LIE]
        lie = lies[seed // 6 % len(lies)] if seed // 3 % 2 else None
        p = (0.05, 0.2, 0.6, 1.0)[int(rng.integers(4))]
        mut = Mutator(algo, net, bad, item, rng, p, budget, lie)
        try:
            launch(net, make, (bad, mut))
            net.run_all()
            honest = [r for r in range(world) if r != bad]
            out = honest_outcome(net, bufs, want, honest)
            assert {s for _, s, _ in net.refused} <= {bad}, ("an honest peer's frame was refused", net.refused)
            assert all(isinstance(e, (ProtocolError, InvalidUsage)) for _, _, e in net.refused)
            if all(kinds(algo)[m] == LEGIT for m in mut.used):
                assert set(out.values()) == {"ok"}, (seed, mut.used, out, net.refused)
        finally:
            net.close()
        for v in out.values():
            seen[v] += 1
        seen["refused"] += len(net.refused)
        used.update(mut.used)
    assert seen["ok"] and seen["refused"], seen
    assert used == set(kinds(algo)) - {"pass"}, used  # every mutation was tried
