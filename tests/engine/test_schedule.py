"""LR schedules: the mmcv formulas at hand-picked iterations, and per-group base lrs."""
from __future__ import annotations

import pytest
import torch

from sapa.engine import IterLRSchedule, get_preset
from sapa.engine.builders import param_groups


def _opt(lr=1.0, groups=1):
    ps = [torch.nn.Parameter(torch.zeros(1)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p], "lr": lr * (10 if i else 1)} for i, p in enumerate(ps)], lr=lr)


def test_poly_with_warmup():
    opt = _opt(6e-5, groups=2)
    s = IterLRSchedule(opt, 160000, "poly", power=1.0, warmup_iters=1500, warmup_ratio=1e-6)
    s.set_iteration(0)
    assert opt.param_groups[0]["lr"] == pytest.approx(6e-5 * (1 - 1e-6) * 0 + 6e-5 * 1e-6)
    s.set_iteration(750)
    reg = 6e-5 * (1 - 750 / 160000)
    assert opt.param_groups[0]["lr"] == pytest.approx(reg * (1 - 0.5 * (1 - 1e-6)))
    assert opt.param_groups[1]["lr"] == pytest.approx(10 * reg * (1 - 0.5 * (1 - 1e-6)))  # head x10 carries
    s.set_iteration(80000)
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-5)
    s.set_iteration(160000)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_poly_power_and_min_lr():
    opt = _opt(0.01)
    s = IterLRSchedule(opt, 80000, "poly", power=0.9, min_lr=1e-4)
    s.set_iteration(40000)
    assert opt.param_groups[0]["lr"] == pytest.approx((0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4)


def test_step_with_warmup_in_iterations():
    opt = _opt(0.02)
    s = IterLRSchedule(opt, 1200, "step", milestones=[800, 1100], gamma=0.1, warmup_iters=500, warmup_ratio=0.001)
    s.set_iteration(0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * 0.001)
    s.set_iteration(250)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * (1 - 0.5 * 0.999))
    for it, lr in [(500, 0.02), (799, 0.02), (800, 0.002), (1100, 0.0002)]:
        s.set_iteration(it)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
    st = s.state_dict()
    s2 = IterLRSchedule(opt, 1200, "step", milestones=[800, 1100])
    s2.load_state_dict(st)
    assert s2.iteration == 1100


def test_param_groups_head_lr_and_no_decay():
    cfg = get_preset("segformer-b1")

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Linear(2, 2)
            self.backbone_norm = torch.nn.LayerNorm(2)
            self.decode_head = torch.nn.Linear(2, 2)

    groups = param_groups(cfg, M())
    by = {(round(g["lr"], 12), g["weight_decay"]): len(g["params"]) for g in groups}
    assert by == {(6e-5, 0.01): 2, (6e-5, 0.0): 2, (6e-4, 0.01): 2}
