"""Numba CPU kernels of the window ops (SPEC §1): similarity, reassembly, fused SAPA; forward and
backward. Wrapped as custom ops in ``op.py``; nothing here knows about torch.

Layout: the tensors' own NCHW layout (C-contiguous numpy views, no copies):

    q  [B, d, H', W']      k  [B, d, H, W]       v  [B, C, H, W]
    wk [B, G*K*K, H', W']  reassembly kernels, similarity logits (G = 1), backward workspaces
    out [B, C, H', W']     lse [B, H', W']       (fused forward: log-sum-exp per output pixel)

Semantics are those of ``reference.py``: output pixel (i, j) owns low-res cell (i // s, j // s);
window position n = (dy + r) * K + dx, dx in [0, K), reads low-res column j // s + dx - r; positions
outside the map have key 0 (logit exactly 0, still in the softmax) and value 0. Guides smaller than
s*H (ceil mode) need nothing special: output rows/columns beyond H', W' are simply not visited.

Why NCHW and rows, not channels-last pixels: the first version of these kernels was channels-last,
one output pixel per inner loop (fused forward 8.6 ms at B=2, C=256, d=32, 64x64 -> 128x128, K=5,
2 threads). But torch's NCHW <-> NHWC copies of the inputs and of the 33 MB output cost ~30 ms on
this machine, more than the kernel. So every loop here runs along a row ``j`` of the output, in the
tensors' own layout, and vectorises over ``j``. The trick that makes a low-res row readable at
high-res columns: ``up[(x + r) * s + t] = low[..., x]`` (the row upsampled by nearest, zero-padded
by r cells each side), so low-res column ``j // s + dx - r`` is ``up[j + dx * s]``: contiguous.

Parallelism: ``prange`` over low-res rows (b, y); each iteration handles the s output rows of that
cell row (sharing the upsampled key/value rows). Gradients landing on low-res tensors (dk, dv) are
*gathered* per low-res row (each low-res pixel visits the output pixels whose window holds it): no
atomics, no per-thread copies, deterministic.

Specialisations: each kernel compiles once per float dtype (float32, float64; half precision is
computed in float32 by op.py) for C-contiguous arrays; ints arrive as int64. ``cache=True`` keeps the
machine code in __pycache__ (or NUMBA_CACHE_DIR) across processes.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

# fastmath without 'nnan'/'ninf': reassociation (vectorised dot products and sums) is what buys
# speed; keeping inf/NaN semantics lets NaN inputs propagate as they do in the reference.
_FAST = {"reassoc", "contract", "arcp", "nsz", "afn"}
_JIT = dict(parallel=True, fastmath=_FAST, cache=True)
_INLINE = dict(fastmath=_FAST, cache=True, inline="always")


@njit(**_INLINE)
def _fill_up(low, b, c, yy, s, r, up):
    """up[(x + r) * s + t] = low[b, c, yy, x]; the 2*r*s padding entries of ``up`` stay 0."""
    for x in range(low.shape[3]):
        val = low[b, c, yy, x]
        for t in range(s):
            up[(x + r) * s + t] = val


@njit(**_INLINE)
def _window_dot(a, low, b, y, i0, ns, K, s, c0, c1, up, acc, ab, ai0, n0):
    """acc[ab, n0 + n, ai0 + ti, j] += sum_{c0 <= c < c1} a[b, c, i0 + ti, j] * low[b, c, yy, j//s + dx - r]
    for output rows i0 + ti (ti < ns) of low-res row y, window rows yy = y + dy inside the map."""
    H, Wq, r = low.shape[2], a.shape[3], K // 2
    for c in range(c0, c1):
        for yy in range(max(0, y - r), min(H, y + r + 1)):
            _fill_up(low, b, c, yy, s, r, up)
            nb = n0 + (yy - y + r) * K
            for ti in range(ns):
                arow = a[b, c, i0 + ti]
                for dx in range(K):
                    # 1-D views: indices j >= 0 are provably non-negative, so no wraparound test
                    # per element and the loop vectorises (with 4-D indexing it ran 10x slower)
                    dst = acc[ab, nb + dx, ai0 + ti]
                    upo = up[dx * s:]
                    for j in range(Wq):
                        dst[j] += arow[j] * upo[j]


@njit(**_INLINE)
def _window_sum(coef, cb, ci0, n0, low, b, y, ns, K, s, c, up, acc):
    """acc[ti, j] = sum_n coef[cb, n0 + n, ci0 + ti, j] * low[b, c, yy, j//s + dx - r] (the reassembly
    of channel c for ns output rows); positions outside the map contribute 0."""
    H, Wq, r = low.shape[2], acc.shape[1], K // 2
    for ti in range(ns):
        for j in range(Wq):
            acc[ti, j] = 0
    for yy in range(max(0, y - r), min(H, y + r + 1)):
        _fill_up(low, b, c, yy, s, r, up)
        nb = n0 + (yy - y + r) * K
        for ti in range(ns):
            dst = acc[ti]
            for dx in range(K):
                crow = coef[cb, nb + dx, ci0 + ti]
                upo = up[dx * s:]
                for j in range(Wq):
                    dst[j] += crow[j] * upo[j]


@njit(**_INLINE)
def _gather(coef, n0, src, b, y, c, K, s, H, u, out):
    """out[b, c, y, x] = sum over output pixels (i, j) whose window holds low-res (y, x) at position
    n of coef[b, n0 + n, i, j] * src[b, c, i, j]: the transpose of reassembly. ``u`` accumulates at
    high-res columns shifted by the window offset, ``u[j + dx*s]``, then each s-block is summed."""
    Hq, Wq, W, r = src.shape[2], src.shape[3], out.shape[3], K // 2
    for t in range(u.shape[0]):
        u[t] = 0
    for cy in range(max(0, y - r), min(H, y + r + 1)):
        nb = n0 + (y - cy + r) * K
        for i in range(cy * s, min(cy * s + s, Hq)):
            srow = src[b, c, i]
            for dx in range(K):
                crow = coef[b, nb + dx, i]
                uo = u[dx * s:]
                for j in range(Wq):
                    uo[j] += crow[j] * srow[j]
    for x in range(W):
        t = u[(x + r) * s]
        for t2 in range(1, s):
            t += u[(x + r) * s + t2]
        out[b, c, y, x] = t


@njit(**_INLINE)
def _zero_rows(a, b, n0, n1, i0, ns):
    for n in range(n0, n1):
        for ti in range(ns):
            for j in range(a.shape[3]):
                a[b, n, i0 + ti, j] = 0


# ------------------------------------------------------------------------------------ similarity
# The logits are this op's output, so they are written; one pass of d*K*K FMAs per output pixel.
@njit(**_JIT)
def similarity_fwd(q, k, K, s, out):
    B, d, Hq, Wq = q.shape
    H, W = k.shape[2], k.shape[3]
    for by in prange(B * H):
        b, y = by // H, by % H
        i0 = y * s
        ns = min(s, Hq - i0)
        up = np.zeros(s * (W + K - 1), q.dtype)
        _zero_rows(out, b, 0, K * K, i0, ns)
        _window_dot(q, k, b, y, i0, ns, K, s, 0, d, up, out, b, i0, 0)


@njit(**_JIT)
def similarity_bwd(gl, q, k, K, s, gq, gk):
    """gl: grad of the logits [B, K*K, H', W'] -> gq (per output row), gk (gathered)."""
    B, d, Hq, Wq = q.shape
    H, W = k.shape[2], k.shape[3]
    for by in prange(B * H):
        b, y = by // H, by % H
        i0 = y * s
        ns = min(s, Hq - i0)
        up = np.zeros(s * (W + K - 1), q.dtype)
        acc = np.empty((s, Wq), q.dtype)
        for c in range(d):
            _window_sum(gl, b, i0, 0, k, b, y, ns, K, s, c, up, acc)
            for ti in range(ns):
                for j in range(Wq):
                    gq[b, c, i0 + ti, j] = acc[ti, j]
    for by in prange(B * H):
        b, y = by // H, by % H
        u = np.empty(s * (W + K - 1), q.dtype)
        for c in range(d):
            _gather(gl, 0, q, b, y, c, K, s, H, u, gk)


# ------------------------------------------------------------------------------------ reassembly
@njit(**_JIT)
def reassemble_fwd(wk, v, K, s, G, out):
    B, C, H, W = v.shape
    Hq, Wq = wk.shape[2], wk.shape[3]
    KK, Cg = K * K, C // G
    for by in prange(B * H):
        b, y = by // H, by % H
        i0 = y * s
        ns = min(s, Hq - i0)
        up = np.zeros(s * (W + K - 1), v.dtype)
        acc = np.empty((s, Wq), v.dtype)
        for c in range(C):
            _window_sum(wk, b, i0, (c // Cg) * KK, v, b, y, ns, K, s, c, up, acc)
            for ti in range(ns):
                for j in range(Wq):
                    out[b, c, i0 + ti, j] = acc[ti, j]


@njit(**_JIT)
def reassemble_bwd(go, wk, v, K, s, G, gw, gv):
    """go: grad of the output [B, C, H', W'] -> gw (per output row), gv (gathered)."""
    B, C, H, W = v.shape
    Hq, Wq = wk.shape[2], wk.shape[3]
    KK, Cg = K * K, C // G
    for by in prange(B * H):
        b, y = by // H, by % H
        i0 = y * s
        ns = min(s, Hq - i0)
        up = np.zeros(s * (W + K - 1), v.dtype)
        _zero_rows(gw, b, 0, G * KK, i0, ns)
        for g in range(G):
            _window_dot(go, v, b, y, i0, ns, K, s, g * Cg, g * Cg + Cg, up, gw, b, i0, g * KK)
    for by in prange(B * H):
        b, y = by // H, by % H
        u = np.empty(s * (W + K - 1), v.dtype)
        for c in range(C):
            _gather(wk, (c // Cg) * KK, go, b, y, c, K, s, H, u, gv)


# ------------------------------------------------------------------------------------ fused SAPA
@njit(**_INLINE)
def _softmax_rows(lg, cb, ci0, ns, KK, lse, b, i0, normalise):
    """In place over n for rows ci0 .. ci0+ns-1 of lg[cb]: lg <- exp(lg - max) (divided by the sum when
    ``normalise``), lse[b, i0 + ti, j] <- max + log(sum). Max-subtracted: logits of +-1e4 are fine."""
    Wq = lg.shape[3]
    for ti in range(ns):
        for j in range(Wq):
            m = lg[cb, 0, ci0 + ti, j]
            for n in range(1, KK):
                m = max(m, lg[cb, n, ci0 + ti, j])
            tot = lg.dtype.type(0)
            for n in range(KK):
                e = np.exp(lg[cb, n, ci0 + ti, j] - m)
                lg[cb, n, ci0 + ti, j] = e
                tot += e
            lse[b, i0 + ti, j] = m + np.log(tot)
            if normalise:
                inv = 1 / tot
                for n in range(KK):
                    lg[cb, n, ci0 + ti, j] *= inv


# One pass per cell row: the K*K logits of its s output rows in a local buffer (K*K*s*W' floats,
# 25 KB at K=5, W'=128), max-subtracted softmax, then the reassembly channel by channel; only the
# log-sum-exp [B, H', W'] is saved for the backward. Neither the attention map [B, K*K, H', W'] nor
# the unfolded values [B, C, K*K, H, W] ever exist.
@njit(**_JIT)
def sapa_fwd(q, k, v, K, s, out, lse):
    B, d, Hq, Wq = q.shape
    C, H, W = v.shape[1], v.shape[2], v.shape[3]
    KK = K * K
    for by in prange(B * H):
        b, y = by // H, by % H
        i0 = y * s
        ns = min(s, Hq - i0)
        up = np.zeros(s * (W + K - 1), v.dtype)
        lg = np.zeros((1, KK, s, Wq), v.dtype)
        acc = np.empty((s, Wq), v.dtype)
        _window_dot(q, k, b, y, i0, ns, K, s, 0, d, up, lg, 0, 0, 0)
        _softmax_rows(lg, 0, 0, ns, KK, lse, b, i0, True)
        for c in range(C):
            _window_sum(lg, 0, 0, 0, v, b, y, ns, K, s, c, up, acc)
            for ti in range(ns):
                for j in range(Wq):
                    out[b, c, i0 + ti, j] = acc[ti, j]


# Backward in two parallel passes. Pass 1 (per cell row) recomputes the logits into p_ws and turns
# them into p = exp(logit - lse); dp_n = <go, v_n> goes to dl_ws and becomes
# dlogit_n = p_n (dp_n - sum_m p_m dp_m); dq = sum_n dlogit_n k_n. The two workspaces are
# [B, K*K, H', W'] (C/K*K = 10x smaller than the output at C=256, K=5). Pass 2 (per low-res row)
# gathers dv = sum p * go and dk = sum dlogit * q.
@njit(**_JIT)
def sapa_bwd(go, q, k, v, lse, K, s, gq, gk, gv, p_ws, dl_ws):
    B, d, Hq, Wq = q.shape
    C, H, W = v.shape[1], v.shape[2], v.shape[3]
    KK = K * K
    for by in prange(B * H):
        b, y = by // H, by % H
        i0 = y * s
        ns = min(s, Hq - i0)
        up = np.zeros(s * (W + K - 1), v.dtype)
        acc = np.empty((s, Wq), v.dtype)
        _zero_rows(p_ws, b, 0, KK, i0, ns)
        _zero_rows(dl_ws, b, 0, KK, i0, ns)
        _window_dot(q, k, b, y, i0, ns, K, s, 0, d, up, p_ws, b, i0, 0)
        _window_dot(go, v, b, y, i0, ns, K, s, 0, C, up, dl_ws, b, i0, 0)
        for ti in range(ns):
            i = i0 + ti
            for j in range(Wq):
                L = lse[b, i, j]
                delta = v.dtype.type(0)
                for n in range(KK):
                    p = np.exp(p_ws[b, n, i, j] - L)
                    p_ws[b, n, i, j] = p
                    delta += p * dl_ws[b, n, i, j]
                for n in range(KK):
                    dl_ws[b, n, i, j] = p_ws[b, n, i, j] * (dl_ws[b, n, i, j] - delta)
        for c in range(d):
            _window_sum(dl_ws, b, i0, 0, k, b, y, ns, K, s, c, up, acc)
            for ti in range(ns):
                for j in range(Wq):
                    gq[b, c, i0 + ti, j] = acc[ti, j]
    for by in prange(B * H):
        b, y = by // H, by % H
        u = np.empty(s * (W + K - 1), v.dtype)
        for c in range(C):
            _gather(p_ws, 0, go, b, y, c, K, s, H, u, gv)
        for c in range(d):
            _gather(dl_ws, 0, q, b, y, c, K, s, H, u, gk)
