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
from numba import njit, prange

# fastmath without 'nnan'/'ninf': reassociation (vectorised reductions) is what buys speed; the
# outside-the-map test must stay exact for NaN/inf offsets, or a NaN coordinate becomes an index.
_FAST = {"reassoc", "contract", "arcp", "nsz", "afn"}
_JIT = dict(parallel=True, fastmath=_FAST, cache=True)
_INLINE = dict(fastmath=_FAST, cache=True, inline="always")


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
    corner. Returns (ty, tx), the fractional parts (0 for an outside point)."""
    one = orow.dtype.type(1)
    px = orow.dtype.type(xb) + orow[j, 2 * (g * P + p)]
    py = orow.dtype.type(yb) + orow[j, 2 * (g * P + p) + 1]
    for c4 in range(4):
        iy[c4] = -1
        ix[c4] = 0
        wt[c4] = 0
    ty = orow.dtype.type(0)
    tx = orow.dtype.type(0)
    if py > -1 and py < H and px > -1 and px < W:  # also False for NaN
        fy = np.floor(py)
        fx = np.floor(px)
        ty = py - fy
        tx = px - fx
        y0 = int(fy)
        x0 = int(fx)
        for c4 in range(4):
            yc = y0 + c4 // 2
            xc = x0 + c4 % 2
            if yc >= 0 and yc < H and xc >= 0 and xc < W:
                iy[c4] = yc
                ix[c4] = xc
                wt[c4] = (ty if c4 // 2 else one - ty) * (tx if c4 % 2 else one - tx)
    return ty, tx


@njit(**_INLINE)
def _dot(a, lo, b, y, x, c0, n):
    """<a[c0:c0+n], lo[b, y, x, c0:c0+n]> for a 1-D a."""
    t = a.dtype.type(0)
    row = lo[b, y, x]
    for c in range(c0, c0 + n):
        t += a[c] * row[c]
    return t


@njit(**_INLINE)
def _dxy(f, ty, tx):
    """(d/dpx, d/dpy) of the bilinear blend of corner values f[0:4] (outside corners are 0)."""
    one = f.dtype.type(1)
    dx = (one - ty) * (f[1] - f[0]) + ty * (f[3] - f[2])
    dy = (one - tx) * (f[2] - f[0]) + tx * (f[3] - f[1])
    return dx, dy


@njit(parallel=True, cache=True)
def to_nhwc(x, out):
    """out[b, y, x, c] = x[b, c, y, x]."""
    B, C, H, W = x.shape
    for by in prange(B * H):
        b, y = by // H, by % H
        for c in range(C):
            row = x[b, c, y]
            for xx in range(W):
                out[b, y, xx, c] = row[xx]


# ------------------------------------------------------------------------------------ similarity
@njit(**_JIT)
def similarity_fwd(q, k_cl, off, P, G, s, out):
    B, Cq, Hq, Wq = q.shape
    H, W = k_cl.shape[1], k_cl.shape[2]
    d = Cq // G
    for bi in prange(B * Hq):
        b, i = bi // Hq, bi % Hq
        qr = np.empty((Wq, Cq), q.dtype)
        orow = np.empty((Wq, off.shape[1]), q.dtype)
        _load_row(q, b, i, qr)
        _load_row(off, b, i, orow)
        iy = np.empty(4, np.int64)
        ix = np.empty(4, np.int64)
        wt = np.empty(4, q.dtype)
        for j in range(Wq):
            for g in range(G):
                for p in range(P):
                    _point(orow, j, g, p, P, i // s, j // s, H, W, iy, ix, wt)
                    t = q.dtype.type(0)
                    for c4 in range(4):
                        if iy[c4] >= 0:
                            t += wt[c4] * _dot(qr[j], k_cl, b, iy[c4], ix[c4], g * d, d)
                    out[b, g, p, i, j] = t


@njit(**_JIT)
def similarity_bwd(gl, q, k_cl, off, P, G, s, band_lo, band_base, gq, goff, gk_buf):
    """gl: grad of the logits [B, G, P, H', W'] -> gq, goff (per pixel), gk_buf (per band)."""
    B, Cq, Hq, Wq = q.shape
    H, W = k_cl.shape[1], k_cl.shape[2]
    d = Cq // G
    nb = band_lo.shape[0]
    R = B * Hq
    for t in prange(nb):
        qr = np.empty((Wq, Cq), q.dtype)
        gqr = np.empty((Wq, Cq), q.dtype)
        orow = np.empty((Wq, off.shape[1]), q.dtype)
        gor = np.empty((Wq, off.shape[1]), q.dtype)
        iy = np.empty(4, np.int64)
        ix = np.empty(4, np.int64)
        wt = np.empty(4, q.dtype)
        f = np.empty(4, q.dtype)
        for bi in range(t * R // nb, (t + 1) * R // nb):
            b, i = bi // Hq, bi % Hq
            _load_row(q, b, i, qr)
            _load_row(off, b, i, orow)
            gqr[:] = 0
            for j in range(Wq):
                for g in range(G):
                    for p in range(P):
                        ty, tx = _point(orow, j, g, p, P, i // s, j // s, H, W, iy, ix, wt)
                        a = gl[b, g, p, i, j]
                        for c4 in range(4):
                            f[c4] = 0
                            if iy[c4] >= 0:
                                f[c4] = _dot(qr[j], k_cl, b, iy[c4], ix[c4], g * d, d)
                                aw = a * wt[c4]
                                krow = k_cl[b, iy[c4], ix[c4]]
                                brow = gk_buf[band_base[t] + b * H + iy[c4] - band_lo[t], ix[c4]]
                                for c in range(g * d, g * d + d):
                                    gqr[j, c] += aw * krow[c]
                                    brow[c] += aw * qr[j, c]
                        dx, dy = _dxy(f, ty, tx)
                        gor[j, 2 * (g * P + p)] = a * dx
                        gor[j, 2 * (g * P + p) + 1] = a * dy
            _store_row(gqr, gq, b, i)
            _store_row(gor, goff, b, i)


# ------------------------------------------------------------------------------------ reassembly
@njit(**_JIT)
def reassemble_fwd(wp, v_cl, off, P, G, s, out):
    B, Hq, Wq = wp.shape[0], wp.shape[3], wp.shape[4]
    H, W, C = v_cl.shape[1], v_cl.shape[2], v_cl.shape[3]
    Cg = C // G
    for bi in prange(B * Hq):
        b, i = bi // Hq, bi % Hq
        orow = np.empty((Wq, off.shape[1]), v_cl.dtype)
        acc = np.zeros((Wq, C), v_cl.dtype)
        _load_row(off, b, i, orow)
        iy = np.empty(4, np.int64)
        ix = np.empty(4, np.int64)
        wt = np.empty(4, v_cl.dtype)
        for j in range(Wq):
            arow = acc[j]
            for g in range(G):
                for p in range(P):
                    _point(orow, j, g, p, P, i // s, j // s, H, W, iy, ix, wt)
                    for c4 in range(4):
                        if iy[c4] >= 0:
                            aw = wp[b, g, p, i, j] * wt[c4]
                            vrow = v_cl[b, iy[c4], ix[c4]]
                            for c in range(g * Cg, g * Cg + Cg):
                                arow[c] += aw * vrow[c]
        _store_row(acc, out, b, i)


@njit(**_JIT)
def reassemble_bwd(go, wp, v_cl, off, P, G, s, band_lo, band_base, gw, goff, gv_buf):
    """go: grad of the output [B, C, H', W'] -> gw, goff (per pixel), gv_buf (per band)."""
    B, Hq, Wq = wp.shape[0], wp.shape[3], wp.shape[4]
    H, W, C = v_cl.shape[1], v_cl.shape[2], v_cl.shape[3]
    Cg = C // G
    nb = band_lo.shape[0]
    R = B * Hq
    for t in prange(nb):
        gr = np.empty((Wq, C), v_cl.dtype)
        orow = np.empty((Wq, off.shape[1]), v_cl.dtype)
        gor = np.empty((Wq, off.shape[1]), v_cl.dtype)
        iy = np.empty(4, np.int64)
        ix = np.empty(4, np.int64)
        wt = np.empty(4, v_cl.dtype)
        f = np.empty(4, v_cl.dtype)
        for bi in range(t * R // nb, (t + 1) * R // nb):
            b, i = bi // Hq, bi % Hq
            _load_row(go, b, i, gr)
            _load_row(off, b, i, orow)
            for j in range(Wq):
                for g in range(G):
                    for p in range(P):
                        ty, tx = _point(orow, j, g, p, P, i // s, j // s, H, W, iy, ix, wt)
                        a = wp[b, g, p, i, j]
                        dp = v_cl.dtype.type(0)
                        for c4 in range(4):
                            f[c4] = 0
                            if iy[c4] >= 0:
                                f[c4] = _dot(gr[j], v_cl, b, iy[c4], ix[c4], g * Cg, Cg)
                                dp += wt[c4] * f[c4]
                                aw = a * wt[c4]
                                brow = gv_buf[band_base[t] + b * H + iy[c4] - band_lo[t], ix[c4]]
                                for c in range(g * Cg, g * Cg + Cg):
                                    brow[c] += aw * gr[j, c]
                        gw[b, g, p, i, j] = dp
                        dx, dy = _dxy(f, ty, tx)
                        gor[j, 2 * (g * P + p)] = a * dx
                        gor[j, 2 * (g * P + p) + 1] = a * dy
            _store_row(gor, goff, b, i)


# ------------------------------------------------------------------------------------ fused SAPA-D
# Per output pixel and group: P logits from the 4 bilinear corners of each point, max-subtracted
# softmax over P, weighted sum of the sampled values; saves only lse [B, G, H', W'].
@njit(**_JIT)
def sapa_fwd(q, k_cl, v_cl, off, P, G, s, out, lse):
    B, Cq, Hq, Wq = q.shape
    H, W, C = v_cl.shape[1], v_cl.shape[2], v_cl.shape[3]
    d, Cg = Cq // G, C // G
    for bi in prange(B * Hq):
        b, i = bi // Hq, bi % Hq
        qr = np.empty((Wq, Cq), q.dtype)
        orow = np.empty((Wq, off.shape[1]), q.dtype)
        acc = np.zeros((Wq, C), q.dtype)
        _load_row(q, b, i, qr)
        _load_row(off, b, i, orow)
        iy = np.empty((P, 4), np.int64)
        ix = np.empty((P, 4), np.int64)
        wt = np.empty((P, 4), q.dtype)
        e = np.empty(P, q.dtype)
        for j in range(Wq):
            arow = acc[j]
            for g in range(G):
                for p in range(P):
                    _point(orow, j, g, p, P, i // s, j // s, H, W, iy[p], ix[p], wt[p])
                    t = q.dtype.type(0)
                    for c4 in range(4):
                        if iy[p, c4] >= 0:
                            t += wt[p, c4] * _dot(qr[j], k_cl, b, iy[p, c4], ix[p, c4], g * d, d)
                    e[p] = t
                m = e[0]
                for p in range(1, P):
                    m = max(m, e[p])
                tot = q.dtype.type(0)
                for p in range(P):
                    e[p] = np.exp(e[p] - m)
                    tot += e[p]
                lse[b, g, i, j] = m + np.log(tot)
                inv = 1 / tot
                for p in range(P):
                    for c4 in range(4):
                        if iy[p, c4] >= 0:
                            aw = e[p] * inv * wt[p, c4]
                            vrow = v_cl[b, iy[p, c4], ix[p, c4]]
                            for c in range(g * Cg, g * Cg + Cg):
                                arow[c] += aw * vrow[c]
        _store_row(acc, out, b, i)


# Backward recomputes the logits from lse: prob_p = exp(logit_p - lse), dp_p = <go, sampled v_p>,
# dlogit_p = prob_p (dp_p - sum prob dp); per-corner dot products give the offset gradients
# (value part weighted by prob_p, key part by dlogit_p).
@njit(**_JIT)
def sapa_bwd(go, q, k_cl, v_cl, off, lse, P, G, s, band_lo, band_base, gq, goff, gk_buf, gv_buf):
    B, Cq, Hq, Wq = q.shape
    H, W, C = v_cl.shape[1], v_cl.shape[2], v_cl.shape[3]
    d, Cg = Cq // G, C // G
    nb = band_lo.shape[0]
    R = B * Hq
    for t in prange(nb):
        qr = np.empty((Wq, Cq), q.dtype)
        gqr = np.empty((Wq, Cq), q.dtype)
        gr = np.empty((Wq, C), q.dtype)
        orow = np.empty((Wq, off.shape[1]), q.dtype)
        gor = np.empty((Wq, off.shape[1]), q.dtype)
        iy = np.empty((P, 4), np.int64)
        ix = np.empty((P, 4), np.int64)
        wt = np.empty((P, 4), q.dtype)
        fk = np.empty((P, 4), q.dtype)
        fv = np.empty((P, 4), q.dtype)
        ty = np.empty(P, q.dtype)
        tx = np.empty(P, q.dtype)
        prob = np.empty(P, q.dtype)
        dp = np.empty(P, q.dtype)
        for bi in range(t * R // nb, (t + 1) * R // nb):
            b, i = bi // Hq, bi % Hq
            _load_row(q, b, i, qr)
            _load_row(go, b, i, gr)
            _load_row(off, b, i, orow)
            gqr[:] = 0
            for j in range(Wq):
                for g in range(G):
                    L = lse[b, g, i, j]
                    delta = q.dtype.type(0)
                    for p in range(P):
                        ty[p], tx[p] = _point(orow, j, g, p, P, i // s, j // s, H, W, iy[p], ix[p], wt[p])
                        lg = q.dtype.type(0)
                        dp[p] = 0
                        for c4 in range(4):
                            fk[p, c4] = 0
                            fv[p, c4] = 0
                            if iy[p, c4] >= 0:
                                fk[p, c4] = _dot(qr[j], k_cl, b, iy[p, c4], ix[p, c4], g * d, d)
                                fv[p, c4] = _dot(gr[j], v_cl, b, iy[p, c4], ix[p, c4], g * Cg, Cg)
                                lg += wt[p, c4] * fk[p, c4]
                                dp[p] += wt[p, c4] * fv[p, c4]
                        prob[p] = np.exp(lg - L)
                        delta += prob[p] * dp[p]
                    for p in range(P):
                        dl = prob[p] * (dp[p] - delta)
                        for c4 in range(4):
                            if iy[p, c4] >= 0:
                                r = band_base[t] + b * H + iy[p, c4] - band_lo[t]
                                ak = dl * wt[p, c4]
                                krow = k_cl[b, iy[p, c4], ix[p, c4]]
                                bk = gk_buf[r, ix[p, c4]]
                                for c in range(g * d, g * d + d):
                                    gqr[j, c] += ak * krow[c]
                                    bk[c] += ak * qr[j, c]
                                av = prob[p] * wt[p, c4]
                                bv = gv_buf[r, ix[p, c4]]
                                for c in range(g * Cg, g * Cg + Cg):
                                    bv[c] += av * gr[j, c]
                        kx, ky = _dxy(fk[p], ty[p], tx[p])
                        vx, vy = _dxy(fv[p], ty[p], tx[p])
                        gor[j, 2 * (g * P + p)] = dl * kx + prob[p] * vx
                        gor[j, 2 * (g * P + p) + 1] = dl * ky + prob[p] * vy
            _store_row(gqr, gq, b, i)
            _store_row(gor, goff, b, i)


# ------------------------------------------------------------------------------------ band helpers
@njit(parallel=True, cache=True)
def band_rows(off, P, G, s, H, nb, lo, hi):
    """lo[t], hi[t]: first and last flattened low-res row (b*H + y) that band t's points can touch
    (hi < lo when none). Bands split the B*H' output rows evenly. No fastmath: NaN offsets must fail
    the inside test here exactly as in the kernels."""
    B, Hq, Wq = off.shape[0], off.shape[2], off.shape[3]
    R = B * Hq
    for t in prange(nb):
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


@njit(parallel=True, cache=True)
def band_reduce(buf, lo, hi, base, out):
    """out[b, c, y, x] = sum over bands t with lo[t] <= b*H + y <= hi[t] of
    buf[base[t] + b*H + y - lo[t], x, c] (channels-last band buffers -> NCHW gradient)."""
    B, C, H, W = out.shape
    nb = lo.shape[0]
    for r in prange(B * H):
        b, y = r // H, r % H
        acc = np.zeros((W, C), out.dtype)
        for t in range(nb):
            if lo[t] <= r and r <= hi[t]:
                src = buf[base[t] + r - lo[t]]
                for x in range(W):
                    for c in range(C):
                        acc[x, c] += src[x, c]
        _store_row(acc, out, b, y)
