"""Triton kernels for the window ops (GPU; on CPU tensors under TRITON_INTERPRET=1, which is how CI
checks them). Kernels and launchers only; custom-op registration and autograd live in op.py.

Index conventions (docs/SEMANTICS.md §1): high-res pixel p = (i, j) of an [H', W'] map, flattened p = i * W' + j;
low-res centre (i // S, j // S); window entry n = (dy + R) * K + (dx + R). Out-of-range window
positions have key 0 (logit exactly 0, still in the softmax) and value 0.

Design:
* Forward of the fused op ``sapa`` never writes the [B, K², H', W'] map: a program owns BLOCK_P
  output pixels and one block of value channels; pass 1 computes the row-wise log-sum-exp online over
  the K² logits, pass 2 recomputes each logit (a d-long dot: d = 32 is small next to C = 256) and
  accumulates exp(logit - lse) * v. Saved for backward: out and lse [B, H', W'].
* Backward recomputes, never stores, the kernel map. With w = exp(a - lse), dw_n = <g_p, v_n> and
  delta_p = <g_p, out_p> (the flash-attention identity sum_n w_n dw_n = delta_p), da_n = w_n (dw_n -
  delta_p). dq is a gather over the K² window entries of each high-res pixel; dk and dv are gathers
  over the K² * S² high-res pixels that see each low-res pixel, so no atomics are needed and the
  result is deterministic.
* All accumulation is float32; half-precision inputs are loaded and upcast, outputs cast on store.
* Window loops are dynamic (``range(K * K)``, not ``tl.static_range``): unrolled, the gather forward
  took 77 s to compile for sm_90 (triton 3.7.1, ``triton.compile`` on this project's 2-core CI box,
  no GPU needed), dynamic 6.5 s; each autotune config is one such compile.
* Block sizes are autotuned (``triton.autotune``) per shape (the key) and dtype (triton adds the
  tensors' dtypes to the key); under TRITON_INTERPRET=1 every kernel has one small config, so the
  interpreter tests do not time configs.
* Indices are int32 unless some tensor of the call spans 2**31 elements or more; then every
  per-element offset is computed in int64 (``IDX``; tested with :data:`FORCE_INT64`).
* Half precision: the fused forward's value weighting can run on tensor cores (``tl.dot``,
  :func:`_sapa_fwd_dot_kernel`); which of the two forwards runs is measured per shape and dtype on
  the GPU (:func:`_pick_variant`).
"""
from __future__ import annotations

import triton
import triton.language as tl
import torch

from ... import flags

#: TRITON_INTERPRET is read by triton when a kernel is decorated; so is it here
INTERPRET = flags.triton_interpret()
#: tests set this to run the int64-index kernels at small sizes
FORCE_INT64 = False


def _np2(n: int, lo: int = 16, hi: int = 128) -> int:
    """Power-of-two block for a loop over ``n`` channels; under the interpreter up to 256 (its cost
    grows with the number of block operations, not with their size)."""
    return max(lo, min(max(hi, 256) if INTERPRET else hi, triton.next_power_of_2(max(int(n), 1))))


def _span(t: torch.Tensor) -> int:
    """1 + the largest element offset of ``t`` (its storage span in elements)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))


def _idx(*tensors: torch.Tensor):
    """tl.int64 when any tensor (inputs and outputs) spans 2**31 elements or more, else tl.int32."""
    big = FORCE_INT64 or any(max(_span(t), t.numel()) >= 2 ** 31 - 1 for t in tensors if t is not None)
    return tl.int64 if big else tl.int32


#: SAPA_TRITON_AUTOTUNE=0: the first config of each space, no tuning (read at import, like INTERPRET)
AUTOTUNE = flags.triton_autotune()


def _configs(space, interp):
    """Autotune configs: ``space`` = [(kwargs, num_warps)]; one config (``interp``) under the
    interpreter, the first of ``space`` with SAPA_TRITON_AUTOTUNE=0. Every config compiles once
    per dtype and constexpr set (~1-2 s each on a GPU), so the spaces are kept to 3-4 entries."""
    if INTERPRET:
        return [triton.Config(dict(interp), num_warps=1)]
    if not AUTOTUNE:
        space = space[:1]
    return [triton.Config(dict(kw), num_warps=w) for kw, w in space]


# interpreter configs: large blocks, because its cost grows with the number of programs, not their size
_I_PC = {"BLOCK_P": 64, "BLOCK_C": 256}
_I_P = {"BLOCK_P": 64}
# two configs per kernel: each one more compile (1-16 s per kernel on a 2-core host, 48 s for the
# whole set of one dtype and K, s), which the first call of every shape pays
_PIX_CHAN = [({"BLOCK_P": 64, "BLOCK_C": 64}, 4), ({"BLOCK_P": 128, "BLOCK_C": 64}, 8)]
_PIX = [({"BLOCK_P": 64}, 4), ({"BLOCK_P": 128}, 4)]
_KEY = ["D", "C", "H", "W", "Hq", "Wq", "K", "S"]


# ----------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _dot_window(a_ptr, a_base, a_sc, a_off, b_ptr, b_base, b_sc, b_off, mask_a, mask_b, D,
                BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr):
    """sum_d a[a_base + d*a_sc + a_off[p]] * b[b_base + d*b_sc + b_off[p]] for each of BLOCK_P pixels."""
    acc = tl.zeros([BLOCK_P], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = (d0 + tl.arange(0, BLOCK_D)).to(IDX)
        md = offs_d < D
        at = tl.load(a_ptr + a_base + offs_d[:, None] * a_sc + a_off[None, :],
                     mask=md[:, None] & mask_a[None, :], other=0.0).to(ACC)
        bt = tl.load(b_ptr + b_base + offs_d[:, None] * b_sc + b_off[None, :],
                     mask=md[:, None] & mask_b[None, :], other=0.0).to(ACC)
        acc += tl.sum(at * bt, axis=0)
    return acc


@triton.jit
def _window_pos(n, li, lj, H, W, mask_p, K: tl.constexpr):
    R: tl.constexpr = K // 2
    dy = n // K - R
    dx = n % K - R
    ki = li + dy
    kj = lj + dx
    valid = mask_p & (ki >= 0) & (ki < H) & (kj >= 0) & (kj < W)
    return ki, kj, valid


@triton.jit
def _pixels(pid, BLOCK: tl.constexpr, N, IDX: tl.constexpr):
    offs = pid.to(IDX) * BLOCK + tl.arange(0, BLOCK).to(IDX)
    return offs, offs < N


# ----------------------------------------------------------------------------------------------------
# fused sapa: forward (two variants; _pick_variant measures which one runs)
# ----------------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(_PIX_CHAN, _I_PC), key=_KEY)
@triton.jit
def _sapa_fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
                     D, C, H, W, Hq, Wq,
                     sqb, sqc, sqh, sqw, skb, skc, skh, skw, svb, svc, svh, svw,
                     sob, soc, soh, sow,
                     K: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Gather variant: per window entry a d-long dot per pixel, then a [BLOCK_C, BLOCK_P] axpy."""
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_p, mask_p = _pixels(tl.program_id(0), BLOCK_P, Hq * Wq, IDX)
    i = offs_p // Wq
    j = offs_p % Wq
    li = i // S
    lj = j // S
    q_off = i * sqh + j * sqw
    # pass 1: online log-sum-exp over the K*K logits
    m = tl.full([BLOCK_P], float("-inf"), dtype=ACC)
    l = tl.zeros([BLOCK_P], dtype=ACC)
    for n in range(K * K):
        ki, kj, valid = _window_pos(n, li, lj, H, W, mask_p, K)
        a = _dot_window(q_ptr, b * sqb, sqc, q_off, k_ptr, b * skb, skc, ki * skh + kj * skw,
                        mask_p, valid, D, BLOCK_D, BLOCK_P, ACC, IDX)
        m_new = tl.maximum(m, a)
        l = l * tl.exp(m - m_new) + tl.exp(a - m_new)
        m = m_new
    lse = m + tl.log(l)
    # pass 2: weighted sum of values for this block of channels
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(IDX)
    mc = offs_c < C
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for n in range(K * K):
        ki, kj, valid = _window_pos(n, li, lj, H, W, mask_p, K)
        a = _dot_window(q_ptr, b * sqb, sqc, q_off, k_ptr, b * skb, skc, ki * skh + kj * skw,
                        mask_p, valid, D, BLOCK_D, BLOCK_P, ACC, IDX)
        w = tl.exp(a - lse)
        vt = tl.load(v_ptr + b * svb + offs_c[:, None] * svc + (ki * svh + kj * svw)[None, :],
                     mask=mc[:, None] & valid[None, :], other=0.0).to(ACC)
        acc += vt * w[None, :]
    tl.store(out_ptr + b * sob + offs_c[:, None] * soc + (i * soh + j * sow)[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mc[:, None] & mask_p[None, :])
    if pid_c == 0:
        tl.store(lse_ptr + b * Hq * Wq + offs_p, lse, mask=mask_p)


_DOT_SPACE = [({"PH": 2, "PW": 16, "BU": 16, "BLOCK_C": 64}, 4), ({"PH": 4, "PW": 16, "BU": 16, "BLOCK_C": 128}, 8)]


@triton.autotune(configs=_configs(_DOT_SPACE, {"PH": 2, "PW": 8, "BU": 16, "BLOCK_C": 256}), key=_KEY)
@triton.jit
def _sapa_fwd_dot_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
                         D, C, H, W, Hq, Wq,
                         sqb, sqc, sqh, sqw, skb, skc, skh, skw, svb, svc, svh, svw,
                         sob, soc, soh, sow,
                         K: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
                         DOT_F32: tl.constexpr, BLOCK_D: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                         BU: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tensor-core variant: a program owns a PH x PW tile of high-res pixels; the union of their
    windows is a band of low-res rows x columns, walked in chunks of BU columns. Per chunk the
    logits are one tl.dot ([PH*PW, d] x [d, BU]) and the value weighting another
    ([PH*PW, BU] x [BU, BLOCK_C]); entries outside a pixel's K x K window are masked to
    weight 0 before the softmax (online, flash-attention style), so nothing K^2-sized is written.
    Positions outside the image load k = 0 and v = 0, which is exactly the zero-padding rule (logit
    0 in the softmax, value 0). The band costs ~BU / K more MACs than the K^2 gather, on units
    that are ~16x faster; the weights enter the second dot in the value dtype (bf16 / fp16), as in
    flash attention, with float32 accumulation."""
    R: tl.constexpr = K // 2
    n_tw = tl.cdiv(Wq, PW)
    pid = tl.program_id(0)
    ti = (pid // n_tw).to(IDX)
    tj = (pid % n_tw).to(IDX)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    r = tl.arange(0, PH * PW).to(IDX)
    i = ti * PH + r // PW
    j = tj * PW + r % PW
    mask_p = (i < Hq) & (j < Wq)
    li = i // S
    lj = j // S
    offs_d = tl.arange(0, BLOCK_D).to(IDX)
    md = offs_d < D
    qt = tl.load(q_ptr + b * sqb + offs_d[None, :] * sqc + (i * sqh + j * sqw)[:, None],
                 mask=mask_p[:, None] & md[None, :], other=0.0)                      # [P, D]
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(IDX)
    mc = offs_c < C
    # the band: low-res rows r_lo..r_hi, columns u_lo..u_hi, walked in BU-wide column chunks
    r_lo = (ti * PH) // S - R
    r_hi = (tl.minimum(ti * PH + PH, Hq) - 1) // S + R
    u_lo = (tj * PW) // S - R
    u_hi = (tl.minimum(tj * PW + PW, Wq) - 1) // S + R
    m = tl.full([PH * PW], float("-inf"), dtype=ACC)
    l = tl.zeros([PH * PW], dtype=ACC)
    acc = tl.zeros([PH * PW, BLOCK_C], dtype=ACC)
    for row in range(r_lo, r_hi + 1):
        row_in = (row >= 0) & (row < H)
        row_win = (tl.abs(row - li) <= R) & mask_p                                   # [P]
        for c0 in range(u_lo, u_hi + 1, BU):
            cols = c0 + tl.arange(0, BU).to(IDX)                                      # [U] low-res columns
            col_in = (cols >= 0) & (cols < W) & row_in
            kt = tl.load(k_ptr + b * skb + offs_d[:, None] * skc + row * skh + cols[None, :] * skw,
                         mask=md[:, None] & col_in[None, :], other=0.0)              # [D, U]
            if DOT_F32:  # triton 3.7's interpreter multiplies bf16 bit patterns as integers in tl.dot
                a = tl.dot(qt.to(tl.float32), kt.to(tl.float32), out_dtype=ACC)
            else:
                a = tl.dot(qt, kt, out_dtype=ACC)                                      # [P, U]
            win = row_win[:, None] & (tl.abs(cols[None, :] - lj[:, None]) <= R) & (cols <= u_hi)[None, :]
            a = tl.where(win, a, float("-inf"))
            m_new = tl.maximum(m, tl.max(a, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no entry of this pixel seen yet
            alpha = tl.exp(m - m_safe)
            pexp = tl.exp(a - m_safe[:, None])
            l = l * alpha + tl.sum(pexp, axis=1)
            vt = tl.load(v_ptr + b * svb + offs_c[None, :] * svc + row * svh + cols[:, None] * svw,
                         mask=col_in[:, None] & mc[None, :], other=0.0)              # [U, C]
            pv = pexp.to(vt.dtype)  # the weights enter the dot in the value dtype, as in flash attention
            if DOT_F32:
                acc = acc * alpha[:, None] + tl.dot(pv.to(tl.float32), vt.to(tl.float32), out_dtype=ACC)
            else:
                acc = acc * alpha[:, None] + tl.dot(pv, vt, out_dtype=ACC)
            m = m_new
    l_safe = tl.where(l > 0, l, 1.0)
    out = acc / l_safe[:, None]
    tl.store(out_ptr + b * sob + offs_c[None, :] * soc + (i * soh + j * sow)[:, None],
             out.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mc[None, :])
    if pid_c == 0:
        tl.store(lse_ptr + b * Hq * Wq + i * Wq + j, m + tl.log(l_safe), mask=mask_p)


# ----------------------------------------------------------------------------------------------------
# fused sapa: backward
# ----------------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(_PIX_CHAN, _I_PC), key=["C", "Hq", "Wq"])
@triton.jit
def _rowdot_kernel(a_ptr, b_ptr, out_ptr, C, Hq, Wq, sab, sac, sah, saw, sbb, sbc, sbh, sbw,
                   ACC: tl.constexpr, IDX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, p] = sum_c a[b, c, p] * b[b, c, p]  (delta = <grad_out, out>)."""
    b = tl.program_id(1).to(tl.int64)
    offs_p, mask_p = _pixels(tl.program_id(0), BLOCK_P, Hq * Wq, IDX)
    i = offs_p // Wq
    j = offs_p % Wq
    acc = _dot_window(a_ptr, b * sab, sac, i * sah + j * saw, b_ptr, b * sbb, sbc, i * sbh + j * sbw,
                      mask_p, mask_p, C, BLOCK_C, BLOCK_P, ACC, IDX)
    tl.store(out_ptr + b * Hq * Wq + offs_p, acc, mask=mask_p)


@triton.autotune(configs=_configs(_PIX, _I_P), key=_KEY)
@triton.jit
def _sapa_bwd_q_kernel(q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, delta_ptr, dq_ptr,
                       D, C, H, W, Hq, Wq,
                       sqb, sqc, sqh, sqw, skb, skc, skh, skw, svb, svc, svh, svw, sgb, sgc, sgh, sgw,
                       K: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """dq[:, p] = sum_n da[p, n] k[:, window n of p] for one block of d-channels."""
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_p, mask_p = _pixels(tl.program_id(0), BLOCK_P, Hq * Wq, IDX)
    i = offs_p // Wq
    j = offs_p % Wq
    li = i // S
    lj = j // S
    lse = tl.load(lse_ptr + b * Hq * Wq + offs_p, mask=mask_p, other=0.0)
    delta = tl.load(delta_ptr + b * Hq * Wq + offs_p, mask=mask_p, other=0.0)
    offs_d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(IDX)
    md = offs_d < D
    dq = tl.zeros([BLOCK_D, BLOCK_P], dtype=ACC)
    for n in range(K * K):
        ki, kj, valid = _window_pos(n, li, lj, H, W, mask_p, K)
        a = _dot_window(q_ptr, b * sqb, sqc, i * sqh + j * sqw, k_ptr, b * skb, skc, ki * skh + kj * skw,
                        mask_p, valid, D, BLOCK_D, BLOCK_P, ACC, IDX)
        dw = _dot_window(g_ptr, b * sgb, sgc, i * sgh + j * sgw, v_ptr, b * svb, svc, ki * svh + kj * svw,
                         mask_p, valid, C, BLOCK_C, BLOCK_P, ACC, IDX)
        da = tl.exp(a - lse) * (dw - delta)
        kt = tl.load(k_ptr + b * skb + offs_d[:, None] * skc + (ki * skh + kj * skw)[None, :],
                     mask=md[:, None] & valid[None, :], other=0.0).to(ACC)
        dq += kt * da[None, :]
    tl.store(dq_ptr + b * D * Hq * Wq + offs_d[:, None] * Hq * Wq + offs_p[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=md[:, None] & mask_p[None, :])


_PIX_X = [({"BLOCK_P": 64, "BLOCK_X": 32}, 4), ({"BLOCK_P": 64, "BLOCK_X": 64}, 4)]


@triton.autotune(configs=_configs(_PIX_X, {"BLOCK_P": 64, "BLOCK_X": 256}), key=_KEY + ["DO_K"])
@triton.jit
def _sapa_bwd_kv_kernel(q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, delta_ptr, dx_ptr,
                        D, C, H, W, Hq, Wq,
                        sqb, sqc, sqh, sqw, skb, skc, skh, skw, svb, svc, svh, svw, sgb, sgc, sgh, sgw,
                        K: tl.constexpr, S: tl.constexpr, DO_K: tl.constexpr,
                        ACC: tl.constexpr, IDX: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_X: tl.constexpr):
    """dk (DO_K) or dv of low-res pixel (h, w), gathered over the high-res pixels that see (h, w) as
    window entry n: they lie in the S x S block of low-res centre (h - dy, w - dx).
    dk[:, h, w] = sum da * q[:, p];  dv[:, h, w] = sum w * grad_out[:, p]. Axis 1 = output channel block."""
    pid_x = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    R: tl.constexpr = K // 2
    offs_l, mask_l = _pixels(tl.program_id(0), BLOCK_P, H * W, IDX)
    h = offs_l // W
    w = offs_l % W
    k_off = h * skh + w * skw
    v_off = h * svh + w * svw
    offs_x = (pid_x * BLOCK_X + tl.arange(0, BLOCK_X)).to(IDX)
    if DO_K:
        mx = offs_x < D
    else:
        mx = offs_x < C
    acc = tl.zeros([BLOCK_X, BLOCK_P], dtype=ACC)
    for n in range(K * K):
        ci = h - (n // K - R)
        cj = w - (n % K - R)
        cvalid = mask_l & (ci >= 0) & (ci < H) & (cj >= 0) & (cj < W)
        for sub in range(S * S):
            i = ci * S + sub // S
            j = cj * S + sub % S
            valid = cvalid & (i < Hq) & (j < Wq)
            p = i * Wq + j
            lse = tl.load(lse_ptr + b * Hq * Wq + p, mask=valid, other=0.0)
            a = _dot_window(q_ptr, b * sqb, sqc, i * sqh + j * sqw, k_ptr, b * skb, skc, k_off,
                            valid, valid, D, BLOCK_D, BLOCK_P, ACC, IDX)
            wt = tl.where(valid, tl.exp(a - lse), 0.0)
            if DO_K:
                delta = tl.load(delta_ptr + b * Hq * Wq + p, mask=valid, other=0.0)
                dw = _dot_window(g_ptr, b * sgb, sgc, i * sgh + j * sgw, v_ptr, b * svb, svc, v_off,
                                 valid, valid, C, BLOCK_C, BLOCK_P, ACC, IDX)
                coef = wt * (dw - delta)
                src = tl.load(q_ptr + b * sqb + offs_x[:, None] * sqc + (i * sqh + j * sqw)[None, :],
                              mask=mx[:, None] & valid[None, :], other=0.0).to(ACC)
            else:
                coef = wt
                src = tl.load(g_ptr + b * sgb + offs_x[:, None] * sgc + (i * sgh + j * sgw)[None, :],
                              mask=mx[:, None] & valid[None, :], other=0.0).to(ACC)
            acc += src * coef[None, :]
    if DO_K:
        nch = D
    else:
        nch = C
    tl.store(dx_ptr + b * nch * H * W + offs_x[:, None] * H * W + offs_l[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=mx[:, None] & mask_l[None, :])


# ----------------------------------------------------------------------------------------------------
# window_similarity and reassemble (unfused ops; CARAFE-style reassembly with groups)
# ----------------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(_PIX, _I_P), key=["D", "H", "W", "Hq", "Wq", "K", "S"])
@triton.jit
def _similarity_fwd_kernel(q_ptr, k_ptr, out_ptr, D, H, W, Hq, Wq,
                           sqb, sqc, sqh, sqw, skb, skc, skh, skw,
                           K: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs_p, mask_p = _pixels(tl.program_id(0), BLOCK_P, Hq * Wq, IDX)
    i = offs_p // Wq
    j = offs_p % Wq
    for n in range(K * K):
        ki, kj, valid = _window_pos(n, i // S, j // S, H, W, mask_p, K)
        a = _dot_window(q_ptr, b * sqb, sqc, i * sqh + j * sqw, k_ptr, b * skb, skc, ki * skh + kj * skw,
                        mask_p, valid, D, BLOCK_D, BLOCK_P, ACC, IDX)
        tl.store(out_ptr + (b * K * K + n) * Hq * Wq + offs_p, a.to(out_ptr.dtype.element_ty), mask=mask_p)


@triton.autotune(configs=_configs(_PIX, _I_P), key=["D", "H", "W", "Hq", "Wq", "K", "S"])
@triton.jit
def _similarity_bwd_q_kernel(g_ptr, k_ptr, dq_ptr, D, H, W, Hq, Wq, skb, skc, skh, skw,
                             K: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """dq[:, p] = sum_n g[n, p] k[:, window n]; g is contiguous [B, K*K, H', W']."""
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_p, mask_p = _pixels(tl.program_id(0), BLOCK_P, Hq * Wq, IDX)
    i = offs_p // Wq
    j = offs_p % Wq
    offs_d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(IDX)
    md = offs_d < D
    acc = tl.zeros([BLOCK_D, BLOCK_P], dtype=ACC)
    for n in range(K * K):
        ki, kj, valid = _window_pos(n, i // S, j // S, H, W, mask_p, K)
        g = tl.load(g_ptr + (b * K * K + n) * Hq * Wq + offs_p, mask=mask_p, other=0.0).to(ACC)
        kt = tl.load(k_ptr + b * skb + offs_d[:, None] * skc + (ki * skh + kj * skw)[None, :],
                     mask=md[:, None] & valid[None, :], other=0.0).to(ACC)
        acc += kt * g[None, :]
    tl.store(dq_ptr + b * D * Hq * Wq + offs_d[:, None] * Hq * Wq + offs_p[None, :],
             acc.to(dq_ptr.dtype.element_ty), mask=md[:, None] & mask_p[None, :])


@triton.autotune(configs=_configs(_PIX_CHAN, _I_PC),
                 key=["Cx", "H", "W", "Hq", "Wq", "CPG", "K", "S"])
@triton.jit
def _gather_lowres_kernel(m_ptr, x_ptr, out_ptr, Cx, H, W, Hq, Wq, CPG,
                          sxb, sxc, sxh, sxw,
                          K: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[c, h, w] = sum_n sum_{p sees (h, w) as entry n} m[g(c)*K*K + n, p] * x[c, p].

    m is a contiguous [B, G*K*K, H', W'] map (weights of reassemble, or dlogits of similarity) and x
    a high-res [B, Cx, H', W'] map (grad_out of reassemble, or q of similarity); CPG = channels per
    group of x (Cx when the map has a single group). Serves d(reassemble)/dv and d(similarity)/dk."""
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    R: tl.constexpr = K // 2
    offs_l, mask_l = _pixels(tl.program_id(0), BLOCK_P, H * W, IDX)
    h = offs_l // W
    w = offs_l % W
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(IDX)
    mc = offs_c < Cx
    grp = offs_c // CPG
    G = tl.cdiv(Cx, CPG)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for n in range(K * K):
        ci = h - (n // K - R)
        cj = w - (n % K - R)
        cvalid = mask_l & (ci >= 0) & (ci < H) & (cj >= 0) & (cj < W)
        for sub in range(S * S):
            i = ci * S + sub // S
            j = cj * S + sub % S
            valid = cvalid & (i < Hq) & (j < Wq)
            p = i * Wq + j
            mt = tl.load(m_ptr + ((b * G + grp[:, None]) * K * K + n) * Hq * Wq + p[None, :],
                         mask=mc[:, None] & valid[None, :], other=0.0).to(ACC)
            xt = tl.load(x_ptr + b * sxb + offs_c[:, None] * sxc + (i * sxh + j * sxw)[None, :],
                         mask=mc[:, None] & valid[None, :], other=0.0).to(ACC)
            acc += mt * xt
    tl.store(out_ptr + b * Cx * H * W + offs_c[:, None] * H * W + offs_l[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mc[:, None] & mask_l[None, :])


@triton.autotune(configs=_configs(_PIX_CHAN, _I_PC),
                 key=["C", "H", "W", "Hq", "Wq", "CPG", "K", "S"])
@triton.jit
def _reassemble_fwd_kernel(w_ptr, v_ptr, out_ptr, C, H, W, Hq, Wq, CPG,
                           svb, svc, svh, svw,
                           K: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[c, p] = sum_n w[g(c)*K*K + n, p] * v[c, window n of p]; w contiguous [B, G*K*K, H', W']."""
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_p, mask_p = _pixels(tl.program_id(0), BLOCK_P, Hq * Wq, IDX)
    i = offs_p // Wq
    j = offs_p % Wq
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(IDX)
    mc = offs_c < C
    grp = offs_c // CPG
    G = tl.cdiv(C, CPG)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for n in range(K * K):
        ki, kj, valid = _window_pos(n, i // S, j // S, H, W, mask_p, K)
        wt = tl.load(w_ptr + ((b * G + grp[:, None]) * K * K + n) * Hq * Wq + offs_p[None, :],
                     mask=mc[:, None] & mask_p[None, :], other=0.0).to(ACC)
        vt = tl.load(v_ptr + b * svb + offs_c[:, None] * svc + (ki * svh + kj * svw)[None, :],
                     mask=mc[:, None] & valid[None, :], other=0.0).to(ACC)
        acc += wt * vt
    tl.store(out_ptr + b * C * Hq * Wq + offs_c[:, None] * Hq * Wq + offs_p[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mc[:, None] & mask_p[None, :])


@triton.autotune(configs=_configs(_PIX, _I_P), key=["C", "H", "W", "Hq", "Wq", "CPG", "K", "S"])
@triton.jit
def _reassemble_bwd_w_kernel(g_ptr, v_ptr, dw_ptr, C, H, W, Hq, Wq, CPG,
                             sgb, sgc, sgh, sgw, svb, svc, svh, svw,
                             K: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """dw[g*K*K + n, p] = sum_{c in group g} grad_out[c, p] * v[c, window n of p]."""
    g = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    G = tl.num_programs(1)
    offs_p, mask_p = _pixels(tl.program_id(0), BLOCK_P, Hq * Wq, IDX)
    i = offs_p // Wq
    j = offs_p % Wq
    for n in range(K * K):
        ki, kj, valid = _window_pos(n, i // S, j // S, H, W, mask_p, K)
        d = _dot_window(g_ptr, b * sgb + g * CPG * sgc, sgc, i * sgh + j * sgw,
                        v_ptr, b * svb + g * CPG * svc, svc, ki * svh + kj * svw,
                        mask_p, valid, CPG, BLOCK_C, BLOCK_P, ACC, IDX)
        tl.store(dw_ptr + ((b * G + g) * K * K + n) * Hq * Wq + offs_p, d.to(dw_ptr.dtype.element_ty),
                 mask=mask_p)


# ----------------------------------------------------------------------------------------------------
# launchers (inputs already validated and of one dtype; outputs contiguous NCHW)
# ----------------------------------------------------------------------------------------------------
def _acc(dtype: torch.dtype):
    """Accumulate float64 in float64, everything else (fp32, fp16, bf16) in float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grid(n_pix: int, *rest: int, block: str = "BLOCK_P", chan: tuple[int, str] | None = None):
    """Grid over pixel blocks (axis 0), then ``rest``; ``chan=(n, META key)`` inserts a channel-block axis."""
    def grid(meta):
        axes = [triton.cdiv(max(n_pix, 1), meta[block])]
        if chan is not None:
            axes.append(triton.cdiv(max(chan[0], 1), meta[chan[1]]))
        return (*axes, *rest)
    return grid


#: (variant choice key) -> "dot" | "gather", measured once per shape and dtype on the GPU
_VARIANTS: dict[tuple, str] = {}


def dot_possible(q, v) -> bool:
    """tl.dot needs 16-wide operands and a half-precision value dtype (fp32 would run as tf32)."""
    return v.dtype in (torch.float16, torch.bfloat16) and q.dtype == v.dtype and q.shape[1] >= 16 \
        and q.shape[1] <= 128 and v.shape[1] >= 16


def _launch_fwd(variant: str, q, k, v, out, lse, K: int, S: int):
    B, D, Hq, Wq = q.shape
    C, H, W = v.shape[1:]
    args = (q, k, v, out, lse, D, C, H, W, Hq, Wq, *q.stride(), *k.stride(), *v.stride(), *out.stride())
    meta = dict(K=K, S=S, ACC=_acc(v.dtype), IDX=_idx(q, k, v, out), BLOCK_D=_np2(D, hi=128))
    if variant == "dot":
        meta["DOT_F32"] = INTERPRET and v.dtype == torch.bfloat16
        _sapa_fwd_dot_kernel[lambda m: (triton.cdiv(Hq, m["PH"]) * triton.cdiv(Wq, m["PW"]),
                                        triton.cdiv(C, m["BLOCK_C"]), B)](*args, **meta)
    else:
        meta["BLOCK_D"] = _np2(D, hi=64)
        _sapa_fwd_kernel[_grid(Hq * Wq, B, chan=(C, "BLOCK_C"))](*args, **meta)


def _pick_variant(q, k, v, out, lse, K: int, S: int) -> str:
    """"dot" or "gather" for this shape and dtype: under the interpreter "dot" whenever possible (so
    the tests run it); on a GPU both are timed once (triton.testing.do_bench) and the faster kept."""
    if not dot_possible(q, v):
        return "gather"
    if INTERPRET or q.device.type != "cuda":
        return "dot"
    key = (tuple(q.shape), tuple(v.shape), q.dtype, K, S, q.stride(), v.stride())
    if key not in _VARIANTS:
        from triton.testing import do_bench

        times = {name: do_bench(lambda: _launch_fwd(name, q, k, v, out, lse, K, S)) for name in ("gather", "dot")}
        _VARIANTS[key] = min(times, key=times.get)
    return _VARIANTS[key]


def sapa_fwd(q, k, v, K: int, S: int, variant: str | None = None):
    """Fused forward: returns out [B, C, H', W'] and lse [B, H', W'] (saved for backward).
    ``variant`` ("gather" | "dot") overrides the measured choice (tests)."""
    B, D, Hq, Wq = q.shape
    C, H, W = v.shape[1:]
    out = torch.empty(B, C, Hq, Wq, device=v.device, dtype=v.dtype)
    lse = torch.empty(B, Hq, Wq, device=v.device, dtype=_stat_dtype(v.dtype))
    if B and Hq * Wq and C:
        if variant is None:
            variant = _pick_variant(q, k, v, out, lse, K, S)
        elif variant == "dot" and not dot_possible(q, v):
            raise ValueError(f"variant 'dot' needs fp16/bf16 q and v with 16 <= d <= 128 and C >= 16, got "
                             f"{q.dtype}, d={D}, C={C}")
        _launch_fwd(variant, q, k, v, out, lse, K, S)
    return out, lse


def sapa_bwd(grad_out, q, k, v, out, lse, K: int, S: int):
    """Fused backward: dq, dk, dv, recomputing the kernel map from q, k and lse."""
    B, D, Hq, Wq = q.shape
    C, H, W = v.shape[1:]
    dq = torch.zeros(B, D, Hq, Wq, device=q.device, dtype=q.dtype)
    dk = torch.zeros(B, D, H, W, device=k.device, dtype=k.dtype)
    dv = torch.zeros(B, C, H, W, device=v.device, dtype=v.dtype)
    if B == 0 or Hq * Wq == 0 or C == 0:
        return dq, dk, dv
    acc = _acc(v.dtype)
    idx = _idx(grad_out, q, k, v, out, dq, dk, dv)
    BD, BC = _np2(D, hi=64), _np2(C, hi=64)
    delta = torch.empty(B, Hq, Wq, device=q.device, dtype=_stat_dtype(v.dtype))
    _rowdot_kernel[_grid(Hq * Wq, B)](grad_out, out, delta, C, Hq, Wq, *grad_out.stride(), *out.stride(),
                                      ACC=acc, IDX=idx)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    if D:
        _sapa_bwd_q_kernel[_grid(Hq * Wq, triton.cdiv(D, BD), B)](
            q, k, v, grad_out, lse, delta, dq, D, C, H, W, Hq, Wq, *strides,
            K=K, S=S, ACC=acc, IDX=idx, BLOCK_D=BD, BLOCK_C=BC)
    for do_k, dx, nch in ((True, dk, D), (False, dv, C)):
        if nch:
            _sapa_bwd_kv_kernel[_grid(H * W, B, chan=(nch, "BLOCK_X"))](
                q, k, v, grad_out, lse, delta, dx, D, C, H, W, Hq, Wq, *strides,
                K=K, S=S, DO_K=do_k, ACC=acc, IDX=idx, BLOCK_D=BD, BLOCK_C=BC)
    return dq, dk, dv


def similarity_fwd(q, k, K: int, S: int):
    B, D, Hq, Wq = q.shape
    H, W = k.shape[-2:]
    out = torch.empty(B, K * K, Hq, Wq, device=q.device, dtype=q.dtype)
    if out.numel():
        _similarity_fwd_kernel[_grid(Hq * Wq, B)](
            q, k, out, D, H, W, Hq, Wq, *q.stride(), *k.stride(),
            K=K, S=S, ACC=_acc(q.dtype), IDX=_idx(q, k, out), BLOCK_D=_np2(D, hi=64))
    return out


def similarity_bwd(grad, q, k, K: int, S: int):
    B, D, Hq, Wq = q.shape
    H, W = k.shape[-2:]
    grad = grad.contiguous()
    dq = torch.zeros(B, D, Hq, Wq, device=q.device, dtype=q.dtype)
    dk = torch.zeros(B, D, H, W, device=k.device, dtype=k.dtype)
    if B == 0 or Hq * Wq == 0 or D == 0:
        return dq, dk
    acc, BD, idx = _acc(q.dtype), _np2(D, hi=64), _idx(grad, q, k, dq, dk)
    _similarity_bwd_q_kernel[_grid(Hq * Wq, triton.cdiv(D, BD), B)](
        grad, k, dq, D, H, W, Hq, Wq, *k.stride(), K=K, S=S, ACC=acc, IDX=idx, BLOCK_D=BD)
    _gather_lowres_kernel[_grid(H * W, B, chan=(D, "BLOCK_C"))](
        grad, q, dk, D, H, W, Hq, Wq, D, *q.stride(), K=K, S=S, ACC=acc, IDX=idx)
    return dq, dk


def reassemble_fwd(weights, v, K: int, S: int, G: int):
    B, C, H, W = v.shape
    Hq, Wq = weights.shape[-2:]
    weights = weights.contiguous()
    out = torch.empty(B, C, Hq, Wq, device=v.device, dtype=v.dtype)
    if out.numel():
        _reassemble_fwd_kernel[_grid(Hq * Wq, B, chan=(C, "BLOCK_C"))](
            weights, v, out, C, H, W, Hq, Wq, C // G, *v.stride(),
            K=K, S=S, ACC=_acc(v.dtype), IDX=_idx(weights, v, out))
    return out


def reassemble_bwd(grad_out, weights, v, K: int, S: int, G: int):
    B, C, H, W = v.shape
    Hq, Wq = weights.shape[-2:]
    weights = weights.contiguous()
    dw = torch.zeros(B, G * K * K, Hq, Wq, device=v.device, dtype=weights.dtype)
    dv = torch.zeros(B, C, H, W, device=v.device, dtype=v.dtype)
    if B == 0 or Hq * Wq == 0 or C == 0:
        return dw, dv
    acc, idx = _acc(v.dtype), _idx(grad_out, weights, v, dw, dv)
    _reassemble_bwd_w_kernel[_grid(Hq * Wq, G, B)](
        grad_out, v, dw, C, H, W, Hq, Wq, C // G, *grad_out.stride(), *v.stride(),
        K=K, S=S, ACC=acc, IDX=idx, BLOCK_C=_np2(C // G, hi=64))
    _gather_lowres_kernel[_grid(H * W, B, chan=(C, "BLOCK_C"))](
        weights, grad_out, dv, C, H, W, Hq, Wq, C // G, *grad_out.stride(),
        K=K, S=S, ACC=acc, IDX=idx)
    return dw, dv
