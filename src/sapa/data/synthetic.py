"""Built-in synthetic datasets: procedurally drawn scenes that need no download.

Every sample is a pure function of ``(seed, split, index)``: the same arguments give the same
image, label and boxes on every machine, in any worker, in any order. A scene is a textured,
noisy background with several shapes painted on top (later shapes occlude earlier ones). Labels
are the exact rasterisation used to paint the image — no anti-aliasing, no label smoothing — so a
prediction that is off by a pixel at a boundary is measurably wrong (boundary IoU sees it).

Classes (``SYNTHETIC_CLASSES``)::

    0 background   low-frequency colour field + fine noise texture
    1 disc         filled circle
    2 box          filled rectangle, rotated
    3 triangle     filled triangle
    4 ring         annulus, 2-4 px thick (a thin closed structure)
    5 bar          straight bar, 2-4 px thick (a thin open structure)

Appearance: each class has its own palette of colours (jittered per shape) and textures
(stripes, checker, dots or flat); the background colour field spans every hue, so a shape is told
from the background by texture and context as well as colour. Gaussian pixel noise is added last.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import IMAGENET_MEAN, IMAGENET_STD

SYNTHETIC_CLASSES = ("background", "disc", "box", "triangle", "ring", "bar")

_SPLIT_ID = {"train": 0, "val": 1, "test": 2}

# Per-class colour palettes (RGB, 0-255), jittered per shape. Each class has its own colours, so the
# semantics are learnt quickly and what remains is where the boundaries go; the background's
# colour field spans all hues, so colour alone never decides shape vs background.
_PALETTES = {
    1: [(220, 60, 60), (200, 90, 160)],
    2: [(60, 120, 230), (70, 70, 200)],
    3: [(210, 210, 60), (160, 210, 60)],
    4: [(40, 220, 200), (90, 230, 140)],
    5: [(250, 250, 250), (25, 25, 25)],
}
_TEXTURES = {1: ("flat", "dots"), 2: ("stripes", "flat"), 3: ("checker", "flat"), 4: ("flat",), 5: ("flat",)}


def _split_id(split: str) -> int:
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be one of {sorted(_SPLIT_ID)}, got {split!r}")
    return _SPLIT_ID[split]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random colour field (bilinear upsampling of a coarse grid) plus a fine texture."""
    g = int(rng.integers(2, 5))
    coarse = torch.from_numpy(rng.uniform(40, 200, size=(1, 3, g, g)).astype(np.float32))
    field = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    img = field[0].permute(1, 2, 0).numpy().copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    freq = rng.uniform(0.15, 0.5)
    tex = np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy))
    img += rng.uniform(5, 20) * tex[..., None]
    return img


def _texture(kind: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    if kind == "stripes":
        theta = rng.uniform(0, math.pi)
        return 25.0 * np.sign(np.sin(0.9 * (np.cos(theta) * xx + np.sin(theta) * yy)))
    if kind == "checker":
        p = int(rng.integers(2, 4))
        return 25.0 * (((yy // p + xx // p) % 2) * 2 - 1)
    if kind == "dots":
        return -35.0 * ((yy % 4 < 1.5) & (xx % 4 < 1.5))
    return np.zeros_like(yy)


def _shape_mask(cls: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    s = float(size)
    cy, cx = rng.uniform(0.1 * s, 0.9 * s, size=2)
    if cls == 1:  # disc
        r = rng.uniform(0.07, 0.18) * s
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if cls == 2:  # rotated box
        h, w = rng.uniform(0.1, 0.3, size=2) * s
        t = rng.uniform(0, math.pi)
        u = np.cos(t) * (xx - cx) + np.sin(t) * (yy - cy)
        v = -np.sin(t) * (xx - cx) + np.cos(t) * (yy - cy)
        return (np.abs(u) <= w / 2) & (np.abs(v) <= h / 2)
    if cls == 3:  # triangle: three vertices around the centre
        r = rng.uniform(0.1, 0.22) * s
        a0 = rng.uniform(0, 2 * math.pi)
        angles = a0 + np.array([0.0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, size=3)
        px, py = cx + r * np.cos(angles), cy + r * np.sin(angles)
        inside_pos = np.ones_like(yy, dtype=bool)
        inside_neg = np.ones_like(yy, dtype=bool)
        for k in range(3):
            x0, y0, x1, y1 = px[k], py[k], px[(k + 1) % 3], py[(k + 1) % 3]
            cross = (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)
            inside_pos &= cross >= 0
            inside_neg &= cross <= 0
        return inside_pos | inside_neg
    if cls == 4:  # ring
        r_out = rng.uniform(0.1, 0.22) * s
        thick = rng.uniform(2.0, 4.0)
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        return (d2 <= r_out ** 2) & (d2 >= (r_out - thick) ** 2)
    if cls == 5:  # bar: distance to a segment <= half thickness
        length = rng.uniform(0.3, 0.8) * s
        t = rng.uniform(0, math.pi)
        thick = rng.uniform(2.0, 4.0)
        dx, dy = math.cos(t), math.sin(t)
        proj = np.clip((xx - cx) * dx + (yy - cy) * dy, -length / 2, length / 2)
        ex, ey = xx - (cx + proj * dx), yy - (cy + proj * dy)
        return ex * ex + ey * ey <= (thick / 2) ** 2
    raise ValueError(f"unknown shape class {cls}")


def render_scene(seed: int, split: str, index: int, size: int = 64, min_shapes: int = 3, max_shapes: int = 6,
                 noise: float = 8.0) -> tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]]:
    """Draw one scene. Returns ``(image uint8 [H, W, 3], label uint8 [H, W], instances)`` where
    ``instances`` is a list of ``(class_id, bool mask [H, W])`` of the *visible* part of each shape
    (after occlusion), in drawing order; shapes that end up fully hidden are dropped."""
    rng = np.random.default_rng([int(seed), _split_id(split), int(index)])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = _background(rng, size)
    label = np.zeros((size, size), dtype=np.uint8)
    inst_id = np.zeros((size, size), dtype=np.int32)
    classes = []
    n = int(rng.integers(min_shapes, max_shapes + 1))
    for k in range(n):
        cls = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        mask = _shape_mask(cls, rng, yy, xx, size)
        if not mask.any():
            continue
        palette = _PALETTES[cls]
        colour = np.asarray(palette[int(rng.integers(len(palette)))], dtype=np.float32)
        colour = colour + rng.uniform(-20, 20, size=3)
        tex = _texture(_TEXTURES[cls][int(rng.integers(len(_TEXTURES[cls])))], rng, yy, xx)
        img[mask] = colour[None, :] + tex[mask][:, None]
        label[mask] = cls
        inst_id[mask] = len(classes) + 1
        classes.append(cls)
    img = img + rng.normal(0.0, noise, size=img.shape)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    instances = []
    for i, cls in enumerate(classes):
        m = inst_id == i + 1
        if m.any():
            instances.append((cls, m))
    return img, label, instances


def _to_tensor_normalized(img: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(img).permute(2, 0, 1).float()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (t - mean) / std


class SyntheticSegmentation(Dataset):
    """Seeded procedural segmentation scenes (see the module docstring for classes and appearance).

    Args:
        num_samples: length of the split.
        size: image side (square images), default 64.
        seed: dataset seed; ``(seed, split, index)`` fully determines a sample.
        split: ``'train'``, ``'val'`` or ``'test'`` (different scenes for the same index).
        flip: random horizontal flip in training (takes the ``rng`` passed by the sampler).
        cache: keep rendered samples in memory (rendering is ~1 ms per 64x64 scene).

    ``dataset[i]`` returns ``{"image": float [3, H, W] (ImageNet-normalised), "label": long [H, W],
    "index": i}``. ``dataset[(i, aug_seed)]`` (what :class:`sapa.data.ResumableSampler` yields)
    additionally applies the random flip drawn from ``aug_seed``.
    """

    num_classes = len(SYNTHETIC_CLASSES)
    classes = SYNTHETIC_CLASSES
    ignore_index = 255

    def __init__(self, num_samples: int = 512, size: int = 64, seed: int = 0, split: str = "train",
                 flip: bool = True, cache: bool = True):
        if num_samples < 1:
            raise ValueError(f"SyntheticSegmentation: num_samples must be >= 1, got {num_samples}")
        if size < 16:
            raise ValueError(f"SyntheticSegmentation: size must be >= 16, got {size}")
        _split_id(split)
        self.num_samples, self.size, self.seed, self.split = int(num_samples), int(size), int(seed), split
        self.flip = flip and split == "train"
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.num_samples

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The rendered ``(image uint8 [H, W, 3], label uint8 [H, W])`` of sample ``index``."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        img, label, _ = render_scene(self.seed, self.split, index, self.size)
        if self._cache is not None:
            self._cache[index] = (img, label)
        return img, label

    def __getitem__(self, key):
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        img, label = self.raw(int(index))
        if self.flip and aug_seed is not None and np.random.default_rng(aug_seed).random() < 0.5:
            img, label = img[:, ::-1], label[:, ::-1]
        return {"image": _to_tensor_normalized(np.ascontiguousarray(img)),
                "label": torch.from_numpy(np.ascontiguousarray(label)).long(),
                "index": int(index)}


class SyntheticDetection(Dataset):
    """The same scenes as :class:`SyntheticSegmentation`, with one box per visible shape.

    ``dataset[i]`` returns ``(image float [3, H, W] in [0, 1], target)`` with torchvision detection
    targets: ``boxes`` float [N, 4] xyxy in pixels (right/bottom edges exclusive: a shape covering
    columns 3..7 gets x1=3, x2=8), ``labels`` long [N] in 1..5 (0 is background), ``image_id``,
    ``area`` (box area) and ``iscrowd`` (zeros). Normalisation and resizing are left to the
    detector's transform, as torchvision detectors expect.
    """

    num_classes = len(SYNTHETIC_CLASSES)  # including background, torchvision convention
    classes = SYNTHETIC_CLASSES

    def __init__(self, num_samples: int = 256, size: int = 64, seed: int = 0, split: str = "train",
                 flip: bool = True, min_box: int = 2, cache: bool = True):
        if num_samples < 1:
            raise ValueError(f"SyntheticDetection: num_samples must be >= 1, got {num_samples}")
        _split_id(split)
        self.num_samples, self.size, self.seed, self.split = int(num_samples), int(size), int(seed), split
        self.flip = flip and split == "train"
        self.min_box = min_box
        self._cache: dict | None = {} if cache else None

    def __len__(self) -> int:
        return self.num_samples

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        img, _, instances = render_scene(self.seed, self.split, index, self.size)
        boxes, labels = [], []
        for cls, m in instances:
            ys, xs = np.nonzero(m)
            x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            if x2 - x1 >= self.min_box and y2 - y1 >= self.min_box:
                boxes.append([x1, y1, x2, y2])
                labels.append(cls)
        out = (img, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64))
        if self._cache is not None:
            self._cache[index] = out
        return out

    def __getitem__(self, key):
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        img, boxes, labels = self.raw(int(index))
        boxes = boxes.copy()
        if self.flip and aug_seed is not None and np.random.default_rng(aug_seed).random() < 0.5:
            img = img[:, ::-1]
            boxes[:, [0, 2]] = self.size - boxes[:, [2, 0]]
        image = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0
        b = torch.from_numpy(boxes)
        target = {"boxes": b, "labels": torch.from_numpy(labels),
                  "image_id": int(index),
                  "area": (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]),
                  "iscrowd": torch.zeros(len(labels), dtype=torch.int64)}
        return image, target
