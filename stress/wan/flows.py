"""Raw TCP traffic for measuring a path: a bulk receiver and sender, a 1-byte echo and its pinger.

    flows.py recv --port P --flows K --seconds T [--warmup W]   # prints READY, then a JSON line
    flows.py send --to ADDR --port P --flows K --seconds T [--cc CC]  # prints a JSON line (TCP_INFO per flow)
    flows.py echo --port P                                      # prints READY; echoes one connection
    flows.py ping --to ADDR --port P [--count N]                # prints a JSON line of round trips

Standalone (standard library only): it runs inside a peer's network namespace. The
receiver measures goodput from the moment all K flows are connected, counting only the
bytes that arrive between ``warmup`` and ``seconds`` after it, then closes every flow,
which ends the sender. It counts what each flow's kernel received (TCP_INFO), so a
receiver that falls behind in reading does not shift bytes into or out of the window.
Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import struct
import sys
import time

CHUNK = 1 << 20
ACCEPT_S = 15.0
# tcp_info: 8 bytes of u8 fields, then u32s from tcpi_rto; indices into those
_TI = struct.Struct("8x24I")
_RTT, _RTTVAR, _SSTHRESH, _CWND, _MSS, _TOTAL_RETRANS = 15, 16, 17, 18, 2, 23
_BYTES_RECEIVED = struct.Struct("128xQ")  # tcpi_bytes_received (Linux 4.1+)


def _listen(port: int) -> socket.socket:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(64)
    ls.settimeout(ACCEPT_S)
    print("READY", flush=True)
    return ls


def _received(conns: list[socket.socket], app: list[int]) -> tuple[float, list[int]]:
    """(now, bytes each flow's kernel has received): tcpi_bytes_received, which does not lag
    behind when this process does; what the application read where the kernel lacks it."""
    got = []
    for c, a in zip(conns, app):
        raw = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _BYTES_RECEIVED.size)
        got.append(_BYTES_RECEIVED.unpack(raw)[0] if len(raw) >= _BYTES_RECEIVED.size else a)
    return time.monotonic(), got


def recv(port: int, flows: int, seconds: float, warmup: float) -> dict:
    ls = _listen(port)
    conns = []
    try:
        deadline = time.monotonic() + ACCEPT_S
        while len(conns) < flows:
            ls.settimeout(max(0.01, deadline - time.monotonic()))
            conns.append(ls.accept()[0])
    finally:
        ls.close()
    t0 = time.monotonic()
    start, end = t0 + warmup, t0 + seconds
    total = [0] * flows
    at_start: tuple[float, list[int]] | None = None
    buf = bytearray(CHUNK)
    sel = selectors.DefaultSelector()
    for k, c in enumerate(conns):
        c.setblocking(False)
        sel.register(c, selectors.EVENT_READ, k)
    first = [None] * flows
    try:
        while True:
            now = time.monotonic()
            if at_start is None and now >= start:
                at_start = _received(conns, total)
            if now >= end:
                at_end = _received(conns, total)
                break
            for key, _ in sel.select(timeout=max(0.0, min(end, start if at_start is None else end) - now)):
                try:
                    n = key.fileobj.recv_into(buf)
                except (BlockingIOError, InterruptedError):
                    continue
                if n == 0:
                    sel.unregister(key.fileobj)
                    continue
                total[key.data] += n
                if first[key.data] is None:
                    first[key.data] = time.monotonic() - t0
    finally:
        for c in conns:
            c.close()
    assert at_start is not None
    window = at_end[0] - at_start[0]  # as taken, a little late or not
    per_flow = [(b - a) * 8 / window for a, b in zip(at_start[1], at_end[1])]
    return {"flows": flows, "seconds": seconds, "warmup": warmup, "window_s": window, "bits_per_s": sum(per_flow),
            "per_flow_bits_per_s": per_flow, "bytes_read": total, "first_byte_s": first}


def tcp_info(s: socket.socket) -> dict:
    try:
        v = _TI.unpack(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TI.size))
    except OSError:
        return {}
    return {"srtt_ms": v[_RTT] / 1000, "rttvar_ms": v[_RTTVAR] / 1000, "cwnd": v[_CWND], "mss": v[_MSS],
            "ssthresh": v[_SSTHRESH], "retrans": v[_TOTAL_RETRANS]}


def send(to: str, port: int, flows: int, seconds: float, cc: str | None = None) -> dict:
    socks = []
    for _ in range(flows):
        s = socket.socket()
        if cc:  # before connecting: the handshake already runs under it
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
        s.settimeout(ACCEPT_S)
        s.connect((to, port))
        socks.append(s)
    data = memoryview(bytes(CHUNK))
    sel = selectors.DefaultSelector()
    for k, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_WRITE, k)
    sent = [0] * flows
    info: list[dict] = [{} for _ in socks]
    deadline = time.monotonic() + seconds + ACCEPT_S  # the receiver normally ends it much earlier
    next_info = 0.0
    try:
        while sel.get_map() and time.monotonic() < deadline:
            if time.monotonic() >= next_info:  # keep the last sample before the receiver ends the flows
                for key in sel.get_map().values():
                    info[key.data] = tcp_info(key.fileobj) or info[key.data]
                next_info = time.monotonic() + 0.2
            for key, _ in sel.select(timeout=0.2):
                k = key.data
                try:
                    sent[k] += key.fileobj.send(data)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:  # the receiver closed: this flow is done
                    sel.unregister(key.fileobj)
        used = socks[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()
    finally:
        for s in socks:
            s.close()
    return {"sent": sent, "tcp_info": info, "cc": used}


def echo(port: int) -> None:
    ls = _listen(port)
    try:
        c, _ = ls.accept()
    finally:
        ls.close()
    with c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.settimeout(60.0)
        while data := c.recv(4096):
            c.sendall(data)


def ping(to: str, port: int, count: int) -> dict:
    t0 = time.perf_counter()
    s = socket.create_connection((to, port), timeout=ACCEPT_S)
    connect = time.perf_counter() - t0
    rtts = []
    with s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(10.0)
        for _ in range(count):
            t = time.perf_counter()
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise ConnectionError("the echo closed")
            rtts.append(time.perf_counter() - t)
    return {"connect_ms": connect * 1e3, "rtts_ms": [r * 1e3 for r in rtts]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("role", choices=["recv", "send", "echo", "ping"])
    ap.add_argument("--to", default="")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--flows", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--cc", default=None, help="the sender's congestion control (TCP_CONGESTION; root for a "
                    "CC outside net.ipv4.tcp_allowed_congestion_control)")
    a = ap.parse_args(argv)
    if a.role == "recv":
        out = recv(a.port, a.flows, a.seconds, a.warmup)
    elif a.role == "send":
        out = send(a.to, a.port, a.flows, a.seconds, a.cc)
    elif a.role == "ping":
        out = ping(a.to, a.port, a.count)
    else:
        echo(a.port)
        return 0
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
