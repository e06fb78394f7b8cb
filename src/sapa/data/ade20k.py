"""ADE20K (ADEChallengeData2016) scene parsing, 150 classes.

Layout expected under ``root`` (the official zip, unpacked)::

    root/images/training/ADE_train_00000001.jpg       root/annotations/training/ADE_train_00000001.png
    root/images/validation/ADE_val_00000001.jpg       root/annotations/validation/ADE_val_00000001.png

Annotations are single-channel PNGs with 0 = "other" and 1..150 the classes. With
``reduce_zero_label=True`` (the benchmark setting, docs/SEMANTICS.md §6.1) 0 becomes 255 (ignored) and every
other value v becomes v - 1, so classes are 0..149.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from .transforms import SegEvalPipeline, SegTrainPipeline

_SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 [H, W, 3]; errors name the file."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Exception as err:  # PIL raises many types for broken files
        raise ValueError(f"cannot read image {path}: {err}") from err


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Single-channel uint8 [H, W] (palette PNGs give their indices); errors name the file."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"annotation {path} has mode {im.mode!r}; expected a single-channel "
                                 f"PNG (mode L or P)")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    except ValueError:
        raise
    except Exception as err:
        raise ValueError(f"cannot read annotation {path}: {err}") from err
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"annotation {path} has values outside 0..255")
        arr = arr.astype(np.uint8)
    return arr


class ADE20K(Dataset):
    """ADE20K scene parsing with the docs/SEMANTICS.md §6.1 pipelines.

    Args:
        root: the ``ADEChallengeData2016`` folder.
        split: ``'train'`` / ``'training'`` or ``'val'`` / ``'validation'``.
        pipeline: ``'train'`` (resize ratio 0.5-2.0, crop 512 with cat_max_ratio 0.75, flip,
            photometric distortion, pad), ``'eval'`` (keep-ratio resize to (2048, 512)), a callable
            ``(img, label, rng) -> (image, label)``, or ``None`` for the raw arrays.
            Default: ``'train'`` for the training split, ``'eval'`` otherwise.
        reduce_zero_label: map 0 -> 255 and v -> v - 1 (default True, the benchmark setting).
        check_files: at construction, require every image to have its annotation and vice versa
            (errors name the first file without a partner).

    ``dataset[i]`` returns ``{"image", "label", "index", "path"}``; ``dataset[(i, aug_seed)]``
    (what :class:`sapa.data.ResumableSampler` yields) draws the random augmentation from
    ``aug_seed``, so augmentations are reproducible and resumable.
    """

    num_classes = 150
    ignore_index = 255

    def __init__(self, root: str | os.PathLike, split: str = "train", pipeline: str | Callable | None = "auto",
                 reduce_zero_label: bool = True, check_files: bool = True):
        if split not in _SPLITS:
            raise ValueError(f"ADE20K: split must be one of {sorted(_SPLITS)}, got {split!r}")
        self.root = Path(root)
        self.split = _SPLITS[split]
        self.reduce_zero_label = reduce_zero_label
        img_dir = self.root / "images" / self.split
        ann_dir = self.root / "annotations" / self.split
        for d in (self.root, img_dir, ann_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"ADE20K: folder not found: {d} (expected the ADEChallengeData2016 "
                                        f"layout images/{{training,validation}} and annotations/{{...}})")
        images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        if not images:
            raise FileNotFoundError(f"ADE20K: no .jpg images in {img_dir}")
        self.samples = [(p, ann_dir / (p.stem + ".png")) for p in images]
        if check_files:
            for img, ann in self.samples:
                if not ann.is_file():
                    raise FileNotFoundError(f"ADE20K: annotation {ann} is missing (needed for image {img})")
            stems = {p.stem for p in images}
            for ann in sorted(ann_dir.glob("*.png")):
                if ann.stem not in stems:
                    raise FileNotFoundError(f"ADE20K: annotation {ann} has no image "
                                            f"{img_dir / (ann.stem + '.jpg')}")
        if pipeline == "auto":
            pipeline = "train" if self.split == "training" else "eval"
        if pipeline == "train":
            pipeline = SegTrainPipeline()
        elif pipeline == "eval":
            pipeline = SegEvalPipeline()
        elif pipeline is not None and not callable(pipeline):
            raise ValueError(f"ADE20K: pipeline must be 'train', 'eval', a callable or None, got {pipeline!r}")
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw ``(image uint8 [H, W, 3], label uint8 [H, W])`` after reduce_zero_label."""
        img_path, ann_path = self.samples[index]
        img = read_image(img_path)
        label = read_label(ann_path)
        if img.shape[:2] != label.shape:
            raise ValueError(f"ADE20K: image {img_path} is {img.shape[1]}x{img.shape[0]} but its annotation "
                             f"{ann_path} is {label.shape[1]}x{label.shape[0]}")
        bad = (label > self.num_classes)
        if bad.any():
            raise ValueError(f"ADE20K: annotation {ann_path} has label {int(label[bad].max())}; valid values "
                             f"are 0..{self.num_classes}")
        if self.reduce_zero_label:
            label = label.astype(np.int16) - 1
            label[label < 0] = self.ignore_index
            label = label.astype(np.uint8)
        return img, label

    def __getitem__(self, key):
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        index = int(index)
        img, label = self.load(index)
        out = {"index": index, "path": str(self.samples[index][0])}
        if self.pipeline is None:
            out.update(image=img, label=label)
            return out
        rng = np.random.default_rng(aug_seed if aug_seed is not None else [0, index])
        image, lab = self.pipeline(img, label, rng)
        out.update(image=image, label=lab)
        return out
