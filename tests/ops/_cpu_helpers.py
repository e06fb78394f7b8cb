"""Shared helpers of the cpu-backend tests: run an op on the cpu backend and on the reference with
the same inputs and compare the output and every gradient with the per-dtype tolerances."""
from __future__ import annotations

import contextlib

import pytest
import torch

from _compare import assert_close
from sapa import functional as Fn

#: the dtypes every cpu-backend op is compared in (half precision computes in float32)
DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32"),
          pytest.param(torch.bfloat16, id="bf16")]


def leaves(tensors, dtype=None, channels_last=False):
    out = []
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        t = t.detach().to(dtype or t.dtype)
        if channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t.requires_grad_(True))
    return out


def run(op, args, kwargs, backend, grad_seed=1):
    args = leaves(args)
    out = getattr(Fn, op)(*args, backend=backend, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    ts = [a for a in args if isinstance(a, torch.Tensor)]
    grads = torch.autograd.grad(out, ts, g, allow_unused=True)
    # the reference's empty-batch path builds zeros unconnected to the inputs: gradient None = 0
    grads = [torch.zeros_like(t) if gr is None and t.numel() == 0 else gr for gr, t in zip(grads, ts)]
    return out, grads


def compare_to_reference(op, args, kwargs, what="", rtol=None, atol=None):
    """cpu vs reference on the forward and on the gradient of every tensor input."""
    out, grads = run(op, args, kwargs, "cpu")
    ref, rgrads = run(op, args, kwargs, "reference")
    assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
    assert_close(out, ref, rtol=rtol, atol=atol, what=f"{op} {what} forward")
    for i, (a, b) in enumerate(zip(grads, rgrads)):
        assert a is not None and b is not None
        assert a.dtype == b.dtype
        assert_close(a, b, rtol=rtol, atol=atol, what=f"{op} {what} grad of input {i}")
    return out, grads


@contextlib.contextmanager
def threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
