"""torch.autograd.gradcheck in float64 on every public op (reference backend), every input including
offsets. Offsets keep their fractional part in [0.2, 0.8] so no sample sits on an integer position,
where bilinear interpolation has a kink."""
from __future__ import annotations

import functools

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from sapa import functional as F

F64 = torch.float64


def _rand(*shape):
    return torch.randn(*shape, dtype=F64, requires_grad=True)


def _offsets(B, G, P, hi, low=-2, high=2):
    """Integer part in [low, high), fractional part in [0.2, 0.8]: some samples partly outside."""
    whole = torch.randint(low, high, (B, 2 * G * P, *hi)).to(F64)
    frac = 0.2 + 0.6 * torch.rand(B, 2 * G * P, *hi, dtype=F64)
    return (whole + frac).requires_grad_(True)


def _check(fn, inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, raise_exception=True)


SIZES = [pytest.param((3, 5), 2, (0, 0), id="3x5-s2"), pytest.param((2, 3), 3, (0, 0), id="2x3-s3"),
         pytest.param((3, 3), 2, (1, 1), id="3x3-s2-ceil5x5")]


def _hi(lo, s, trim):
    return s * lo[0] - trim[0], s * lo[1] - trim[1]


@pytest.mark.parametrize("lo, s, trim", SIZES)
def test_window_similarity(lo, s, trim):
    q, k = _rand(2, 3, *_hi(lo, s, trim)), _rand(2, 3, *lo)
    _check(functools.partial(F.window_similarity, kernel_size=3, scale_factor=s, backend="reference"), (q, k))


@pytest.mark.parametrize("groups", (1, 2), ids=lambda g: f"G{g}")
@pytest.mark.parametrize("lo, s, trim", SIZES)
def test_reassemble(lo, s, trim, groups):
    w, v = _rand(2, groups * 9, *_hi(lo, s, trim)), _rand(2, 2, *lo)
    _check(functools.partial(F.reassemble, kernel_size=3, scale_factor=s, groups=groups, backend="reference"),
           (w, v))


@pytest.mark.parametrize("K", (3, 5), ids=lambda K: f"K{K}")
@pytest.mark.parametrize("lo, s, trim", SIZES)
def test_sapa(lo, s, trim, K):
    q, k, v = _rand(2, 3, *_hi(lo, s, trim)), _rand(2, 3, *lo), _rand(2, 2, *lo)
    _check(functools.partial(F.sapa, kernel_size=K, scale_factor=s, backend="reference"), (q, k, v))


@pytest.mark.parametrize("lo, s, trim", SIZES)
def test_deform_similarity(lo, s, trim):
    G, P = 2, 3
    hi = _hi(lo, s, trim)
    q, k, off = _rand(1, 2 * G, *hi), _rand(1, 2 * G, *lo), _offsets(1, G, P, hi)
    _check(functools.partial(F.deform_similarity, num_points=P, groups=G, scale_factor=s, backend="reference"),
           (q, k, off))


@pytest.mark.parametrize("lo, s, trim", SIZES)
def test_deform_reassemble(lo, s, trim):
    G, P = 2, 3
    hi = _hi(lo, s, trim)
    w, v, off = _rand(1, G, P, *hi), _rand(1, 2 * G, *lo), _offsets(1, G, P, hi)
    _check(functools.partial(F.deform_reassemble, num_points=P, groups=G, scale_factor=s, backend="reference"),
           (w, v, off))


@pytest.mark.parametrize("lo, s, trim", SIZES)
def test_sapa_deform(lo, s, trim):
    G, P = 2, 3
    hi = _hi(lo, s, trim)
    q, k, v, off = _rand(1, 2 * G, *hi), _rand(1, 2 * G, *lo), _rand(1, 2 * G, *lo), _offsets(1, G, P, hi)
    _check(functools.partial(F.sapa_deform, num_points=P, groups=G, scale_factor=s, backend="reference"),
           (q, k, v, off))


def test_offset_gradient_is_the_bilinear_slope():
    """Independent of gradcheck's finite differences: one point per pixel at offset (dx, dy) =
    (0.3, 0) and weight 1; d out / d dx is the slope v[r, x0 + 1] - v[r, x0] of the bilinear
    interpolation and d out / d dy the floor-based one-sided slope in y (the official CUDA
    backward at integer y, which is where SAPA-D starts: offsets ~ 0), both by hand."""
    v = torch.tensor([[[[1.0, 4.0, 9.0], [2.0, 3.0, 5.0]]]], dtype=F64)  # [1, 1, 2, 3]
    off = torch.zeros(1, 2, 4, 6, dtype=F64)
    off[0, 0] = 0.3  # dx; dy = 0
    off.requires_grad_(True)
    w = torch.ones(1, 1, 1, 4, 6, dtype=F64)
    out = F.deform_reassemble(w, v, off, 1, 1, 2, backend="reference")
    out.sum().backward()
    # high-res (i, j) -> low-res (r, x0) = (i // 2, j // 2), sample at (r, x0 + 0.3). x0 = 2 is the
    # last column: its right corner is outside (weight 0), so the slope is -v[r, 2].
    slope = {0: [3.0, 3.0, 5.0, 5.0, -9.0, -9.0], 1: [1.0, 1.0, 2.0, 2.0, -5.0, -5.0]}
    expected_dx = torch.tensor([slope[i // 2] for i in range(4)], dtype=F64)
    assert torch.allclose(off.grad[0, 0], expected_dx, atol=1e-12)
    # y: rows r and r + 1 blended; at r = 1 row 2 is outside (value 0)
    vx = [[0.7 * 1.0 + 0.3 * 4.0, 0.7 * 4.0 + 0.3 * 9.0, 0.7 * 9.0],
          [0.7 * 2.0 + 0.3 * 3.0, 0.7 * 3.0 + 0.3 * 5.0, 0.7 * 5.0]]
    dy = {0: [vx[1][x] - vx[0][x] for x in range(3)], 1: [-vx[1][x] for x in range(3)]}
    expected_dy = torch.tensor([[dy[i // 2][j // 2] for j in range(6)] for i in range(4)], dtype=F64)
    assert torch.allclose(off.grad[0, 1], expected_dy, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["sapa", "sapa_deform"])
def test_gradgradcheck(op):
    """Second derivatives (double backward) of the fused ops."""
    if op == "sapa":
        inputs = (_rand(1, 2, 4, 6), _rand(1, 2, 2, 3), _rand(1, 2, 2, 3))
        fn = functools.partial(F.sapa, kernel_size=3, scale_factor=2, backend="reference")
    else:
        inputs = (_rand(1, 2, 4, 6), _rand(1, 2, 2, 3), _rand(1, 2, 2, 3), _offsets(1, 1, 2, (4, 6)))
        fn = functools.partial(F.sapa_deform, num_points=2, groups=1, scale_factor=2, backend="reference")
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
