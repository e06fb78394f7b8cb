"""Kill-and-resume: continuing from last.pt gives exactly the weights of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sapa.engine import Trainer, load_checkpoint


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("upsampler", ["bilinear", "carafe"])
def test_stop_and_resume_equals_uninterrupted(tmp_path, tiny_config, quiet, upsampler):
    # 12 samples / batch 4 = 3 iterations per epoch; checkpoints every 2 iterations; the interrupted run
    # stops after iteration 5 (train.stop_at writes its checkpoint there, mid-epoch) and is resumed to 8.
    common = [f"model.upsampler={upsampler!r}", "train.max_iters=8", "train.ckpt_interval=2", "train.eval_interval=4"]
    full = Trainer(tiny_config(*common, f"train.output={str(tmp_path / 'full')!r}"), log=quiet)
    full.fit()
    cut = Trainer(tiny_config(*common, f"train.output={str(tmp_path / 'cut')!r}", "train.stop_at=5"), log=quiet)
    out = cut.fit()
    assert out["stopped"] and out["iteration"] == 5
    last = tmp_path / "cut" / "last.pt"
    assert load_checkpoint(last)["iteration"] == 5
    cut_state_at_5 = {k: v.clone() for k, v in cut.model.state_dict().items()}
    resumed = Trainer(tiny_config(*common, f"train.output={str(tmp_path / 'cut')!r}"), resume=last, log=quiet)
    assert resumed.iteration == 5
    resumed.fit()
    assert _states_equal(resumed.model.state_dict(), full.model.state_dict())
    assert not _states_equal(cut_state_at_5, full.model.state_dict())
    opt_a, opt_b = resumed.optimizer.state_dict(), full.optimizer.state_dict()
    for pid in opt_b["state"]:
        for k, v in opt_b["state"][pid].items():
            assert torch.equal(opt_a["state"][pid][k], v) if torch.is_tensor(v) else opt_a["state"][pid][k] == v
    # the resumed log continues the interrupted one: each iteration once
    recs = [json.loads(l) for l in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in recs if r["type"] == "train"] == list(range(1, 9))
    # and the two final evaluations agree exactly
    ev = lambda p: [r for r in (json.loads(l) for l in p.read_text().splitlines()) if r["type"] == "eval"][-1]
    a, b = ev(tmp_path / "cut" / "log.jsonl"), ev(tmp_path / "full" / "log.jsonl")
    assert a["miou"] == b["miou"] and a["biou"] == b["biou"]


def test_best_checkpoint_is_the_best_periodic_eval(tmp_path, tiny_config, quiet):
    cfg = tiny_config(f"train.output={str(tmp_path)!r}", "train.max_iters=9", "train.eval_interval=3")
    Trainer(cfg, log=quiet).fit()
    recs = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    evals = [r for r in recs if r["type"] == "eval"]
    assert [r["iter"] for r in evals] == [3, 6, 9]
    best = max(evals, key=lambda r: r["miou"])  # first maximum wins (strictly-better rule)
    ck = load_checkpoint(tmp_path / "best.pt")
    assert ck["iteration"] == best["iter"] and ck["best"]["value"] == best["miou"]
    assert ck["metrics"]["miou"] == best["miou"]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "config.json").read_text())["train"]["eval_interval"] == 3
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["iteration"] == 9 and last["best"]["iteration"] == best["iter"]


@pytest.mark.slow
def test_sigkill_and_cli_resume_equals_uninterrupted(tmp_path, tiny_overrides):
    """A real kill -9 of ``sapa train`` mid-run, then ``sapa train --resume``."""
    def args(out, *extra):
        a = [sys.executable, "-m", "sapa", "train", "--output", str(out)]
        for o in [*tiny_overrides, "train.max_iters=40", "train.ckpt_interval=5", *extra]:
            a += ["--set", o]
        return a

    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(args(tmp_path / "full"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(args(tmp_path / "cut"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "cut" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if last.exists() and load_checkpoint(last)["iteration"] >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    it = load_checkpoint(last)["iteration"]
    assert 10 <= it < 40, it
    subprocess.run([sys.executable, "-m", "sapa", "train", "--output", str(tmp_path / "cut"), "--resume"],
                   check=True, env=env, capture_output=True)
    a = load_checkpoint(tmp_path / "cut" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    assert _states_equal(a, b)
