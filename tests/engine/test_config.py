"""Config presets (docs/SEMANTICS.md §6) and key=value overrides."""
from __future__ import annotations

import pytest

from sapa.engine import PRESETS, Config, apply_overrides, format_config, get_preset


def test_presets_follow_the_papers_protocols():
    s = get_preset("segformer-b1")
    assert (s.optim.name, s.optim.lr, s.optim.weight_decay, s.optim.head_lr_mult) == ("adamw", 6e-5, 0.01, 10.0)
    assert s.optim.betas == (0.9, 0.999) and set(s.optim.no_decay_keys) == {"pos_block", "norm"}
    assert (s.schedule.policy, s.schedule.power, s.schedule.warmup_iters, s.schedule.warmup_ratio) == ("poly", 1.0, 1500, 1e-6)
    assert (s.train.max_iters, s.train.eval_interval, s.data.batch_size, s.data.crop_size) == (160000, 16000, 16, 512)
    assert s.data.dataset == "ade20k" and s.model.name == "segformer_b1"
    u = get_preset("upernet-r50")
    assert (u.optim.name, u.optim.lr, u.optim.momentum, u.optim.weight_decay) == ("sgd", 0.01, 0.9, 5e-4)
    assert (u.schedule.policy, u.schedule.power, u.schedule.min_lr, u.train.max_iters) == ("poly", 0.9, 1e-4, 80000)
    assert u.model.sync_bn
    f = get_preset("faster-rcnn-1x")
    assert f.task == "detection" and (f.optim.lr, f.optim.momentum, f.optim.weight_decay) == (0.02, 0.9, 1e-4)
    assert (f.train.epochs, f.schedule.policy, f.schedule.milestones) == (12, "step", (8, 11))
    assert (f.schedule.warmup_iters, f.schedule.warmup_ratio, f.data.batch_size) == (500, 0.001, 16)
    assert set(PRESETS) >= {"segformer-b1", "upernet-r50", "faster-rcnn-1x", "synthetic", "synthetic-det"}


def test_overrides_parse_and_coerce():
    c = apply_overrides(get_preset("synthetic"), ["optim.lr=1e-3", "train.max_iters=12", "train.amp=true",
                                                  "model.widths=[8, 8, 16, 16]", "optim.grad_clip=none",
                                                  "model.upsampler=sapa_b", "optim.weight_decay=0",
                                                  "model.upsampler_kwargs={'kernel_size': 3}"])
    assert c.optim.lr == 1e-3 and c.train.max_iters == 12 and c.train.amp is True
    assert c.model.widths == (8, 8, 16, 16) and c.optim.grad_clip is None and c.model.upsampler == "sapa_b"
    assert isinstance(c.optim.weight_decay, float) and c.model.upsampler_kwargs == {"kernel_size": 3}
    base = get_preset("synthetic")
    assert base.optim.lr != 1e-3  # the preset itself is untouched


@pytest.mark.parametrize("bad,err,msg", [
    ("optim.lrr=1", KeyError, "valid keys in optim"),
    ("optimizer.lr=1", KeyError, "unknown config section"),
    ("lr=1", KeyError, "section.field"),
    ("optim.lr", ValueError, "section.field=value"),
    ("train.max_iters=abc", TypeError, "train.max_iters"),
    ("train.max_iters=1.5", TypeError, "train.max_iters"),
    ("optim.name=lamb", ValueError, "adamw or sgd"),
    ("train.max_iters=0", ValueError, "max_iters"),
])
def test_bad_overrides_are_named(bad, err, msg):
    with pytest.raises(err, match=msg):
        apply_overrides(get_preset("synthetic"), [bad])


def test_dict_round_trip_and_format():
    c = apply_overrides(get_preset("upernet-r50"), ["optim.lr=0.02"])
    again = Config.from_dict(c.to_dict())
    assert again == c
    assert "optim.lr = 0.02" in format_config(c)
    with pytest.raises(KeyError, match="bogus"):
        Config.from_dict({**c.to_dict(), "train": {**c.to_dict()["train"], "bogus": 1}})
