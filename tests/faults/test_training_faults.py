"""Faults during training and checkpointing: a bad validation set, divergence, resume overrides, the
run-folder lock, stale temporary files, log replay, disk full (injected ENOSPC) and SIGKILL at
injected points of the checkpoint write and the loop."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sapa.cli import main
from sapa.engine import Trainer, load_checkpoint
from sapa.engine.rundir import RunFolderBusy
from sapa.engine.runlog import read_jsonl
from sapa.engine.trainer import NonFiniteStateError

from ._helpers import write_ade


def _out(tmp_path, name="run"):
    return f"train.output={str(tmp_path / name)!r}"


def _states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _FailingVal(torch.utils.data.Dataset):
    """The synthetic validation set with one unreadable sample (as a corrupt image would be)."""

    def __init__(self, base, bad_index):
        self.base, self.bad_index, self.fixed = base, bad_index, False
        self.num_classes = base.num_classes

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if i == self.bad_index and not self.fixed:
            raise ValueError(f"cannot read image val_{i}.jpg: broken data stream")
        return self.base[i]


# ------------------------------------------------------------------------------------ item 1
@pytest.mark.parametrize("override, err, msg", [
    ("data.eval_batch_size=0", ValueError, r"data.eval_batch_size must be an int >= 1, got 0"),
    ("train.best_metric='nope'", ValueError, r"train.best_metric must be a segmentation metric: one of miou"),
])
def test_bad_eval_settings_fail_before_training(tiny_config, override, err, msg):
    with pytest.raises(err, match=msg):
        tiny_config(override)


def test_missing_validation_annotations_fail_before_training(tmp_path, tiny_config, quiet):
    root = tmp_path / "ade"
    write_ade(root, "training")
    write_ade(root, "validation")
    for p in (root / "annotations" / "validation").iterdir():
        p.unlink()
    cfg = tiny_config("data.dataset='ade20k'", f"data.root={str(root)!r}", "data.crop_size=32", "data.batch_size=2",
                      _out(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"annotation .*validation.* is missing"):
        Trainer(cfg, log=quiet)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_failing_evaluation_keeps_the_work_and_resume_redoes_it(tmp_path, tiny_config, quiet):
    common = ["train.max_iters=6", "train.eval_interval=3", "train.ckpt_interval=3", _out(tmp_path)]
    full = Trainer(tiny_config(*common[:-1], _out(tmp_path, "full")), log=quiet)
    full.fit()
    cfg = tiny_config(*common)
    val = _FailingVal(full.val_set, bad_index=5)
    tr = Trainer(cfg, val_set=val, log=quiet)
    with pytest.raises(ValueError, match="cannot read image val_5"):
        tr.fit()
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["iteration"] == 3 and ck["eval_pending"] is True  # the 3 iterations are kept
    val.fixed = True
    resumed = Trainer(cfg, resume=tmp_path / "run" / "last.pt", val_set=val, log=quiet)
    resumed.fit()
    assert _states_equal(resumed.model.state_dict(), full.model.state_dict())
    recs = read_jsonl(tmp_path / "run" / "log.jsonl")
    assert [r["iter"] for r in recs if r["type"] == "eval"] == [3, 6]
    assert [r["iter"] for r in recs if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(tmp_path / "run" / "best.pt")["best"] == resumed.best == full.best


# ------------------------------------------------------------------------------------ item 2
def test_non_finite_state_never_replaces_a_good_checkpoint(tmp_path, tiny_config, quiet):
    tr = Trainer(tiny_config("train.max_iters=6", "train.ckpt_interval=2", _out(tmp_path)), log=quiet)
    bn = next(m for m in tr.model.modules() if isinstance(m, torch.nn.BatchNorm2d))

    def poison(opt, args, kwargs):  # after the 3rd step: running statistics blow up, the loss does not
        if tr.iteration == 2:
            bn.running_var.fill_(float("inf"))

    tr.optimizer.register_step_post_hook(poison)
    with pytest.raises(NonFiniteStateError, match=r"iteration 4 .*running_var.*last.pt keeps the last good state"):
        tr.fit()
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------------------------ item 3
def test_resume_applies_changed_hyper_parameters_and_says_so(tmp_path, tiny_config):
    Trainer(tiny_config("train.max_iters=4", _out(tmp_path)), log=lambda *a: None).fit()
    said = []
    tr = Trainer(tiny_config("train.max_iters=8", "optim.lr=0.5", "optim.weight_decay=0.0", "schedule.power=2.0",
                             "schedule.warmup_iters=0",
                             _out(tmp_path)), resume=tmp_path / "run" / "last.pt", log=said.append)
    assert {g["initial_lr"] for g in tr.optimizer.param_groups} == {0.5}
    assert {g["weight_decay"] for g in tr.optimizer.param_groups} == {0.0}
    tr.schedule.set_iteration(4)
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (1 - 4 / 8) ** 2)
    note = next(s for s in said if s.startswith("resume: applying"))
    assert "optim.lr 0.003 -> 0.5" in note and "schedule.power 1.0 -> 2.0" in note


@pytest.mark.parametrize("override, key", [("optim.name='sgd'", "optim.name"),
                                           ("optim.no_decay_keys=('norm',)", "optim.no_decay_keys")])
def test_resume_refuses_another_optimizer_naming_it(tmp_path, tiny_config, quiet, override, key):
    Trainer(tiny_config("train.max_iters=2", _out(tmp_path)), log=quiet).fit()
    with pytest.raises(ValueError, match=rf"cannot resume .* with a different {key} \({key}: checkpoint"):
        Trainer(tiny_config("train.max_iters=4", override, _out(tmp_path)), resume=tmp_path / "run" / "last.pt",
                log=quiet)


# ------------------------------------------------------------------------------------ item 6
def test_second_run_in_the_same_folder_is_refused(tmp_path, tiny_config, quiet, capsys, tiny_overrides):
    first = Trainer(tiny_config("train.max_iters=2", _out(tmp_path)), log=quiet)
    with pytest.raises(RunFolderBusy, match=rf"run folder .*run is in use by another training process \(pid {os.getpid()}"):
        Trainer(tiny_config("train.max_iters=2", _out(tmp_path)), log=quiet)
    args = ["train", "--output", str(tmp_path / "run")] + [a for o in tiny_overrides for a in ("--set", o)]
    assert main(args) == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sapa train: error: run folder")
    first.fit()  # the first run is unharmed and releases the folder when done
    Trainer(tiny_config("train.max_iters=4", _out(tmp_path)), resume=tmp_path / "run" / "last.pt", log=quiet)


def test_stale_temporary_files_are_removed_on_start(tmp_path, tiny_config, quiet):
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".last.pt.tmp-99999", run / ".curves.png.tmp-4242.png", run / ".log.jsonl.tmp-7"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    keep = run / "notes.txt"
    keep.write_text("mine")
    said = []
    Trainer(tiny_config("train.max_iters=1", _out(tmp_path)), log=said.append)
    assert not any(p.exists() for p in stale) and keep.exists()
    assert any(".last.pt.tmp-99999" in s for s in said)


def test_resume_drops_log_records_after_the_checkpoint(tmp_path, tiny_config, quiet):
    cfg = tiny_config("train.max_iters=8", "train.ckpt_interval=4", _out(tmp_path))
    tr = Trainer(cfg, log=quiet)

    def crash(opt, args, kwargs):
        if tr.iteration == 6:  # the 7th step: records 1..6 are written, last.pt is iteration 4
            raise KeyboardInterrupt

    tr.optimizer.register_step_post_hook(crash)
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert [r["iter"] for r in read_jsonl(tmp_path / "run" / "log.jsonl")] == [1, 2, 3, 4, 5, 6]
    Trainer(cfg, resume=tmp_path / "run" / "last.pt", log=quiet).fit()
    assert [r["iter"] for r in read_jsonl(tmp_path / "run" / "log.jsonl") if r["type"] == "train"] == list(range(1, 9))


def test_stop_at_writes_a_checkpoint(tmp_path, tiny_config, quiet):
    out = Trainer(tiny_config("train.max_iters=8", "train.stop_at=3", _out(tmp_path)), log=quiet).fit()
    assert out["stopped"] and load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 3


# ------------------------------------------------------------------------------------ disk full
@pytest.mark.parametrize("where", ["fsync", "write"])
def test_disk_full_keeps_the_good_checkpoint_and_is_one_cli_line(tmp_path, tiny_overrides, monkeypatch, capsys,
                                                                 where):
    """ENOSPC injected into the checkpoint write (os.fsync, or the file write itself) at the second
    checkpoint: the first stays valid, no temporary file is left, the CLI says so in one line (exit 3)."""
    import builtins

    from sapa.engine import checkpoint as ck
    args = ["train", "--output", str(tmp_path / "run")] + [a for o in tiny_overrides for a in ("--set", o)] + \
        ["--set", "train.max_iters=4", "--set", "train.ckpt_interval=2"]
    calls = {"n": 0}

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "fsync":
        real = os.fsync

        def fsync(fd):
            calls["n"] += 1
            if calls["n"] == 3:  # 1: file + 2: folder of the first checkpoint; 3: the second's file
                enospc()
            return real(fd)
        monkeypatch.setattr(ck.os, "fsync", fsync)
    else:
        real_open = builtins.open

        class FullDisk:  # the file object of a write that hits a full disk
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])  # part of it lands, then the disk is full
                enospc()

            def __getattr__(self, name):
                return getattr(self.f, name)

        def fake_open(file, mode="r", *a, **k):
            f = real_open(file, mode, *a, **k)
            if ".last.pt.tmp-" in str(file) and "w" in mode:
                calls["n"] += 1
                if calls["n"] == 2:
                    return FullDisk(f)
            return f
        monkeypatch.setattr(ck, "open", fake_open, raising=False)
    assert main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sapa train: error: [Errno 28] No space left on device") and len(err) == 1
    run = tmp_path / "run"
    assert load_checkpoint(run / "last.pt")["iteration"] == 2
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------------------------ kill points
# Each point: a function of the training process to wrap, and which call of it kills the process
# (SIGKILL, no clean-up) before it runs. The resumed run must end with the uninterrupted run's weights.
KILL_POINTS = {
    "checkpoint-before-replace": ("os", "replace", 2),
    "checkpoint-mid-write": ("os", "fsync", 3),
    "evaluation": ("sapa.engine.trainer.Trainer", "_periodic_eval", 1),
    "log-write": ("sapa.engine.runlog.RunLog", "write", 5),
    "optimizer-step": ("torch.optim.AdamW", "step", 7),
}
_KILLER = textwrap.dedent("""
    import importlib, os, signal, sys
    target, name, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        obj = importlib.import_module(target)
    except ImportError:
        mod, _, attr = target.rpartition(".")
        obj = getattr(importlib.import_module(mod), attr)
    real = getattr(obj, name)
    count = [0]
    def wrapper(*a, **k):
        count[0] += 1
        if count[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    setattr(obj, name, wrapper)
    from sapa.cli import main
    sys.exit(main(sys.argv[4:]))
""")


def _kill_cases():
    return [pytest.param(p, id=p, marks=[] if p == "checkpoint-before-replace" else [pytest.mark.slow])
            for p in KILL_POINTS]


@pytest.mark.parametrize("point", _kill_cases())
def test_sigkill_at_a_kill_point_loses_only_uncheckpointed_work(tmp_path, tiny_overrides, point):
    target, name, nth = KILL_POINTS[point]
    sets = [*tiny_overrides, "train.max_iters=8", "train.ckpt_interval=2", "train.eval_interval=4"]
    train = ["train"] + [a for o in sets for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    # only the killed run is a subprocess (a start costs seconds); the others run in this process
    # with the same single thread
    assert main([*train, "--output", str(tmp_path / "full")]) == 0
    cut = subprocess.run([sys.executable, "-c", _KILLER, target, name, str(nth), *train, "--output",
                          str(tmp_path / "cut")], env=env, capture_output=True, text=True)
    assert cut.returncode == -9, (cut.returncode, cut.stderr[-2000:])
    last = tmp_path / "cut" / "last.pt"
    resume = ["--resume"] if last.exists() else []
    assert main([*train, "--output", str(tmp_path / "cut"), *resume]) == 0
    a = load_checkpoint(tmp_path / "cut" / "last.pt")
    b = load_checkpoint(tmp_path / "full" / "last.pt")
    assert a["iteration"] == 8 and _states_equal(a["model"], b["model"])
    recs = read_jsonl(tmp_path / "cut" / "log.jsonl")
    assert [r["iter"] for r in recs if r["type"] == "train"] == list(range(1, 9))
    assert [r["iter"] for r in recs if r["type"] == "eval"] == [4, 8]
    assert not [p for p in (tmp_path / "cut").iterdir() if ".tmp-" in p.name]
