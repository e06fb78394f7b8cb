"""Reference (pure PyTorch) deformable ops of SAPA-D: a literal transcription of docs/SEMANTICS.md §2.4.

Point p of group g at high-res (i, j) samples low-res position (i//s + dy, j//s + dx), integer
coordinates being pixel centres, with grid_sample(bilinear, zeros, align_corners=False) at the
normalised coordinate (i//s + 0.5 + dy) / H * 2 - 1 (same for x with W). Offset channel
2*(g*P + p) is dx, 2*(g*P + p) + 1 is dy. Logits have no temperature; a fully outside point gives
key 0, logit 0 (still in the softmax) and value 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...backends import register_impl
from .._common import upcast


def _grid(offset: torch.Tensor, H: int, W: int, P: int, G: int, s: int) -> torch.Tensor:
    """offset [B, 2GP, H', W'] -> grid_sample grid [B*G, P*H', W', 2] (x, y normalised)."""
    B, _, Hq, Wq = offset.shape
    off = offset.view(B, G, P, 2, Hq, Wq)
    base_y = torch.div(torch.arange(Hq, device=offset.device), s, rounding_mode="floor").to(offset.dtype)
    base_x = torch.div(torch.arange(Wq, device=offset.device), s, rounding_mode="floor").to(offset.dtype)
    gx = (base_x.view(1, 1, 1, 1, Wq) + 0.5 + off[:, :, :, 0]) / W * 2 - 1
    gy = (base_y.view(1, 1, 1, Hq, 1) + 0.5 + off[:, :, :, 1]) / H * 2 - 1
    grid = torch.stack((gx, gy), dim=-1)  # [B, G, P, H', W', 2]
    return grid.reshape(B * G, P * Hq, Wq, 2)


def _sample(x: torch.Tensor, grid: torch.Tensor, G: int, P: int, Hq: int, Wq: int) -> torch.Tensor:
    """x [B, G*c, H, W] sampled per group -> [B, G, c, P, H', W']."""
    B, Cx, H, W = x.shape
    c = Cx // G
    if B == 0:
        return x.new_zeros(B, G, c, P, Hq, Wq)
    out = F.grid_sample(x.reshape(B * G, c, H, W), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out.view(B, G, c, P, Hq, Wq)


@register_impl("deform_similarity", "reference")
def deform_similarity(q, k, offset, num_points, groups, scale_factor):
    dtype = q.dtype
    q, k, offset = upcast(q, k, offset)
    B, Cq, Hq, Wq = q.shape
    H, W = k.shape[-2:]
    G, P = groups, num_points
    ks = _sample(k, _grid(offset, H, W, P, G, scale_factor), G, P, Hq, Wq)
    logits = (q.view(B, G, Cq // G, 1, Hq, Wq) * ks).sum(2)
    return logits.to(dtype)


@register_impl("deform_reassemble", "reference")
def deform_reassemble(weights, v, offset, num_points, groups, scale_factor):
    dtype = v.dtype
    weights, v, offset = upcast(weights, v, offset)
    B, Cv, H, W = v.shape
    Hq, Wq = offset.shape[-2:]
    G, P = groups, num_points
    vs = _sample(v, _grid(offset, H, W, P, G, scale_factor), G, P, Hq, Wq)
    out = (weights.unsqueeze(2) * vs).sum(3)
    return out.reshape(B, Cv, Hq, Wq).to(dtype)


@register_impl("sapa_deform", "reference")
def sapa_deform(q, k, v, offset, num_points, groups, scale_factor):
    dtype = v.dtype
    q, k, v, offset = upcast(q, k, v, offset)
    logits = deform_similarity(q, k, offset, num_points, groups, scale_factor)
    w = torch.softmax(logits, dim=2)
    return deform_reassemble(w, v, offset, num_points, groups, scale_factor).to(dtype)
