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
