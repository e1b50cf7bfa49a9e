"""``pccl bench sync``: shared-state transfer throughput and the cost of a sync that moves nothing.

    pccl bench sync --size 256M --sources 1 3 [--streams 2] [--chunk 4M] [--repeat 3] [--json]

For each source count, that many processes each hold the state (same deterministic
content) in process memory behind a :class:`~pccl_py.daemon.state_transfer.StateServer`; this process
plays the newcomer and fetches the whole state striped over all of them into a
pre-touched buffer, hash check included. Then it measures one in-step peer's
:func:`~pccl_py.daemon.state_sync.daemon_sync` (hash, offer, plan, complete against an in-process
coordinator; no bytes move) against hashing the same state locally.
One line per row; with ``--json`` one JSON object per row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from pccl_py.client.progress import ProgressBar
from pccl_py.coordinator.in_process import InProcessSyncHost
from pccl_py.daemon.state_hash import hash_buffer, hash_buffers
from pccl_py.daemon.state_sync import daemon_sync
from pccl_py.daemon.state_transfer import Source, StateServer, fetch

SECRET = b"bench-secret"
REVISION = 1


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in mult:
        return int(float(text[:-1]) * mult[text[-1]])
    return int(text)


def make_state(nbytes: int) -> np.ndarray:
    """Deterministic, incompressible-looking content, fast to build."""
    words = (nbytes + 7) // 8
    a = np.arange(words, dtype=np.uint64)
    a *= np.uint64(0x9E3779B97F4A7C15)
    a ^= a >> np.uint64(29)
    return a.view(np.uint8)[:nbytes]


def _run(coro):
    """asyncio.run on uvloop when available, leaving the process-wide loop policy as it was."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        return asyncio.run(coro)
    finally:
        asyncio.set_event_loop_policy(old)


async def _serve(nbytes: int) -> None:
    state = make_state(nbytes)
    server = StateServer(f"src{os.getpid()}", secret=SECRET)
    host, port = await server.start()
    server.publish(REVISION, {"state": memoryview(state)})
    print(f"PORT {port} {server.peer_id}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    await server.close()


def _start_sources(n: int, nbytes: int) -> tuple[list[subprocess.Popen], list[Source]]:
    procs, addrs = [], []
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    for _ in range(n):
        p = subprocess.Popen([sys.executable, "-m", "pccl_py.tools.bench.sync", "--serve", "--size", str(nbytes)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        procs.append(p)
    try:
        for p in procs:
            line = p.stdout.readline().split()
            if len(line) != 3 or line[0] != "PORT":
                raise RuntimeError(f"source process {p.pid} did not start")
            addrs.append(Source(line[2], "127.0.0.1", int(line[1])))
    except BaseException:
        _stop_sources(procs)
        raise
    return procs, addrs


def _stop_sources(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            p.stdin.close()
        except OSError:
            pass
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


async def _fetch_rows(args, nbytes: int, expected: bytes, dest: np.ndarray) -> list[dict]:
    rows = []
    for n in args.sources:
        procs, addrs = _start_sources(n, nbytes)
        try:
            secs, hsecs = [], []
            for i in range(args.repeat):
                dest[:: 4096] = 0  # stale content, pages stay touched
                bar = None if args.json else ProgressBar(f"fetch {i + 1}/{args.repeat} from {n} source(s)")
                st = await fetch(addrs, {"state": (memoryview(dest), expected)}, secret=SECRET, peer_id="bench",
                                 revision=REVISION, streams_per_source=args.streams, chunk=args.chunk,
                                 timeout=300, progress=bar)
                secs.append(st["seconds"])
                hsecs.append(st["hash_seconds"])
            med = statistics.median(secs)
            rows.append({
                "bench": "sync_fetch", "size": nbytes, "sources": n, "streams_per_source": args.streams,
                "chunk": args.chunk, "repeat": args.repeat, "seconds": round(med, 4),
                "best_seconds": round(min(secs), 4), "gbytes_per_s": round(nbytes / med / 1e9, 3),
                "best_gbytes_per_s": round(nbytes / min(secs) / 1e9, 3),
                "hash_check_seconds": round(statistics.median(hsecs), 4),
                "sources_used": st["sources_used"],
            })
        finally:
            _stop_sources(procs)
    return rows


async def _no_transfer_row(args, state: np.ndarray) -> dict:
    view = memoryview(state)
    local, synced = [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        digest = hash_buffers({"state": view})["state"]
        local.append(time.perf_counter() - t)
    server = StateServer("me", secret=SECRET)
    await server.start()
    try:
        rev = 0
        for _ in range(args.repeat):
            rev += 1
            coord = InProcessSyncHost(["me", "other"])
            coord.known = {"me": rev - 1, "other": rev - 1}
            # the other peer's offer arrives directly (its hashing is not this peer's cost)
            await coord.channel("other").send({
                "type": "sync_offer", "round_hint": 0, "revision": rev, "strategy": "enforce_popular",
                "tensors": [["state", len(view), digest]], "host": "127.0.0.1", "port": 1, "timeout": 60.0})
            t = time.perf_counter()
            out = await daemon_sync([("state", view, False)], revision=rev, channel=coord.channel("me"),
                                    server=server, peer_id="me", secret=SECRET, timeout=60)
            synced.append(time.perf_counter() - t)
            assert out["status"] == "in_sync" and out["rx_bytes"] == 0
    finally:
        await server.close()
    ls, ss = statistics.median(local), statistics.median(synced)
    return {"bench": "sync_no_transfer", "size": len(view), "repeat": args.repeat, "sync_seconds": round(ss, 4),
            "local_hash_seconds": round(ls, 4), "ratio": round(ss / ls, 2) if ls else None, "rx_bytes": 0}


async def _amain(args) -> int:
    nbytes = args.size
    state = make_state(nbytes)
    expected = hash_buffer(state)
    dest = np.zeros(nbytes, np.uint8)  # pre-touched, as a newcomer's shm segment would be
    rows = await _fetch_rows(args, nbytes, expected, dest)
    if not np.array_equal(dest, state):
        print("pccl bench sync: fetched bytes differ from the source state", file=sys.stderr)
        return 1
    rows.append(await _no_transfer_row(args, state))
    for r in rows:
        if args.json:
            print(json.dumps(r), flush=True)
        elif r["bench"] == "sync_fetch":
            print(f"fetch {r['size'] / 2**20:.0f} MiB from {r['sources']} source(s) x {r['streams_per_source']} "
                  f"streams: {r['seconds'] * 1e3:.0f} ms median, {r['gbytes_per_s']:.2f} GB/s "
                  f"(best {r['best_gbytes_per_s']:.2f} GB/s; hash check {r['hash_check_seconds'] * 1e3:.0f} ms)")
        else:
            print(f"no-transfer sync of {r['size'] / 2**20:.0f} MiB: {r['sync_seconds'] * 1e3:.1f} ms vs local hash "
                  f"{r['local_hash_seconds'] * 1e3:.1f} ms (ratio {r['ratio']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pccl bench sync", description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("256M"), help="state size (e.g. 256M, 1G)")
    ap.add_argument("--sources", type=int, nargs="+", default=[1, 3], help="source counts to run")
    ap.add_argument("--streams", type=int, default=2, help="TCP streams per source")
    ap.add_argument("--chunk", type=parse_size, default=parse_size("4M"), help="bytes per request")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        _run(_serve(args.size))
        return 0
    if any(n < 1 for n in args.sources) or args.repeat < 1 or args.streams < 1 or args.chunk < 1:
        ap.error("--sources, --repeat, --streams and --chunk must be positive")
    return _run(_amain(args))


if __name__ == "__main__":
    sys.exit(main())
