"""Building blocks shared by the upsampler modules (private)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of each pixel of an NCHW map (the NeurIPS SAPA norm)."""

    def __init__(self, channels: int, eps: float = 1e-5, elementwise_affine: bool = True):
        super().__init__(channels, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


def group_norm(channels: int, num_groups: int = 32, owner: str = "", affine: bool = True) -> nn.GroupNorm:
    """GroupNorm(32, C) as the journal code, with a clear error where C is not a multiple of 32."""
    if channels % num_groups != 0:
        raise ValueError(f"{owner}: GroupNorm({num_groups}, C) needs channels divisible by {num_groups}, "
                         f"got {channels}; pass norm=False, norm='layer', or channels that are a "
                         f"multiple of {num_groups}")
    return nn.GroupNorm(num_groups, channels, affine=affine)


def conv1x1(cin: int, cout: int, bias: bool = True, std: float = 0.02) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 1, bias=bias)
    nn.init.normal_(conv.weight, std=std)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


class Linear2d(nn.Linear):
    """``nn.Linear`` applied per pixel of an NCHW map (the NeurIPS code's channels-last Linear;
    state_dict keys and shapes match it). Initialised trunc_normal(std=0.02), zero bias."""

    def __init__(self, cin: int, cout: int, bias: bool = True):
        super().__init__(cin, cout, bias=bias)
        nn.init.trunc_normal_(self.weight, std=0.02)
        if bias:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias
        return F.conv2d(x, self.weight[:, :, None, None], b)


def crop(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    H, W = size
    if torch.compiler.is_exporting():
        # Guard-free under torch.export: comparing sizes (or slicing) would fix H' = s*H at the
        # example's sizes and lose the ceil-mode guide sizes (see sapa/ops/window/export.py: crop).
        from ..ops.window.export import crop as export_crop
        return export_crop(t, H, W)
    if t.shape[-2] == H and t.shape[-1] == W:
        return t
    return t[..., :H, :W]


def pixel_shuffle(t: torch.Tensor, s: int) -> torch.Tensor:
    """``F.pixel_shuffle``, also differentiable for batch 0: PyTorch's PixelShuffleBackward0
    returns a gradient of the output's shape for an empty batch ("returned an invalid gradient");
    the view / permute form, used only then, has a correct backward."""
    if t.shape[0] != 0:
        return F.pixel_shuffle(t, s)
    B, Cs, H, W = t.shape
    C = Cs // (s * s)
    return t.reshape(B, C, s, s, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C, H * s, W * s)


def nearest_up(t: torch.Tensor, s: int, size: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling by integer ``s`` (repeat each pixel s x s), cropped to ``size``."""
    if s == 1:
        return crop(t, size)
    return crop(t.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1), size)
