"""Shared set-up of the fault-injection suite: everything is enumerated from the registry, the
backend table and the loaders, so a new upsampler / backend / host is covered without new tests."""
from __future__ import annotations

import torch

import sapa
from sapa.registry import get_upsampler_class

# A tiny synthetic training run (seconds on one thread), as the engine tests use.
TINY = ["data.image_size=32", "data.train_samples=12", "data.val_samples=8", "data.batch_size=4",
        "data.eval_batch_size=4", "data.num_workers=0", "model.widths=(8, 8, 16, 16)", "model.embed_dim=32",
        "model.dropout=0.0", "train.max_iters=6", "train.progress=False", "train.log_interval=1",
        "train.eval_interval=0", "train.ckpt_interval=0", "optim.lr=0.003"]

UPSAMPLERS = sapa.list_upsamplers()
GUIDED = [n for n in UPSAMPLERS if get_upsampler_class(n).needs_guide]
C = 32  # divisible by every module's default groups (A2U's GroupNorm(32, C))


def make_upsampler(name: str, channels: int = C):
    return sapa.build_upsampler(name, channels, scale_factor=2)


def call(up, x, guide):
    return up(x, guide) if up.needs_guide else up(x, guide)


def tiny_config_factory():
    from sapa.engine import apply_overrides, get_preset

    def make(*overrides):
        return apply_overrides(get_preset("synthetic"), [*TINY, *overrides])

    return make


def quiet(*args, **kwargs):
    return None


def seeded(*shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g, dtype=dtype)


def write_ade(root, split="training", sizes=((40, 48), (32, 36), (48, 40), (36, 32)), seed=0):
    """A tiny ADE20K folder in the real layout (jpg images, single-channel png annotations 0..150)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    prefix = "ADE_train" if split == "training" else "ADE_val"
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        stem = f"{prefix}_{i + 1:08d}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / split / f"{stem}.jpg")
        Image.fromarray(rng.integers(0, 151, (h, w), dtype=np.uint8), mode="L").save(
            root / "annotations" / split / f"{stem}.png")
    return root


def coco_dict(n_images=3):
    images = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "height": 40, "width": 60} for i in range(n_images)]
    anns = [{"id": 1, "image_id": 1, "category_id": 18, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [0, 0, 5, 7], "area": 35, "iscrowd": 0},
            {"id": 3, "image_id": 3, "category_id": 3, "bbox": [30, 10, 12, 12], "area": 144, "iscrowd": 0}]
    return {"images": images, "annotations": anns, "categories": [{"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]}


def write_coco(root, data=None, split="val2017"):
    """A tiny COCO folder (jpg images + instances JSON) from ``data`` (default :func:`coco_dict`)."""
    import json

    import numpy as np
    from PIL import Image
    data = coco_dict() if data is None else data
    img_dir = root / split
    img_dir.mkdir(parents=True, exist_ok=True)
    for im in data.get("images", []):
        h, w = im.get("height", 40), im.get("width", 60)
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(img_dir / im["file_name"])
    ann = root / "annotations" / f"instances_{split}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return img_dir, ann
