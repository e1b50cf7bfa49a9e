"""A small progress bar for long transfers (shared-state syncs)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Callable ``(done, total)`` drawing ``label [#####.....]  45%  12.3 MB/s`` on a stream.

    On a terminal the bar is redrawn in place; otherwise one line is written when the
    transfer completes, so logs stay readable.
    """

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.start = time.monotonic()
        self.finished = False

    def __call__(self, done: int, total: int) -> None:
        if self.finished:
            return
        frac = 1.0 if total <= 0 else min(1.0, done / total)
        rate = done / max(1e-9, time.monotonic() - self.start) / 1e6
        filled = int(round(frac * self.width))
        line = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {frac * 100:5.1f}% "
                f"{done / 1e6:.1f}/{total / 1e6:.1f} MB {rate:.1f} MB/s")
        tty = getattr(self.stream, "isatty", lambda: False)()
        if done >= total:
            self.finished = True
            self.stream.write(("\r" if tty else "") + line + "\n")
        elif tty:
            self.stream.write("\r" + line)
        self.stream.flush()
