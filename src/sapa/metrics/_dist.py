"""Small torch.distributed helpers used by the metric states (no-ops without a process group)."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks (returns a new tensor; integer counts stay exact)."""
    if not is_distributed():
        return t.clone()
    out = t.clone()
    if dist.get_backend() == "nccl" and not out.is_cuda:
        out = out.cuda()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def all_gather_objects(obj: Any) -> list:
    """One entry per rank (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
