"""Comparison helper for tests: relative-RMS error with an absolute floor and a per-dtype tolerance
table (never one global allclose).

    assert_close(actual, expected)            # tolerance from actual's dtype
    assert_close(actual, expected, rtol=1e-3) # explicit
"""
from __future__ import annotations

import torch

# dtype -> (relative-RMS tolerance, absolute floor on the RMS error)
TOLERANCE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-6),
    torch.bfloat16: (2e-2, 1e-3),
    torch.float16: (3e-3, 1e-4),
}


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    err = (a - e).pow(2).mean().sqrt().item() if a.numel() else 0.0
    ref = e.pow(2).mean().sqrt().item() if e.numel() else 0.0
    return err, ref


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float | None = None,
                 atol: float | None = None, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    r, a = TOLERANCE.get(actual.dtype, TOLERANCE[torch.float32])
    rtol = r if rtol is None else rtol
    atol = a if atol is None else atol
    a_nan, e_nan = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(a_nan.cpu(), e_nan.cpu()), f"{what}: NaN pattern differs"
    err, ref = rel_rms(actual[~a_nan], expected[~e_nan])
    assert err <= rtol * ref + atol, (
        f"{what}: RMS error {err:.3e} > rtol {rtol:.1e} * RMS {ref:.3e} + atol {atol:.1e} "
        f"(max abs diff {(actual.double() - expected.double()).abs().max().item():.3e})")
