"""Triton kernels (GPU backend) against the reference, run on CPU under TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when a kernel is decorated, so the flag is set here at collection,
before anything imports sapa.ops.*.triton. Shapes are tiny: the interpreter is slow.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from sapa.ops.deform import reference as RD  # noqa: E402
from sapa.ops.window import reference as RW  # noqa: E402

from _compare import assert_close  # noqa: E402

pytestmark = pytest.mark.needs_triton

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _tw():
    from sapa.ops.window import triton as TW
    return TW


def _td():
    from sapa.ops.deform import triton as TD
    return TD


def _rand(*shape, dtype=torch.float64, cl=False):
    t = torch.randn(*shape, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    return t.to(memory_format=torch.channels_last) if cl else t


# (B, D, C, H, W, s, K, H', W'); odd sizes, ceil-mode guides, K 3/5/7, s 2/3/4
WINDOW_CASES = [
    pytest.param(2, 5, 7, 4, 5, 2, 3, 8, 10, id="B2-K3-s2"),
    pytest.param(1, 3, 6, 3, 4, 3, 5, 8, 12, id="B1-K5-s3-ceilH"),
    pytest.param(2, 4, 4, 5, 3, 2, 5, 9, 5, id="B2-K5-s2-ceil"),
    pytest.param(1, 2, 3, 3, 3, 4, 7, 12, 10, id="B1-K7-s4-ceilW"),
]


@pytest.mark.parametrize("B,D,C,H,W,s,K,Hq,Wq", WINDOW_CASES)
def test_sapa_fused_matches_reference_fp64(B, D, C, H, W, s, K, Hq, Wq):
    TW = _tw()
    q = _rand(B, D, Hq, Wq).requires_grad_()
    k = _rand(B, D, H, W).requires_grad_()
    v = _rand(B, C, H, W).requires_grad_()
    ref = RW.sapa(q, k, v, K, s)
    out, lse = TW.sapa_fwd(q.detach(), k.detach(), v.detach(), K, s)
    assert_close(out, ref, what="sapa fwd")
    # lse is the log-sum-exp of the logits, out-of-range positions counted as logit 0
    assert_close(lse, torch.logsumexp(RW.window_similarity(q, k, K, s), dim=1).detach(), what="lse")
    g = _rand(*ref.shape)
    expected = torch.autograd.grad(ref, (q, k, v), g)
    got = TW.sapa_bwd(g, q.detach(), k.detach(), v.detach(), out, lse, K, s)
    for name, a, e in zip("qkv", got, expected):
        assert_close(a, e, what=f"d{name}")


@pytest.mark.parametrize("B,D,C,H,W,s,K,Hq,Wq", WINDOW_CASES[:3])
def test_similarity_matches_reference_fp64(B, D, C, H, W, s, K, Hq, Wq):
    TW = _tw()
    q = _rand(B, D, Hq, Wq).requires_grad_()
    k = _rand(B, D, H, W).requires_grad_()
    ref = RW.window_similarity(q, k, K, s)
    assert_close(TW.similarity_fwd(q.detach(), k.detach(), K, s), ref, what="similarity")
    g = _rand(*ref.shape)
    dq, dk = torch.autograd.grad(ref, (q, k), g)
    tq, tk = TW.similarity_bwd(g, q.detach(), k.detach(), K, s)
    assert_close(tq, dq, what="dq")
    assert_close(tk, dk, what="dk")


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_reassemble_groups_matches_reference_fp64(groups):
    TW = _tw()
    B, C, H, W, s, K, Hq, Wq = 2, 8, 4, 5, 2, 3, 7, 10
    w = _rand(B, groups * K * K, Hq, Wq).requires_grad_()
    v = _rand(B, C, H, W).requires_grad_()
    ref = RW.reassemble(w, v, K, s, groups)
    assert_close(TW.reassemble_fwd(w.detach(), v.detach(), K, s, groups), ref, what="reassemble")
    g = _rand(*ref.shape)
    dw, dv = torch.autograd.grad(ref, (w, v), g)
    tw, tv = TW.reassemble_bwd(g, w.detach(), v.detach(), K, s, groups)
    assert_close(tw, dw, what="dweights")
    assert_close(tv, dv, what="dv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sapa_fused_low_precision_channels_last(dtype):
    TW = _tw()
    B, D, C, H, W, s, K = 1, 8, 6, 5, 4, 2, 5
    q, k, v = _rand(B, D, 10, 8, dtype=dtype, cl=True), _rand(B, D, H, W, dtype=dtype, cl=True), \
        _rand(B, C, H, W, dtype=dtype, cl=True)
    out, lse = TW.sapa_fwd(q, k, v, K, s)
    assert out.dtype == dtype
    ref = RW.sapa(q.double(), k.double(), v.double(), K, s)
    assert_close(out, ref.to(dtype), what="fwd")
    g = _rand(*ref.shape, dtype=dtype)
    got = TW.sapa_bwd(g, q, k, v, out, lse, K, s)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    expected = torch.autograd.grad(RW.sapa(qd, kd, vd, K, s), (qd, kd, vd), g.double())
    for name, a, e in zip("qkv", got, expected):
        assert a.dtype == dtype
        assert_close(a, e.to(dtype), what=f"d{name}")


def test_sapa_fused_large_logits_stay_finite():
    TW = _tw()
    q = _rand(1, 4, 6, 6, dtype=torch.float32) * 100
    k = _rand(1, 4, 3, 3, dtype=torch.float32) * 100  # logits ~ +-1e4
    v = _rand(1, 3, 3, 3, dtype=torch.float32)
    out, lse = TW.sapa_fwd(q, k, v, 3, 2)
    ref = RW.sapa(q.double(), k.double(), v.double(), 3, 2)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_close(out, ref.float(), rtol=1e-4, what="fwd at +-1e4 logits")


# (B, G, d per group, C per group, H, W, s, P, H', W')
DEFORM_CASES = [
    pytest.param(2, 2, 3, 2, 4, 5, 2, 3, 8, 10, id="G2-P3-s2"),
    pytest.param(1, 1, 4, 3, 3, 4, 3, 2, 8, 12, id="G1-P2-s3-ceil"),
    pytest.param(2, 4, 2, 1, 5, 3, 2, 5, 9, 5, id="G4-P5-s2-ceil"),
]


@pytest.mark.parametrize("B,G,DG,CG,H,W,s,P,Hq,Wq", DEFORM_CASES)
def test_sapa_deform_fused_matches_reference_fp64(B, G, DG, CG, H, W, s, P, Hq, Wq):
    TD = _td()
    q = _rand(B, G * DG, Hq, Wq).requires_grad_()
    k = _rand(B, G * DG, H, W).requires_grad_()
    v = _rand(B, G * CG, H, W).requires_grad_()
    # offsets spread over the map and beyond the border, fractional parts away from 0 (the bilinear
    # kink) so the offset gradient is well defined
    base = torch.rand(B, 2 * G * P, Hq, Wq, dtype=torch.float64) * 0.6 + 0.2
    off = (torch.randint(-3, 3, base.shape, dtype=torch.float64) + base).to(DEVICE).requires_grad_()
    ref = RD.sapa_deform(q, k, v, off, P, G, s)
    out, lse = TD.sapa_deform_fwd(q.detach(), k.detach(), v.detach(), off.detach(), P, G, s)
    assert_close(out, ref, what="fwd")
    g = _rand(*ref.shape)
    expected = torch.autograd.grad(ref, (q, k, v, off), g)
    got = TD.sapa_deform_bwd(g, q.detach(), k.detach(), v.detach(), off.detach(), out, lse, P, G, s)
    for name, a, e in zip(("q", "k", "v", "offset"), got, expected):
        assert_close(a, e, what=f"d{name}")


def test_sapa_deform_zero_offsets_is_nearest():
    TD = _td()
    v = _rand(1, 8, 3, 4, dtype=torch.float32)
    out, _ = TD.sapa_deform_fwd(_rand(1, 8, 6, 8, dtype=torch.float32), _rand(1, 8, 3, 4, dtype=torch.float32),
                                v, torch.zeros(1, 2 * 4 * 9, 6, 8, device=DEVICE), 9, 4, 2)
    nearest = v.repeat_interleave(2, -2).repeat_interleave(2, -1)
    assert_close(out, nearest, what="zero offsets")


def test_batch_zero():
    TW, TD = _tw(), _td()
    q, k, v = _rand(0, 4, 6, 6), _rand(0, 4, 3, 3), _rand(0, 5, 3, 3)
    out, lse = TW.sapa_fwd(q, k, v, 3, 2)
    assert out.shape == (0, 5, 6, 6)
    assert all(t.shape[0] == 0 for t in TW.sapa_bwd(torch.zeros_like(out), q, k, v, out, lse, 3, 2))
    off = torch.zeros(0, 2 * 2 * 3, 6, 6, dtype=torch.float64, device=DEVICE)
    out, lse = TD.sapa_deform_fwd(q, k, _rand(0, 4, 3, 3), off, 3, 2, 2)
    assert out.shape == (0, 4, 6, 6)


# ---- through sapa.functional(backend="triton"): custom ops, autograd, opcheck


def _window_inputs():
    q = _rand(1, 4, 7, 8).requires_grad_()
    k = _rand(1, 4, 4, 4).requires_grad_()
    v = _rand(1, 6, 4, 4).requires_grad_()
    return q, k, v


def test_functional_triton_backend_gradcheck_sapa():
    from sapa import functional as F
    q, k, v = _window_inputs()
    # fast_mode: a few random-direction evaluations instead of one per input element (the
    # interpreter takes a fraction of a second per launch)
    assert torch.autograd.gradcheck(lambda q, k, v: F.sapa(q, k, v, 3, 2, backend="triton"), (q, k, v),
                                    fast_mode=True)


def test_functional_triton_backend_gradcheck_sapa_deform():
    from sapa import functional as F
    q, k, v = _window_inputs()
    frac = torch.rand(1, 2 * 2 * 3, 7, 8, dtype=torch.float64) * 0.6 + 0.2
    off = (torch.randint(-2, 2, frac.shape, dtype=torch.float64) + frac).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, k, v, o: F.sapa_deform(q, k, v, o, 3, 2, 2, backend="triton"), (q, k, v, off), fast_mode=True)


def test_functional_triton_backend_matches_reference_similarity_and_reassemble():
    from sapa import functional as F
    q, k, v = _window_inputs()
    w = _rand(1, 2 * 9, 7, 8).requires_grad_()
    for fn, args in ((F.window_similarity, (q, k, 3, 2)), (F.reassemble, (w, v, 3, 2, 2))):
        a, r = fn(*args, backend="triton"), fn(*args, backend="reference")
        assert_close(a, r, what=fn.__name__)
        leaves = [t for t in args if isinstance(t, torch.Tensor)]
        g = _rand(*a.shape)
        for ga, gr in zip(torch.autograd.grad(a, leaves, g), torch.autograd.grad(r, leaves, g)):
            assert_close(ga, gr, what=f"{fn.__name__} grad")


def test_triton_backend_declines_unfused_deform_ops_with_reason():
    from sapa import functional as F
    q, k, v = _window_inputs()
    with pytest.raises(RuntimeError, match="no triton implementation of deform_similarity"):
        F.deform_similarity(q, k, torch.zeros(1, 12, 7, 8, dtype=torch.float64), 3, 2, 2, backend="triton")


@pytest.mark.parametrize("name", ["sapa_fwd_triton", "window_similarity_fwd_triton", "reassemble_fwd_triton",
                                  "sapa_deform_fwd_triton"])
def test_triton_custom_ops_pass_opcheck(name):
    import sapa.ops.deform.op  # noqa: F401  (registers the ops)
    import sapa.ops.window.op  # noqa: F401
    q, k, v = (t.detach() for t in _window_inputs())
    args = {
        "sapa_fwd_triton": (q, k, v, 3, 2),
        "window_similarity_fwd_triton": (q, k, 3, 2),
        "reassemble_fwd_triton": (_rand(1, 2 * 9, 7, 8), v, 3, 2, 2),
        "sapa_deform_fwd_triton": (q, k, v, _rand(1, 12, 7, 8), 3, 2, 2),
    }[name]
    torch.library.opcheck(getattr(torch.ops.sapa, name).default, args)


# ---- half precision (both fused-forward variants), int64 indices, autotune configs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sapa_fused_half_precision_both_variants(dtype):
    """fp16 / bf16 in, float32 accumulation, input dtype out; the tensor-core (tl.dot) forward and the
    gather forward against the float64 reference of the same rounded inputs; then the backward."""
    TW = _tw()
    B, D, C, H, W, s, K, Hq, Wq = 1, 16, 16, 3, 5, 2, 3, 6, 9  # tl.dot needs 16-wide operands
    q, k, v = _rand(B, D, Hq, Wq, dtype=dtype), _rand(B, D, H, W, dtype=dtype), _rand(B, C, H, W, dtype=dtype)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref = RW.sapa(qd, kd, vd, K, s)
    assert TW.dot_possible(q, v) and not TW.dot_possible(q.float(), v.float())
    for variant in ("gather", "dot"):
        out, lse = TW.sapa_fwd(q, k, v, K, s, variant=variant)
        assert out.dtype == dtype and lse.dtype == torch.float32
        assert_close(out, ref.detach().to(dtype), what=f"fwd [{variant}]")
        assert_close(lse, torch.logsumexp(RW.window_similarity(qd, kd, K, s), 1).detach().float(),
                     rtol=1e-4, what=f"lse [{variant}]")
    g = _rand(*ref.shape, dtype=dtype)
    expected = torch.autograd.grad(ref, (qd, kd, vd), g.double())
    for name, a, e in zip("qkv", TW.sapa_bwd(g, q, k, v, out, lse, K, s), expected):
        assert a.dtype == dtype
        assert_close(a, e.to(dtype), what=f"d{name}")


def test_dot_variant_refuses_what_it_cannot_run():
    TW = _tw()
    q, k, v = _rand(1, 16, 6, 6, dtype=torch.float32), _rand(1, 16, 3, 3, dtype=torch.float32), \
        _rand(1, 16, 3, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="variant 'dot' needs fp16/bf16"):
        TW.sapa_fwd(q, k, v, 3, 2, variant="dot")


def test_int64_index_choice():
    TW = _tw()
    meta = dict(device="meta")
    assert TW._idx(torch.empty(2 ** 30, **meta)) is triton.language.int32
    assert TW._idx(torch.empty(2 ** 31, **meta)) is triton.language.int64
    # a small view whose strides reach past 2**31 elements
    assert TW._idx(torch.empty_strided((2, 2), (2 ** 31, 1), **meta)) is triton.language.int64
    assert TW._idx(torch.empty(3, **meta), None) is triton.language.int32


def test_int64_kernels_give_the_int32_results(monkeypatch):
    """Every launcher with int64 offsets forced equals its int32 run bit for bit (the index type only
    changes address arithmetic)."""
    TW, TD = _tw(), _td()
    f32 = torch.float32
    q, k, v = _rand(1, 16, 7, 9, dtype=f32), _rand(1, 16, 4, 5, dtype=f32), _rand(1, 16, 4, 5, dtype=f32)
    qh, kh, vh = (t.to(torch.bfloat16) for t in (q, k, v))
    w = torch.softmax(_rand(1, 2, 9, 7, 9, dtype=f32), 2).view(1, 18, 7, 9)
    off = _rand(1, 2 * 2 * 3, 7, 9, dtype=f32) * 2
    g = _rand(1, 16, 7, 9, dtype=f32)

    def run_all():
        out, lse = TW.sapa_fwd(q, k, v, 3, 2, variant="gather")
        res = [out, lse, *TW.sapa_bwd(g, q, k, v, out, lse, 3, 2)]
        res += list(TW.sapa_fwd(qh, kh, vh, 3, 2, variant="dot"))
        res += [TW.similarity_fwd(q, k, 3, 2), *TW.similarity_bwd(_rand(1, 9, 7, 9, dtype=f32), q, k, 3, 2)]
        res += [TW.reassemble_fwd(w, v, 3, 2, 2), *TW.reassemble_bwd(g, w, v, 3, 2, 2)]
        o, ls = TD.sapa_deform_fwd(q, k, v, off, 3, 2, 2)
        res += [o, ls, *TD.sapa_deform_bwd(g, q, k, v, off, o, ls, 3, 2, 2)]
        return res

    torch.manual_seed(1)
    base = run_all()
    monkeypatch.setattr(TW, "FORCE_INT64", True)
    torch.manual_seed(1)
    wide = run_all()
    for i, (a, b) in enumerate(zip(base, wide)):
        assert torch.equal(a, b), f"result {i} differs with int64 indices"


def test_autotune_space_outside_the_interpreter(monkeypatch):
    TW = _tw()
    assert len(TW._configs(TW._PIX_CHAN, TW._I_PC)) == 1  # interpreter: one config, no timing
    monkeypatch.setattr(TW, "INTERPRET", False)
    cfgs = TW._configs(TW._PIX_CHAN, {"BLOCK_P": 32})
    assert [(c.kwargs["BLOCK_P"], c.kwargs["BLOCK_C"], c.num_warps) for c in cfgs] == \
        [(64, 64, 4), (128, 64, 8)]
