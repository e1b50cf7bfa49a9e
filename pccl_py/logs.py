"""How the coordinator and the daemons write their logs: one event per line, as text or JSON.

Every line carries the process role and pid; a daemon's lines also carry its peer id and
its rank in the current epoch (``-`` until it has them), so the lines of many daemons can be
merged and filtered. ``--log-format json`` writes one JSON object per line with the fields
``ts`` (seconds since the epoch), ``level``, ``logger``, ``role``, ``pid``, ``peer``,
``rank``, ``epoch`` and ``msg`` (plus ``exc`` with the traceback, when there is one).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable

FORMATS = ("text", "json")


class _Context(logging.Filter):
    """Adds ``role``, ``peer``, ``rank`` and ``epoch`` to every record (``who()`` returns the
    last three; it is asked on every line, so it always says the current epoch)."""

    def __init__(self, role: str, who: Callable[[], tuple[str, int, int]] | None) -> None:
        super().__init__()
        self.role = role
        self.who = who

    def filter(self, record: logging.LogRecord) -> bool:
        peer, rank, epoch = ("-", -1, -1)
        if self.who is not None:
            try:
                peer, rank, epoch = self.who()
            except Exception:  # a log line must never fail for want of context
                pass
        record.role, record.peer, record.rank, record.epoch = self.role, peer, rank, epoch
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname, "logger": record.name,
               "role": getattr(record, "role", "-"), "pid": record.process,
               "peer": getattr(record, "peer", "-"), "rank": getattr(record, "rank", -1),
               "epoch": getattr(record, "epoch", -1), "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


_TEXT = "%(asctime)s {role}[%(process)d] %(levelname)s %(name)s: {who}%(message)s"


def setup(role: str, level: str, fmt: str = "text", *, who: Callable[[], tuple[str, int, int]] | None = None,
          stream=None) -> logging.Handler:
    """Configure the root logger for this process; returns the handler it installed.

    ``who`` (a daemon's) returns (peer id, rank, epoch) for every line."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: choose {' or '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_Context(role, who))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        tag = "peer %(peer).8s rank %(rank)s: " if who is not None else ""
        handler.setFormatter(logging.Formatter(_TEXT.format(role=role, who=tag)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


def default_format() -> str:
    """``PCCL_LOG_FORMAT`` (for daemons a Client spawns), else text."""
    return os.environ.get("PCCL_LOG_FORMAT", "text")
