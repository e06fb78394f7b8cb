"""Synthetic datasets and the resumable / sharded samplers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from sapa.data import ResumableSampler, ShardSampler, SyntheticDetection, SyntheticSegmentation, render_scene
from sapa.data.synthetic import SYNTHETIC_CLASSES


def test_scenes_are_a_pure_function_of_seed_split_index():
    a = SyntheticSegmentation(8, 64, seed=3, split="train", cache=False)
    b = SyntheticSegmentation(8, 64, seed=3, split="train", cache=True)
    for i in (0, 5, 7):
        ia, la = a.raw(i)
        ib, lb = b.raw(i)
        assert np.array_equal(ia, ib) and np.array_equal(la, lb)
    other_split = SyntheticSegmentation(8, 64, seed=3, split="val").raw(0)[1]
    other_seed = SyntheticSegmentation(8, 64, seed=4, split="train").raw(0)[1]
    assert not np.array_equal(a.raw(0)[1], other_split)
    assert not np.array_equal(a.raw(0)[1], other_seed)


def test_labels_are_pixel_exact_rasterisations_and_cover_every_class():
    ds = SyntheticSegmentation(64, 64, seed=0)
    counts = np.zeros(len(SYNTHETIC_CLASSES), dtype=np.int64)
    for i in range(len(ds)):
        img, lab = ds.raw(i)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert lab.shape == (64, 64) and lab.max() < len(SYNTHETIC_CLASSES)
        counts += np.bincount(lab.ravel(), minlength=len(SYNTHETIC_CLASSES))
    assert (counts > 0).all(), counts
    # the label is the exact mask used for painting: a visible instance mask equals its label region
    img, lab, inst = render_scene(0, "train", 1, 64)
    union = np.zeros_like(lab, dtype=bool)
    for cls, m in inst:
        assert (lab[m] == cls).all()
        union |= m
    assert np.array_equal(union, lab > 0)


def test_thin_structures_are_thin():
    # rings and bars are 2-4 px thick: eroding their mask by a 5x5 square leaves (almost) nothing
    from sapa.metrics import erode
    thin = 0
    for i in range(40):
        _, lab, inst = render_scene(0, "train", i, 64)
        for cls, m in inst:
            if cls in (4, 5) and m.sum() > 20:
                left = erode(torch.from_numpy(m)[None], 2)[0].sum().item()
                assert left <= 0.05 * m.sum(), (i, cls, left, m.sum())
                thin += 1
    assert thin >= 10


def test_item_format_and_flip_from_aug_seed():
    ds = SyntheticSegmentation(4, 32, seed=0, split="train")
    s = ds[1]
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    assert s["label"].shape == (32, 32) and s["label"].dtype == torch.int64
    flips = []
    for seed in range(20):
        t = ds[(1, (0, 0, seed))]
        if torch.equal(t["label"], s["label"].flip(-1)) and not torch.equal(t["label"], s["label"]):
            flips.append(seed)
            assert torch.allclose(t["image"], s["image"].flip(-1))
        else:
            assert torch.equal(t["label"], s["label"])
    assert 3 <= len(flips) <= 17
    assert torch.equal(ds[(1, (0, 0, 5))]["label"], ds[(1, (0, 0, 5))]["label"])
    val = SyntheticSegmentation(4, 32, seed=0, split="val")
    assert all(torch.equal(val[(2, (0, 0, k))]["label"], val[2]["label"]) for k in range(10))


def test_detection_boxes_enclose_their_shapes():
    ds = SyntheticDetection(16, 64, seed=0, split="train")
    seg = SyntheticSegmentation(16, 64, seed=0, split="train")
    n_boxes = 0
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
        lab = seg.raw(i)[1]
        for (x1, y1, x2, y2), c in zip(t["boxes"].tolist(), t["labels"].tolist()):
            assert 1 <= c < len(SYNTHETIC_CLASSES)
            inside = lab[int(y1):int(y2), int(x1):int(x2)] == c
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            n_boxes += 1
        assert torch.allclose(t["area"], (t["boxes"][:, 2] - t["boxes"][:, 0]) * (t["boxes"][:, 3] - t["boxes"][:, 1]))
    assert n_boxes > 30
    # flipped sample: boxes mirror with the image
    base_img, base = ds[0]
    for k in range(20):
        img, t = ds[(0, (0, 0, k))]
        if not torch.equal(img, base_img):
            assert torch.equal(img, base_img.flip(-1))
            assert torch.allclose(t["boxes"][:, [0, 2]], 64 - base["boxes"][:, [2, 0]])
            break
    else:
        pytest.fail("no flip in 20 seeds")


@pytest.mark.parametrize("n,world", [(10, 1), (10, 3), (7, 2), (16, 4)])
def test_resumable_sampler_partitions_like_distributed_sampler(n, world):
    for epoch in (0, 3):
        for rank in range(world):
            ref = DistributedSampler(list(range(n)), num_replicas=world, rank=rank, shuffle=True, seed=11)
            ref.set_epoch(epoch)
            ours = ResumableSampler(n, seed=11, rank=rank, world_size=world)
            ours.set_epoch(epoch)
            assert [i for i, _ in ours] == list(ref)
            assert len(ours) == len(ref)


def test_resumable_sampler_skips_and_keeps_aug_seeds():
    s = ResumableSampler(12, seed=1, rank=1, world_size=2)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=4)
    assert list(s) == full[4:] and len(s) == len(full) - 4
    assert len({seed for _, seed in full}) == len(full)


def test_shard_sampler_covers_each_index_once():
    n, world = 11, 3
    seen = sorted(i for r in range(world) for i in ShardSampler(n, r, world))
    assert seen == list(range(n))
