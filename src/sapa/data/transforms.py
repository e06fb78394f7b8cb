"""Segmentation data pipelines of docs/SEMANTICS.md §6.1 (the mmseg ADE20K pipelines), in numpy + torch.

Train: ``resize`` to img_scale (2048, 512) times a ratio drawn in [0.5, 2.0], keeping the aspect
ratio -> ``random_crop`` 512x512 with ``cat_max_ratio`` 0.75 -> horizontal ``flip`` (p 0.5) ->
``photometric_distortion`` -> normalise (ImageNet mean/std, RGB) -> ``pad`` to 512x512 (image 0,
label 255).
Eval: resize keeping the ratio to fit (2048, 512), normalise; the label stays at its original
size (predictions are resized back to it, as mmseg evaluates).

Every random choice is drawn from a ``numpy.random.Generator`` passed by the caller, so a sample's
augmentation is a function of its seed (see :class:`sapa.data.ResumableSampler`).
Image resizing is bilinear (align_corners=False, no antialias: what cv2.INTER_LINEAR does);
label resizing is nearest.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``rescale`` with keep_ratio: the largest size with long edge <= max(scale) and short
    edge <= min(scale); sizes are rounded as ``int(x * factor + 0.5)``."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize(img: np.ndarray, label: np.ndarray | None, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize ``img`` [H, W, 3] (float32) bilinearly and ``label`` [H, W] by nearest to ``size``."""
    if img.shape[:2] == tuple(size):
        return img, label
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    img = t[0].permute(1, 2, 0).numpy()
    if label is not None:
        lt = torch.from_numpy(np.ascontiguousarray(label)).to(torch.uint8)[None, None]
        label = F.interpolate(lt, size=size, mode="nearest")[0, 0].numpy()
    return img, label


def random_crop(img: np.ndarray, label: np.ndarray, crop: tuple[int, int], rng: np.random.Generator,
                cat_max_ratio: float = 0.75, ignore_index: int = 255, attempts: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """mmseg RandomCrop: up to ``attempts`` tries to find a crop where no single class covers more
    than ``cat_max_ratio`` of the labelled pixels (needs at least two classes); else the last try."""
    ch, cw = crop
    h, w = label.shape

    def draw():
        y = int(rng.integers(0, max(h - ch, 0) + 1))
        x = int(rng.integers(0, max(w - cw, 0) + 1))
        return y, x

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(attempts):
            patch = label[y:y + ch, x:x + cw]
            vals, counts = np.unique(patch[patch != ignore_index], return_counts=True)
            if len(vals) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = draw()
    return img[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]


def _rgb_to_hsv(img: np.ndarray):
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    mx, mn = img.max(-1), img.min(-1)
    diff = mx - mn
    v = mx
    s = np.where(mx > 0, diff / np.maximum(mx, 1e-12), 0.0)
    safe = np.maximum(diff, 1e-12)
    h = np.where(mx == r, (g - b) / safe, np.where(mx == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = np.where(diff > 0, (h * 60.0) % 360.0, 0.0)
    return h, s, v


def _hsv_to_rgb(h, s, v):
    c = v * s
    hp = (h % 360.0) / 60.0
    x = c * (1 - np.abs(hp % 2 - 1))
    zeros = np.zeros_like(c)
    idx = np.floor(hp).astype(np.int64) % 6
    r = np.choose(idx, [c, x, zeros, zeros, x, c])
    g = np.choose(idx, [x, c, c, x, zeros, zeros])
    b = np.choose(idx, [zeros, zeros, x, c, c, x])
    m = v - c
    return np.stack([r + m, g + m, b + m], axis=-1)


def photometric_distortion(img: np.ndarray, rng: np.random.Generator, brightness_delta: float = 32,
                           contrast_range: tuple[float, float] = (0.5, 1.5),
                           saturation_range: tuple[float, float] = (0.5, 1.5),
                           hue_delta: int = 18) -> np.ndarray:
    """mmseg PhotoMetricDistortion on a float [H, W, 3] RGB image in [0, 255]: each step with
    probability 0.5 — brightness (+U(-32, 32)), contrast (xU(0.5, 1.5), before or after the colour
    steps, chosen at random), saturation (S x U(0.5, 1.5)), hue (H + randint(-18, 18) in OpenCV's
    0-180 hue units, i.e. x2 degrees); clipped to [0, 255] after each step."""
    img = img.astype(np.float32)
    if rng.integers(2):
        img = np.clip(img + rng.uniform(-brightness_delta, brightness_delta), 0, 255)
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        img = np.clip(img * rng.uniform(*contrast_range), 0, 255)
    do_sat, do_hue = rng.integers(2), rng.integers(2)
    sat = rng.uniform(*saturation_range) if do_sat else 1.0
    hue = int(rng.integers(-hue_delta, hue_delta + 1)) if do_hue else 0
    if do_sat or do_hue:
        h, s, v = _rgb_to_hsv(img / 255.0)
        s = np.clip(s * sat, 0, 1)
        h = (h + 2.0 * hue) % 360.0
        img = np.clip(_hsv_to_rgb(h, s, v) * 255.0, 0, 255).astype(np.float32)
    if not contrast_first and rng.integers(2):
        img = np.clip(img * rng.uniform(*contrast_range), 0, 255)
    return img


def normalize(img: np.ndarray) -> torch.Tensor:
    """[H, W, 3] RGB float in [0, 255] -> [3, H, W] tensor, ImageNet mean/std."""
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)
    return (t - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def pad(image: torch.Tensor, label: torch.Tensor, size: tuple[int, int],
        ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right to ``size``: image with 0 (after normalisation, as mmseg), label with 255."""
    h, w = label.shape
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        label = F.pad(label, (0, pw, 0, ph), value=ignore_index)
    return image, label


@dataclass
class SegTrainPipeline:
    """The docs/SEMANTICS.md §6.1 training pipeline. Call with ``(img uint8 [H, W, 3], label uint8 [H, W], rng)``."""

    img_scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] = (512, 512)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    ignore_index: int = 255

    def __call__(self, img: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = rng.uniform(*self.ratio_range)
        scale = (int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio))
        img, label = resize(img.astype(np.float32), label, rescale_size(*label.shape, scale))
        img, label = random_crop(img, label, self.crop_size, rng, self.cat_max_ratio, self.ignore_index)
        if rng.random() < self.flip_prob:
            img, label = img[:, ::-1], label[:, ::-1]
        if self.photometric:
            img = photometric_distortion(img, rng)
        image = normalize(img)
        lab = torch.from_numpy(np.ascontiguousarray(label)).long()
        return pad(image, lab, self.crop_size, self.ignore_index)


@dataclass
class SegEvalPipeline:
    """The docs/SEMANTICS.md §6.1 test pipeline (mmseg AlignedResize): keep-ratio resize to fit ``img_scale``,
    then each side rounded up to a multiple of ``size_divisor``; the label keeps its full size."""

    img_scale: tuple[int, int] = (2048, 512)
    size_divisor: int | None = 32

    def __call__(self, img: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = rescale_size(*label.shape, self.img_scale)
        if self.size_divisor:
            d = self.size_divisor
            h, w = -(-h // d) * d, -(-w // d) * d
        img, _ = resize(img.astype(np.float32), None, (h, w))
        return normalize(img), torch.from_numpy(np.ascontiguousarray(label)).long()
