"""COCO box AP on tiny sets with known answers."""
from __future__ import annotations

import json

import pytest
import torch

from sapa.metrics import COCO_STAT_NAMES, COCOBoxEvaluator


def _gt():
    # image 1: a 20x20 box (small: area 400 < 32^2) and a 40x40 box (medium); image 2: a 100x100 box (large)
    return [
        {"image_id": 1, "boxes": torch.tensor([[0., 0., 20., 20.], [50., 50., 90., 90.]]), "labels": torch.tensor([1, 2])},
        {"image_id": 2, "boxes": torch.tensor([[10., 10., 110., 110.]]), "labels": torch.tensor([1])},
    ]


def _perfect(gt):
    return [{"boxes": t["boxes"].clone(), "scores": torch.linspace(0.9, 0.8, len(t["labels"])),
             "labels": t["labels"].clone()} for t in gt]


def test_perfect_detections_give_ap_one():
    ev = COCOBoxEvaluator()
    gt = _gt()
    ev.update(_perfect(gt), gt)
    out = ev.compute()
    assert set(out) == set(COCO_STAT_NAMES)
    for k in COCO_STAT_NAMES:
        assert out[k] == pytest.approx(1.0), (k, out)


def test_missing_half_the_objects_gives_51_over_101():
    # one class, two objects, only one detected (exactly): recall stops at 0.5 with precision 1, so the
    # 101-point interpolated precision is 1 at recall 0.00 .. 0.50 (51 points) and 0 after: AP = 51/101
    gt = [{"image_id": 1, "boxes": torch.tensor([[0., 0., 50., 50.], [60., 60., 110., 110.]]),
           "labels": torch.tensor([1, 1])}]
    det = [{"boxes": torch.tensor([[0., 0., 50., 50.]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}]
    ev = COCOBoxEvaluator()
    ev.update(det, gt)
    out = ev.compute()
    assert out["AP"] == pytest.approx(51 / 101, abs=1e-6)
    assert out["AP50"] == pytest.approx(51 / 101, abs=1e-6)
    assert out["APm"] == pytest.approx(51 / 101, abs=1e-6)   # both boxes are 2500 px: medium
    assert out["APs"] == -1 and out["APl"] == -1             # no ground truth in those ranges


def test_a_higher_scored_false_positive_halves_precision():
    # one object; a wrong box scored above the right one: precision at recall 1 is 1/2 -> AP = 0.5
    gt = [{"image_id": 1, "boxes": torch.tensor([[0., 0., 50., 50.]]), "labels": torch.tensor([1])}]
    det = [{"boxes": torch.tensor([[200., 200., 250., 250.], [0., 0., 50., 50.]]), "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([1, 1])}]
    ev = COCOBoxEvaluator()
    ev.update(det, gt)
    assert ev.compute()["AP"] == pytest.approx(0.5, abs=1e-6)


def test_loose_box_counts_only_at_low_iou_thresholds():
    # IoU of [0,0,50,50] with [0,0,50,40] is 0.8: a hit for thresholds 0.50..0.80 (7 of 10), a miss above
    gt = [{"image_id": 1, "boxes": torch.tensor([[0., 0., 50., 50.]]), "labels": torch.tensor([1])}]
    det = [{"boxes": torch.tensor([[0., 0., 50., 40.]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}]
    ev = COCOBoxEvaluator()
    ev.update(det, gt)
    out = ev.compute()
    assert out["AP50"] == pytest.approx(1.0) and out["AP75"] == pytest.approx(1.0)
    assert out["AP"] == pytest.approx(0.7, abs=1e-6)


def test_with_a_real_coco_ground_truth_and_category_mapping(tmp_path):
    from pycocotools.coco import COCO
    ann = {"images": [{"id": 7, "file_name": "a.jpg", "height": 100, "width": 100}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 18, "bbox": [10, 10, 30, 30], "area": 900,
                            "iscrowd": 0}],
           "categories": [{"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]}
    p = tmp_path / "inst.json"
    p.write_text(json.dumps(ann))
    coco = COCO(str(p))
    ev = COCOBoxEvaluator(coco, label_to_cat=[3, 18])  # contiguous label 2 -> category 18
    ev.update([{"boxes": torch.tensor([[10., 10., 40., 40.]]), "scores": torch.tensor([0.5]),
                "labels": torch.tensor([2])}], [{"image_id": 7}])
    assert ev.compute()["AP"] == pytest.approx(1.0)
    wrong = COCOBoxEvaluator(coco, label_to_cat=[3, 18])
    wrong.update([{"boxes": torch.tensor([[10., 10., 40., 40.]]), "scores": torch.tensor([0.5]),
                   "labels": torch.tensor([1])}], [{"image_id": 7}])
    assert wrong.compute()["AP"] == pytest.approx(0.0)


def test_no_detections_gives_zero_and_gather_without_ddp_is_identity():
    ev = COCOBoxEvaluator()
    gt = _gt()
    ev.update([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}] * 2, gt)
    ev.gather()
    assert ev.compute()["AP"] == 0.0
