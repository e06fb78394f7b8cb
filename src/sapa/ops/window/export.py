"""Pure-aten decompositions of the window ops, for export to plain ONNX (see :mod:`sapa.export`).

``torch.export`` keeps our custom ops as themselves (``sapa::sapa_fwd_cpu`` ...). ONNX has no such
operator, so before writing ONNX, :func:`sapa.export.export_onnx` replaces each of them with the
function here (``ExportedProgram.run_decompositions``). They follow the reference's semantics
(docs/SEMANTICS.md: out-of-range taps have key 0 and value 0) with no unfold: the graph never holds
``[B, C, K*K, H, W]``.

Form: per-pixel ``MatMul`` over one kernel row at a time. The zero-padded low-res map is turned,
once, into its *row windows* ``[B, H+2r, W, K, c]`` (the ``K`` horizontal shifts stacked: ``K``
times the input, not ``K*K``); kernel row ``dy`` is the slice ``[dy, dy+H)`` of that. High-res
maps live as *pixel-major* ``[B, H, W, s*s, c]`` (low-res pixel, then its ``s x s`` sub-pixels), so
for every low-res pixel the contribution of row ``dy`` is a small matrix product,
``[s*s, K] @ [K, C]`` for the reassembly and ``[s*s, d] @ [d, K]`` for the logits, and the ``K``
row products are summed (reassembly) or concatenated (logits).

Layout changes are written as single-axis moves (NCHW <-> NHWC, or one axis past a contiguous
block), the transposes onnxruntime has fast paths for: a general 6-D permute of the output took
105 ms where the two moves take 9 ms (B=1, C=256, 128x128, one thread). Measured with onnxruntime
1.32 on the 2-core VM, reassembly alone at B=1, C=256, 64x64 -> 128x128, K=5, one thread, busy
machine: ``K*K`` shifted slices with Mul/Add in channels-last blocks 248 ms (1881 ms before its
final transpose was put behind a Reshape: onnxruntime's transpose optimizer had pushed it up through
every Mul, giving them 2-element broadcast spans), the same per sub-pixel 225 ms, row windows +
MatMul with 6-D permutes 179 ms, the form here 90 ms.

Ceil-mode guides (``H' < s*H``) are zero-padded to ``s*H`` and the result cropped, as the reference
does. The graph depends on ``K``, ``s`` and the groups only, so its node count does not change with
``H, W``. Half precision is computed in float32 and returned in the input dtype, as every backend
does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._common import compute_dtype


_END = 2**62  # "to the end" (what x[a:] means), for the last position
_sl = torch.ops.aten.slice.Tensor  # one node per sliced dim (x[:, a:b] also emits a no-op slice of dim 0)


def _pix(t: torch.Tensor, H, W, s: int) -> torch.Tensor:
    """High-res ``[B, c, H', W']`` (H' <= s*H) -> zero-padded pixel-major ``[B, H, W, s*s, c]``
    (high-res pixel ``(s*h + a, s*w + b)`` is ``[h, w, a*s + b]``)."""
    Hq, Wq = t.shape[-2:]
    # aten.constant_pad_nd, not F.pad: F.pad tests for an all-zero padding, which under export
    # would fix H' = s*H (the example's sizes) and lose the ceil-mode guide sizes.
    t = torch.ops.aten.constant_pad_nd(t, [0, s * W - Wq, 0, s * H - Hq], 0.0)
    t = t.permute(0, 2, 3, 1).unflatten(2, (-1, s)).unflatten(1, (-1, s))  # [B, H, a, W, b, c]
    return t.transpose(2, 3).flatten(3, 4)


def crop(t: torch.Tensor, Hq, Wq, dims=(-2, -1)) -> torch.Tensor:
    """``t`` cropped to ``Hq x Wq`` on ``dims``, as a ``constant_pad_nd`` with negative amounts (an
    ONNX ``Pad``). A slice would do, but under ``torch.export`` recording the slice's metadata tests
    it for contiguity (``Wq == W``), and with an example at exactly ``s*H`` that guard fixes
    ``H' = s*H``, losing the ceil-mode guide sizes (measured: a Reshape with the example's sizes,
    failing at a ceil-mode size). The pad records no guard; it also copies rows, where the
    ``index_select`` used before gathered single elements along the last axis."""
    nd = t.dim()
    d0, d1 = dims[0] % nd, dims[1] % nd
    pads = [0] * (2 * (nd - min(d0, d1)))  # (low, high) per dim, from the last dim backwards
    pads[2 * (nd - 1 - d1) + 1] = Wq - t.shape[d1]
    pads[2 * (nd - 1 - d0) + 1] = Hq - t.shape[d0]
    return torch.ops.aten.constant_pad_nd(t, pads, 0.0)


def _unpix(t: torch.Tensor, Hq, Wq) -> torch.Tensor:
    """Pixel-major ``[B, H, W, s*s, c]`` -> NCHW ``[B, c, H', W']`` (cropped). Cropped channels-last,
    where the crop copies runs of at least ``c`` contiguous values."""
    B, H, W, s2, c = t.shape
    s = math.isqrt(s2)
    t = t.unflatten(3, (s, s)).transpose(2, 3).flatten(3, 4).flatten(1, 2)  # [B, s*H, s*W, c]
    return crop(t, Hq, Wq, dims=(1, 2)).permute(0, 3, 1, 2)


def _row_windows(x: torch.Tensor, K: int) -> torch.Tensor:
    """Low-res ``[B, c, H, W]`` -> row windows ``[B, H+2r, W, K, c]`` of the zero-padded map:
    ``[i, w, dx]`` is padded pixel ``(i, w + dx)``. Slice bounds are constants (``dx`` to
    ``dx - 2r``, counted from the end), so the graph has no size arithmetic per window position."""
    r = K // 2
    xp = F.pad(x, (r, r, r, r)).permute(0, 2, 3, 1)  # [B, H+2r, W+2r, c]
    return torch.stack([_sl(xp, 2, dx, (dx - 2 * r) or _END) for dx in range(K)], dim=3)


def _rows(win: torch.Tensor, K: int):
    """Kernel row ``dy`` of every window: ``win[:, dy:dy+H]`` for ``dy`` in ``0..K-1``."""
    r = K // 2
    for dy in range(K):
        yield _sl(win, 1, dy, (dy - 2 * r) or _END)


def _logits_pix(q, k, K, s):
    """Window logits, pixel-major ``[B, H, W, s*s, K*K]``."""
    H, W = k.shape[-2:]
    qp = _pix(q, H, W, s)  # [B, H, W, s*s, d]
    kw = _row_windows(k, K).transpose(3, 4)  # [B, H+2r, W, d, K]
    return torch.cat([torch.matmul(qp, kr) for kr in _rows(kw, K)], dim=-1)


def _reassemble_pix(wp, v, K, groups):
    """``wp`` pixel-major ``[B, H, W, s*s, G*K*K]``, v ``[B, C, H, W]`` -> pixel-major ``[B, H, W, s*s, C]``."""
    n2 = K * K
    vw = _row_windows(v, K)  # [B, H+2r, W, K, C]
    if groups > 1:
        G = groups
        wp = wp.unflatten(-1, (G, n2)).transpose(3, 4)  # [B, H, W, G, s*s, K*K]
        vw = vw.unflatten(-1, (G, -1)).transpose(3, 4)  # [B, H+2r, W, G, K, c]
    out = None
    for dy, vr in enumerate(_rows(vw, K)):
        t = torch.matmul(_sl(wp, -1, dy * K, dy * K + K), vr)
        out = t if out is None else out + t
    return out if groups == 1 else out.transpose(3, 4).flatten(-2, -1)


def window_similarity(q, k, kernel_size, scale_factor):
    dtype, ct = q.dtype, compute_dtype(q.dtype)
    Hq, Wq = q.shape[-2:]
    logits = _logits_pix(q.to(ct), k.to(ct), kernel_size, scale_factor)
    return _unpix(logits, Hq, Wq).to(dtype)


def reassemble(weights, v, kernel_size, scale_factor, groups):
    dtype, ct = v.dtype, compute_dtype(v.dtype)
    H, W = v.shape[-2:]
    Hq, Wq = weights.shape[-2:]
    wp = _pix(weights.to(ct), H, W, scale_factor)
    return _unpix(_reassemble_pix(wp, v.to(ct), kernel_size, groups), Hq, Wq).to(dtype)


def sapa(q, k, v, kernel_size, scale_factor):
    """(out, lse) like the fused ops; lse ``[B, H', W']`` is only there to match their outputs (an
    exported inference graph drops it)."""
    dtype, ct = v.dtype, compute_dtype(v.dtype)
    Hq, Wq = q.shape[-2:]
    logits = _logits_pix(q.to(ct), k.to(ct), kernel_size, scale_factor)
    out = _unpix(_reassemble_pix(torch.softmax(logits, dim=-1), v.to(ct), kernel_size, 1), Hq, Wq)
    lse = _unpix(torch.logsumexp(logits, dim=-1, keepdim=True), Hq, Wq)[:, 0]
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
