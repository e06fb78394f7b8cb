"""The one config system: dataclasses, named presets, and ``key=value`` overrides.

A :class:`Config` has five sections — ``model``, ``data``, ``optim``, ``schedule``, ``train`` —
plus ``task`` (``segmentation`` | ``detection``) and the ``preset`` it started from. Presets
(:data:`PRESETS`, ``sapa train --preset NAME``):

==================  =================================================================================
``segformer-b1``    docs/SEMANTICS.md §6.1: MiT-B1 + SegFormer head on ADE20K, crop 512, batch 16, AdamW lr 6e-5,
                    betas (0.9, 0.999), wd 0.01, head lr x10, no decay on norms / pos_block, poly power
                    1.0, linear warmup 1500 iters (ratio 1e-6), 160k iters, eval every 16k.
``upernet-r50``     docs/SEMANTICS.md §6.2: ResNet-50 UPerNet on ADE20K, batch 16, SyncBN, SGD lr 0.01 momentum 0.9
                    wd 5e-4, poly power 0.9 (min lr 1e-4), 80k iters, eval every 8k.
``faster-rcnn-1x``  docs/SEMANTICS.md §6.3: Faster R-CNN R50-FPN on COCO, batch 16, SGD lr 0.02 momentum 0.9 wd 1e-4,
                    linear warmup 500 iters from 0.001, lr x0.1 at epochs 8 and 11, 12 epochs.
``synthetic``       the demo: a tiny conv encoder + SegFormer head (embed 64) on the synthetic
                    segmentation set at 64x64, AdamW lr 2e-3, poly, 600 iters x batch 8; a minute or
                    two on a CPU.
``synthetic-det``   a tiny Faster R-CNN on the synthetic detection set (smoke-size).
==================  =================================================================================

Overrides are ``section.field=value`` strings (``sapa train --set optim.lr=1e-3 --set
train.max_iters=2000``); values are parsed as Python literals (``1e-3``, ``[8, 11]``, ``None``,
``true``/``false``) and coerced to the field's type; unknown keys raise ``KeyError`` listing the
valid ones.

Batch size: ``data.batch_size`` is the **total** batch over all processes (the papers' "batch 16"),
split evenly over DDP ranks; it must be divisible by the world size.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    name: str = "tiny_segformer"
    """tiny_segformer | segformer_b1 | upernet_r50 | faster_rcnn_r50 | tiny_faster_rcnn"""
    upsampler: str = "bilinear"
    upsampler_kwargs: dict = field(default_factory=dict)
    embed_dim: int = 32
    """decoder width (SegFormer embed_dim / UPerNet & FPN channels; tiny hosts only for FPN)"""
    widths: tuple = (16, 32, 64, 128)
    """tiny encoder: channels of the 4 stages (strides 4, 8, 16, 32)"""
    dropout: float = 0.1
    pretrained: str | None = None
    """local path to encoder weights (nothing is downloaded)"""
    sync_bn: bool = False
    """convert BatchNorm to SyncBatchNorm under DDP (CUDA only; PyTorch has no CPU SyncBN)"""
    aux_weight: float = 0.4
    """weight of the auxiliary head's loss for models with ``forward_with_aux`` (UPerNet's FCN head)"""


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    """synthetic | synthetic_det | ade20k | coco"""
    root: str | None = None
    """ade20k: the ADEChallengeData2016 folder; coco: folder with train2017/, val2017/, annotations/"""
    image_size: int = 64
    """synthetic sets: image side"""
    train_samples: int = 2048
    val_samples: int = 128
    seed: int = 0
    """synthetic sets: which scenes"""
    crop_size: int = 512
    batch_size: int = 16
    """total over all processes"""
    eval_batch_size: int = 1
    """per process"""
    num_workers: int = 4


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw | sgd"""
    lr: float = 6e-5
    momentum: float = 0.9
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.01
    head_lr_mult: float = 1.0
    """lr multiplier for parameters whose name contains one of ``head_keys`` (mmseg custom_keys)"""
    head_keys: tuple = ("head",)
    no_decay_keys: tuple = ()
    """parameters whose name contains one of these get weight decay 0 (mmseg custom_keys decay_mult 0)"""
    grad_clip: float | None = None
    """max global gradient norm; None = off"""


@dataclass
class ScheduleConfig:
    policy: str = "poly"
    """poly | step | constant"""
    power: float = 1.0
    min_lr: float = 0.0
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6
    milestones: tuple = ()
    """step policy: in epochs when train.epochs is set, else in iterations"""
    gamma: float = 0.1


@dataclass
class TrainConfig:
    max_iters: int | None = 160000
    epochs: int | None = None
    """when set, max_iters = epochs x iterations per epoch (detection presets)"""
    eval_interval: int = 16000
    """iterations between evaluations (0: only at the end)"""
    ckpt_interval: int = 16000
    """iterations between checkpoints (0: none)"""
    log_interval: int = 50
    amp: bool = False
    """bf16 autocast on CPU, fp16 autocast + GradScaler on CUDA (see amp_dtype)"""
    amp_dtype: str = "auto"
    """auto | float16 (with a GradScaler) | bfloat16 (no scaler); see sapa.engine.precision"""
    seed: int = 0
    deterministic: bool = False
    best_metric: str = "miou"
    output: str | None = None
    """run folder: log.jsonl, curves.png, last.pt, best.pt (None: keep nothing on disk)"""
    progress: bool = True
    stop_at: int | None = None
    """stop after this iteration as if interrupted (checkpoint first); resume with --resume"""
    device: str = "auto"
    """auto | cpu | cuda"""


@dataclass
class Config:
    preset: str = "synthetic"
    task: str = "segmentation"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        if not isinstance(d, dict):
            raise TypeError(f"a config must be a JSON object (dict) of sections, got {type(d).__name__}")
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key not in sections:
                raise KeyError(f"unknown config key {key!r}; valid: {', '.join(sections)}")
            sub = _SECTIONS.get(key)
            if sub is None:
                if not isinstance(value, str):
                    raise TypeError(f"config {key!r} must be a str, got {value!r}")
                kwargs[key] = value
            elif not isinstance(value, dict):
                raise TypeError(f"config section {key!r} must be an object (dict) of fields, got "
                                f"{type(value).__name__} {value!r}; valid fields: "
                                f"{', '.join(f.name for f in dataclasses.fields(sub))}")
            else:
                names = {f.name for f in dataclasses.fields(sub)}
                unknown = set(value) - names
                if unknown:
                    raise KeyError(f"unknown config key(s) {sorted(unknown)} in section {key!r}; valid: "
                                   f"{', '.join(sorted(names))}")
                kwargs[key] = sub(**{k: _coerce(sub, k, v) for k, v in value.items()})
        return cls(**kwargs)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
             "train": TrainConfig}


def _segformer_b1() -> Config:
    return Config(
        preset="segformer-b1", task="segmentation",
        model=ModelConfig(name="segformer_b1", embed_dim=256, dropout=0.1),
        data=DataConfig(dataset="ade20k", root="data/ade/ADEChallengeData2016", crop_size=512, batch_size=16,
                        eval_batch_size=1, num_workers=4),
        optim=OptimConfig(name="adamw", lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01, head_lr_mult=10.0,
                          no_decay_keys=("pos_block", "norm")),
        schedule=ScheduleConfig(policy="poly", power=1.0, min_lr=0.0, warmup_iters=1500, warmup_ratio=1e-6),
        train=TrainConfig(max_iters=160000, eval_interval=16000, ckpt_interval=16000, amp=True, best_metric="miou"))


def _upernet_r50() -> Config:
    return Config(
        preset="upernet-r50", task="segmentation",
        model=ModelConfig(name="upernet_r50", embed_dim=512, dropout=0.1, sync_bn=True),
        data=DataConfig(dataset="ade20k", root="data/ade/ADEChallengeData2016", crop_size=512, batch_size=16,
                        eval_batch_size=1, num_workers=4),
        optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4),
        schedule=ScheduleConfig(policy="poly", power=0.9, min_lr=1e-4),
        train=TrainConfig(max_iters=80000, eval_interval=8000, ckpt_interval=8000, amp=True, best_metric="miou"))


def _faster_rcnn_1x() -> Config:
    return Config(
        preset="faster-rcnn-1x", task="detection",
        model=ModelConfig(name="faster_rcnn_r50", embed_dim=256),
        data=DataConfig(dataset="coco", root="data/coco", batch_size=16, eval_batch_size=2, num_workers=4),
        optim=OptimConfig(name="sgd", lr=0.02, momentum=0.9, weight_decay=1e-4),
        schedule=ScheduleConfig(policy="step", milestones=(8, 11), gamma=0.1, warmup_iters=500, warmup_ratio=0.001),
        train=TrainConfig(max_iters=None, epochs=12, eval_interval=0, ckpt_interval=0, amp=True, best_metric="AP"))


def _synthetic() -> Config:
    # E = 64: with 32 channels GroupNorm(32, C) in the journal SAPA-B / CARAFE-style modules normalises
    # each channel alone over a 2x2 map at stride 32 (see sapa.engine.compare).
    return Config(
        preset="synthetic", task="segmentation",
        model=ModelConfig(name="tiny_segformer", embed_dim=64, widths=(16, 32, 64, 128), dropout=0.0),
        data=DataConfig(dataset="synthetic", image_size=64, train_samples=2048, val_samples=128, batch_size=8,
                        eval_batch_size=32, num_workers=0),
        optim=OptimConfig(name="adamw", lr=2e-3, weight_decay=0.01),
        schedule=ScheduleConfig(policy="poly", power=1.0, warmup_iters=20, warmup_ratio=0.01),
        train=TrainConfig(max_iters=600, eval_interval=200, ckpt_interval=200, log_interval=20, best_metric="miou"))


def _synthetic_det() -> Config:
    return Config(
        preset="synthetic-det", task="detection",
        model=ModelConfig(name="tiny_faster_rcnn", embed_dim=32, widths=(16, 32, 64, 128)),
        data=DataConfig(dataset="synthetic_det", image_size=64, train_samples=256, val_samples=32, batch_size=4,
                        eval_batch_size=8, num_workers=0),
        optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4),
        schedule=ScheduleConfig(policy="step", milestones=(8, 11), warmup_iters=20, warmup_ratio=0.001),
        train=TrainConfig(max_iters=None, epochs=12, eval_interval=0, ckpt_interval=0, log_interval=20,
                          best_metric="AP", progress=True))


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "segformer-b1": _segformer_b1,
    "upernet-r50": _upernet_r50,
    "faster-rcnn-1x": _faster_rcnn_1x,
    "synthetic": _synthetic,
    "synthetic-det": _synthetic_det,
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]()


def _field_type(section: type, name: str):
    hints = typing.get_type_hints(section)
    return hints[name]


def _coerce(section: type, name: str, value):
    """Coerce ``value`` to the annotated type of ``section.name`` (int/float/bool/str/tuple/dict/Optional)."""
    tp = _field_type(section, name)
    args = typing.get_args(tp)
    optional = type(None) in args
    if optional:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    origin = typing.get_origin(tp) or tp
    where = f"{section.__name__[:-6].lower()}.{name}"
    if origin is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, (bool, int)):
            return bool(value)
    elif origin is int:
        if isinstance(value, bool):
            raise TypeError(f"config {where}: expected an int, got {value!r}")
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
    elif origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif origin is str:
        return str(value)
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        return (value,)
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover
        return value
    raise TypeError(f"config {where}: expected {getattr(tp, '__name__', tp)}"
                    f"{' or None' if optional else ''}, got {value!r}")


def _parse_literal(text: str):
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """Return a copy of ``cfg`` with ``section.field=value`` overrides applied."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value, e.g. optim.lr=1e-3")
        key, text = item.split("=", 1)
        key = key.strip()
        if key in ("task", "preset"):
            setattr(cfg, key, text.strip())
            continue
        if "." not in key:
            raise KeyError(f"override key {key!r} must be section.field with section one of "
                           f"{', '.join(_SECTIONS)} (or 'task')")
        sec_name, name = key.split(".", 1)
        if sec_name not in _SECTIONS:
            raise KeyError(f"unknown config section {sec_name!r}; valid: {', '.join(_SECTIONS)}")
        section = getattr(cfg, sec_name)
        names = [f.name for f in dataclasses.fields(section)]
        if name not in names:
            raise KeyError(f"unknown config key {key!r}; valid keys in {sec_name}: {', '.join(names)}")
        setattr(section, name, _coerce(type(section), name, _parse_literal(text)))
    validate(cfg)
    return cfg


SEGMENTATION_METRICS = ("miou", "aacc", "macc", "biou")
DETECTION_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_TASK_MODELS = {"segmentation": ("tiny_segformer", "segformer_b1", "upernet_r50"),
                "detection": ("tiny_faster_rcnn", "faster_rcnn_r50")}
_TASK_DATASETS = {"segmentation": ("synthetic", "ade20k"), "detection": ("synthetic_det", "coco")}


def metric_names(task: str) -> tuple[str, ...]:
    """The scalar metrics an evaluation of ``task`` reports (valid ``train.best_metric`` values)."""
    return SEGMENTATION_METRICS if task == "segmentation" else DETECTION_METRICS


def _check(ok: bool, key: str, value, valid: str) -> None:
    if not ok:
        raise ValueError(f"config {key} must be {valid}, got {value!r}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate(cfg: Config) -> None:
    """Refuse a config that would fail later or silently do something else; each error names the key."""
    if cfg.task not in ("segmentation", "detection"):
        raise ValueError(f"config task must be 'segmentation' or 'detection', got {cfg.task!r}")
    m, d, o, sc, t = cfg.model, cfg.data, cfg.optim, cfg.schedule, cfg.train
    for key, value, table in (("model.name", m.name, _TASK_MODELS), ("data.dataset", d.dataset, _TASK_DATASETS)):
        known = [v for vs in table.values() for v in vs]
        if value in known and value not in table[cfg.task]:
            other = next(k for k, vs in table.items() if value in vs)
            raise ValueError(f"config task={cfg.task!r} does not fit {key}={value!r}, which is a {other} "
                             f"{'model' if key == 'model.name' else 'dataset'}; for task={cfg.task!r} use {key} one of "
                             f"{', '.join(table[cfg.task])} (or start from a {cfg.task} preset)")
    if t.max_iters is None and t.epochs is None:
        raise ValueError("config: set train.max_iters or train.epochs")
    if t.max_iters is not None and t.max_iters < 1:
        raise ValueError(f"config train.max_iters must be >= 1, got {t.max_iters}")
    _check(t.epochs is None or t.epochs >= 1, "train.epochs", t.epochs, "an int >= 1 or None")
    for key in ("eval_interval", "ckpt_interval", "log_interval"):
        _check(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), "an int >= 0 (0: off)")
    _check(t.stop_at is None or t.stop_at >= 0, "train.stop_at", t.stop_at, "an int >= 0 or None")
    _check(t.best_metric in metric_names(cfg.task), "train.best_metric", t.best_metric,
           f"a {cfg.task} metric: one of {', '.join(metric_names(cfg.task))}")
    if cfg.data.batch_size < 1:
        raise ValueError(f"config data.batch_size must be >= 1, got {cfg.data.batch_size}")
    _check(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "an int >= 1")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "an int >= 0")
    for key in ("image_size", "crop_size", "train_samples", "val_samples"):
        _check(getattr(d, key) >= 1, f"data.{key}", getattr(d, key), "an int >= 1")
    _check(_finite(o.lr) and o.lr > 0, "optim.lr", o.lr, "a finite float > 0")
    _check(_finite(o.momentum) and 0 <= o.momentum < 1, "optim.momentum", o.momentum, "a float in [0, 1)")
    _check(len(o.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in o.betas), "optim.betas", o.betas,
           "two floats in [0, 1), e.g. (0.9, 0.999)")
    _check(_finite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a float >= 0")
    _check(_finite(o.head_lr_mult) and o.head_lr_mult > 0, "optim.head_lr_mult", o.head_lr_mult, "a float > 0")
    _check(o.grad_clip is None or (_finite(o.grad_clip) and o.grad_clip > 0), "optim.grad_clip", o.grad_clip,
           "a float > 0 or None")
    _check(_finite(sc.power) and sc.power >= 0, "schedule.power", sc.power, "a float >= 0")
    _check(_finite(sc.min_lr) and sc.min_lr >= 0, "schedule.min_lr", sc.min_lr, "a float >= 0")
    _check(sc.warmup_iters >= 0, "schedule.warmup_iters", sc.warmup_iters, "an int >= 0")
    _check(_finite(sc.warmup_ratio) and 0 < sc.warmup_ratio <= 1, "schedule.warmup_ratio", sc.warmup_ratio,
           "a float in (0, 1]")
    _check(_finite(sc.gamma) and sc.gamma > 0, "schedule.gamma", sc.gamma, "a float > 0")
    _check(all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sc.milestones),
           "schedule.milestones", sc.milestones, "a list of ints >= 0")
    _check(_finite(m.dropout) and 0 <= m.dropout < 1, "model.dropout", m.dropout, "a float in [0, 1)")
    _check(_finite(m.aux_weight) and m.aux_weight >= 0, "model.aux_weight", m.aux_weight, "a float >= 0")
    _check(m.embed_dim >= 1, "model.embed_dim", m.embed_dim, "an int >= 1")
    if cfg.schedule.policy not in ("poly", "step", "constant"):
        raise ValueError(f"config schedule.policy must be poly, step or constant, got {cfg.schedule.policy!r}")
    if cfg.optim.name not in ("adamw", "sgd"):
        raise ValueError(f"config optim.name must be adamw or sgd, got {cfg.optim.name!r}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"config train.device must be auto, cpu or cuda, got {t.device!r}")
    from .precision import check_amp_dtype
    check_amp_dtype(t.amp_dtype)


def format_config(cfg: Config) -> str:
    """``section.field = value`` lines (what ``sapa train --print-config`` shows)."""
    lines = [f"preset = {cfg.preset!r}", f"task = {cfg.task!r}"]
    for sec in _SECTIONS:
        for k, v in dataclasses.asdict(getattr(cfg, sec)).items():
            lines.append(f"{sec}.{k} = {v!r}")
    return "\n".join(lines)
