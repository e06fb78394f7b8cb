"""The cpu (Numba) backend of the window ops against the reference: forward and every gradient over
odd sizes, K 3/5/7, s 1-4, groups, ceil-mode guides, channels_last inputs, float64/float32/bfloat16;
several bands (threads), batch 0, 1x1 maps, logits of +-1e4, and the fused forward's memory."""
from __future__ import annotations

import pytest
import torch

from _compare import assert_close
from sapa import functional as Fn
from sapa.bench import PeakMemory

from ._cpu_helpers import DTYPES, compare_to_reference, leaves, run, threads


# (K, s, groups, low-res H x W, trim of the guide below s*H x s*W (ceil mode), channels C, d, B)
GRID = [
    pytest.param(3, 2, 1, (5, 7), (0, 0), 6, 3, 2, id="K3-s2-5x7"),
    pytest.param(5, 2, 2, (6, 5), (1, 1), 10, 4, 1, id="K5-s2-G2-6x5-ceil11x9"),
    pytest.param(7, 3, 4, (4, 5), (2, 1), 12, 5, 2, id="K7-s3-G4-4x5-ceil10x14"),
    pytest.param(5, 4, 1, (3, 3), (0, 3), 7, 2, 1, id="K5-s4-3x3-ceil12x9"),
    pytest.param(3, 3, 2, (7, 4), (1, 0), 6, 3, 3, id="K3-s3-G2-7x4-ceil20x12"),
    pytest.param(5, 1, 1, (4, 6), (0, 0), 5, 3, 1, id="K5-s1"),
    pytest.param(9, 2, 1, (3, 4), (0, 0), 3, 2, 1, id="K9-window-larger-than-map"),
]


def _inputs(K, s, G, hw, trim, C, d, B, dtype=torch.float64):
    H, W = hw
    Hq, Wq = s * H - trim[0], s * W - trim[1]
    q, k = torch.randn(B, d, Hq, Wq), torch.randn(B, d, H, W)
    v = torch.randn(B, C, H, W)
    w = torch.softmax(torch.randn(B, G, K * K, Hq, Wq), dim=2).view(B, G * K * K, Hq, Wq)
    return [t.to(dtype) for t in (q, k, v, w)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K, s, G, hw, trim, C, d, B", GRID)
def test_window_ops_match_reference(K, s, G, hw, trim, C, d, B, dtype):
    q, k, v, w = _inputs(K, s, G, hw, trim, C, d, B, dtype)
    compare_to_reference("window_similarity", (q, k), dict(kernel_size=K, scale_factor=s))
    compare_to_reference("reassemble", (w, v), dict(kernel_size=K, scale_factor=s, groups=G))
    compare_to_reference("sapa", (q, k, v), dict(kernel_size=K, scale_factor=s))


@pytest.mark.parametrize("K, s, G, hw, trim, C, d, B", GRID[:3])
def test_channels_last_inputs(K, s, G, hw, trim, C, d, B):
    q, k, v, w = _inputs(K, s, G, hw, trim, C, d, B, torch.float32)
    ql, kl, vl, wl = leaves((q, k, v, w), channels_last=True)
    assert vl.is_contiguous(memory_format=torch.channels_last) and not vl.is_contiguous()
    for op, args, kw in (("sapa", (ql, kl, vl), dict(kernel_size=K, scale_factor=s)),
                         ("reassemble", (wl, vl), dict(kernel_size=K, scale_factor=s, groups=G)),
                         ("window_similarity", (ql, kl), dict(kernel_size=K, scale_factor=s))):
        out, grads = compare_to_reference(op, args, kw, what="channels_last")
        assert out.is_contiguous()


@pytest.mark.parametrize("nthreads", [2, 3, 5])
def test_bands_and_halos_are_exact(nthreads):
    """Several bands split an image's rows: the halo rows each band recomputes must make dk/dv exactly
    what one band gives (bitwise: the accumulation order does not depend on the bands)."""
    q, k, v, w = _inputs(5, 2, 2, (9, 6), (1, 0), 8, 4, 1, torch.float64)
    res = {}
    for n in (1, nthreads):
        with threads(n):
            res[n] = [run(op, args, kw, "cpu") for op, args, kw in (
                ("sapa", (q, k, v), dict(kernel_size=5, scale_factor=2)),
                ("reassemble", (w, v), dict(kernel_size=5, scale_factor=2, groups=2)),
                ("window_similarity", (q, k), dict(kernel_size=5, scale_factor=2)))]
    for (o1, g1), (on, gn) in zip(res[1], res[nthreads]):
        assert torch.equal(o1, on)
        for a, b in zip(g1, gn):
            assert torch.equal(a, b)
    with threads(nthreads):
        compare_to_reference("sapa", (q, k, v), dict(kernel_size=5, scale_factor=2), what="bands")


def test_half_precision_is_computed_in_float32():
    q, k, v, _ = _inputs(5, 2, 1, (4, 5), (0, 0), 6, 3, 2, torch.float32)
    ref = Fn.sapa(q, k, v, 5, 2, backend="cpu")
    for dt in (torch.float16, torch.bfloat16):
        out = Fn.sapa(q.to(dt), k.to(dt), v.to(dt), 5, 2, backend="cpu")
        assert out.dtype == dt
        # same rounding of the inputs, float32 arithmetic: close to the float32 result of rounded inputs
        exp = Fn.sapa(q.to(dt).float(), k.to(dt).float(), v.to(dt).float(), 5, 2, backend="cpu").to(dt)
        assert_close(out, exp)
        assert_close(out.float(), ref, rtol=3e-2, atol=1e-2)


def test_batch_zero_and_one_by_one_maps():
    for B, hw, hq in ((0, (4, 5), (8, 10)), (1, (1, 1), (2, 2)), (2, (1, 1), (1, 1)), (1, (1, 3), (2, 5))):
        q, k, v = torch.randn(B, 3, *hq), torch.randn(B, 3, *hw), torch.randn(B, 4, *hw)
        w = torch.randn(B, 9, *hq)
        compare_to_reference("sapa", (q, k, v), dict(kernel_size=3, scale_factor=2), what=f"B{B} {hw}")
        compare_to_reference("reassemble", (w, v), dict(kernel_size=3, scale_factor=2), what=f"B{B} {hw}")
        compare_to_reference("window_similarity", (q, k), dict(kernel_size=3, scale_factor=2))
        out = Fn.sapa(q, k, v, 3, 2, backend="cpu")
        assert out.shape == (B, 4, *hq)


def test_constant_field_border_value():
    """docs/SEMANTICS.md §1.1: a constant 3.0 field stays 3.0 inside and shrinks at the border (out-of-range
    positions keep logit 0 and value 0); with zero queries a corner keeps 4 of 9 weights."""
    v = torch.full((1, 2, 5, 5), 3.0, dtype=torch.float64)
    q = torch.zeros(1, 1, 10, 10, dtype=torch.float64)
    k = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    out = Fn.sapa(q, k, v, 3, 2, backend="cpu")
    assert torch.allclose(out[0, :, 4:6, 4:6], torch.tensor(3.0, dtype=torch.float64))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(3.0 * 4 / 9, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logits_of_1e4_are_stable(dtype):
    """Logits up to +-1e4: no inf/NaN, and as accurate as the reference. In float32 a logit of 1e4
    carries a rounding error of ~1e-3, so both backends are compared with the float64 result and
    the cpu error may not exceed 3x the reference's (+1e-4 relative)."""
    q, k, v, _ = _inputs(5, 2, 1, (5, 6), (1, 0), 6, 4, 2, torch.float64)
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    for scale in (1e4, -1e4):
        qs, ks = qn * 100.0, kn * (scale / 100.0)  # |logit| up to 1e4
        assert Fn.window_similarity(qs, ks, 5, 2, backend="cpu").abs().max() > 5e3
        args, kw = (qs, ks, v), dict(kernel_size=5, scale_factor=2)
        truth = run("sapa", args, kw, "reference")
        if dtype == torch.float64:
            out, grads = compare_to_reference("sapa", args, kw, what=f"logits {scale:g}")
        else:
            low = [a.to(dtype) for a in args]
            res = {b: run("sapa", low, kw, b) for b in ("cpu", "reference")}
            out, grads = res["cpu"]
            for i, (t, c, r) in enumerate(zip([truth[0], *truth[1]], [res["cpu"][0], *res["cpu"][1]],
                                               [res["reference"][0], *res["reference"][1]])):
                err_c = (c.double() - t).pow(2).mean().sqrt().item()
                err_r = (r.double() - t).pow(2).mean().sqrt().item()
                assert err_c <= 3 * err_r + 1e-4 * t.pow(2).mean().sqrt().item(), (i, err_c, err_r)
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(g).all() for g in grads)


def test_nan_propagates_like_the_reference():
    q, k, v, _ = _inputs(3, 2, 1, (4, 4), (0, 0), 3, 2, 1)
    v[0, 0, 1, 1] = float("nan")
    out = Fn.sapa(q, k, v, 3, 2, backend="cpu")
    ref = Fn.sapa(q, k, v, 3, 2, backend="reference")
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out).any()


@pytest.fixture(scope="module")
def rss():
    pm = PeakMemory()
    if not pm.available:
        pytest.skip("peak memory needs /proc/self/clear_refs (Linux)")
    return pm


def _peak(fn) -> int:
    with PeakMemory() as pm:
        fn()
    return pm.peak_bytes


def test_fused_forward_allocates_nothing_proportional_to_k2(rss):
    """The fused forward's extra memory is the output and lse, whatever K: going from K=3 to K=9
    adds 72*C*H*W floats (16 MB here) to the unfolded reference, and nothing to the fused one."""
    B, C, H, W, d = 1, 64, 32, 32, 8
    q, k, v = torch.randn(B, d, 2 * H, 2 * W), torch.randn(B, d, H, W), torch.randn(B, C, H, W)
    out_bytes = B * C * 4 * H * W * 4
    unfold_step = (81 - 9) * C * H * W * 4
    with torch.no_grad(), threads(1):
        for K in (3, 9):  # warm up (compile / load the kernels) before measuring
            Fn.sapa(q, k, v, K, 2, backend="cpu")
        fused = {K: min(_peak(lambda: Fn.sapa(q, k, v, K, 2, backend="cpu")) for _ in range(3)) for K in (3, 9)}
        ref = {K: _peak(lambda: Fn.sapa(q, k, v, K, 2, backend="reference")) for K in (3, 9)}
    # the measurement sees the unfolded tensor when it exists ...
    assert ref[9] - ref[3] > 0.5 * unfold_step, (ref, unfold_step)
    # ... and the fused op allocates the output (+ lse, + per-thread row buffers) only
    assert abs(fused[9] - fused[3]) < 0.1 * unfold_step, (fused, unfold_step)
    assert fused[9] < 1.5 * out_bytes + (1 << 20), (fused, out_bytes)


def test_fused_backward_has_no_k2_workspace(rss):
    B, C, H, W, d = 1, 64, 32, 32, 8
    q, k, v = leaves((torch.randn(B, d, 2 * H, 2 * W), torch.randn(B, d, H, W), torch.randn(B, C, H, W)))
    g = torch.randn(B, C, 2 * H, 2 * W)
    with threads(1):
        peaks = {}
        for K in (3, 9):
            out = Fn.sapa(q, k, v, K, 2, backend="cpu")
            out.backward(g)
            out = Fn.sapa(q, k, v, K, 2, backend="cpu")
            peaks[K] = _peak(lambda: out.backward(g, retain_graph=True))
    grads_bytes = (q.numel() + k.numel() + v.numel()) * 4
    assert abs(peaks[9] - peaks[3]) < 2 * (1 << 20), peaks
    assert peaks[9] < 2 * grads_bytes + (2 << 20), (peaks, grads_bytes)
