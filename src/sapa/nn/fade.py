"""FADE: fusing the assets of decoder and encoder (Lu et al., ECCV 2022).

Sources read: ``poppinace/fade`` ``FADE_L2H.py`` (the ECCV module with the gate, used by the FADE
SegFormer runs, ``segformer/segformer_head.py``) and ``tiny-smart/segmentation-with-upsamplers``
``mmseg/models/upsamplers/fade.py`` (same kernel generator, ``gating=False`` by default in the
mmseg/mmdet forks). docs/SEMANTICS.md §5.4 explains both versions.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks as C
from .. import functional as Fn
from ..registry import Upsampler, register_upsampler
from ._layers import nearest_up


def _xavier(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.xavier_uniform_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


@register_upsampler("fade")
class FADE(Upsampler):
    """FADE: semi-shift kernel generator + CARAFE K x K reassembly (+ decoder-dependent gate).

    Kernel generator (``SemiShift`` in the official code): ``enc = Conv1x1_{Cy->64}(y)`` (bias),
    ``dec = Conv1x1_{Cx->64}(x)`` (no bias), one shared ``Conv3x3_{64->K^2}`` (padding 1, bias)
    applied to both, the decoder branch at low resolution then nearest-upsampled:

        ``logits = conv3(enc) + NN_up(conv3(dec))``;  ``kernels = softmax(logits)`` over ``K^2``

    (the shared conv's bias is therefore added twice, as in the official code). This is the
    "semi-shift" convolution: a 3x3 window over the concatenated encoder/decoder features where
    each high-res point sees the 3x3 low-res decoder neighbourhood of its parent pixel. The
    kernels reassemble the decoder x (:func:`sapa.functional.reassemble`, groups 1).

    Gate (``gating=True``, default; the ECCV/SegFormer version): ``g = sigmoid(NN_up(Conv1x1_{Cx->1}(x)))``,
    ``out = g * y + (1 - g) * reassembled``; needs ``guide_channels == in_channels``. With
    ``gating=False`` (the mmseg/mmdet forks' default) the output is the reassembled x only.

    Init as the official code: Xavier-uniform weights, zero biases, for every conv.

    Deviations: the official code upsamples with ``F.interpolate(scale_factor=2)`` (hard-wired x2);
    here ``scale_factor`` s is used, and ceil-mode guides are handled by cropping the upsampled
    decoder terms to the guide's size. Non-square maps work (the pure-PyTorch CARAFE in
    ``poppinace/fade/pytorch_implementation`` hard-codes ``padding=2`` and an einops layout).

    Args: kernel_size K (5), gating (True), embedding_dim (64), encoder_kernel (3, odd).
    Params: ``Cy*64 + 64 + Cx*64 + 64*K^2*9 + K^2`` (+ ``Cx + 1`` with the gate) =
    47,514 at C = 256 with the gate, 47,257 without.
    """

    needs_guide = True

    def __init__(self, in_channels: int, *, guide_channels: int | None = None, scale_factor: int = 2,
                 kernel_size: int = 5, gating: bool = True,
                 embedding_dim: int = 64, encoder_kernel: int = 3):
        super().__init__(in_channels, guide_channels=guide_channels, scale_factor=scale_factor)
        self.kernel_size = C.kernel_size(kernel_size)
        self.gating = bool(gating)
        self.embedding_dim = C.positive_int("embedding_dim", embedding_dim)
        self.encoder_kernel = C.kernel_size(encoder_kernel)
        cy, cx, m, K = self.guide_channels, self.in_channels, self.embedding_dim, self.kernel_size
        if self.gating and cy != cx:
            raise ValueError(f"FADE: gating mixes the guide into the output (g * y + (1 - g) * up(x)), "
                             f"so guide_channels must equal in_channels, got guide_channels={cy}, "
                             f"in_channels={cx}; pass gating=False for different channel counts")
        self.compressor_en = _xavier(nn.Conv2d(cy, m, 1))
        self.compressor_de = _xavier(nn.Conv2d(cx, m, 1, bias=False))
        self.content_encoder = _xavier(nn.Conv2d(m, K * K, encoder_kernel, padding=encoder_kernel // 2))
        if self.gating:
            self.gate = _xavier(nn.Conv2d(cx, 1, 1))

    def kernels(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """Semi-shift kernels, softmax-normalised: ``[B, K^2, H', W']``."""
        size = self.output_size(x, guide)
        enc = self.content_encoder(self.compressor_en(guide))
        dec = self.content_encoder(self.compressor_de(x))
        return torch.softmax(enc + nearest_up(dec, self.scale_factor, size), dim=1)

    def gate_map(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``sigmoid(NN_up(Conv1x1(x)))`` ``[B, 1, H', W']`` (sigmoid and nearest upsampling commute)."""
        return nearest_up(torch.sigmoid(self.gate(x)), self.scale_factor, size)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        size = self.output_size(x, guide)
        up = Fn.reassemble(self.kernels(x, guide), x, self.kernel_size, self.scale_factor, 1)
        if not self.gating:
            return up.to(x.dtype)
        g = self.gate_map(x, size)
        return (g * guide + (1 - g) * up).to(x.dtype)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", kernel_size={self.kernel_size}, gating={self.gating}, "
                f"embedding_dim={self.embedding_dim}, encoder_kernel={self.encoder_kernel}")
