"""Argument checks shared by every public op. Each raises ValueError / TypeError naming the argument,
what it got and what is valid. No backend sees unchecked input."""
from __future__ import annotations

import torch


def shape_str(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(int(d)) for d in t.shape) + "]"


def tensor4d(name: str, t, layout: str = "B, C, H, W") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [{layout}], got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor [{layout}], got shape {shape_str(t)}")
    float_dtype(name, t)
    if t.shape[2] < 1 or t.shape[3] < 1:
        # One rule on every backend: the reference (grid_sample / unfold) cannot take an empty map,
        # so no backend does; an empty batch (B = 0) is fine everywhere.
        raise ValueError(f"{name} must have H >= 1 and W >= 1, got shape {shape_str(t)} "
                         f"(an empty batch B = 0 is allowed, an empty map is not)")
    return t


VALID_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def float_dtype(name: str, t: torch.Tensor) -> torch.Tensor:
    """Only the four dtypes every backend computes in (float8 and other floats are refused)."""
    if t.dtype not in VALID_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}")
    return t


def positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def kernel_size(value) -> int:
    positive_int("kernel_size", value)
    if value % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int (3, 5, 7, ...), got {value}")
    return value


def same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {listing}")


def same_batch(**tensors: torch.Tensor) -> None:
    # == rather than a set of sizes: under torch.jit.trace the sizes are traced 0-d tensors, which
    # hash and compare by identity in a set, so equal batches looked different; symbolic sizes
    # (torch.export) are unhashable.
    batches = [t.shape[0] for t in tensors.values()]
    if any(b != batches[0] for b in batches[1:]):
        listing = ", ".join(f"{n} {shape_str(t)}" for n, t in tensors.items())
        raise ValueError(f"batch sizes differ: {listing}")


def guide_size(hi_name: str, hi: torch.Tensor, lo_name: str, lo: torch.Tensor, s: int) -> tuple[int, int]:
    """High-res size (Hq, Wq) of ``hi`` against low-res ``lo`` at scale ``s``.

    Accepted: s*H - s < Hq <= s*H (ceil-mode strides, e.g. 167 from 84 at s=2), likewise W.
    """
    Hq, Wq = hi.shape[-2:]
    H, W = lo.shape[-2:]
    if not (s * H - s < Hq <= s * H and s * W - s < Wq <= s * W):
        raise ValueError(
            f"{hi_name} {shape_str(hi)} does not match {lo_name} {shape_str(lo)} at scale_factor={s}: "
            f"the high-res size must be (s*H, s*W) = ({s * H}, {s * W}), or smaller by less than s "
            f"(ceil-mode strides), i.e. H' in ({s * H - s}, {s * H}] and W' in ({s * W - s}, {s * W}]")
    return Hq, Wq


def channels(name: str, t: torch.Tensor, expected: int, what: str) -> None:
    if t.shape[1] != expected:
        raise ValueError(f"{name} has {t.shape[1]} channels {shape_str(t)}, expected {expected} ({what})")


def divisible(name: str, value: int, groups: int, gname: str = "groups") -> None:
    if value % groups != 0:
        raise ValueError(f"{name} ({value}) must be divisible by {gname} ({groups})")
