"""mIoU and boundary IoU against hand-computed answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sapa.metrics import BoundaryIoU, ConfusionMatrix, SegmentationMetric, boundary_band, dilation_pixels, erode


def test_confusion_matrix_by_hand():
    target = torch.tensor([[0, 0, 1, 1],
                           [0, 2, 2, 255],
                           [1, 1, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [0, 2, 1, 0],
                         [1, 2, 2, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    # rows = ground truth, columns = prediction; the two ignored pixels are not counted
    #   gt 0: pred 0 at (0,0) (1,0), pred 1 at (0,1)
    #   gt 1: pred 1 at (0,2) (0,3) (2,0), pred 2 at (2,1)
    #   gt 2: pred 2 at (1,1) (2,2), pred 1 at (1,2)
    expect = torch.tensor([[2, 1, 0],
                           [0, 3, 1],
                           [0, 1, 2]])
    assert torch.equal(cm.mat, expect)
    out = cm.compute()
    # IoU_c = M[c,c] / (row_c + col_c - M[c,c]); rows 3, 4, 3; columns 2, 5, 3
    iou = [2 / (3 + 2 - 2), 3 / (4 + 5 - 3), 2 / (3 + 3 - 2)]
    assert out["iou_per_class"] == pytest.approx(iou)
    assert out["miou"] == pytest.approx(sum(iou) / 3)
    assert out["aacc"] == pytest.approx(7 / 10)
    assert out["macc"] == pytest.approx((2 / 3 + 3 / 4 + 2 / 3) / 3)


def test_confusion_accumulates_over_images_and_skips_absent_classes():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([[0, 0]]), torch.tensor([[0, 0]]))
    cm.update(torch.tensor([[1, 0]]), torch.tensor([[1, 1]]))
    out = cm.compute()
    # class 0: inter 2, union 2 + 1 = 3; class 1: inter 1, union 2; classes 2, 3 absent -> NaN, skipped
    assert out["iou_per_class"][:2] == pytest.approx([2 / 3, 1 / 2])
    assert all(math.isnan(v) for v in out["iou_per_class"][2:])
    assert out["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_confusion_rejects_out_of_range_and_float():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([[0]]), torch.tensor([[7]]))
    with pytest.raises(TypeError):
        cm.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="same shape"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


def _naive_erode(mask: np.ndarray, d: int) -> np.ndarray:
    """Oracle: keep a pixel iff every pixel within Chebyshev distance d is inside the image and the mask."""
    H, W = mask.shape
    out = np.zeros_like(mask)
    for i in range(H):
        for j in range(W):
            if i - d < 0 or j - d < 0 or i + d >= H or j + d >= W:
                continue
            out[i, j] = mask[i - d:i + d + 1, j - d:j + d + 1].all()
    return out


@pytest.mark.parametrize("d", [1, 2, 3])
def test_erode_matches_loop_oracle(d):
    rng = np.random.default_rng(d)
    masks = rng.random((3, 13, 17)) < 0.8
    ours = erode(torch.from_numpy(masks), d).numpy()
    for m, o in zip(masks, ours):
        assert np.array_equal(o, _naive_erode(m, d))


def test_boundary_band_of_a_square():
    m = torch.zeros(1, 40, 40, dtype=torch.bool)
    m[0, 10:20, 10:20] = True
    assert boundary_band(m, 1).sum() == 36          # 10x10 minus the 8x8 interior
    assert boundary_band(m, 2).sum() == 100 - 36    # 10x10 minus the 6x6 interior
    full = torch.ones(1, 8, 8, dtype=torch.bool)
    assert boundary_band(full, 1).sum() == 64 - 36  # the image border counts as boundary


def test_boundary_iou_shifted_square_by_hand():
    gt = torch.zeros(40, 40, dtype=torch.long)
    gt[10:20, 10:20] = 1
    pred = torch.zeros_like(gt)
    pred[10:20, 11:21] = 1  # shifted right by one pixel
    m = BoundaryIoU(2, dilation=1)
    m.update(pred, gt)
    # class 1, d = 1: both bands are 1-px rings of 36 pixels. They share the top and bottom rows over
    # columns 11..19 (9 + 9 = 18 pixels); the left/right columns never coincide. IoU = 18 / (72 - 18).
    assert int(m.inter[1]) == 18 and int(m.union[1]) == 54
    assert m.per_class()[1].item() == pytest.approx(1 / 3)
    # mask IoU of the same pair is much higher: 90 / 110
    cm = ConfusionMatrix(2)
    cm.update(pred, gt)
    assert cm.iou()[1].item() == pytest.approx(90 / 110)


def test_boundary_iou_thin_line_by_hand():
    L = 20
    gt = torch.zeros(30, 40, dtype=torch.long)
    gt[15, 10:10 + L] = 1                       # a 1-px line: its band is the whole line
    pred = torch.zeros_like(gt)
    pred[14:17, 10:10 + L] = 1                  # a 3-px bar over it
    m = BoundaryIoU(2, dilation=1)
    m.update(pred, gt)
    # pred band = 3L minus its erosion (the middle row without its two end pixels: L - 2) = 2L + 2;
    # only the two end pixels of the middle row are in both bands: IoU = 2 / (L + 2L + 2 - 2) = 2 / (3L)
    assert int(m.inter[1]) == 2 and int(m.union[1]) == 3 * L
    assert m.per_class()[1].item() == pytest.approx(2 / (3 * L))
    same = BoundaryIoU(2, dilation=1)
    same.update(gt, gt)
    assert same.per_class()[1].item() == 1.0
    off = BoundaryIoU(2, dilation=1)
    off.update(torch.roll(gt, 2, 0), gt)     # a thin line two pixels off: no boundary overlap at all
    assert off.per_class()[1].item() == 0.0


def test_ignored_pixels_never_count():
    gt = torch.zeros(20, 20, dtype=torch.long)
    gt[5:15, 5:15] = 1
    gt[:, 18:] = 255
    pred = gt.clone()
    pred[:, 18:] = 1  # whatever is predicted on ignored pixels is irrelevant
    m = SegmentationMetric(2, dilation=1)
    m.update(pred, gt)
    out = m.compute()
    assert out["miou"] == 1.0 and out["biou"] == 1.0


def test_dilation_ratio_and_pixels():
    assert dilation_pixels(64, 64) == 2          # round(0.02 * 90.5)
    assert dilation_pixels(512, 512) == 14       # round(0.02 * 724.1)
    assert dilation_pixels(10, 10) == 1          # never below one pixel
    assert dilation_pixels(512, 512, 3) == 3
    with pytest.raises(ValueError):
        dilation_pixels(10, 10, 0)
    with pytest.raises(ValueError):
        dilation_pixels(10, 10, 2.5)
    # ratio default: a 64x64 shifted-square pair uses d = 2
    gt = torch.zeros(64, 64, dtype=torch.long)
    gt[20:40, 20:40] = 1
    a, b = BoundaryIoU(2), BoundaryIoU(2, dilation=2)
    a.update(torch.roll(gt, 1, 1), gt)
    b.update(torch.roll(gt, 1, 1), gt)
    assert torch.equal(a.inter, b.inter) and torch.equal(a.union, b.union)


def test_boundary_accumulates_counts_over_images_not_mean_of_ratios():
    gt1 = torch.zeros(40, 40, dtype=torch.long)
    gt1[10:20, 10:20] = 1
    p1 = torch.roll(gt1, 1, 1)
    gt2 = gt1.clone()
    m = BoundaryIoU(2, dilation=1)
    m.update(torch.stack([p1, gt2]), torch.stack([gt1, gt2]))
    # image 1: 18 / 54; image 2: 36 / 36 -> (18 + 36) / (54 + 36)
    assert m.per_class()[1].item() == pytest.approx(54 / 90)


def test_chunking_does_not_change_counts():
    rng = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 7, (2, 24, 24), generator=rng)
    pred = torch.randint(0, 7, (2, 24, 24), generator=rng)
    a, b = BoundaryIoU(7, chunk=2), BoundaryIoU(7, chunk=16)
    a.update(pred, gt)
    b.update(pred, gt)
    assert torch.equal(a.inter, b.inter) and torch.equal(a.union, b.union)
