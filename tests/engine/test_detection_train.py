"""The detection path: a tiny Faster R-CNN (real FPN, swappable upsampler) trains on the synthetic
detection set and is evaluated with COCO AP; the faster-rcnn-1x preset builds the R50 model."""
from __future__ import annotations

import pytest
import torch

from sapa.engine import Trainer, apply_overrides, get_preset
from sapa.engine.builders import build_model

pytest.importorskip("torchvision")

TINY_DET = ["data.train_samples=8", "data.val_samples=4", "data.batch_size=4", "data.eval_batch_size=4",
            "model.widths=(8, 8, 16, 16)", "train.epochs=None", "train.max_iters=4", "train.progress=False",
            "schedule.warmup_iters=2", "train.log_interval=1"]


@pytest.mark.parametrize("upsampler", ["nearest", "sapa_b"])
def test_tiny_faster_rcnn_trains_and_evaluates(upsampler, quiet):
    cfg = apply_overrides(get_preset("synthetic-det"), [*TINY_DET, f"model.upsampler={upsampler!r}"])
    tr = Trainer(cfg, log=quiet)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    out = tr.fit()
    train = [r for r in tr.log.records if r["type"] == "train"]
    assert len(train) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(train[0])
    changed = [k for k, v in tr.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any("fpn.upsamplers" in k for k in changed) or upsampler == "nearest"
    assert any("roi_heads" in k for k in changed)
    ev = out["last_eval"]
    assert set(ev) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(-1 <= v <= 1 for v in ev.values())


def test_epoch_based_step_schedule_in_iterations(quiet):
    cfg = apply_overrides(get_preset("synthetic-det"), [*TINY_DET, "train.max_iters=None", "train.epochs=3",
                                                         "schedule.milestones=(1, 2)", "schedule.warmup_iters=0"])
    tr = Trainer(cfg, log=quiet)
    assert tr.iters_per_epoch == 2 and tr.max_iters == 6
    assert tr.schedule.milestones == [2, 4]
    for it, f in [(0, 1.0), (1, 1.0), (2, 0.1), (4, 0.01)]:
        tr.schedule.set_iteration(it)
        assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr * f)


def test_paper_presets_build_the_paper_models():
    pytest.importorskip("transformers")
    for preset, cls in [("faster-rcnn-1x", "FasterRCNN"), ("segformer-b1", "SegFormer")]:
        cfg = apply_overrides(get_preset(preset), ["model.upsampler=sapa_b" if preset != "faster-rcnn-1x"
                                                   else "model.upsampler=nearest"])
        with torch.device("meta"):
            m = build_model(cfg)
        assert type(m).__name__ == cls
