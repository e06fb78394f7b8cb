"""Sharded evaluation: every rank evaluates its shard, metric states are reduced across ranks."""
from __future__ import annotations

import contextlib

import torch
from torch.utils.data import DataLoader

from ..data.samplers import ShardSampler
from ..metrics import COCOBoxEvaluator, SegmentationMetric
from .distributed import DistInfo, broadcast_object
from .precision import resolve_precision
from .tiny import resize_logits


def autocast_context(device: torch.device, enabled: bool | torch.dtype):
    """Autocast in ``enabled`` when it is a dtype (the trainer passes its ``train.amp_dtype``, so a bf16
    run also evaluates in bf16); ``True``: bf16 on CPU, fp16 on CUDA; a null context when off."""
    if enabled is False or enabled is None:
        return contextlib.nullcontext()
    if isinstance(enabled, torch.dtype):
        return torch.autocast(device.type, dtype=enabled)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _progress(iterable, enabled: bool, desc: str, total: int):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _loader(dataset, batch_size, info: DistInfo, num_workers: int, collate_fn=None):
    g = torch.Generator()
    g.manual_seed(0)
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), info.rank, info.world_size),
                      num_workers=num_workers, collate_fn=collate_fn, generator=g,
                      pin_memory=info.device.type == "cuda")


@torch.no_grad()
def evaluate_segmentation(model, dataset, info: DistInfo | None = None, batch_size: int = 1, num_workers: int = 0,
                          amp: bool | torch.dtype = False, dilation: float | int = 0.02, progress: bool = False,
                          num_classes: int | None = None) -> dict:
    """mIoU / bIoU of ``model`` (image -> logits at any stride; resized bilinearly to the label
    size) on ``dataset``, sharded over ranks and reduced (identical to a single-process run)."""
    info = info or DistInfo()
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    nc = num_classes or dataset.num_classes
    metric = SegmentationMetric(nc, ignore_index=getattr(dataset, "ignore_index", 255), dilation=dilation)
    loader = _loader(dataset, batch_size, info, num_workers)
    try:
        for batch in _progress(loader, progress and info.is_main, "eval", len(loader)):
            images = batch["image"].to(info.device, non_blocking=True)
            labels = batch["label"]
            with autocast_context(info.device, amp):
                logits = model(images)
            logits = resize_logits(logits.float(), labels.shape[-2:])
            metric.update(logits.argmax(1).cpu(), labels)
    finally:
        model.train(was_training)
    metric.all_reduce()
    return metric.compute()


@torch.no_grad()
def evaluate_detection(model, dataset, info: DistInfo | None = None, batch_size: int = 1, num_workers: int = 0,
                       amp: bool | torch.dtype = False, progress: bool = False) -> dict:
    """COCO box AP of a torchvision-style detector on ``dataset`` (COCODetection uses its JSON as
    ground truth; other datasets' targets are the ground truth), gathered over ranks."""
    from ..data.coco import detection_collate
    info = info or DistInfo()
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    coco = getattr(dataset, "coco", None)
    evaluator = COCOBoxEvaluator(coco, label_to_cat=getattr(dataset, "cat_ids", None) if coco is not None else None)
    loader = _loader(dataset, batch_size, info, num_workers, detection_collate)
    try:
        for images, targets in _progress(loader, progress and info.is_main, "eval", len(loader)):
            with autocast_context(info.device, amp):
                outputs = model([im.to(info.device) for im in images])
            outputs = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outputs]
            targets = [dict(t, size=tuple(im.shape[-2:])) for t, im in zip(targets, images)]
            evaluator.update(outputs, targets)
    finally:
        model.train(was_training)
    evaluator.gather()
    result = evaluator.compute() if info.is_main else None
    return broadcast_object(result)


def evaluate_checkpoint(path, overrides=(), info: DistInfo | None = None, dilation: float | int = 0.02,
                        progress: bool = True) -> dict:
    """Rebuild the model of a checkpoint from its config (plus ``overrides``), load its weights and
    evaluate it on the validation split (sharded over ranks under torchrun)."""
    from .builders import build_dataset, build_model, dataset_num_classes
    from .checkpoint import CheckpointError, load_checkpoint
    from .config import Config, apply_overrides

    ckpt = load_checkpoint(path)
    cfg = apply_overrides(Config.from_dict(ckpt["config"]), list(overrides))
    info = info or DistInfo()
    nc = dataset_num_classes(cfg)
    model = build_model(cfg, nc)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path}: weights do not fit the model of its config: {err}") from err
    model.to(info.device)
    ds = build_dataset(cfg, "val")
    d, t = cfg.data, cfg.train
    amp = resolve_precision(info.device, t.amp, t.amp_dtype).dtype or False
    if cfg.task == "segmentation":
        return evaluate_segmentation(model, ds, info, d.eval_batch_size, d.num_workers, amp, dilation,
                                     progress, num_classes=nc)
    return evaluate_detection(model, ds, info, d.eval_batch_size, d.num_workers, amp, progress)
