"""The trainer end to end on tiny ADE20K / COCO folders written in the real formats."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sapa.engine import Trainer, apply_overrides, evaluate_checkpoint, get_preset


def _ade(root):
    rng = np.random.default_rng(0)
    for split, prefix, n in (("training", "ADE_train", 4), ("validation", "ADE_val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            h, w = 40 + 8 * i, 56
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / "images" / split / f"{prefix}_{i + 1:08d}.jpg")
            lab = np.zeros((h, w), np.uint8)
            lab[:, : w // 2] = 3
            lab[h // 2:, w // 2:] = 7
            Image.fromarray(lab, mode="L").save(root / "annotations" / split / f"{prefix}_{i + 1:08d}.png")


def test_tiny_host_on_ade20k_folder(tmp_path, quiet):
    _ade(tmp_path / "ade")
    cfg = apply_overrides(get_preset("synthetic"), [
        "data.dataset=ade20k", f"data.root={str(tmp_path / 'ade')!r}", "data.crop_size=32", "data.batch_size=2",
        "data.eval_batch_size=1", "data.num_workers=0", "model.widths=(8, 8, 16, 16)", "model.embed_dim=32",
        "train.max_iters=2", "train.progress=False", f"train.output={str(tmp_path / 'run')!r}"])
    out = Trainer(cfg, log=quiet).fit()
    ev = out["last_eval"]
    assert len(ev["iou_per_class"]) == 150
    # only classes 2 and 6 (labels 3 and 7 after reduce_zero_label) exist; predictions may add others
    assert 0 <= ev["miou"] <= 1 and 0 <= ev["biou"] <= 1
    again = evaluate_checkpoint(tmp_path / "run" / "last.pt", progress=False)
    assert again["miou"] == ev["miou"] and again["biou"] == ev["biou"]


def test_tiny_detector_on_coco_folder(tmp_path, quiet):
    pytest.importorskip("torchvision")
    root = tmp_path / "coco"
    rng = np.random.default_rng(0)
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(4):
            img = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
            img[10:30, 20:50] = 220
            Image.fromarray(img).save(root / split / f"{i + 1:012d}.jpg")
            images.append({"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "height": 64, "width": 64})
            anns.append({"id": i + 1, "image_id": i + 1, "category_id": 5, "bbox": [20, 10, 30, 20], "area": 600,
                         "iscrowd": 0})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": 5, "name": "box"}]}))
    cfg = apply_overrides(get_preset("synthetic-det"), [
        "data.dataset=coco", f"data.root={str(root)!r}", "data.batch_size=2", "data.eval_batch_size=2",
        "model.widths=(8, 8, 16, 16)", "train.epochs=1", "train.progress=False", "schedule.warmup_iters=1"])
    tr = Trainer(cfg, log=quiet)
    assert tr.num_classes == 81  # the COCO preset's class count (80 + background), whatever the JSON holds
    ev = tr.fit()["last_eval"]
    assert set(ev) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
