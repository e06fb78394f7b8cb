"""Numba CPU kernels of the deformable SAPA-D ops (docs/SEMANTICS.md §2.4): similarity, reassembly and the fused
op; forward and backward (to q, k, v and the offsets). Wrapped as custom ops in ``op.py``; every
kernel is a serial ``@njit(nogil=True)`` function of one band ``t`` of ``nb`` bands of rows, run on a
thread pool by ``op.run_bands``.

Layouts. High-res tensors keep the caller's NCHW layout (no whole-tensor copies of the big ones):

    q  [B, G*d, H', W']    off [B, 2*G*P, H', W']    out [B, C, H', W']
    wp [B, G, P, H', W']   (logits / kernels)        sv [B*H'*W'*G*P*3] (fused op: saved per point)

Low-res tensors are read at data-dependent positions, one channel vector per bilinear corner, so
they are copied channels-last into flat arrays (``to_cl``; channel stride C + _PAD, plus a zero
tail that outside corners read). Each band handles whole output rows: the row's bilinear geometry is
computed in one vectorised pass (``_geometry``), the q / go rows are transposed into local
channels-last buffers, outputs are accumulated channels-last and transposed back.

Sampling (as grid_sample(bilinear, zeros, align_corners=False) in reference.py): point p of group g
at output pixel (i, j) sits at (py, px) = (i // s + off[2(gP+p)+1], j // s + off[2(gP+p)]) in
low-res pixels (integer = pixel centre). Corners (y0 + a, x0 + c), a, c in {0, 1}, y0 = floor(py),
weights (1-ty or ty)(1-tx or tx); corners outside the map are zero; a point outside (-1, H) x (-1, W)
samples 0 and keeps its logit 0 in the softmax; a NaN / inf offset gives NaN (logit, and through the
softmax the whole group's output at that pixel), as grid_sample does. At an exactly integer coordinate the
offset gradient is the floor-based one-sided slope, as in the official CUDA kernel.

Backward: gradients to q and to the offsets are per output pixel. Gradients to k and v land at
data-dependent positions, so they are scattered, race-free, into per-band buffers: ``band_rows``
finds the low-res rows each band can touch (its own rows plus the offsets' reach), op.py allocates
one channels-last buffer per band for just those rows, and ``band_reduce`` sums the bands into the
NCHW dk / dv. Memory ~|k| + |v| plus halos (not threads x |k|); deterministic for a given number of
threads (the reduction order depends on the bands).

Measured (B=2, C=256, G=4, P=9, d=32, 64x64 -> 128x128, float32, offsets ~ N(0, 1.5^2), kernels
alone on preallocated outputs): fused forward 43 ms on one thread, 22-26 ms on two; backward 63 /
33-35 ms. The grid_sample reference takes ~320 / ~790 ms forward / forward+backward on two threads.
The channel loops are explicit vector code (section "vector code"): as numba loops, the 32-channel
spans ran in LLVM's 8-lane remainder loop and every span paid run-time overlap checks; the fused
backward went from 76 to 63 ms on one thread with them and with its dot + scatter and dq + dk pairs
fused into one pass each. Tried and measured slower (one thread, see the session notes of issue 5):
visiting shared corners once (54 / 84 ms: the data-dependent mapping costs more than it saves),
tiling rows along the width, 16-column tiled transposes, software prefetch of the next row.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .._common import numba_cache

# fastmath without 'nnan'/'ninf': reassociation (vectorised reductions) is what buys speed; the
# outside-the-map test must stay exact for NaN/inf offsets, or a NaN coordinate becomes an index.
_FAST = {"reassoc", "contract", "arcp", "nsz", "afn"}
# cache=_CACHE: kernels are cached under SAPA_CACHE_DIR (never the install folder), or not at all
# when no folder is writable; see sapa.ops._common.numba_cache
_CACHE = numba_cache()
_JIT = dict(nogil=True, fastmath=_FAST, cache=_CACHE)
# Helpers are inlined at numba-IR level: left to LLVM, the deform kernels' helpers were not inlined,
# and the fused backward ran at 135-145 ms instead of 75 ms on one thread (forward 49 -> 45 ms).
# Cost: the cold compile of the deform tests takes 69 s instead of 54 s (window/cpu.py, where LLVM
# does inline, keeps the default).
_INLINE = dict(fastmath=_FAST, cache=_CACHE, inline="always")
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
def _geometry(off, b, i, s, H, W, xb, pix, wts, tys, txs):
    """Bilinear geometry of every point of output row (b, i), vectorised along the row: for point
    gp = g*P + p and column j, pix[gp, m, j] = y*W + x of corner m = a*2 + c at (y0 + a, x0 + c)
    (-1 outside the map), wts[gp, m, j] its weight (0 outside), tys/txs the fractional parts.
    xb[j] = j // s. Computed per point inside the pixel loop this cost ~40 of the ~130 cycles per
    point of the fused backward; as a row pass it vectorises (floor, compare, select)."""
    Wq = off.shape[3]
    one = off.dtype.type(1)
    zero = off.dtype.type(0)
    inf = off.dtype.type(np.inf)
    nan = off.dtype.type(np.nan)
    yb = off.dtype.type(i // s)
    for gp in range(off.shape[1] // 2):
        xrow, yrow = off[b, 2 * gp, i], off[b, 2 * gp + 1, i]
        p0, p1, p2, p3 = pix[gp, 0], pix[gp, 1], pix[gp, 2], pix[gp, 3]
        w0, w1, w2, w3 = wts[gp, 0], wts[gp, 1], wts[gp, 2], wts[gp, 3]
        tyr, txr = tys[gp], txs[gp]
        for j in range(Wq):
            px = xb[j] + xrow[j]
            py = yb + yrow[j]
            inside = py > -1 and py < H and px > -1 and px < W  # False for NaN / inf
            # NaN / inf offsets give NaN, as grid_sample does in the reference: the point keeps its
            # outside corners (index -1 -> the zero tail) but gets NaN weights and fractions, so
            # its logit, the group's softmax, the output and the gradients all turn NaN with no
            # test in the channel loops. (Ordered compares are exact without 'nnan'/'ninf' in
            # _FAST; an arithmetic test such as px - px != 0 was folded away.)
            bad = not (abs(px) < inf and abs(py) < inf)
            py = py if inside else zero  # keep the int conversion below defined
            px = px if inside else zero
            fy = np.floor(py)
            fx = np.floor(px)
            ty = py - fy
            tx = px - fx
            y0 = np.int64(fy)
            x0 = np.int64(fx)
            top = inside and y0 >= 0
            bottom = inside and y0 + 1 < H
            left = x0 >= 0
            right = x0 + 1 < W
            base = y0 * W + x0
            p0[j] = base if top and left else -1
            p1[j] = base + 1 if top and right else -1
            p2[j] = base + W if bottom and left else -1
            p3[j] = base + W + 1 if bottom and right else -1
            # selects, not a branch, so that the row pass still vectorises (bad implies not inside)
            out0 = zero if not bad else nan  # the value of an outside corner's weight / fraction
            w0[j] = (one - ty) * (one - tx) if top and left else out0
            w1[j] = (one - ty) * tx if top and right else out0
            w2[j] = ty * (one - tx) if bottom and left else out0
            w3[j] = ty * tx if bottom and right else out0
            tyr[j] = ty if inside else out0
            txr[j] = tx if inside else out0


# ------------------------------------------------------------------------------------ vector code
# Channel loops as explicit LLVM vector code (numba ``@intrinsic``s): one 64-byte line per vector
# (16 float32 / 8 float64 lanes; LLVM splits them on narrower machines), loads and stores in program
# order. As numba loops (``for c in range(n): buf[o + c] += w * a[ao + c]``) LLVM could not prove
# that ``buf`` and ``a`` do not overlap, so it guarded each loop with run-time overlap checks, and it
# chose one 64-float vector body per call site, which the 32-channel key spans never entered (they
# ran in the 8-lane remainder loop). Each helper covers ``nvec`` whole vectors; callers finish a
# remainder of ``n % _vlanes`` channels with a plain loop. Callers pass spans that do not overlap
# unless they are the same span. (Kept in this file: numba's cache is keyed on the kernels' source
# file, so helpers in another module could go stale in the cache when only they change.)
_LINE = 64  # bytes per vector


def _vector_type(context, dtype):
    elt = context.get_data_type(dtype)
    return ir.VectorType(elt, _LINE // (dtype.bitwidth // 8)), elt


def _suffix(vt) -> str:
    return f"v{vt.count}f{32 if isinstance(vt.element, ir.FloatType) else 64}"


def _fma(builder, vt):
    fnty = ir.FunctionType(vt, [vt, vt, vt])
    return cgutils.get_or_insert_function(builder.module, fnty, f"llvm.fma.{_suffix(vt)}")


def _splat(builder, vt, x):
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), x, ir.IntType(32)(0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), vt.count), [0] * vt.count))


def _vptr(builder, base, idx, vt):
    return builder.bitcast(builder.gep(base, [idx]), vt.as_pointer())


def _align(elt):
    return 4 if isinstance(elt, ir.FloatType) else 8


def _hsum(builder, vt, elt, v):
    fnty = ir.FunctionType(elt, [elt, vt])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.vector.reduce.fadd.{_suffix(vt)}")
    return builder.call(fn, [ir.Constant(elt, 0.0), v], fastmath=("reassoc", "nsz"))


@intrinsic
def _vlanes(typingctx, arr):
    """Lanes of one vector for the array's dtype (16 for float32, 8 for float64), as a constant."""
    n = _LINE // (arr.dtype.bitwidth // 8)

    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, n)
    return types.intp(arr), codegen


@intrinsic
def _v_dots(typingctx, a, ao, src, offs, nvec):
    """(sum_c a[ao + c] * src[offs[m] + c] for each m), c < nvec * lanes; ``offs`` a tuple of uint64
    (one pass over a, one accumulator per offset)."""
    n = len(offs)
    sig = types.UniTuple(a.dtype, n)(a, types.uint64, src, types.UniTuple(types.uint64, n), types.intp)

    def codegen(context, builder, sig, args):
        vt, elt = _vector_type(context, sig.args[0].dtype)
        al = _align(elt)
        A = context.make_array(sig.args[0])(context, builder, args[0])
        s = context.make_array(sig.args[2])(context, builder, args[2])
        abase = builder.gep(A.data, [args[1]])
        bases = [builder.gep(s.data, [builder.extract_value(args[3], m)]) for m in range(n)]
        fma = _fma(builder, vt)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vt, [0.0] * vt.count)) for _ in range(n)]
        with cgutils.for_range(builder, args[4]) as loop:
            i = builder.mul(loop.index, ir.Constant(loop.index.type, vt.count))
            x = builder.load(_vptr(builder, abase, i, vt), align=al)
            for m in range(n):
                y = builder.load(_vptr(builder, bases[m], i, vt), align=al)
                builder.store(builder.call(fma, [x, y, builder.load(accs[m])]), accs[m])
        sums = [_hsum(builder, vt, elt, builder.load(accs[m])) for m in range(n)]
        return context.make_tuple(builder, sig.return_type, sums)
    return sig, codegen


@intrinsic
def _v_axpy(typingctx, dst, do, src, offs, ws, nvec):
    """dst[do + c] += sum_m ws[m] * src[offs[m] + c], c < nvec * lanes; ``offs`` a tuple of uint64,
    ``ws`` a tuple of the arrays' dtype, of the same length."""
    n = len(offs)
    f = dst.dtype
    sig = types.void(dst, types.uint64, src, types.UniTuple(types.uint64, n), types.UniTuple(f, n), types.intp)

    def codegen(context, builder, sig, args):
        vt, elt = _vector_type(context, sig.args[0].dtype)
        al = _align(elt)
        d = context.make_array(sig.args[0])(context, builder, args[0])
        s = context.make_array(sig.args[2])(context, builder, args[2])
        dbase = builder.gep(d.data, [args[1]])
        bases = [builder.gep(s.data, [builder.extract_value(args[3], m)]) for m in range(n)]
        wv = [_splat(builder, vt, builder.extract_value(args[4], m)) for m in range(n)]
        fma = _fma(builder, vt)
        with cgutils.for_range(builder, args[5]) as loop:
            i = builder.mul(loop.index, ir.Constant(loop.index.type, vt.count))
            dp = _vptr(builder, dbase, i, vt)
            acc = builder.load(dp, align=al)
            for m in range(n):
                acc = builder.call(fma, [wv[m], builder.load(_vptr(builder, bases[m], i, vt), align=al), acc])
            builder.store(acc, dp, align=al)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _v_dots_scatter(typingctx, a, ao, src, offs, buf, boffs, scales, nvec):
    """One pass over a[ao:ao + nvec*lanes]: returns (sum_c a[ao + c] * src[offs[m] + c] for each m)
    and does buf[boffs[m] + c] += scales[m] * a[ao + c]. ``buf`` must not overlap ``a`` or ``src``;
    two boffs may be equal (updates are applied in order)."""
    n = len(offs)
    f, u = a.dtype, types.uint64
    sig = types.UniTuple(f, n)(a, u, src, types.UniTuple(u, n), buf, types.UniTuple(u, n), types.UniTuple(f, n),
                               types.intp)

    def codegen(context, builder, sig, args):
        vt, elt = _vector_type(context, sig.args[0].dtype)
        al = _align(elt)
        A = context.make_array(sig.args[0])(context, builder, args[0])
        s = context.make_array(sig.args[2])(context, builder, args[2])
        bf = context.make_array(sig.args[4])(context, builder, args[4])
        abase = builder.gep(A.data, [args[1]])
        bases = [builder.gep(s.data, [builder.extract_value(args[3], m)]) for m in range(n)]
        bbases = [builder.gep(bf.data, [builder.extract_value(args[5], m)]) for m in range(n)]
        sc = [_splat(builder, vt, builder.extract_value(args[6], m)) for m in range(n)]
        fma = _fma(builder, vt)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vt, [0.0] * vt.count)) for _ in range(n)]
        with cgutils.for_range(builder, args[7]) as loop:
            i = builder.mul(loop.index, ir.Constant(loop.index.type, vt.count))
            x = builder.load(_vptr(builder, abase, i, vt), align=al)
            for m in range(n):
                y = builder.load(_vptr(builder, bases[m], i, vt), align=al)
                builder.store(builder.call(fma, [x, y, builder.load(accs[m])]), accs[m])
                bp = _vptr(builder, bbases[m], i, vt)
                builder.store(builder.call(fma, [sc[m], x, builder.load(bp, align=al)]), bp, align=al)
        sums = [_hsum(builder, vt, elt, builder.load(accs[m])) for m in range(n)]
        return context.make_tuple(builder, sig.return_type, sums)
    return sig, codegen


@intrinsic
def _v_axpy_scatter(typingctx, dst, do, src, offs, ws, a, ao, buf, boffs, nvec):
    """One pass: dst[do + c] += sum_m ws[m] * src[offs[m] + c] and buf[boffs[m] + c] += ws[m] *
    a[ao + c], c < nvec * lanes. ``buf`` must not overlap dst, src or a; two boffs may be equal."""
    n = len(offs)
    f, u = dst.dtype, types.uint64
    sig = types.void(dst, u, src, types.UniTuple(u, n), types.UniTuple(f, n), a, u, buf, types.UniTuple(u, n),
                     types.intp)

    def codegen(context, builder, sig, args):
        vt, elt = _vector_type(context, sig.args[0].dtype)
        al = _align(elt)
        d = context.make_array(sig.args[0])(context, builder, args[0])
        s = context.make_array(sig.args[2])(context, builder, args[2])
        A = context.make_array(sig.args[5])(context, builder, args[5])
        bf = context.make_array(sig.args[7])(context, builder, args[7])
        dbase = builder.gep(d.data, [args[1]])
        abase = builder.gep(A.data, [args[6]])
        bases = [builder.gep(s.data, [builder.extract_value(args[3], m)]) for m in range(n)]
        bbases = [builder.gep(bf.data, [builder.extract_value(args[8], m)]) for m in range(n)]
        wv = [_splat(builder, vt, builder.extract_value(args[4], m)) for m in range(n)]
        fma = _fma(builder, vt)
        with cgutils.for_range(builder, args[9]) as loop:
            i = builder.mul(loop.index, ir.Constant(loop.index.type, vt.count))
            dp = _vptr(builder, dbase, i, vt)
            x = builder.load(_vptr(builder, abase, i, vt), align=al)
            acc = builder.load(dp, align=al)
            for m in range(n):
                acc = builder.call(fma, [wv[m], builder.load(_vptr(builder, bases[m], i, vt), align=al), acc])
                bp = _vptr(builder, bbases[m], i, vt)
                builder.store(builder.call(fma, [wv[m], x, builder.load(bp, align=al)]), bp, align=al)
            builder.store(acc, dp, align=al)
        return context.get_dummy_value()
    return sig, codegen


# 4-corner helpers on flat arrays with unsigned offsets: numba tests every signed index for
# wraparound, which kept these loops scalar, and slicing a view per corner (4 per point, 36 points
# per pixel) cost 90 of the 120 ms of the reassembly forward; with uint64 offsets the loops
# vectorise and no view is made. An outside corner points at a zero tail (reads) or a scratch tail
# (writes) of the flat array, with weight 0.
_U = np.uint64


@njit(**_INLINE)
def _corners(pix, wts, gp, j, pbase, Cl, c0, tail, o, w, at=0):
    """o[at + m] = flat offset of channel c0 of corner m in a [pixels, Cl] array whose pixel 0 is
    pixel -pbase of the image (``tail`` outside); w[at + m] = the corner's weight."""
    for m in range(4):
        pv = pix[gp, m, j]
        o[at + m] = _U((pbase + pv) * Cl + c0) if pv >= 0 else _U(tail)
        w[at + m] = wts[gp, m, j]


# Two points (8 corners) per channel loop: the loops are short (d = 32, C/G = 64 channels) and
# their fixed cost (set-up, alias checks, horizontal sums) was a large part of each point's time.
@njit(**_INLINE)
def _dots8(a, ao, lo, o, n, f):
    """f[m] = sum_c a[ao + c] * lo[o[m] + c] for the 8 corners of two points."""
    o0, o1, o2, o3, o4, o5, o6, o7 = o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]
    nv = n // _vlanes(a)
    t0, t1, t2, t3, t4, t5, t6, t7 = _v_dots(a, ao, lo, (o0, o1, o2, o3, o4, o5, o6, o7), nv)
    for c in range(nv * _vlanes(a), n):
        e = a[ao + c]
        t0 += e * lo[o0 + c]
        t1 += e * lo[o1 + c]
        t2 += e * lo[o2 + c]
        t3 += e * lo[o3 + c]
        t4 += e * lo[o4 + c]
        t5 += e * lo[o5 + c]
        t6 += e * lo[o6 + c]
        t7 += e * lo[o7 + c]
    f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7] = t0, t1, t2, t3, t4, t5, t6, t7


@njit(**_INLINE)
def _axpy8(dst, do, w, lo, o, n):
    """dst[do + c] += sum_m w[m] * lo[o[m] + c] over the 8 corners of two points."""
    w0, w1, w2, w3, w4, w5, w6, w7 = w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]
    o0, o1, o2, o3, o4, o5, o6, o7 = o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]
    nv = n // _vlanes(dst)
    _v_axpy(dst, do, lo, (o0, o1, o2, o3, o4, o5, o6, o7), (w0, w1, w2, w3, w4, w5, w6, w7), nv)
    for c in range(nv * _vlanes(dst), n):
        dst[do + c] += (w0 * lo[o0 + c] + w1 * lo[o1 + c] + w2 * lo[o2 + c] + w3 * lo[o3 + c]
                        + w4 * lo[o4 + c] + w5 * lo[o5 + c] + w6 * lo[o6 + c] + w7 * lo[o7 + c])


@njit(**_INLINE)
def _dots4(a, ao, lo, o, n, f):
    """f[m] = sum_c a[ao + c] * lo[o[m] + c], c < n (one pass over a; whole vectors by _v_dots)."""
    o0, o1, o2, o3 = o[0], o[1], o[2], o[3]
    nv = n // _vlanes(a)
    t0, t1, t2, t3 = _v_dots(a, ao, lo, (o0, o1, o2, o3), nv)
    for c in range(nv * _vlanes(a), n):
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
    nv = n // _vlanes(dst)
    _v_axpy(dst, do, lo, (o0, o1, o2, o3), (w0, w1, w2, w3), nv)
    for c in range(nv * _vlanes(dst), n):
        dst[do + c] += w0 * lo[o0 + c] + w1 * lo[o1 + c] + w2 * lo[o2 + c] + w3 * lo[o3 + c]


@njit(**_INLINE)
def _dots_scatter4(a, ao, lo, o, n, f, buf, ob, scale, w):
    """_dots4, and buf[ob[m] + c] += scale * w[m] * a[ao + c] (the 4 corners' scatter), in one pass
    over a."""
    o0, o1, o2, o3 = o[0], o[1], o[2], o[3]
    b0, b1, b2, b3 = ob[0], ob[1], ob[2], ob[3]
    s0, s1, s2, s3 = scale * w[0], scale * w[1], scale * w[2], scale * w[3]
    nv = n // _vlanes(a)
    t0, t1, t2, t3 = _v_dots_scatter(a, ao, lo, (o0, o1, o2, o3), buf, (b0, b1, b2, b3), (s0, s1, s2, s3), nv)
    for c in range(nv * _vlanes(a), n):
        e = a[ao + c]
        t0 += e * lo[o0 + c]
        t1 += e * lo[o1 + c]
        t2 += e * lo[o2 + c]
        t3 += e * lo[o3 + c]
        buf[b0 + c] += s0 * e
        buf[b1 + c] += s1 * e
        buf[b2 + c] += s2 * e
        buf[b3 + c] += s3 * e
    f[0], f[1], f[2], f[3] = t0, t1, t2, t3


@njit(**_INLINE)
def _axpy_scatter4(dst, do, w, lo, o, a, buf, ob, n):
    """_axpy4(dst, do, w, lo, o, n), and buf[ob[m] + c] += w[m] * a[do + c] (the 4 corners'
    scatter), in one pass."""
    w0, w1, w2, w3 = w[0], w[1], w[2], w[3]
    o0, o1, o2, o3 = o[0], o[1], o[2], o[3]
    b0, b1, b2, b3 = ob[0], ob[1], ob[2], ob[3]
    nv = n // _vlanes(dst)
    _v_axpy_scatter(dst, do, lo, (o0, o1, o2, o3), (w0, w1, w2, w3), a, do, buf, (b0, b1, b2, b3), nv)
    for c in range(nv * _vlanes(dst), n):
        e = a[do + c]
        dst[do + c] += w0 * lo[o0 + c] + w1 * lo[o1 + c] + w2 * lo[o2 + c] + w3 * lo[o3 + c]
        buf[b0 + c] += w0 * e
        buf[b1 + c] += w1 * e
        buf[b2 + c] += w2 * e
        buf[b3 + c] += w3 * e


@njit(**_INLINE)
def _dxy(f, ty, tx):
    """(d/dpx, d/dpy) of the bilinear blend of corner values f[0:4] (outside corners are 0)."""
    return _dxy4(f[0], f[1], f[2], f[3], ty, tx, f.dtype.type(1))


@njit(**_INLINE)
def _dxy4(f0, f1, f2, f3, ty, tx, one):
    """_dxy on four scalars (``one`` is 1 in the arrays' dtype)."""
    return (one - ty) * (f1 - f0) + ty * (f3 - f2), (one - tx) * (f2 - f0) + tx * (f3 - f1)


@njit(**_INLINE)
def _row_buffers(off, s, dtype):
    GP, Wq = off.shape[1] // 2, off.shape[3]
    xb = np.empty(Wq, dtype)
    for j in range(Wq):
        xb[j] = j // s
    return (xb, np.empty((GP, 4, Wq), np.int64), np.empty((GP, 4, Wq), dtype), np.empty((GP, Wq), dtype),
            np.empty((GP, Wq), dtype))


@njit(**_INLINE)
def _zero_band(buf, t, band_base, W, Cl):
    """Zero band t's rows of a flat band buffer (rows band_base[t] .. band_base[t+1]; the buffer ends
    with a scratch tail of Cl entries). Each band zeroes its own rows on its own thread: a torch
    zero_() of the whole buffer before the kernel left torch's OpenMP worker spin-waiting on one of
    the cores for the kernel's first milliseconds (libgomp's default spin after a parallel region)."""
    end = band_base[t + 1] if t + 1 < band_base.size else (buf.size - Cl) // (W * Cl)
    buf[band_base[t] * W * Cl:end * W * Cl] = 0


@njit(nogil=True, cache=_CACHE)
def to_cl(t, nb, x, Cl, out):
    """Flat channels-last copy: out[((b*H + y)*W + xx)*Cl + c] = x[b, c, y, xx] (channel stride Cl =
    C + _PAD; the spare channels are zeroed; op.py zeroes the tail of Cl entries that outside corners
    read)."""
    B, C, H, W = x.shape
    for by in range(t * (B * H) // nb, (t + 1) * (B * H) // nb):
        b, y = by // H, by % H
        for c in range(C):
            row = x[b, c, y]
            for xx in range(W):
                out[(by * W + xx) * Cl + c] = row[xx]
        for xx in range(W):
            for c in range(C, Cl):
                out[(by * W + xx) * Cl + c] = 0


# ------------------------------------------------------------------------------------ similarity
# One output row per step: geometry pass, then 4-corner dot products per point (d = 32).
# 22 ms on one core at the benchmark shape (offsets ~ N(0, 1.5^2)).
@njit(**_JIT)
def similarity_fwd(t, nb, q, kf, H, W, off, P, G, s, out):
    B, Cq, Hq, Wq = q.shape
    d, Cl = Cq // G, Cq + _PAD
    qr = np.empty(Wq * Cl, q.dtype)
    xb, pix, wts, tys, txs = _row_buffers(off, s, q.dtype)
    o = np.empty(4, np.uint64)
    w = np.empty(4, q.dtype)
    f = np.empty(4, q.dtype)
    for bi in range(t * (B * Hq) // nb, (t + 1) * (B * Hq) // nb):
        b, i = bi // Hq, bi % Hq
        _load_row(q, b, i, qr.reshape((Wq, Cl)))
        _geometry(off, b, i, s, H, W, xb, pix, wts, tys, txs)
        for j in range(Wq):
            for g in range(G):
                for p in range(P):
                    _corners(pix, wts, g * P + p, j, b * H * W, Cl, g * d, kf.size - Cl, o, w)
                    _dots4(qr, _U(j * Cl + g * d), kf, o, _U(d), f)
                    out[b, g, p, i, j] = w[0] * f[0] + w[1] * f[1] + w[2] * f[2] + w[3] * f[3]


# dq and the offset gradient per pixel, dk scattered into the band buffer: 73 ms on one core.
@njit(**_JIT)
def similarity_bwd(t, nb, gl, q, kf, H, W, off, P, G, s, band_lo, band_base, gq, goff, gkb):
    """gl: grad of the logits [B, G, P, H', W'] -> gq, goff (per pixel), gkb (band buffers)."""
    B, Cq, Hq, Wq = q.shape
    d, Cl = Cq // G, Cq + _PAD
    qr = np.empty(Wq * Cl, q.dtype)
    gqr = np.empty(Wq * Cl, q.dtype)
    gor = np.empty((Wq, off.shape[1]), q.dtype)
    xb, pix, wts, tys, txs = _row_buffers(off, s, q.dtype)
    o = np.empty(4, np.uint64)
    ob = np.empty(4, np.uint64)
    w = np.empty(4, q.dtype)
    f = np.empty(4, q.dtype)
    bbase = (band_base[t] - band_lo[t]) * W
    _zero_band(gkb, t, band_base, W, Cl)
    for bi in range(t * (B * Hq) // nb, (t + 1) * (B * Hq) // nb):
        b, i = bi // Hq, bi % Hq
        _load_row(q, b, i, qr.reshape((Wq, Cl)))
        _geometry(off, b, i, s, H, W, xb, pix, wts, tys, txs)
        gqr[:] = 0
        for j in range(Wq):
            for g in range(G):
                qo = _U(j * Cl + g * d)
                for p in range(P):
                    gp = g * P + p
                    a = gl[b, g, p, i, j]
                    _corners(pix, wts, gp, j, bbase + b * H * W, Cl, g * d, gkb.size - Cl, ob, w)
                    _corners(pix, wts, gp, j, b * H * W, Cl, g * d, kf.size - Cl, o, w)
                    _dots4(qr, qo, kf, o, _U(d), f)
                    for m in range(4):
                        w[m] *= a
                    _axpy_scatter4(gqr, qo, w, kf, o, qr, gkb, ob, _U(d))
                    dx, dy = _dxy(f, tys[gp, j], txs[gp, j])
                    gor[j, 2 * gp] = a * dx
                    gor[j, 2 * gp + 1] = a * dy
        _store_row(gqr.reshape((Wq, Cl)), gq, b, i)
        _store_row(gor, goff, b, i)


# ------------------------------------------------------------------------------------ reassembly
# 28 ms on one core (C/G = 64 channels per corner, 36 points per pixel).
@njit(**_JIT)
def reassemble_fwd(t, nb, wp, vf, H, W, off, P, G, s, out):
    B, C, Hq, Wq = out.shape
    Cg, Cl = C // G, C + _PAD
    acc = np.empty(Wq * Cl, vf.dtype)
    xb, pix, wts, tys, txs = _row_buffers(off, s, vf.dtype)
    o = np.empty(4, np.uint64)
    w = np.empty(4, vf.dtype)
    for bi in range(t * (B * Hq) // nb, (t + 1) * (B * Hq) // nb):
        b, i = bi // Hq, bi % Hq
        _geometry(off, b, i, s, H, W, xb, pix, wts, tys, txs)
        acc[:] = 0
        for j in range(Wq):
            for g in range(G):
                for p in range(P):
                    _corners(pix, wts, g * P + p, j, b * H * W, Cl, g * Cg, vf.size - Cl, o, w)
                    a = wp[b, g, p, i, j]
                    for m in range(4):
                        w[m] *= a
                    _axpy4(acc, _U(j * Cl + g * Cg), w, vf, o, _U(Cg))
        _store_row(acc.reshape((Wq, Cl)), out, b, i)


# dweights and the offset gradient per pixel, dv scattered into the band buffer: 59 ms on one core.
@njit(**_JIT)
def reassemble_bwd(t, nb, go, wp, vf, H, W, off, P, G, s, band_lo, band_base, gw, goff, gvb):
    """go: grad of the output [B, C, H', W'] -> gw, goff (per pixel), gvb (band buffers)."""
    B, C, Hq, Wq = go.shape
    Cg, Cl = C // G, C + _PAD
    gr = np.empty(Wq * Cl, vf.dtype)
    gor = np.empty((Wq, off.shape[1]), vf.dtype)
    xb, pix, wts, tys, txs = _row_buffers(off, s, vf.dtype)
    o = np.empty(4, np.uint64)
    ob = np.empty(4, np.uint64)
    w = np.empty(4, vf.dtype)
    f = np.empty(4, vf.dtype)
    bbase = (band_base[t] - band_lo[t]) * W
    _zero_band(gvb, t, band_base, W, Cl)
    for bi in range(t * (B * Hq) // nb, (t + 1) * (B * Hq) // nb):
        b, i = bi // Hq, bi % Hq
        _load_row(go, b, i, gr.reshape((Wq, Cl)))
        _geometry(off, b, i, s, H, W, xb, pix, wts, tys, txs)
        for j in range(Wq):
            for g in range(G):
                go_ = _U(j * Cl + g * Cg)
                for p in range(P):
                    gp = g * P + p
                    a = wp[b, g, p, i, j]
                    _corners(pix, wts, gp, j, b * H * W, Cl, g * Cg, vf.size - Cl, o, w)
                    _corners(pix, wts, gp, j, bbase + b * H * W, Cl, g * Cg, gvb.size - Cl, ob, w)
                    _dots_scatter4(gr, go_, vf, o, _U(Cg), f, gvb, ob, a, w)
                    gw[b, g, p, i, j] = w[0] * f[0] + w[1] * f[1] + w[2] * f[2] + w[3] * f[3]
                    dx, dy = _dxy(f, tys[gp, j], txs[gp, j])
                    gor[j, 2 * gp] = a * dx
                    gor[j, 2 * gp + 1] = a * dy
        _store_row(gor, goff, b, i)


# ------------------------------------------------------------------------------------ fused SAPA-D
# Per output pixel and group: P logits from the 4 bilinear corners of each point, max-subtracted
# softmax over P, weighted sum of the sampled values. Saved for the backward, per point (flat
# sv[(((b*H' + i)*W' + j)*G + g)*P + p)*3 + 0..2]): the probability and the logit's slopes along x
# and y (from the 4 corner dots the forward has anyway): 3*G*P values per output pixel (14 MB at
# the benchmark shape, where the output is 34 MB), nothing proportional to C. With them the
# backward does not recompute the logits (a third of its point loops). Two points per channel loop.
@njit(**_JIT)
def sapa_fwd(t, nb, q, kf, vf, H, W, off, P, G, s, out, sv):
    B, Cq, Hq, Wq = q.shape
    C = out.shape[1]
    d, Cg, Clk, Clv = Cq // G, C // G, Cq + _PAD, C + _PAD
    qr = np.empty(Wq * Clk, q.dtype)
    acc = np.empty(Wq * Clv, q.dtype)
    xb, pix, wts, tys, txs = _row_buffers(off, s, q.dtype)
    o = np.empty(8, np.uint64)
    w = np.empty(8, q.dtype)
    f = np.empty(8, q.dtype)
    e = np.empty(P, q.dtype)
    one = q.dtype.type(1)
    for bi in range(t * (B * Hq) // nb, (t + 1) * (B * Hq) // nb):
        b, i = bi // Hq, bi % Hq
        _load_row(q, b, i, qr.reshape((Wq, Clk)))
        _geometry(off, b, i, s, H, W, xb, pix, wts, tys, txs)
        acc[:] = 0
        for j in range(Wq):
            for g in range(G):
                qo = _U(j * Clk + g * d)
                so = ((bi * Wq + j) * G + g) * P * 3
                for p in range(0, P - 1, 2):
                    gp = g * P + p
                    _corners(pix, wts, gp, j, b * H * W, Clk, g * d, kf.size - Clk, o, w, 0)
                    _corners(pix, wts, gp + 1, j, b * H * W, Clk, g * d, kf.size - Clk, o, w, 4)
                    _dots8(qr, qo, kf, o, _U(d), f)
                    e[p] = w[0] * f[0] + w[1] * f[1] + w[2] * f[2] + w[3] * f[3]
                    e[p + 1] = w[4] * f[4] + w[5] * f[5] + w[6] * f[6] + w[7] * f[7]
                    sv[so + 3 * p + 1], sv[so + 3 * p + 2] = _dxy4(f[0], f[1], f[2], f[3], tys[gp, j],
                                                                   txs[gp, j], one)
                    sv[so + 3 * p + 4], sv[so + 3 * p + 5] = _dxy4(f[4], f[5], f[6], f[7], tys[gp + 1, j],
                                                                   txs[gp + 1, j], one)
                if P % 2:
                    gp = g * P + P - 1
                    _corners(pix, wts, gp, j, b * H * W, Clk, g * d, kf.size - Clk, o, w, 0)
                    _dots4(qr, qo, kf, o, _U(d), f)
                    e[P - 1] = w[0] * f[0] + w[1] * f[1] + w[2] * f[2] + w[3] * f[3]
                    sv[so + 3 * P - 2], sv[so + 3 * P - 1] = _dxy4(f[0], f[1], f[2], f[3], tys[gp, j],
                                                                   txs[gp, j], one)
                m = e[0]
                for p in range(1, P):
                    m = max(m, e[p])
                tot = q.dtype.type(0)
                for p in range(P):
                    e[p] = np.exp(e[p] - m)
                    tot += e[p]
                inv = 1 / tot
                for p in range(P):
                    e[p] *= inv
                    sv[so + 3 * p] = e[p]
                ao = _U(j * Clv + g * Cg)
                for p in range(0, P - 1, 2):
                    _corners(pix, wts, g * P + p, j, b * H * W, Clv, g * Cg, vf.size - Clv, o, w, 0)
                    _corners(pix, wts, g * P + p + 1, j, b * H * W, Clv, g * Cg, vf.size - Clv, o, w, 4)
                    a0, a1 = e[p], e[p + 1]
                    for c4 in range(4):
                        w[c4] *= a0
                        w[4 + c4] *= a1
                    _axpy8(acc, ao, w, vf, o, _U(Cg))
                if P % 2:
                    _corners(pix, wts, g * P + P - 1, j, b * H * W, Clv, g * Cg, vf.size - Clv, o, w, 0)
                    a0 = e[P - 1]
                    for c4 in range(4):
                        w[c4] *= a0
                    _axpy4(acc, ao, w, vf, o, _U(Cg))
        _store_row(acc.reshape((Wq, Clv)), out, b, i)


# Backward from the saved probabilities and logit slopes. Two passes over the P points of a
# (pixel, group), one point per channel loop: v corners -> dp_p = <go, sampled v_p>, the value
# slopes for the offset gradient and the dv scatter prob_p w_m go; k corners -> dq and dk with
# dlogit_p = prob_p (dp_p - sum prob dp).
@njit(**_JIT)
def sapa_bwd(t, nb, go, q, kf, vf, H, W, off, sv, P, G, s, band_lo, band_base, gq, goff, gkb, gvb):
    B, Cq, Hq, Wq = q.shape
    C = go.shape[1]
    d, Cg, Clk, Clv = Cq // G, C // G, Cq + _PAD, C + _PAD
    qr = np.empty(Wq * Clk, q.dtype)
    gqr = np.empty(Wq * Clk, q.dtype)
    gr = np.empty(Wq * Clv, q.dtype)
    gor = np.empty((Wq, off.shape[1]), q.dtype)
    xb, pix, wts, tys, txs = _row_buffers(off, s, q.dtype)
    f = np.empty(4, q.dtype)
    o = np.empty(4, np.uint64)
    ob = np.empty(4, np.uint64)
    w = np.empty(4, q.dtype)
    dp = np.empty(P, q.dtype)
    vx = np.empty(P, q.dtype)
    vy = np.empty(P, q.dtype)
    one = q.dtype.type(1)
    bbase = (band_base[t] - band_lo[t]) * W
    _zero_band(gkb, t, band_base, W, Clk)
    _zero_band(gvb, t, band_base, W, Clv)
    for bi in range(t * (B * Hq) // nb, (t + 1) * (B * Hq) // nb):
        b, i = bi // Hq, bi % Hq
        _load_row(q, b, i, qr.reshape((Wq, Clk)))
        _load_row(go, b, i, gr.reshape((Wq, Clv)))
        _geometry(off, b, i, s, H, W, xb, pix, wts, tys, txs)
        gqr[:] = 0
        for j in range(Wq):
            for g in range(G):
                qo = _U(j * Clk + g * d)
                go_ = _U(j * Clv + g * Cg)
                so = ((bi * Wq + j) * G + g) * P * 3
                delta = q.dtype.type(0)
                for p in range(P):
                    gp = g * P + p
                    pr = sv[so + 3 * p]
                    _corners(pix, wts, gp, j, bbase + b * H * W, Clv, g * Cg, gvb.size - Clv, ob, w)
                    _corners(pix, wts, gp, j, b * H * W, Clv, g * Cg, vf.size - Clv, o, w)
                    _dots_scatter4(gr, go_, vf, o, _U(Cg), f, gvb, ob, pr, w)
                    dp[p] = w[0] * f[0] + w[1] * f[1] + w[2] * f[2] + w[3] * f[3]
                    vx[p], vy[p] = _dxy4(f[0], f[1], f[2], f[3], tys[gp, j], txs[gp, j], one)
                    delta += pr * dp[p]
                for p in range(P):
                    gp = g * P + p
                    pr = sv[so + 3 * p]
                    dl = pr * (dp[p] - delta)
                    _corners(pix, wts, gp, j, bbase + b * H * W, Clk, g * d, gkb.size - Clk, ob, w)
                    _corners(pix, wts, gp, j, b * H * W, Clk, g * d, kf.size - Clk, o, w)
                    for m in range(4):
                        w[m] *= dl
                    _axpy_scatter4(gqr, qo, w, kf, o, qr, gkb, ob, _U(d))
                    gor[j, 2 * gp] = dl * sv[so + 3 * p + 1] + pr * vx[p]
                    gor[j, 2 * gp + 1] = dl * sv[so + 3 * p + 2] + pr * vy[p]
        _store_row(gqr.reshape((Wq, Clk)), gq, b, i)
        _store_row(gor, goff, b, i)


# ------------------------------------------------------------------------------------ band helpers
@njit(nogil=True, cache=_CACHE)
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


@njit(nogil=True, cache=_CACHE)
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
