"""Upsampler modules. Importing this package registers every built-in upsampler: each module file in
this folder registers its classes with ``@register_upsampler`` and is imported here automatically."""
from __future__ import annotations

import importlib
import pkgutil

from ..registry import Upsampler, build_upsampler, list_upsamplers, register_upsampler

# Registration order = listing order: the papers' table order, then anything else alphabetically.
_ORDER = ["interp", "carafe", "indexnet", "a2u", "fade", "sapa", "dysample"]
_names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
for _name in sorted(_names, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n)):
    importlib.import_module(f"{__name__}.{_name}")

# every built-in upsampler class, in the papers' table order (tests/test_packaging.py checks that
# each registered built-in is exported here)
from .a2u import A2U  # noqa: E402
from .carafe import CARAFE  # noqa: E402
from .dysample import DySample  # noqa: E402
from .fade import FADE  # noqa: E402
from .indexnet import IndexNet  # noqa: E402
from .interp import Bilinear, Deconv, Nearest, PixelShuffle  # noqa: E402
from .sapa import SAPAB, SAPAD, SAPAG, SAPAI  # noqa: E402

__all__ = ["Upsampler", "build_upsampler", "list_upsamplers", "register_upsampler",
           "Nearest", "Bilinear", "Deconv", "PixelShuffle", "CARAFE", "IndexNet", "A2U", "FADE",
           "SAPAI", "SAPAB", "SAPAG", "SAPAD", "DySample"]
