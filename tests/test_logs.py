"""Log lines: one event per line, with the process and (for a daemon) peer, rank, epoch."""

from __future__ import annotations

import io
import json
import logging

import pytest

from pccl_py import logs

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])


def test_json_lines_carry_the_daemon_context_of_the_moment(restore_root):
    out = io.StringIO()
    state = {"who": ("abcdef0123456789", 2, 7)}
    logs.setup("daemon", "INFO", "json", who=lambda: state["who"], stream=out)
    logging.getLogger("pccl.dataplane").warning("link to peer %s lost:\nreset", "x")
    state["who"] = ("abcdef0123456789", 0, 8)  # a new epoch: the next line says so
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("pccl.daemon").exception("request failed")
    logging.getLogger("pccl.daemon").debug("below the level: not written")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # one event per line, newlines in messages and tracebacks escaped
    a, b = (json.loads(x) for x in lines)
    assert (a["level"], a["logger"], a["role"], a["peer"], a["rank"], a["epoch"]) == \
        ("WARNING", "pccl.dataplane", "daemon", "abcdef0123456789", 2, 7)
    assert a["msg"] == "link to peer x lost:\nreset" and isinstance(a["ts"], float) and a["pid"] > 0
    assert (b["rank"], b["epoch"]) == (0, 8) and "RuntimeError: boom" in b["exc"]


def test_text_lines_name_the_role_and_the_peer(restore_root):
    out = io.StringIO()
    logs.setup("daemon", "WARNING", "text", who=lambda: ("abcdef0123456789", 1, 3), stream=out)
    logging.getLogger("pccl.control").warning("silent coordinator")
    line = out.getvalue().strip()
    assert " daemon[" in line and "WARNING pccl.control: peer abcdef01 rank 1: silent coordinator" in line
    out2 = io.StringIO()
    logs.setup("coordinator", "INFO", "text", stream=out2)
    logging.getLogger("pccl.coordinator").info("removed p1")
    assert "coordinator[" in out2.getvalue() and "INFO pccl.coordinator: removed p1" in out2.getvalue()


def test_a_failing_context_never_costs_a_line_and_a_bad_format_is_refused(restore_root):
    out = io.StringIO()

    def broken():
        raise KeyError("no topology yet")

    logs.setup("daemon", "INFO", "json", who=broken, stream=out)
    logging.getLogger("pccl.daemon").info("starting")
    assert json.loads(out.getvalue())["peer"] == "-"
    with pytest.raises(ValueError, match="text or json"):
        logs.setup("daemon", "INFO", "xml")
