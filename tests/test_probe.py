"""Bandwidth probes over real data-plane links on 127.0.0.1 (DataPlane.probe)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pccl_py.daemon.dataplane import DataPlaneConfig
from pccl_py.errors import DeadlineExceeded, InvalidUsage, PeerLost
from pccl_py.wire import frames as F
from tests.test_dataplane import cluster, run

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("streams", [1, 3])
@pytest.mark.parametrize("encrypt", [False, True])
@pytest.mark.parametrize("io_threads", [False, True])
def test_probe_measures_and_collectives_still_work(streams, encrypt, io_threads):
    config = DataPlaneConfig(encrypt=encrypt, io_threads=io_threads)

    async def main():
        async with cluster(3, streams=streams, config=config) as dps:
            before = dps[1].traffic[dps[0].peer_id][1]
            rate, seconds = await dps[0].probe(dps[1].peer_id, 3 << 20, 10.0)
            assert rate > 1e6 and 0 < seconds < 10
            assert dps[1].traffic[dps[0].peer_id][1] - before >= 3 << 20  # it crossed the link
            # both directions at once, odd sizes
            (r1, _), (r2, _) = await asyncio.gather(dps[1].probe(dps[2].peer_id, 12345, 5.0),
                                                    dps[2].probe(dps[1].peer_id, 1, 5.0))
            assert r1 > 0 and r2 > 0
            xs = [np.full(1000, i + 1, np.float32) for i in range(3)]
            outs = [np.empty(1000, np.float32) for _ in range(3)]
            await asyncio.gather(*(d.all_reduce(x, o, dtype="float32", op="sum", tag=1, timeout=10)
                                   for d, x, o in zip(dps, xs, outs, strict=True)))
            assert all((o == 6).all() for o in outs)
    run(main())


def test_probe_to_no_link_and_lost_link():
    async def main():
        async with cluster(2) as dps:
            with pytest.raises(InvalidUsage):
                await dps[0].probe("nobody", 100, 1.0)
            task = asyncio.ensure_future(dps[0].probe(dps[1].peer_id, 64 << 20, 20.0))
            await asyncio.sleep(0)
            await dps[1].close()
            with pytest.raises((PeerLost, DeadlineExceeded)):
                await asyncio.wait_for(task, 25.0)
    run(main())


def test_probe_frames_are_checked():
    h = F.decode_header(F.pack_header(F.PROBE, 0, 1, 7, 0xFFFFFFFF, 0, 100, 40))
    assert h.kind == F.PROBE and h.offset == 100 and h.length == 40
    with pytest.raises(Exception, match="probe frame"):
        F.decode_header(F.pack_header(F.PROBE, 0, 1, 7, 0, 0, 10, 40))  # more than its total
    with pytest.raises(Exception, match="PROBE_ACK"):
        F.decode_header(F.pack_header(F.PROBE_ACK, 0, 1, 7, 0, 0, 10, 4))
