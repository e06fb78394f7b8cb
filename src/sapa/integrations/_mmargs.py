"""OpenMMLab argument names -> sapa constructor arguments, and official state dicts -> sapa's.

Pure Python (no mmengine): :mod:`sapa.integrations.openmmlab` registers these builders in mmengine's
``MODELS``; the translation and the converters are usable and tested without the extra.

Where the names come from (the official code, read for its argument names only):

* mmcv ``CARAFEPack(channels, scale_factor, up_kernel, up_group, encoder_kernel, encoder_dilation,
  compressed_channels)``, ``PixelShufflePack(in_channels, out_channels, scale_factor,
  upsample_kernel)``, ``nn.ConvTranspose2d`` for ``deconv`` and ``nn.Upsample`` for
  ``nearest`` / ``bilinear`` (what ``mmcv.cnn.build_upsample_layer`` builds);
* the forks' ``build_upsampler(cfg, in_channels, scale_factor)`` (``tiny-smart/
  segmentation-with-upsamplers`` / ``detection-with-upsamplers``): types ``sapa`` (``SAPA(dim_y,
  dim_x, scale_factor, up_kernel_size, embedding_dim, qkv_bias, norm)``), ``sapadeform``
  (``num_point, groups, embedding_dim, qkv_bias, high_offset, norm``), ``fade`` (``in_channels_en,
  in_channels_de, up_kernel_size, gating``), ``dysample`` (``style, groups, dyscope``), ``carafe``,
  ``deconv``, ``pixelshuffle``, ``nearest``, ``bilinear``; the detection fork adds ``guided``.

Defaults: everything built through this module uses the official configs' defaults, pinned here
(so a later change of a sapa default does not change what an mm config builds). The one that differs
from sapa's own default: FADE is ungated (``gating=False``, the forks' default; sapa's ``fade``
defaults to the gated ECCV module).
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..registry import Upsampler, get_upsampler_class, list_upsamplers

__all__ = ["FORK_TYPES", "MM_DEFAULTS", "accepted_args", "translate", "build_mm_upsampler",
           "convert_state_dict", "convert_checkpoint"]

# fork build_upsampler type -> sapa name
FORK_TYPES = {"sapa": "sapa_b", "sapadeform": "sapa_d", "fade": "fade", "dysample": "dysample",
              "carafe": "carafe", "deconv": "deconv", "pixelshuffle": "pixelshuffle", "pixel_shuffle": "pixelshuffle",
              "nearest": "nearest", "bilinear": "bilinear", "a2u": "a2u", "indexnet": "indexnet"}

# mm name -> sapa name, per upsampler (on top of the constructor's own names and _COMMON)
_COMMON = {"channels": "in_channels"}
_ALIASES: dict[str, dict[str, str]] = {
    "carafe": {"up_kernel": "kernel_size", "up_group": "groups"},
    "sapa_i": {"up_kernel_size": "kernel_size", "dim_y": "guide_channels", "dim_x": "in_channels"},
    "sapa_b": {"up_kernel_size": "kernel_size", "dim_y": "guide_channels", "dim_x": "in_channels"},
    "sapa_g": {"up_kernel_size": "kernel_size", "dim_y": "guide_channels", "dim_x": "in_channels"},
    "sapa_d": {"num_point": "num_points", "dim_y": "guide_channels", "dim_x": "in_channels"},
    "fade": {"up_kernel_size": "kernel_size", "in_channels_en": "guide_channels", "in_channels_de": "in_channels"},
    "pixelshuffle": {"upsample_kernel": "kernel_size"},
}
# Official defaults, pinned (see module docstring).
MM_DEFAULTS: dict[str, dict[str, Any]] = {
    "carafe": dict(kernel_size=5, groups=1, encoder_kernel=3, encoder_dilation=1, compressed_channels=64),
    "sapa_b": dict(kernel_size=5, embedding_dim=32, qkv_bias=True, norm=True, version="journal"),
    "sapa_d": dict(num_points=9, groups=4, embedding_dim=32, qkv_bias=True, high_offset=True, norm=False),
    "fade": dict(kernel_size=5, gating=False),
    "dysample": dict(style="lp", groups=4, dyscope=False),
    "deconv": dict(kernel_size=3),
    "pixelshuffle": dict(kernel_size=3),
}
# Arguments of the official layers that sapa's modules fix: accepted when they agree with sapa.
_FIXED = {
    "deconv": ("stride", "padding", "output_padding", "out_channels"),
    "pixelshuffle": ("padding", "out_channels"),
    "nearest": ("mode",),
    "bilinear": ("mode",),
}
_META = ("guided", "guide_first")


def _sapa_name(type_: str) -> str:
    if not isinstance(type_, str):
        raise TypeError(f"mm upsampler config: type must be a str, got {type(type_).__name__}")
    name = type_[len("sapa."):] if type_.startswith("sapa.") else type_
    if name in list_upsamplers():
        return name
    if name in FORK_TYPES:
        return FORK_TYPES[name]
    raise KeyError(f"mm upsampler config: unknown type {type_!r}; valid: "
                   f"{', '.join('sapa.' + n for n in list_upsamplers())} (or the forks' types "
                   f"{', '.join(FORK_TYPES)})")


def _own_args(cls: type) -> list[str]:
    sig = inspect.signature(cls.__init__)
    return [p for p, v in sig.parameters.items() if p != "self" and v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD)]


def accepted_args(type_: str) -> list[str]:
    """Every argument name the mm config of ``type_`` accepts (sapa's, the mm aliases, the fixed ones)."""
    name = _sapa_name(type_)
    own = _own_args(get_upsampler_class(name))
    return sorted({*own, *_COMMON, *_ALIASES.get(name, {}), *_FIXED.get(name, ()), *_META})


def translate(cfg: Mapping[str, Any], in_channels: int | None = None,
              scale_factor: int | None = None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(sapa_name, kwargs, meta)`` for an mm-style config ``dict(type=..., **args)``.

    ``in_channels`` / ``scale_factor`` are what a host passes (the forks' ``build_upsampler(cfg,
    in_channels, scale_factor)``); a config's own value must agree. ``meta`` holds ``guided`` and
    ``guide_first``. Unknown names raise ``TypeError`` listing the accepted ones.
    """
    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise KeyError(f"mm upsampler config must be a dict with a 'type' key, got {cfg!r}")
    cfg = dict(cfg)
    type_ = cfg.pop("type")
    name = _sapa_name(type_)
    cls = get_upsampler_class(name)
    own = set(_own_args(cls))
    aliases = {**_COMMON, **_ALIASES.get(name, {})}
    fixed = _FIXED.get(name, ())
    unknown = [k for k in cfg if k not in own and k not in aliases and k not in fixed and k not in _META]
    if unknown:
        raise TypeError(f"mm upsampler config {type_!r}: unknown argument(s) {', '.join(map(repr, unknown))}; "
                        f"accepted: {', '.join(accepted_args(type_))}")
    kw: dict[str, Any] = dict(MM_DEFAULTS.get(name, {}))
    given: dict[str, str] = {}
    meta = {k: cfg.pop(k) for k in _META if k in cfg}
    fixed_vals = {k: cfg.pop(k) for k in fixed if k in cfg}
    for k, v in cfg.items():
        target = aliases.get(k, k)
        if target in given:
            raise TypeError(f"mm upsampler config {type_!r}: {given[target]!r} and {k!r} both set {target!r}")
        given[target] = k
        kw[target] = v
    for arg, host in (("in_channels", in_channels), ("scale_factor", scale_factor)):
        if host is None:
            continue
        if arg in given and kw[arg] != host:
            raise ValueError(f"mm upsampler config {type_!r}: {given[arg]}={kw[arg]} but the host builds it with "
                             f"{arg}={host}")
        kw[arg] = host
    if "in_channels" not in kw and name not in ("nearest", "bilinear"):
        raise TypeError(f"mm upsampler config {type_!r}: the channel count is missing; pass channels= (or "
                        f"in_channels=)")
    _check_fixed(type_, name, kw, fixed_vals)
    if "guided" in meta and not meta["guided"] and cls.needs_guide:
        raise ValueError(f"mm upsampler config {type_!r}: guided=False, but {name} is a guided upsampler "
                         f"(it needs the finer feature map); use guided=True or an unguided type")
    return name, kw, meta


def _check_fixed(type_: str, name: str, kw: dict, fixed: dict) -> None:
    s = kw.get("scale_factor", 2)
    k = kw.get("kernel_size", 3)
    want = {"stride": s, "padding": k // 2, "output_padding": s - 1, "out_channels": kw.get("in_channels"),
            "mode": name}
    if name == "pixelshuffle":
        want["out_channels"] = kw.get("in_channels")
    for arg, v in fixed.items():
        if v != want[arg]:
            raise ValueError(f"mm upsampler config {type_!r}: {arg}={v!r} is not supported; sapa's {name} uses "
                             f"{arg}={want[arg]!r} (from kernel_size={k}, scale_factor={s})")


@functools.lru_cache(maxsize=None)
def _guide_first_class(cls: type[Upsampler]) -> type[Upsampler]:
    """``cls`` with ``forward(guide, x)``: the forks' heads call ``up(y_highres, x_lowres)``."""
    def forward(self, guide, x):
        return cls.forward(self, x, guide)
    return type(f"{cls.__name__}GuideFirst", (cls,), {"forward": forward, "__module__": __name__,
                                                     "__doc__": f"{cls.__name__} called as up(guide, x)."})


class _NoChannelCheck:
    """Parameter-free nearest / bilinear built without ``channels`` (as ``nn.Upsample``): any C."""

    def output_size(self, x, guide):
        from .. import _checks as C

        C.tensor4d("x", x)
        if guide is None:
            return self.scale_factor * x.shape[-2], self.scale_factor * x.shape[-1]
        C.tensor4d("guide", guide)
        return C.guide_size("guide", guide, "x", x, self.scale_factor)


@functools.lru_cache(maxsize=None)
def _any_channels_class(cls: type[Upsampler]) -> type[Upsampler]:
    return type(f"{cls.__name__}AnyChannels", (_NoChannelCheck, cls), {"__module__": __name__})


def build_mm_upsampler(cfg: Mapping[str, Any], in_channels: int | None = None,
                       scale_factor: int | None = None) -> Upsampler:
    """Build a sapa upsampler from an mm-style config (``sapa.<name>`` or a fork type), see :func:`translate`.

    The result is the sapa module itself (same class, same state-dict keys); with
    ``guide_first=True`` a subclass whose ``forward(guide, x)`` takes the forks' argument order.
    """
    name, kw, meta = translate(cfg, in_channels, scale_factor)
    cls = get_upsampler_class(name)
    if "in_channels" not in kw:  # nearest / bilinear as nn.Upsample: no channel count
        cls = _any_channels_class(cls)
        kw["in_channels"] = 1
    if meta.get("guide_first"):
        cls = _guide_first_class(cls)
    ch = kw.pop("in_channels")
    return cls(ch, **kw)


# --- official state dicts -> sapa ---------------------------------------------------------------
def convert_state_dict(sd: Mapping[str, torch.Tensor], module: Upsampler) -> dict[str, torch.Tensor]:
    """Map the state dict of an official upsampler module to ``module``'s keys.

    * mmcv ``CARAFEPack``, the forks' ``SAPA`` / ``SAPADeform``: same keys (returned unchanged);
      ``SAPADeform(qkv_bias=False)`` has no ``offset.bias``: a zero bias is added (sapa's offset conv
      always has one; a zero bias gives the same output);
    * the forks' ``FADE``: ``ker_generator.<x>`` -> ``<x>``, ``gate_generator.conv`` -> ``gate``;
    * the forks' ``DySample``: the ``init_pos`` buffer is dropped (sapa computes it);
    * ``nn.ConvTranspose2d`` (deconv): ``weight`` -> ``deconv.weight``; the forks' pixelshuffle
      ``nn.Sequential`` (``0.weight``) and mmcv ``PixelShufflePack`` (``upsample_conv.weight``) ->
      ``conv.weight``.
    """
    out = {}
    for k, v in sd.items():
        if k == "init_pos":
            continue
        if k.startswith("ker_generator."):
            k = k[len("ker_generator."):]
        elif k.startswith("gate_generator.conv."):
            k = "gate." + k[len("gate_generator.conv."):]
        elif k.startswith("upsample_conv."):
            k = "conv." + k[len("upsample_conv."):]
        elif k.startswith("0.") and hasattr(module, "conv"):
            k = "conv." + k[2:]
        elif k in ("weight", "bias") and hasattr(module, "deconv"):
            k = "deconv." + k
        out[k] = v
    own = module.state_dict()
    if "offset.bias" in own and "offset.weight" in out and "offset.bias" not in out:
        out["offset.bias"] = torch.zeros_like(own["offset.bias"])
    return out


def convert_checkpoint(sd: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Apply :func:`convert_state_dict` to every sapa upsampler inside ``model`` (a whole-network
    checkpoint, e.g. of the forks' ``FPN_UPSAMPLE``); keys of upsamplers the model does not have
    (the fork FPN's unused extra-level upsamplers) are dropped, all other keys are kept as they are."""
    subs = {name: m for name, m in model.named_modules() if isinstance(m, Upsampler) and name}
    out: dict[str, torch.Tensor] = {}
    taken: set[str] = set()
    for name, m in subs.items():
        p = name + "."
        part = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
        taken.update(p + k for k in part)
        out.update({p + k: v for k, v in convert_state_dict(part, m).items()})
    parents = {n.rsplit(".", 1)[0] for n in subs if "." in n}
    for k, v in sd.items():
        if k in taken:
            continue
        # an upsampler list the model has, at an index it does not have -> the fork's unused extras
        prefix = next((p for p in parents if k.startswith(p + ".")), None)
        if prefix is not None and k[len(prefix) + 1:].split(".")[0].isdigit():
            continue
        out[k] = v
    return out
