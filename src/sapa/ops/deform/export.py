"""Pure-aten decompositions of the deformable (SAPA-D) ops, for export to plain ONNX (see
:mod:`sapa.export` and ``sapa/ops/window/export.py``).

Same sampling as the reference (bilinear ``grid_sample``, zeros outside, ``align_corners=False``;
ONNX ``GridSample``, opset >= 16), but one point at a time: the reference samples all ``P`` points
in one call and holds ``[B, C, P, H', W']``; here one ``[B*G, C/G, H', W']`` sample exists per point
and is folded into the running sum at once. The graph depends on ``P``, ``G`` and ``s`` only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import compute_dtype


def _grids(offset, H, W, P, G, s):
    """The ``grid_sample`` grids of all points, ``[P, B*G, H', W', 2]`` (see the reference's ``_grid``);
    ``grids[p]`` is point p's. Built once, so no size arithmetic is repeated per point."""
    B, _, Hq, Wq = offset.shape
    off = offset.unflatten(1, (G, P, 2))  # [B, G, P, 2, H', W']
    base_y = torch.div(torch.arange(Hq, device=offset.device), s, rounding_mode="floor").to(offset.dtype)
    base_x = torch.div(torch.arange(Wq, device=offset.device), s, rounding_mode="floor").to(offset.dtype)
    gx = (base_x + 0.5 + off[:, :, :, 0]) / W * 2 - 1
    gy = (base_y.unsqueeze(-1) + 0.5 + off[:, :, :, 1]) / H * 2 - 1
    return torch.stack((gx, gy), dim=-1).transpose(0, 2).flatten(1, 2)  # [P, G*B, ...] -> see _groups


def _groups(x, G):
    """``[B, G*c, H, W]`` -> ``[G*B, c, H, W]``: group-major, matching the grids' ``G*B`` order (a
    transpose instead of a reshape of the batch keeps sizes symbolic-free)."""
    return x.unflatten(1, (G, -1)).transpose(0, 1).flatten(0, 1)


def _sample(xg, grid):
    return F.grid_sample(xg, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _logits(q, k, grids, G):
    """``[G*B, P, H', W']``."""
    qg, kg = _groups(q, G), _groups(k, G)
    return torch.stack([(qg * _sample(kg, grids[p])).sum(1) for p in range(grids.shape[0])], dim=1)


def _reassemble(w, v, grids, G):
    """w ``[G*B, P, H', W']`` -> ``[B, C, H', W']``."""
    vg = _groups(v, G)
    out = None
    for p in range(grids.shape[0]):
        t = w[:, p:p + 1] * _sample(vg, grids[p])
        out = t if out is None else out + t
    return out.unflatten(0, (G, -1)).transpose(0, 1).flatten(1, 2)


def deform_similarity(q, k, offset, num_points, groups, scale_factor):
    dtype, ct = q.dtype, compute_dtype(q.dtype)
    q, k, offset = q.to(ct), k.to(ct), offset.to(ct)
    grids = _grids(offset, k.shape[2], k.shape[3], num_points, groups, scale_factor)
    return _logits(q, k, grids, groups).unflatten(0, (groups, -1)).transpose(0, 1).to(dtype)


def deform_reassemble(weights, v, offset, num_points, groups, scale_factor):
    dtype, ct = v.dtype, compute_dtype(v.dtype)
    weights, v, offset = weights.to(ct), v.to(ct), offset.to(ct)
    G, P = groups, num_points
    grids = _grids(offset, v.shape[2], v.shape[3], P, G, scale_factor)
    return _reassemble(weights.transpose(0, 1).flatten(0, 1), v, grids, G).to(dtype)


def _sapa_deform(q, k, v, offset, num_points, groups, scale_factor):
    dtype, ct = v.dtype, compute_dtype(v.dtype)
    q, k, v, offset = q.to(ct), k.to(ct), v.to(ct), offset.to(ct)
    grids = _grids(offset, k.shape[2], k.shape[3], num_points, groups, scale_factor)
    logits = _logits(q, k, grids, groups)
    out = _reassemble(torch.softmax(logits, dim=1), v, grids, groups).to(dtype)
    return out, logits


def decompositions() -> dict:
    """``{custom op overload: decomposition}`` for every forward deform op of every backend. The fused
    ops' extra outputs (saved state for their backward) are returned as zeros of the right shape:
    an inference graph never reads them and the exporter drops them."""
    from . import op

    ops = torch.ops.sapa

    def sapa_deform_cpu(q, k, v, offset, num_points, groups, scale_factor):
        out, _ = _sapa_deform(q, k, v, offset, num_points, groups, scale_factor)
        kern, ct = op.cpu_kernels("deform"), compute_dtype(v.dtype)
        B, _, Hq, Wq = q.shape
        return (out, v.new_zeros((op._saved_size(B, Hq, Wq, groups, num_points),), dtype=ct),
                v.new_zeros((op._flat_cl_size(kern, k.shape),), dtype=ct),
                v.new_zeros((op._flat_cl_size(kern, v.shape),), dtype=ct))

    def sapa_deform_triton(q, k, v, offset, num_points, groups, scale_factor):
        out, logits = _sapa_deform(q, k, v, offset, num_points, groups, scale_factor)
        stat = torch.float64 if v.dtype == torch.float64 else torch.float32
        lse = torch.logsumexp(logits, dim=1).unflatten(0, (groups, -1)).transpose(0, 1)
        return out, lse.to(stat)

    return {
        ops.deform_similarity_fwd_cpu.default: deform_similarity,
        ops.deform_reassemble_fwd_cpu.default: deform_reassemble,
        ops.sapa_deform_fwd_cpu.default: sapa_deform_cpu,
        ops.sapa_deform_fwd_triton.default: sapa_deform_triton,
    }
