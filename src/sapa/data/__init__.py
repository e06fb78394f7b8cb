"""Datasets: ADE20K and COCO loaders for the papers' benchmarks, and built-in synthetic sets.

* :class:`ADE20K` — ADEChallengeData2016, 150 classes, docs/SEMANTICS.md §6.1 train / eval pipelines.
* :class:`COCODetection` — COCO instances JSON via pycocotools, torchvision detection targets.
* :class:`SyntheticSegmentation`, :class:`SyntheticDetection` — seeded procedural scenes (shapes
  incl. thin bars and rings on textured, noisy backgrounds) with pixel-exact labels / boxes.
* :class:`ResumableSampler`, :class:`ShardSampler` — deterministic, resumable, DDP-aware order.

Every dataset accepts ``dataset[i]`` and ``dataset[(i, aug_seed)]``; the second form draws the
random augmentation from ``aug_seed`` (see :mod:`sapa.data.samplers`).
"""
from .ade20k import ADE20K
from .coco import COCODetection, detection_collate
from .samplers import ResumableSampler, ShardSampler
from .synthetic import SYNTHETIC_CLASSES, SyntheticDetection, SyntheticSegmentation, render_scene
from .transforms import IMAGENET_MEAN, IMAGENET_STD, SegEvalPipeline, SegTrainPipeline

__all__ = ["ADE20K", "COCODetection", "detection_collate", "SyntheticSegmentation", "SyntheticDetection",
           "SYNTHETIC_CLASSES", "render_scene", "ResumableSampler", "ShardSampler", "SegTrainPipeline",
           "SegEvalPipeline", "IMAGENET_MEAN", "IMAGENET_STD"]
