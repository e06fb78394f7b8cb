"""Two processes under torchrun (gloo, CPU): training works and the sharded, reduced metrics equal a
single-process evaluation of the same checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sapa.engine import evaluate_checkpoint, load_checkpoint


def _torchrun(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sapa", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_two_process_training_and_eval_match_single_process(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    sets = []
    # 7 validation images: shards of 4 and 3, nothing padded or counted twice
    for o in [*tiny_overrides, "train.max_iters=4", "data.val_samples=7", "data.eval_batch_size=3"]:
        sets += ["--set", o]
    _torchrun("train", "--output", str(out), *sets)
    recs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    ddp_eval = [r for r in recs if r["type"] == "eval"][-1]
    ck = load_checkpoint(out / "last.pt")
    assert ck["world_size"] == 2 and ck["iteration"] == 4 and len(ck["rng"]) == 2
    assert ck["rng"][0]["torch"].ne(ck["rng"][1]["torch"]).any()  # per-rank RNG streams, both saved

    single = evaluate_checkpoint(out / "last.pt", progress=False)
    for k in ("miou", "biou", "aacc", "macc"):
        assert single[k] == ddp_eval[k], (k, single[k], ddp_eval[k])

    res = _torchrun("eval", str(out / "last.pt"), "--json", "-")
    ddp_ckpt_eval = json.loads(res.stdout)
    for k in ("miou", "biou", "aacc", "macc"):
        assert ddp_ckpt_eval[k] == single[k]


@pytest.mark.slow
def test_two_process_detection_training(tmp_path):
    sets = []
    for o in ["train.epochs=1", "data.train_samples=16", "data.val_samples=6", "data.batch_size=4",
              "data.eval_batch_size=2", "model.widths=(8, 8, 16, 16)", "train.progress=False"]:
        sets += ["--set", o]
    _torchrun("train", "--preset", "synthetic-det", "--output", str(tmp_path), *sets)
    ddp = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines() if '"eval"' in l][-1]
    single = evaluate_checkpoint(tmp_path / "last.pt", progress=False)
    assert single["AP"] == pytest.approx(ddp["AP"])
