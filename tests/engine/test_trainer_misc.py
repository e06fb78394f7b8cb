"""Trainer details: AMP on CPU (bf16), gradient clipping, auxiliary heads, error paths, logs."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sapa.engine import Trainer
from sapa.engine.runlog import plot_curves, read_jsonl


def test_bf16_autocast_on_cpu_trains(tiny_config, quiet):
    tr = Trainer(tiny_config("train.amp=true", "train.max_iters=3"), log=quiet)
    assert not tr.use_scaler  # GradScaler only on CUDA
    seen = []
    h = tr.model.decode_head.linear_pred.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out = tr.fit()
    h.remove()
    assert torch.bfloat16 in seen
    assert 0 <= out["last_eval"]["miou"] <= 1


def test_gradient_clipping_bounds_the_update(tiny_config, quiet):
    # SGD without momentum / decay: with clipping at 1e-3 and lr 1, no parameter moves more than 1e-3 in total norm
    tr = Trainer(tiny_config("optim.name=sgd", "optim.momentum=0", "optim.weight_decay=0", "optim.lr=1.0",
                             "schedule.policy=constant", "schedule.warmup_iters=0", "optim.grad_clip=0.001",
                             "train.max_iters=1", "model.dropout=0"), log=quiet)
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.fit()
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(tr.model.parameters(), before)))
    assert 0 < step <= 1e-3 * (1 + 1e-4)


class _AuxNet(nn.Module):
    num_classes = 6

    def __init__(self):
        super().__init__()
        self.main = nn.Conv2d(3, 6, 3, padding=1)
        self.aux = nn.Conv2d(3, 6, 1)

    def forward(self, x):
        return self.main(x)

    def forward_with_aux(self, x):
        return self.main(x), self.aux(x[:, :, ::4, ::4])


def test_auxiliary_head_loss_is_weighted(tiny_config, quiet):
    tr = Trainer(tiny_config("train.max_iters=2", "model.aux_weight=0.4"), model=_AuxNet(), log=quiet)
    tr.fit()
    rec = [r for r in tr.log.records if r["type"] == "train"][0]
    assert rec["loss"] == pytest.approx(rec["loss_main"] + 0.4 * rec["loss_aux"], rel=1e-5)
    assert tr.model.aux.weight.grad is not None


def test_unknown_best_metric_and_batch_split_errors(tiny_config, quiet):
    # refused when the config is made (before any training), naming the key and the valid names
    with pytest.raises(ValueError, match=r"train.best_metric must be a segmentation metric: one of miou.*'mIoU'"):
        tiny_config("train.max_iters=1", "train.best_metric='mIoU'")
    with pytest.raises(ValueError, match="smaller than one batch"):
        Trainer(tiny_config("data.train_samples=2"), log=quiet)


def test_non_finite_loss_is_reported_with_iteration(tiny_config, quiet):
    class Bad(nn.Module):
        num_classes = 6

        def __init__(self):
            super().__init__()
            self.main = nn.Conv2d(3, 6, 1)

        def forward(self, x):
            return self.main(x) * float("nan")

    m = Bad()
    with pytest.raises(FloatingPointError, match="iteration 0"):
        Trainer(tiny_config("train.max_iters=2"), model=m, log=quiet).fit()


def test_jsonl_log_and_plot(tmp_path, tiny_config, quiet):
    Trainer(tiny_config(f"train.output={str(tmp_path)!r}", "train.max_iters=4", "train.eval_interval=2"),
            log=quiet).fit()
    recs = read_jsonl(tmp_path / "log.jsonl")
    assert [r["iter"] for r in recs if r["type"] == "train"] == [1, 2, 3, 4]
    assert [r["iter"] for r in recs if r["type"] == "eval"] == [2, 4]
    assert all({"loss", "lr", "epoch", "time_s"} <= set(r) for r in recs if r["type"] == "train")
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"type": "train", "iter": 5, "lo')  # a line cut by a crash is skipped
    assert len(read_jsonl(tmp_path / "log.jsonl")) == len(recs)
    png = plot_curves(recs, tmp_path / "again.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
