"""sapa: similarity-aware feature upsamplers (SAPA-I/B/G/D) and the baselines they are compared with.

    >>> import torch, sapa
    >>> up = sapa.build_upsampler("sapa_b", in_channels=64)
    >>> up(torch.randn(1, 64, 8, 8), torch.randn(1, 64, 16, 16)).shape
    torch.Size([1, 64, 16, 16])
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public names are loaded on first use (PEP 562), so that ``import sapa`` and ``sapa --help``
# do not import torch until something needs it: ``sapa --help`` went from 2.1 s to well under 0.1 s.
# name -> (module, attribute or None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "functional": ("sapa.functional", None),
    "build_upsampler": ("sapa.registry", "build_upsampler"),
    "list_upsamplers": ("sapa.registry", "list_upsamplers"),
    "register_upsampler": ("sapa.registry", "register_upsampler"),
    "use_backend": ("sapa.backends", "use_backend"),
    "choose_backend": ("sapa.backends", "choose_backend"),
    "list_backends": ("sapa.backends", "list_backends"),
}

if TYPE_CHECKING:  # what static tools (type checkers, mkdocstrings) see
    from . import functional
    from .backends import choose_backend, list_backends, use_backend
    from .registry import build_upsampler, list_upsamplers, register_upsampler

__all__ = [
    "functional",
    "build_upsampler",
    "list_upsamplers",
    "register_upsampler",
    "use_backend",
    "choose_backend",
    "list_backends",
]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        # any submodule is an attribute too (sapa.nn, sapa.backends, ...), as if imported eagerly
        from importlib.util import find_spec

        if name.startswith("__") or find_spec(f"sapa.{name}") is None:
            raise AttributeError(f"module 'sapa' has no attribute {name!r}") from None
        module, attr = f"sapa.{name}", None
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
