"""COCODetection on a tiny dataset written in the real format (jpg images + instances JSON)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sapa.data import COCODetection


def write_coco(root, n_images=3):
    img_dir = root / "val2017"
    img_dir.mkdir(parents=True)
    images, anns = [], []
    for i in range(n_images):
        h, w = 40 + 8 * i, 60
        Image.fromarray(np.full((h, w, 3), 30 * i, np.uint8)).save(img_dir / f"{i + 1:012d}.jpg")
        images.append({"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "height": h, "width": w})
    anns = [
        {"id": 1, "image_id": 1, "category_id": 18, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 7], "area": 35, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [1, 1, 30, 30], "area": 900, "iscrowd": 1},
        {"id": 4, "image_id": 2, "category_id": 18, "bbox": [3, 3, 0.5, 9], "area": 4, "iscrowd": 0},
    ]
    cats = [{"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    ann_file = root / "annotations" / "instances_val2017.json"
    ann_file.parent.mkdir()
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return img_dir, ann_file


def test_boxes_labels_and_filters(tmp_path):
    img_dir, ann = write_coco(tmp_path)
    ds = COCODetection(img_dir, ann)
    assert len(ds) == 3 and ds.num_classes == 3 and ds.cat_ids == [3, 18] and ds.classes == ["car", "dog"]
    image, t = ds[0]
    assert image.shape == (3, 40, 60) and image.dtype == torch.float32
    # xywh -> xyxy; crowd dropped; labels contiguous (car 3 -> 1, dog 18 -> 2)
    assert t["boxes"].tolist() == [[10, 5, 30, 15], [0, 0, 5, 7]]
    assert t["labels"].tolist() == [2, 1]
    assert t["image_id"] == 1
    # image 2's only box is narrower than 1 px: dropped; image 3 has none
    assert ds[1][1]["boxes"].shape == (0, 4) and ds[2][1]["labels"].numel() == 0
    train = COCODetection(img_dir, ann, train=True)
    assert train.ids == [1]  # images without usable boxes are skipped in training


def test_train_flip_mirrors_boxes(tmp_path):
    img_dir, ann = write_coco(tmp_path)
    ds = COCODetection(img_dir, ann, train=True)
    _, base = ds[0]
    flipped = [ds[(0, (0, 0, k))][1]["boxes"] for k in range(20)]
    mirrored = [b for b in flipped if not torch.equal(b, base["boxes"])]
    assert mirrored, "no flip in 20 seeds"
    assert torch.allclose(mirrored[0][:, [0, 2]], 60 - base["boxes"][:, [2, 0]])


def test_missing_image_names_the_file(tmp_path):
    img_dir, ann = write_coco(tmp_path)
    (img_dir / "000000000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000000000002.jpg"):
        COCODetection(img_dir, ann)


def test_missing_annotation_file_names_it(tmp_path):
    img_dir, ann = write_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        COCODetection(img_dir, ann.with_name("instances_train2017.json"))


def test_size_mismatch_names_the_file(tmp_path):
    img_dir, ann = write_coco(tmp_path)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(img_dir / "000000000001.jpg")
    with pytest.raises(ValueError, match="000000000001.jpg"):
        COCODetection(img_dir, ann)[0]


def test_inconsistent_json_is_refused(tmp_path):
    img_dir, ann = write_coco(tmp_path)
    d = json.loads(ann.read_text())
    d["annotations"].append({"id": 9, "image_id": 77, "category_id": 3, "bbox": [0, 0, 2, 2], "area": 4,
                             "iscrowd": 0})
    ann.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="image 77"):
        COCODetection(img_dir, ann)
    ann.write_text("{not json")
    with pytest.raises(ValueError, match="instances_val2017.json"):
        COCODetection(img_dir, ann)
