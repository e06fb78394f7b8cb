"""Mixed precision, SyncBatchNorm and pinned-memory choices of the trainer, in one place.

``train.amp`` turns autocast on; ``train.amp_dtype`` picks its dtype:

* ``auto`` (default): float16 on CUDA (with a GradScaler), bfloat16 on CPU: what the trainer always did;
* ``float16``: float16 autocast and a GradScaler (loss scaling: fp16's 5 exponent bits underflow small
  gradients); on CPU too (torch's CPU autocast and ``GradScaler("cpu")``), slow there, but it lets a
  CPU test check the scaler's path and its checkpointed state;
* ``bfloat16``: bfloat16 autocast, no scaler (bf16 has float32's exponent range). On CUDA it needs a
  GPU with bf16 support (Ampere or newer); older GPUs are refused with the reason.

Weights, optimizer state and the loss stay float32 (autocast casts per op); the sapa ops accumulate
half-precision inputs in float32 and return the input dtype.

SyncBatchNorm (``model.sync_bn``) replaces every BatchNorm when the run is distributed on CUDA
(``torch.nn.SyncBatchNorm`` has no CPU implementation; on CPU the request is noted and ignored).
Pinned host memory for the loaders whenever the device is CUDA (the copies are then issued with
``non_blocking=True`` and overlap the previous step).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

AMP_DTYPES = ("auto", "float16", "bfloat16")


@dataclass(frozen=True)
class Precision:
    device_type: str
    dtype: torch.dtype | None  # None: autocast off
    use_scaler: bool

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self):
        """The autocast context of this setting (a null context when off)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """A GradScaler, enabled only for float16 (disabled scalers pass gradients through)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.use_scaler)


def check_amp_dtype(name) -> str:
    if name not in AMP_DTYPES:
        raise ValueError(f"config train.amp_dtype must be one of {', '.join(AMP_DTYPES)}, got {name!r}")
    return name


def resolve_precision(device: torch.device, amp: bool, amp_dtype: str = "auto",
                      bf16_supported=None) -> Precision:
    """The autocast dtype and whether to scale the loss, for ``device``.

    ``bf16_supported`` (a callable, default ``torch.cuda.is_bf16_supported``) is injectable for tests."""
    check_amp_dtype(amp_dtype)
    dev = device.type
    if not amp:
        return Precision(dev, None, False)
    if amp_dtype == "auto":
        dtype = torch.float16 if dev == "cuda" else torch.bfloat16
    else:
        dtype = getattr(torch, amp_dtype)
    if dtype == torch.bfloat16 and dev == "cuda":
        ok = (bf16_supported or torch.cuda.is_bf16_supported)()
        if not ok:
            raise ValueError("config train.amp_dtype='bfloat16': this GPU has no bfloat16 support "
                             "(compute capability 8.0 or newer needed); use train.amp_dtype=float16")
    return Precision(dev, dtype, dtype == torch.float16)


def convert_sync_bn(model: torch.nn.Module, requested: bool, info, say=print) -> torch.nn.Module:
    """``model`` with SyncBatchNorm in place of BatchNorm when ``requested`` and the run is
    distributed (``info.distributed``) on CUDA; otherwise ``model`` unchanged."""
    if not requested or not info.distributed:
        return model
    if info.device.type != "cuda":
        say("note: model.sync_bn ignored on CPU (PyTorch's SyncBatchNorm is GPU-only)")
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def pin_memory(device: torch.device) -> bool:
    """Whether the loaders pin host memory: on CUDA only (pinning without a GPU is useless and warns)."""
    return device.type == "cuda"
