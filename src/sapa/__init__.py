"""sapa: similarity-aware feature upsamplers (SAPA-I/B/G/D) and the baselines they are compared with.

    >>> import torch, sapa
    >>> up = sapa.build_upsampler("sapa_b", in_channels=64)
    >>> up(torch.randn(1, 64, 8, 8), torch.randn(1, 64, 16, 16)).shape
    torch.Size([1, 64, 16, 16])
"""
from . import functional
from .backends import choose_backend, list_backends, use_backend
from .registry import build_upsampler, list_upsamplers, register_upsampler

__version__ = "0.1.0"
__all__ = [
    "functional",
    "build_upsampler",
    "list_upsamplers",
    "register_upsampler",
    "use_backend",
    "choose_backend",
    "list_backends",
]
