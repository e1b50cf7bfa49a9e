"""Emulated internet paths (stress/wan): the path plan, the delay line's scheduler on a fake
clock, and, with root, real RTT, rate and per-flow cap between two network namespaces."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "stress"))
import wan  # noqa: E402
from wan.measure import goodput, goodput_both_ways, rtt  # noqa: E402

WHY = wan.available()
needs_root = pytest.mark.skipif(WHY is not None, reason=f"emulated paths unavailable: {WHY}")
CC = "cubic"  # per socket (flows.py --cc): a namespace may only default to the host's allowed list


def test_plan_paths_splits_the_rtt_and_sizes_the_queues():
    specs = {(s.src, s.dst): s for s in wan.plan_paths(3, 20, 200, 1 / 8, per_pair={(0, 2): (100, 400)})}
    assert sorted(specs) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    a = specs[(0, 1)]
    assert a.delay_ns == 10_000_000 and a.rate == 25_000_000
    assert a.qlimit == 500_000  # one RTT at the rate
    assert a.flow_rate == 3_125_000 and a.flow_qlimit == 64 << 10  # its share (62.5 kB), at least one 64 KiB segment
    for key in ((0, 2), (2, 0)):  # an override covers both directions
        assert specs[key].delay_ns == 50_000_000 and specs[key].rate == 50_000_000
    free = wan.plan_paths(2, 5, None, 1 / 8)[0]
    assert free.rate == 0 and free.flow_rate == 0  # unlimited: no cap either
    assert wan.plan_paths(2, 20, 8, queue_ms=1)[0].qlimit == 64 << 10
    with pytest.raises(ValueError, match="flow_cap_fraction"):
        wan.plan_paths(2, 20, 100, 0)
    with pytest.raises(ValueError, match="per_pair"):
        wan.plan_paths(2, 20, 100, per_pair={(0, 0): (1, 1)})


@pytest.mark.skipif(not wan.paths.shutil.which("gcc"), reason="gcc not found")
def test_the_delay_lines_scheduler_keeps_rates_order_and_delay_on_a_fake_clock():
    out = subprocess.run([wan.build("wanpath_test")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "wanpath_test ok" in out.stdout


@needs_root
@pytest.mark.timeout(60)
def test_rtt_and_rate_limit_between_two_namespaces():
    with wan.WanPaths(2, rtt_ms=20, rate_mbit=50) as net:
        names = list(net.names)
        r = rtt(net, 0, 1, count=15)
        assert 19.0 <= r["min_ms"] and r["median_ms"] <= 22.0, r
        g = goodput(net, 0, 1, flows=1, seconds=3.0, warmup=1.0, cc=CC)
        assert g["sender"]["cc"] == CC
        assert 0.85 * 50e6 <= g["bits_per_s"] <= 1.05 * 50e6, g
        ab, ba = goodput_both_ways(net, 0, 1, flows=1, seconds=3.0, warmup=1.0, cc=CC)
        # Each direction has its own 50 Mbit/s: together they carry well over one link's
        # worth (a shared limit would hold the sum to 50). One cubic flow per direction,
        # with the delay line and both senders on 2 cores, may lose a second to a loss
        # event, so each direction alone is held to less.
        assert ab + ba >= 1.5 * 50e6, (ab, ba)
        assert all(0.6 * 50e6 <= bps <= 1.05 * 50e6 for bps in (ab, ba)), (ab, ba)
        sent = net.tcp_counters(0)
        assert set(sent) == set(wan.paths.TCP_COUNTERS) and sent["OutSegs"] > 10_000, sent
        assert sent["RetransSegs"] <= sent["OutSegs"]
    assert net.final_stats is not None and net.final_stats["paths"][0]["out_pkts"] > 0
    assert not any(os.path.exists(f"/run/netns/{n}") for n in names)  # torn down
    assert net.delayline is None  # ended and reaped


@needs_root
@pytest.mark.timeout(60)
def test_the_per_flow_cap_holds_one_flow_to_its_share_and_eight_fill_the_link():
    link = 100e6
    with wan.WanPaths(2, rtt_ms=20, rate_mbit=link / 1e6, flow_cap_fraction=1 / 8) as net:
        one = goodput(net, 0, 1, flows=1, seconds=3.0, warmup=1.0, cc=CC)
        assert 0.8 * link / 8 <= one["bits_per_s"] <= 1.05 * link / 8, one
        eight = goodput(net, 0, 1, flows=8, seconds=3.0, warmup=1.0, cc=CC)
        assert 0.85 * link <= eight["bits_per_s"] <= 1.05 * link, eight
        assert min(eight["per_flow_bits_per_s"]) >= 0.6 * link / 8, eight  # every flow gets its share


def test_tcp_counters_are_read_by_name():
    text = ("Tcp: RtoAlgorithm OutSegs RetransSegs\nTcp: 1 900 12\n"
            "TcpExt: TCPTimeouts TCPLossProbes\nTcpExt: 3 4\nIpExt: InOctets\nIpExt: 77\n")
    assert wan.paths.parse_counters(text) == {"RtoAlgorithm": 1, "OutSegs": 900, "RetransSegs": 12,
                                              "TCPTimeouts": 3, "TCPLossProbes": 4, "InOctets": 77}
    assert wan.paths.parse_counters("Tcp: a b\nUdp: 1 2\n") == {}  # names and values of different lines


@needs_root
@pytest.mark.timeout(60)
def test_the_round_trip_a_data_plane_reads_is_the_paths():
    """host_settings.round_trip (TCP_INFO) on a connection across a 30 ms path: what the
    daemons use to start a long path's links with more streams."""
    server = ("import socket, sys; s = socket.create_server(('0.0.0.0', 5411)); print('ready', flush=True); "
              "c, _ = s.accept(); c.sendall(c.recv(1)); c.recv(1)")
    with wan.WanPaths(2, rtt_ms=30) as net:
        srv = net.popen(1, [sys.executable, "-c", server], stdout=subprocess.PIPE, text=True)
        assert srv.stdout.readline().strip() == "ready"
        client = (f"import socket; from pccl_py.transport.host_settings import round_trip; "
                  f"c = socket.create_connection(('{net.addr(1)}', 5411), 5); c.sendall(b'x'); c.recv(1); "
                  f"print(round_trip(c)); c.sendall(b'y')")
        out = net.run(0, [sys.executable, "-c", client], capture_output=True, text=True, timeout=30,
                      cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
        assert out.returncode == 0, out.stderr
        assert 0.029 <= float(out.stdout) <= 0.040, out.stdout
        srv.wait(timeout=10)


@needs_root
@pytest.mark.timeout(60)
def test_each_pair_of_peers_has_its_own_rtt():
    with wan.WanPaths(3, rtt_ms=10, per_pair={(0, 2): (40, None)}) as net:
        got = {pair: rtt(net, *pair, count=6)["median_ms"] for pair in ((0, 1), (0, 2), (2, 0), (2, 1))}
    for pair, want in (((0, 1), 10), ((0, 2), 40), ((2, 0), 40), ((2, 1), 10)):
        assert want - 0.5 <= got[pair] <= want + 2.0, got


@needs_root
def test_windows_and_congestion_control_are_set_per_namespace():
    host = [open(f"/proc/sys/net/ipv4/{k}").read() for k in ("tcp_rmem", "tcp_congestion_control")]
    with wan.WanPaths(2, windows="large", cc="reno") as net:  # reno is always allowed
        for i in range(2):
            assert net.sysctl(i, "net/ipv4/tcp_congestion_control") == "reno"
            assert net.sysctl(i, "net/ipv4/tcp_rmem").split()[2] == str(wan.paths.LARGE_WINDOW)
            assert net.sysctl(i, "net/ipv4/tcp_wmem").split()[2] == str(wan.paths.LARGE_WINDOW)
        avail = set(net.sysctl(0, "net/ipv4/tcp_available_congestion_control").split())
        restricted = avail - set(net.sysctl(0, "net/ipv4/tcp_allowed_congestion_control").split())
    assert [open(f"/proc/sys/net/ipv4/{k}").read() for k in ("tcp_rmem", "tcp_congestion_control")] == host
    if restricted:  # e.g. cubic where the host defaults to bbr: refused with what to do
        with pytest.raises(wan.WanUnavailable, match="TCP_CONGESTION per socket"):
            wan.WanPaths(2, cc=sorted(restricted)[0])


@needs_root
def test_an_exception_inside_tears_everything_down():
    with pytest.raises(RuntimeError, match="boom"), wan.WanPaths(2, rtt_ms=1) as net:
        names = list(net.names)
        p = net.popen(1, ["sleep", "30"])
        raise RuntimeError("boom")
    assert p.poll() is not None and net.delayline is None
    assert not any(os.path.exists(f"/run/netns/{n}") for n in names)
