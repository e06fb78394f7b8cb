"""Build models, datasets and optimizers from a :class:`~sapa.engine.config.Config`."""
from __future__ import annotations

import importlib
import os

import torch
from torch import nn

from .config import Config


def _import(module: str, name: str):
    try:
        mod = importlib.import_module(module)
        return getattr(mod, name)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"model needs {module}.{name}, which is not available: {err}") from err


def dataset_num_classes(cfg: Config) -> int:
    ds = cfg.data.dataset
    if ds in ("synthetic", "synthetic_det"):
        from ..data import SYNTHETIC_CLASSES
        return len(SYNTHETIC_CLASSES)
    if ds == "ade20k":
        return 150
    if ds == "coco":
        return 81
    raise ValueError(f"unknown dataset {ds!r}; valid: synthetic, synthetic_det, ade20k, coco")


def build_model(cfg: Config, num_classes: int | None = None) -> nn.Module:
    """The host network of ``cfg.model`` (segmentation models return logits; detection models are
    torchvision-style: ``model(images, targets)`` -> loss dict in train mode, detections in eval)."""
    m = cfg.model
    nc = dataset_num_classes(cfg) if num_classes is None else num_classes
    up = dict(type=m.upsampler, **m.upsampler_kwargs) if m.upsampler_kwargs else m.upsampler
    if m.name == "tiny_segformer":
        from .tiny import TinySegmenter
        return TinySegmenter(nc, up, widths=m.widths, embed_dim=m.embed_dim, dropout=m.dropout)
    if m.name == "tiny_faster_rcnn":
        from .tiny import tiny_faster_rcnn
        return tiny_faster_rcnn(nc, up, widths=m.widths, channels=m.embed_dim, image_size=cfg.data.image_size)
    if m.name == "segformer_b1":
        fn = _import("sapa.models.segformer", "segformer_b1")
        return fn(num_classes=nc, upsampler=up, pretrained=m.pretrained)
    if m.name == "upernet_r50":
        fn = _import("sapa.models.upernet", "upernet_r50")
        return fn(num_classes=nc, upsampler=up, pretrained=m.pretrained)
    if m.name == "faster_rcnn_r50":
        fn = _import("sapa.models.faster_rcnn", "faster_rcnn_r50")
        return fn(num_classes=nc, upsampler=up, pretrained=m.pretrained)
    raise ValueError(f"unknown model {m.name!r}; valid: tiny_segformer, tiny_faster_rcnn, segformer_b1, "
                     f"upernet_r50, faster_rcnn_r50")


def build_dataset(cfg: Config, split: str):
    """``split``: 'train' or 'val'."""
    d = cfg.data
    train = split == "train"
    if d.dataset == "synthetic":
        from ..data import SyntheticSegmentation
        return SyntheticSegmentation(d.train_samples if train else d.val_samples, d.image_size, d.seed, split)
    if d.dataset == "synthetic_det":
        from ..data import SyntheticDetection
        return SyntheticDetection(d.train_samples if train else d.val_samples, d.image_size, d.seed, split)
    if d.root is None:
        raise ValueError(f"data.root must point at the {d.dataset} folder (e.g. --set data.root=/path)")
    if d.dataset == "ade20k":
        from ..data import ADE20K, SegTrainPipeline
        pipeline = SegTrainPipeline(crop_size=(d.crop_size, d.crop_size)) if train else "eval"
        return ADE20K(d.root, "train" if train else "val", pipeline=pipeline)
    if d.dataset == "coco":
        from ..data import COCODetection
        name = "train2017" if train else "val2017"
        return COCODetection(os.path.join(d.root, name), os.path.join(d.root, "annotations", f"instances_{name}.json"),
                             train=train)
    raise ValueError(f"unknown dataset {d.dataset!r}; valid: synthetic, synthetic_det, ade20k, coco")


def param_groups(cfg: Config, model: nn.Module) -> list[dict]:
    """Split parameters by (head?, decay?) as mmseg's ``paramwise_cfg.custom_keys`` (substring match
    on the parameter name): lr x ``head_lr_mult`` for ``head_keys``, weight decay 0 for ``no_decay_keys``."""
    o = cfg.optim
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = any(k in name for k in o.head_keys)
        no_decay = any(k in name for k in o.no_decay_keys)
        groups.setdefault((is_head, no_decay), []).append(p)
    out = []
    for (is_head, no_decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": o.lr * (o.head_lr_mult if is_head else 1.0),
                    "weight_decay": 0.0 if no_decay else o.weight_decay})
    return out


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(cfg, model)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    raise ValueError(f"unknown optimizer {o.name!r}; valid: adamw, sgd")
