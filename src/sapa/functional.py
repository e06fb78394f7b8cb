"""Public operators of sapa. Their docstrings are the documentation.

Conventions shared by every op (docs/SEMANTICS.md §1):

* Low-res features ``k``, ``v`` are ``[B, C, H, W]``; high-res ones (``q``, ``weights``, ``offset``,
  the output) are ``[B, ., H', W']`` with ``H' = s*H`` — or smaller by less than ``s`` (ceil-mode
  strides: 167 from 84 at ``s=2``); the output then has the guide's size. Anything else is a
  ``ValueError`` naming the shapes.
* High-res point ``(i, j)`` belongs to low-res point ``(i // s, j // s)`` (floor mapping).
* Window ops: the ``K x K`` window around that low-res point, flattened row-major
  ``n = (dy + r) * K + (dx + r)``, ``r = K // 2`` (the order of ``F.unfold``). Out-of-range window
  positions have key 0 (hence logit exactly 0, which still enters the softmax) and value 0: at the
  border the in-range weights sum to less than 1, exactly as the official CUDA code.
* Deform ops: ``offset`` is ``[B, 2*G*P, H', W']``; channel ``2*(g*P + p)`` is the horizontal (x)
  offset and ``2*(g*P + p) + 1`` the vertical (y) one, in low-res pixels. Point ``p`` of group ``g``
  samples at ``(i // s + dy, j // s + dx)`` where integer coordinates are low-res pixel centres;
  bilinear, zero outside (``grid_sample(align_corners=False, padding_mode='zeros')`` at
  ``(i // s + 0.5 + dy) / H * 2 - 1``). A fully outside point still enters the softmax with logit 0.
* No ``1/sqrt(d)`` temperature anywhere.
* Dtypes: float16/bfloat16/float32/float64; mixed float dtypes are promoted (``torch.result_type``);
  half precision is accumulated in float32 and returned in the input dtype.
* ``backend=None`` picks automatically (see :mod:`sapa.backends`); ``"reference"``, ``"cpu"`` or
  ``"triton"`` forces one and raises the reason if it cannot run.
"""
from __future__ import annotations

import torch

from . import _checks as C
from .backends import get_impl

__all__ = [
    "window_similarity",
    "reassemble",
    "sapa",
    "deform_similarity",
    "deform_reassemble",
    "sapa_deform",
]


def _promote(**tensors: torch.Tensor) -> list[torch.Tensor]:
    dtype = None
    for t in tensors.values():
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors.values()]


def _check_window(q_or_w_name, hi, k_name, lo, kernel_size, scale_factor):
    C.kernel_size(kernel_size)
    C.positive_int("scale_factor", scale_factor)
    C.tensor4d(q_or_w_name, hi)
    C.tensor4d(k_name, lo)
    C.same_device(**{q_or_w_name: hi, k_name: lo})
    C.same_batch(**{q_or_w_name: hi, k_name: lo})
    C.guide_size(q_or_w_name, hi, k_name, lo, scale_factor)


def window_similarity(q: torch.Tensor, k: torch.Tensor, kernel_size: int = 5, scale_factor: int = 2,
                      *, backend: str | None = None) -> torch.Tensor:
    """Window similarity logits (the official ``qk`` op).

    Args:
        q: queries ``[B, d, H', W']`` at high resolution.
        k: keys ``[B, d, H, W]`` at low resolution.
        kernel_size: odd window size ``K``.
        scale_factor: integer ``s >= 1``.

    Returns:
        ``[B, K*K, H', W']`` with ``out[b, n, i, j] = <q[b, :, i, j], k[b, :, i//s + dy, j//s + dx]>``
        (0 where the window position is outside ``k``).

    Example:
        >>> q, k = torch.randn(1, 32, 8, 8), torch.randn(1, 32, 4, 4)
        >>> window_similarity(q, k).shape
        torch.Size([1, 25, 8, 8])
    """
    _check_window("q", q, "k", k, kernel_size, scale_factor)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must have the same number of channels, got q {C.shape_str(q)} "
                         f"and k {C.shape_str(k)}")
    q, k = _promote(q=q, k=k)
    _, impl = get_impl("window_similarity", q, k, backend=backend)
    return impl(q, k, kernel_size, scale_factor)


def reassemble(weights: torch.Tensor, v: torch.Tensor, kernel_size: int = 5, scale_factor: int = 2,
               groups: int = 1, *, backend: str | None = None) -> torch.Tensor:
    """Reassemble low-res values with per-pixel window kernels (SAPA's ``av``, CARAFE's reassembly).

    Args:
        weights: kernels ``[B, groups*K*K, H', W']``; channel group ``g`` of ``v`` (contiguous blocks
            of ``C/groups`` channels) uses weight channels ``g*K*K ... g*K*K + K*K - 1``. Not
            normalised here (pass softmax-ed kernels for a convex combination).
        v: values ``[B, C, H, W]`` at low resolution, ``C % groups == 0``.
        kernel_size: odd ``K``. scale_factor: integer ``s >= 1``. groups: ``>= 1``.

    Returns:
        ``[B, C, H', W']``: ``out[b, c, i, j] = sum_n weights[b, g*K*K + n, i, j] * v[b, c, window n]``,
        ``g = c // (C / groups)``; out-of-range window positions contribute 0.

    Example:
        >>> w = torch.softmax(torch.randn(1, 25, 8, 8), 1)
        >>> reassemble(w, torch.randn(1, 16, 4, 4)).shape
        torch.Size([1, 16, 8, 8])
    """
    C.positive_int("groups", groups)
    _check_window("weights", weights, "v", v, kernel_size, scale_factor)
    C.channels("weights", weights, groups * kernel_size * kernel_size,
               f"groups*kernel_size**2 = {groups}*{kernel_size}**2")
    C.divisible("v channels", v.shape[1], groups)
    weights, v = _promote(weights=weights, v=v)
    _, impl = get_impl("reassemble", weights, v, backend=backend)
    return impl(weights, v, kernel_size, scale_factor, groups)


def sapa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int = 5, scale_factor: int = 2,
         *, backend: str | None = None) -> torch.Tensor:
    """Similarity-aware point affiliation upsampling in one call.

    ``sapa(q, k, v) == reassemble(softmax(window_similarity(q, k), dim=1), v)``; the fused backends
    never materialise the ``[B, K*K, H', W']`` kernel map twice nor the unfolded ``[B, C, K*K, H, W]``.

    Args:
        q: ``[B, d, H', W']`` queries (high-res), k: ``[B, d, H, W]`` keys, v: ``[B, C, H, W]`` values.

    Returns:
        ``[B, C, H', W']``.

    Example:
        >>> x, y = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 8, 8)
        >>> sapa(y, x, x).shape  # SAPA-I: q = y, k = v = x
        torch.Size([1, 16, 8, 8])
    """
    _check_window("q", q, "k", k, kernel_size, scale_factor)
    C.tensor4d("v", v)
    C.same_device(q=q, k=k, v=v)
    C.same_batch(q=q, k=k, v=v)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must have the same number of channels, got q {C.shape_str(q)} "
                         f"and k {C.shape_str(k)}")
    if v.shape[-2:] != k.shape[-2:]:
        raise ValueError(f"v {C.shape_str(v)} and k {C.shape_str(k)} must have the same spatial size")
    q, k, v = _promote(q=q, k=k, v=v)
    _, impl = get_impl("sapa", q, k, v, backend=backend)
    return impl(q, k, v, kernel_size, scale_factor)


def _check_deform(offset, lo_name, lo, num_points, groups, scale_factor):
    C.positive_int("num_points", num_points)
    C.positive_int("groups", groups)
    C.positive_int("scale_factor", scale_factor)
    C.tensor4d("offset", offset, "B, 2*groups*num_points, H', W'")
    C.channels("offset", offset, 2 * groups * num_points,
               f"2*groups*num_points = 2*{groups}*{num_points}, x offset first")


def deform_similarity(q: torch.Tensor, k: torch.Tensor, offset: torch.Tensor, num_points: int = 9,
                      groups: int = 4, scale_factor: int = 2, *, backend: str | None = None) -> torch.Tensor:
    """SAPA-D logits: similarity of each query with keys sampled at learned positions.

    Args:
        q: ``[B, G*d, H', W']`` queries, k: ``[B, G*d, H, W]`` keys (channel groups contiguous).
        offset: ``[B, 2*G*P, H', W']`` sampling offsets in low-res pixels, x first (see module doc).

    Returns:
        ``[B, G, P, H', W']``: ``<q[b, g*d:(g+1)*d, i, j], bilinear(k group g, pos(i, j, g, p))>``.

    Example:
        >>> q, k = torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)
        >>> deform_similarity(q, k, torch.zeros(1, 2 * 4 * 9, 8, 8)).shape
        torch.Size([1, 4, 9, 8, 8])
    """
    _check_deform(offset, "k", k, num_points, groups, scale_factor)
    C.tensor4d("q", q)
    C.tensor4d("k", k)
    C.same_device(q=q, k=k, offset=offset)
    C.same_batch(q=q, k=k, offset=offset)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must have the same number of channels, got q {C.shape_str(q)} "
                         f"and k {C.shape_str(k)}")
    C.divisible("q channels", q.shape[1], groups)
    C.guide_size("q", q, "k", k, scale_factor)
    if offset.shape[-2:] != q.shape[-2:]:
        raise ValueError(f"offset {C.shape_str(offset)} must have the spatial size of q {C.shape_str(q)}")
    q, k, offset = _promote(q=q, k=k, offset=offset)
    _, impl = get_impl("deform_similarity", q, k, offset, backend=backend)
    return impl(q, k, offset, num_points, groups, scale_factor)


def deform_reassemble(weights: torch.Tensor, v: torch.Tensor, offset: torch.Tensor, num_points: int = 9,
                      groups: int = 4, scale_factor: int = 2, *, backend: str | None = None) -> torch.Tensor:
    """Reassemble values sampled at learned positions (SAPA-D's value path).

    Args:
        weights: ``[B, G, P, H', W']`` (normally softmax over ``P``).
        v: ``[B, C, H, W]``, ``C % G == 0``; channel ``c`` uses group ``c // (C / G)``.
        offset: ``[B, 2*G*P, H', W']``, the same layout as :func:`deform_similarity`.

    Returns:
        ``[B, C, H', W']``: ``sum_p weights[b, g, p, i, j] * bilinear(v[b, c], pos(i, j, g, p))``.

    Example:
        >>> w = torch.softmax(torch.randn(1, 4, 9, 8, 8), 2)
        >>> deform_reassemble(w, torch.randn(1, 16, 4, 4), torch.zeros(1, 72, 8, 8)).shape
        torch.Size([1, 16, 8, 8])
    """
    _check_deform(offset, "v", v, num_points, groups, scale_factor)
    if not isinstance(weights, torch.Tensor) or weights.dim() != 5:
        got = C.shape_str(weights) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a 5-D tensor [B, groups, num_points, H', W'], got {got}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must have a floating dtype, got {weights.dtype}")
    C.tensor4d("v", v)
    C.same_device(weights=weights, v=v, offset=offset)
    C.same_batch(weights=weights, v=v, offset=offset)
    if tuple(weights.shape[1:3]) != (groups, num_points):
        raise ValueError(f"weights {C.shape_str(weights)} must be [B, groups={groups}, "
                         f"num_points={num_points}, H', W']")
    C.divisible("v channels", v.shape[1], groups)
    C.guide_size("offset", offset, "v", v, scale_factor)
    if weights.shape[-2:] != offset.shape[-2:]:
        raise ValueError(f"weights {C.shape_str(weights)} and offset {C.shape_str(offset)} must have the "
                         f"same spatial size")
    weights, v, offset = _promote(weights=weights, v=v, offset=offset)
    _, impl = get_impl("deform_reassemble", weights, v, offset, backend=backend)
    return impl(weights, v, offset, num_points, groups, scale_factor)


def sapa_deform(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: torch.Tensor, num_points: int = 9,
                groups: int = 4, scale_factor: int = 2, *, backend: str | None = None) -> torch.Tensor:
    """SAPA-D in one call: ``deform_reassemble(softmax(deform_similarity(q, k, offset), dim=2), v, offset)``.

    Softmax is over the ``P`` points of each group. Keys and values share the offsets.

    Example:
        >>> x, y = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 8, 8)
        >>> sapa_deform(y, x, x, torch.zeros(1, 72, 8, 8)).shape
        torch.Size([1, 16, 8, 8])
    """
    _check_deform(offset, "k", k, num_points, groups, scale_factor)
    for name, t in (("q", q), ("k", k), ("v", v)):
        C.tensor4d(name, t)
    C.same_device(q=q, k=k, v=v, offset=offset)
    C.same_batch(q=q, k=k, v=v, offset=offset)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must have the same number of channels, got q {C.shape_str(q)} "
                         f"and k {C.shape_str(k)}")
    C.divisible("q channels", q.shape[1], groups)
    C.divisible("v channels", v.shape[1], groups)
    if v.shape[-2:] != k.shape[-2:]:
        raise ValueError(f"v {C.shape_str(v)} and k {C.shape_str(k)} must have the same spatial size")
    C.guide_size("q", q, "k", k, scale_factor)
    if offset.shape[-2:] != q.shape[-2:]:
        raise ValueError(f"offset {C.shape_str(offset)} must have the spatial size of q {C.shape_str(q)}")
    q, k, v, offset = _promote(q=q, k=k, v=v, offset=offset)
    _, impl = get_impl("sapa_deform", q, k, v, offset, backend=backend)
    return impl(q, k, v, offset, num_points, groups, scale_factor)
