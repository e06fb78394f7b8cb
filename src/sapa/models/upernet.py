"""UPerNet (Xiao et al., ECCV 2018) with a swappable upsampler in its FPN top-down path, on
ResNetV1c-50/101, as mmseg's ``UPerHead`` + ``FCNHead`` auxiliary head (docs/SEMANTICS.md §5.2).

Top-down path (``tiny-smart/segmentation-with-upsamplers`` ``uper_head_upsample.py``), with
``up_{i-1} = upsamplers[i-1]``::

    for i in 3, 2, 1:   lat[i-1] = lat[i-1] + up_{i-1}(lat[i], guide=lat[i-1])

(``x`` is the already-accumulated coarser map, the guide the finer lateral). The fusion of the
pyramid outputs to 1/4 before ``fpn_bottleneck`` stays a bilinear resize, as in the paper code.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._common import ConvModule, build_stage_upsamplers

__all__ = ["PPM", "UPerHead", "FCNHead", "UPerNet", "upernet", "upernet_r50", "upernet_r101"]


class PPM(nn.ModuleList):
    """Pyramid pooling: adaptive average pooling to each scale, ConvModule 1x1, bilinear back.
    A ModuleList, as mmseg's, so checkpoint keys match (``psp_modules.0.1.conv.weight``)."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, align_corners: bool = False):
        super().__init__(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1))
                         for s in pool_scales)
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [F.interpolate(stage(x), size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)
                for stage in self]


class UPerHead(nn.Module):
    """mmseg ``UPerHead`` whose three top-down upsamplings are swappable.

    Args:
        in_channels: the four backbone stages, finest first ((256, 512, 1024, 2048) for R50).
        channels: width of the head (512).
        num_classes: 150 (ADE20K).
        upsampler: ``"bilinear"`` (default; mmseg's ``resize(size=...)``, exactly) or ``"nearest"``
            (``F.interpolate(size=...)``); any other registered name, ``dict(type=..., **kw)`` or
            class builds three modules on ``channels``-channel maps guided by ``channels``-channel
            laterals; or a list of three specs/instances indexed like ``upsamplers`` (``[0]`` does
            1/8 -> 1/4, ``[2]`` does 1/32 -> 1/16). A single instance raises ``TypeError``.
            Names and dicts get the published UPerNet configuration (:mod:`sapa.models.presets`:
            ``"fade"`` is ungated, ``"sapa_b"`` the NeurIPS module); keys you pass win.
        pool_scales: PPM scales (1, 2, 3, 6). dropout: ``Dropout2d`` before ``conv_seg`` (0.1).

    ``forward(features)`` -> logits ``[B, num_classes, H_1, W_1]`` at 1/4 (ceil-mode sizes work).
    """

    def __init__(self, in_channels: Sequence[int] = (256, 512, 1024, 2048), channels: int = 512,
                 num_classes: int = 150, upsampler: Any = "bilinear", pool_scales: Sequence[int] = (1, 2, 3, 6),
                 dropout: float = 0.1, align_corners: bool = False):
        super().__init__()
        in_channels = list(in_channels)
        if len(in_channels) != 4:
            raise ValueError(f"UPerHead: in_channels must list 4 backbone stages, got {in_channels}")
        self.in_channels, self.channels, self.num_classes = in_channels, channels, num_classes
        self.align_corners = align_corners
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels, align_corners)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.upsamplers = build_stage_upsamplers(upsampler, 3, channels, "UPerHead",
                                                 resize_names=("bilinear", "nearest"), align_corners=align_corners,
                                                 preset_host="upernet")
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmseg BaseDecodeHead.init_weights
        nn.init.zeros_(self.conv_seg.bias)

    def psp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def laterals(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The four laterals after the top-down path (finest first)."""
        if len(features) != 4:
            raise ValueError(f"UPerHead: expected 4 feature maps (1/4 ... 1/32), got {len(features)}")
        lat = [conv(f) for conv, f in zip(self.lateral_convs, features[:-1])]
        lat.append(self.psp_forward(features[-1]))
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + self.upsamplers[i - 1](lat[i], lat[i - 1])
        return lat

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        lat = self.laterals(features)
        outs = [conv(t) for conv, t in zip(self.fpn_convs, lat[:-1])] + [lat[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(t, size=size, mode="bilinear", align_corners=self.align_corners)
                            for t in outs[1:]]
        x = self.fpn_bottleneck(torch.cat(outs, dim=1))
        return self.conv_seg(self.dropout(x))


class FCNHead(nn.Module):
    """mmseg ``FCNHead`` as UPerNet's auxiliary head: ConvModule 3x3 -> dropout -> 1x1 classifier."""

    def __init__(self, in_channels: int = 1024, channels: int = 256, num_classes: int = 150, num_convs: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        convs = [ConvModule(in_channels if i == 0 else channels, channels, 3, padding=1) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


class UPerNet(nn.Module):
    """ResNet encoder + :class:`UPerHead` + :class:`FCNHead` on stage 3 (mmseg's UPerNet config).

    ``forward(img)`` -> main logits at 1/4; ``forward_with_aux(img)`` -> ``(main, aux)`` (aux at
    1/16; mmseg weights its loss 0.4). Attributes ``backbone``, ``decode_head``, ``auxiliary_head``
    (``None`` with ``aux=False``). Parameter counts include the auxiliary head, as mmseg's do.
    """

    def __init__(self, backbone: str = "resnet50c", num_classes: int = 150, upsampler: Any = "bilinear",
                 channels: int = 512, aux: bool = True, aux_channels: int = 256,
                 pretrained: str | os.PathLike | None = None, align_corners: bool = False):
        super().__init__()
        from .resnet import ResNetEncoder

        self.backbone = ResNetEncoder(backbone, pretrained=pretrained)
        chs = self.backbone.out_channels
        self.decode_head = UPerHead(chs, channels, num_classes, upsampler=upsampler, align_corners=align_corners)
        self.auxiliary_head = FCNHead(chs[2], aux_channels, num_classes) if aux else None

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.backbone(img))

    def forward_with_aux(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.backbone(img)
        aux = self.auxiliary_head(feats[2]) if self.auxiliary_head is not None else None
        return self.decode_head(feats), aux


def upernet(depth: int = 50, num_classes: int = 150, upsampler: Any = "bilinear",
            pretrained: str | os.PathLike | None = None, **kwargs: Any) -> UPerNet:
    """UPerNet-R``depth`` (50 or 101); ``upsampler`` as :class:`UPerHead` (names and dicts get the
    published UPerNet configuration, :mod:`sapa.models.presets`)."""
    if depth not in (50, 101):
        raise ValueError(f"upernet: depth must be 50 or 101, got {depth}")
    return UPerNet(f"resnet{depth}c", num_classes=num_classes, upsampler=upsampler, pretrained=pretrained, **kwargs)


def upernet_r50(num_classes: int = 150, upsampler: Any = "bilinear", pretrained: str | os.PathLike | None = None,
                **kwargs) -> UPerNet:
    """UPerNet-R50 (ResNetV1c-50, 512-ch head, FCN aux head): 66.5 M params with bilinear."""
    return upernet(50, num_classes, upsampler, pretrained, **kwargs)


def upernet_r101(num_classes: int = 150, upsampler: Any = "bilinear", pretrained: str | os.PathLike | None = None,
                 **kwargs) -> UPerNet:
    """UPerNet-R101 (ResNetV1c-101): 85.5 M params with bilinear."""
    return upernet(101, num_classes, upsampler, pretrained, **kwargs)
