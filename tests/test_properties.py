"""The properties of docs/SEMANTICS.md §3 (items 1-10) as tests, with the border caveats stated there, and the
hand-computed border cases of docs/SEMANTICS.md §1.1. Expected values come from formulas written out here, never
from the code under test.

Functional tests run on the reference backend and on whatever backend is chosen automatically
("auto": a fast CPU backend once one is registered), so they hold for every implementation.
"""
from __future__ import annotations

import math

import pytest
import torch

import sapa
from _compare import assert_close
from sapa import functional as F

F64 = torch.float64
BACKENDS = [pytest.param("reference", id="reference"), pytest.param(None, id="auto")]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def nearest(t: torch.Tensor, s: int) -> torch.Tensor:
    return t.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)


def n_in_range(c: int, size: int, K: int) -> int:
    """How many of the K window rows (or columns) around low-res c lie inside [0, size)."""
    r = K // 2
    return sum(1 for d in range(-r, r + 1) if 0 <= c + d < size)


def randomise(module: torch.nn.Module, std: float = 0.5) -> torch.nn.Module:
    """Random parameters (init is near zero: logits would be near zero and every test trivial)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


# window modules and their options
WINDOW_MODULES = [
    pytest.param("sapa_i", {}, id="sapa_i"),
    pytest.param("sapa_i", {"norm": "layer"}, id="sapa_i-layer"),
    pytest.param("sapa_i", {"norm": "group"}, id="sapa_i-group"),
    pytest.param("sapa_b", {}, id="sapa_b-journal"),
    pytest.param("sapa_b", {"version": "neurips"}, id="sapa_b-neurips"),
    pytest.param("sapa_g", {}, id="sapa_g"),
]


# ---------------------------------------------------------------------------------------------
# 1. smoothness / encoder-noise blocking
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_1_constant_window_blocks_noise(backend, dtype):
    """Interior low-res point whose K x K window holds one (key, value) u: x' = u on its s x s block,
    whatever the (large, noisy) queries are."""
    K, s, C = 5, 2, 3
    x = torch.randn(1, C, 7, 8, dtype=dtype)
    u = torch.randn(C, dtype=dtype)
    ci, cj = 3, 4
    x[0, :, ci - 2:ci + 3, cj - 2:cj + 3] = u[:, None, None]
    y = 30 * torch.randn(1, C, 14, 16, dtype=dtype)
    out = F.sapa(y, x, x, K, s, backend=backend)
    block = out[0, :, s * ci:s * ci + s, s * cj:s * cj + s]
    assert_close(block, u[:, None, None].expand_as(block))
    # the neighbour cell's window is not constant: its output is not u (the check has teeth)
    assert (out[0, :, s * ci, s * (cj + 1)] - u).abs().max() > 1e-3


def test_1_border_shrinkage_formula(backend):
    """Whole constant field u (keys = values = u): x'_l = u * n_in e^a / (n_in e^a + n_out),
    a = <q_l, u>, at every point (n_out = 0 inside: x' = u)."""
    K, s, C, H, W = 5, 2, 3, 4, 6
    u = torch.randn(C, dtype=F64)
    x = u.view(1, C, 1, 1).expand(1, C, H, W).contiguous()
    q = torch.randn(1, C, s * H, s * W, dtype=F64)
    out = F.sapa(q, x, x, K, s, backend=backend)
    expected = torch.empty_like(out)
    for i in range(s * H):
        for j in range(s * W):
            a = float((q[0, :, i, j] * u).sum())
            n_in = n_in_range(i // s, H, K) * n_in_range(j // s, W, K)
            n_out = K * K - n_in
            expected[0, :, i, j] = u * (n_in * math.exp(a) / (n_in * math.exp(a) + n_out))
    assert_close(out, expected)


@pytest.mark.parametrize("name, kw", WINDOW_MODULES)
def test_1_modules_constant_patch(name, kw):
    """Modules: a constant patch of x in the window (random x elsewhere, random guide, random
    parameters) gives x' = the patch value at interior points. Per-pixel norms keep the patch
    constant; GroupNorm (per image statistics, then one affine map per channel) does too."""
    C, K, s = 32, 5, 2
    up = randomise(sapa.build_upsampler(name, C, **kw)).eval()
    x = torch.randn(2, C, 7, 7)
    u = torch.randn(C)
    x[:, :, 1:6, 1:6] = u[:, None, None]
    guide = 5 * torch.randn(2, C, 14, 14)
    with torch.no_grad():
        out = up(x, guide)
    block = out[:, :, 6:8, 6:8]  # low-res (3, 3): window rows / cols 1..5
    assert_close(block, u[None, :, None, None].expand_as(block))


@pytest.mark.parametrize("name, kw", WINDOW_MODULES)
def test_1_modules_constant_image(name, kw):
    """The GroupNorm caveat of docs/SEMANTICS.md §3.1 (journal SAPA-B): a whole constant image is constant after
    any normalisation; interior points give exactly the constant, border points are shrunk."""
    C, K, s = 32, 5, 2
    # moderate logits, so that the border shrinkage is visible in float32
    up = randomise(sapa.build_upsampler(name, C, **kw), std=0.05).eval()
    u = torch.randn(C)
    x = u.view(1, C, 1, 1).expand(1, C, 6, 6).contiguous()
    with torch.no_grad():
        out = up(x, 0.05 * torch.randn(1, C, 12, 12))
    inner = out[:, :, 4:8, 4:8]  # low-res 2..3: full 5 x 5 window
    assert_close(inner, u[None, :, None, None].expand_as(inner))
    corner = out[0, :, 0, 0]
    # at the corner only 9 of 25 window positions are in range: a factor in (0, 1) of u
    ratio = corner / u
    assert torch.all(ratio < 1 - 1e-4) and torch.all(ratio > 0)
    assert_close(ratio, ratio.mean().expand_as(ratio))  # one common factor for every channel


def test_hand_corner_constant_field_zero_keys(backend):
    """docs/SEMANTICS.md §1.1 by hand: value field 3.0, zero keys -> every logit 0, uniform 1/K^2 weights over the
    whole window including out-of-range positions (value 0): x' = 3 * n_in / K^2."""
    q = torch.randn(1, 4, 10, 12, dtype=F64)
    k = torch.zeros(1, 4, 5, 6, dtype=F64)
    v = torch.full((1, 2, 5, 6), 3.0, dtype=F64)
    out = F.sapa(q, k, v, 5, 2, backend=backend)
    # K = 5: corner 9/25*3, top edge middle 15/25*3, one in from the corner 16/25*3, interior 3
    assert out[0, 0, 0, 0].item() == pytest.approx(1.08, abs=1e-12)
    assert out[0, 1, 9, 11].item() == pytest.approx(1.08, abs=1e-12)
    assert out[0, 0, 1, 5].item() == pytest.approx(1.8, abs=1e-12)
    assert out[0, 0, 2, 2].item() == pytest.approx(1.92, abs=1e-12)
    assert out[0, 0, 5, 5].item() == pytest.approx(3.0, abs=1e-12)
    out3 = F.sapa(q, k, v, 3, 2, backend=backend)
    assert out3[0, 0, 0, 0].item() == pytest.approx(4 / 3, abs=1e-12)  # 4/9*3
    assert out3[0, 0, 0, 5].item() == pytest.approx(2.0, abs=1e-12)  # 6/9*3


def test_hand_corner_constant_field_random_queries(backend):
    """docs/SEMANTICS.md §1.1: constant 3.0 field as keys and values (SAPA-I), random queries: 3.0 inside and
    3 * 9 e^a / (9 e^a + 16) at a corner (K = 5), a = <q, (3, 3, 3, 3)> = 3 * sum(q) — e.g. ~2.54
    for a ~ 2.28. Two queries chosen by hand: a = ln(16/9) gives exactly 1.5, a = ln(64/9) 2.4."""
    C = 4
    x = torch.full((1, C, 5, 6), 3.0, dtype=F64)
    q = torch.rand(1, C, 10, 12, dtype=F64)  # positive: a > 0, the corner is shrunk less than 9/25
    q[0, :, 0, 0] = math.log(16 / 9) / (3 * C)
    q[0, :, 9, 11] = math.log(64 / 9) / (3 * C)
    out = F.sapa(q, x, x, 5, 2, backend=backend)
    assert out[0, 0, 0, 0].item() == pytest.approx(1.5, abs=1e-12)
    assert out[0, 2, 9, 11].item() == pytest.approx(2.4, abs=1e-12)
    for i, j in [(0, 11), (9, 0), (1, 1), (8, 10)]:  # the other corners
        a = 3.0 * q[0, :, i, j].sum().item()
        expected = 3.0 * 9 * math.exp(a) / (9 * math.exp(a) + 16)
        assert out[0, 1, i, j].item() == pytest.approx(expected, abs=1e-12)
    assert_close(out[:, :, 4:6, 4:8], torch.full((1, C, 2, 4), 3.0, dtype=F64))


# ---------------------------------------------------------------------------------------------
# 2. convexity
# ---------------------------------------------------------------------------------------------

def test_2_convex_hull(backend):
    """Every output channel lies between the min and max of the in-range window values (interior),
    or of the in-range values and 0 (border)."""
    K, s, H, W = 3, 2, 4, 5
    q = 3 * torch.randn(2, 3, s * H, s * W, dtype=F64)
    k, v = torch.randn(2, 3, H, W, dtype=F64), torch.randn(2, 4, H, W, dtype=F64)
    out = F.sapa(q, k, v, K, s, backend=backend)
    r = K // 2
    for i in range(s * H):
        for j in range(s * W):
            y0, x0 = i // s, j // s
            win = v[:, :, max(y0 - r, 0):y0 + r + 1, max(x0 - r, 0):x0 + r + 1].flatten(2)
            lo, hi = win.min(-1).values, win.max(-1).values
            if win.shape[-1] < K * K:  # border: the hull includes 0
                lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            o = out[:, :, i, j]
            assert torch.all(o >= lo - 1e-12) and torch.all(o <= hi + 1e-12), (i, j)


def test_2_weights_nonnegative_and_sum(backend):
    """One-hot values (channel m = indicator of low-res pixel m) read out the weights themselves:
    every weight >= 0, the in-range weights sum to 1 inside and to less than 1 at the border."""
    K, s, H, W = 3, 2, 4, 5
    q = 2 * torch.randn(1, 3, s * H, s * W, dtype=F64)
    k = torch.randn(1, 3, H, W, dtype=F64)
    eye = torch.eye(H * W, dtype=F64).view(1, H * W, H, W)
    weights = F.sapa(q, k, eye, K, s, backend=backend)  # [1, H*W, sH, sW]
    assert torch.all(weights >= 0)
    total = weights.sum(1)[0]
    for i in range(s * H):
        for j in range(s * W):
            full = 1 <= i // s <= H - 2 and 1 <= j // s <= W - 2
            if full:
                assert total[i, j].item() == pytest.approx(1.0, abs=1e-12)
            else:
                assert 0 < total[i, j].item() < 1 - 1e-6
            # no weight outside the window
            for m in range(H * W):
                if abs(m // W - i // s) > 1 or abs(m % W - j // s) > 1:
                    assert weights[0, m, i, j].item() == 0.0


# ---------------------------------------------------------------------------------------------
# 3. two-cluster boundary sharpness
# ---------------------------------------------------------------------------------------------

def _two_clusters(C=4, H=7, W=7, split=3):
    a, b = torch.randn(C, dtype=F64), torch.randn(C, dtype=F64)
    x = torch.empty(1, C, H, W, dtype=F64)
    x[0, :, :, :split] = a[:, None, None]
    x[0, :, :, split:] = b[:, None, None]
    return x, a, b


@pytest.mark.parametrize("cell, n_a", [((3, 3), 10), ((3, 4), 5), ((3, 2), 15)], ids=["na10", "na5", "na15"])
def test_3_lambda_formula(backend, cell, n_a):
    """x' = lam a + (1 - lam) b, lam = n_a e^{s_a} / (n_a e^{s_a} + n_b e^{s_b}), s_a = <q, a>."""
    x, a, b = _two_clusters()
    s, K = 2, 5
    q = torch.randn(1, 4, 14, 14, dtype=F64)
    out = F.sapa(q, x, x, K, s, backend=backend)
    n_b = K * K - n_a
    for di in range(s):
        for dj in range(s):
            i, j = s * cell[0] + di, s * cell[1] + dj
            sa, sb = float(q[0, :, i, j] @ a), float(q[0, :, i, j] @ b)
            lam = n_a * math.exp(sa) / (n_a * math.exp(sa) + n_b * math.exp(sb))
            assert_close(out[0, :, i, j], lam * a + (1 - lam) * b)


def test_3_hard_affiliation_and_box_filter(backend):
    """Scaling q by alpha -> inf affiliates the point to the more similar cluster, even when that
    cluster holds only 5 of the 25 window positions (no spatial term); alpha = 0 is the box filter."""
    x, a, b = _two_clusters()
    s, K = 2, 5
    q = torch.randn(1, 4, 14, 14, dtype=F64)
    i, j = 6, 8  # low-res (3, 4): window cols 2..6, n_a = 5, n_b = 20
    for alpha, target in [(40.0, a), (-40.0, b)]:
        q[0, :, i, j] = alpha * (a - b) / (a - b).norm() ** 2  # s_a - s_b = alpha
        out = F.sapa(q, x, x, K, s, backend=backend)
        assert_close(out[0, :, i, j], target, rtol=0, atol=1e-12)
    q[0, :, i, j] = 0.0
    out = F.sapa(q, x, x, K, s, backend=backend)
    assert_close(out[0, :, i, j], (5 * a + 20 * b) / 25)
    q[0, :, i, j] = 1e-9 * torch.randn(4, dtype=F64)
    out = F.sapa(q, x, x, K, s, backend=backend)
    assert_close(out[0, :, i, j], (5 * a + 20 * b) / 25, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# 4. permutation invariance inside the window
# ---------------------------------------------------------------------------------------------

def test_4_permutation_invariance(backend):
    K, s, C = 5, 2, 3
    k, v = torch.randn(1, C, 7, 7, dtype=F64), torch.randn(1, 2, 7, 7, dtype=F64)
    q = 2 * torch.randn(1, C, 14, 14, dtype=F64)
    perm = torch.randperm(K * K)
    while torch.equal(perm, torch.arange(K * K)):
        perm = torch.randperm(K * K)
    k2, v2 = k.clone(), v.clone()
    win = (slice(None), slice(None), slice(1, 6), slice(1, 6))  # window of low-res (3, 3)
    k2[win] = k[win].flatten(2)[:, :, perm].view(1, C, K, K)
    v2[win] = v[win].flatten(2)[:, :, perm].view(1, 2, K, K)
    out1 = F.sapa(q, k, v, K, s, backend=backend)
    out2 = F.sapa(q, k2, v2, K, s, backend=backend)
    assert_close(out2[:, :, 6:8, 6:8], out1[:, :, 6:8, 6:8])
    # other cells see the permuted entries at other places: their outputs change
    assert (out2 - out1).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# 5. sub-pixel sharing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [2, 3], ids=["s2", "s3"])
def test_5_subpixel_sharing(backend, s):
    """q identical on each s x s block -> the s^2 outputs of a low-res cell are identical."""
    q = nearest(torch.randn(1, 3, 4, 5, dtype=F64), s)
    k, v = torch.randn(1, 3, 4, 5, dtype=F64), torch.randn(1, 2, 4, 5, dtype=F64)
    out = F.sapa(q, k, v, 3, s, backend=backend)
    assert_close(out, nearest(out[:, :, ::s, ::s], s))
    # and a q that varies inside the block breaks it
    out2 = F.sapa(q + 0.5 * torch.randn_like(q), k, v, 3, s, backend=backend)
    assert (out2 - nearest(out2[:, :, ::s, ::s], s)).abs().max() > 1e-3


@pytest.mark.parametrize("name, kw", WINDOW_MODULES)
def test_5_modules_subpixel_sharing(name, kw):
    C = 32
    up = randomise(sapa.build_upsampler(name, C, **kw)).eval()
    x, guide = torch.randn(1, C, 5, 4), nearest(torch.randn(1, C, 5, 4), 2)
    with torch.no_grad():
        out = up(x, guide)
    assert_close(out, nearest(out[:, :, ::2, ::2], 2))


# ---------------------------------------------------------------------------------------------
# 6. equivariance and batch independence
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [(2, 1), (0, 3)], ids=["t2x1", "t0x3"])
def test_6_shift_equivariance_window(backend, t):
    """Shift x by t low-res pixels and y by s t: the output shifts by s t at interior points."""
    K, s, H, W = 3, 2, 7, 7
    X, Y = torch.randn(1, 3, H + t[0], W + t[1], dtype=F64), torch.randn(1, 3, s * (H + t[0]), s * (W + t[1]), dtype=F64)
    V = torch.randn(1, 2, H + t[0], W + t[1], dtype=F64)
    o1 = F.sapa(Y[..., :s * H, :s * W], X[..., :H, :W], V[..., :H, :W], K, s, backend=backend)
    o2 = F.sapa(Y[..., s * t[0]:, s * t[1]:], X[..., t[0]:, t[1]:], V[..., t[0]:, t[1]:], K, s, backend=backend)
    r = K // 2
    # low-res rows whose window lies inside both crops: r <= row <= H - 1 - r - t
    rows = slice(s * r, s * (H - r - t[0]))
    cols = slice(s * r, s * (W - r - t[1]))
    rows1 = slice(rows.start + s * t[0], rows.stop + s * t[0])
    cols1 = slice(cols.start + s * t[1], cols.stop + s * t[1])
    assert_close(o2[..., rows, cols], o1[..., rows1, cols1])
    assert o2[..., rows, cols].numel() > 0


def test_6_shift_equivariance_deform(backend):
    G, P, s, H, W, t = 2, 3, 2, 7, 6, (1, 2)
    X = torch.randn(1, 4, H + t[0], W + t[1], dtype=F64)
    Y = torch.randn(1, 4, s * (H + t[0]), s * (W + t[1]), dtype=F64)
    O = (torch.rand(1, 2 * G * P, s * (H + t[0]), s * (W + t[1]), dtype=F64) * 2 - 1) * 0.9  # |offset| < 1
    o1 = F.sapa_deform(Y[..., :s * H, :s * W], X[..., :H, :W], X[..., :H, :W], O[..., :s * H, :s * W],
                       P, G, s, backend=backend)
    o2 = F.sapa_deform(Y[..., s * t[0]:, s * t[1]:], X[..., t[0]:, t[1]:], X[..., t[0]:, t[1]:],
                       O[..., s * t[0]:, s * t[1]:], P, G, s, backend=backend)
    # samples stay within +-1 low-res pixel: rows 1 .. H - 2 - t are interior in both crops
    rows, cols = slice(s, s * (H - 1 - t[0])), slice(s, s * (W - 1 - t[1]))
    rows1 = slice(rows.start + s * t[0], rows.stop + s * t[0])
    cols1 = slice(cols.start + s * t[1], cols.stop + s * t[1])
    assert_close(o2[..., rows, cols], o1[..., rows1, cols1])


def test_6_batch_independence(backend):
    q, k, v = torch.randn(3, 4, 8, 10, dtype=F64), torch.randn(3, 4, 4, 5, dtype=F64), torch.randn(3, 2, 4, 5, dtype=F64)
    off = torch.randn(3, 2 * 2 * 3, 8, 10, dtype=F64)
    full = F.sapa(q, k, v, 3, 2, backend=backend)
    full_d = F.sapa_deform(q, k, v, off, 3, 2, 2, backend=backend)
    for b in range(3):
        assert_close(full[b:b + 1], F.sapa(q[b:b + 1], k[b:b + 1], v[b:b + 1], 3, 2, backend=backend))
        assert_close(full_d[b:b + 1], F.sapa_deform(q[b:b + 1], k[b:b + 1], v[b:b + 1], off[b:b + 1], 3, 2, 2,
                                                    backend=backend))
    k2 = k.clone()
    k2[1] = torch.randn_like(k2[1])
    changed = F.sapa(q, k2, v, 3, 2, backend=backend)
    assert torch.equal(changed[0], full[0]) and torch.equal(changed[2], full[2])
    assert (changed[1] - full[1]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# 7. softmax invariance
# ---------------------------------------------------------------------------------------------

def test_7_constant_logit_shift(backend):
    """A key channel that is 1 everywhere adds the query's value c of that channel to every in-range
    logit: interior outputs do not depend on c; border ones do (padded logits stay 0, docs/SEMANTICS.md §1.1)."""
    K, s, H, W = 3, 2, 6, 6
    k = torch.cat([torch.randn(1, 3, H, W, dtype=F64), torch.ones(1, 1, H, W, dtype=F64)], 1)
    v = torch.randn(1, 2, H, W, dtype=F64)
    q = torch.randn(1, 3, s * H, s * W, dtype=F64)
    outs = [F.sapa(torch.cat([q, torch.full((1, 1, s * H, s * W), c, dtype=F64)], 1), k, v, K, s, backend=backend)
            for c in (-4.0, 0.0, 6.0)]
    inner = (slice(None), slice(None), slice(s, s * (H - 1)), slice(s, s * (W - 1)))
    for o in outs[1:]:
        assert_close(o[inner], outs[0][inner])
    assert (outs[2][..., 0, 0] - outs[1][..., 0, 0]).abs().max() > 1e-3
    # same through the raw ops: softmax(logits + c) reassembled
    logits = F.window_similarity(q, k[:, :3], K, s, backend=backend)
    w1 = torch.softmax(logits, 1)
    w2 = torch.softmax(logits + 7.5, 1)
    assert_close(F.reassemble(w2, v, K, s, backend=backend), F.reassemble(w1, v, K, s, backend=backend))


# ---------------------------------------------------------------------------------------------
# 8. SAPA-D at zero offsets = nearest neighbour
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s, G, hi", [(2, 1, (8, 10)), (3, 4, (12, 15)), (2, 2, (7, 9))],
                         ids=["s2-G1", "s3-G4", "s2-G2-ceil"])
def test_8_zero_offsets_nearest(backend, s, G, hi):
    P = 9
    q = 10 * torch.randn(2, 4 * G, *hi, dtype=F64)
    k, v = torch.randn(2, 4 * G, 4, 5, dtype=F64), torch.randn(2, 2 * G, 4, 5, dtype=F64)
    out = F.sapa_deform(q, k, v, torch.zeros(2, 2 * G * P, *hi, dtype=F64), P, G, s, backend=backend)
    assert_close(out, nearest(v, s)[..., :hi[0], :hi[1]])


@pytest.mark.parametrize("high_offset", [True, False], ids=["high_offset", "low_offset"])
def test_8_module_zero_offset_conv_is_nearest(high_offset):
    C = 32
    up = randomise(sapa.build_upsampler("sapa_d", C, high_offset=high_offset)).eval()
    with torch.no_grad():
        up.offset.weight.zero_()
        up.offset.bias.zero_()
        x = torch.randn(2, C, 5, 4)
        out = up(x, torch.randn(2, C, 10, 8))
        out_ceil = up(x, torch.randn(2, C, 9, 7))
    assert_close(out, nearest(x, 2))
    assert_close(out_ceil, nearest(x, 2)[..., :9, :7])


# ---------------------------------------------------------------------------------------------
# 9. SAPA-D integer / fractional / outside offsets
# ---------------------------------------------------------------------------------------------

def test_9_integer_offsets_sample_pixels(backend):
    """All points of group g at the same integer offset: weights sum to 1, so the output is x shifted
    by that offset; where the offset leaves the map every point has logit 0 and value 0 -> 0."""
    G, P, s, H, W = 2, 3, 2, 4, 5
    shifts = [(1, -1), (0, 2)]  # (dy, dx) per group
    q = 3 * torch.randn(1, 4, s * H, s * W, dtype=F64)
    k, v = torch.randn(1, 4, H, W, dtype=F64), torch.randn(1, 4, H, W, dtype=F64)
    off = torch.zeros(1, 2 * G * P, s * H, s * W, dtype=F64)
    for g, (dy, dx) in enumerate(shifts):
        for p in range(P):
            off[0, 2 * (g * P + p)] = dx
            off[0, 2 * (g * P + p) + 1] = dy
    out = F.sapa_deform(q, k, v, off, P, G, s, backend=backend)
    expected = torch.zeros_like(out)
    for c in range(4):
        dy, dx = shifts[c // 2]
        for i in range(s * H):
            for j in range(s * W):
                y, x = i // s + dy, j // s + dx
                if 0 <= y < H and 0 <= x < W:
                    expected[0, c, i, j] = v[0, c, y, x]
    assert_close(out, expected)
    # the logits at integer offsets are plain dot products with the key pixel (0 outside)
    logits = F.deform_similarity(q, k, off, P, G, s, backend=backend)
    for g, (dy, dx) in enumerate(shifts):
        for i, j in [(0, 0), (3, 4), (7, 9), (6, 1)]:
            y, x = i // s + dy, j // s + dx
            inside = 0 <= y < H and 0 <= x < W
            want = float(q[0, 2 * g:2 * g + 2, i, j] @ k[0, 2 * g:2 * g + 2, y, x]) if inside else 0.0
            assert logits[0, g, 0, i, j].item() == pytest.approx(want, abs=1e-12)


def test_9_fractional_offsets_blend(backend):
    """Offset (dx, dy) = (0.25, 0.5): bilinear blend of the 2 x 2 neighbourhood, weights
    (0.5*0.75, 0.5*0.25, 0.5*0.75, 0.5*0.25); corners outside the map count 0."""
    s, H, W = 2, 3, 4
    v = torch.randn(1, 1, H, W, dtype=F64)
    off = torch.zeros(1, 2, s * H, s * W, dtype=F64)
    off[0, 0], off[0, 1] = 0.25, 0.5
    out = F.deform_reassemble(torch.ones(1, 1, 1, s * H, s * W, dtype=F64), v, off, 1, 1, s, backend=backend)

    def px(y, x):
        return v[0, 0, y, x].item() if 0 <= y < H and 0 <= x < W else 0.0

    for i in range(s * H):
        for j in range(s * W):
            y, x = i // s, j // s
            want = (0.375 * px(y, x) + 0.125 * px(y, x + 1) + 0.375 * px(y + 1, x) + 0.125 * px(y + 1, x + 1))
            assert out[0, 0, i, j].item() == pytest.approx(want, abs=1e-12)


def test_9_outside_point_keeps_logit_zero(backend):
    """P = 2: point 0 at the pixel centre, point 1 far outside (key 0, logit 0, value 0):
    x' = v[pixel] e^a / (e^a + 1), a = <q, k[pixel]>."""
    s, H, W = 2, 3, 3
    q = torch.randn(1, 2, s * H, s * W, dtype=F64)
    k, v = torch.randn(1, 2, H, W, dtype=F64), torch.randn(1, 2, H, W, dtype=F64)
    off = torch.zeros(1, 4, s * H, s * W, dtype=F64)
    off[0, 2:] = -5.0  # point 1: dx = dy = -5
    out = F.sapa_deform(q, k, v, off, 2, 1, s, backend=backend)
    logits = F.deform_similarity(q, k, off, 2, 1, s, backend=backend)
    assert torch.all(logits[:, :, 1] == 0)
    for i in range(s * H):
        for j in range(s * W):
            a = float(q[0, :, i, j] @ k[0, :, i // s, j // s])
            want = v[0, :, i // s, j // s] * math.exp(a) / (math.exp(a) + 1)
            assert_close(out[0, :, i, j], want)


# ---------------------------------------------------------------------------------------------
# 10. SAPA-D grouping
# ---------------------------------------------------------------------------------------------

def test_10_group_locality_deform(backend):
    """Changing the queries and offsets of group 1 changes output channels of group 1 only."""
    G, P, s = 4, 3, 2
    q, k = torch.randn(1, 8, 8, 10, dtype=F64), torch.randn(1, 8, 4, 5, dtype=F64)
    v = torch.randn(1, 8, 4, 5, dtype=F64)
    off = torch.rand(1, 2 * G * P, 8, 10, dtype=F64) * 2 - 1
    out = F.sapa_deform(q, k, v, off, P, G, s, backend=backend)
    q2, off2 = q.clone(), off.clone()
    q2[:, 2:4] = torch.randn(1, 2, 8, 10, dtype=F64)
    off2[:, 2 * P:4 * P] = torch.rand(1, 2 * P, 8, 10, dtype=F64) * 2 - 1
    out2 = F.sapa_deform(q2, k, v, off2, P, G, s, backend=backend)
    others = [0, 1, 4, 5, 6, 7]
    assert torch.equal(out2[:, others], out[:, others])
    assert (out2[:, 2:4] - out[:, 2:4]).abs().min() > 0


def test_10_group_locality_reassemble(backend):
    """reassemble(groups=4): weight group g only reaches value channels g*C/G ... (g+1)*C/G - 1."""
    K, s, G = 3, 2, 4
    w, v = torch.rand(1, G * K * K, 8, 10, dtype=F64), torch.randn(1, 8, 4, 5, dtype=F64)
    out = F.reassemble(w, v, K, s, G, backend=backend)
    w2 = w.clone()
    w2[:, 3 * K * K:] = torch.rand(1, K * K, 8, 10, dtype=F64)
    out2 = F.reassemble(w2, v, K, s, G, backend=backend)
    assert torch.equal(out2[:, :6], out[:, :6])
    assert (out2[:, 6:] - out[:, 6:]).abs().max() > 1e-3
