"""The SAPA family: SAPA-I, SAPA-B, SAPA-G (window kernels) and SAPA-D (dynamic kernel shape).

Semantics: docs/SEMANTICS.md §1-2; the ops are documented in :mod:`sapa.functional` (see ``sapa.functional.sapa``
and ``sapa.functional.sapa_deform``). Values are always the raw, un-normalised decoder feature x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks as C
from .. import functional as Fn
from ..registry import Upsampler, register_upsampler
from ._layers import LayerNorm2d, Linear2d, conv1x1, crop, group_norm, nearest_up, pixel_shuffle


def _make_norm(kind, channels: int, owner: str, affine: bool = True) -> nn.Module:
    """norm: False/None -> Identity, True/'group' -> GroupNorm(32, C), 'layer' -> per-pixel LayerNorm."""
    if kind in (False, None, "none"):
        return nn.Identity()
    if kind in (True, "group"):
        return group_norm(channels, 32, owner, affine=affine)
    if kind == "layer":
        return LayerNorm2d(channels, elementwise_affine=affine)
    raise ValueError(f"{owner}: norm must be one of False, True/'group', 'layer', got {kind!r}")


@register_upsampler("sapa_i")
class SAPAI(Upsampler):
    """SAPA-I: parameter-free inner-product similarity, ``q = y``, ``k = v = x`` (docs/SEMANTICS.md §2.1).

    Args:
        in_channels: C of x; the guide must have the same channel count.
        kernel_size: window size K (odd), default 5.
        norm: optional non-affine normalisation of q and k before the dot product: ``None``
            (default, the literal ``<y, x>``), ``'layer'`` (per-pixel LayerNorm) or ``'group'``
            (GroupNorm(32)). Never learnable, so the module has 0 parameters.
    """

    needs_guide = True

    def __init__(self, in_channels: int, *, guide_channels: int | None = None, scale_factor: int = 2,
                 kernel_size: int = 5, norm: bool | str | None = None):
        super().__init__(in_channels, guide_channels=guide_channels, scale_factor=scale_factor)
        if self.guide_channels != self.in_channels:
            raise ValueError(f"SAPAI: the inner product needs guide_channels == in_channels, got "
                             f"guide_channels={self.guide_channels}, in_channels={self.in_channels}")
        self.kernel_size = C.kernel_size(kernel_size)
        self.norm = norm
        self.norm_y = _make_norm(norm, in_channels, "SAPAI", affine=False)
        self.norm_x = _make_norm(norm, in_channels, "SAPAI", affine=False)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        self.output_size(x, guide)
        return Fn.sapa(self.norm_y(guide), self.norm_x(x), x, self.kernel_size, self.scale_factor)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel_size={self.kernel_size}, norm={self.norm!r}"


@register_upsampler("sapa_b")
class SAPAB(Upsampler):
    """SAPA-B: low-rank bilinear similarity ``<P_q norm(y), P_k norm(x)>`` (docs/SEMANTICS.md §2.2).

    Args:
        embedding_dim: d, default 32 (the papers' experiments).
        kernel_size: K, default 5.
        version: ``'journal'`` (default; GroupNorm(32) + 1x1 convs, normal(0.02) init — the
            extension / mmseg / mmdet code, which has no published row of its own) or ``'neurips'``
            (per-pixel LayerNorm + ``nn.Linear``, trunc_normal(0.02) init, zero bias — the NeurIPS
            ``SAPA.py`` / ``LCAExp(q_mode='encoder_only')`` that produced every published SAPA-B row;
            the hosts build this one by default, see :mod:`sapa.models.presets`).
        norm: ``True`` (default) is the version's own norm (journal: GroupNorm(32); NeurIPS:
            per-pixel LayerNorm); ``'group'``, ``'layer'`` or ``False`` choose one explicitly.
        qkv_bias: bias in the projections (default True).
    Params at C = Cg = 256, d = 32: 4C + 2(Cd + d) = 17,472 (both versions).
    """

    needs_guide = True

    def __init__(self, in_channels: int, *, guide_channels: int | None = None, scale_factor: int = 2,
                 kernel_size: int = 5, embedding_dim: int = 32,
                 version: str = "journal", norm: bool | str | None = True, qkv_bias: bool = True):
        super().__init__(in_channels, guide_channels=guide_channels, scale_factor=scale_factor)
        self.kernel_size = C.kernel_size(kernel_size)
        self.embedding_dim = C.positive_int("embedding_dim", embedding_dim)
        if version not in ("journal", "neurips"):
            raise ValueError(f"SAPAB: version must be 'journal' or 'neurips', got {version!r}")
        self.version = version
        cy, cx, d = self.guide_channels, self.in_channels, self.embedding_dim
        self.norm = norm
        if version == "neurips":
            kind = "layer" if norm is True else norm
            self.norm_y, self.norm_x = _make_norm(kind, cy, "SAPAB"), _make_norm(kind, cx, "SAPAB")
            self.q, self.k = Linear2d(cy, d, qkv_bias), Linear2d(cx, d, qkv_bias)
        else:
            self.norm_y = _make_norm(norm, cy, "SAPAB")
            self.norm_x = _make_norm(norm, cx, "SAPAB")
            self.q, self.k = conv1x1(cy, d, qkv_bias), conv1x1(cx, d, qkv_bias)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        self.output_size(x, guide)
        q = self.q(self.norm_y(guide))
        k = self.k(self.norm_x(x))
        return Fn.sapa(q, k, x, self.kernel_size, self.scale_factor)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", kernel_size={self.kernel_size}, embedding_dim={self.embedding_dim}, "
                f"version={self.version!r}, norm={self.norm!r}")


@register_upsampler("sapa_g")
class SAPAG(Upsampler):
    """SAPA-G: gated bilinear similarity, NeurIPS code ``SAPAExp(q_mode='gate')`` (docs/SEMANTICS.md §2.3).

    ``g = sigmoid(Linear_{C->1}(LN(x)))`` at low res, nearest-upsampled;
    ``q = g * P_qy(LN(y)) + (1 - g) * P_qx(NN_up(x))`` (un-normalised x, as the official code);
    ``k = P_k(LN(x))``; values raw x. ``P_qx`` is applied at low resolution before the nearest
    upsampling, which is the same map (a per-pixel linear map commutes with pixel repetition) at
    1/s^2 of the cost. ``qkv_bias`` (default True) sets the bias of all four Linear layers, the
    gate's included (``SAPAExp`` builds the gate with ``bias=qkv_bias``). Params at C = 256, d = 32:
    25,953 (25,856 without biases).
    """

    needs_guide = True

    def __init__(self, in_channels: int, *, guide_channels: int | None = None, scale_factor: int = 2,
                 kernel_size: int = 5, embedding_dim: int = 32,
                 qkv_bias: bool = True):
        super().__init__(in_channels, guide_channels=guide_channels, scale_factor=scale_factor)
        self.kernel_size = C.kernel_size(kernel_size)
        self.embedding_dim = C.positive_int("embedding_dim", embedding_dim)
        cy, cx, d = self.guide_channels, self.in_channels, self.embedding_dim
        self.norm_y, self.norm_x = LayerNorm2d(cy), LayerNorm2d(cx)
        self.q = Linear2d(cy, d, qkv_bias)
        self.q_x = Linear2d(cx, d, qkv_bias)
        self.k = Linear2d(cx, d, qkv_bias)
        self.gate = Linear2d(cx, 1, qkv_bias)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        size = self.output_size(x, guide)
        s = self.scale_factor
        x_n = self.norm_x(x)
        g = nearest_up(torch.sigmoid(self.gate(x_n)), s, size)
        q = g * self.q(self.norm_y(guide)) + (1 - g) * nearest_up(self.q_x(x), s, size)
        return Fn.sapa(q, self.k(x_n), x, self.kernel_size, s)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kernel_size={self.kernel_size}, embedding_dim={self.embedding_dim}"


@register_upsampler("sapa_d")
class SAPAD(Upsampler):
    """SAPA-D: SAPA with a dynamic kernel shape (the extension's ``SAPADeform``, docs/SEMANTICS.md §2.4).

    ``q = Conv1x1(y)`` and ``k = Conv1x1(x)`` with G groups of d channels; per high-res pixel, group
    and point, an offset (x first, low-res pixels, no scaling, no base grid: all points start at the
    low-res pixel centre) from ``Conv1x1(x -> 2*G*P*s^2)`` + pixel shuffle (``high_offset=True``) or
    ``Conv1x1(x -> 2*G*P)`` + nearest upsampling. Keys and raw values are sampled bilinearly (zero
    padding), softmax over the P points per group. See ``sapa.functional.sapa_deform``.

    Args: num_points P=9, groups G=4, embedding_dim d=32 (per group), qkv_bias=True (the bias of
    the q, k and offset convs: the official ``SAPADeform`` builds all three with ``bias=qkv_bias``),
    high_offset=True, norm=False (True: GroupNorm(32) on y and x). Init normal(0.02), zero bias:
    offsets ~ 0, so SAPA-D starts as nearest upsampling. Params at C=256: 139,808 (139,264
    without biases).
    """

    needs_guide = True

    def __init__(self, in_channels: int, *, guide_channels: int | None = None, scale_factor: int = 2,
                 num_points: int = 9, groups: int = 4,
                 embedding_dim: int = 32, qkv_bias: bool = True, high_offset: bool = True,
                 norm: bool | str | None = False):
        super().__init__(in_channels, guide_channels=guide_channels, scale_factor=scale_factor)
        self.num_points = C.positive_int("num_points", num_points)
        self.groups = C.positive_int("groups", groups)
        self.embedding_dim = C.positive_int("embedding_dim", embedding_dim)
        C.divisible("in_channels", self.in_channels, self.groups)
        self.high_offset = bool(high_offset)
        cy, cx, s = self.guide_channels, self.in_channels, self.scale_factor
        gd, gp = self.groups * self.embedding_dim, self.groups * self.num_points
        self.norm = norm
        self.norm_y = _make_norm(norm, cy, "SAPAD")
        self.norm_x = _make_norm(norm, cx, "SAPAD")
        self.q = conv1x1(cy, gd, qkv_bias)
        self.k = conv1x1(cx, gd, qkv_bias)
        self.offset = conv1x1(cx, 2 * gp * (s * s if self.high_offset else 1), qkv_bias)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        size = self.output_size(x, guide)
        s = self.scale_factor
        x_n = self.norm_x(x)
        off = self.offset(x_n)
        if self.high_offset:
            off = crop(pixel_shuffle(off, s), size)
        else:
            off = nearest_up(off, s, size)
        q = self.q(self.norm_y(guide))
        return Fn.sapa_deform(q, self.k(x_n), x, off, self.num_points, self.groups, s)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", num_points={self.num_points}, groups={self.groups}, "
                f"embedding_dim={self.embedding_dim}, high_offset={self.high_offset}, norm={self.norm!r}")
