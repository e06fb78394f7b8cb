"""Baseline upsamplers (nearest, bilinear, deconv, pixelshuffle, carafe, indexnet, a2u, fade, dysample).

Expected values come from analytic formulas, from PyTorch ops whose semantics are not under test
(F.interpolate, conv layers used as black boxes for the projections), or from the float64 loop
oracles written below, one formula per line, independently of the modules' code.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _compare import assert_close
from sapa import functional as Fn
from sapa.registry import build_upsampler

F64 = torch.float64
BASELINES = ["nearest", "bilinear", "deconv", "pixelshuffle", "carafe", "indexnet", "a2u", "fade", "dysample"]


def _L(t: torch.Tensor) -> list:
    return t.detach().to(F64).tolist()


def _build(name, C=32, s=2, **kw):
    return build_upsampler(name, C, scale_factor=s, **kw).to(F64)


def _call(m, x, guide):
    return m(x, guide) if m.needs_guide else m(x, guide)


# ----------------------------------------------------------------------------------------------
# float64 loop oracles
# ----------------------------------------------------------------------------------------------

def loop_reassemble(w, v, K, s, G=1):
    """out[b, c, I, J] = sum_n w[b, g*K*K + n, I, J] * v[b, c, I//s + dy, J//s + dx] (in range)."""
    B, C, H, W = v.shape
    Hq, Wq = w.shape[-2:]
    wl, vl = _L(w), _L(v)
    r = K // 2
    out = [[[[0.0] * Wq for _ in range(Hq)] for _ in range(C)] for _ in range(B)]
    for b in range(B):
        for c in range(C):
            g = c // (C // G)
            for i in range(Hq):
                for j in range(Wq):
                    acc = 0.0
                    for dy in range(K):
                        for dx in range(K):
                            y, x = i // s + dy - r, j // s + dx - r
                            if 0 <= y < H and 0 <= x < W:
                                acc += wl[b][g * K * K + dy * K + dx][i][j] * vl[b][c][y][x]
                    out[b][c][i][j] = acc
    return torch.tensor(out, dtype=F64)


def _softmax(vals):
    m = max(vals)
    e = [math.exp(a - m) for a in vals]
    z = sum(e)
    return [a / z for a in e]


def _sigmoid(a):
    return 1.0 / (1.0 + math.exp(-a))


def loop_carafe_kernels(enc, K, s, G, Hq, Wq):
    """mmcv CARAFEPack.kernel_normalizer: pixel_shuffle first (encoder channel
    (g*K^2 + n)*s^2 + a*s + b -> entry n of group g at sub-pixel (a, b)), then softmax per group."""
    el = _L(enc)
    B = len(el)
    out = [[[[0.0] * Wq for _ in range(Hq)] for _ in range(G * K * K)] for _ in range(B)]
    for b in range(B):
        for g in range(G):
            for i in range(Hq):
                for j in range(Wq):
                    sub = (i % s) * s + (j % s)
                    logits = [el[b][(g * K * K + n) * s * s + sub][i // s][j // s] for n in range(K * K)]
                    for n, wn in enumerate(_softmax(logits)):
                        out[b][g * K * K + n][i][j] = wn
    return torch.tensor(out, dtype=F64)


def loop_conv3x3(t, weight, bias):
    """'same' 3x3 convolution (zero padding), cross-correlation as nn.Conv2d."""
    tl, wl, bl = _L(t), _L(weight), _L(bias)
    B, Cin, H, W = t.shape
    Cout = weight.shape[0]
    out = [[[[bl[o]] * W for _ in range(H)] for o in range(Cout)] for _ in range(B)]
    for b in range(B):
        for o in range(Cout):
            for i in range(H):
                for j in range(W):
                    acc = 0.0
                    for m in range(Cin):
                        for dy in range(3):
                            for dx in range(3):
                                y, x = i + dy - 1, j + dx - 1
                                if 0 <= y < H and 0 <= x < W:
                                    acc += wl[o][m][dy][dx] * tl[b][m][y][x]
                    out[b][o][i][j] += acc
    return torch.tensor(out, dtype=F64)


# ----------------------------------------------------------------------------------------------
# parameter counts: analytic formulas (s = 2)
# ----------------------------------------------------------------------------------------------

def _analytic_params(name, C, kw):
    s, K = 2, 5
    if name in ("nearest", "bilinear"):
        return 0
    if name == "deconv":                 # ConvTranspose2d(C, C, 3) + bias
        return 9 * C * C + C
    if name == "pixelshuffle":           # Conv2d(C, 4C, 3) + bias
        return 9 * C * 4 * C + 4 * C
    if name == "carafe":                 # compressor 1x1 C->64 (+b), encoder 3x3 64->s^2 K^2 (+b)
        return C * 64 + 64 + 64 * s * s * K * K * 9 + s * s * K * K
    if name == "indexnet":               # four Conv2d(C, C, 2, stride 2, bias=False)
        return 4 * C * C * 2 * 2
    if name == "a2u":                    # P: 1x1 C->(3*2)^2 (+b); U, V: 1x1 C->1 (+b); two GN(32, C)
        return (C + 1) * 36 + 2 * (C + 1) + 2 * 2 * C
    if name == "fade":                   # en 1x1 C->64 (+b), de 1x1 C->64, shared 3x3 64->25 (+b), gate
        base = C * 64 + 64 + C * 64 + 64 * 25 * 9 + 25
        return base + (C + 1 if kw.get("gating", True) else 0)
    if name == "dysample":
        if kw.get("style", "lp") == "pl":    # 1x1 C/4 -> 2*4 (+b)
            n = (C // 4 + 1) * 2 * 4
        else:                                # 1x1 C -> 2*4*s^2 (+b)
            n = (C + 1) * 2 * 4 * s * s
        return 2 * n if kw.get("dyscope", False) else n
    raise KeyError(name)


PARAM_CASES = [(n, {}) for n in BASELINES] + [
    ("fade", {"gating": False}), ("dysample", {"dyscope": True}),
    ("dysample", {"style": "pl"}), ("dysample", {"style": "pl", "dyscope": True})]


@pytest.mark.parametrize("C", [256, 512])
@pytest.mark.parametrize("name, kw", PARAM_CASES,
                         ids=[n + "".join(f"-{k}={v}" for k, v in kw.items()) for n, kw in PARAM_CASES])
def test_param_count(name, kw, C):
    m = build_upsampler(name, C, scale_factor=2, **kw)
    assert sum(p.numel() for p in m.parameters()) == _analytic_params(name, C, kw)


def test_carafe_param_count_is_mmcv_figure():
    assert sum(p.numel() for p in build_upsampler("carafe", 256).parameters()) == 74_148


# ----------------------------------------------------------------------------------------------
# reassemble with groups vs the loop
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K, s, G, trim", [(3, 2, 2, (0, 0)), (5, 2, 4, (1, 0)), (3, 3, 2, (2, 1))])
def test_reassemble_groups_vs_loop(K, s, G, trim):
    B, C, H, W = 2, 4 if G != 4 else 8, 3, 4
    Hq, Wq = s * H - trim[0], s * W - trim[1]
    w = torch.randn(B, G, K * K, Hq, Wq, dtype=F64).softmax(2).view(B, G * K * K, Hq, Wq)
    v = torch.randn(B, C, H, W, dtype=F64)
    assert_close(Fn.reassemble(w, v, K, s, G), loop_reassemble(w, v, K, s, G))


# ----------------------------------------------------------------------------------------------
# CARAFE
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s, G", [(2, 1), (2, 2), (3, 1)])
def test_carafe_one_hot_centre_kernel_is_nearest(s, G):
    K, C = 5, 8
    m = _build("carafe", C, s, groups=G)
    with torch.no_grad():
        m.content_encoder.weight.zero_()
        m.content_encoder.bias.zero_()
        centre = K * K // 2
        for g in range(G):        # encoder channels of entry `centre` of group g, every sub-pixel
            m.content_encoder.bias[(g * K * K + centre) * s * s:(g * K * K + centre + 1) * s * s] = 1e4
    x = torch.randn(1, C, 3, 5, dtype=F64)
    expected = x.repeat_interleave(s, -2).repeat_interleave(s, -1)
    assert torch.equal(m(x), expected)


@pytest.mark.parametrize("s, G, K", [(2, 2, 3), (3, 1, 3), (2, 1, 5)])
def test_carafe_vs_loop(s, G, K):
    C, H, W = 4, 3, 4
    m = _build("carafe", C, s, groups=G, kernel_size=K, compressed_channels=6)
    torch.nn.init.normal_(m.content_encoder.weight, std=0.5)      # kernels far from uniform
    x = torch.randn(2, C, H, W, dtype=F64)
    enc = m.content_encoder(m.channel_compressor(x))
    w = loop_carafe_kernels(enc, K, s, G, s * H, s * W)
    assert_close(m(x), loop_reassemble(w, x, K, s, G))


def test_carafe_init_as_mmcv():
    m = build_upsampler("carafe", 256)
    std = m.content_encoder.weight.std().item()
    assert 0.0008 < std < 0.0012
    bound = math.sqrt(6 / (256 + 64))          # Xavier-uniform of the 1x1 compressor
    assert m.channel_compressor.weight.abs().max().item() <= bound
    assert m.channel_compressor.weight.abs().max().item() > 0.9 * bound
    assert not m.channel_compressor.bias.any() and not m.content_encoder.bias.any()


# ----------------------------------------------------------------------------------------------
# IndexNet
# ----------------------------------------------------------------------------------------------

def test_indexnet_vs_loop():
    s, C, H, W = 2, 3, 2, 3
    m = _build("indexnet", C, s)
    x = torch.randn(1, C, H, W, dtype=F64)
    y = torch.randn(1, C, s * H, s * W, dtype=F64)
    Wt, xl, yl = _L(m.index_conv.weight), _L(x), _L(y)
    out = torch.zeros(1, C, s * H, s * W, dtype=F64)
    enc_idx = torch.zeros_like(out)
    for c in range(C):
        for i in range(H):
            for j in range(W):
                sig = []
                for k in range(s * s):     # conv k -> sub-pixel (k // s, k % s)
                    acc = 0.0
                    for c2 in range(C):
                        for a in range(s):
                            for b in range(s):
                                acc += Wt[k * C + c][c2][a][b] * yl[0][c2][s * i + a][s * j + b]
                    sig.append(_sigmoid(acc))
                for k, (sg, sm) in enumerate(zip(sig, _softmax(sig))):
                    out[0, c, s * i + k // s, s * j + k % s] = sg * xl[0][c][i][j]
                    enc_idx[0, c, s * i + k // s, s * j + k % s] = sm
    assert_close(m(x, y), out)
    idx_en, idx_de = m.index_maps(x, y)
    assert_close(idx_en, enc_idx)
    assert_close(idx_de * x.repeat_interleave(s, -2).repeat_interleave(s, -1), out)


# ----------------------------------------------------------------------------------------------
# A2U
# ----------------------------------------------------------------------------------------------

def loop_a2u_kernels(m, y, H, W):
    """The official InterChannelUp, written out: pooled kernels, per-channel strided conv, GroupNorm,
    LeakyReLU, channel-summed affinity / sqrt(C), per-sample projection, sub-pixel layout, sigmoid,
    softmax over K^2."""
    s, K, k, d, G = m.scale_factor, m.kernel_size, m.encoder_kernel, m.rank, m.norm_groups
    B, Cy, Hg, Wg = y.shape
    p = _L(m.proj(F.adaptive_avg_pool2d(y, 1)).flatten(1))                   # [B, d*(Ks)^2]
    pooled = F.adaptive_avg_pool2d(y, k)
    U, V = _L(m.enc_u(pooled)), _L(m.enc_v(pooled))                           # [B, d, k, k]
    yl = _L(y)
    lo = (k - s) // 2

    def ypad(b, c, r, q):          # zero padding `lo` before; y beyond its size reads 0 too
        r, q = r - lo, q - lo
        return yl[b][c][r][q] if 0 <= r < Hg and 0 <= q < Wg else 0.0

    def encode(b, j, ker, norm):
        e = [[[sum(ker[b][j][u][v] * ypad(b, c, s * i + u, s * q + v) for u in range(k) for v in range(k))
               for q in range(W)] for i in range(H)] for c in range(Cy)]
        gamma, beta = _L(norm.weight), _L(norm.bias)
        cg = Cy // G
        for g in range(G):
            vals = [e[c][i][q] for c in range(g * cg, (g + 1) * cg) for i in range(H) for q in range(W)]
            mu = sum(vals) / len(vals)
            var = sum((a - mu) ** 2 for a in vals) / len(vals)
            for c in range(g * cg, (g + 1) * cg):
                for i in range(H):
                    for q in range(W):
                        t = (e[c][i][q] - mu) / math.sqrt(var + norm.eps) * gamma[c] + beta[c]
                        e[c][i][q] = t if t >= 0 else 0.01 * t
        return e

    out = torch.zeros(B, K * K, s * H, s * W, dtype=F64)
    for b in range(B):
        A = []
        for j in range(d):
            eu, ev = encode(b, j, U, m.norm_u), encode(b, j, V, m.norm_v)
            A.append([[sum(eu[c][i][q] * ev[c][i][q] for c in range(Cy)) / math.sqrt(Cy) for q in range(W)]
                      for i in range(H)])
        for I in range(s * H):
            for J in range(s * W):
                sub = (I % s) * s + (J % s)
                logits = [sum(p[b][(n * s * s + sub) * d + j] * A[j][I // s][J // s] for j in range(d))
                          for n in range(K * K)]
                for n, wn in enumerate(_softmax([_sigmoid(a) for a in logits])):
                    out[b, n, I, J] = wn
    return out[:, :, :Hg, :Wg]


@pytest.mark.parametrize("s, rank, trim", [(2, 1, (0, 0)), (2, 2, (1, 1)), (3, 1, (0, 2))])
def test_a2u_vs_loop(s, rank, trim):
    Cy, H, W = 32, 2, 3
    m = _build("a2u", Cy, s, rank=rank, norm_groups=16)
    with torch.no_grad():
        for norm in (m.norm_u, m.norm_v):
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
        m.proj.weight.mul_(20)          # logits of order 1, so the softmax is not trivially flat
    x = torch.randn(1, 4 * 8, H, W, dtype=F64)
    y = torch.randn(1, Cy, s * H - trim[0], s * W - trim[1], dtype=F64)
    w = loop_a2u_kernels(m, y, H, W)
    assert_close(m.kernels(x, y), w)
    assert_close(m(x, y), loop_reassemble(w, x, 3, s))


def test_a2u_groupnorm_constraint_is_named():
    with pytest.raises(ValueError, match="GroupNorm"):
        build_upsampler("a2u", 48)
    m = build_upsampler("a2u", 48, norm_groups=16)
    assert m(torch.randn(1, 48, 2, 3), torch.randn(1, 48, 4, 6)).shape == (1, 48, 4, 6)


# ----------------------------------------------------------------------------------------------
# FADE
# ----------------------------------------------------------------------------------------------

def test_fade_gate_one_returns_encoder_feature():
    m = _build("fade", 8)
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.bias.fill_(1e4)
    x, y = torch.randn(1, 8, 3, 5, dtype=F64), torch.randn(1, 8, 6, 10, dtype=F64)
    assert torch.equal(m(x, y), y)
    y_ceil = y[..., :5, :9]
    assert torch.equal(m(x, y_ceil), y_ceil)


def test_fade_gate_zero_is_ungated_fade():
    gated, plain = _build("fade", 8), _build("fade", 8, gating=False)
    missing = plain.load_state_dict(gated.state_dict(), strict=False)
    assert missing.unexpected_keys == ["gate.weight", "gate.bias"] and not missing.missing_keys
    with torch.no_grad():
        gated.gate.weight.zero_()
        gated.gate.bias.fill_(-1e4)
    x, y = torch.randn(1, 8, 3, 5, dtype=F64), torch.randn(1, 8, 6, 10, dtype=F64)
    assert_close(gated(x, y), plain(x, y))


@pytest.mark.parametrize("s, trim", [(2, (0, 0)), (2, (1, 1)), (3, (2, 0))])
def test_fade_semishift_kernels_vs_loop(s, trim):
    C, H, W, K = 3, 2, 3, 3
    m = _build("fade", C, s, kernel_size=K, embedding_dim=4, gating=False)
    x = torch.randn(1, C, H, W, dtype=F64)
    y = torch.randn(1, C, s * H - trim[0], s * W - trim[1], dtype=F64)
    ce = m.content_encoder
    enc = loop_conv3x3(m.compressor_en(y), ce.weight, ce.bias)               # high res
    dec = loop_conv3x3(m.compressor_de(x), ce.weight, ce.bias)               # low res
    Hq, Wq = y.shape[-2:]
    logits = torch.zeros(1, K * K, Hq, Wq, dtype=F64)
    for i in range(Hq):
        for j in range(Wq):
            logits[0, :, i, j] = enc[0, :, i, j] + dec[0, :, i // s, j // s]
    w = logits.softmax(1)
    assert_close(m.kernels(x, y), w)
    assert_close(m(x, y), loop_reassemble(w, x, K, s))


def test_fade_gating_needs_equal_channels():
    with pytest.raises(ValueError, match="gating"):
        build_upsampler("fade", 32, guide_channels=16)
    m = build_upsampler("fade", 32, guide_channels=16, gating=False)
    assert m(torch.randn(1, 32, 3, 4), torch.randn(1, 16, 6, 8)).shape == (1, 32, 6, 8)


# ----------------------------------------------------------------------------------------------
# DySample
# ----------------------------------------------------------------------------------------------

def _zero_offsets(m):
    with torch.no_grad():
        m.offset.weight.zero_()
        m.offset.bias.zero_()


@pytest.mark.parametrize("style, s, dyscope", [("lp", 2, False), ("lp", 3, True), ("pl", 2, False),
                                               ("pl", 3, True)])
def test_dysample_zero_offsets_is_bilinear(style, s, dyscope):
    m = _build("dysample", 36, s, style=style, dyscope=dyscope)
    _zero_offsets(m)
    x = torch.randn(1, 36, 3, 5, dtype=F64)
    expected = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
    assert_close(m(x), expected)


def test_dysample_group_offset_shifts_only_its_group():
    s, G, C = 2, 4, 8
    m = _build("dysample", C, s, groups=G)
    _zero_offsets(m)
    with torch.no_grad():   # x offsets of group 1 (channels [x/y, g, a, b]): +1 low-res pixel (x 0.25)
        m.offset.bias[1 * s * s:2 * s * s] = 4.0
    x = torch.randn(1, C, 3, 6, dtype=F64)
    up = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
    out = m(x)
    grp = slice(2, 4)       # channels of group 1
    others = [0, 1, 4, 5, 6, 7]
    assert_close(out[:, others], up[:, others])
    # sampling x + 1 low-res pixel = the bilinear map s high-res pixels to the right (border-clamped)
    assert_close(out[:, grp, :, s:-s], up[:, grp, :, 2 * s:])
    assert not torch.allclose(out[:, grp], up[:, grp])


def test_dysample_init_pos_layout():
    m = build_upsampler("dysample", 16, scale_factor=2, groups=2)
    pos = m.init_pos().view(2, 2, 2, 2)        # [x/y, group, sub-row, sub-col]
    for g in range(2):
        assert pos[0, g].tolist() == [[-0.25, 0.25], [-0.25, 0.25]]
        assert pos[1, g].tolist() == [[-0.25, -0.25], [0.25, 0.25]]


def test_dysample_clear_errors():
    with pytest.raises(ValueError, match="groups"):
        build_upsampler("dysample", 6)
    with pytest.raises(ValueError, match="style"):
        build_upsampler("dysample", 16, style="xx")
    with pytest.raises(ValueError, match="scale_factor"):
        build_upsampler("dysample", 20, scale_factor=3, style="pl", groups=2)


# ----------------------------------------------------------------------------------------------
# deconv / pixelshuffle / fixed interpolations
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["deconv", "pixelshuffle"])
@pytest.mark.parametrize("s, hw", [(2, (3, 5)), (2, (1, 7)), (3, (5, 3)), (4, (3, 3))])
def test_learned_shapes_on_odd_inputs(name, s, hw):
    m = build_upsampler(name, 8, scale_factor=s)
    assert m(torch.randn(1, 8, *hw)).shape == (1, 8, s * hw[0], s * hw[1])


def test_pixelshuffle_layout():
    s = 2
    m = _build("pixelshuffle", 3, s)
    x = torch.randn(1, 3, 3, 5, dtype=F64)
    conv = m.conv(x)
    out = m(x)
    for c in range(3):
        for i in range(6):
            for j in range(10):
                assert out[0, c, i, j] == conv[0, c * s * s + (i % s) * s + j % s, i // s, j // s]


def test_deconv_is_papers_config():
    d = build_upsampler("deconv", 16).deconv
    assert (d.kernel_size, d.stride, d.padding, d.output_padding) == ((3, 3), (2, 2), (1, 1), (1, 1))


def test_nearest_and_bilinear_values():
    x = torch.randn(1, 4, 3, 5, dtype=F64)
    assert torch.equal(_build("nearest", 4, 3)(x), x.repeat_interleave(3, -2).repeat_interleave(3, -1))
    assert_close(_build("bilinear", 4, 2)(x), F.interpolate(x, scale_factor=2, mode="bilinear",
                                                            align_corners=False))


# ----------------------------------------------------------------------------------------------
# every baseline: non-square maps, batch 1, ceil-mode guides, channel counts not multiples of 32
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BASELINES)
def test_non_square_batch_one_and_batch_independence(name):
    m = _build(name, 32)
    x, y = torch.randn(2, 32, 3, 5, dtype=F64), torch.randn(2, 32, 6, 10, dtype=F64)
    out = _call(m, x, y)
    assert out.shape == (2, 32, 6, 10) and out.dtype == F64 and torch.isfinite(out).all()
    one = _call(m, x[1:], y[1:])
    assert one.shape == (1, 32, 6, 10)
    assert_close(one, out[1:])


@pytest.mark.parametrize("name", BASELINES)
def test_ceil_mode_guide(name):
    m = _build(name, 32)
    x, y = torch.randn(1, 32, 4, 3, dtype=F64), torch.randn(1, 32, 7, 5, dtype=F64)
    out = _call(m, x, y)
    assert out.shape == (1, 32, 7, 5)
    if not m.needs_guide:       # unguided: exactly the s-times map, cropped
        assert_close(out, m(x)[..., :7, :5])


@pytest.mark.parametrize("name", BASELINES)
def test_channels_not_multiple_of_32(name):
    C = 36
    try:
        m = _build(name, C)
    except ValueError as e:
        assert name == "a2u" and "GroupNorm" in str(e), f"{name}: unexpected error {e}"
        return
    assert name != "a2u"
    out = _call(m, torch.randn(1, C, 2, 3, dtype=F64), torch.randn(1, C, 4, 6, dtype=F64))
    assert out.shape == (1, C, 4, 6)


@pytest.mark.parametrize("name, kw", [(n, {}) for n in BASELINES] + [("dysample", {"style": "pl"})],
                         ids=BASELINES + ["dysample-pl"])
def test_scale_three_and_batch_zero(name, kw):
    # DySample 'pl' regression: torch's F.pixel_unshuffle returns an empty batch unchanged
    m = _build(name, 36 if name != "a2u" else 32, 3, **kw)
    C = m.in_channels
    for B in (0, 1):
        x, y = torch.randn(B, C, 2, 3, dtype=F64), torch.randn(B, C, 5, 9, dtype=F64)
        assert _call(m, x, y).shape == (B, C, 5, 9)


def test_dysample_bfloat16_samples_in_float32():
    m = build_upsampler("dysample", 8)
    _zero_offsets(m)
    x = torch.randn(1, 8, 4, 160)
    expected = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    out = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    # bf16 rounding of the values alone is ~1e-2; a bf16 grid would add a ~0.3-pixel position error
    assert (out.float() - expected).abs().max().item() < 0.05
