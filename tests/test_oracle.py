"""The reference backend against the float64 loop oracle (tests/oracle.py), forward, on odd sizes,
K in {3, 5, 7}, s in {2, 3, 4}, batch 0/1/3, groups 1/2/4 and ceil-mode guide sizes."""
from __future__ import annotations

import itertools

import pytest
import torch

import oracle
from _compare import assert_close
from sapa import functional as F

REF = dict(backend="reference")
F64 = torch.float64


def _hi(lo: tuple[int, int], s: int, trim: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """High-res size s*H - trim (trim < s: a ceil-mode guide)."""
    return s * lo[0] - trim[0], s * lo[1] - trim[1]


# odd low-res sizes; (H, W) = (3, 5) keeps the oracle fast even at K = 7, s = 4
WINDOW_CASES = [pytest.param(K, s, B, id=f"K{K}-s{s}-B{B}")
                for K, s, B in itertools.product((3, 5, 7), (2, 3, 4), (1, 3))]


@pytest.mark.parametrize("K, s, B", WINDOW_CASES)
def test_window_similarity(K, s, B):
    q, k = torch.randn(B, 3, *_hi((3, 5), s), dtype=F64), torch.randn(B, 3, 3, 5, dtype=F64)
    assert_close(F.window_similarity(q, k, K, s, **REF), oracle.window_similarity(q, k, K, s))


@pytest.mark.parametrize("K, s, B", WINDOW_CASES)
def test_sapa(K, s, B):
    q = 2 * torch.randn(B, 3, *_hi((5, 3), s), dtype=F64)  # sharp kernels: the softmax matters
    k, v = torch.randn(B, 3, 5, 3, dtype=F64), torch.randn(B, 2, 5, 3, dtype=F64)
    assert_close(F.sapa(q, k, v, K, s, **REF), oracle.sapa(q, k, v, K, s))


@pytest.mark.parametrize("groups", (1, 2, 4), ids=lambda g: f"G{g}")
@pytest.mark.parametrize("K, s", [(3, 2), (5, 3), (7, 4)], ids=["K3-s2", "K5-s3", "K7-s4"])
def test_reassemble(K, s, groups):
    B, C = 2, 4
    w = torch.randn(B, groups * K * K, *_hi((3, 5), s), dtype=F64)  # not normalised: any weights
    v = torch.randn(B, C, 3, 5, dtype=F64)
    assert_close(F.reassemble(w, v, K, s, groups, **REF), oracle.reassemble(w, v, K, s, groups))


# ceil-mode guides: high-res size smaller than s*H by less than s (e.g. 7 from 4 at s = 2)
CEIL_CASES = [pytest.param(lo, s, trim, id=f"{lo[0]}x{lo[1]}-s{s}-to{s * lo[0] - trim[0]}x{s * lo[1] - trim[1]}")
              for lo, s, trim in [((4, 3), 2, (1, 1)), ((4, 3), 2, (1, 0)), ((3, 3), 3, (2, 1)),
                                  ((3, 2), 4, (3, 2)), ((1, 1), 3, (2, 2))]]


@pytest.mark.parametrize("lo, s, trim", CEIL_CASES)
def test_window_ops_ceil_mode(lo, s, trim):
    hi = _hi(lo, s, trim)
    q, k, v = torch.randn(2, 3, *hi, dtype=F64), torch.randn(2, 3, *lo, dtype=F64), torch.randn(2, 4, *lo, dtype=F64)
    w = torch.randn(2, 2 * 9, *hi, dtype=F64)
    out = F.sapa(q, k, v, 3, s, **REF)
    assert out.shape == (2, 4, *hi)
    assert_close(out, oracle.sapa(q, k, v, 3, s))
    assert_close(F.window_similarity(q, k, 3, s, **REF), oracle.window_similarity(q, k, 3, s))
    assert_close(F.reassemble(w, v, 3, s, 2, **REF), oracle.reassemble(w, v, 3, s, 2))


def _offsets(B, G, P, hi, spread=2.5):
    """Random offsets in [-spread, spread]: some samples land partly or fully outside the map; every
    fifth channel is rounded to integers (samples exactly at pixel centres)."""
    off = (torch.rand(B, 2 * G * P, *hi, dtype=F64) * 2 - 1) * spread
    off[:, 0::5] = off[:, 0::5].round()  # integer offsets sample pixel centres
    return off


DEFORM_CASES = [pytest.param(G, P, s, B, id=f"G{G}-P{P}-s{s}-B{B}")
                for G, P, s, B in [(1, 1, 2, 1), (1, 9, 2, 3), (2, 4, 3, 1), (2, 9, 4, 3),
                                   (4, 9, 2, 1), (4, 3, 3, 3), (4, 2, 4, 1)]]


@pytest.mark.parametrize("G, P, s, B", DEFORM_CASES)
def test_deform_similarity(G, P, s, B):
    lo = (3, 5)
    q, k = torch.randn(B, 2 * G, *_hi(lo, s), dtype=F64), torch.randn(B, 2 * G, *lo, dtype=F64)
    off = _offsets(B, G, P, _hi(lo, s))
    assert_close(F.deform_similarity(q, k, off, P, G, s, **REF), oracle.deform_similarity(q, k, off, P, G, s))


@pytest.mark.parametrize("G, P, s, B", DEFORM_CASES)
def test_deform_reassemble(G, P, s, B):
    lo = (5, 3)
    w = torch.randn(B, G, P, *_hi(lo, s), dtype=F64)
    v = torch.randn(B, 2 * G, *lo, dtype=F64)
    off = _offsets(B, G, P, _hi(lo, s))
    assert_close(F.deform_reassemble(w, v, off, P, G, s, **REF), oracle.deform_reassemble(w, v, off, P, G, s))


@pytest.mark.parametrize("G, P, s, B", DEFORM_CASES)
def test_sapa_deform(G, P, s, B):
    lo = (3, 3)
    hi = _hi(lo, s)
    q, k = 2 * torch.randn(B, 2 * G, *hi, dtype=F64), torch.randn(B, 2 * G, *lo, dtype=F64)
    v = torch.randn(B, G, *lo, dtype=F64)  # one value channel per group
    off = _offsets(B, G, P, hi)
    assert_close(F.sapa_deform(q, k, v, off, P, G, s, **REF), oracle.sapa_deform(q, k, v, off, P, G, s))


def test_deform_edges_exact():
    """Samples exactly on the edges of the official in-range test (-1 < y < H): y = -1 and y = H give
    0, y = -0.5 gives half of row 0, y = H - 0.5 half of row H - 1; likewise for x."""
    lo, s, G, P = (3, 4), 2, 1, 8
    hi = _hi(lo, s)
    v = torch.randn(1, 2, *lo, dtype=F64)
    off = torch.zeros(1, 2 * G * P, *hi, dtype=F64)
    base_y = (torch.arange(hi[0], dtype=F64) // s).view(-1, 1)
    base_x = (torch.arange(hi[1], dtype=F64) // s).view(1, -1)
    targets = [(-1.0, 1.0), (lo[0], 1.0), (-0.5, 1.0), (lo[0] - 0.5, 2.0),  # (y, x) absolute
               (1.0, -1.0), (1.0, lo[1]), (2.0, -0.5), (0.0, lo[1] - 0.5)]
    for p, (ty, tx) in enumerate(targets):
        off[0, 2 * p] = tx - base_x
        off[0, 2 * p + 1] = ty - base_y
    for p in range(P):
        w = torch.zeros(1, G, P, *hi, dtype=F64)
        w[:, :, p] = 1.0
        out = F.deform_reassemble(w, v, off, P, G, s, **REF)
        assert_close(out, oracle.deform_reassemble(w, v, off, P, G, s), what=f"point {p}")
    # and the oracle itself on those edges, by hand
    img = v[0, 0].tolist()
    assert oracle.bilinear(img, -1.0, 1.0) == 0.0
    assert oracle.bilinear(img, lo[0], 1.0) == 0.0
    assert oracle.bilinear(img, 1.0, -1.0) == 0.0
    assert oracle.bilinear(img, 1.0, lo[1]) == 0.0
    assert oracle.bilinear(img, -0.5, 1.0) == pytest.approx(0.5 * img[0][1], abs=1e-15)
    assert oracle.bilinear(img, lo[0] - 0.5, 2.0) == pytest.approx(0.5 * img[lo[0] - 1][2], abs=1e-15)
    assert oracle.bilinear(img, 0.25, 1.5) == pytest.approx(
        0.75 * 0.5 * img[0][1] + 0.75 * 0.5 * img[0][2] + 0.25 * 0.5 * img[1][1] + 0.25 * 0.5 * img[1][2], abs=1e-15)


@pytest.mark.parametrize("lo, s, trim", CEIL_CASES)
def test_deform_ops_ceil_mode(lo, s, trim):
    hi = _hi(lo, s, trim)
    G, P = 2, 3
    q, k = torch.randn(2, 2 * G, *hi, dtype=F64), torch.randn(2, 2 * G, *lo, dtype=F64)
    v = torch.randn(2, 2 * G, *lo, dtype=F64)
    off = _offsets(2, G, P, hi, spread=1.5)
    out = F.sapa_deform(q, k, v, off, P, G, s, **REF)
    assert out.shape == (2, 2 * G, *hi)
    assert_close(out, oracle.sapa_deform(q, k, v, off, P, G, s))
    assert_close(F.deform_similarity(q, k, off, P, G, s, **REF), oracle.deform_similarity(q, k, off, P, G, s))


def test_batch_zero():
    lo, s, G, P = (3, 5), 2, 2, 3
    hi = _hi(lo, s)
    q, k, v = torch.randn(0, 4, *hi, dtype=F64), torch.randn(0, 4, *lo, dtype=F64), torch.randn(0, 4, *lo, dtype=F64)
    off, w = torch.zeros(0, 2 * G * P, *hi, dtype=F64), torch.rand(0, 2 * 9, *hi, dtype=F64)
    wd = torch.rand(0, G, P, *hi, dtype=F64)
    cases = {
        "window_similarity": (F.window_similarity(q, k, 3, s, **REF), oracle.window_similarity(q, k, 3, s)),
        "reassemble": (F.reassemble(w, v, 3, s, 2, **REF), oracle.reassemble(w, v, 3, s, 2)),
        "sapa": (F.sapa(q, k, v, 3, s, **REF), oracle.sapa(q, k, v, 3, s)),
        "deform_similarity": (F.deform_similarity(q, k, off, P, G, s, **REF),
                              oracle.deform_similarity(q, k, off, P, G, s)),
        "deform_reassemble": (F.deform_reassemble(wd, v, off, P, G, s, **REF),
                              oracle.deform_reassemble(wd, v, off, P, G, s)),
        "sapa_deform": (F.sapa_deform(q, k, v, off, P, G, s, **REF), oracle.sapa_deform(q, k, v, off, P, G, s)),
    }
    expected_shapes = {"window_similarity": (0, 9, *hi), "deform_similarity": (0, G, P, *hi)}
    for name, (got, want) in cases.items():
        assert got.shape == expected_shapes.get(name, (0, 4, *hi)), name
        assert want.shape == got.shape, name


def test_float32_inputs_match_oracle():
    """float32 in, float32 out, within the float32 tolerance of the float64 oracle."""
    q, k, v = torch.randn(1, 4, 10, 6), torch.randn(1, 4, 5, 3), torch.randn(1, 4, 5, 3)
    out = F.sapa(q, k, v, 5, 2, **REF)
    assert out.dtype == torch.float32
    assert_close(out, oracle.sapa(q, k, v, 5, 2).float())
    off = _offsets(1, 2, 3, (10, 6)).float()
    out = F.sapa_deform(q, k, v, off, 3, 2, 2, **REF)
    assert out.dtype == torch.float32
    assert_close(out, oracle.sapa_deform(q, k, v, off, 3, 2, 2).float())


def test_s1_identity_scale():
    """scale_factor = 1 is valid: each output pixel uses the window around itself."""
    q, k, v = torch.randn(1, 3, 4, 5, dtype=F64), torch.randn(1, 3, 4, 5, dtype=F64), torch.randn(1, 2, 4, 5, dtype=F64)
    assert_close(F.sapa(q, k, v, 3, 1, **REF), oracle.sapa(q, k, v, 3, 1))
