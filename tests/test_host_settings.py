"""What a daemon tells a user about the host's TCP settings on long paths."""

from __future__ import annotations

from pccl_py.transport.host_settings import read_flag, slow_start_advice


def test_slow_start_after_idle_is_reported_only_for_links_that_leave_the_host(tmp_path):
    on, off = tmp_path / "on", tmp_path / "off"
    on.write_text("1\n")
    off.write_text("0\n")
    advice = slow_start_advice(False, str(on))
    assert advice and "tcp_slow_start_after_idle=0" in advice
    assert slow_start_advice(True, str(on)) is None  # a run on one host: no long path
    assert slow_start_advice(False, str(off)) is None
    assert slow_start_advice(False, str(tmp_path / "missing")) is None  # not Linux: nothing to say
    assert read_flag(str(on)) is True and read_flag(str(off)) is False
