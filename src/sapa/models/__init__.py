"""Host networks of the papers' tables, each taking ``upsampler=`` (name | dict | class | list):

* :class:`SegFormerHead` / :func:`segformer_b1` (MiT encoder from ``transformers``), docs/SEMANTICS.md §5.1;
* :class:`UPerHead` / :func:`upernet_r50`, :func:`upernet_r101` (timm ResNetV1c), docs/SEMANTICS.md §5.2;
* :class:`FPN` / :func:`faster_rcnn_r50`, :func:`faster_rcnn_r101` (torchvision), docs/SEMANTICS.md §5.3.

Importing this package needs only torch: ``transformers``, ``timm`` and ``torchvision`` (the
``sapa[models]`` extra) are imported when a model that needs them is built. No weights are ever
downloaded; ``pretrained=`` arguments read local files.
"""
from .faster_rcnn import ResNetFPNBackbone, faster_rcnn, faster_rcnn_r50, faster_rcnn_r101
from .fpn import FPN
from .segformer import SegFormer, SegFormerHead, load_mit_weights, mit_config, segformer, segformer_b1
from .upernet import FCNHead, UPerHead, UPerNet, upernet, upernet_r50, upernet_r101

__all__ = [
    "SegFormerHead", "SegFormer", "segformer", "segformer_b1", "mit_config", "load_mit_weights",
    "UPerHead", "FCNHead", "UPerNet", "upernet", "upernet_r50", "upernet_r101",
    "FPN", "ResNetFPNBackbone", "faster_rcnn", "faster_rcnn_r50", "faster_rcnn_r101",
]
