"""COCO object detection (instances JSON, read with pycocotools) with torchvision-style targets."""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .ade20k import read_image


class COCODetection(Dataset):
    """COCO boxes for torchvision detectors.

    Args:
        img_dir: folder of the split's images (e.g. ``coco/val2017``).
        ann_file: the instances JSON (e.g. ``coco/annotations/instances_val2017.json``).
        train: random horizontal flip (p 0.5) and drop images without usable boxes (mmdet's
            ``filter_empty_gt``); evaluation keeps every image.
        check_files: at construction, require every image listed in the JSON to exist
            (the error names the first missing file).

    ``dataset[i]`` returns ``(image float [3, H, W] in [0, 1], target)`` where ``target`` has
    ``boxes`` float [N, 4] xyxy in pixels, ``labels`` long [N] in 1..K (contiguous; 0 is background,
    torchvision convention; ``cat_ids[label - 1]`` is the COCO category id), ``image_id`` (the COCO
    id), ``area``, ``iscrowd``. Crowd regions and boxes narrower than 1 px are dropped from the
    targets (mmdet does the same in training; COCOeval reads crowds from the JSON itself). Boxes
    reaching outside their image are clipped to it (one warning per file says how many); an
    annotation without a ``bbox`` of 4 finite numbers is refused at construction, naming it.
    Resizing (1333x800 keep ratio) and normalisation belong to the detector's transform.
    """

    def __init__(self, img_dir: str | os.PathLike, ann_file: str | os.PathLike, train: bool = False,
                 check_files: bool = True):
        self.img_dir = Path(img_dir)
        self.ann_file = Path(ann_file)
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"COCODetection: annotation file not found: {self.ann_file}")
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"COCODetection: image folder not found: {self.img_dir}")
        from .._optional import optional_import

        with optional_import("pycocotools", "COCODetection"):
            from pycocotools.coco import COCO
        import contextlib
        import io
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(str(self.ann_file))
        except Exception as err:
            raise ValueError(f"COCODetection: cannot read {self.ann_file} as COCO instances JSON: {err}") from err
        for key in ("images", "annotations", "categories"):
            if key not in self.coco.dataset:
                raise ValueError(f"COCODetection: {self.ann_file} has no {key!r} list")
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.classes = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.num_classes = len(self.cat_ids) + 1
        outside = 0
        for ann in self.coco.dataset["annotations"]:
            if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
                raise ValueError(f"COCODetection: {self.ann_file}: annotation {ann.get('id') if isinstance(ann, dict) else ann!r} "
                                 f"needs 'image_id' and 'category_id'")
            box = ann.get("bbox")
            if box is None:
                raise ValueError(f"COCODetection: {self.ann_file}: annotation {ann.get('id')} (image {ann['image_id']}) "
                                 f"has no 'bbox'; expected [x, y, width, height]")
            if (not isinstance(box, (list, tuple)) or len(box) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
                raise ValueError(f"COCODetection: {self.ann_file}: annotation {ann.get('id')} (image {ann['image_id']}) "
                                 f"has bbox {box!r}; expected 4 finite numbers [x, y, width, height]")
            if ann["image_id"] not in self.coco.imgs:
                raise ValueError(f"COCODetection: {self.ann_file}: annotation {ann.get('id')} refers to image "
                                 f"{ann['image_id']}, which is not in 'images'")
            if ann["category_id"] not in self.cat_to_label:
                raise ValueError(f"COCODetection: {self.ann_file}: annotation {ann.get('id')} has category "
                                 f"{ann['category_id']}, which is not in 'categories'")
            info = self.coco.imgs[ann["image_id"]]
            x, y, w, h = box
            W, H = info.get("width", math.inf), info.get("height", math.inf)
            if x < 0 or y < 0 or x + w > W or y + h > H:
                outside += 1
        if outside:
            warnings.warn(f"COCODetection: {outside} box(es) in {self.ann_file} reach outside their image; they are "
                          f"clipped to the image", RuntimeWarning, stacklevel=2)
        ids = sorted(self.coco.imgs)
        if check_files:
            for i in ids:
                p = self.img_dir / self.coco.imgs[i]["file_name"]
                if not p.is_file():
                    raise FileNotFoundError(f"COCODetection: image {p} (id {i} in {self.ann_file}) is missing")
        self.train = train
        if train:
            ids = [i for i in ids if len(self._targets(i)[0])]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def _targets(self, image_id: int, size: tuple[int, int] | None = None):
        """Boxes xyxy clipped to the image (``size`` (H, W); default: the JSON's height / width)."""
        info = self.coco.imgs[image_id]
        H, W = size if size is not None else (info.get("height", math.inf), info.get("width", math.inf))
        boxes, labels, areas = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
            w, h = x2 - x1, y2 - y1
            if w < 1 or h < 1:
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(self.cat_to_label[ann["category_id"]])
            areas.append(ann.get("area", w * h))
        return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64),
                np.asarray(areas, dtype=np.float32))

    def __getitem__(self, key):
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        image_id = self.ids[int(index)]
        info = self.coco.imgs[image_id]
        path = self.img_dir / info["file_name"]
        img = read_image(path)
        if (img.shape[0], img.shape[1]) != (info.get("height", img.shape[0]), info.get("width", img.shape[1])):
            said = f"{info.get('width', '?')}x{info.get('height', '?')} (width x height)"
            raise ValueError(f"COCODetection: image {path} is {img.shape[1]}x{img.shape[0]} but {self.ann_file} "
                             f"says {said}")
        boxes, labels, areas = self._targets(image_id, img.shape[:2])
        if self.train and aug_seed is not None and np.random.default_rng(aug_seed).random() < 0.5:
            img = img[:, ::-1]
            boxes = boxes.copy()
            boxes[:, [0, 2]] = img.shape[1] - boxes[:, [2, 0]]
        image = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0
        target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels), "image_id": image_id,
                  "area": torch.from_numpy(areas), "iscrowd": torch.zeros(len(labels), dtype=torch.int64)}
        return image, target


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Lists of images and targets (detectors take variable-size images)."""
    images, targets = zip(*batch)
    return list(images), list(targets)
