"""IndexNet (Lu et al., ICCV 2019): learned index maps as an upsampler (docs/SEMANTICS.md §5.4, [C6]).

Source read: ``poppinace/indexnet_matting`` ``scripts/hlindex.py`` (``DepthwiseM2OIndexBlock``) and
``scripts/hldecoder.py`` (``IndexedUpsamlping``: ``indices * F.interpolate(x, mode='nearest')``);
the SegFormer baseline log in ``poppinace/fade`` (``segformer.b1_indexnet...log``) prints one
``IndexUp(index_net=DepthwiseM2OIndexBlock)`` per upsampler with four
``Conv2d(256, 256, kernel_size=2, stride=2, bias=False)`` - the linear (``use_nonlinear=False``),
context-free (``use_context=False``) block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Upsampler, register_upsampler
from ._layers import crop, nearest_up, pixel_shuffle


@register_upsampler("indexnet")
class IndexNet(Upsampler):
    """Depthwise many-to-one (M2O) linear index block, guided by the encoder feature y.

    What the official block does on y ``[B, C, 2H, 2W]``: four ``Conv2d(C, C, 2, stride=2,
    bias=False)`` (each sees all C channels of a 2x2 cell: "many-to-one"; one index map per channel:
    "depthwise") give four logits per channel and low-res pixel; ``sigmoid`` gives the **decoder
    index**, ``softmax`` of the sigmoids over the four gives the **encoder index**; both are
    pixel-shuffled so that conv ``k`` fills sub-pixel ``(k // 2, k % 2)``.

    Upsampling applies the **decoder index** (as ``IndexedUpsamlping`` in the matting decoder):
    ``out = idx_de * NN_up(x)``. The encoder index is only used by IndexNet's own encoder pooling
    (``avg_pool(idx_en * y) * 4``); it is available from :meth:`index_maps` but not used here.

    Generalisation to ``s != 2``: ``s^2`` convs with kernel ``s`` and stride ``s``. The four convs
    are stored as one ``Conv2d(Cg, s^2 C, s, stride=s, bias=False)``: output channels
    ``k*C ... k*C + C - 1`` are the official ``indexnet{k+1}`` (load official weights with
    ``torch.cat([w1, w2, w3, w4], 0)``). Init: PyTorch default (the SegFormer baseline code sets none).

    Ceil-mode guides (H' < s*H): y is zero-padded at the bottom/right to ``(s*H, s*W)`` before the
    strided conv and the result cropped; the official code requires an exactly divisible y.

    Params: ``s^4 * C * Cg`` = 16 C^2 = 1,048,576 at C = Cg = 256, s = 2. The papers' tables report
    exactly twice this per upsampler in every table (docs/SEMANTICS.md §4.4); we count each parameter once.
    """

    needs_guide = True

    def __init__(self, in_channels: int, *, guide_channels: int | None = None, scale_factor: int = 2):
        super().__init__(in_channels, guide_channels=guide_channels, scale_factor=scale_factor)
        s = self.scale_factor
        self.index_conv = nn.Conv2d(self.guide_channels, s * s * self.in_channels, s, stride=s, bias=False)

    def _logits(self, x, guide):
        s = self.scale_factor
        H, W = x.shape[-2:]
        Hg, Wg = guide.shape[-2:]
        if torch.compiler.is_exporting() or (Hg, Wg) != (s * H, s * W):  # no size test: it would fix H' = s*H
            guide = F.pad(guide, (0, s * W - Wg, 0, s * H - Hg))
        B, C = x.shape[:2]
        # [B, s^2*C, H, W], channel k*C + c -> [B, s^2, C, H, W]
        return self.index_conv(guide).view(B, s * s, C, H, W)

    def _shuffle(self, t):
        """[B, s^2, C, H, W] (index k = sub-pixel (k // s, k % s)) -> [B, C, sH, sW]."""
        B, s2, C, H, W = t.shape
        return pixel_shuffle(t.transpose(1, 2).reshape(B, C * s2, H, W), self.scale_factor)

    def index_maps(self, x: torch.Tensor, guide: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx_en, idx_de)``, each ``[B, C, H', W']``: encoder index (softmax over the ``s^2``
        sub-pixels of the sigmoids) and decoder index (sigmoid), as the official block returns."""
        size = self.output_size(x, guide)
        y = torch.sigmoid(self._logits(x, guide))
        return crop(self._shuffle(torch.softmax(y, dim=1)), size), crop(self._shuffle(y), size)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        size = self.output_size(x, guide)
        idx_de = crop(self._shuffle(torch.sigmoid(self._logits(x, guide))), size)
        return (idx_de * nearest_up(x, self.scale_factor, size)).to(x.dtype)
