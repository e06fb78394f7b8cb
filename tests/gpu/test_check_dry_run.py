"""benchmarks/gpu/check.sh --dry-run end to end on CPU (so the prepared device check cannot rot), and
the training check's curve-agreement rule."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import train_check  # noqa: E402


def test_loss_curve_agreement_rule():
    a = [5.0 - 0.01 * i for i in range(60)]
    assert train_check.agreement(a, list(a))["agree"]
    first_off = [a[0] * 1.02] + a[1:]
    r = train_check.agreement(first_off, a)
    assert not r["agree"] and r["first_rel_diff"] == pytest.approx(0.02, rel=1e-3)
    drift = a[:40] + [x * 1.1 for x in a[40:]]  # the last window 10% off
    r = train_check.agreement(drift, a)
    assert not r["agree"] and r["window_rel_diff_max"] == pytest.approx(0.1, rel=1e-3)
    assert train_check.agreement([x * 1.003 for x in a], a)["agree"]


def _dry_run(tmp_path, skip: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "check"
    env = dict(os.environ, PYTHON=sys.executable, SAPA_CHECK_SKIP=skip)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/check.sh"), "--dry-run", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    return proc, out


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dry_run_end_to_end(tmp_path):
    """Every step but the SegFormer training (a minute of interpreter time: the slow test below runs it)."""
    proc, out = _dry_run(tmp_path, "train")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert {k: v["result"] for k, v in summary["steps"].items() if k != "total"} == {
        "env": "ok", "tests": "ok", "bench-authors": "ok", "train": "skipped (SAPA_CHECK_SKIP)", "ddp": "ok",
        "amp": "ok"}
    tests = _read(out / "tests.jsonl")
    assert len(tests) >= 4 and all(t["outcome"] == "passed" for t in tests)
    bench = _read(out / "bench-authors.jsonl")
    timed = {(r["op"], r["backend"]): r for r in bench if "median_ms" in r}
    assert set(timed) == {("sapa", "reference"), ("sapa", "triton"), ("bilinear", "torch")}
    assert all(r["bytes_moved"] > 0 and "vs_bilinear" in r and "frac_copy_bw" in r for r in timed.values())
    assert (out / "ddp-run" / "last.pt").exists() and (out / "amp-run" / "last.pt").exists()
    assert "DRY RUN" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_full_dry_run_with_training(tmp_path):
    proc, out = _dry_run(tmp_path, "")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = [r for r in _read(out / "train.jsonl") if r.get("type") == "train-check"]
    assert check and check[0]["agree"]
