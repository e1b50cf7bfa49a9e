"""All-gather of byte blobs of any size (bounded): direct send to every peer, rank order out."""

from __future__ import annotations

from pccl_py.collectives.base import Collective, Rx, expect
from pccl_py.wire import frames as F


class BlobAllGather(Collective):
    name = "all_gather"

    def __init__(self, link, *, blob: bytes, max_blob: int, **kw):
        super().__init__(link, **kw)
        self.blob = bytes(blob)
        self.max_blob = max_blob
        self.blobs: list[bytes | bytearray | None] = [None] * link.world
        self.blobs[link.rank] = self.blob
        self._missing = link.world - 1

    def start(self) -> None:
        self.started = True
        lk = self.link
        for r in range(lk.world):
            if r != lk.rank:
                self.send_data(r, self.tag % lk.nstreams(r), 0, 0, self.blob, len(self.blob))
        self._maybe_done()

    def on_data(self, src: int, h: F.Header, conn) -> Rx:
        self.check_desc(src, h)
        expect(h.step == 0 and h.offset == 0 and h.quant == F.QUANT_NONE, "unexpected all-gather frame")
        expect(h.length <= self.max_blob, f"all-gather blob of {h.length} bytes exceeds {self.max_blob}")
        expect(self.blobs[src] is None, f"second all-gather blob from rank {src}")
        buf = bytearray(h.length)
        self.blobs[src] = buf
        self.count_rx(h, h.length)

        def finish():
            self._missing -= 1
            self._maybe_done()

        return Rx(memoryview(buf), None, finish)

    def _maybe_done(self) -> None:
        if self.started and self._missing == 0:
            self.data_complete()

    def result(self) -> list[bytes]:
        return [bytes(b) for b in self.blobs]  # type: ignore[arg-type]
