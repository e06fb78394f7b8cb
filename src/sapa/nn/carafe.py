"""CARAFE: content-aware reassembly of features (Wang et al., ICCV 2019), as mmcv's ``CARAFEPack``.

Source read: ``open-mmlab/mmcv`` ``mmcv/ops/carafe.py`` (``CARAFEPack``), the module every
baseline run in the papers used through the forks' ``build_upsampler`` (docs/SEMANTICS.md §5.4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks as C
from .. import functional as Fn
from ..registry import Upsampler, register_upsampler
from ._layers import crop, pixel_shuffle


@register_upsampler("carafe")
class CARAFE(Upsampler):
    """CARAFE with mmcv ``CARAFEPack`` semantics (unguided: kernels are predicted from x itself).

    Pipeline (what mmcv does):

    1. channel compressor ``Conv2d(C, C_m, 1)`` (``compressed_channels`` C_m = 64);
    2. content encoder ``Conv2d(C_m, s^2 K^2 G, k_enc, padding=(k_enc-1)*dil/2, dilation=dil)``;
    3. ``pixel_shuffle(s)`` **first** -> ``[B, G*K^2, sH, sW]`` (encoder channel
       ``(g*K^2 + n)*s^2 + a*s + b`` becomes entry ``n`` of group ``g`` at sub-pixel ``(a, b)``);
    4. softmax over the ``K^2`` entries of each group (mmcv views ``[B, G, K^2, sH, sW]``, dim 2);
    5. reassembly of x with the K x K window around ``(i // s, j // s)``, channel group ``g`` =
       contiguous block ``g`` of ``C/G`` channels, out-of-range window positions contribute 0
       (mmcv's CUDA kernel skips them) -> :func:`sapa.functional.reassemble`.

    Init as mmcv: Xavier-uniform (gain 1, zero bias) for both convs, then the content encoder is
    re-initialised normal(std=0.001), zero bias, so the kernels start close to a box filter.

    Args (mmcv names in brackets):
        kernel_size: reassembly window ``K`` [up_kernel], odd, default 5.
        groups: kernel groups ``G`` [up_group], default 1; must divide ``in_channels``.
        encoder_kernel: ``k_enc``, default 3. encoder_dilation: default 1.
        compressed_channels: ``C_m``, default 64.

    Params: ``C*C_m + C_m + C_m*s^2*K^2*G*k_enc^2 + s^2*K^2*G`` = 74,148 at C=256, s=2 (defaults).
    """

    needs_guide = False

    def __init__(self, in_channels: int, *, guide_channels: int | None = None, scale_factor: int = 2,
                 kernel_size: int = 5, groups: int = 1,
                 encoder_kernel: int = 3, encoder_dilation: int = 1, compressed_channels: int = 64):
        super().__init__(in_channels, guide_channels=guide_channels, scale_factor=scale_factor)
        self.kernel_size = C.kernel_size(kernel_size)
        self.groups = C.positive_int("groups", groups)
        C.divisible("in_channels", self.in_channels, self.groups)
        self.encoder_kernel = C.positive_int("encoder_kernel", encoder_kernel)
        self.encoder_dilation = C.positive_int("encoder_dilation", encoder_dilation)
        if (encoder_kernel - 1) * encoder_dilation % 2:
            raise ValueError(f"CARAFE: (encoder_kernel - 1) * encoder_dilation must be even to keep the "
                             f"map size, got encoder_kernel={encoder_kernel}, "
                             f"encoder_dilation={encoder_dilation}")
        self.compressed_channels = C.positive_int("compressed_channels", compressed_channels)
        s, K, G = self.scale_factor, self.kernel_size, self.groups
        self.channel_compressor = nn.Conv2d(in_channels, compressed_channels, 1)
        self.content_encoder = nn.Conv2d(compressed_channels, s * s * K * K * G, encoder_kernel,
                                         padding=(encoder_kernel - 1) * encoder_dilation // 2,
                                         dilation=encoder_dilation)
        for conv in (self.channel_compressor, self.content_encoder):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.content_encoder.weight, std=0.001)

    def kernels(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Normalised reassembly kernels ``[B, G*K^2, H', W']`` (cropped to ``size`` if given)."""
        s, K, G = self.scale_factor, self.kernel_size, self.groups
        m = pixel_shuffle(self.content_encoder(self.channel_compressor(x)), s)
        B, _, Hh, Wh = m.shape
        m = torch.softmax(m.view(B, G, K * K, Hh, Wh), dim=2).view(B, G * K * K, Hh, Wh)
        return m if size is None else crop(m, size)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        size = self.output_size(x, guide)
        return Fn.reassemble(self.kernels(x, size), x, self.kernel_size, self.scale_factor, self.groups)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", kernel_size={self.kernel_size}, groups={self.groups}, "
                f"encoder_kernel={self.encoder_kernel}, encoder_dilation={self.encoder_dilation}, "
                f"compressed_channels={self.compressed_channels}")
