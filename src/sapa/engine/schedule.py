"""Iteration-based learning-rate schedules with the mmcv formulas (docs/SEMANTICS.md §6).

* poly: ``lr = (base - min_lr) * (1 - it / max_iters) ** power + min_lr``
* step: ``lr = base * gamma ** (number of milestones <= it)`` (milestones in iterations)
* constant: ``lr = base``
* linear warmup for ``it < warmup_iters``: ``lr = regular * (1 - (1 - it / warmup_iters) * (1 - ratio))``

The lr of iteration ``it`` (0-based) is set before that iteration's optimizer step. Each param
group keeps its own base lr (``initial_lr``), so head-lr multipliers carry through. The state is
just the iteration counter.
"""
from __future__ import annotations

import bisect

from torch.optim import Optimizer


class IterLRSchedule:
    def __init__(self, optimizer: Optimizer, max_iters: int, policy: str = "poly", power: float = 1.0,
                 min_lr: float = 0.0, milestones=(), gamma: float = 0.1, warmup_iters: int = 0,
                 warmup_ratio: float = 1e-6):
        if policy not in ("poly", "step", "constant"):
            raise ValueError(f"policy must be poly, step or constant, got {policy!r}")
        self.optimizer, self.max_iters, self.policy = optimizer, int(max_iters), policy
        self.power, self.min_lr, self.gamma = power, min_lr, gamma
        self.milestones = sorted(int(m) for m in milestones)
        self.warmup_iters, self.warmup_ratio = int(warmup_iters), warmup_ratio
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.iteration = 0

    def lr_at(self, base: float, it: int) -> float:
        if self.policy == "poly":
            frac = min(it, self.max_iters) / max(self.max_iters, 1)
            lr = (base - self.min_lr) * (1 - frac) ** self.power + self.min_lr
        elif self.policy == "step":
            lr = base * self.gamma ** bisect.bisect_right(self.milestones, it)
        else:
            lr = base
        if it < self.warmup_iters:
            lr = lr * (1 - (1 - it / self.warmup_iters) * (1 - self.warmup_ratio))
        return lr

    def set_iteration(self, it: int) -> None:
        self.iteration = int(it)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(g["initial_lr"], self.iteration)

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.set_iteration(state["iteration"])
