"""The CLI's error boundary: every expected failure is one line ``sapa <cmd>: error: ...`` on stderr
with its class's exit code; bugs keep their traceback; SAPA_TRACEBACK=1 shows it for the others."""
from __future__ import annotations

import json

import pytest
import torch

from sapa import flags
from sapa.cli import EXIT_CODES, main
from sapa.engine.trainer import Trainer


@pytest.fixture
def train_args(tiny_overrides, tmp_path):
    def make(*extra, output=None):
        out = str(output or tmp_path / "run")
        return ["train", "--output", out] + [a for o in [*tiny_overrides, "train.max_iters=2"] for a in ("--set", o)] \
            + list(extra)
    return make


def _one_line(capsys, code, rc, cmd, pattern):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code, (rc, err)
    assert len(err) == 1, err
    assert err[0].startswith(f"sapa {cmd}: error: "), err[0]
    import re
    assert re.search(pattern, err[0]), err[0]


CONFIG_CASES = {
    "betas-not-a-pair": (["--set", "optim.betas=0.9"], r"optim.betas must be two floats in \[0, 1\).*got \(0.9,\)"),
    "negative-lr": (["--set", "optim.lr=-1"], r"optim.lr must be a finite float > 0, got -1.0"),
    "zero-epochs": (["--set", "train.epochs=0"], r"train.epochs must be an int >= 1 or None, got 0"),
    "negative-eval-interval": (["--set", "train.eval_interval=-5"], r"train.eval_interval must be an int >= 0"),
    "negative-ckpt-interval": (["--set", "train.ckpt_interval=-1"], r"train.ckpt_interval must be an int >= 0"),
    "detection-on-segmentation-preset": (["--set", "task=detection"],
                                         r"task='detection' does not fit model.name='tiny_segformer', which is a "
                                         r"segmentation model"),
    "unknown-key": (["--set", "optim.lrr=1"], r"unknown config key 'optim.lrr'"),
    "eval-batch-zero": (["--set", "data.eval_batch_size=0"], r"data.eval_batch_size must be an int >= 1"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_is_one_line_exit_2(capsys, train_args, case):
    extra, pattern = CONFIG_CASES[case]
    _one_line(capsys, 2, main(train_args(*extra)), "train", pattern)


@pytest.mark.parametrize("text, pattern", [
    ('{"optim": {"lr": 0.1', r"--config .*cfg.json is not valid JSON: Expecting"),
    ('{"optim": 5}', r"--config .*cfg.json: config section 'optim' must be an object \(dict\) of fields, got int"),
    ('[1, 2]', r"--config .*cfg.json: a config must be a JSON object"),
])
def test_bad_config_file_names_the_file(tmp_path, capsys, text, pattern):
    p = tmp_path / "cfg.json"
    p.write_text(text)
    _one_line(capsys, 2, main(["train", "--config", str(p), "--print-config"]), "train", pattern)


def test_missing_config_file_is_exit_3(tmp_path, capsys):
    _one_line(capsys, 3, main(["train", "--config", str(tmp_path / "nope.json")]), "train", r"nope.json")


def test_output_under_a_file_is_a_file_system_error(tmp_path, capsys, train_args):
    (tmp_path / "plain").write_text("x")
    _one_line(capsys, 3, main(train_args(output=tmp_path / "plain" / "run")), "train", r"plain")


def test_non_finite_loss_is_exit_5(capsys, train_args, monkeypatch):
    monkeypatch.setattr(Trainer, "_loss", lambda self, batch: (torch.tensor(float("nan"), requires_grad=True), {}))
    _one_line(capsys, 5, main(train_args()), "train", r"training diverged: non-finite loss nan at iteration 0")


def test_resume_with_another_optimizer_is_explained(capsys, train_args):
    assert main(train_args()) == 0
    capsys.readouterr()
    rc = main(train_args("--resume", "--set", "optim.name='sgd'", "--set", "train.max_iters=4"))
    _one_line(capsys, 2, rc, "train", r"cannot resume .*last.pt with a different optim.name \(optim.name: "
                                      r"checkpoint 'adamw', now 'sgd'\)")


@pytest.fixture
def checkpoint(train_args, capsys, tmp_path):
    assert main(train_args()) == 0
    capsys.readouterr()
    return tmp_path / "run" / "last.pt"


@pytest.mark.parametrize("dilation, pattern", [("inf", r"--dilation: dilation must be .*got inf"),
                                               ("2.5", r"--dilation: dilation >= 1 is a pixel count and must be an "
                                                       r"integer, got 2.5"),
                                               ("nan", r"--dilation: dilation must be .*got nan")])
def test_eval_bad_dilation(checkpoint, capsys, dilation, pattern):
    _one_line(capsys, 2, main(["eval", str(checkpoint), "--dilation", dilation]), "eval", pattern)


def test_eval_missing_and_corrupt_checkpoint(tmp_path, checkpoint, capsys):
    _one_line(capsys, 3, main(["eval", str(tmp_path / "none.pt")]), "eval", r"checkpoint not found: .*none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(checkpoint.read_bytes()[:-10])
    _one_line(capsys, 4, main(["eval", str(bad)]), "eval", r"checkpoint .*bad.pt is truncated")


def test_bug_keeps_its_traceback(train_args, monkeypatch):
    def boom(self):
        return 1 / 0
    monkeypatch.setattr(Trainer, "fit", boom)
    with pytest.raises(ZeroDivisionError):
        main(train_args())


def test_sapa_traceback_shows_it_for_expected_failures(capsys, train_args, monkeypatch):
    monkeypatch.setenv("SAPA_TRACEBACK", "1")
    assert flags.show_traceback()
    rc = main(train_args("--set", "optim.lr=-1"))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("sapa train: error: config optim.lr")


def test_interrupt_is_130(capsys, train_args, monkeypatch):
    def stop(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "fit", stop)
    _one_line(capsys, 130, main(train_args()), "train", r"interrupted")


def test_help_documents_distinct_exit_codes(capsys):
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES) and 1 not in EXIT_CODES.values()
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for what, code in EXIT_CODES.items():
        assert f"{code} {what}" in text
    assert "SAPA_TRACEBACK=1" in text


def test_config_json_of_a_run_round_trips(tmp_path, capsys, train_args):
    """The file a run writes is a valid --config (no false alarm from the new checks)."""
    assert main(train_args()) == 0
    capsys.readouterr()
    cfg = tmp_path / "run" / "config.json"
    assert main(["train", "--config", str(cfg), "--print-config"]) == 0
    assert "optim.lr = 0.003" in capsys.readouterr().out
    assert json.loads(cfg.read_text())["optim"]["lr"] == 0.003
