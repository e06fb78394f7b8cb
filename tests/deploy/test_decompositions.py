"""The pure-aten forms written to ONNX equal what they replace, eagerly and in float64."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from sapa.export import pixel_shuffle, softmax_not_last
from sapa.ops.window import export as X
from sapa.ops.window import reference as R


@pytest.mark.parametrize("K,s,G,size,ceil", list(itertools.product((3, 5), (2, 4), (1, 2), ((5, 7), (1, 1)), (0, 1))))
def test_window_decompositions_equal_the_reference(K, s, G, size, ceil):
    torch.manual_seed(0)
    H, W = size
    Hq, Wq = s * H - ceil, s * W - ceil
    f64 = dict(dtype=torch.float64)
    q, k = torch.randn(2, 6, Hq, Wq, **f64), torch.randn(2, 6, H, W, **f64)
    v, w = torch.randn(2, 8, H, W, **f64), torch.randn(2, G * K * K, Hq, Wq, **f64)
    torch.testing.assert_close(X.window_similarity(q, k, K, s), R.window_similarity(q, k, K, s), rtol=0, atol=1e-12)
    torch.testing.assert_close(X.reassemble(w, v, K, s, G), R.reassemble(w, v, K, s, G), rtol=0, atol=1e-12)
    out, lse = X.sapa(q, k, v, K, s)
    torch.testing.assert_close(out, R.sapa(q, k, v, K, s), rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(R.window_similarity(q, k, K, s), 1), rtol=0, atol=1e-12)


def test_window_decompositions_keep_half_precision_dtype():
    w = torch.softmax(torch.randn(1, 9, 8, 8), 1).to(torch.bfloat16)
    v = torch.randn(1, 4, 4, 4, dtype=torch.bfloat16)
    out = X.reassemble(w, v, 3, 2, 1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), R.reassemble(w.float(), v.float(), 3, 2, 1), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("s", [2, 3])
def test_pixel_shuffle_form(s):
    t = torch.randn(2, 4 * s * s, 5, 7)
    assert torch.equal(pixel_shuffle(t, s), F.pixel_shuffle(t, s))


def test_softmax_not_last():
    x = torch.randn(2, 3, 25, 6, 7, dtype=torch.float64)
    for dim in range(4):
        torch.testing.assert_close(softmax_not_last(x, dim, False), torch.softmax(x, dim), rtol=0, atol=1e-15)
    assert softmax_not_last(x, 4, False) is NotImplemented  # the last dim keeps the Softmax op
    assert softmax_not_last(x, -1, False) is NotImplemented


def test_crop_form():
    t = torch.randn(2, 3, 10, 12, 4)
    assert torch.equal(X.crop(t, 7, 9, dims=(2, 3)), t[:, :, :7, :9])
    assert torch.equal(X.crop(t, 10, 12, dims=(2, 3)), t)
    u = torch.randn(2, 3, 10, 12)
    assert torch.equal(X.crop(u, 9, 11), u[..., :9, :11])
