"""torch.compile, torch.export, autocast and channels_last for every registered upsampler."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sapa
from sapa.export import HOSTS, build_host, export_program

from _compare import assert_close
from ._helpers import build, inputs, max_rel_error

NAMES = sapa.list_upsamplers()


class _SapaOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("sapa."):
            self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", NAMES)
def test_compile_fullgraph_no_recompile_across_batch(name):
    torch._dynamo.reset()
    up = build(name).eval()
    compiled = torch.compile(up, fullgraph=True, backend="eager")  # graph breaks raise with fullgraph
    a = inputs(name, 2, 4, 5)
    for t in a:
        torch._dynamo.mark_dynamic(t, 0)
    with torch.no_grad():
        assert_close(compiled(*a), up(*a), what=f"{name} compiled")
        b = inputs(name, 3, 4, 5)
        with torch.compiler.set_stance("fail_on_recompile"):  # raises if batch 3 needs a new graph
            out = compiled(*b)
        assert_close(out, up(*b), what=f"{name} compiled, batch 3")


@pytest.mark.parametrize("name", NAMES)
def test_torch_export_dynamic(name):
    up = build(name).eval()
    ep = export_program(up, inputs(name, 2, 4, 5))
    with torch.no_grad(), _SapaOps() as seen:
        up(*inputs(name, 2, 4, 5))
    in_graph = {str(n.target) for n in ep.graph.nodes if n.op == "call_function" and str(n.target).startswith("sapa.")}
    assert in_graph == seen.ops, f"{name}: custom ops in the graph {in_graph} != called eagerly {seen.ops}"
    for B, H, W, ceil in ((3, 5, 7, 1), (1, 3, 6, 0)):  # other batch, sizes, a ceil-mode guide
        args = inputs(name, B, H, W, ceil)
        with torch.no_grad():
            out, ref = ep.module()(*args), up(*args)
        assert out.shape == ref.shape
        assert max_rel_error(out, ref) < 1e-5, name


@pytest.mark.parametrize("name", NAMES)
def test_autocast_bf16_cpu(name):
    up = build(name)
    args = inputs(name, 2, 4, 5, requires_grad=True)
    with torch.no_grad():
        ref = up(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = up(*args)
    assert out.dtype == torch.bfloat16, f"{name}: {out.dtype} under bf16 autocast"
    # bf16 has an 8-bit mantissa: one rounding is 2e-3 relative RMS; DySample's offsets from a bf16
    # conv move its sampling positions (1.4e-2 measured), hence 3e-2 for every upsampler.
    assert_close(out.float(), ref, rtol=3e-2, atol=1e-3, what=f"{name} bf16 autocast")
    out.float().square().mean().backward()
    for n, p in list(up.named_parameters()) + [(f"input {i}", t) for i, t in enumerate(args)]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: gradient of {n}"


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_autocast_cuda(name, dtype):
    up = build(name).cuda()
    args = tuple(t.cuda() for t in inputs(name, 2, 4, 5))
    with torch.no_grad():
        ref = up(*args)
        with torch.autocast("cuda", dtype=dtype):
            out = up(*args)
    assert out.dtype == dtype
    assert_close(out.float(), ref, rtol=3e-2 if dtype == torch.bfloat16 else 5e-3, atol=1e-3, what=name)


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_in_and_out(name):
    up = build(name)
    args = inputs(name, 2, 4, 5)
    cl = tuple(t.to(memory_format=torch.channels_last).requires_grad_() for t in args)
    out = up(*cl)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous(), name
    with torch.no_grad():
        assert_close(out, up(*args), what=f"{name} channels_last")
    out.square().mean().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in cl)
    assert up(*args).is_contiguous(), f"{name}: a contiguous input must give a contiguous output"


# SegFormer-B1 runs by default: its transformers encoder is where a fresh model used to graph-break
# (transformers installs its output hooks on the first forward, under a lock dynamo cannot trace).
_HOST_CASES = [h if h == "segformer-b1" else pytest.param(h, marks=pytest.mark.slow) for h in HOSTS]


@pytest.mark.parametrize("host", _HOST_CASES)
def test_host_compile_fullgraph_no_recompile_across_batch(host):
    """A fresh host (never run eagerly before) compiles with fullgraph at a small size, and a new
    batch size reuses the graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = build_host(host, upsampler="sapa_b", num_classes=5)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.mark_dynamic(x, 0)

    def check(got, want, what):
        got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))  # FPN: a tuple of maps
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_close(g, w, what=what)

    with torch.no_grad():
        check(compiled(x), m(x), f"{host} compiled")
        x3 = torch.randn(3, 3, 64, 64)
        with torch.compiler.set_stance("fail_on_recompile"):
            out3 = compiled(x3)
        check(out3, m(x3), f"{host} compiled, batch 3")
