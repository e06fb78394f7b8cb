"""A2U: affinity-aware upsampling (Dai et al., CVPR 2021), the kernel generator the papers used.

Source read: ``tiny-smart/detection-with-upsamplers`` ``mmdet/models/upsamplers/a2u.py``
(``A2UUp`` / ``InterChannelUp``, hard-wired to up kernel 3, encoding kernel 6, rank d = 1, shared
U/V, group 1); the same module is printed in the A2U SegFormer log of ``poppinace/fade``.
The file also has ``A2UUpRaw``/``InterChannelUpRaw``: the same kernels computed with a per-sample
loop plus an extra ``bconv_DP`` branch whose output is never used (dead parameters); it is not
reproduced here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks as C
from .. import functional as Fn
from ..registry import Upsampler, register_upsampler
from ._layers import crop, group_norm, nearest_up


@register_upsampler("a2u")
class A2U(Upsampler):
    """A2U kernels from the encoder feature y, CARAFE-style K x K reassembly of the decoder x.

    What the official ``InterChannelUp`` computes on y ``[B, Cy, sH, sW]`` (s = 2, K = 3, k = 6, d = 1):

    1. per-sample encoding kernels: ``U = Conv1x1_{Cy->d}(AdaptiveAvgPool(k x k)(y))`` and likewise
       ``V`` (``[B, d, k, k]``, with bias) - "pooled" kernels, shared by all channels (``share=True``);
    2. every channel of y is convolved with ``U[b, j]`` (and ``V[b, j]``), stride s, zero padding 2:
       ``e_u, e_v : [B*d, Cy, H, W]``; each goes through ``GroupNorm(32, Cy)`` + ``LeakyReLU(0.01)``;
    3. affinity ``A = sum_c e_u * e_v / sqrt(Cy)`` -> ``[B, d, H, W]`` (rank-d bilinear form);
    4. per-sample projection ``P = Conv1x1_{Cy -> d (K s)^2}(GlobalAvgPool(y))`` (with bias), applied as
       a 1x1 conv without bias: ``logits[b, m] = sum_j P[b, m*d + j] A[b, j]`` -> ``[B, (Ks)^2, H, W]``;
    5. ``pixel_shuffle(s)`` -> ``[B, K^2, sH, sW]``, then ``softmax(sigmoid(.))`` over the K^2 entries
       (sigmoid first, as the official code; the weights therefore stay within a factor e of uniform);
    6. ``carafe(x, kernels, K, 1, s)`` -> :func:`sapa.functional.reassemble`.

    Generalisations (official values are the defaults): ``scale_factor`` s, ``kernel_size`` K,
    ``encoder_kernel`` k >= s (padding ``(k-s)//2`` before, the rest after; 2 and 2 for k=6, s=2),
    ``rank`` d, ``norm_groups`` (32). Ceil-mode guides: y is zero-padded at the bottom/right to
    ``(s*H, s*W)`` for the strided encoding convs (the pooled kernels see the unpadded y) and the
    kernels are cropped. Init: PyTorch default (the official module sets none).

    Params: ``(Cy+1)*d*(Ks)^2 + 2*(Cy+1)*d + 4*Cy`` (GroupNorm affine) = 42*Cy + 38 = 10,790 at
    Cy = 256 with the defaults.
    """

    needs_guide = True

    def __init__(self, in_channels: int, *, guide_channels: int | None = None, scale_factor: int = 2,
                 kernel_size: int = 3, encoder_kernel: int = 6,
                 rank: int = 1, norm_groups: int = 32):
        super().__init__(in_channels, guide_channels=guide_channels, scale_factor=scale_factor)
        self.kernel_size = C.kernel_size(kernel_size)
        self.encoder_kernel = C.positive_int("encoder_kernel", encoder_kernel)
        if self.encoder_kernel < self.scale_factor:
            raise ValueError(f"A2U: encoder_kernel ({encoder_kernel}) must be >= scale_factor "
                             f"({self.scale_factor}) so the strided encoding conv sees every pixel")
        self.rank = C.positive_int("rank", rank)
        self.norm_groups = C.positive_int("norm_groups", norm_groups)
        cy = self.guide_channels
        if cy % self.norm_groups:
            raise ValueError(f"A2U: GroupNorm({self.norm_groups}, C) on the encoding maps needs "
                             f"guide_channels divisible by {self.norm_groups}, got {cy}; pass "
                             f"norm_groups=<a divisor of {cy}> (the official value is 32)")
        s, K, d = self.scale_factor, self.kernel_size, self.rank
        self.proj = nn.Conv2d(cy, d * (K * s) ** 2, 1)
        self.enc_u = nn.Conv2d(cy, d, 1)
        self.enc_v = nn.Conv2d(cy, d, 1)
        self.norm_u = group_norm(cy, self.norm_groups, "A2U")
        self.norm_v = group_norm(cy, self.norm_groups, "A2U")

    def _encode(self, yt, kernel, enc_norm, B, H, W):
        """Convolve every channel of y with the per-sample kernels; GroupNorm + LeakyReLU.

        yt: y padded and transposed to ``[Cy, B, Hp, Wp]`` (channels as the batch, samples as conv
        groups), kernel ``[B, d, k, k]`` -> ``[B*d, Cy, H, W]``.
        """
        d, k = self.rank, self.encoder_kernel
        if torch.compiler.is_exporting():
            # ONNX Conv's group is a constant: with a dynamic batch, convolve every sample with every
            # sample's kernels (B times the work) and keep the matching pairs.
            e = F.conv2d(yt.flatten(0, 1).unsqueeze(1), kernel.reshape(B * d, 1, k, k), stride=self.scale_factor)
            e = e.unflatten(0, (-1, B)).unflatten(2, (B, d)).diagonal(dim1=1, dim2=2)  # [Cy, d, H, W, B]
            return F.leaky_relu(enc_norm(e.permute(4, 1, 0, 2, 3).flatten(0, 1)), 0.01)
        e = F.conv2d(yt, kernel.reshape(B * d, 1, k, k), stride=self.scale_factor, groups=B)
        e = e.view(-1, B * d, H, W).transpose(0, 1)
        return F.leaky_relu(enc_norm(e), 0.01)

    def kernels(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """Normalised reassembly kernels ``[B, K^2, H', W']``."""
        size = self.output_size(x, guide)
        s, K, k, d = self.scale_factor, self.kernel_size, self.encoder_kernel, self.rank
        B, _, H, W = x.shape
        Cy, Hg, Wg = guide.shape[1:]
        p = self.proj(F.adaptive_avg_pool2d(guide, 1)).view(B, (K * s) ** 2, d)
        pooled = F.adaptive_avg_pool2d(guide, k)
        u, v = self.enc_u(pooled), self.enc_v(pooled)
        lo = (k - s) // 2
        hi = k - s - lo
        yt = F.pad(guide, (lo, hi + s * W - Wg, lo, hi + s * H - Hg)).transpose(0, 1)
        eu = self._encode(yt, u, self.norm_u, B, H, W)
        ev = self._encode(yt, v, self.norm_v, B, H, W)
        a = ((eu * ev).sum(1) / math.sqrt(Cy)).view(B, d, H, W)
        logits = F.pixel_shuffle(torch.einsum("bmd,bdhw->bmhw", p, a), s)
        return crop(torch.softmax(torch.sigmoid(logits), dim=1), size)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        size = self.output_size(x, guide)
        if x.shape[0] == 0:  # grouped conv with groups = batch = 0 is undefined
            # an empty output that is still part of the graph (of x and of every parameter), as
            # every other upsampler's, so a batch-0 step's backward works and gives zero gradients
            tie = sum(p.reshape(-1)[:0].sum() for p in self.parameters())
            return nearest_up(x, self.scale_factor, size) * 0 + tie
        w = self.kernels(x, guide)
        return Fn.reassemble(w, x, self.kernel_size, self.scale_factor, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", kernel_size={self.kernel_size}, "
                f"encoder_kernel={self.encoder_kernel}, rank={self.rank}, norm_groups={self.norm_groups}")
