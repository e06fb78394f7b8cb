"""Explicit-vector helpers for the numba CPU kernels, written as LLVM IR (``numba.extending.intrinsic``).

Why: in a numba loop such as ``for c in range(n): buf[o + c] += w * a[ao + c]`` LLVM cannot prove that
``buf`` and ``a`` do not overlap, so it guards the vector loop with run-time overlap checks, and it
picks one vector body for every call site (16 lanes x 4 interleaved = 64 floats per iteration on
AVX-512). The deform kernels' channel spans are short and fixed (d = 32 key channels, C/G = 64 value
channels per group), so the 32-channel loops never entered the vector body and ran in the 8-lane
remainder loop, and every 64-channel loop paid the checks. These helpers emit the loop body
directly on vectors of one 64-byte line (16 float32 / 8 float64 lanes; LLVM splits them on
narrower machines), loads and stores in program order, so no overlap check is needed and none is
made: callers must pass spans that do not overlap unless they are the same span.

Each helper covers ``nvec`` whole lines; the callers handle a remainder of ``n % lanes(dtype)``
channels with a plain loop.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

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


def lanes(dtype) -> int:
    """Lanes of one vector for a numpy dtype (python side)."""
    return _LINE // dtype.itemsize


@intrinsic
def vlanes(typingctx, arr):
    """Lanes of one vector for the array's dtype (16 for float32, 8 for float64), as a constant."""
    n = _LINE // (arr.dtype.bitwidth // 8)

    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, n)
    return types.intp(arr), codegen


@intrinsic
def axpy1(typingctx, dst, do, alpha, src, so, nvec):
    """dst[do + c] += alpha * src[so + c] for c < nvec * lanes (flat offsets into C-contiguous arrays)."""
    sig = types.void(dst, types.uint64, dst.dtype, src, types.uint64, types.intp)

    def codegen(context, builder, sig, args):
        vt, elt = _vector_type(context, sig.args[0].dtype)
        al = _align(elt)
        d = context.make_array(sig.args[0])(context, builder, args[0])
        s = context.make_array(sig.args[3])(context, builder, args[3])
        dbase = builder.gep(d.data, [args[1]])
        sbase = builder.gep(s.data, [args[4]])
        a = _splat(builder, vt, args[2])
        fma = _fma(builder, vt)
        with cgutils.for_range(builder, args[5]) as loop:
            i = builder.mul(loop.index, ir.Constant(loop.index.type, vt.count))
            dp = _vptr(builder, dbase, i, vt)
            x = builder.load(_vptr(builder, sbase, i, vt), align=al)
            builder.store(builder.call(fma, [a, x, builder.load(dp, align=al)]), dp, align=al)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def axpy4(typingctx, dst, do, src, o0, o1, o2, o3, w0, w1, w2, w3, nvec):
    """dst[do + c] += sum_m w_m * src[o_m + c] for c < nvec * lanes."""
    u, f = types.uint64, dst.dtype
    sig = types.void(dst, u, src, u, u, u, u, f, f, f, f, types.intp)

    def codegen(context, builder, sig, args):
        vt, elt = _vector_type(context, sig.args[0].dtype)
        al = _align(elt)
        d = context.make_array(sig.args[0])(context, builder, args[0])
        s = context.make_array(sig.args[2])(context, builder, args[2])
        dbase = builder.gep(d.data, [args[1]])
        bases = [builder.gep(s.data, [args[3 + m]]) for m in range(4)]
        ws = [_splat(builder, vt, args[7 + m]) for m in range(4)]
        fma = _fma(builder, vt)
        with cgutils.for_range(builder, args[11]) as loop:
            i = builder.mul(loop.index, ir.Constant(loop.index.type, vt.count))
            dp = _vptr(builder, dbase, i, vt)
            acc = builder.load(dp, align=al)
            for m in range(4):
                acc = builder.call(fma, [ws[m], builder.load(_vptr(builder, bases[m], i, vt), align=al), acc])
            builder.store(acc, dp, align=al)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def dots4(typingctx, a, ao, src, o0, o1, o2, o3, nvec):
    """(sum_c a[ao + c] * src[o_m + c] for m < 4), c < nvec * lanes."""
    u, f = types.uint64, a.dtype
    sig = types.UniTuple(f, 4)(a, u, src, u, u, u, u, types.intp)

    def codegen(context, builder, sig, args):
        vt, elt = _vector_type(context, sig.args[0].dtype)
        al = _align(elt)
        A = context.make_array(sig.args[0])(context, builder, args[0])
        s = context.make_array(sig.args[2])(context, builder, args[2])
        abase = builder.gep(A.data, [args[1]])
        bases = [builder.gep(s.data, [args[3 + m]]) for m in range(4)]
        fma = _fma(builder, vt)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vt, [0.0] * vt.count)) for _ in range(4)]
        with cgutils.for_range(builder, args[7]) as loop:
            i = builder.mul(loop.index, ir.Constant(loop.index.type, vt.count))
            x = builder.load(_vptr(builder, abase, i, vt), align=al)
            for m in range(4):
                y = builder.load(_vptr(builder, bases[m], i, vt), align=al)
                builder.store(builder.call(fma, [x, y, builder.load(accs[m])]), accs[m])
        sums = [_hsum(builder, vt, elt, builder.load(accs[m])) for m in range(4)]
        return context.make_tuple(builder, sig.return_type, sums)
    return sig, codegen


@intrinsic
def dots(typingctx, a, ao, src, offs, nvec):
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
def axpy(typingctx, dst, do, src, offs, ws, nvec):
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
def dots_scatter(typingctx, a, ao, src, offs, buf, boffs, scales, nvec):
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
def axpy_scatter(typingctx, dst, do, src, offs, ws, a, ao, buf, boffs, nvec):
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
