"""The cpu (Numba) backend of the deformable SAPA-D ops against the reference (grid_sample): forward
and every gradient, offsets included, over odd sizes, P/G/s, ceil-mode guides, channels_last,
float64/float32/bfloat16; points partly and fully outside the map; several bands (threads);
batch 0; logits of +-1e4; hand-computed offset slopes."""
from __future__ import annotations

import pytest
import torch

from sapa import functional as Fn

from ._cpu_helpers import DTYPES, compare_to_reference, leaves, run, threads


# (P, G, s, low-res H x W, guide trim (ceil mode), value channels C, key channels per group, B)
GRID = [
    pytest.param(9, 4, 2, (5, 7), (0, 0), 8, 3, 2, id="P9-G4-s2-5x7"),
    pytest.param(3, 2, 2, (6, 5), (1, 1), 6, 4, 1, id="P3-G2-s2-6x5-ceil11x9"),
    pytest.param(4, 1, 3, (4, 5), (2, 0), 5, 2, 2, id="P4-G1-s3-4x5-ceil10x15"),
    pytest.param(2, 2, 4, (3, 3), (0, 3), 4, 2, 1, id="P2-G2-s4-ceil12x9"),
    pytest.param(5, 3, 1, (4, 6), (0, 0), 9, 2, 1, id="P5-G3-s1"),
    # channel spans of whole vectors plus a remainder (16 float32 / 8 float64 lanes, cpu.py "vector code")
    pytest.param(9, 4, 2, (6, 5), (1, 0), 24, 20, 1, id="P9-G4-vector+remainder"),
    pytest.param(9, 4, 2, (4, 4), (0, 0), 64, 32, 1, id="P9-G4-d32-C64"),
]


def _offsets(B, G, P, hq, low=-2, high=2, dtype=torch.float64):
    """Integer part in [low, high), fractional part in [0.2, 0.8]: samples partly outside the map,
    none on an integer coordinate (where bilinear interpolation has a kink)."""
    whole = torch.randint(low, high, (B, 2 * G * P, *hq)).to(dtype)
    return whole + 0.2 + 0.6 * torch.rand(B, 2 * G * P, *hq, dtype=dtype)


def _inputs(P, G, s, hw, trim, C, dg, B, dtype=torch.float64, low=-2, high=2):
    H, W = hw
    hq = (s * H - trim[0], s * W - trim[1])
    q, k = torch.randn(B, G * dg, *hq, dtype=dtype), torch.randn(B, G * dg, H, W, dtype=dtype)
    v = torch.randn(B, C * G, H, W, dtype=dtype)
    w = torch.softmax(torch.randn(B, G, P, *hq, dtype=torch.float64), dim=2).to(dtype)
    return q, k, v, w, _offsets(B, G, P, hq, low, high).to(dtype)


def _kw(P, G, s):
    return dict(num_points=P, groups=G, scale_factor=s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P, G, s, hw, trim, C, dg, B", GRID)
def test_deform_ops_match_reference(P, G, s, hw, trim, C, dg, B, dtype):
    q, k, v, w, off = _inputs(P, G, s, hw, trim, C, dg, B, dtype)
    compare_to_reference("deform_similarity", (q, k, off), _kw(P, G, s))
    compare_to_reference("deform_reassemble", (w, v, off), _kw(P, G, s))
    compare_to_reference("sapa_deform", (q, k, v, off), _kw(P, G, s))


def test_points_far_outside_the_map():
    """Offsets up to +-40 pixels: most points sample nothing (value 0, logit 0 in the softmax)."""
    q, k, v, w, off = _inputs(4, 2, 2, (5, 6), (1, 0), 4, 3, 2, low=-40, high=40)
    assert ((off.abs() > 10).float().mean() > 0.5)
    compare_to_reference("sapa_deform", (q, k, v, off), _kw(4, 2, 2))
    compare_to_reference("deform_reassemble", (w, v, off), _kw(4, 2, 2))
    compare_to_reference("deform_similarity", (q, k, off), _kw(4, 2, 2))


def test_channels_last_inputs():
    q, k, v, w, off = _inputs(9, 4, 2, (5, 7), (1, 0), 8, 3, 2, torch.float32)
    args = leaves((q, k, v, off), channels_last=True)
    assert args[2].is_contiguous(memory_format=torch.channels_last) and not args[2].is_contiguous()
    out, _ = compare_to_reference("sapa_deform", args, _kw(9, 4, 2), what="channels_last")
    assert out.is_contiguous()
    compare_to_reference("deform_reassemble", leaves((w, v, off), channels_last=True), _kw(9, 4, 2))


@pytest.mark.parametrize("nthreads", [2, 3, 7])
def test_bands(nthreads):
    """Several bands: dk / dv are scattered into per-band buffers and reduced; every gradient must
    still equal the reference (the reduction order may differ from one band: not bitwise)."""
    q, k, v, w, off = _inputs(3, 2, 2, (9, 6), (1, 0), 4, 3, 1, low=-4, high=4)
    with threads(nthreads):
        compare_to_reference("sapa_deform", (q, k, v, off), _kw(3, 2, 2), what=f"{nthreads} bands")
        compare_to_reference("deform_reassemble", (w, v, off), _kw(3, 2, 2), what=f"{nthreads} bands")
        compare_to_reference("deform_similarity", (q, k, off), _kw(3, 2, 2), what=f"{nthreads} bands")
        # forward results do not depend on the bands at all
        with threads(1):
            one = Fn.sapa_deform(q, k, v, off, 3, 2, 2, backend="cpu")
        assert torch.equal(one, Fn.sapa_deform(q, k, v, off, 3, 2, 2, backend="cpu"))


def test_zero_offsets_give_nearest_upsampling():
    """docs/SEMANTICS.md §3.8: with offsets 0 every point samples the cell's own low-res pixel."""
    q, k, v, _, _ = _inputs(9, 4, 2, (4, 5), (0, 0), 3, 2, 1)
    out = Fn.sapa_deform(q, k, v, torch.zeros(1, 72, 8, 10, dtype=torch.float64), 9, 4, 2, backend="cpu")
    assert torch.allclose(out, torch.nn.functional.interpolate(v, scale_factor=2, mode="nearest"))


def test_offset_gradient_is_the_bilinear_slope():
    """Hand-computed slopes (as tests/test_gradcheck.py for the reference): dx = 0.3 and dy = 0, so y
    sits on an integer coordinate, where the cpu kernel takes the floor-based one-sided slope."""
    v = torch.tensor([[[[1.0, 4.0, 9.0], [2.0, 3.0, 5.0]]]], dtype=torch.float64)
    off = torch.zeros(1, 2, 4, 6, dtype=torch.float64)
    off[0, 0] = 0.3
    off.requires_grad_(True)
    Fn.deform_reassemble(torch.ones(1, 1, 1, 4, 6, dtype=torch.float64), v, off, 1, 1, 2,
                         backend="cpu").sum().backward()
    slope = {0: [3.0, 3.0, 5.0, 5.0, -9.0, -9.0], 1: [1.0, 1.0, 2.0, 2.0, -5.0, -5.0]}
    assert torch.allclose(off.grad[0, 0], torch.tensor([slope[i // 2] for i in range(4)], dtype=torch.float64))
    vx = [[0.7 * 1.0 + 0.3 * 4.0, 0.7 * 4.0 + 0.3 * 9.0, 0.7 * 9.0],
          [0.7 * 2.0 + 0.3 * 3.0, 0.7 * 3.0 + 0.3 * 5.0, 0.7 * 5.0]]
    dy = {0: [vx[1][x] - vx[0][x] for x in range(3)], 1: [-vx[1][x] for x in range(3)]}
    expected = torch.tensor([[dy[i // 2][j // 2] for j in range(6)] for i in range(4)], dtype=torch.float64)
    assert torch.allclose(off.grad[0, 1], expected)


def test_batch_zero_and_one_by_one_maps():
    for B, hw, hq in ((0, (3, 4), (6, 8)), (1, (1, 1), (2, 2)), (2, (1, 1), (1, 1))):
        q, k, v = torch.randn(B, 4, *hq), torch.randn(B, 4, *hw), torch.randn(B, 6, *hw)
        off = torch.rand(B, 2 * 2 * 3, *hq) - 0.5
        w = torch.softmax(torch.randn(B, 2, 3, *hq), 2)
        kw = _kw(3, 2, 2)
        compare_to_reference("sapa_deform", (q, k, v, off), kw, what=f"B{B} {hw}")
        compare_to_reference("deform_reassemble", (w, v, off), kw, what=f"B{B} {hw}")
        compare_to_reference("deform_similarity", (q, k, off), kw, what=f"B{B} {hw}")


def test_logits_of_1e4_are_stable():
    q, k, v, _, off = _inputs(4, 2, 2, (5, 6), (1, 0), 4, 3, 2)
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    for scale in (1e4, -1e4):
        args = (qn * 100.0, kn * (scale / 100.0), v, off)
        assert Fn.deform_similarity(args[0], args[1], off, 4, 2, 2, backend="cpu").abs().max() > 1e3
        out, grads = compare_to_reference("sapa_deform", args, _kw(4, 2, 2), what=f"logits {scale:g}")
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
        lo = run("sapa_deform", [a.float() for a in args], _kw(4, 2, 2), "cpu")
        assert torch.isfinite(lo[0]).all() and all(torch.isfinite(g).all() for g in lo[1])


def test_nan_and_inf_offsets_do_not_crash():
    """A NaN / inf coordinate must fail the inside test (it would otherwise become an index)."""
    q, k, v, w, off = _inputs(3, 2, 2, (4, 5), (0, 0), 4, 3, 1)
    off[0, 0, 1, 1] = float("nan")
    off[0, 1, 2, 2] = float("inf")
    off[0, 3, 3, 3] = -float("inf")
    off[0, 5, 0, 0] = 1e30
    out, grads = run("sapa_deform", (q, k, v, off), _kw(3, 2, 2), "cpu")
    assert out.shape == (1, 8, 8, 10)
    # pixels whose offsets are all finite are unaffected
    ref = Fn.sapa_deform(q, k, v, off.nan_to_num(0.0, 0.0, 0.0), 3, 2, 2, backend="cpu")
    assert torch.equal(out[..., 5:, :], ref[..., 5:, :])


def test_fused_backward_runs_no_whole_tensor_torch_fill():
    """The fused cpu op zeroes its scatter buffers in its own kernel and does not let autograd
    materialise zero grads for its non-differentiable outputs. A torch fill (OpenMP-parallel) just
    before a numba kernel left torch's worker spin-waiting on a core during the kernel: the backward
    took 61 instead of 46 ms at the benchmark shape on two cores."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, 64, 64, generator=g).requires_grad_()
    k = torch.randn(1, 64, 32, 32, generator=g).requires_grad_()
    v = torch.randn(1, 64, 32, 32, generator=g).requires_grad_()
    off = torch.randn(1, 72, 64, 64, generator=g).requires_grad_()
    out = Fn.sapa_deform(q, k, v, off, 9, 4, 2, backend="cpu")
    grad = torch.randn(out.shape, generator=g)
    fills = {"aten::zero_", "aten::fill_", "aten::zeros", "aten::zeros_like", "aten::new_zeros"}
    with torch.profiler.profile(record_shapes=True) as prof:
        out = Fn.sapa_deform(q, k, v, off, 9, 4, 2, backend="cpu")
        out.backward(grad)
    big = []
    for e in prof.events():
        if e.name in fills:
            numel = max((int(torch.tensor(s).prod()) for s in e.input_shapes if s), default=0)
            if numel > 4096:
                big.append((e.name, e.input_shapes))
    assert not big, f"whole-tensor torch fills around the fused SAPA-D cpu op: {big}"
    assert q.grad is not None and off.grad is not None and v.grad is not None
