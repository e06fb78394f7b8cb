"""DySample: learning to upsample by learning to sample (Liu et al., ICCV 2023).

Source read: ``tiny-smart/dysample`` ``dysample.py`` (identical to the copy in
``tiny-smart/segmentation-with-upsamplers`` ``mmseg/models/upsamplers/dysample.py``, whose
``build_upsampler`` defaults are ``style='lp', groups=4, dyscope=False``). Not in the SAPA papers'
tables; included because the same group's forks build it next to SAPA (docs/SEMANTICS.md §2.5, [C7]).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks as C
from ..registry import Upsampler, register_upsampler
from ._layers import crop


def _pixel_unshuffle(t: torch.Tensor, s: int) -> torch.Tensor:
    """``F.pixel_unshuffle`` (channel ``c*s*s + a*s + b`` <- sub-pixel ``(a, b)`` of channel ``c``)
    written as a view + permute: torch 2.13's ``F.pixel_unshuffle`` returns an empty batch unchanged
    ([0, C, sH, sW] instead of [0, s*s*C, H, W])."""
    B, Cc, Hs, Ws = t.shape
    H, W = Hs // s, Ws // s
    return t.view(B, Cc, H, s, W, s).permute(0, 1, 3, 5, 2, 4).reshape(B, Cc * s * s, H, W)


@register_upsampler("dysample")
class DySample(Upsampler):
    """Point-sampling upsampler: every output pixel bilinearly samples x at a predicted position.

    Offsets (per group of ``C/G`` contiguous channels and per sub-pixel), in low-res pixels:

    * ``style='lp'`` (linear then pixel-shuffle): ``o = Conv1x1_{C -> 2 G s^2}(x)``;
    * ``style='pl'`` (pixel-shuffle then linear): ``o = pixel_unshuffle(Conv1x1_{C/s^2 -> 2G}(pixel_shuffle(x)))``;
    * static scope (``dyscope=False``, default): ``o * 0.25``; dynamic scope: a second conv of the
      same shape, ``o * sigmoid(scope) * 0.5`` (the product is taken before ``pixel_unshuffle`` in 'pl').

    Channel layout of the ``2 G s^2`` offsets: ``[x/y, group, sub-row, sub-col]`` (x offsets first).
    The initial sub-pixel grid (:meth:`init_pos`) adds ``((b - (s-1)/2)/s, (a - (s-1)/2)/s)`` to
    sub-pixel ``(a, b)``, so with zero offsets every output pixel samples at exactly the position
    bilinear interpolation (align_corners=False) uses: DySample starts as bilinear upsampling.
    Sampling: position ``(j + 0.5 + o_x, i + 0.5 + o_y)`` of low-res pixel ``(i, j)`` in
    ``grid_sample``'s pixel-edge units, ``mode='bilinear', align_corners=False,
    padding_mode='border'`` (contrast SAPA-D: no base grid, no scaling, zero padding).

    Init as the official code: offset conv normal(std=0.001), zero bias; scope conv all zeros
    (``sigmoid(0) = 0.5``). Parameter names (``offset``, ``scope``) match the official module.
    Deviation: the official module stores the initial grid as a float32 buffer ``init_pos``; here it
    is computed in the offsets' dtype on every call (exact in float64 for any s, e.g. +-1/3 at s=3),
    so official state_dicts load with ``strict=False`` (the ``init_pos`` key is not needed).

    Half precision: for float16/bfloat16 x the sampling grid and ``grid_sample`` run in float32
    (a bfloat16 grid in [-1, 1] is off by up to half a pixel on a 256-wide map); output in x's dtype.

    Args: style ('lp' | 'pl'), groups G (4; must divide C), dyscope (False); 'pl' needs C % s^2 == 0.
    Params ('lp'): ``(C + 1) * 2 G s^2`` (x2 with dyscope) = 8,224 at C = 256, s = 2;
    ('pl'): ``(C/s^2 + 1) * 2G`` (x2 with dyscope) = 520.
    """

    needs_guide = False

    def __init__(self, in_channels: int, *, guide_channels: int | None = None, scale_factor: int = 2,
                 style: str = "lp", groups: int = 4, dyscope: bool = False):
        super().__init__(in_channels, guide_channels=guide_channels, scale_factor=scale_factor)
        if style not in ("lp", "pl"):
            raise ValueError(f"DySample: style must be 'lp' or 'pl', got {style!r}")
        self.style = style
        self.groups = C.positive_int("groups", groups)
        self.dyscope = bool(dyscope)
        s, G = self.scale_factor, self.groups
        C.divisible("in_channels", self.in_channels, G)
        if style == "pl":
            C.divisible("in_channels", self.in_channels, s * s, "scale_factor**2 (style='pl')")
            cin, cout = self.in_channels // (s * s), 2 * G
        else:
            cin, cout = self.in_channels, 2 * G * s * s
        self.offset = nn.Conv2d(cin, cout, 1)
        nn.init.normal_(self.offset.weight, std=0.001)
        nn.init.zeros_(self.offset.bias)
        if self.dyscope:
            self.scope = nn.Conv2d(cin, cout, 1)
            nn.init.zeros_(self.scope.weight)
            nn.init.zeros_(self.scope.bias)

    def init_pos(self, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """Initial sub-pixel offsets ``[1, 2*G*s^2, 1, 1]``, layout ``[x/y, group, sub-row, sub-col]``."""
        s, G = self.scale_factor, self.groups
        h = (torch.arange(s, dtype=torch.float64, device=device) - (s - 1) / 2) / s
        pos = torch.stack([h.view(1, s).expand(s, s), h.view(s, 1).expand(s, s)])  # [2 (x, y), s, s]
        return pos.unsqueeze(1).expand(2, G, s, s).reshape(1, 2 * G * s * s, 1, 1).to(dtype)

    def offsets(self, x: torch.Tensor) -> torch.Tensor:
        """Sampling offsets in low-res pixels, initial grid included: ``[B, 2*G*s^2, H, W]``."""
        s = self.scale_factor
        src = F.pixel_shuffle(x, s) if self.style == "pl" else x
        o = self.offset(src)
        if self.dyscope:
            o = o * torch.sigmoid(self.scope(src))
        if self.style == "pl":
            o = _pixel_unshuffle(o, s)
        return o * (0.5 if self.dyscope else 0.25) + self.init_pos(o.dtype, o.device)

    def sample(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Bilinearly sample x at ``pixel centre + offset``: ``[B, C, H, W]`` -> ``[B, C, sH, sW]``."""
        s, G = self.scale_factor, self.groups
        B, Cx, H, W = x.shape
        low = x.dtype in (torch.float16, torch.bfloat16)
        o = offset.view(B, 2, G * s * s, H, W)
        if low:
            o = o.float()
        cx = torch.arange(W, device=x.device, dtype=o.dtype) + 0.5
        cy = torch.arange(H, device=x.device, dtype=o.dtype).view(H, 1) + 0.5
        gx = 2 * (cx + o[:, 0]) / W - 1
        gy = 2 * (cy + o[:, 1]) / H - 1
        # [B, 2, G*s*s, H, W] -> [B*G, sH, sW, 2]: sub-pixel (a, b) of (i, j) -> (s*i + a, s*j + b).
        # (A pixel_shuffle on this 5-D tensor has no backward for every memory format.)
        grid = torch.stack([gx, gy], dim=1).view(B, 2, G, s, s, H, W)
        grid = grid.permute(0, 2, 5, 3, 6, 4, 1).reshape(B * G, s * H, s * W, 2)
        out = F.grid_sample(x.reshape(B * G, Cx // G, H, W).to(grid.dtype), grid, mode="bilinear",
                            padding_mode="border", align_corners=False)
        return out.view(B, Cx, s * H, s * W).to(x.dtype)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        size = self.output_size(x, guide)
        return crop(self.sample(x, self.offsets(x)), size)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", style={self.style!r}, groups={self.groups}, "
                f"dyscope={self.dyscope}")
