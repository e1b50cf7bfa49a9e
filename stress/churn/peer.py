"""One peer of a churn run: a trainer (with the daemon its Client spawns) that steps and
reports every result to the orchestrator, one JSON line on stdout per event.

A step, after ``connect()`` or ``update_topology()`` (every peer at the same point):

* ``state``: write the content of revision R+1 (a pure function of R) into the shared
  state, sync it, then report (revision, xxh64 of the state's bytes) and whether the
  bytes are that revision's content; the orchestrator compares the hashes of peers at
  one revision (a side channel: the runtime under test is not asked);
* ``sum``: an all-reduce (sum) of ones, which must equal the world size of the call;
* ``parity``: an all-reduce (avg) of random values, whose hash goes to the all-gather;
* ``quant``: a uint8-quantized all-reduce (sum) of a known vector plus small per-peer
  noise: within a tolerance of world x vector, and its hash to the all-gather;
* ``async``: two ``all_reduce_async`` calls in flight at once (a sum of twos, an avg of
  random values), then ``wait()`` on both: the sum checked, the avg's hash gathered;
* an all-gather of the hashes: every peer must have gathered the same ones.

Each call is timed against its deadline (the call's timeout plus the client's slack, the
retry window with ``--retry``): a call still running past it is reported by a watchdog
thread, a call that ends past it when it ends (``hang``). Commands come on stdin, one a
line: ``leave`` closes the Client (a graceful leave) and exits 0; end of file too.
"""

from __future__ import annotations

import json
import os
import select
import sys
import threading
import time

WORK = ("state", "sum", "parity", "quant", "async")
SLACK = 5.0  # the client waits this long past a call's timeout for its daemon's answer
GRACE = 3.0  # and we this long again before calling it a hang (a loaded machine)
QUANT_NOISE = 0.01


def call_limit(timeout: float, retry: bool) -> float:
    """How long a call may take before it counts as a hang: its timeout and the client's
    slack; with retry, the retry window (one timeout), a wait for the next epoch (10 s),
    and a last attempt."""
    one = timeout + SLACK
    return (timeout + 10.0 + 2 * one if retry else one) + GRACE


class Out:
    """JSON lines on stdout, from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def emit(self, event: str, **fields) -> None:
        line = json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n"
        with self._lock:
            sys.stdout.write(line)
            sys.stdout.flush()


class Watchdog(threading.Thread):
    """Times the call in progress; reports one still running past its limit."""

    def __init__(self, out: Out) -> None:
        super().__init__(daemon=True)
        self.out = out
        self._lock = threading.Lock()
        self._call: tuple[str, float, float] | None = None  # (name, began, limit)
        self._reported = False

    def run(self) -> None:
        while True:
            time.sleep(0.5)
            with self._lock:
                call, reported = self._call, self._reported
                if call is None or reported or time.monotonic() - call[1] <= call[2]:
                    continue
                self._reported = True
            self.out.emit("hang", call=call[0], began=call[1], until=time.monotonic(), limit=call[2],
                          outcome="still running")

    def timed(self, name: str, limit: float, fn, *a, **kw):
        with self._lock:
            self._call, self._reported = (name, time.monotonic(), limit), False
        began = time.monotonic()
        outcome = "returned"
        try:
            return fn(*a, **kw)
        except BaseException as exc:
            outcome = f"raised {type(exc).__name__}"
            raise
        finally:
            now = time.monotonic()
            with self._lock:
                reported, self._call = self._reported, None
            if now - began > limit and not reported:
                self.out.emit("hang", call=name, began=began, until=now, limit=limit, outcome=outcome)


def state_content(np, revision: int, n: int) -> dict:
    """The shared state's content at ``revision``: the same on every peer."""
    w = (np.arange(n, dtype=np.float32) * np.float32(1e-3) + np.float32(revision)).astype(np.float32)
    return {"w": w, "rev": np.array([revision], dtype=np.int64)}


def command() -> str | None:
    """The orchestrator's next command, if one is waiting ('leave' at end of file)."""
    r, _, _ = select.select([sys.stdin], [], [], 0)
    if not r:
        return None
    line = sys.stdin.readline()
    return line.strip() or "leave"


def run(args) -> int:
    import numpy as np
    import xxhash

    from pccl_py import Client, PcclError

    out = Out()
    dog = Watchdog(out)
    dog.start()
    work = set(args.work.split(",")) if args.work else set()
    limit = call_limit(args.call_timeout, False)
    rlimit = call_limit(args.call_timeout, args.retry)
    rng = np.random.default_rng(args.peer_seed)
    n = args.size
    v = (np.arange(n, dtype=np.float32) % 17) / np.float32(16) - np.float32(0.5)  # the quantized call's vector
    deadline = time.monotonic() + args.run_for

    def digest(a) -> bytes:
        return xxhash.xxh64(a.tobytes()).digest()

    def daemon_gone(pid: int) -> int | None:
        """The exit status of this trainer's daemon (its child) if it has exited."""
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        return os.waitstatus_to_exitcode(status) if done else None

    with Client(coordinator=args.coordinator, timeout=args.call_timeout, listen=args.listen,
                daemon_log_level=args.daemon_log_level) as c:
        out.emit("hello", daemon_pid=c.daemon_pid, peer_id=c.peer_id)
        state = None
        if "state" in work:
            state = c.shared_state(state_content(np, 0, args.state_size))
        synced, offered = 0, None  # last synced revision; the revision of a failed offer
        joined = voted = False
        failed = 0  # errors in a row
        while time.monotonic() < deadline:
            if command() == "leave":
                out.emit("leaving")
                break
            try:
                if not joined:
                    topo = dog.timed("connect", limit, c.connect)
                    joined = voted = True  # connect() returned at the members' vote: skip this step's
                if not voted:
                    topo = dog.timed("update_topology", limit, c.update_topology)
                voted = False
                epoch, world = topo["epoch"], topo["world_size"]
                checks: dict[str, bool] = {}
                hashes = []
                if state is not None:
                    rev = offered if offered is not None else synced + 1
                    offered = rev
                    for name, arr in state_content(np, rev, args.state_size).items():
                        state[name][...] = arr
                    state.revision = rev
                    res = dog.timed("sync_shared_state", limit, c.sync_shared_state, state)
                    synced, offered = int(res["revision"]), None
                    want = state_content(np, synced, args.state_size)
                    h = xxhash.xxh64()
                    for name in ("w", "rev"):
                        h.update(state[name].tobytes())
                    out.emit("state", revision=synced, hash=h.hexdigest(), status=res["status"],
                             correct=all(np.array_equal(state[k], want[k]) for k in want))
                if "sum" in work:
                    ones = np.ones(n, dtype=np.float32)
                    info = dog.timed("all_reduce(sum)", rlimit, c.all_reduce, ones, op="sum", retry=args.retry)
                    checks["sum"] = bool(np.all(ones == info["world_size"]))
                    epoch, world = max(epoch, info["epoch"]), info["world_size"]
                if "parity" in work:
                    x = rng.standard_normal(n).astype(np.float32)
                    info = dog.timed("all_reduce(avg)", rlimit, c.all_reduce, x, op="avg", retry=args.retry)
                    hashes.append(digest(x))
                    epoch, world = max(epoch, info["epoch"]), info["world_size"]
                if "quant" in work:
                    q = v + rng.uniform(-QUANT_NOISE, QUANT_NOISE, n).astype(np.float32)
                    info = dog.timed("all_reduce(uint8)", rlimit, c.all_reduce, q, op="sum", quant="uint8",
                                     retry=args.retry)
                    w = info["world_size"]
                    # each hop quantizes a partial sum of range <= k(1 + 2 noise) to 255 levels
                    tol = w * QUANT_NOISE + w * w * (1 + 2 * QUANT_NOISE) / 255.0 + 1e-3
                    checks["quant"] = bool(np.max(np.abs(q - w * v)) <= tol)
                    hashes.append(digest(q))
                    epoch, world = max(epoch, info["epoch"]), w
                if "async" in work:
                    twos = np.full(n, 2.0, dtype=np.float32)
                    y = rng.standard_normal(n).astype(np.float32)

                    def both(twos=twos, y=y):
                        handles = [c.all_reduce_async(twos, op="sum"), c.all_reduce_async(y, op="avg")]
                        infos, first = [], None
                        for h in handles:  # wait for both, even when the first failed
                            try:
                                infos.append(h.wait())
                            except PcclError as exc:
                                first = first or exc
                        if first is not None:
                            raise first
                        return infos

                    ia, ib = dog.timed("all_reduce_async x2", limit, both)
                    checks["async"] = bool(np.all(twos == 2 * ia["world_size"]))
                    hashes.append(digest(y))
                    epoch, world = max(epoch, ia["epoch"], ib["epoch"]), ia["world_size"]
                parity = True
                if hashes:
                    got = dog.timed("all_gather", rlimit, c.all_gather, b"".join(hashes), retry=args.retry)
                    parity = len(set(got)) == 1
                out.emit("step", epoch=epoch, world=world, checks=checks, parity=parity)
                failed = 0
            except PcclError as exc:
                out.emit("error", type=type(exc).__name__, message=str(exc)[:300])
                failed += 1
                code = daemon_gone(c.daemon_pid)
                if code is not None:
                    out.emit("daemon_exit", code=code)
                    return 3
                if "removed" in str(exc) or "not connected" in str(exc) or "connect first" in str(exc):
                    joined = False
                if failed > 1:  # failing again at once (no coordinator, say): do not spin
                    time.sleep(min(0.5, 0.02 * 2**failed))
    out.emit("left")
    return 0
