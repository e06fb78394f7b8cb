"""Every Triton kernel against the reference at real sizes on a GPU: forward and every gradient,
fp32 / bf16 / fp16, odd and ceil-mode sizes, both variants of the fused forward, int64 indices near
2**31 elements. Marked ``needs_cuda`` (skipped without a GPU).

Also a plain script, so that the device check runs it where pytest is not installed::

    python tests/gpu/test_kernels_cuda.py OUT.jsonl     # one JSON line per case; exit 1 on a failure

``SAPA_GPU_CHECK_DRY=1`` (``check.sh --dry-run``) runs a few tiny cases on CPU under
TRITON_INTERPRET=1 instead, to keep the script from rotting; it checks nothing about a GPU.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/_compare.py when run as a script
from _compare import assert_close  # noqa: E402

DRY = os.environ.get("SAPA_GPU_CHECK_DRY") == "1"
DEVICE = "cpu" if DRY else "cuda"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (name, B, D, C, H, W, s, K, H', W')
WINDOW_REAL = [
    ("authors", 1, 32, 256, 120, 120, 2, 5, 240, 240),
    ("fpn-ceil", 2, 32, 96, 25, 42, 2, 5, 50, 83),
    ("s3-K3-odd", 1, 16, 72, 33, 21, 3, 3, 99, 61),
]  # K=7, s=4 is checked by the interpreter tests: its backward unrolls 784 steps, a long GPU compile
WINDOW_DRY = [("dry", 1, 16, 16, 3, 4, 2, 3, 6, 7)]
# (name, B, G, DG, CG, H, W, s, P, H', W')
DEFORM_REAL = [("segformer", 2, 4, 32, 64, 32, 32, 2, 9, 64, 64), ("fpn-ceil", 1, 4, 32, 64, 25, 42, 2, 9, 50, 83)]
DEFORM_DRY = [("dry", 1, 2, 4, 3, 3, 4, 2, 3, 6, 7)]


def _rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(device=DEVICE, dtype=dtype)


def _ref64(fn, tensors, grad):
    """Reference in float64 on the (already rounded) inputs: output and every input gradient."""
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad.double())
    return out.detach(), grads


def _tol(dtype):
    # the fp32 kernels sum K^2 (or 4P) terms in float32: a few ulps of the RMS
    return {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]


def check_sapa(case, dtype_name):
    from sapa.ops.window import reference as RW
    from sapa.ops.window import triton as TW

    _, B, D, C, H, W, s, K, Hq, Wq = case
    dt = DTYPES[dtype_name]
    q, k, v = _rand(B, D, Hq, Wq, dtype=dt), _rand(B, D, H, W, dtype=dt), _rand(B, C, H, W, dtype=dt)
    g = _rand(B, C, Hq, Wq, dtype=dt)
    ref, (dq, dk, dv) = _ref64(lambda q, k, v: RW.sapa(q, k, v, K, s), (q, k, v), g)
    variants = ["gather"] + (["dot"] if TW.dot_possible(q, v) else [])
    for var in variants:
        out, lse = TW.sapa_fwd(q, k, v, K, s, variant=var)
        assert_close(out, ref.to(dt), rtol=_tol(dt), what=f"sapa fwd [{var}]")
        if DRY and var != variants[-1]:
            continue  # the interpreter is slow: one backward is enough to keep the script alive
        got = TW.sapa_bwd(g, q, k, v, out, lse, K, s)
        for name, a, e in zip("qkv", got, (dq, dk, dv)):
            assert_close(a, e.to(dt), rtol=_tol(dt), what=f"d{name} [{var}]")
    assert_close(TW.sapa_fwd(q, k, v, K, s)[0], ref.to(dt), rtol=_tol(dt), what="sapa fwd [measured choice]")
    if case[0] in ("authors", "dry"):  # the dry run checks the GPU configs' logic in the interpreter
        _every_fwd_config(q, k, v, K, s, ref.to(dt), dt)


def _every_fwd_config(q, k, v, K, s, ref, dt):
    """Each autotune config of both fused forwards (the kernel tests otherwise run with
    SAPA_TRITON_AUTOTUNE=0, i.e. the first config only), launched directly."""
    import triton

    from sapa.ops.window import triton as TW

    B, D, Hq, Wq = q.shape
    C, H, W = v.shape[1:]
    space = [("gather", TW._sapa_fwd_kernel, TW._PIX_CHAN)]
    if TW.dot_possible(q, v):
        space.append(("dot", TW._sapa_fwd_dot_kernel, TW._DOT_SPACE))
    for name, kern, configs in space:
        for kw, warps in configs:
            out = torch.empty(B, C, Hq, Wq, device=v.device, dtype=v.dtype)
            lse = torch.empty(B, Hq, Wq, device=v.device, dtype=torch.float32)
            meta = dict(K=K, S=s, ACC=TW._acc(v.dtype), IDX=TW._idx(q, k, v, out), num_warps=warps, **kw)
            if name == "dot":
                meta.update(DOT_F32=TW.INTERPRET and v.dtype == torch.bfloat16, BLOCK_D=TW._np2(D, hi=128))
                grid = (triton.cdiv(Hq, kw["PH"]) * triton.cdiv(Wq, kw["PW"]), triton.cdiv(C, kw["BLOCK_C"]), B)
            else:
                meta.update(BLOCK_D=TW._np2(D, hi=64))
                grid = (triton.cdiv(Hq * Wq, kw["BLOCK_P"]), triton.cdiv(C, kw["BLOCK_C"]), B)
            kern.fn[grid](q, k, v, out, lse, D, C, H, W, Hq, Wq, *q.stride(), *k.stride(), *v.stride(),
                          *out.stride(), **meta)
            assert_close(out, ref, rtol=_tol(dt), what=f"sapa fwd [{name} {kw} warps {warps}]")


def check_similarity_reassemble(case, dtype_name):
    from sapa.ops.window import reference as RW
    from sapa.ops.window import triton as TW

    _, B, D, C, H, W, s, K, Hq, Wq = case
    dt = DTYPES[dtype_name]
    q, k = _rand(B, D, Hq, Wq, dtype=dt), _rand(B, D, H, W, dtype=dt)
    g = _rand(B, K * K, Hq, Wq, dtype=dt)
    ref, (dq, dk) = _ref64(lambda q, k: RW.window_similarity(q, k, K, s), (q, k), g)
    assert_close(TW.similarity_fwd(q, k, K, s), ref.to(dt), rtol=_tol(dt), what="similarity fwd")
    for name, a, e in zip("qk", TW.similarity_bwd(g, q, k, K, s), (dq, dk)):
        assert_close(a, e.to(dt), rtol=_tol(dt), what=f"similarity d{name}")
    for G in (1, 4) if C % 4 == 0 else (1,):
        w = torch.softmax(_rand(B, G, K * K, Hq, Wq).float(), 2).to(dt).view(B, G * K * K, Hq, Wq)
        v = _rand(B, C, H, W, dtype=dt)
        go = _rand(B, C, Hq, Wq, dtype=dt)
        ref, (dw, dv) = _ref64(lambda w, v: RW.reassemble(w, v, K, s, G), (w, v), go)
        assert_close(TW.reassemble_fwd(w, v, K, s, G), ref.to(dt), rtol=_tol(dt), what=f"reassemble G{G} fwd")
        for name, a, e in zip(("weights", "v"), TW.reassemble_bwd(go, w, v, K, s, G), (dw, dv)):
            assert_close(a, e.to(dt), rtol=_tol(dt), what=f"reassemble G{G} d{name}")


def check_deform(case, dtype_name):
    from sapa.ops.deform import reference as RD
    from sapa.ops.deform import triton as TD

    _, B, G, DG, CG, H, W, s, P, Hq, Wq = case
    dt = DTYPES[dtype_name]
    q, k, v = _rand(B, G * DG, Hq, Wq, dtype=dt), _rand(B, G * DG, H, W, dtype=dt), _rand(B, G * CG, H, W, dtype=dt)
    # offsets over the map and past its border, fractional parts away from the bilinear kinks
    frac = torch.rand(B, 2 * G * P, Hq, Wq) * 0.6 + 0.2
    off = (torch.randint(-3, 3, frac.shape).float() + frac).to(device=DEVICE, dtype=dt)
    g = _rand(B, G * CG, Hq, Wq, dtype=dt)
    ref, grads = _ref64(lambda q, k, v, o: RD.sapa_deform(q, k, v, o, P, G, s), (q, k, v, off), g)
    out, lse = TD.sapa_deform_fwd(q, k, v, off, P, G, s)
    assert_close(out, ref.to(dt), rtol=_tol(dt), what="sapa_deform fwd")
    got = TD.sapa_deform_bwd(g, q, k, v, off, out, lse, P, G, s)
    # the offset gradient of half-precision offsets: the corner weights themselves are rounded
    for name, a, e in zip(("q", "k", "v", "offset"), got, grads):
        rt = _tol(dt) * (4 if name == "offset" and dt != torch.float32 else 1)
        assert_close(a, e.to(dt), rtol=rt, what=f"sapa_deform d{name}")


def check_int64_sapa(_case, dtype_name):
    """An output of 2.15e9 elements (> 2**31): compare the bottom-right corner, where int32 offsets
    would wrap, with the reference on a crop (interior of the crop only: its top / left edges are
    not borders of the real map)."""
    from sapa.ops.window import reference as RW
    from sapa.ops.window import triton as TW

    dt = DTYPES[dtype_name]
    B, D, C, H, W, s, K, R = 1, 16, 64, 2900, 2900, 2, 5, 2
    if DRY:
        B, D, C, H, W = 1, 16, 16, 11, 11
    q, k, v = _rand(B, D, s * H, s * W, dtype=dt), _rand(B, D, H, W, dtype=dt), _rand(B, C, H, W, dtype=dt)
    assert DRY or B * C * s * s * H * W >= 2 ** 31  # the output needs int64 offsets
    h0, w0 = H - 10, W - 10
    qc, kc, vc = q[..., s * h0:, s * w0:], k[..., h0:, w0:], v[..., h0:, w0:]
    ref = RW.sapa(qc.double(), kc.double(), vc.double(), K, s)[..., s * R:, s * R:]
    TW.FORCE_INT64 = DRY  # small sizes: force the int64 kernels
    try:
        for var in ["gather"] + (["dot"] if TW.dot_possible(q, v) and not DRY else []):
            out, lse = TW.sapa_fwd(q, k, v, K, s, variant=var)
            assert_close(out[..., s * (h0 + R):, s * (w0 + R):], ref.to(dt), rtol=_tol(dt),
                         what=f"int64 fwd [{var}]")
            del out, lse
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    finally:
        TW.FORCE_INT64 = False


def _dtypes(case_name: str, dry_choice: str) -> list[str]:
    """fp32 and bf16 everywhere, fp16 at the K=5, s=2 cases: each (dtype, K, s) is one more compile of
    every kernel (~25 s on a GPU host), and the device check has 8 minutes."""
    if DRY:
        return [dry_choice]
    return ["fp32", "bf16"] + (["fp16"] if case_name in ("authors", "fpn-ceil") else [])


CASES = []
for c in (WINDOW_DRY if DRY else WINDOW_REAL):
    for dn in _dtypes(c[0], "bf16"):  # dry run: every check function once, tiny
        CASES.append((f"sapa-{c[0]}-{dn}", check_sapa, c, dn))
    for dn in _dtypes(c[0], "fp32"):
        CASES.append((f"simreas-{c[0]}-{dn}", check_similarity_reassemble, c, dn))
for c in (DEFORM_DRY if DRY else DEFORM_REAL):
    for dn in _dtypes("fpn-ceil", "fp32"):
        CASES.append((f"deform-{c[0]}-{dn}", check_deform, c, dn))
CASES.append(("int64-sapa-bf16", check_int64_sapa, None, "bf16"))

try:  # pytest collection (the default suite skips these without a GPU, unless in the dry run)
    import pytest

    _marks = [] if DRY else [pytest.mark.needs_cuda]

    @pytest.mark.parametrize("name,fn,case,dtype", [pytest.param(*c, id=c[0], marks=_marks) for c in CASES])
    def test_kernel_vs_reference(name, fn, case, dtype):
        if not DRY and not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        fn(case, dtype)
except ImportError:  # pragma: no cover - the device check runs without pytest
    pass


def main(out_path: str) -> int:
    if not DRY and not torch.cuda.is_available():
        print("no CUDA device: every case skipped", file=sys.stderr)
        recs = [{"name": n, "outcome": "skipped", "message": "no CUDA device"} for n, *_ in CASES]
    else:
        recs = []
        for name, fn, case, dt in CASES:
            torch.manual_seed(0)
            t0 = time.perf_counter()
            try:
                fn(case, dt)
                rec = {"name": name, "outcome": "passed"}
            except Exception as err:  # noqa: BLE001 - every failure is a record, the run goes on
                rec = {"name": name, "outcome": "failed", "message": f"{type(err).__name__}: {err}",
                       "traceback": traceback.format_exc()[-2000:]}
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            recs.append(rec)
            print(f"{rec['outcome']:<7} {rec['seconds']:7.2f} s  {name}"
                  + (f"  {rec['message'][:200]}" if rec["outcome"] == "failed" else ""), flush=True)
    with open(out_path, "a") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return 1 if any(r["outcome"] == "failed" for r in recs) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
