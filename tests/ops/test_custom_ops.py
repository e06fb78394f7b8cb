"""The torch.library custom ops of the cpu backend: opcheck (schema, fake/meta, autograd
registration, aot dispatch), gradcheck in float64 through the ops, torch.compile(fullgraph=True)
without graph breaks, meta-device shape inference, and that sapa.functional picks them."""
from __future__ import annotations

import functools

import pytest
import torch
from torch.autograd import gradcheck

import sapa.ops.deform.op  # noqa: F401 - registers the sapa::*_cpu ops
import sapa.ops.window.op  # noqa: F401
from sapa import backends
from sapa import functional as Fn

F64 = torch.float64


def _r(*shape, dtype=F64, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _off(B, G, P, hq, dtype=F64, grad=True):
    whole = torch.randint(-2, 2, (B, 2 * G * P, *hq)).to(dtype)
    return (whole + 0.2 + 0.6 * torch.rand(B, 2 * G * P, *hq, dtype=dtype)).requires_grad_(grad)


def _cases(dtype=F64, grad=True):
    """(op overload, args) of every forward and backward custom op, small and with a ceil-mode guide."""
    r = functools.partial(_r, dtype=dtype, grad=grad)
    hq = (7, 6)  # from 4x3 at s=2: ceil mode in H
    q, k, v = r(2, 3, *hq), r(2, 3, 4, 3), r(2, 4, 4, 3)
    w = r(2, 2 * 9, *hq)
    ops = torch.ops.sapa
    lse = ops.sapa_fwd_cpu(q.detach(), k.detach(), v.detach(), 3, 2)[1]
    G, P = 2, 3
    qd, kd, vd, off = r(2, 4, *hq), r(2, 4, 4, 3), r(2, 4, 4, 3), _off(2, G, P, hq, dtype, grad)
    wd = r(2, G, P, *hq)
    savedd = ops.sapa_deform_fwd_cpu(qd.detach(), kd.detach(), vd.detach(), off.detach(), P, G, 2)[1:]
    g4, gd = r(2, 4, *hq, grad=False), r(2, 4, *hq, grad=False)
    return [
        ("window_similarity_fwd", ops.window_similarity_fwd_cpu.default, (q, k, 3, 2)),
        ("window_similarity_bwd", ops.window_similarity_bwd_cpu.default, (r(2, 9, *hq, grad=False), q, k, 3, 2)),
        ("reassemble_fwd", ops.reassemble_fwd_cpu.default, (w, v, 3, 2, 2)),
        ("reassemble_bwd", ops.reassemble_bwd_cpu.default, (g4, w, v, 3, 2, 2)),
        ("sapa_fwd", ops.sapa_fwd_cpu.default, (q, k, v, 3, 2)),
        ("sapa_bwd", ops.sapa_bwd_cpu.default, (g4, q, k, v, lse, 3, 2)),
        ("deform_similarity_fwd", ops.deform_similarity_fwd_cpu.default, (qd, kd, off, P, G, 2)),
        ("deform_similarity_bwd", ops.deform_similarity_bwd_cpu.default,
         (r(2, G, P, *hq, grad=False), qd, kd, off, P, G, 2)),
        ("deform_reassemble_fwd", ops.deform_reassemble_fwd_cpu.default, (wd, vd, off, P, G, 2)),
        ("deform_reassemble_bwd", ops.deform_reassemble_bwd_cpu.default, (gd, wd, vd, off, P, G, 2)),
        ("sapa_deform_fwd", ops.sapa_deform_fwd_cpu.default, (qd, kd, vd, off, P, G, 2)),
        ("sapa_deform_bwd", ops.sapa_deform_bwd_cpu.default, (gd, qd, kd, vd, off, *savedd, P, G, 2)),
    ]


CASE_IDS = [c[0] for c in _cases()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("idx", range(len(CASE_IDS)), ids=CASE_IDS)
def test_opcheck(idx, dtype):
    name, op, args = _cases(dtype)[idx]
    if name.endswith("_bwd"):  # no autograd formula for the backward (second derivatives)
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("idx", range(len(CASE_IDS)), ids=CASE_IDS)
def test_fake_matches_real_on_meta(idx):
    name, op, args = _cases(torch.float32, grad=False)[idx]
    real = op(*args)
    meta = op(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
    real = real if isinstance(real, tuple) else (real,)
    meta = meta if isinstance(meta, tuple) else (meta,)
    for r, m in zip(real, meta):
        assert m.device.type == "meta"
        assert (r.shape, r.dtype, r.stride()) == (m.shape, m.dtype, m.stride())


def _offsets(*a):
    return _off(*a)


GRADCHECK = {
    "window_similarity": lambda: ((_r(2, 3, 7, 6), _r(2, 3, 4, 3)), dict(kernel_size=3, scale_factor=2)),
    "reassemble": lambda: ((_r(2, 18, 7, 6), _r(2, 4, 4, 3)), dict(kernel_size=3, scale_factor=2, groups=2)),
    "sapa": lambda: ((_r(2, 3, 7, 6), _r(2, 3, 4, 3), _r(2, 2, 4, 3)), dict(kernel_size=3, scale_factor=2)),
    "sapa_K5_s3": lambda: ((_r(1, 2, 8, 9), _r(1, 2, 3, 3), _r(1, 2, 3, 3)), dict(kernel_size=5, scale_factor=3)),
    "deform_similarity": lambda: ((_r(1, 4, 7, 6), _r(1, 4, 4, 3), _offsets(1, 2, 3, (7, 6))),
                                  dict(num_points=3, groups=2, scale_factor=2)),
    "deform_reassemble": lambda: ((_r(1, 2, 3, 7, 6), _r(1, 4, 4, 3), _offsets(1, 2, 3, (7, 6))),
                                  dict(num_points=3, groups=2, scale_factor=2)),
    "sapa_deform": lambda: ((_r(1, 4, 7, 6), _r(1, 4, 4, 3), _r(1, 4, 4, 3), _offsets(1, 2, 3, (7, 6))),
                            dict(num_points=3, groups=2, scale_factor=2)),
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck_float64(name):
    args, kw = GRADCHECK[name]()
    fn = functools.partial(getattr(Fn, name.split("_K")[0]), backend="cpu", **kw)
    assert gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_functional_picks_the_cpu_backend_and_the_custom_op():
    q, k, v = (_r(1, 3, 6, 6, dtype=torch.float32), _r(1, 3, 3, 3, dtype=torch.float32),
               _r(1, 2, 3, 3, dtype=torch.float32))
    assert backends.choose_backend("sapa", q, k, v) == "cpu"
    out = Fn.sapa(q, k, v, 3, 2)
    assert "sapa_sapa_fwd_cpu" in out.grad_fn.name()  # the custom op's autograd node
    with backends.use_backend("reference"):
        ref = Fn.sapa(q, k, v, 3, 2)
    assert torch.allclose(out, ref, atol=1e-5)


def _module_fn(q, k, v, off):
    ops = torch.ops.sapa
    a = ops.sapa_fwd_cpu(q, k, v, 3, 2)[0]
    w = torch.softmax(ops.window_similarity_fwd_cpu(q, k, 3, 2), dim=1)
    b = ops.reassemble_fwd_cpu(w, v, 3, 2, 1)
    c = ops.sapa_deform_fwd_cpu(q, k, v, off, 2, 1, 2)[0]
    lg = torch.softmax(ops.deform_similarity_fwd_cpu(q, k, off, 2, 1, 2), dim=2)
    d = ops.deform_reassemble_fwd_cpu(lg, v, off, 2, 1, 2)
    return (a + b + c + d).square().sum()


def test_torch_compile_fullgraph():
    """All six forward ops and their backward ops in one graph, no graph break (fullgraph=True raises
    on one), same values and gradients as eager. aot_eager traces the real aten/custom-op graph
    (forward and backward) without inductor's slow codegen."""
    torch._dynamo.reset()
    args = [_r(1, 3, 6, 8, dtype=torch.float32), _r(1, 3, 3, 4, dtype=torch.float32),
            _r(1, 3, 3, 4, dtype=torch.float32), _off(1, 1, 2, (6, 8), torch.float32)]
    eager_args = [a.detach().clone().requires_grad_() for a in args]
    compiled = torch.compile(_module_fn, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    out.backward()
    ref = _module_fn(*eager_args)
    ref.backward()
    assert torch.allclose(out, ref, rtol=1e-5)
    for a, b in zip(args, eager_args):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_torch_compile_of_the_sapa_modules():
    """A SAPA-B / SAPA-D module compiled as a whole with fullgraph=True: the backend dispatch in
    ``sapa.functional`` is resolved once while compiling (backends._choose_while_compiling), so
    the module traces without a graph break; values and gradients equal eager."""
    from sapa.registry import build_upsampler

    torch._dynamo.reset()
    for name in ("sapa_b", "sapa_d"):
        up = build_upsampler(name, 32)
        x, y = torch.randn(1, 32, 4, 5), torch.randn(1, 32, 8, 10)
        compiled = torch.compile(up, backend="aot_eager", fullgraph=True)
        out = compiled(x, y)
        assert torch.allclose(out, up(x, y), rtol=1e-5, atol=1e-6)
        out.square().mean().backward()
        assert all(p.grad is not None for p in up.parameters() if p.requires_grad)
