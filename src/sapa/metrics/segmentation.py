"""Semantic segmentation metrics accumulated over a dataset: mIoU and boundary IoU.

mIoU (as mmseg)
    A confusion matrix ``M[g, p]`` (ground-truth class g, predicted class p) is summed over every
    pixel of every image whose ground truth is not ``ignore_index``. Per class,
    ``IoU_c = M[c, c] / (sum_p M[c, p] + sum_g M[g, c] - M[c, c])``; mIoU is the mean over the
    classes whose union is non-zero (classes neither present nor predicted are skipped; a class
    predicted but never present counts with IoU 0). Also reported: pixel accuracy ``aAcc`` and
    mean class accuracy ``mAcc``.

Boundary IoU (Cheng, Girshick, Dollár, Berg, Kirillov, CVPR 2021), per class, over a dataset
    For one image of size H x W and one class c, let ``G = {gt == c}`` and
    ``P = {pred == c} minus the ignored pixels`` (binary masks). The boundary band of a mask X at
    width d is the set of pixels of X within distance d of a pixel outside X:
    ``band_d(X) = X minus erode_d(X)``, where ``erode_d`` keeps a pixel iff the whole
    (2d+1) x (2d+1) square around it lies in X, pixels outside the image counting as outside X —
    this is ``d`` iterations of a 3x3 erosion on the mask zero-padded by one pixel (the reference
    code's ``mask_to_boundary``), i.e. ``G_d ∩ G`` in the paper's notation. Then
    ``I_c += |band_d(G) ∩ band_d(P)|`` and ``U_c += |band_d(G) ∪ band_d(P)|``, summed over all
    images; ``bIoU_c = I_c / U_c`` and bIoU is the mean over classes with ``U_c > 0``.
    Ignored pixels are outside both G and P, so they never count and a region bordering an
    ignored area has a band along it in both masks.
    The width d: ``dilation`` given as a float < 1 is a ratio of the image diagonal,
    ``d = max(1, round(ratio * sqrt(H^2 + W^2)))`` (default 0.02, the paper's setting: d = 2 at
    64x64, d = 14 at 512x512); an int >= 1 is a width in pixels for every image.

Both states are sums of integer counts: :meth:`SegmentationMetric.all_reduce` sums them over DDP
ranks, so a sharded evaluation gives exactly the numbers of a single-process one.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from ._dist import all_reduce_sum


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    if pred.dim() == 2:
        pred, target = pred[None], target[None]
    if pred.dim() != 3:
        raise ValueError(f"expected label maps [H, W] or [B, H, W], got {tuple(pred.shape)}")
    if pred.is_floating_point() or target.is_floating_point():
        raise TypeError("pred and target must be integer label maps (take argmax of the logits first)")
    return pred.long(), target.long()


def dilation_pixels(height: int, width: int, dilation: float | int = 0.02) -> int:
    """Band width d in pixels: a float < 1 is a ratio of the diagonal, an int >= 1 is pixels."""
    if isinstance(dilation, bool) or not isinstance(dilation, numbers.Real):
        raise TypeError(f"dilation must be a float ratio in (0, 1) or an int pixel count >= 1, got "
                        f"{dilation!r} ({type(dilation).__name__})")
    if not math.isfinite(dilation) or dilation <= 0:
        raise ValueError(f"dilation must be a ratio in (0, 1) or a pixel count >= 1, got {dilation!r}")
    if isinstance(dilation, float) and dilation < 1:
        return max(1, int(round(dilation * math.sqrt(height ** 2 + width ** 2))))
    if float(dilation) != int(dilation):
        raise ValueError(f"dilation >= 1 is a pixel count and must be an integer, got {dilation!r}")
    return int(dilation)


def erode(masks: torch.Tensor, d: int) -> torch.Tensor:
    """Erode binary masks [N, H, W] by a (2d+1)^2 square; outside the image counts as background."""
    inv = (~masks.bool()).float()[:, None]
    inv = F.pad(inv, (d, d, d, d), value=1.0)
    # a square structuring element is separable: dilate the complement along rows, then columns
    inv = F.max_pool2d(inv, kernel_size=(2 * d + 1, 1), stride=1)
    inv = F.max_pool2d(inv, kernel_size=(1, 2 * d + 1), stride=1)
    return inv[:, 0] < 0.5


def boundary_band(masks: torch.Tensor, d: int) -> torch.Tensor:
    """``band_d(X) = X minus erode_d(X)`` for binary masks [N, H, W] (see the module docstring)."""
    m = masks.bool()
    return m & ~erode(m, d)


class ConfusionMatrix:
    """mIoU / aAcc / mAcc from a confusion matrix summed over a dataset (see module docstring)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = _check_pair(pred, target)
        valid = target != self.ignore_index
        t, p = target[valid], pred[valid]
        if t.numel():
            if int(t.min()) < 0 or int(t.max()) >= self.num_classes:
                raise ValueError(f"target has class {int(t.max()) if int(t.max()) >= self.num_classes else int(t.min())}"
                                 f" outside 0..{self.num_classes - 1} (and it is not ignore_index={self.ignore_index})")
            if int(p.min()) < 0 or int(p.max()) >= self.num_classes:
                raise ValueError(f"pred has a class outside 0..{self.num_classes - 1}")
        k = self.num_classes
        self.mat += torch.bincount((t * k + p).cpu(), minlength=k * k).view(k, k)

    def all_reduce(self) -> None:
        """Sum the matrix over DDP ranks (in place)."""
        self.mat = all_reduce_sum(self.mat)

    def iou(self) -> torch.Tensor:
        """Per-class IoU (NaN where the union is empty)."""
        m = self.mat.double()
        inter = m.diag()
        union = m.sum(0) + m.sum(1) - inter
        return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))

    def compute(self) -> dict:
        m = self.mat.double()
        iou = self.iou()
        gt = m.sum(1)
        acc = torch.where(gt > 0, m.diag() / gt.clamp_min(1), torch.full_like(gt, float("nan")))
        return {"miou": float(iou.nanmean()) if (~iou.isnan()).any() else float("nan"),
                "aacc": float(m.diag().sum() / m.sum()) if m.sum() > 0 else float("nan"),
                "macc": float(acc.nanmean()) if (~acc.isnan()).any() else float("nan"),
                "iou_per_class": iou.tolist()}


class BoundaryIoU:
    """Per-class boundary IoU summed over a dataset (definition in the module docstring).

    Args:
        num_classes: number of classes.
        dilation: band width — float ratio of the image diagonal (< 1; default 0.02) or int pixels.
        ignore_index: label of ignored pixels.
        chunk: classes processed at once (bounds memory: ``chunk`` float maps of the image size).
    """

    def __init__(self, num_classes: int, dilation: float | int = 0.02, ignore_index: int = 255, chunk: int = 16):
        dilation_pixels(1, 1, dilation)  # validates
        self.num_classes, self.dilation, self.ignore_index, self.chunk = int(num_classes), dilation, ignore_index, chunk
        self.inter = torch.zeros(num_classes, dtype=torch.int64)
        self.union = torch.zeros(num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.inter.zero_()
        self.union.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = _check_pair(pred, target)
        for p, t in zip(pred, target):
            self._update_one(p, t)

    def _update_one(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        H, W = target.shape
        d = dilation_pixels(H, W, self.dilation)
        valid = target != self.ignore_index
        pred = torch.where(valid, pred, torch.full_like(pred, -1))
        present = torch.unique(torch.cat([target[valid], pred[valid]]))
        present = present[(present >= 0) & (present < self.num_classes)]
        for start in range(0, len(present), self.chunk):
            cls = present[start:start + self.chunk]
            g = boundary_band(target[None] == cls[:, None, None], d)
            q = boundary_band(pred[None] == cls[:, None, None], d)
            inter = (g & q).flatten(1).sum(1)
            union = (g | q).flatten(1).sum(1)
            self.inter.index_add_(0, cls.cpu(), inter.cpu())
            self.union.index_add_(0, cls.cpu(), union.cpu())

    def all_reduce(self) -> None:
        self.inter = all_reduce_sum(self.inter)
        self.union = all_reduce_sum(self.union)

    def per_class(self) -> torch.Tensor:
        i, u = self.inter.double(), self.union.double()
        return torch.where(u > 0, i / u.clamp_min(1), torch.full_like(i, float("nan")))

    def compute(self) -> dict:
        b = self.per_class()
        return {"biou": float(b.nanmean()) if (~b.isnan()).any() else float("nan"), "biou_per_class": b.tolist()}


class SegmentationMetric:
    """mIoU + boundary IoU together: ``update(pred, target)`` per batch, ``all_reduce()`` once
    under DDP, then ``compute()`` -> ``{"miou", "aacc", "macc", "biou", "iou_per_class",
    "biou_per_class"}`` (fractions in [0, 1])."""

    def __init__(self, num_classes: int, ignore_index: int = 255, boundary: bool = True,
                 dilation: float | int = 0.02):
        self.confusion = ConfusionMatrix(num_classes, ignore_index)
        self.boundary = BoundaryIoU(num_classes, dilation, ignore_index) if boundary else None

    def reset(self) -> None:
        self.confusion.reset()
        if self.boundary is not None:
            self.boundary.reset()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.confusion.update(pred, target)
        if self.boundary is not None:
            self.boundary.update(pred, target)

    def all_reduce(self) -> None:
        self.confusion.all_reduce()
        if self.boundary is not None:
            self.boundary.all_reduce()

    def compute(self) -> dict:
        out = self.confusion.compute()
        if self.boundary is not None:
            out.update(self.boundary.compute())
        return out

    def state_dict(self) -> dict:
        s = {"confusion": self.confusion.mat.clone()}
        if self.boundary is not None:
            s.update(boundary_inter=self.boundary.inter.clone(), boundary_union=self.boundary.union.clone())
        return s
