"""Fixed and learned unguided baselines: nearest, bilinear, deconv, pixelshuffle (docs/SEMANTICS.md §5.4).

Configurations as the forks' ``build_upsampler`` ([C3] ``tiny-smart/segmentation-with-upsamplers``
``mmseg/models/upsamplers/build_upsampler.py``, [C4] the mmdet fork):

* ``nearest``: ``nn.Upsample(scale_factor=s, mode='nearest')``;
* ``bilinear``: ``nn.Upsample(scale_factor=s, mode='bilinear', align_corners=False)``;
* ``deconv``: ``nn.ConvTranspose2d(C, C, 3, stride=2, padding=1, output_padding=1)``;
* ``pixelshuffle``: ``nn.Conv2d(C, 4C, 3, padding=1)`` + ``nn.PixelShuffle(2)``.

All four are unguided (``needs_guide = False``). When called with a guide they compute the
``s``-times map and crop it to the guide's size (ceil-mode strides, see :mod:`sapa.registry`) rather
than resampling to the guide's size, so the kept pixels are exactly those of the ``s``-times map.
The learned two keep PyTorch's default initialisation, as the official configs do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks as C
from ..registry import Upsampler, register_upsampler
from ._layers import crop, nearest_up, pixel_shuffle


@register_upsampler("nearest")
class Nearest(Upsampler):
    """Nearest-neighbour upsampling: ``out[i, j] = x[i // s, j // s]``. No parameters."""

    needs_guide = False

    def __init__(self, in_channels: int, *, guide_channels: int | None = None, scale_factor: int = 2):
        super().__init__(in_channels, guide_channels=guide_channels, scale_factor=scale_factor)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        size = self.output_size(x, guide)
        return nearest_up(x, self.scale_factor, size)


@register_upsampler("bilinear")
class Bilinear(Upsampler):
    """Bilinear upsampling, ``F.interpolate(x, scale_factor=s, mode='bilinear')``. No parameters.

    Args:
        align_corners: default ``False`` (the papers' baseline; SegFormer's bilinear head uses it too).
    """

    needs_guide = False

    def __init__(self, in_channels: int, *, guide_channels: int | None = None, scale_factor: int = 2,
                 align_corners: bool = False):
        super().__init__(in_channels, guide_channels=guide_channels, scale_factor=scale_factor)
        self.align_corners = bool(align_corners)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        size = self.output_size(x, guide)
        s = self.scale_factor
        # size=(s*H, s*W) rather than scale_factor=s: identical sampling positions for
        # align_corners=False (PyTorch uses 1/s either way) and correct for align_corners=True.
        out = F.interpolate(x, size=(s * x.shape[-2], s * x.shape[-1]), mode="bilinear",
                            align_corners=self.align_corners)
        return crop(out, size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", align_corners={self.align_corners}"


@register_upsampler("deconv")
class Deconv(Upsampler):
    """Transposed convolution ``ConvTranspose2d(C, C, k, stride=s, padding=k//2, output_padding=s-1)``.

    For ``k = 3, s = 2`` this is exactly the papers' config (padding 1, output_padding 1) and the
    output is ``(2H, 2W)`` for any ``H, W`` (odd included). For ``s > k`` some output pixels receive
    no input tap (they equal the bias), which is what a stride-``s`` 3x3 deconvolution does.

    Args:
        kernel_size: odd ``k``, default 3.
    Params: ``k^2 C^2 + C`` (590,080 at C=256).
    """

    needs_guide = False

    def __init__(self, in_channels: int, *, guide_channels: int | None = None, scale_factor: int = 2,
                 kernel_size: int = 3):
        super().__init__(in_channels, guide_channels=guide_channels, scale_factor=scale_factor)
        self.kernel_size = C.kernel_size(kernel_size)
        s = self.scale_factor
        self.deconv = nn.ConvTranspose2d(in_channels, in_channels, kernel_size, stride=s,
                                         padding=kernel_size // 2, output_padding=s - 1)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        size = self.output_size(x, guide)
        return crop(self.deconv(x), size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel_size={self.kernel_size}"


@register_upsampler("pixelshuffle")
class PixelShuffle(Upsampler):
    """Sub-pixel convolution: ``Conv2d(C, s^2 C, k, padding=k//2)`` then ``PixelShuffle(s)``.

    Args:
        kernel_size: odd ``k``, default 3.
    Params: ``k^2 s^2 C^2 + s^2 C`` (2,360,320 at C=256, s=2).
    """

    needs_guide = False

    def __init__(self, in_channels: int, *, guide_channels: int | None = None, scale_factor: int = 2,
                 kernel_size: int = 3):
        super().__init__(in_channels, guide_channels=guide_channels, scale_factor=scale_factor)
        self.kernel_size = C.kernel_size(kernel_size)
        s = self.scale_factor
        self.conv = nn.Conv2d(in_channels, in_channels * s * s, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        size = self.output_size(x, guide)
        return crop(pixel_shuffle(self.conv(x), self.scale_factor), size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel_size={self.kernel_size}"
