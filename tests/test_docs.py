"""The code in README.md and docs/: every python and sh block runs here, or says why not.

A block preceded by ``<!-- not run: REASON -->`` is only compiled (python blocks that are
not sketches). Every other python block runs as written, in two trainer processes against
a real coordinator on 127.0.0.1: its coordinator address is replaced by that one, and the
names it leaves to the reader (``steps``, ``grads``, ``w``, ``m``, ``training``, ``step``)
are given small values first.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                               if f.endswith(".md"))
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"^<!-- not run: (.+) -->$")

PRELUDE = '''
import numpy as np
steps = 2
grads = np.ones(1000, np.float32)
w = np.zeros(64, np.float32)
m = np.zeros(64, np.float32)
class _Twice:  # `while training:` runs two rounds
    n = 2
    def __bool__(self):
        self.n -= 1
        return self.n >= 0
training = _Twice()
def step(*tensors):
    for t in tensors:
        t += 1
'''


def blocks():
    """(file, line, language, code, reason-not-run or None) for every fenced block."""
    out = []
    for name in FILES:
        lines = open(os.path.join(ROOT, name)).read().split("\n")
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if m and m.group(1):
                lang, start = m.group(1), i
                i += 1
                body = []
                while i < len(lines) and not lines[i].startswith("```"):
                    body.append(lines[i])
                    i += 1
                prev = NOT_RUN.match(lines[start - 1]) if start else None
                out.append((name, start + 1, lang, "\n".join(body), prev.group(1) if prev else None))
            i += 1
    return out


ALL = blocks()
RUNNABLE = [b for b in ALL if b[2] in ("python", "sh") and b[4] is None]


def test_every_python_and_sh_block_is_run_here_or_says_why_not():
    assert ALL, "no code blocks found: the parser is broken"
    for name, line, lang, _code, reason in ALL:
        if lang in ("python", "sh") and reason is None:
            assert lang == "python", f"{name}:{line}: an sh block that no test runs needs <!-- not run: ... -->"
    assert RUNNABLE, "no block runs: the docs show no code that is checked"


@pytest.mark.parametrize("name,line,code", [(b[0], b[1], b[3]) for b in ALL
                                            if b[2] == "python" and b[4] and "sketch" not in b[4]])
def test_blocks_not_run_still_compile(name, line, code):
    src = textwrap.dedent(code)
    try:
        ast.parse(src)
    except SyntaxError:  # a fragment of a with-block: try it inside one
        ast.parse("with x:\n" + textwrap.indent(src, "    "))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,line,code", [(b[0], b[1], b[3]) for b in RUNNABLE])
def test_runnable_blocks_run_as_two_trainers(name, line, code, coordinator):
    src = re.sub(r'coordinator="[^"]+"', f'coordinator="{coordinator.addr}"', textwrap.dedent(code))
    assert coordinator.addr in src, f"{name}:{line}: a runnable block must name its coordinator"
    script = PRELUDE + src + "\nprint('block ran to its end')\n"
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=100)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0 and "block ran to its end" in out, f"{name}:{line} failed:\n{out[-3000:]}"
