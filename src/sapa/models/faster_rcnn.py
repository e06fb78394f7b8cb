"""Faster R-CNN R50/R101-FPN (torchvision's detection API) whose FPN upsamplers are swappable.

The detector is ``torchvision.models.detection.FasterRCNN`` (RPN, RoIAlign, 2-fc box head: the
torchvision counterparts of mmdet's ``faster-rcnn_r50_fpn_1x``) on a :class:`ResNetFPNBackbone`:
a torchvision ResNet body (``weights=None``; frozen BatchNorm and, as mmdet's ``frozen_stages=1``,
a frozen stem and ``layer1``) and :class:`sapa.models.fpn.FPN`. Nothing is downloaded;
``pretrained=`` reads local ImageNet weights (torchvision names; ``pretrained_backbone=`` is its
deprecated old name).

Classes follow torchvision: ``num_classes`` counts the background (91 for torchvision's COCO ids,
81 for the 80 contiguous COCO classes that mmdet's head predicts).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ._common import load_checked, strip_prefix
from ._weights import read_state_dict, take_pretrained
from .fpn import FPN

__all__ = ["ResNetFPNBackbone", "faster_rcnn", "faster_rcnn_r50", "faster_rcnn_r101", "load_torchvision_resnet"]

_STAGES = ("layer1", "layer2", "layer3", "layer4")


class ResNetFPNBackbone(nn.Module):
    """torchvision ResNet body + :class:`FPN`; ``forward(img)`` -> ``OrderedDict`` '0'..'3', 'pool'.

    Args:
        depth: 18, 34, 50, 101 or 152 (torchvision ``resnet{depth}``).
        upsampler: the FPN's (see :class:`FPN`); default ``"nearest"``, the papers' baseline.
        trainable_layers: how many of layer4, layer3, layer2, layer1, stem train (3 = mmdet's
            ``frozen_stages=1``). Frozen parameters still count in the parameter total.
        frozen_bn: torchvision ``FrozenBatchNorm2d`` (default; mmdet freezes BN too: ``norm_eval``
            and ``requires_grad=False``). Its statistics and affine terms are buffers, so they do not
            count as parameters.
        pretrained: local ResNet weights (torchvision / mmdet ``backbone.`` names; file, folder or
            state dict). ``pretrained_backbone=`` is its deprecated old name.
        xavier_upsamplers: the neck's Xavier init of the upsamplers' convs (see :class:`FPN`).

    Works on any input size: the strides are ceil-mode and the FPN upsamplers take the guide's size.
    """

    def __init__(self, depth: int = 50, upsampler: Any = "nearest", out_channels: int = 256,
                 trainable_layers: int = 3, frozen_bn: bool = True,
                 pretrained: str | os.PathLike | None = None, xavier_upsamplers: bool = True, **kwargs):
        super().__init__()
        pretrained = take_pretrained(pretrained, kwargs, "ResNetFPNBackbone")
        if kwargs:
            raise TypeError(f"ResNetFPNBackbone: unexpected keyword arguments {sorted(kwargs)}")
        from .._optional import optional_import

        with optional_import("torchvision", "the Faster R-CNN backbone"):
            import torchvision
            from torchvision.ops import FrozenBatchNorm2d

        if depth not in (18, 34, 50, 101, 152):
            raise ValueError(f"ResNetFPNBackbone: depth must be one of 18, 34, 50, 101, 152, got {depth}")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"ResNetFPNBackbone: trainable_layers must be in [0, 5], got {trainable_layers}")
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        body = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=norm)
        del body.fc, body.avgpool  # before loading: the checkpoint's ImageNet fc is ignored, not expected
        if pretrained is not None:
            load_torchvision_resnet(body, pretrained)
        train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            train.append("bn1")
        for name, p in body.named_parameters():
            if not any(name.startswith(t) for t in train):
                p.requires_grad_(False)
        self.body = body
        in_channels = [64, 128, 256, 512] if depth < 50 else [256, 512, 1024, 2048]
        self.fpn = FPN(in_channels, out_channels, upsampler=upsampler, xavier_upsamplers=xavier_upsamplers)
        self.out_channels = out_channels

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        outs = []
        for name in _STAGES:
            x = getattr(b, name)(x)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.features(x))


def load_torchvision_resnet(body: nn.Module, source: str | os.PathLike | dict) -> None:
    """Load ImageNet ResNet weights (torchvision names; ``fc`` dropped) from a local file or dict."""
    what = "load_torchvision_resnet"
    sd = dict(source) if isinstance(source, dict) else read_state_dict(source, what)
    name = "state dict" if isinstance(source, dict) else repr(os.fspath(source))
    sd = strip_prefix(sd, ["module.", "backbone.body.", "backbone.", "model."])
    load_checked(body, sd, what, name, ignore=("fc.",))


def faster_rcnn(depth: int = 50, num_classes: int = 91, upsampler: Any = "nearest",
                pretrained: str | os.PathLike | None = None, trainable_layers: int = 3,
                xavier_upsamplers: bool = True, **kwargs) -> nn.Module:
    """``torchvision.models.detection.FasterRCNN`` on ResNet-``depth`` + our FPN.

    ``kwargs`` go to ``FasterRCNN`` (``min_size``, ``max_size``, ``rpn_*``, ``box_*``, ...); its
    defaults (min_size 800, max_size 1333, 5 anchor sizes x 3 ratios, RoIAlign 7x7 on P2-P5, two
    1024-d fc layers) match mmdet's ``faster-rcnn_r50_fpn_1x``. torchvision's transform pads
    batches to a multiple of 32; the backbone also works on any size when called directly.
    """
    from .._optional import optional_import

    with optional_import("torchvision", "Faster R-CNN"):
        from torchvision.models.detection import FasterRCNN

    pretrained = take_pretrained(pretrained, kwargs, "faster_rcnn")
    backbone = ResNetFPNBackbone(depth, upsampler=upsampler, trainable_layers=trainable_layers,
                                 pretrained=pretrained, xavier_upsamplers=xavier_upsamplers)
    return FasterRCNN(backbone, num_classes=num_classes, **kwargs)


def faster_rcnn_r50(num_classes: int = 91, upsampler: Any = "nearest",
                    pretrained: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """Faster R-CNN R50-FPN (41.5 M params with nearest and 81 classes)."""
    return faster_rcnn(50, num_classes, upsampler, pretrained, **kwargs)


def faster_rcnn_r101(num_classes: int = 91, upsampler: Any = "nearest",
                     pretrained: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """Faster R-CNN R101-FPN."""
    return faster_rcnn(101, num_classes, upsampler, pretrained, **kwargs)
