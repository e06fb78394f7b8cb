"""FPN (Lin et al., CVPR 2017) with swappable top-down upsamplers, as mmdet's ``FPN`` with
``num_outs=5`` and no extra convs (docs/SEMANTICS.md §5.3, ``tiny-smart/detection-with-upsamplers``
``fpn_upsample.py``)::

    lat[i]  = lateral_convs[i](C_{i+2})                          # 1x1, bias, no norm/act
    for i in 3, 2, 1:   lat[i-1] = lat[i-1] + up_{i-1}(lat[i], guide=lat[i-1])
    P_{i+2} = fpn_convs[i](lat[i])                               # 3x3, bias
    P6      = max_pool2d(P5, kernel_size=1, stride=2)

``up_{i-1} = upsamplers[i-1]``; ceil-mode sizes (e.g. 800x1333 inputs: 200x334, 100x167, 50x84,
25x42) work: every upsampler returns the guide's size.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._common import build_stage_upsamplers

__all__ = ["FPN"]


class FPN(nn.Module):
    """mmdet FPN (5 outputs, P6 by max-pool) whose three top-down upsamplings are swappable.

    Args:
        in_channels: the four backbone stages, finest first.
        out_channels: 256. ``self.out_channels`` is what torchvision's detectors read.
        upsampler: ``"nearest"`` (default; mmdet's ``F.interpolate(size=prev_shape)``, exactly) or
            ``"bilinear"`` (``F.interpolate(size=...)``); any other registered name,
            ``dict(type=..., **kw)`` or class builds three modules on ``out_channels`` maps guided
            by ``out_channels`` laterals; or a list of three specs/instances (``[0]``: 1/8 -> 1/4,
            ``[2]``: 1/32 -> 1/16). A single instance raises ``TypeError``.
        xavier_upsamplers: also Xavier-initialise the convs inside the upsamplers. mmdet's FPN
            ``init_cfg`` (Xavier uniform on every ``Conv2d`` of the neck) most likely did this to the
            papers' detection runs (docs/SEMANTICS.md §2.2 caveat); off by default.

    ``forward(features)`` (a list or a mapping of 4 maps) -> ``OrderedDict`` ``'0'..'3'`` (P2-P5) and
    ``'pool'`` (P6), the layout of torchvision's ``BackboneWithFPN``.
    """

    def __init__(self, in_channels: Sequence[int] = (256, 512, 1024, 2048), out_channels: int = 256,
                 upsampler: Any = "nearest", xavier_upsamplers: bool = False):
        super().__init__()
        in_channels = list(in_channels)
        if len(in_channels) != 4:
            raise ValueError(f"FPN: in_channels must list 4 backbone stages, got {in_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        for conv in [*self.lateral_convs, *self.fpn_convs]:  # mmdet FPN init_cfg: Xavier uniform
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.upsamplers = build_stage_upsamplers(upsampler, 3, out_channels, "FPN",
                                                 resize_names=("nearest", "bilinear"))
        if xavier_upsamplers:
            for up in self.upsamplers:
                for m in up.modules():
                    if isinstance(m, nn.Conv2d):
                        nn.init.xavier_uniform_(m.weight)
                        if m.bias is not None:
                            nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        feats = list(features.values()) if isinstance(features, Mapping) else list(features)
        if len(feats) != 4:
            raise ValueError(f"FPN: expected 4 feature maps (C2 ... C5), got {len(feats)}")
        lat = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(3, 0, -1):
            lat[i - 1] = lat[i - 1] + self.upsamplers[i - 1](lat[i], lat[i - 1])
        outs = [conv(t) for conv, t in zip(self.fpn_convs, lat)]
        out = OrderedDict((str(i), t) for i, t in enumerate(outs))
        out["pool"] = F.max_pool2d(outs[-1], kernel_size=1, stride=2)
        return out
