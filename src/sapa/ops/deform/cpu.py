"""Numba CPU kernels of the deformable SAPA-D ops (SPEC §2.4): similarity, reassembly and the fused
op; forward and backward (to q, k, v and the offsets). Wrapped as custom ops in ``op.py``.

Layouts. High-res tensors keep the caller's NCHW layout (no whole-tensor copies of the big ones):

    q  [B, G*d, H', W']    off [B, 2*G*P, H', W']    out [B, C, H', W']
    wp [B, G, P, H', W']   (logits / kernels)        lse [B, G, H', W']

Low-res tensors are read at data-dependent positions, one channel vector per bilinear corner, so
they are channels-last: ``k_cl [B, H, W, G*d]``, ``v_cl [B, H, W, C]`` (``to_nhwc`` below; 12 MB
at the benchmark shape). Each parallel iteration handles one output row and transposes the row's
slices of q / off / out / grads through small local buffers ``[W', channels]``.

Sampling (as grid_sample(bilinear, zeros, align_corners=False) in reference.py): point p of group g
at output pixel (i, j) sits at (py, px) = (i // s + off[2(gP+p)+1], j // s + off[2(gP+p)]) in
low-res pixels (integer = pixel centre). Corners (y0 + a, x0 + c), a, c in {0, 1}, y0 = floor(py),
weights (1-ty or ty)(1-tx or tx); corners outside the map are zero; a point outside (-1, H) x (-1, W)
samples 0 and keeps its logit 0 in the softmax.

Backward: gradients to q and to the offsets are per output pixel. Gradients to k and v land at
data-dependent positions, so they are scattered, race-free, into per-band buffers: the output rows
are split into ``nb`` bands (one per thread); ``band_rows`` finds the low-res rows each band can
touch (its own rows plus the offsets' reach), op.py allocates one channels-last buffer per band for
just those rows, and ``band_reduce`` sums the bands into the NCHW dk / dv. Memory ~|k| + |v| plus
halos (not threads x |k|); deterministic for a given thread count.
"""
from __future__ import annotations

import numpy as np
from numba import njit

# fastmath without 'nnan'/'ninf': reassociation (vectorised reductions) is what buys speed; the
# outside-the-map test must stay exact for NaN/inf offsets, or a NaN coordinate becomes an index.
_FAST = {"reassoc", "contract", "arcp", "nsz", "afn"}
_JIT = dict(nogil=True, fastmath=_FAST, cache=True)
_INLINE = dict(fastmath=_FAST, cache=True)
# spare channels in the channels-last row buffers: a 1 KB row stride (C = 256 floats) maps the
# strided transposes onto 4 of L1's 64 sets (see window/cpu.py, where padding halved that cost)
_PAD = 16


@njit(**_INLINE)
def _load_row(x, b, i, buf):
    """buf[j, c] = x[b, c, i, j] (NCHW row -> channels-last local buffer)."""
    for c in range(x.shape[1]):
        row = x[b, c, i]
        for j in range(x.shape[3]):
            buf[j, c] = row[j]


@njit(**_INLINE)
def _store_row(buf, x, b, i):
    """x[b, c, i, j] = buf[j, c]."""
    for c in range(x.shape[1]):
        row = x[b, c, i]
        for j in range(x.shape[3]):
            row[j] = buf[j, c]


@njit(**_INLINE)
def _point(orow, j, g, p, P, yb, xb, H, W, iy, ix, wt):
    """Bilinear corners of point (g, p) at output column j (offsets of the row in orow[j, :]; low-res
    cell (yb, xb)) into iy/ix/wt[0:4]; corner a*2 + c is (y0 + a, x0 + c); iy = -1 marks an outside
    corner (weight 0). Returns (ty, tx), the fractional parts (0 for an outside point).
    Written out corner by corner: the loop form cost ~2x more per point."""
    one = orow.dtype.type(1)
    zero = orow.dtype.type(0)
    px = orow.dtype.type(xb) + orow[j, 2 * (g * P + p)]
    py = orow.dtype.type(yb) + orow[j, 2 * (g * P + p) + 1]
    if not (py > -1 and py < H and px > -1 and px < W):  # also True for NaN
        iy[0] = iy[1] = iy[2] = iy[3] = -1
        ix[0] = ix[1] = ix[2] = ix[3] = 0
        wt[0] = wt[1] = wt[2] = wt[3] = zero
        return zero, zero
    fy = np.floor(py)
    fx = np.floor(px)
    ty = py - fy
    tx = px - fx
    y0 = int(fy)
    x0 = int(fx)
    top, bottom = y0 >= 0, y0 + 1 < H  # py > -1 so y0 >= -1; py < H so y0 <= H - 1
    left, right = x0 >= 0, x0 + 1 < W
    ix[0] = ix[2] = x0
    ix[1] = ix[3] = x0 + 1
    iy[0] = y0 if top and left else -1
    iy[1] = y0 if top and right else -1
    iy[2] = y0 + 1 if bottom and left else -1
    iy[3] = y0 + 1 if bottom and right else -1
    wt[0] = (one - ty) * (one - tx) if iy[0] >= 0 else zero
    wt[1] = (one - ty) * tx if iy[1] >= 0 else zero
    wt[2] = ty * (one - tx) if iy[2] >= 0 else zero
    wt[3] = ty * tx if iy[3] >= 0 else zero
    return ty, tx


# 4-corner helpers on flat arrays with unsigned offsets: numba tests every signed index for
# wraparound, which kept these loops scalar, and slicing a view per corner (4 per point, 36 points
# per pixel) cost 90 of the 120 ms of the reassembly forward; with uint64 offsets the loops
# vectorise and no view is made. An outside corner points at a zero tail (reads) or a scratch tail
# (writes) of the flat array, with weight 0.
_U = np.uint64


@njit(**_INLINE)
def _offsets(iy, ix, rowbase, W, Cl, c0, tail, o):
    """o[m] = flat offset of channel c0 of corner m in a [rows, W, Cl] array whose row index of
    low-res row y is rowbase + y; ``tail`` for an outside corner."""
    o[0] = _U(((rowbase + iy[0]) * W + ix[0]) * Cl + c0) if iy[0] >= 0 else _U(tail)
    o[1] = _U(((rowbase + iy[1]) * W + ix[1]) * Cl + c0) if iy[1] >= 0 else _U(tail)
    o[2] = _U(((rowbase + iy[2]) * W + ix[2]) * Cl + c0) if iy[2] >= 0 else _U(tail)
    o[3] = _U(((rowbase + iy[3]) * W + ix[3]) * Cl + c0) if iy[3] >= 0 else _U(tail)


@njit(**_INLINE)
def _dots4(a, ao, lo, o, n, f):
    """f[m] = sum_c a[ao + c] * lo[o[m] + c], c < n (one pass over a)."""
    z = a.dtype.type(0)
    t0 = t1 = t2 = t3 = z
    o0, o1, o2, o3 = o[0], o[1], o[2], o[3]
    for c in range(n):
        e = a[ao + c]
        t0 += e * lo[o0 + c]
        t1 += e * lo[o1 + c]
        t2 += e * lo[o2 + c]
        t3 += e * lo[o3 + c]
    f[0], f[1], f[2], f[3] = t0, t1, t2, t3


@njit(**_INLINE)
def _axpy4(dst, do, w, lo, o, n):
    """dst[do + c] += sum_m w[m] * lo[o[m] + c]."""
    w0, w1, w2, w3 = w[0], w[1], w[2], w[3]
    o0, o1, o2, o3 = o[0], o[1], o[2], o[3]
    for c in range(n):
        dst[do + c] += w0 * lo[o0 + c] + w1 * lo[o1 + c] + w2 * lo[o2 + c] + w3 * lo[o3 + c]


@njit(**_INLINE)
def _scatter4(a, ao, scale, w, buf, o, n):
    """buf[o[m] + c] += scale * w[m] * a[ao + c] for the 4 corners."""
    w0, w1, w2, w3 = scale * w[0], scale * w[1], scale * w[2], scale * w[3]
    o0, o1, o2, o3 = o[0], o[1], o[2], o[3]
    for c in range(n):
        e = a[ao + c]
        buf[o0 + c] += w0 * e
        buf[o1 + c] += w1 * e
        buf[o2 + c] += w2 * e
        buf[o3 + c] += w3 * e


@njit(**_INLINE)
def _dxy(f, ty, tx):
    """(d/dpx, d/dpy) of the bilinear blend of corner values f[0:4] (outside corners are 0)."""
    one = f.dtype.type(1)
    dx = (one - ty) * (f[1] - f[0]) + ty * (f[3] - f[2])
    dy = (one - tx) * (f[2] - f[0]) + tx * (f[3] - f[1])
    return dx, dy


@njit(nogil=True, cache=True)
def to_cl(t, nb, x, Cl, out):
    """Flat channels-last copy: out[((b*H + y)*W + xx)*Cl + c] = x[b, c, y, xx] (channel stride Cl =
    C + _PAD; op.py zeroes the tail of Cl entries that outside corners read)."""
    B, C, H, W = x.shape
    for by in range(t * (B * H) // nb, (t + 1) * (B * H) // nb):
        b, y = by // H, by % H
        for c in range(C):
            row = x[b, c, y]
            for xx in range(W):
                out[(by * W + xx) * Cl + c] = row[xx]


# ------------------------------------------------------------------------------------ similarity
@njit(**_JIT)
def similarity_fwd(t, nb, q, kf, H, W, off, P, G, s, out):
    B, Cq, Hq, Wq = q.shape
    d, Cl, Ql = Cq // G, Cq + _PAD, Cq + _PAD
    qr = np.empty(Wq * Ql, q.dtype)
    orow = np.empty((Wq, off.shape[1]), q.dtype)
    iy = np.empty(4, np.int64)
    ix = np.empty(4, np.int64)
    wt = np.empty(4, q.dtype)
    o = np.empty(4, np.uint64)
    f = np.empty(4, q.dtype)
    for bi in range(t * (B * Hq) // nb, (t + 1) * (B * Hq) // nb):
        b, i = bi // Hq, bi % Hq
        _load_row(q, b, i, qr.reshape((Wq, Ql)))
        _load_row(off, b, i, orow)
        for j in range(Wq):
            for g in range(G):
                for p in range(P):
                    _point(orow, j, g, p, P, i // s, j // s, H, W, iy, ix, wt)
                    _offsets(iy, ix, b * H, W, Cl, g * d, kf.size - Cl, o)
                    _dots4(qr, _U(j * Ql + g * d), kf, o, _U(d), f)
                    out[b, g, p, i, j] = wt[0] * f[0] + wt[1] * f[1] + wt[2] * f[2] + wt[3] * f[3]


@njit(**_JIT)
def similarity_bwd(t, nb, gl, q, kf, H, W, off, P, G, s, band_lo, band_base, gq, goff, gkb):
    """gl: grad of the logits [B, G, P, H', W'] -> gq, goff (per pixel), gkb (band buffers)."""
    B, Cq, Hq, Wq = q.shape
    d, Cl, Ql = Cq // G, Cq + _PAD, Cq + _PAD
    qr = np.empty(Wq * Ql, q.dtype)
    gqr = np.empty(Wq * Ql, q.dtype)
    orow = np.empty((Wq, off.shape[1]), q.dtype)
    gor = np.empty((Wq, off.shape[1]), q.dtype)
    iy = np.empty(4, np.int64)
    ix = np.empty(4, np.int64)
    wt = np.empty(4, q.dtype)
    o = np.empty(4, np.uint64)
    ob = np.empty(4, np.uint64)
    f = np.empty(4, q.dtype)
    one = q.dtype.type(1)
    base = band_base[t] - band_lo[t]
    for bi in range(t * (B * Hq) // nb, (t + 1) * (B * Hq) // nb):
        b, i = bi // Hq, bi % Hq
        _load_row(q, b, i, qr.reshape((Wq, Ql)))
        _load_row(off, b, i, orow)
        gqr[:] = 0
        for j in range(Wq):
            for g in range(G):
                qo = _U(j * Ql + g * d)
                for p in range(P):
                    ty, tx = _point(orow, j, g, p, P, i // s, j // s, H, W, iy, ix, wt)
                    a = gl[b, g, p, i, j]
                    _offsets(iy, ix, b * H, W, Cl, g * d, kf.size - Cl, o)
                    _dots4(qr, qo, kf, o, _U(d), f)
                    for m in range(4):
                        wt[m] *= a
                    _axpy4(gqr, qo, wt, kf, o, _U(d))
                    _offsets(iy, ix, base + b * H, W, Cl, g * d, gkb.size - Cl, ob)
                    _scatter4(qr, qo, one, wt, gkb, ob, _U(d))
                    dx, dy = _dxy(f, ty, tx)
                    gor[j, 2 * (g * P + p)] = a * dx
                    gor[j, 2 * (g * P + p) + 1] = a * dy
        _store_row(gqr.reshape((Wq, Ql)), gq, b, i)
        _store_row(gor, goff, b, i)


# ------------------------------------------------------------------------------------ reassembly
@njit(**_JIT)
def reassemble_fwd(t, nb, wp, vf, H, W, off, P, G, s, out):
    B, C, Hq, Wq = out.shape
    Cg, Cl = C // G, C + _PAD
    orow = np.empty((Wq, off.shape[1]), vf.dtype)
    acc = np.empty(Wq * Cl, vf.dtype)
    iy = np.empty(4, np.int64)
    ix = np.empty(4, np.int64)
    wt = np.empty(4, vf.dtype)
    o = np.empty(4, np.uint64)
    for bi in range(t * (B * Hq) // nb, (t + 1) * (B * Hq) // nb):
        b, i = bi // Hq, bi % Hq
        _load_row(off, b, i, orow)
        acc[:] = 0
        for j in range(Wq):
            for g in range(G):
                for p in range(P):
                    _point(orow, j, g, p, P, i // s, j // s, H, W, iy, ix, wt)
                    a = wp[b, g, p, i, j]
                    for m in range(4):
                        wt[m] *= a
                    _offsets(iy, ix, b * H, W, Cl, g * Cg, vf.size - Cl, o)
                    _axpy4(acc, _U(j * Cl + g * Cg), wt, vf, o, _U(Cg))
        _store_row(acc.reshape((Wq, Cl)), out, b, i)


@njit(**_JIT)
def reassemble_bwd(t, nb, go, wp, vf, H, W, off, P, G, s, band_lo, band_base, gw, goff, gvb):
    """go: grad of the output [B, C, H', W'] -> gw, goff (per pixel), gvb (band buffers)."""
    B, C, Hq, Wq = go.shape
    Cg, Cl = C // G, C + _PAD
    gr = np.empty(Wq * Cl, vf.dtype)
    orow = np.empty((Wq, off.shape[1]), vf.dtype)
    gor = np.empty((Wq, off.shape[1]), vf.dtype)
    iy = np.empty(4, np.int64)
    ix = np.empty(4, np.int64)
    wt = np.empty(4, vf.dtype)
    o = np.empty(4, np.uint64)
    ob = np.empty(4, np.uint64)
    f = np.empty(4, vf.dtype)
    base = band_base[t] - band_lo[t]
    for bi in range(t * (B * Hq) // nb, (t + 1) * (B * Hq) // nb):
        b, i = bi // Hq, bi % Hq
        _load_row(go, b, i, gr.reshape((Wq, Cl)))
        _load_row(off, b, i, orow)
        for j in range(Wq):
            for g in range(G):
                go_ = _U(j * Cl + g * Cg)
                for p in range(P):
                    ty, tx = _point(orow, j, g, p, P, i // s, j // s, H, W, iy, ix, wt)
                    a = wp[b, g, p, i, j]
                    _offsets(iy, ix, b * H, W, Cl, g * Cg, vf.size - Cl, o)
                    _dots4(gr, go_, vf, o, _U(Cg), f)
                    gw[b, g, p, i, j] = wt[0] * f[0] + wt[1] * f[1] + wt[2] * f[2] + wt[3] * f[3]
                    _offsets(iy, ix, base + b * H, W, Cl, g * Cg, gvb.size - Cl, ob)
                    _scatter4(gr, go_, a, wt, gvb, ob, _U(Cg))
                    dx, dy = _dxy(f, ty, tx)
                    gor[j, 2 * (g * P + p)] = a * dx
                    gor[j, 2 * (g * P + p) + 1] = a * dy
        _store_row(gor, goff, b, i)


# ------------------------------------------------------------------------------------ fused SAPA-D
# Per output pixel and group: P logits from the 4 bilinear corners of each point, max-subtracted
# softmax over P, weighted sum of the sampled values; saves only lse [B, G, H', W'].
@njit(**_JIT)
def sapa_fwd(t, nb, q, kf, vf, H, W, off, P, G, s, out, lse):
    B, Cq, Hq, Wq = q.shape
    C = out.shape[1]
    d, Cg, Ql, Clk, Clv = Cq // G, C // G, Cq + _PAD, Cq + _PAD, C + _PAD
    qr = np.empty(Wq * Ql, q.dtype)
    orow = np.empty((Wq, off.shape[1]), q.dtype)
    acc = np.empty(Wq * Clv, q.dtype)
    iy = np.empty((P, 4), np.int64)
    ix = np.empty((P, 4), np.int64)
    wt = np.empty((P, 4), q.dtype)
    o = np.empty(4, np.uint64)
    f = np.empty(4, q.dtype)
    e = np.empty(P, q.dtype)
    for bi in range(t * (B * Hq) // nb, (t + 1) * (B * Hq) // nb):
        b, i = bi // Hq, bi % Hq
        _load_row(q, b, i, qr.reshape((Wq, Ql)))
        _load_row(off, b, i, orow)
        acc[:] = 0
        for j in range(Wq):
            for g in range(G):
                qo = _U(j * Ql + g * d)
                for p in range(P):
                    _point(orow, j, g, p, P, i // s, j // s, H, W, iy[p], ix[p], wt[p])
                    _offsets(iy[p], ix[p], b * H, W, Clk, g * d, kf.size - Clk, o)
                    _dots4(qr, qo, kf, o, _U(d), f)
                    e[p] = wt[p, 0] * f[0] + wt[p, 1] * f[1] + wt[p, 2] * f[2] + wt[p, 3] * f[3]
                m = e[0]
                for p in range(1, P):
                    m = max(m, e[p])
                tot = q.dtype.type(0)
                for p in range(P):
                    e[p] = np.exp(e[p] - m)
                    tot += e[p]
                lse[b, g, i, j] = m + np.log(tot)
                inv = 1 / tot
                ao = _U(j * Clv + g * Cg)
                for p in range(P):
                    a = e[p] * inv
                    for c4 in range(4):
                        wt[p, c4] *= a
                    _offsets(iy[p], ix[p], b * H, W, Clv, g * Cg, vf.size - Clv, o)
                    _axpy4(acc, ao, wt[p], vf, o, _U(Cg))
        _store_row(acc.reshape((Wq, Clv)), out, b, i)


# Backward recomputes the logits from lse: prob_p = exp(logit_p - lse), dp_p = <go, sampled v_p>,
# dlogit_p = prob_p (dp_p - sum prob dp); per-corner dot products give the offset gradients
# (value part weighted by prob_p, key part by dlogit_p).
@njit(**_JIT)
def sapa_bwd(t, nb, go, q, kf, vf, H, W, off, lse, P, G, s, band_lo, band_base, gq, goff, gkb, gvb):
    B, Cq, Hq, Wq = q.shape
    C = go.shape[1]
    d, Cg, Ql, Clk, Clv = Cq // G, C // G, Cq + _PAD, Cq + _PAD, C + _PAD
    qr = np.empty(Wq * Ql, q.dtype)
    gqr = np.empty(Wq * Ql, q.dtype)
    gr = np.empty(Wq * Clv, q.dtype)
    orow = np.empty((Wq, off.shape[1]), q.dtype)
    gor = np.empty((Wq, off.shape[1]), q.dtype)
    iy = np.empty((P, 4), np.int64)
    ix = np.empty((P, 4), np.int64)
    wt = np.empty((P, 4), q.dtype)
    fk = np.empty((P, 4), q.dtype)
    fv = np.empty((P, 4), q.dtype)
    ok = np.empty((P, 4), np.uint64)
    ov = np.empty((P, 4), np.uint64)
    ob = np.empty(4, np.uint64)
    ty = np.empty(P, q.dtype)
    tx = np.empty(P, q.dtype)
    prob = np.empty(P, q.dtype)
    dp = np.empty(P, q.dtype)
    wk = np.empty(4, q.dtype)
    one = q.dtype.type(1)
    base = band_base[t] - band_lo[t]
    for bi in range(t * (B * Hq) // nb, (t + 1) * (B * Hq) // nb):
        b, i = bi // Hq, bi % Hq
        _load_row(q, b, i, qr.reshape((Wq, Ql)))
        _load_row(go, b, i, gr.reshape((Wq, Clv)))
        _load_row(off, b, i, orow)
        gqr[:] = 0
        for j in range(Wq):
            for g in range(G):
                qo = _U(j * Ql + g * d)
                go_ = _U(j * Clv + g * Cg)
                L = lse[b, g, i, j]
                delta = q.dtype.type(0)
                tot = q.dtype.type(0)
                for p in range(P):
                    ty[p], tx[p] = _point(orow, j, g, p, P, i // s, j // s, H, W, iy[p], ix[p], wt[p])
                    _offsets(iy[p], ix[p], b * H, W, Clk, g * d, kf.size - Clk, ok[p])
                    _dots4(qr, qo, kf, ok[p], _U(d), fk[p])
                    _offsets(iy[p], ix[p], b * H, W, Clv, g * Cg, vf.size - Clv, ov[p])
                    _dots4(gr, go_, vf, ov[p], _U(Cg), fv[p])
                    lg = wt[p, 0] * fk[p, 0] + wt[p, 1] * fk[p, 1] + wt[p, 2] * fk[p, 2] + wt[p, 3] * fk[p, 3]
                    dp[p] = wt[p, 0] * fv[p, 0] + wt[p, 1] * fv[p, 1] + wt[p, 2] * fv[p, 2] + wt[p, 3] * fv[p, 3]
                    prob[p] = np.exp(lg - L)
                    tot += prob[p]
                # renormalised: lse is rounded at the logits' magnitude (see window/cpu.py _probs)
                inv = 1 / tot
                for p in range(P):
                    prob[p] *= inv
                    delta += prob[p] * dp[p]
                for p in range(P):
                    dl = prob[p] * (dp[p] - delta)
                    for m in range(4):
                        wk[m] = dl * wt[p, m]
                    _axpy4(gqr, qo, wk, kf, ok[p], _U(d))
                    _offsets(iy[p], ix[p], base + b * H, W, Clk, g * d, gkb.size - Clk, ob)
                    _scatter4(qr, qo, one, wk, gkb, ob, _U(d))
                    _offsets(iy[p], ix[p], base + b * H, W, Clv, g * Cg, gvb.size - Clv, ob)
                    _scatter4(gr, go_, prob[p], wt[p], gvb, ob, _U(Cg))
                    kx, ky = _dxy(fk[p], ty[p], tx[p])
                    vx, vy = _dxy(fv[p], ty[p], tx[p])
                    gor[j, 2 * (g * P + p)] = dl * kx + prob[p] * vx
                    gor[j, 2 * (g * P + p) + 1] = dl * ky + prob[p] * vy
        _store_row(gqr.reshape((Wq, Ql)), gq, b, i)
        _store_row(gor, goff, b, i)


# ------------------------------------------------------------------------------------ band helpers
@njit(nogil=True, cache=True)
def band_rows(t, nb, off, P, G, s, H, lo, hi):
    """lo[t], hi[t]: first and last flattened low-res row (b*H + y) that band t's points can touch
    (hi < lo when none). Bands split the B*H' output rows evenly. No fastmath: NaN offsets must fail
    the inside test here exactly as in the kernels."""
    B, Hq, Wq = off.shape[0], off.shape[2], off.shape[3]
    R = B * Hq
    mn = 1 << 62
    mx = -1
    for bi in range(t * R // nb, (t + 1) * R // nb):
        b, i = bi // Hq, bi % Hq
        yb = off.dtype.type(i // s)
        for gp in range(G * P):
            orow = off[b, 2 * gp + 1, i]
            for j in range(Wq):
                py = yb + orow[j]
                if py > -1 and py < H:
                    y0 = int(np.floor(py))
                    mn = min(mn, b * H + max(y0, 0))
                    mx = max(mx, b * H + min(y0 + 1, H - 1))
    lo[t] = mn
    hi[t] = mx


@njit(nogil=True, cache=True)
def band_reduce(t, nb, buf, lo, hi, base, out):
    """out[b, c, y, x] = sum over bands u with lo[u] <= b*H + y <= hi[u] of
    buf[((base[u] + b*H + y - lo[u])*W + x)*Cl + c] (flat channels-last band buffers, channel stride
    Cl = C + _PAD -> NCHW gradient)."""
    B, C, H, W = out.shape
    Cl = C + _PAD
    acc = np.empty((W, Cl), out.dtype)
    for r in range(t * (B * H) // nb, (t + 1) * (B * H) // nb):
        b, y = r // H, r % H
        acc[:, :] = 0
        for u in range(lo.shape[0]):
            if lo[u] <= r and r <= hi[u]:
                o = (base[u] + r - lo[u]) * W * Cl
                for x in range(W):
                    for c in range(C):
                        acc[x, c] += buf[o + x * Cl + c]
        _store_row(acc, out, b, y)
