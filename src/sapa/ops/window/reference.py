"""Reference (pure PyTorch) window ops: a literal transcription of docs/SEMANTICS.md §1.

unfold k / v at low resolution with zero padding K//2 -> [B, C, K*K, H, W]; view the high-res tensor
as [B, C, H, s, W, s]; contract. Out-of-range window positions are zero keys (logit exactly 0, which
still enters the softmax) and zero values. Guides smaller than s*H (ceil mode) are zero-padded to
s*H, computed, and cropped: every output pixel is independent, so this is exact.

Memory: materialises the unfolded [B, C, K*K, H, W] tensor; this is the slow, simple baseline that
the fused backends are checked and benchmarked against. Works on any device and float dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...backends import register_impl
from .._common import upcast


def _unfold(x: torch.Tensor, K: int) -> torch.Tensor:
    B, C, H, W = x.shape
    if B == 0 or C == 0:
        return x.new_zeros(B, C, K * K, H, W)
    return F.unfold(x, K, padding=K // 2).view(B, C, K * K, H, W)


def _to_blocks(t: torch.Tensor, H: int, W: int, s: int) -> torch.Tensor:
    """[B, C, H', W'] (H' <= s*H) -> zero-padded [B, C, H, s, W, s]."""
    B, Cc, Hq, Wq = t.shape
    t = F.pad(t, (0, s * W - Wq, 0, s * H - Hq))
    return t.reshape(B, Cc, H, s, W, s)


@register_impl("window_similarity", "reference")
def window_similarity(q, k, kernel_size, scale_factor):
    dtype = q.dtype
    q, k = upcast(q, k)
    B, _, Hq, Wq = q.shape
    H, W = k.shape[-2:]
    K, s = kernel_size, scale_factor
    ku = _unfold(k, K)
    qb = _to_blocks(q, H, W, s)
    logits = torch.einsum("bchiwj,bcnhw->bnhiwj", qb, ku).reshape(B, K * K, s * H, s * W)
    return logits[:, :, :Hq, :Wq].to(dtype)


@register_impl("reassemble", "reference")
def reassemble(weights, v, kernel_size, scale_factor, groups):
    dtype = v.dtype
    weights, v = upcast(weights, v)
    B, Cv, H, W = v.shape
    Hq, Wq = weights.shape[-2:]
    K, s, G = kernel_size, scale_factor, groups
    vu = _unfold(v, K).view(B, G, Cv // G, K * K, H, W)
    wb = _to_blocks(weights, H, W, s).view(B, G, K * K, H, s, W, s)
    out = torch.einsum("bgnhiwj,bgcnhw->bgchiwj", wb, vu).reshape(B, Cv, s * H, s * W)
    return out[:, :, :Hq, :Wq].to(dtype)


@register_impl("sapa", "reference")
def sapa(q, k, v, kernel_size, scale_factor):
    dtype = v.dtype
    q, k, v = upcast(q, k, v)
    logits = window_similarity(q, k, kernel_size, scale_factor)
    return reassemble(torch.softmax(logits, dim=1), v, kernel_size, scale_factor, 1).to(dtype)
