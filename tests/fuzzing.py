"""How many cases the fuzz tests run, and values that probe the edges of a schema.

The normal suite runs each fuzz test's own default (thousands of cases in all, a few
seconds). A long run sets ``PCCL_FUZZ_EXAMPLES``: every sans-I/O fuzz test then runs that
many cases and the ones against a real daemon a hundredth of it (at least their default)::

    PCCL_FUZZ_EXAMPLES=100000 pytest -q -p no:cacheprovider tests/test_ipc_fuzz.py tests/test_control_fuzz.py
"""

from __future__ import annotations

import math
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

LONG = int(os.environ.get("PCCL_FUZZ_EXAMPLES", "0") or 0)


def examples(default: int, share: float = 1.0) -> int:
    """``default`` cases, or ``share`` of PCCL_FUZZ_EXAMPLES in a long run."""
    return max(default, int(LONG * share)) if LONG else default


def fuzz_settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def timeout_for(n: int, per_case: float = 0.005) -> float:
    """A pytest timeout for a test of ``n`` cases (generous: machines are shared)."""
    return 60.0 + n * per_case


EDGE_INTS = [0, 1, -1, 2, 3, 4, 7, 8, 4096, 4097, 1 << 16, (1 << 31) - 1, 1 << 31, 1 << 32, (1 << 48) - 1,
             1 << 48, (1 << 48) + 1, (1 << 62) - 1, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1,
             -(1 << 63), -(1 << 31)]
EDGE_FLOATS = [0.0, -0.0, 1e-300, 0.5, 1.0, 5.0, 86400.0, 86400.5, 1e7, 1e7 + 1, 1e308, -1.0, math.inf,
               -math.inf, math.nan]

ints = st.sampled_from(EDGE_INTS) | st.integers(-(1 << 63), (1 << 64) - 1)
floats = st.sampled_from(EDGE_FLOATS) | st.floats()
texts = st.sampled_from(["", "x", "a" * 300, "\0", "a/b", "/", "..", "é", "float32", "sum"]) | st.text(max_size=8)
blobs = st.sampled_from([b"", b"\0" * 4, b"\0" * 8, b"\0" * 4096, b"\0" * 4100]) | st.binary(max_size=16)
scalars = st.none() | st.booleans() | ints | floats | texts | blobs
values = scalars | st.lists(scalars, max_size=4) | st.dictionaries(texts, scalars, max_size=3)
