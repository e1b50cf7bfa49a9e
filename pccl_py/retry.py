"""Retries are described by one value, not by ad-hoc sleeps."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter under one overall deadline.

    ``delays()`` yields the pause before each retry until ``deadline`` seconds (from the
    first call) would be exceeded.
    """

    initial: float = 0.05
    maximum: float = 1.0
    factor: float = 2.0
    jitter: float = 0.2
    deadline: float = 60.0

    def delays(self, start: float | None = None) -> Iterator[float]:
        start = time.monotonic() if start is None else start
        delay = self.initial
        while True:
            pause = delay * (1.0 + self.jitter * (2.0 * random.random() - 1.0))
            if time.monotonic() + pause - start > self.deadline:
                return
            yield pause
            delay = min(self.maximum, delay * self.factor)
