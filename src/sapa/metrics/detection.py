"""COCO box AP through pycocotools' COCOeval (AP, AP50, AP75, APs, APm, APl).

:class:`COCOBoxEvaluator` collects torchvision-style detections (``boxes`` xyxy, ``scores``,
``labels``) per image. Ground truth is either a pycocotools ``COCO`` object (the real COCO
annotations, e.g. ``COCODetection.coco``) or built in memory from the targets passed to
:meth:`update` (synthetic data). Under DDP, :meth:`gather` collects every rank's detections (and
in-memory ground truth) on every rank; images seen by several ranks (padding) count once.
"""
from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from typing import Any

import torch

from ._dist import all_gather_objects

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _tolist(x):
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


class COCOBoxEvaluator:
    """Args:
        coco_gt: a ``pycocotools.coco.COCO`` with the ground truth, or ``None`` to build it from the
            targets given to :meth:`update`.
        label_to_cat: contiguous label -> COCO category id (``COCODetection.cat_ids[label - 1]``);
            default: identity (labels are the category ids).
    """

    def __init__(self, coco_gt: Any = None, label_to_cat: Sequence[int] | dict[int, int] | None = None):
        if label_to_cat is not None:
            if isinstance(label_to_cat, dict):
                items = list(label_to_cat.items())
            elif isinstance(label_to_cat, (list, tuple)):
                items = list(enumerate(label_to_cat, 1))
            else:
                raise TypeError(f"COCOBoxEvaluator: label_to_cat must be a list (label l -> label_to_cat[l - 1]) "
                                f"or a dict label -> category id, got {type(label_to_cat).__name__}")
            for k, v in items:
                if not all(isinstance(x, int) and not isinstance(x, bool) for x in (k, v)):
                    raise TypeError(f"COCOBoxEvaluator: label_to_cat must map int labels to int category ids, "
                                    f"got {k!r} -> {v!r}")
        self.coco_gt = coco_gt
        self.label_to_cat = label_to_cat
        self.detections: dict[int, list[dict]] = {}
        self.gt: dict[int, dict] = {}

    def reset(self) -> None:
        self.detections, self.gt = {}, {}

    def _cat(self, label: int) -> int:
        label = int(label)
        if self.label_to_cat is None:
            return label
        if isinstance(self.label_to_cat, dict):
            if label not in self.label_to_cat:
                raise KeyError(f"COCOBoxEvaluator: label {label} is not in label_to_cat; valid labels: "
                               f"{sorted(self.label_to_cat)}")
            return int(self.label_to_cat[label])
        n = len(self.label_to_cat)
        if not 1 <= label <= n:
            # a list maps label l to label_to_cat[l - 1]: 0 (background) must never wrap to the last id
            raise ValueError(f"COCOBoxEvaluator: label {label} is outside 1..{n}, the labels label_to_cat "
                             f"(label l -> label_to_cat[l - 1]) covers; 0 is the background")
        return int(self.label_to_cat[label - 1])

    def update(self, outputs: list[dict], targets: list[dict]) -> None:
        """``outputs[i]``: ``{"boxes" [N, 4] xyxy, "scores" [N], "labels" [N]}`` for the image of
        ``targets[i]`` (which needs ``image_id``; and ``boxes``/``labels`` without ``coco_gt``)."""
        if len(outputs) != len(targets):
            raise ValueError(f"{len(outputs)} outputs for {len(targets)} targets")
        for i, (out, tgt) in enumerate(zip(outputs, targets)):
            image_id = int(tgt["image_id"])
            if self.coco_gt is not None and image_id not in self.coco_gt.imgs:
                raise ValueError(f"COCOBoxEvaluator: targets[{i}] has image_id {image_id}, which is not an image of "
                                 f"the ground truth ({len(self.coco_gt.imgs)} images)")
            boxes, scores, labels = _tolist(out["boxes"]), _tolist(out["scores"]), _tolist(out["labels"])
            if not (len(boxes) == len(scores) == len(labels)):
                raise ValueError(f"COCOBoxEvaluator: outputs[{i}] has {len(boxes)} boxes, {len(scores)} scores and "
                                 f"{len(labels)} labels; they must be equal")
            for name, vals in (("scores", scores), ("boxes", [v for b in boxes for v in b])):
                if not all(math.isfinite(v) for v in vals):
                    raise ValueError(f"COCOBoxEvaluator: outputs[{i}][{name!r}] (image {image_id}) holds NaN or inf; "
                                     f"a diverged model cannot be scored")
            dets = []
            for (x1, y1, x2, y2), s, lab in zip(boxes, scores, labels):
                dets.append({"image_id": image_id, "category_id": self._cat(lab),
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)})
            self.detections[image_id] = dets
            if self.coco_gt is None:
                boxes = _tolist(tgt["boxes"])
                crowd = _tolist(tgt["iscrowd"]) if "iscrowd" in tgt else [0] * len(boxes)
                size = tgt.get("size")
                self.gt[image_id] = {"boxes": boxes, "labels": [self._cat(v) for v in _tolist(tgt["labels"])],
                                     "iscrowd": crowd, "size": None if size is None else [int(v) for v in size]}

    def gather(self) -> None:
        """Collect all ranks' detections and in-memory ground truth (call on every rank)."""
        merged_d, merged_g = {}, {}
        for d, g in all_gather_objects((self.detections, self.gt)):
            merged_d.update(d)
            merged_g.update(g)
        self.detections, self.gt = merged_d, merged_g

    def _build_gt(self):
        from .._optional import optional_import

        with optional_import("pycocotools", "COCO box AP"):
            from pycocotools.coco import COCO
        images, anns, cats = [], [], set()
        ann_id = 1
        for image_id in sorted(self.gt):
            g = self.gt[image_id]
            img = {"id": image_id}
            if g["size"] is not None:
                img.update(height=g["size"][0], width=g["size"][1])
            images.append(img)
            for (x1, y1, x2, y2), cat, crowd in zip(g["boxes"], g["labels"], g["iscrowd"]):
                w, h = x2 - x1, y2 - y1
                anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x1, y1, w, h],
                             "area": w * h, "iscrowd": int(crowd)})
                cats.add(cat)
                ann_id += 1
        for dets in self.detections.values():
            cats.update(d["category_id"] for d in dets)
        coco = COCO()
        coco.dataset = {"images": images, "annotations": anns,
                        "categories": [{"id": c, "name": str(c)} for c in sorted(cats)]}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    def compute(self, verbose: bool = False) -> dict:
        """COCO box metrics over the images seen so far (fractions in [0, 1]; -1 where a size
        range has no ground truth, as COCOeval reports)."""
        from .._optional import optional_import

        with optional_import("pycocotools", "COCO box AP"):
            from pycocotools.cocoeval import COCOeval
        coco_gt = self.coco_gt if self.coco_gt is not None else self._build_gt()
        dets = [d for image_id in sorted(self.detections) for d in self.detections[image_id]]
        if not dets:
            return {k: 0.0 for k in COCO_STAT_NAMES}
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            coco_dt = coco_gt.loadRes(dets)
            ev = COCOeval(coco_gt, coco_dt, "bbox")
            ev.params.imgIds = sorted(self.detections)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        if verbose:
            print(sink.getvalue())
        return {k: float(v) for k, v in zip(COCO_STAT_NAMES, ev.stats[:6])}
