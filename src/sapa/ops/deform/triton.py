"""Triton kernels for SAPA-D, the fused deformable similarity + softmax + reassembly (GPU; on CPU
tensors under TRITON_INTERPRET=1). Kernels and launchers only; registration lives in op.py.

Semantics (docs/SEMANTICS.md §2.4): point p of group g at high-res (i, j) sits at low-res (y, x) =
(i // S + dy, j // S + dx) with integer coordinates at pixel centres; offset channel 2*(g*P + p) is
dx and 2*(g*P + p) + 1 is dy. Samples are bilinear with floor-based corner weights, out-of-range
corners contributing 0 (= grid_sample zeros padding, align_corners=False). Sampling is linear, so
<q, bilinear(k)> = sum_corners w_c <q, k_c>: each logit needs four d-long dots, never a sampled copy
of k.

Forward: one program = BLOCK_P pixels x one group x one block of that group's value channels;
pass 1 computes the log-sum-exp over the P points online, pass 2 recomputes each logit and
accumulates exp(a - lse) * bilinear(v). Saved for backward: out and lse [B, G, H', W'].

Backward: w = exp(a - lse), dw = <g, bilinear(v)>, delta = <g, out> per group, da = w (dw - delta).
dq is accumulated per program (it owns its pixels); dk and dv land at data-dependent positions and
use atomic adds (like the official CUDA kernel), so their float32 sums are not bitwise
deterministic; d(offset) follows from the derivative of the corner weights:
d/dy = sum_c dw_c/dy * (w <g, v_c> + da <q, k_c>), likewise for x.

Block sizes are autotuned per shape and dtype (one config under TRITON_INTERPRET=1); the backward's
autotuning zeroes dk / dv before each trial (``reset_to_zero``) because it accumulates atomically.
Indices go int64 when a tensor spans 2**31 elements (``IDX``, as in the window kernels).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..window.triton import _I_P, _I_PC, _PIX, _PIX_CHAN, _acc, _configs, _grid, _idx, _np2, _pixels
from ..window.triton import _dot_window as _gdot  # the same d-long dot per pixel
from ..window.triton import _stat_dtype as _acc_torch

_KEY = ["DG", "CG", "H", "W", "Hq", "Wq", "P", "G", "S"]


@triton.jit
def _corners(off_ptr, ob, osc, o_pix, g, pt, P, li, lj, H, W, mask_p, ACC: tl.constexpr, IDX: tl.constexpr):
    """Corner offsets (low-res flat index), in-range masks and bilinear weights of one point."""
    ch = (2 * (g * P + pt)).to(IDX)
    dx = tl.load(off_ptr + ob + ch * osc + o_pix, mask=mask_p, other=0.0).to(ACC)
    dy = tl.load(off_ptr + ob + (ch + 1) * osc + o_pix, mask=mask_p, other=0.0).to(ACC)
    y = li.to(ACC) + dy
    x = lj.to(ACC) + dx
    y0f = tl.floor(y)
    x0f = tl.floor(x)
    ly = y - y0f
    lx = x - x0f
    y0 = y0f.to(IDX)
    x0 = x0f.to(IDX)
    y1 = y0 + 1
    x1 = x0 + 1
    vy0 = (y0 >= 0) & (y0 < H)
    vy1 = (y1 >= 0) & (y1 < H)
    vx0 = (x0 >= 0) & (x0 < W)
    vx1 = (x1 >= 0) & (x1 < W)
    m00 = mask_p & vy0 & vx0
    m01 = mask_p & vy0 & vx1
    m10 = mask_p & vy1 & vx0
    m11 = mask_p & vy1 & vx1
    return y0, x0, y1, x1, ly, lx, m00, m01, m10, m11


@triton.jit
def _logit(q_ptr, qb, sqc, q_pix, k_ptr, kb, skc, skh, skw, y0, x0, y1, x1, ly, lx,
           m00, m01, m10, m11, mask_p, DG, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
           IDX: tl.constexpr):
    a00 = _gdot(q_ptr, qb, sqc, q_pix, k_ptr, kb, skc, y0 * skh + x0 * skw, mask_p, m00, DG, BLOCK_D, BLOCK_P, ACC, IDX)
    a01 = _gdot(q_ptr, qb, sqc, q_pix, k_ptr, kb, skc, y0 * skh + x1 * skw, mask_p, m01, DG, BLOCK_D, BLOCK_P, ACC, IDX)
    a10 = _gdot(q_ptr, qb, sqc, q_pix, k_ptr, kb, skc, y1 * skh + x0 * skw, mask_p, m10, DG, BLOCK_D, BLOCK_P, ACC, IDX)
    a11 = _gdot(q_ptr, qb, sqc, q_pix, k_ptr, kb, skc, y1 * skh + x1 * skw, mask_p, m11, DG, BLOCK_D, BLOCK_P, ACC, IDX)
    a = (1 - ly) * ((1 - lx) * a00 + lx * a01) + ly * ((1 - lx) * a10 + lx * a11)
    return a, a00, a01, a10, a11


@triton.autotune(configs=_configs(_PIX_CHAN, _I_PC), key=_KEY)
@triton.jit
def _sapa_deform_fwd_kernel(q_ptr, k_ptr, v_ptr, off_ptr, out_ptr, lse_ptr,
                            DG, CG, H, W, Hq, Wq, P, G,
                            sqb, sqc, sqh, sqw, skb, skc, skh, skw, svb, svc, svh, svw,
                            sob, soc, soh, sow, sfb, sfc, sfh, sfw,
                            S: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_gc = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_cblk = tl.cdiv(CG, BLOCK_C)
    g = (pid_gc // n_cblk).to(tl.int64)
    cblk = pid_gc % n_cblk
    offs_p, mask_p = _pixels(tl.program_id(0), BLOCK_P, Hq * Wq, IDX)
    i = offs_p // Wq
    j = offs_p % Wq
    li = i // S
    lj = j // S
    qb = b * sqb + g * DG * sqc
    kb = b * skb + g * DG * skc
    q_pix = i * sqh + j * sqw
    o_pix = i * sfh + j * sfw
    m = tl.full([BLOCK_P], float("-inf"), dtype=ACC)
    l = tl.zeros([BLOCK_P], dtype=ACC)
    for pt in range(P):
        y0, x0, y1, x1, ly, lx, m00, m01, m10, m11 = _corners(off_ptr, b * sfb, sfc, o_pix, g, pt, P, li, lj,
                                                              H, W, mask_p, ACC, IDX)
        a, _, _, _, _ = _logit(q_ptr, qb, sqc, q_pix, k_ptr, kb, skc, skh, skw, y0, x0, y1, x1, ly, lx,
                               m00, m01, m10, m11, mask_p, DG, BLOCK_D, BLOCK_P, ACC, IDX)
        m_new = tl.maximum(m, a)
        l = l * tl.exp(m - m_new) + tl.exp(a - m_new)
        m = m_new
    lse = m + tl.log(l)
    offs_c = (cblk * BLOCK_C + tl.arange(0, BLOCK_C)).to(IDX)
    mc = offs_c < CG
    vb = b * svb + (g * CG + offs_c[:, None]) * svc
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for pt in range(P):
        y0, x0, y1, x1, ly, lx, m00, m01, m10, m11 = _corners(off_ptr, b * sfb, sfc, o_pix, g, pt, P, li, lj,
                                                              H, W, mask_p, ACC, IDX)
        a, _, _, _, _ = _logit(q_ptr, qb, sqc, q_pix, k_ptr, kb, skc, skh, skw, y0, x0, y1, x1, ly, lx,
                               m00, m01, m10, m11, mask_p, DG, BLOCK_D, BLOCK_P, ACC, IDX)
        w = tl.exp(a - lse)
        v00 = tl.load(v_ptr + vb + (y0 * svh + x0 * svw)[None, :], mask=mc[:, None] & m00[None, :], other=0.0).to(ACC)
        v01 = tl.load(v_ptr + vb + (y0 * svh + x1 * svw)[None, :], mask=mc[:, None] & m01[None, :], other=0.0).to(ACC)
        v10 = tl.load(v_ptr + vb + (y1 * svh + x0 * svw)[None, :], mask=mc[:, None] & m10[None, :], other=0.0).to(ACC)
        v11 = tl.load(v_ptr + vb + (y1 * svh + x1 * svw)[None, :], mask=mc[:, None] & m11[None, :], other=0.0).to(ACC)
        vs = ((1 - ly) * (1 - lx))[None, :] * v00 + ((1 - ly) * lx)[None, :] * v01 \
            + (ly * (1 - lx))[None, :] * v10 + (ly * lx)[None, :] * v11
        acc += vs * w[None, :]
    tl.store(out_ptr + b * sob + (g * CG + offs_c[:, None]) * soc + (i * soh + j * sow)[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mc[:, None] & mask_p[None, :])
    if cblk == 0:
        tl.store(lse_ptr + (b * G + g) * Hq * Wq + offs_p, lse, mask=mask_p)


@triton.autotune(configs=_configs(_PIX_CHAN, _I_PC), key=["CG", "Hq", "Wq"])
@triton.jit
def _group_rowdot_kernel(a_ptr, b_ptr, out_ptr, CG, Hq, Wq, sab, sac, sah, saw, sbb, sbc, sbh, sbw,
                         ACC: tl.constexpr, IDX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, g, p] = sum_{c in group g} a[b, c, p] * b[b, c, p]."""
    g = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    G = tl.num_programs(1)
    offs_p, mask_p = _pixels(tl.program_id(0), BLOCK_P, Hq * Wq, IDX)
    i = offs_p // Wq
    j = offs_p % Wq
    acc = _gdot(a_ptr, b * sab + g * CG * sac, sac, i * sah + j * saw, b_ptr, b * sbb + g * CG * sbc, sbc,
                i * sbh + j * sbw, mask_p, mask_p, CG, BLOCK_C, BLOCK_P, ACC, IDX)
    tl.store(out_ptr + (b * G + g) * Hq * Wq + offs_p, acc, mask=mask_p)


@triton.autotune(configs=_configs(_PIX, _I_P), key=_KEY, reset_to_zero=["dk_ptr", "dv_ptr"])
@triton.jit
def _sapa_deform_bwd_kernel(q_ptr, k_ptr, v_ptr, off_ptr, g_ptr, lse_ptr, delta_ptr,
                            dq_ptr, dk_ptr, dv_ptr, doff_ptr,
                            DG, CG, H, W, Hq, Wq, P, G,
                            sqb, sqc, sqh, sqw, skb, skc, skh, skw, svb, svc, svh, svw,
                            sgb, sgc, sgh, sgw, sfb, sfc, sfh, sfw,
                            S: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program = BLOCK_P pixels x one group, all of the group's channels.
    dq, doff: owned, plain stores. dk, dv: atomic adds at the four corners of every point.
    dq/dk/dv/doff are contiguous NCHW buffers in the accumulation dtype."""
    g = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_p, mask_p = _pixels(tl.program_id(0), BLOCK_P, Hq * Wq, IDX)
    i = offs_p // Wq
    j = offs_p % Wq
    li = i // S
    lj = j // S
    D = DG * G
    C = CG * G
    qb = b * sqb + g * DG * sqc
    kb = b * skb + g * DG * skc
    gb = b * sgb + g * CG * sgc
    vb = b * svb + g * CG * svc
    q_pix = i * sqh + j * sqw
    g_pix = i * sgh + j * sgw
    o_pix = i * sfh + j * sfw
    lse = tl.load(lse_ptr + (b * G + g) * Hq * Wq + offs_p, mask=mask_p, other=0.0)
    delta = tl.load(delta_ptr + (b * G + g) * Hq * Wq + offs_p, mask=mask_p, other=0.0)
    offs_d = tl.arange(0, BLOCK_D).to(IDX)
    md = offs_d < DG
    qt = tl.load(q_ptr + qb + offs_d[:, None] * sqc + q_pix[None, :], mask=md[:, None] & mask_p[None, :],
                 other=0.0).to(ACC)
    dq = tl.zeros([BLOCK_D, BLOCK_P], dtype=ACC)
    dkb = b * D * H * W + (g * DG + offs_d[:, None]) * H * W
    for pt in range(P):
        y0, x0, y1, x1, ly, lx, m00, m01, m10, m11 = _corners(off_ptr, b * sfb, sfc, o_pix, g, pt, P, li, lj,
                                                              H, W, mask_p, ACC, IDX)
        a, a00, a01, a10, a11 = _logit(q_ptr, qb, sqc, q_pix, k_ptr, kb, skc, skh, skw, y0, x0, y1, x1, ly, lx,
                                       m00, m01, m10, m11, mask_p, DG, BLOCK_D, BLOCK_P, ACC, IDX)
        g00 = _gdot(g_ptr, gb, sgc, g_pix, v_ptr, vb, svc, y0 * svh + x0 * svw, mask_p, m00, CG, BLOCK_C, BLOCK_P, ACC, IDX)
        g01 = _gdot(g_ptr, gb, sgc, g_pix, v_ptr, vb, svc, y0 * svh + x1 * svw, mask_p, m01, CG, BLOCK_C, BLOCK_P, ACC, IDX)
        g10 = _gdot(g_ptr, gb, sgc, g_pix, v_ptr, vb, svc, y1 * svh + x0 * svw, mask_p, m10, CG, BLOCK_C, BLOCK_P, ACC, IDX)
        g11 = _gdot(g_ptr, gb, sgc, g_pix, v_ptr, vb, svc, y1 * svh + x1 * svw, mask_p, m11, CG, BLOCK_C, BLOCK_P, ACC, IDX)
        w00 = (1 - ly) * (1 - lx)
        w01 = (1 - ly) * lx
        w10 = ly * (1 - lx)
        w11 = ly * lx
        w = tl.where(mask_p, tl.exp(a - lse), 0.0)
        dw = w00 * g00 + w01 * g01 + w10 * g10 + w11 * g11
        da = w * (dw - delta)
        # offsets: derivative of the corner weights, each corner carrying w <g, v_c> + da <q, k_c>
        t00 = w * g00 + da * a00
        t01 = w * g01 + da * a01
        t10 = w * g10 + da * a10
        t11 = w * g11 + da * a11
        ddy = (1 - lx) * (t10 - t00) + lx * (t11 - t01)
        ddx = (1 - ly) * (t01 - t00) + ly * (t11 - t10)
        ch = 2 * (g * P + pt)
        tl.store(doff_ptr + (b * 2 * G * P + ch) * Hq * Wq + offs_p, ddx, mask=mask_p)
        tl.store(doff_ptr + (b * 2 * G * P + ch + 1) * Hq * Wq + offs_p, ddy, mask=mask_p)
        # dq (owned) and dk (scattered) through the sampled keys
        k00 = tl.load(k_ptr + kb + offs_d[:, None] * skc + (y0 * skh + x0 * skw)[None, :], mask=md[:, None] & m00[None, :], other=0.0).to(ACC)
        k01 = tl.load(k_ptr + kb + offs_d[:, None] * skc + (y0 * skh + x1 * skw)[None, :], mask=md[:, None] & m01[None, :], other=0.0).to(ACC)
        k10 = tl.load(k_ptr + kb + offs_d[:, None] * skc + (y1 * skh + x0 * skw)[None, :], mask=md[:, None] & m10[None, :], other=0.0).to(ACC)
        k11 = tl.load(k_ptr + kb + offs_d[:, None] * skc + (y1 * skh + x1 * skw)[None, :], mask=md[:, None] & m11[None, :], other=0.0).to(ACC)
        dq += da[None, :] * (w00[None, :] * k00 + w01[None, :] * k01 + w10[None, :] * k10 + w11[None, :] * k11)
        tl.atomic_add(dk_ptr + dkb + (y0 * W + x0)[None, :], qt * (da * w00)[None, :], mask=md[:, None] & m00[None, :])
        tl.atomic_add(dk_ptr + dkb + (y0 * W + x1)[None, :], qt * (da * w01)[None, :], mask=md[:, None] & m01[None, :])
        tl.atomic_add(dk_ptr + dkb + (y1 * W + x0)[None, :], qt * (da * w10)[None, :], mask=md[:, None] & m10[None, :])
        tl.atomic_add(dk_ptr + dkb + (y1 * W + x1)[None, :], qt * (da * w11)[None, :], mask=md[:, None] & m11[None, :])
        # dv (scattered): w * corner weight * grad_out
        for c0 in range(0, CG, BLOCK_C):
            offs_c = (c0 + tl.arange(0, BLOCK_C)).to(IDX)
            mc = offs_c < CG
            gt = tl.load(g_ptr + gb + offs_c[:, None] * sgc + g_pix[None, :], mask=mc[:, None] & mask_p[None, :],
                         other=0.0).to(ACC)
            dvb = b * C * H * W + (g * CG + offs_c[:, None]) * H * W
            tl.atomic_add(dv_ptr + dvb + (y0 * W + x0)[None, :], gt * (w * w00)[None, :], mask=mc[:, None] & m00[None, :])
            tl.atomic_add(dv_ptr + dvb + (y0 * W + x1)[None, :], gt * (w * w01)[None, :], mask=mc[:, None] & m01[None, :])
            tl.atomic_add(dv_ptr + dvb + (y1 * W + x0)[None, :], gt * (w * w10)[None, :], mask=mc[:, None] & m10[None, :])
            tl.atomic_add(dv_ptr + dvb + (y1 * W + x1)[None, :], gt * (w * w11)[None, :], mask=mc[:, None] & m11[None, :])
    tl.store(dq_ptr + b * D * Hq * Wq + (g * DG + offs_d[:, None]) * Hq * Wq + offs_p[None, :], dq,
             mask=md[:, None] & mask_p[None, :])


# ----------------------------------------------------------------------------------------------------
# launchers (block sizes, grid and accumulation dtype shared with the window kernels)
# ----------------------------------------------------------------------------------------------------


def sapa_deform_fwd(q, k, v, offset, P: int, G: int, S: int):
    """Returns out [B, C, H', W'] and lse [B, G, H', W']."""
    B, D, Hq, Wq = q.shape
    C, H, W = v.shape[1:]
    out = torch.empty(B, C, Hq, Wq, device=v.device, dtype=v.dtype)
    lse = torch.empty(B, G, Hq, Wq, device=v.device, dtype=_acc_torch(v.dtype))
    if B and Hq * Wq and C:
        DG, CG = D // G, C // G
        def grid(meta):
            return (triton.cdiv(Hq * Wq, meta["BLOCK_P"]), G * triton.cdiv(CG, meta["BLOCK_C"]), B)
        _sapa_deform_fwd_kernel[grid](
            q, k, v, offset, out, lse, DG, CG, H, W, Hq, Wq, P, G,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *offset.stride(),
            S=S, ACC=_acc(v.dtype), IDX=_idx(q, k, v, offset, out), BLOCK_D=_np2(DG, hi=64))
    return out, lse


def sapa_deform_bwd(grad_out, q, k, v, offset, out, lse, P: int, G: int, S: int):
    """Returns dq, dk, dv, doffset (in the input dtypes)."""
    B, D, Hq, Wq = q.shape
    C, H, W = v.shape[1:]
    acc_t = _acc_torch(v.dtype)
    dq = torch.zeros(B, D, Hq, Wq, device=q.device, dtype=acc_t)
    dk = torch.zeros(B, D, H, W, device=k.device, dtype=acc_t)
    dv = torch.zeros(B, C, H, W, device=v.device, dtype=acc_t)
    doff = torch.zeros(B, 2 * G * P, Hq, Wq, device=offset.device, dtype=acc_t)
    if B and Hq * Wq and C:
        DG, CG = D // G, C // G
        if DG > 256:
            raise ValueError(f"triton sapa_deform: at most 256 key channels per group, got {DG}")
        acc = _acc(v.dtype)
        idx = _idx(grad_out, q, k, v, offset, out, dq, dk, dv, doff)
        delta = torch.empty(B, G, Hq, Wq, device=v.device, dtype=acc_t)
        _group_rowdot_kernel[_grid(Hq * Wq, G, B)](grad_out, out, delta, CG, Hq, Wq, *grad_out.stride(),
                                                   *out.stride(), ACC=acc, IDX=idx)
        _sapa_deform_bwd_kernel[_grid(Hq * Wq, G, B)](
            q, k, v, offset, grad_out, lse, delta, dq, dk, dv, doff, DG, CG, H, W, Hq, Wq, P, G,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *offset.stride(),
            S=S, ACC=acc, IDX=idx, BLOCK_D=_np2(DG, hi=256), BLOCK_C=_np2(CG, hi=64))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), doff.to(offset.dtype)
