"""Two processes under torchrun (gloo, CPU): training works and the sharded, reduced metrics equal a
single-process evaluation of the same checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from sapa.engine import evaluate_checkpoint, load_checkpoint


# torchrun's agent, with a stack dump of its own threads if it is still running after 150 s
_AGENT = ("import faulthandler, sys; faulthandler.dump_traceback_later(150, repeat=True); "
          "from torch.distributed.run import main; sys.exit(main())")


def _torchrun(*args, timeout=240):
    # the workers dump their stacks too (SAPA_TRACEBACK_AFTER), so a hang shows where it is
    env = dict(os.environ, OMP_NUM_THREADS="1", SAPA_TRACEBACK_AFTER="150")
    cmd = [sys.executable, "-c", _AGENT, "--standalone", "--nproc_per_node", "2", "-m", "sapa", *args]
    # own session: on a timeout the agent *and* its workers are killed, no orphans left running
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-12000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


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


_HANGING_DESTROY = """
import sys, threading, torch.distributed as dist
from sapa.engine.distributed import DistInfo, cleanup
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
dist.destroy_process_group = lambda *a, **k: threading.Event().wait()  # never returns
cleanup(DistInfo(initialized_here=True), ok=True, timeout=float(sys.argv[2]))
print("not reached")
"""


def test_cleanup_exits_when_destroy_process_group_hangs(tmp_path):
    res = subprocess.run([sys.executable, "-c", _HANGING_DESTROY, str(tmp_path / "store"), "1"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "destroy_process_group did not return within 1 s" in res.stderr
    assert "not reached" not in res.stdout


def test_traceback_env_must_be_a_number(capsys, monkeypatch):
    from sapa.cli import main
    monkeypatch.setenv("SAPA_TRACEBACK_AFTER", "soon")
    assert main(["list"]) == 2
    assert "SAPA_TRACEBACK_AFTER must be a number of seconds, got 'soon'" in capsys.readouterr().err
