"""The upsampler registry and the module contract every upsampler follows.

Contract
--------
* Constructor: ``Upsampler(in_channels, *, guide_channels=None, scale_factor=2, **kwargs)``.
  ``guide_channels=None`` means "same as in_channels".
* ``forward(x: [B, C, H, W], guide: [B, Cg, H', W'] | None = None) -> [B, C, H', W']`` where
  ``H' = scale_factor * H`` — or the guide's size when a guide is given and is smaller by less than
  ``scale_factor`` (ceil-mode strides, e.g. 167 from 84). Unguided upsamplers accept and only use
  the guide's *size* for that; guided ones (``needs_guide = True``) raise ``ValueError`` without one.
* Class attribute ``needs_guide: bool``; instance attributes ``in_channels``, ``guide_channels``,
  ``scale_factor``; ``extra_repr`` lists the settings.
* Output dtype = dtype of ``x``; works for batch 0 and any float dtype; gradients reach every parameter.
  Under ``torch.autocast`` the output has the autocast dtype, and a channels_last ``x`` gives a
  channels_last output (``_deploy_rule``, docs/DEPLOY.md).

Registry
--------
``@register_upsampler("name")`` on an ``Upsampler`` subclass; ``build_upsampler(spec, in_channels,
guide_channels=None, scale_factor=2, **kwargs)`` accepts a registered name, ``dict(type=name, **kw)``,
a class or an instance; ``list_upsamplers("sapa*")`` lists names matching an fnmatch pattern.
Unknown names raise ``KeyError`` listing the valid ones.
"""
from __future__ import annotations

import fnmatch
import functools
from typing import Any, Callable

import torch
from torch import nn

from . import _checks as C

_REGISTRY: dict[str, type["Upsampler"]] = {}


def _ensure_loaded() -> None:
    from . import nn as _  # noqa: F401  (importing sapa.nn registers every built-in upsampler)


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def _deploy_rule(x, out):
    """One rule for every upsampler: under autocast the output has the autocast dtype (whatever the
    module's last op was: a conv returns it already, a reassembly of fp32 values would not), and a
    channels_last x gives a channels_last output. Not applied while exporting (ONNX has no layout)."""
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or torch.compiler.is_exporting():
        return out
    dev = out.device.type
    # autocast lowers float32 only; torch.is_autocast_enabled raises for device types autocast does not
    # know (meta: shape inference and the complexity counter run there)
    if dev in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dev) and out.dtype == torch.float32:
        out = out.to(torch.get_autocast_dtype(dev))
    if (isinstance(x, torch.Tensor) and x.dim() == 4 and out.dim() == 4
            and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _with_deploy_rule(forward):
    # A wrapper of forward rather than a forward hook: torch.compile(module) traced the hook as a
    # frame of its own with static shapes, which recompiled when only the batch size changed.
    @functools.wraps(forward)
    def wrapped(self, x, *args, **kwargs):
        return _deploy_rule(x, forward(self, x, *args, **kwargs))

    wrapped._sapa_deploy_rule = True
    return wrapped


class Upsampler(nn.Module):
    """Base class of every registered upsampler (see the module docstring for the contract)."""

    needs_guide: bool = False
    name: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        fwd = cls.__dict__.get("forward")
        if fwd is not None and not getattr(fwd, "_sapa_deploy_rule", False):
            cls.forward = _with_deploy_rule(fwd)

    def __init__(self, in_channels: int, *, guide_channels: int | None = None, scale_factor: int = 2):
        super().__init__()
        self.in_channels = C.positive_int("in_channels", in_channels)
        self.guide_channels = (in_channels if guide_channels is None
                               else C.positive_int("guide_channels", guide_channels))
        self.scale_factor = C.positive_int("scale_factor", scale_factor)

    def output_size(self, x: torch.Tensor, guide: torch.Tensor | None) -> tuple[int, int]:
        """Validate ``x`` (and ``guide``) and return the high-res size ``(H', W')``."""
        C.tensor4d("x", x)
        C.channels("x", x, self.in_channels, f"in_channels of {type(self).__name__}")
        if guide is None:
            if self.needs_guide:
                raise ValueError(f"{type(self).__name__} is a guided upsampler: call it as "
                                 f"up(x, guide) with guide [B, {self.guide_channels}, H', W']")
            return self.scale_factor * x.shape[-2], self.scale_factor * x.shape[-1]
        C.tensor4d("guide", guide)
        C.same_batch(x=x, guide=guide)
        C.same_device(x=x, guide=guide)
        if self.needs_guide:
            C.channels("guide", guide, self.guide_channels, f"guide_channels of {type(self).__name__}")
        return C.guide_size("guide", guide, "x", x, self.scale_factor)

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, scale_factor={self.scale_factor}"
        if self.needs_guide:
            s += f", guide_channels={self.guide_channels}"
        return s


def register_upsampler(name: str) -> Callable[[type[Upsampler]], type[Upsampler]]:
    """Class decorator: register ``cls`` under ``name``. Names are unique."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_upsampler: name must be a non-empty str, got {name!r}")

    def deco(cls: type[Upsampler]) -> type[Upsampler]:
        if not (isinstance(cls, type) and issubclass(cls, Upsampler)):
            raise TypeError(f"register_upsampler({name!r}): {cls!r} is not a subclass of sapa.registry.Upsampler")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise KeyError(f"upsampler {name!r} is already registered to {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_upsamplers(pattern: str = "*") -> list[str]:
    """Registered names matching an fnmatch ``pattern`` (e.g. ``"sapa*"``), in registration order."""
    if not isinstance(pattern, str):
        raise TypeError(f"list_upsamplers: pattern must be an fnmatch pattern str such as 'sapa*', "
                        f"got {pattern!r} ({type(pattern).__name__})")
    _ensure_loaded()
    return [n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern)]


def get_upsampler_class(name: str) -> type[Upsampler]:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise KeyError(f"unknown upsampler {name!r}; valid names: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build_upsampler(spec: Any, in_channels: int, guide_channels: int | None = None, scale_factor: int = 2,
                    **kwargs: Any) -> Upsampler:
    """Build an upsampler from a name, ``dict(type=name, **kw)``, an ``Upsampler`` class or instance.

    ``kwargs`` (and the dict's other keys) go to the constructor. An instance is returned as is
    after checking that its ``in_channels`` / ``scale_factor`` match; with ``kwargs`` it is refused
    (``TypeError``), since they could not be applied.
    """
    if isinstance(spec, Upsampler):
        if kwargs:
            raise TypeError(f"build_upsampler: got an already built {type(spec).__name__} instance and "
                            f"constructor keyword(s) {', '.join(sorted(kwargs))}, which it cannot take; pass "
                            f"a name, dict(type=...) or class to build with them, or the instance alone")
        want_guide = in_channels if guide_channels is None else guide_channels
        have = (spec.in_channels, spec.scale_factor, spec.guide_channels if spec.needs_guide else want_guide)
        if have != (in_channels, scale_factor, want_guide):
            raise ValueError(f"build_upsampler: instance {type(spec).__name__} has in_channels="
                             f"{spec.in_channels}, guide_channels={spec.guide_channels}, scale_factor="
                             f"{spec.scale_factor}; the host needs in_channels={in_channels}, "
                             f"guide_channels={want_guide}, scale_factor={scale_factor}")
        return spec
    if isinstance(spec, dict):
        if "type" not in spec:
            raise KeyError(f"build_upsampler: dict spec needs a 'type' key, got keys {sorted(spec)}")
        spec = dict(spec)
        kwargs = {**{k: v for k, v in spec.items() if k != "type"}, **kwargs}
        spec = spec["type"]
    if isinstance(spec, str):
        cls = get_upsampler_class(spec)
    elif isinstance(spec, type) and issubclass(spec, Upsampler):
        cls = spec
    else:
        raise TypeError(f"build_upsampler: spec must be a name, dict(type=...), Upsampler class or "
                        f"instance, got {type(spec).__name__}")
    return cls(in_channels, guide_channels=guide_channels, scale_factor=scale_factor, **kwargs)
