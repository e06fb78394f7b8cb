"""Small helpers shared by the op folders (private)."""
from __future__ import annotations

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is accumulated in float32; float32/float64 as they are."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def upcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(compute_dtype(t.dtype)) for t in tensors]
