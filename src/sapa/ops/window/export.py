"""Pure-aten decompositions of the window ops, for export to plain ONNX (see :mod:`sapa.export`).

``torch.export`` keeps our custom ops as themselves (``sapa::sapa_fwd_cpu`` ...). ONNX has no such
operator, so before writing ONNX, :func:`sapa.export.export_onnx` replaces each of them with the
function here (``ExportedProgram.run_decompositions``). They follow the reference's semantics
(docs/SEMANTICS.md) but are written as ``K*K`` shifted slices of the zero-padded low-res tensor: no
unfold, so the graph never holds ``[B, C, K*K, H, W]``; only one shifted ``[B, H, W, C]`` slice and
one product the size of the output exist per window position. The only ``K*K``-sized tensor is the
kernel map ``[B, H', W', K*K]`` itself.

Layout: channels-last ``[B, H, s, W, s, C]`` blocks (high-res pixel ``(s*h + a, s*w + b)`` is block
``(h, a, w, b)``), so a low-res slice ``[B, H, 1, W, 1, C]`` broadcasts over the ``s x s`` sub-pixels
and a weight ``[B, H, s, W, s, 1]`` over the channels. Measured with onnxruntime 1.32 on this 2-core
VM (reassemble, B=1, C=256, 64x64 -> 128x128, K=5, one loaded run): NCHW blocks 1825 ms,
channels-last blocks 282 ms, a per-row partial window ``[B, H, W, K, C]`` + batched MatMul 450 ms,
ONNX ``DeformConv`` with the kernels as its mask 740 ms. Channels-last it is.

Ceil-mode guides (``H' < s*H``) are zero-padded to ``s*H`` and the result cropped, as the reference
does. The graph depends on ``K`` and ``s`` only, so its node count does not change with ``H, W``.
Half precision is computed in float32 and returned in the input dtype, as every backend does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import compute_dtype


def _blocks(t: torch.Tensor, H, W, s: int) -> torch.Tensor:
    """High-res ``[B, c, H', W']`` (H' <= s*H) -> zero-padded channels-last blocks ``[B, H, s, W, s, c]``."""
    B, c, Hq, Wq = t.shape
    # aten.constant_pad_nd, not F.pad: F.pad tests for an all-zero padding, which under export
    # would fix H' = s*H (the example's sizes) and lose the ceil-mode guide sizes.
    t = torch.ops.aten.constant_pad_nd(t, [0, s * W - Wq, 0, s * H - Hq], 0.0)
    return t.unflatten(3, (-1, s)).unflatten(2, (-1, s)).permute(0, 2, 3, 4, 5, 1)


def crop(t: torch.Tensor, Hq, Wq) -> torch.Tensor:
    """``t[..., :Hq, :Wq]`` as two ``index_select``s. A slice would do, but under ``torch.export``
    recording the slice's metadata tests it for contiguity (``Wq == W``), and with an example at
    exactly ``s*H`` that guard fixes ``H' = s*H``, losing the ceil-mode guide sizes; a gathered
    tensor is contiguous whatever the sizes."""
    t = t.index_select(-2, torch.arange(Hq, device=t.device))
    return t.index_select(-1, torch.arange(Wq, device=t.device))


def _unblock(t: torch.Tensor, Hq, Wq) -> torch.Tensor:
    """Channels-last blocks ``[B, H, s, W, s, c]`` -> NCHW ``[B, c, H', W']`` (cropped)."""
    return crop(t.permute(0, 5, 1, 2, 3, 4).flatten(4, 5).flatten(2, 3), Hq, Wq)


def _shifted(x: torch.Tensor, K: int):
    """Yield, for each window position ``n = dy*K + dx``, the low-res ``[B, c, H, W]`` map shifted by
    ``(dy - r, dx - r)`` with zeros outside, as channels-last ``[B, H, 1, W, 1, c]``.

    Slice bounds are constants (``dy`` to ``dy - 2r``, counted from the end), so the graph has no
    size arithmetic per window position: with ``dy + H`` as the end, SAPA-G's graph had 2708 nodes
    before optimisation and took 52 s to translate to ONNX on the loaded 2-core VM."""
    r = K // 2
    end = 2**62  # "to the end" (what x[a:] means), for the last position
    xp = F.pad(x, (r, r, r, r)).permute(0, 2, 3, 1).unsqueeze(2).unsqueeze(4)  # [B, H+2r, 1, W+2r, 1, c]
    sl = torch.ops.aten.slice.Tensor  # one node per sliced dim (x[:, a:b] also emits a no-op slice of dim 0)
    for dy in range(K):
        row = sl(xp, 1, dy, (dy - 2 * r) or end)
        for dx in range(K):
            yield sl(row, 3, dx, (dx - 2 * r) or end)


def _logits_cl(q, k, K, s):
    """Window logits as channels-last blocks ``[B, H, s, W, s, K*K]``."""
    H, W = k.shape[-2:]
    qb = _blocks(q, H, W, s)
    return torch.cat([(qb * kn).sum(-1, keepdim=True) for kn in _shifted(k, K)], dim=-1)


def _reassemble_cl(wb, v, K, groups):
    """``wb`` channels-last blocks ``[B, H, s, W, s, G*K*K]``, v ``[B, C, H, W]`` -> blocks ``[B, H, s, W, s, C]``."""
    C, n2 = v.shape[1], K * K
    if groups == 1:
        out = None
        for n, vn in enumerate(_shifted(v, K)):
            t = wb[..., n:n + 1] * vn
            out = t if out is None else out + t
        return out
    G, c = groups, C // groups
    wg = wb.unflatten(-1, (G, n2))
    out = None
    for n, vn in enumerate(_shifted(v, K)):
        t = wg[..., n:n + 1] * vn.unflatten(-1, (G, c))
        out = t if out is None else out + t
    return out.flatten(-2, -1)


def window_similarity(q, k, kernel_size, scale_factor):
    dtype, ct = q.dtype, compute_dtype(q.dtype)
    Hq, Wq = q.shape[-2:]
    logits = _logits_cl(q.to(ct), k.to(ct), kernel_size, scale_factor)
    return _unblock(logits, Hq, Wq).to(dtype)


def reassemble(weights, v, kernel_size, scale_factor, groups):
    dtype, ct = v.dtype, compute_dtype(v.dtype)
    H, W = v.shape[-2:]
    Hq, Wq = weights.shape[-2:]
    wb = _blocks(weights.to(ct), H, W, scale_factor)
    return _unblock(_reassemble_cl(wb, v.to(ct), kernel_size, groups), Hq, Wq).to(dtype)


def sapa(q, k, v, kernel_size, scale_factor):
    """(out, lse) like the fused ops; lse ``[B, H', W']`` is only there to match their outputs (an
    exported inference graph drops it)."""
    dtype, ct = v.dtype, compute_dtype(v.dtype)
    Hq, Wq = q.shape[-2:]
    logits = _logits_cl(q.to(ct), k.to(ct), kernel_size, scale_factor)
    out = _unblock(_reassemble_cl(torch.softmax(logits, dim=-1), v.to(ct), kernel_size, 1), Hq, Wq)
    lse = _unblock(torch.logsumexp(logits, dim=-1, keepdim=True), Hq, Wq)[:, 0]
    return out.to(dtype), lse


def decompositions() -> dict:
    """``{custom op overload: decomposition}`` for every forward window op of every backend."""
    from . import op  # noqa: F401  (registers the custom ops)

    ops = torch.ops.sapa
    table = {}
    for backend in ("cpu", "triton"):
        table[getattr(ops, f"window_similarity_fwd_{backend}").default] = window_similarity
        table[getattr(ops, f"reassemble_fwd_{backend}").default] = reassemble
    table[ops.sapa_fwd_cpu.default] = sapa

    def sapa_triton(q, k, v, kernel_size, scale_factor):
        out, lse = sapa(q, k, v, kernel_size, scale_factor)
        return out, lse.to(torch.float64 if v.dtype == torch.float64 else torch.float32)

    table[ops.sapa_fwd_triton.default] = sapa_triton
    return table
