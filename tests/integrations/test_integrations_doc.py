"""The ```python-openmmlab blocks of docs/INTEGRATIONS.md run as-is with the openmmlab extra, each in a
fresh interpreter with plain mmcv-lite (no stand-in for the compiled ops: what a user gets).
The plain ```python blocks are run by the project-wide docs test."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "INTEGRATIONS.md")
SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))


def _blocks(tag):
    with open(DOC) as f:
        text = f.read()
    return re.findall(rf"^```{re.escape(tag)}\n(.*?)^```", text, flags=re.S | re.M)


def test_doc_has_openmmlab_examples():
    assert len(_blocks("python-openmmlab")) >= 3
    assert len(_blocks("python")) >= 3


@pytest.mark.parametrize("i", range(len(_blocks("python-openmmlab"))))
def test_openmmlab_block_runs(i):
    pytest.importorskip("mmengine", reason="the openmmlab extra is not installed (make test-openmmlab)")
    code = _blocks("python-openmmlab")[i]
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, f"block {i} failed:\n{code}\n--- stderr ---\n{out.stderr[-3000:]}"
