"""Small hosts for the CPU demo and the tests: a tiny conv encoder with the papers' heads.

* :class:`TinyEncoder` — 4 stages at strides 4 / 8 / 16 / 32 (like MiT / ResNet), a few channels.
* :class:`TinySegmenter` — TinyEncoder + the real SegFormer head (``sapa.models.segformer``,
  six upsamplers, logits at stride 4), i.e. the SegFormer placement of docs/SEMANTICS.md §5.1 at toy width.
* :func:`tiny_faster_rcnn` — TinyEncoder + the real FPN (``sapa.models.fpn``, three swappable
  top-down upsamplers guided by the laterals) + torchvision's Faster R-CNN RPN / RoI heads, sized
  for 64x64 synthetic images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn



def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyEncoder(nn.Module):
    """Four stages, outputs at strides (4, 8, 16, 32) with ``widths`` channels. Input sides must be
    multiples of 32 for exact strides (the SAPA ops need exactly-divisible sizes, docs/SEMANTICS.md §1.2)."""

    def __init__(self, widths=(16, 32, 64, 128), in_channels: int = 3):
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"TinyEncoder: widths must have 4 entries (strides 4, 8, 16, 32), got {widths}")
        w = [int(v) for v in widths]
        self.widths = w
        self.stem = nn.Sequential(_conv_bn_relu(in_channels, w[0], 2), _conv_bn_relu(w[0], w[0], 2))
        self.stages = nn.ModuleList([_conv_bn_relu(w[0], w[0])])
        for i in range(1, 4):
            self.stages.append(nn.Sequential(_conv_bn_relu(w[i - 1], w[i], 2), _conv_bn_relu(w[i], w[i])))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class TinySegmenter(nn.Module):
    """TinyEncoder + ``sapa.models.segformer.SegFormerHead``; ``forward(img) -> logits at stride 4``.

    ``embed_dim`` must suit the upsampler (GroupNorm(32) ones need a multiple of 32; SAPA-D a
    multiple of its 4 groups)."""

    def __init__(self, num_classes: int, upsampler="bilinear", widths=(16, 32, 64, 128), embed_dim: int = 32,
                 dropout: float = 0.0, head_cls=None):
        super().__init__()
        if head_cls is None:
            from ..models.segformer import SegFormerHead as head_cls
        self.backbone = TinyEncoder(widths)
        self.decode_head = head_cls(list(self.backbone.widths), embed_dim=embed_dim, num_classes=num_classes,
                                    upsampler=upsampler, dropout=dropout)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.backbone(img))


class _TinyDetBackbone(nn.Module):
    def __init__(self, widths, channels, upsampler):
        super().__init__()
        from ..models.fpn import FPN
        self.body = TinyEncoder(widths)
        self.fpn = FPN(self.body.widths, channels, upsampler=upsampler)
        self.out_channels = channels

    def forward(self, x):
        return self.fpn(self.body(x))


def tiny_faster_rcnn(num_classes: int, upsampler="nearest", widths=(16, 32, 64, 128), channels: int = 32,
                     image_size: int = 64):
    """torchvision Faster R-CNN on TinyEncoder + ``sapa.models.FPN`` (P2-P6); anchors 8...128 px;
    images are used at ``image_size`` (no resize) with ImageNet normalisation."""
    from .._optional import optional_import

    with optional_import("torchvision", "the tiny Faster R-CNN"):
        from torchvision.models.detection import FasterRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.ops import MultiScaleRoIAlign

    backbone = _TinyDetBackbone(widths, channels, upsampler)
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,), (64,), (128,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    return FasterRCNN(backbone, num_classes=num_classes, rpn_anchor_generator=anchors, box_roi_pool=roi_pool,
                      min_size=image_size, max_size=image_size, rpn_pre_nms_top_n_train=200,
                      rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                      rpn_batch_size_per_image=64, box_batch_size_per_image=64, box_detections_per_img=20,
                      representation_size=128)


def resize_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of logits to the label size, as mmseg does."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
