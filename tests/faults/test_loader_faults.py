"""Corrupt inputs of every loader, on data the tests write in the real formats (ADE20K folder,
COCO instances JSON + images). Each corruption is one row: what is broken, and the error (type and
a message naming the file / annotation) it must give — at construction or when the sample is read."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sapa.data import ADE20K, COCODetection
from sapa.metrics import BoundaryIoU, COCOBoxEvaluator, SegmentationMetric

from ._helpers import coco_dict, write_ade, write_coco

STEM = "ADE_train_00000001"


def _img(root):
    return root / "images" / "training" / f"{STEM}.jpg"


def _ann(root):
    return root / "annotations" / "training" / f"{STEM}.png"


ADE_FAULTS = {
    "missing-annotation": (lambda r: _ann(r).unlink(), FileNotFoundError, rf"annotation .*{STEM}.png is missing"),
    "orphan-annotation": (lambda r: _img(r).unlink(), FileNotFoundError, rf"annotation .*{STEM}.png has no image"),
    "no-images": (lambda r: [p.unlink() for p in (r / "images" / "training").iterdir()], FileNotFoundError,
                  r"no .jpg images in"),
    "no-split-folder": (lambda r: [p.unlink() for p in (r / "annotations" / "training").iterdir()]
                        and (r / "annotations" / "training").rmdir(), FileNotFoundError, r"folder not found"),
    "truncated-image": (lambda r: _img(r).write_bytes(_img(r).read_bytes()[:200]), ValueError,
                        rf"cannot read image .*{STEM}.jpg"),
    "empty-image": (lambda r: _img(r).write_bytes(b""), ValueError, rf"cannot read image .*{STEM}.jpg"),
    "garbage-annotation": (lambda r: _ann(r).write_bytes(b"not a png at all"), ValueError,
                           rf"cannot read annotation .*{STEM}.png"),
    "rgb-annotation": (lambda r: Image.new("RGB", (48, 40)).save(_ann(r)), ValueError,
                       rf"annotation .*{STEM}.png has mode 'RGB'"),
    "size-mismatch": (lambda r: Image.new("L", (20, 20)).save(_ann(r)), ValueError,
                      rf"image .*{STEM}.jpg is 48x40 but its annotation .* is 20x20"),
    "label-out-of-range": (lambda r: Image.fromarray(np.full((40, 48), 200, np.uint8), mode="L").save(_ann(r)),
                           ValueError, rf"annotation .*{STEM}.png has label 200; valid values are 0..150"),
}


@pytest.mark.parametrize("fault", list(ADE_FAULTS))
def test_ade20k_corruption_gives_a_named_error(tmp_path, fault):
    mutate, err, msg = ADE_FAULTS[fault]
    write_ade(tmp_path)
    mutate(tmp_path)
    with pytest.raises(err, match=msg):
        ds = ADE20K(tmp_path, "train", pipeline=None)
        for i in range(len(ds)):
            ds[i]


def _coco_with(change):
    d = coco_dict()
    change(d)
    return d


def _set_ann(i, **kw):
    return lambda d: d["annotations"][i].update(kw)


def _drop_ann_key(i, key):
    return lambda d: d["annotations"][i].pop(key)


COCO_FAULTS = {
    "malformed-json": ('{"images": [', None, ValueError, r"cannot read .*instances_val2017.json as COCO"),
    "no-annotations-list": (_coco_with(lambda d: d.pop("annotations")), None, ValueError, r"no 'annotations' list"),
    "annotation-without-bbox": (_coco_with(_drop_ann_key(1, "bbox")), None, ValueError,
                                r"annotation 2 \(image 2\) has no 'bbox'"),
    "nan-bbox": (_coco_with(_set_ann(0, bbox=[10, float("nan"), 20, 10])), None, ValueError,
                 r"annotation 1 \(image 1\) has bbox \[10, nan, 20, 10\]; expected 4 finite numbers"),
    "inf-bbox": (_coco_with(_set_ann(0, bbox=[10, 5, float("inf"), 10])), None, ValueError,
                 r"annotation 1 .* expected 4 finite numbers"),
    "short-bbox": (_coco_with(_set_ann(0, bbox=[10, 5, 20])), None, ValueError, r"annotation 1 .*has bbox \[10, 5, 20\]"),
    "unknown-category": (_coco_with(_set_ann(0, category_id=99)), None, ValueError, r"annotation 1 has category 99"),
    "unknown-image": (_coco_with(_set_ann(0, image_id=77)), None, ValueError, r"annotation 1 refers to image 77"),
    "missing-image-file": (None, lambda img_dir: (img_dir / "000000000002.jpg").unlink(), FileNotFoundError,
                           r"image .*000000000002.jpg \(id 2"),
    "corrupt-image-file": (None, lambda img_dir: (img_dir / "000000000001.jpg").write_bytes(b"\xff\xd8junk"),
                           ValueError, r"cannot read image .*000000000001.jpg"),
    "height-without-width": ("HEIGHT", None, ValueError, r"is 60x40 but .* says \?x50 \(width x height\)"),
}


@pytest.mark.parametrize("fault", list(COCO_FAULTS))
def test_coco_corruption_gives_a_named_error(tmp_path, fault):
    data, mutate_images, err, msg = COCO_FAULTS[fault]
    if data == "HEIGHT":  # written with its real size, then the JSON claims height 50 and drops width
        img_dir, ann = write_coco(tmp_path)
        d = coco_dict()
        d["images"][0].pop("width")
        d["images"][0]["height"] = 50
        ann.write_text(json.dumps(d))
    elif isinstance(data, str):
        img_dir, ann = write_coco(tmp_path, coco_dict())
        ann.write_text(data)
    else:
        img_dir, ann = write_coco(tmp_path, data)
    if mutate_images:
        mutate_images(img_dir)
    with pytest.raises(err, match=msg):
        ds = COCODetection(img_dir, ann)
        for i in range(len(ds)):
            ds[i]


def test_out_of_image_boxes_are_clipped_with_one_warning(tmp_path):
    d = coco_dict()
    d["annotations"][0]["bbox"] = [-5, 30, 20, 20]  # x from -5, y to 50 in a 60x40 image
    d["annotations"][2]["bbox"] = [50, 10, 30, 12]  # x to 80
    img_dir, ann = write_coco(tmp_path, d)
    with pytest.warns(RuntimeWarning, match=r"2 box\(es\) in .* reach outside their image; they are clipped"):
        ds = COCODetection(img_dir, ann)
    assert ds[0][1]["boxes"].tolist() == [[0.0, 30.0, 15.0, 40.0]]
    assert ds[2][1]["boxes"].tolist() == [[50.0, 10.0, 60.0, 22.0]]


# ------------------------------------------------------------------------------------ metrics
def _det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


def test_label_to_cat_list_never_wraps_label_zero():
    gt = {"image_id": 1, "boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}
    ev = COCOBoxEvaluator(label_to_cat=[3, 5])
    with pytest.raises(ValueError, match=r"label 0 is outside 1..2.*0 is the background"):
        ev.update([_det([[0, 0, 10, 10]], [0.9], [0])], [gt])
    with pytest.raises(ValueError, match=r"label 3 is outside 1..2"):
        ev.update([_det([[0, 0, 10, 10]], [0.9], [3])], [gt])
    with pytest.raises(KeyError, match=r"label 4 is not in label_to_cat; valid labels: \[1, 2\]"):
        COCOBoxEvaluator(label_to_cat={1: 3, 2: 5}).update([_det([[0, 0, 10, 10]], [0.9], [4])], [gt])
    with pytest.raises(TypeError, match="label_to_cat must be a list"):
        COCOBoxEvaluator(label_to_cat="3,5")


def test_nan_scores_and_boxes_are_refused():
    gt = {"image_id": 1, "boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}
    with pytest.raises(ValueError, match=r"outputs\[0\]\['scores'\] \(image 1\) holds NaN or inf"):
        COCOBoxEvaluator().update([_det([[0, 0, 10, 10]], [math.nan], [1])], [gt])
    with pytest.raises(ValueError, match=r"outputs\[0\]\['boxes'\]"):
        COCOBoxEvaluator().update([_det([[0, 0, math.inf, 10]], [0.5], [1])], [gt])


def test_unknown_image_id_against_the_ground_truth(tmp_path):
    img_dir, ann = write_coco(tmp_path)
    ds = COCODetection(img_dir, ann)
    ev = COCOBoxEvaluator(ds.coco, label_to_cat=ds.cat_ids)
    with pytest.raises(ValueError, match=r"targets\[0\] has image_id 12345, which is not an image of the ground"):
        ev.update([_det([[0, 0, 10, 10]], [0.9], [1])], [{"image_id": 12345}])


@pytest.mark.parametrize("dilation", [math.nan, math.inf, -math.inf, 2.5, 0.0])
@pytest.mark.parametrize("metric", [BoundaryIoU, lambda n, dilation: SegmentationMetric(n, dilation=dilation)],
                         ids=["BoundaryIoU", "SegmentationMetric"])
def test_bad_dilation_is_named(metric, dilation):
    with pytest.raises(ValueError, match=r"dilation"):
        metric(3, dilation=dilation)
