"""Training and evaluation: config presets, the trainer (DDP under torchrun), checkpoints,
evaluation, and the upsampler comparison behind ``sapa compare``.

Import-light: only torch is needed to import this package; tqdm, matplotlib, torchvision and
pycocotools are imported where they are used.
"""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import PRESETS, Config, DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig, \
    apply_overrides, format_config, get_preset
from .distributed import DistInfo, init_distributed
from .evaluate import evaluate_checkpoint, evaluate_detection, evaluate_segmentation
from .schedule import IterLRSchedule
from .trainer import Trainer

__all__ = ["Config", "ModelConfig", "DataConfig", "OptimConfig", "ScheduleConfig", "TrainConfig", "PRESETS",
           "get_preset", "apply_overrides", "format_config", "Trainer", "IterLRSchedule", "save_checkpoint",
           "load_checkpoint", "CheckpointError", "DistInfo", "init_distributed", "evaluate_segmentation", "evaluate_checkpoint",
           "evaluate_detection"]
