"""Atomic, verified checkpoints: corrupt or truncated files are refused by name and never replace
a good one; a run folder with a checkpoint is never started over."""
from __future__ import annotations

import os

import pytest
import torch

from sapa.engine import CheckpointError, Trainer, load_checkpoint, save_checkpoint
from sapa.engine.checkpoint import FORMAT


def _obj(v=1.0):
    return {"format": FORMAT, "w": torch.full((64,), v), "meta": {"it": 3}}


def test_round_trip_and_plain_torch_load(tmp_path):
    p = save_checkpoint(_obj(2.0), tmp_path / "a.pt")
    back = load_checkpoint(p)
    assert torch.equal(back["w"], torch.full((64,), 2.0)) and back["meta"] == {"it": 3}
    assert torch.equal(torch.load(p, weights_only=True)["w"], back["w"])  # still a torch file
    assert [f.name for f in tmp_path.iterdir()] == ["a.pt"]  # no temp files left


@pytest.mark.parametrize("cut", [1, 20, 47, 200, -1])
def test_truncated_checkpoint_is_refused_by_name(tmp_path, cut):
    p = save_checkpoint(_obj(), tmp_path / "last.pt")
    data = p.read_bytes()
    p.write_bytes(data[:cut] if cut > 0 else data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"last\.pt.*(truncated|corrupt)"):
        load_checkpoint(p)


def test_flipped_byte_is_refused_by_name(tmp_path):
    p = save_checkpoint(_obj(), tmp_path / "last.pt")
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"last\.pt is corrupt"):
        load_checkpoint(p)


def test_foreign_file_is_refused(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"w": 1}, p)
    with pytest.raises(CheckpointError, match="x.pt"):
        load_checkpoint(p)
    q = save_checkpoint({"w": 1}, tmp_path / "y.pt")  # valid container, not a sapa checkpoint
    with pytest.raises(CheckpointError, match="y.pt is not a sapa-checkpoint"):
        load_checkpoint(q)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_failed_write_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    p = save_checkpoint(_obj(1.0), tmp_path / "last.pt")
    good = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_obj(5.0), p)
    monkeypatch.undo()
    assert p.read_bytes() == good
    assert [f.name for f in tmp_path.iterdir()] == ["last.pt"]
    with pytest.raises(Exception):
        save_checkpoint({"format": FORMAT, "bad": lambda: 0}, p)  # unpicklable: fails before touching p
    assert p.read_bytes() == good


def test_trainer_refuses_corrupt_resume_and_existing_run(tmp_path, tiny_config, quiet):
    cfg = tiny_config(f"train.output={str(tmp_path)!r}", "train.max_iters=2")
    Trainer(cfg, log=quiet).fit()
    last = tmp_path / "last.pt"
    good = last.read_bytes()
    with pytest.raises(ValueError, match=r"last\.pt already exists"):
        Trainer(cfg, log=quiet)
    data = bytearray(good)
    data[-60] ^= 0x01
    last.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(last)):
        Trainer(cfg, resume=last, log=quiet)
    assert last.read_bytes() == bytes(data)  # untouched: nothing was written over it
    last.write_bytes(good[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        Trainer(cfg, resume=last, log=quiet)


def test_cli_train_resume_refuses_corrupt_checkpoint(tmp_path, tiny_overrides, capsys):
    from sapa.cli import main
    args = ["train", "--output", str(tmp_path)]
    for o in tiny_overrides + ["train.max_iters=2"]:
        args += ["--set", o]
    assert main(args) == 0
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:-10])
    assert main(["train", "--output", str(tmp_path), "--resume", "--set", "train.max_iters=4"]) == 4  # bad checkpoint
    err = capsys.readouterr().err
    assert "last.pt" in err and "truncated" in err
