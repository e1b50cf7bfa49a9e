"""``pccl status``: what the coordinator knows (members, groups, epoch, heartbeats, activity).

It talks to the coordinator over the control plane, as a daemon does: a CURVE client with the
keys of the run secret (``--secret``, else the environment variable ``PCCL_SECRET``). With a
wrong secret the handshake fails and the query ends at once with
:class:`~pccl_py.errors.AuthenticationFailed`, not at its deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

from pccl_py.errors import AuthenticationFailed, CoordinatorUnavailable, PcclError, ProtocolError
from pccl_py.transport.zmq_io import (
    DEFAULT_COORDINATOR_PORT,
    HANDSHAKE_EVENTS,
    HANDSHAKE_FAILED,
    ZmqPump,
    client_handshake_failure,
    close_monitored,
    curve_client,
    zmq_endpoint,
)
from pccl_py.wire import control as protocol


async def query_status(addr: str, timeout: float = 3.0, *, secret: bytes = b"") -> dict:
    """Ask the coordinator at ``addr`` for its status, proving the run ``secret``.

    Raises :class:`AuthenticationFailed` as soon as the handshake fails (another secret, or
    not this run's coordinator), :class:`CoordinatorUnavailable` when nothing answers in time.
    """
    loop = asyncio.get_running_loop()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE)
    curve_client(sock, secret)
    req = secrets.randbits(62)
    answer: asyncio.Future[dict] = loop.create_future()
    handshake = {"ok": False, "failed": 0}

    def on_frames(frames: list) -> None:
        try:
            msg = protocol.decode(frames[-1].buffer)
        except ProtocolError:
            return
        if msg["type"] == "status_a" and msg["req"] == req and not answer.done():
            answer.set_result(msg)

    def on_monitor(frames: list) -> None:
        try:
            event = parse_monitor_message(frames)
        except Exception:  # a monitor frame we do not understand is not worth a crash
            return
        if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            handshake["ok"] = True
        elif event["event"] in HANDSHAKE_FAILED and not answer.done():
            handshake["failed"] += 1
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and handshake["failed"] < 2:
                return  # zmq dials again by itself: one hang-up may be a coordinator going down
            answer.set_exception(AuthenticationFailed(client_handshake_failure(
                event["event"], event["value"], addr, who="pccl status",
                secret_name="the secret (--secret, PCCL_SECRET)")))

    mon = sock.get_monitor_socket(HANDSHAKE_EVENTS)
    pumps = []
    try:
        pumps.append(ZmqPump(mon, on_monitor, copy=True))
        sock.connect(zmq_endpoint(addr))
        pumps.append(ZmqPump(sock, on_frames))
        sock.send(protocol.encode("status_q", req=req), zmq.NOBLOCK)
        pumps[-1].kick()
        try:
            msg = await asyncio.wait_for(answer, timeout)
        except asyncio.TimeoutError:
            if handshake["ok"]:
                raise CoordinatorUnavailable(
                    f"no status from the coordinator at {addr} within {timeout:g} s (it proved the run "
                    "secret but did not answer: is it overloaded or paused?)") from None
            raise CoordinatorUnavailable(
                f"no status from the coordinator at {addr} within {timeout:g} s; is it running?"
            ) from None
    finally:
        for pump in pumps:
            pump.close()
        close_monitored(sock, mon, 0)
    msg.pop("type", None)
    msg.pop("req", None)
    return msg


def _rate(m: dict, before: dict | None, seconds: float | None) -> str:
    """A member's data-plane throughput since ``before`` (its row of the last snapshot):
    sent / received, from the byte counts its heartbeats carry."""
    if before is None or not seconds or seconds <= 0:
        return "-"
    tx = max(0, m.get("tx", 0) - before.get("tx", 0)) / seconds / 1e6
    rx = max(0, m.get("rx", 0) - before.get("rx", 0)) / seconds / 1e6
    return f"{tx:.1f}/{rx:.1f} MB/s"


def format_status(st: dict, prev: dict | None = None, seconds: float | None = None) -> str:
    """The status as a table; with the snapshot of ``seconds`` ago (``prev``) it adds each
    member's throughput (``pccl status --watch``)."""
    lines = [
        f"coordinator {st['instance']}  epoch {st['epoch']}  world size {st['world_size']}  "
        f"groups {st['num_groups']}  uptime {st['uptime']:.1f} s"
        + ("  [recovering]" if st["recovering"] else "")
        + (f"  vote open: {', '.join(st['voters'])}" if st["vote_open"] else ""),
    ]
    header = ("PEER", "GROUP", "STATE", "RING", "DATA ADDRESS", "EPOCH", "REV", "HB AGE", "ACTIVITY")
    if prev is not None:
        header = (*header[:-1], "SENT/RECEIVED", header[-1])
    before = {m["peer_id"]: m for m in prev["members"]} if prev is not None else {}
    rows = [header]
    for m in st["members"]:
        row = [
            m["peer_id"], str(m["group"]), m["state"], str(m["ring_pos"]) if m["ring_pos"] >= 0 else "-",
            f"{m['host']}:{m['port']}", str(m["epoch"]), str(m["revision"]), f"{m['hb_age']:.2f}s",
            m["activity"] or "-",
        ]
        if prev is not None:
            row.insert(-1, _rate(m, before.get(m["peer_id"]), seconds))
        rows.append(tuple(row))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if not st["members"]:
        lines.append("(no peers)")
    lines.extend(format_rings(st))
    return "\n".join(lines)


def format_rings(st: dict) -> list[str]:
    """Each group's ring order and, where measured (optimize_topology), the rate of each
    ring link, then the bandwidth matrix (MB/s, row: sender, column: receiver)."""
    rates = {(r[0], r[1]): r[2] for r in st.get("bandwidth", [])}
    groups: dict[int, list[tuple[int, str]]] = {}
    for m in st["members"]:
        if m["ring_pos"] >= 0:
            groups.setdefault(m["group"], []).append((m["ring_pos"], m["peer_id"]))
    out = []
    for g, pos in sorted(groups.items()):
        ring = [pid for _, pid in sorted(pos)]
        if len(ring) < 2:
            continue
        links = [rates.get((a, b)) for a, b in zip(ring, ring[1:] + ring[:1], strict=True)]
        known = [x for x in links if x is not None]
        slowest = f"  (slowest link {min(known) / 1e6:.1f} MB/s)" if len(known) == len(links) else ""
        steps = "".join(f" -{'?' if x is None else f'{x / 1e6:.0f}'}-> {b[:8]}"
                        for x, b in zip(links, ring[1:] + ring[:1], strict=True))
        out.append(f"ring of group {g}: {ring[0][:8]}{steps}{slowest}")
    if rates:
        ids = sorted({p for pair in rates for p in pair})
        out.append("bandwidth (MB/s, row sends to column)" + (" [optimizing]" if st.get("optimizing") else ""))
        width = max(8, *(len(f"{v / 1e6:.1f}") for v in rates.values()))
        out.append(" " * 9 + " ".join(p[:8].rjust(width) for p in ids))
        for a in ids:
            cells = ["-" if a == b else (f"{rates[(a, b)] / 1e6:.1f}" if (a, b) in rates else "?") for b in ids]
            out.append(a[:8].ljust(9) + " ".join(c.rjust(width) for c in cells))
    return out


def watch(addr: str, interval: float, timeout: float, count: int | None = None, out=None,
          secret: bytes = b"") -> int:
    """Print the status every ``interval`` seconds until interrupted (or ``count`` times): the
    screen is redrawn on a terminal, snapshots follow each other otherwise. A coordinator that
    does not answer is reported and asked again at the next refresh."""
    out = out or sys.stdout
    tty = out.isatty()
    shown = 0
    last_epoch = None
    last: tuple[dict, float] | None = None
    try:
        while count is None or shown < count:
            started = time.monotonic()
            try:
                st = asyncio.run(query_status(addr, timeout, secret=secret))
                at = time.monotonic()
                text = format_status(st, *(last[0], at - last[1]) if last is not None else (None, None))
                last = (st, at)
                if last_epoch is not None and st["epoch"] != last_epoch:
                    text += f"\n(epoch {last_epoch} -> {st['epoch']} since the last refresh)"
                last_epoch = st["epoch"]
            except PcclError as exc:
                text = f"{exc} (asking again in {interval:g} s)"
            stamp = time.strftime("%H:%M:%S")
            if tty:
                out.write("\x1b[H\x1b[2J")  # home, clear
            out.write(f"[{stamp}] pccl status --watch {interval:g}\n{text}\n")
            if not tty:
                out.write("\n")
            out.flush()
            shown += 1
            if count is not None and shown >= count:
                break
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pccl status", description="Show what the coordinator knows.")
    p.add_argument("--coordinator", default=f"127.0.0.1:{DEFAULT_COORDINATOR_PORT}", help="HOST:PORT")
    p.add_argument("--secret", default=None, help="run secret (default: env PCCL_SECRET, else empty)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--watch", type=float, nargs="?", const=1.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 1) until Ctrl-C")
    p.add_argument("--count", type=int, default=None, help=argparse.SUPPRESS)  # stop after N refreshes
    args = p.parse_args(argv)
    secret = (args.secret if args.secret is not None else os.environ.get("PCCL_SECRET", "")).encode()
    if args.watch is not None:
        if args.watch <= 0:
            p.error("--watch takes a positive number of seconds")
        return watch(args.coordinator, args.watch, args.timeout, args.count, secret=secret)
    try:
        st = asyncio.run(query_status(args.coordinator, args.timeout, secret=secret))
    except PcclError as exc:
        print(f"pccl status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
