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

__all__ = ["FPN", "neck_xavier_init_"]


def neck_xavier_init_(module: nn.Module) -> list[str]:
    """What mmdet's neck ``init_cfg = dict(type='Xavier', layer='Conv2d', distribution='uniform')``
    does to ``module``: every ``nn.Conv2d`` (subclasses included, as mmengine matches base class
    names) gets ``xavier_uniform_`` (gain 1) and a zero bias. ``ConvTranspose2d`` and ``Linear`` are
    not ``Conv2d`` and are left alone. Our IndexNet stores the official four ``Conv2d(C, C, 2, 2)``
    as one conv with ``s^2 C`` outputs; each block is initialised on its own (the fan of one official
    conv). Returns the names of the convs it re-initialised."""
    from ..nn.indexnet import IndexNet

    blocks = {id(m.index_conv): m.scale_factor ** 2 for m in module.modules() if isinstance(m, IndexNet)}
    done = []
    for name, m in module.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        n = blocks.get(id(m), 1)
        step = m.weight.shape[0] // n
        for k in range(n):
            nn.init.xavier_uniform_(m.weight[k * step:(k + 1) * step])
        if m.bias is not None:
            nn.init.zeros_(m.bias)
        done.append(name)
    return done


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
        xavier_upsamplers: re-initialise every ``nn.Conv2d`` inside the upsamplers with
            Xavier-uniform and zero bias after their own init (default True), as mmdet's neck
            ``init_cfg = Xavier(uniform, layer='Conv2d')`` does to the papers' detection runs: it
            reaches SAPA-D's q/k/offset convs, CARAFE's compressor and encoder, DySample's offset
            (std 0.001 -> ~0.14 at 256 channels), PixelShuffle, IndexNet (each official 2x2 conv on
            its own), A2U, FADE. ``nn.ConvTranspose2d`` (deconv) and ``nn.Linear`` (the NeurIPS
            SAPA-B/G projections) are not ``Conv2d`` and keep their init. ``False`` keeps every
            upsampler's own init. Names and dicts get the published FPN configuration
            (:mod:`sapa.models.presets`: ``"fade"`` is ungated, ``"sapa_b"`` the NeurIPS module).

    ``forward(features)`` (a list or a mapping of 4 maps) -> ``OrderedDict`` ``'0'..'3'`` (P2-P5) and
    ``'pool'`` (P6), the layout of torchvision's ``BackboneWithFPN``.
    """

    def __init__(self, in_channels: Sequence[int] = (256, 512, 1024, 2048), out_channels: int = 256,
                 upsampler: Any = "nearest", xavier_upsamplers: bool = True):
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
                                                 resize_names=("nearest", "bilinear"), preset_host="fpn")
        self.xavier_upsamplers = bool(xavier_upsamplers)
        if self.xavier_upsamplers:
            neck_xavier_init_(self.upsamplers)

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
