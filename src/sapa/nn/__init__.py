"""Upsampler modules. Importing this package registers every built-in upsampler: each module file in
this folder registers its classes with ``@register_upsampler`` and is imported here automatically."""
from __future__ import annotations

import importlib
import pkgutil

from ..registry import Upsampler, build_upsampler, list_upsamplers, register_upsampler

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

from .sapa import SAPAB, SAPAD, SAPAG, SAPAI  # noqa: E402

__all__ = ["Upsampler", "build_upsampler", "list_upsamplers", "register_upsampler",
           "SAPAI", "SAPAB", "SAPAG", "SAPAD"]
