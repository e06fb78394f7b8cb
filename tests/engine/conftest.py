"""Tiny training configurations for the engine tests (seconds on one CPU thread)."""
from __future__ import annotations

import pytest

TINY = ["data.image_size=32", "data.train_samples=12", "data.val_samples=8", "data.batch_size=4",
        "data.eval_batch_size=4", "data.num_workers=0", "model.widths=(8, 8, 16, 16)", "model.embed_dim=32",
        "model.dropout=0.1", "train.max_iters=6", "train.progress=False", "train.log_interval=1",
        "train.eval_interval=0", "train.ckpt_interval=0", "optim.lr=0.003"]


@pytest.fixture
def tiny_config():
    """``tiny_config(*overrides)`` -> a Config of the synthetic preset shrunk to seconds."""
    from sapa.engine import apply_overrides, get_preset

    def make(*overrides):
        return apply_overrides(get_preset("synthetic"), [*TINY, *overrides])

    return make


@pytest.fixture
def tiny_overrides():
    return list(TINY)


@pytest.fixture
def quiet():
    return lambda *args, **kwargs: None
