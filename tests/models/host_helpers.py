"""Helpers shared by the host-network tests: a recording upsampler (never registered, passed as a
class) and the gradient check every host test applies to its upsamplers."""
from __future__ import annotations

import itertools

import torch
from torch import nn

from sapa.registry import Upsampler

_clock = itertools.count()


class Recorder(Upsampler):
    """Guided upsampler that logs every call: ``calls`` holds ``(tick, x, guide, out)`` (detached
    copies; ``tick`` orders calls across all instances). Output: ``w * nearest(x) + 0.5 * guide``,
    so a swapped guide would also change everything downstream."""

    needs_guide = True

    def __init__(self, in_channels, *, guide_channels=None, scale_factor=2):
        super().__init__(in_channels, guide_channels=guide_channels, scale_factor=scale_factor)
        self.w = nn.Parameter(torch.ones(()))
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x, guide=None):
        H, W = self.output_size(x, guide)
        s = self.scale_factor
        up = x.repeat_interleave(s, -2).repeat_interleave(s, -1)[..., :H, :W]
        out = self.w * up + 0.5 * guide
        self.calls.append((next(_clock), x.detach().clone(), guide.detach().clone(), out.detach().clone()))
        return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-6)


def check_upsampler_grads(ups: nn.Module, name: str) -> None:
    """Every parameter of every upsampler got a finite gradient, and some of it is non-zero."""
    params = [(n, p) for n, p in ups.named_parameters() if p.requires_grad]
    for n, p in params:
        assert p.grad is not None, f"{name}: no gradient reached upsampler parameter {n}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {n}"
    if params:
        assert any(p.grad.abs().sum() > 0 for _, p in params), f"{name}: all upsampler gradients are zero"


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
