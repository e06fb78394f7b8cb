"""Shared set-up of the deployment tests: small registry-driven cases and the error measure."""
from __future__ import annotations

import torch

import sapa
from sapa.registry import get_upsampler_class

C = 32  # GroupNorm(32, C) in SAPA-B / A2U needs a multiple of 32
# Smallest window for the window-op upsamplers keeps the ONNX graphs (K row windows, K MatMuls) small.
SMALL_KW = {"carafe": {"kernel_size": 3}, "fade": {"kernel_size": 3}, "sapa_i": {"kernel_size": 3},
            "sapa_b": {"kernel_size": 3}, "sapa_g": {"kernel_size": 3}, "sapa_d": {"num_points": 4}}


def build(name: str, train: bool = False) -> sapa.registry.Upsampler:
    up = sapa.build_upsampler(name, C, **SMALL_KW.get(name, {}))
    return up.train(train)


def inputs(name: str, B: int, H: int, W: int, ceil: int = 0, **kw) -> tuple[torch.Tensor, ...]:
    """``(x,)`` or ``(x, guide)``; ``ceil`` rows/columns fewer in the guide (ceil-mode strides)."""
    x = torch.randn(B, C, H, W, **kw)
    if not get_upsampler_class(name).needs_guide:
        return (x,)
    return x, torch.randn(B, C, 2 * H - ceil, 2 * W - ceil, **kw)


def max_rel_error(actual, expected) -> float:
    """max |a - e| / max |e| (the error relative to the output's scale)."""
    a = torch.as_tensor(actual).double()
    e = torch.as_tensor(expected).double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
