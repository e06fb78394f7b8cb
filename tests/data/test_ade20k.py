"""ADE20K loader on a tiny dataset written in the real layout (jpg images, png annotations)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sapa.data import ADE20K, SegEvalPipeline, SegTrainPipeline
from sapa.data.transforms import IMAGENET_MEAN, IMAGENET_STD, photometric_distortion, random_crop, rescale_size


def write_ade(root, split="training", sizes=((48, 64), (40, 30), (64, 64)), seed=0):
    rng = np.random.default_rng(seed)
    prefix = "ADE_train" if split == "training" else "ADE_val"
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    labels = []
    for i, (h, w) in enumerate(sizes):
        stem = f"{prefix}_{i + 1:08d}"
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / split / f"{stem}.jpg", quality=95)
        lab = rng.integers(0, 151, size=(h, w), dtype=np.uint8)
        Image.fromarray(lab, mode="L").save(root / "annotations" / split / f"{stem}.png")
        labels.append(lab)
    return labels


def test_reduce_zero_label_and_raw_loading(tmp_path):
    labels = write_ade(tmp_path)
    ds = ADE20K(tmp_path, "train", pipeline=None)
    assert len(ds) == 3 and ds.num_classes == 150
    s = ds[0]
    raw = labels[0]
    expect = raw.astype(np.int16) - 1
    expect[expect < 0] = 255
    assert np.array_equal(s["label"], expect.astype(np.uint8))
    assert s["image"].shape == (48, 64, 3)
    keep = ADE20K(tmp_path, "train", pipeline=None, reduce_zero_label=False)
    assert np.array_equal(keep[0]["label"], raw)


def test_train_pipeline_shapes_padding_and_determinism(tmp_path):
    write_ade(tmp_path)
    pipe = SegTrainPipeline(img_scale=(128, 32), crop_size=(40, 40))
    ds = ADE20K(tmp_path, "train", pipeline=pipe)
    a, b = ds[(1, (0, 0, 7))], ds[(1, (0, 0, 7))]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert a["image"].shape == (3, 40, 40) and a["label"].shape == (40, 40)
    # the 30x40 image at ratio <= 2.0 of scale (128, 32) is at most 64x85 -> often smaller than the
    # crop in one side: padding shows up as label 255 and image 0
    found_pad = False
    for k in range(30):
        s = ds[(1, (0, 0, k))]
        pad = s["label"] == 255
        if pad[-1].all():
            assert (s["image"][:, -1] == 0).all()
            found_pad = True
    assert found_pad
    vals = torch.cat([ds[(0, (0, 0, k))]["label"].flatten() for k in range(5)])
    assert set(vals.unique().tolist()) <= set(range(150)) | {255}


def test_eval_pipeline_keeps_ratio_and_full_size_label(tmp_path):
    write_ade(tmp_path, "validation", sizes=((480, 640),))
    ds = ADE20K(tmp_path, "val")
    s = ds[0]
    # rescale to fit (2048, 512): factor min(2048/640, 512/480) -> 512 x 683 -> size divisor 32: 512 x 704
    assert s["image"].shape == (3, 512, 704)
    assert s["label"].shape == (480, 640)
    assert SegEvalPipeline(size_divisor=None)(np.zeros((480, 640, 3), np.uint8),
                                              np.zeros((480, 640), np.uint8))[0].shape == (3, 512, 683)


def test_rescale_size_hand_values():
    assert rescale_size(480, 640, (2048, 512)) == (512, 683)
    assert rescale_size(300, 3000, (2048, 512)) == (205, 2048)  # long-edge bound: 2048/3000 * 300 = 204.8
    assert rescale_size(512, 512, (1024, 256)) == (256, 256)


def test_random_crop_respects_cat_max_ratio():
    label = np.zeros((100, 100), np.uint8)
    label[:, 90:] = 1  # only crops touching the right stripe have two classes
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(50):
        _, lab = random_crop(np.zeros((100, 100, 3), np.float32), label, (20, 20), rng, cat_max_ratio=0.75)
        vals, counts = np.unique(lab, return_counts=True)
        hits += len(vals) > 1 and counts.max() / counts.sum() < 0.75
    plain = sum(len(np.unique(random_crop(np.zeros((100, 100, 3), np.float32), label, (20, 20), rng, 1.0)[1])) > 1
                for _ in range(50))
    assert hits > plain  # the retry loop finds mixed crops far more often than chance


def test_photometric_distortion_range_and_seed():
    img = np.random.default_rng(0).uniform(0, 255, (16, 16, 3)).astype(np.float32)
    a = photometric_distortion(img, np.random.default_rng(3))
    b = photometric_distortion(img, np.random.default_rng(3))
    assert np.array_equal(a, b) and a.shape == img.shape
    assert a.min() >= 0 and a.max() <= 255
    assert any(not np.allclose(photometric_distortion(img, np.random.default_rng(s)), img) for s in range(5))


def test_normalisation_constants():
    ds_img = SegEvalPipeline(size_divisor=None)(np.full((8, 8, 3), 128, np.uint8), np.zeros((8, 8), np.uint8))[0]
    assert torch.allclose(ds_img[:, 0, 0], (128 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))


def test_missing_annotation_names_the_file(tmp_path):
    write_ade(tmp_path)
    victim = tmp_path / "annotations" / "training" / "ADE_train_00000002.png"
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="ADE_train_00000002.png"):
        ADE20K(tmp_path, "train")


def test_annotation_without_image_names_the_file(tmp_path):
    write_ade(tmp_path)
    (tmp_path / "images" / "training" / "ADE_train_00000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_train_00000003"):
        ADE20K(tmp_path, "train")


def test_missing_folder_names_it(tmp_path):
    write_ade(tmp_path)
    with pytest.raises(FileNotFoundError, match="validation"):
        ADE20K(tmp_path, "val")


def test_size_mismatch_names_both_files(tmp_path):
    write_ade(tmp_path)
    p = tmp_path / "annotations" / "training" / "ADE_train_00000001.png"
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(p)
    ds = ADE20K(tmp_path, "train")
    with pytest.raises(ValueError, match=r"ADE_train_00000001\.jpg.*ADE_train_00000001\.png"):
        ds[0]


def test_bad_label_value_and_rgb_annotation_name_the_file(tmp_path):
    write_ade(tmp_path)
    p = tmp_path / "annotations" / "training" / "ADE_train_00000001.png"
    Image.fromarray(np.full((48, 64), 200, np.uint8), mode="L").save(p)
    with pytest.raises(ValueError, match=r"ADE_train_00000001\.png.*200"):
        ADE20K(tmp_path, "train")[0]
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(p)
    with pytest.raises(ValueError, match=r"ADE_train_00000001\.png.*single-channel"):
        ADE20K(tmp_path, "train")[0]


def test_unreadable_image_names_the_file(tmp_path):
    write_ade(tmp_path)
    (tmp_path / "images" / "training" / "ADE_train_00000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="ADE_train_00000001.jpg"):
        ADE20K(tmp_path, "train")[0]
