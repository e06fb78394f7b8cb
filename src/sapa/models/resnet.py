"""ResNet encoders for the hosts: timm ResNetV1c (deep stem) for UPerNet, as mmseg's ``ResNetV1c``.

mmseg ``ResNetV1c`` = ResNet with the 3-conv deep stem (3->32->32->64, first conv stride 2), stride
on the 3x3 conv ("pytorch" style), no dilation; timm ``resnet50c`` / ``resnet101c`` are the same
network. Built with ``pretrained=False``; weights only come from local files.
"""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from ._common import load_checked, strip_prefix
from ._weights import read_state_dict

__all__ = ["ResNetEncoder", "load_resnet_weights"]

# open-mmlab ResNetV1c checkpoints (resnet50_v1c-2cccc1ad.pth) name the deep stem ``stem.{0..7}``;
# timm names it ``conv1.{0,1,3,4,6}`` + ``bn1``. The residual stages share names.
_MM_STEM = [(r"^stem\.0\.", "conv1.0."), (r"^stem\.1\.", "conv1.1."), (r"^stem\.3\.", "conv1.3."),
            (r"^stem\.4\.", "conv1.4."), (r"^stem\.6\.", "conv1.6."), (r"^stem\.7\.", "bn1.")]


class ResNetEncoder(nn.Module):
    """A timm ResNet without its classifier, returning the four stage outputs (1/4 ... 1/32).

    Args:
        name: timm model name (``resnet50c``, ``resnet101c``; any timm ResNet works, e.g.
            ``resnet18d`` for small tests).
        pretrained: local weights (timm / torchvision names, or open-mmlab ``stem.*`` names).

    ``out_channels``: channels of the four outputs (256, 512, 1024, 2048 for R50/R101). Strides are
    ceil-mode: a 65x65 input gives 17, 9, 5, 3.
    """

    def __init__(self, name: str = "resnet50c", pretrained: str | os.PathLike | None = None):
        super().__init__()
        from .._optional import optional_import

        with optional_import("timm", "the ResNet encoder (UPerNet)"):
            import timm

        self.name = name
        self.model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
        self.out_channels = [info["num_chs"] for info in self.model.feature_info[1:5]]
        if pretrained is not None:
            load_resnet_weights(self.model, pretrained)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        m = self.model
        x = m.maxpool(m.act1(m.bn1(m.conv1(x))))
        outs = []
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            x = layer(x)
            outs.append(x)
        return outs


def load_resnet_weights(model: nn.Module, source: str | os.PathLike | dict) -> None:
    """Load ImageNet weights into a timm ResNet from a local file/dir or state dict; ``fc.*`` is
    dropped; open-mmlab deep-stem names are mapped. Raises ``ValueError`` naming bad keys."""
    what = "load_resnet_weights"
    sd = dict(source) if isinstance(source, dict) else read_state_dict(source, what)
    name = "state dict" if isinstance(source, dict) else repr(os.fspath(source))
    sd = strip_prefix(sd, ["module.", "backbone.", "model."])
    if any(k.startswith("stem.") for k in sd):
        out = {}
        for k, v in sd.items():
            for pat, rep in _MM_STEM:
                k = re.sub(pat, rep, k)
            out[k] = v
        sd = out
    load_checked(model, sd, what, name, ignore=("fc.", "head."))
