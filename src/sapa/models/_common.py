"""Pieces shared by the host networks (private): per-stage upsampler construction, the fixed-resize
baseline, mmcv-style ConvModule, and local checkpoint reading."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Upsampler, build_upsampler


class Resize(nn.Module):
    """``F.interpolate(x, size=guide.shape[-2:])``: the fixed resize the original hosts use
    (mmseg ``resize`` / mmdet ``F.interpolate(size=prev_shape)``). Parameter-free, not registered:
    it is what the strings ``"bilinear"`` / ``"nearest"`` mean inside UPerHead and FPN so that the
    baselines match the original code exactly, ceil-mode sizes included."""

    needs_guide = False

    def __init__(self, mode: str, align_corners: bool = False):
        super().__init__()
        if mode not in ("nearest", "bilinear"):
            raise ValueError(f"Resize: mode must be 'nearest' or 'bilinear', got {mode!r}")
        self.mode = mode
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        if guide is None:
            raise ValueError("Resize needs the guide (its size is the output size)")
        size = tuple(guide.shape[-2:])
        if self.mode == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}" + (", align_corners=True" if self.align_corners else "")


def describe_spec(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        return str(spec.get("type", spec))
    if isinstance(spec, type):
        return getattr(spec, "name", "") or spec.__name__
    if isinstance(spec, nn.Module):
        return getattr(spec, "name", "") or type(spec).__name__
    return repr(spec)


def build_stage_upsamplers(spec: Any, n: int, channels: int, host: str, *, resize_names: Sequence[str] = (),
                           align_corners: bool = False, preset_host: str | None = None) -> nn.ModuleList:
    """``n`` upsamplers on ``channels``-channel maps, each guided by a ``channels``-channel map.

    ``spec``: a registered name, ``dict(type=..., **kw)`` or ``Upsampler`` class (one fresh module
    per stage), or a list/tuple of ``n`` such specs or instances (one per stage). A single
    instance cannot serve ``n > 1`` stages (its parameters would be shared); that raises
    ``TypeError``. Names in ``resize_names`` become :class:`Resize` (the host's original resize).
    ``preset_host``: names and dicts get that host's published configuration
    (:func:`sapa.models.presets.resolve_spec`; the user's keys win).
    """
    if isinstance(spec, (list, tuple)):
        if len(spec) != n:
            raise ValueError(f"{host}: upsampler list has {len(spec)} entries, the host has {n} "
                             f"upsampling stages")
        specs = list(spec)
    elif isinstance(spec, nn.Module):
        if n == 1:
            specs = [spec]
        else:
            raise TypeError(f"{host}: got an upsampler instance ({type(spec).__name__}), but the host has {n} "
                            f"upsampling stages and one instance cannot be shared between them; pass a "
                            f"name, dict(type=...), or class (one module is built per stage), or a list "
                            f"of {n} instances")
    else:
        specs = [spec] * n
    if preset_host is not None:
        from .presets import resolve_spec
        specs = [s if isinstance(s, str) and s in resize_names else resolve_spec(preset_host, s) for s in specs]
    mods = []
    for i, s in enumerate(specs):
        if isinstance(s, str) and s in resize_names:
            mods.append(Resize(s, align_corners))
        elif isinstance(s, nn.Module) and not isinstance(s, Upsampler):
            mods.append(s)  # any module with forward(x, guide) (tests, user experiments)
        else:
            try:
                mods.append(build_upsampler(s, channels, guide_channels=channels, scale_factor=2))
            except (TypeError, ValueError) as err:
                raise type(err)(f"{host}: upsampler {i} ({describe_spec(s)}): {err}") from err
    if len({id(m) for m in mods}) != len(mods):
        raise ValueError(f"{host}: the same upsampler instance appears twice in the list; every stage "
                         f"needs its own module")
    return nn.ModuleList(mods)


class ConvModule(nn.Sequential):
    """mmcv ``ConvModule``: conv (no bias when normalised) + BatchNorm + ReLU; children named
    ``conv``/``bn``/``activate`` as mmcv does, so mmseg checkpoints map one-to-one."""

    def __init__(self, cin: int, cout: int, kernel_size: int, padding: int = 0, norm: bool = True,
                 act: bool = True):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, kernel_size, padding=padding, bias=not norm))
        if norm:
            self.add_module("bn", nn.BatchNorm2d(cout))
        if act:
            self.add_module("activate", nn.ReLU(inplace=True))
        # mmcv's ConvModule init: kaiming_normal (fan_out, relu) for the conv, 1/0 for the norm.
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)


def strip_prefix(sd: Mapping[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Remove the first matching prefix of each key (e.g. ``module.``, ``backbone.``)."""
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def load_checked(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str, source: str,
                 ignore: Sequence[str] = ()) -> None:
    """``load_state_dict`` that names every missing, unexpected or mis-shaped key in one error.

    Keys starting with an entry of ``ignore`` (e.g. a classifier) are dropped from ``sd`` first;
    ``num_batches_tracked`` buffers may be missing or extra."""
    sd = {k: v for k, v in sd.items() if not any(k.startswith(p) for p in ignore)}
    own = module.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own and not k.endswith("num_batches_tracked")]
    sd = {k: v for k, v in sd.items() if k in own}
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        def head(items):
            return "; ".join(items[:8]) + (f"; ... ({len(items)} in all)" if len(items) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {head(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {head(mismatched)}")
        raise ValueError(f"{what}: cannot load {source}: " + " | ".join(parts))
    module.load_state_dict(sd, strict=False)
