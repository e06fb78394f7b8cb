"""The MAC counter (sapa.complexity) against hand-computed counts, and the papers' complexity
columns (docs/SEMANTICS.md §4, §7) reproduced by ``sapa complexity``.

Every expected number below is written out from the formula in docs/SEMANTICS.md §4.2 / §4.1, not taken from
the counter's code."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sapa
from sapa import complexity as cx
from sapa import functional as Fn
from sapa.complexity import MacCounter, count_complexity, op_macs

# a module-level binding made before any counter exists: only found when the module is passed in
from sapa.functional import reassemble as bound_reassemble  # noqa: E402


def _count(fn, *args, sampling_macs=4, modules=(), **kwargs):
    with torch.no_grad(), MacCounter(sampling_macs, modules) as mc:
        fn(*args, **kwargs)
    return mc


@pytest.fixture(params=["cpu", "meta"])
def device(request):
    return request.param


# --- custom ops: hand formulas ------------------------------------------------------------------------
def test_window_similarity_macs(device):
    q, k = torch.randn(2, 8, 10, 12, device=device), torch.randn(2, 8, 5, 6, device=device)
    expected = 2 * 10 * 12 * 8 * 25  # B * H' * W' * d * K^2
    mc = _count(Fn.window_similarity, q, k, 5, 2)
    assert mc.macs == expected and mc.by_op == {"sapa.window_similarity": expected}
    assert op_macs("window_similarity", q, k, kernel_size=5) == expected


def test_window_ops_ceil_mode_and_kernel_size(device):
    q, k, v = (torch.randn(1, 4, 9, 11, device=device), torch.randn(1, 4, 5, 6, device=device),
               torch.randn(1, 6, 5, 6, device=device))
    assert _count(Fn.sapa, q, k, v, 3, 2).macs == 9 * 11 * (4 + 6) * 9
    w = torch.randn(1, 2 * 49, 9, 11, device=device)
    assert _count(Fn.reassemble, w, v, 7, 2, 2).macs == 9 * 11 * 6 * 49  # groups do not change the count


def test_reassemble_and_sapa_macs(device):
    B, C, d, H, W, s, K = 2, 16, 4, 6, 5, 2, 5
    w = torch.randn(B, K * K, s * H, s * W, device=device)
    v = torch.randn(B, C, H, W, device=device)
    q, k = torch.randn(B, d, s * H, s * W, device=device), torch.randn(B, d, H, W, device=device)
    assert _count(Fn.reassemble, w, v, K, s).macs == B * s * H * s * W * C * K * K
    mc = _count(Fn.sapa, q, k, v, K, s)
    assert mc.macs == B * s * H * s * W * (d + C) * K * K
    assert list(mc.by_op) == ["sapa.sapa"]  # the reference's einsum/bmm is not counted on top


@pytest.mark.parametrize("sampling_macs", [0, 4, 8])
def test_deform_ops_macs(device, sampling_macs):
    B, G, d, P, C, H, W, s = 1, 4, 3, 9, 8, 4, 5, 2
    q, k = torch.randn(B, G * d, s * H, s * W, device=device), torch.randn(B, G * d, H, W, device=device)
    v = torch.randn(B, C, H, W, device=device)
    off = torch.randn(B, 2 * G * P, s * H, s * W, device=device)
    N = B * s * H * s * W
    sim = N * G * d * P * (1 + sampling_macs)  # P dot products of d per group + sampling G*d*P scalars
    rea = N * C * P * (1 + sampling_macs)
    assert _count(Fn.deform_similarity, q, k, off, P, G, s, sampling_macs=sampling_macs).macs == sim
    wts = torch.softmax(torch.randn(B, G, P, s * H, s * W, device=device), 2)
    assert _count(Fn.deform_reassemble, wts, v, off, P, G, s, sampling_macs=sampling_macs).macs == rea
    mc = _count(Fn.sapa_deform, q, k, v, off, P, G, s, sampling_macs=sampling_macs)
    assert mc.macs == sim + rea and list(mc.by_op) == ["sapa.sapa_deform"]


def test_bound_reference_counted_once_when_its_module_is_given():
    w, v = torch.softmax(torch.randn(1, 25, 8, 8), 1), torch.randn(1, 4, 4, 4)
    expected = 8 * 8 * 4 * 25
    assert _count(bound_reassemble, w, v, modules=[sys.modules[__name__]]).by_op == {"sapa.reassemble": expected}
    assert bound_reassemble is Fn.reassemble  # both restored after the block
    assert not hasattr(Fn.reassemble, "__sapa_complexity_wrapped__")  # restored after the block
    assert not hasattr(bound_reassemble, "__sapa_complexity_wrapped__")


def test_custom_op_gets_formula_not_its_internals(monkeypatch):
    """A custom op of the sapa namespace named like a functional op is counted by the formula, and
    the einsum its implementation runs is not counted on top. (A test namespace stands in for
    ``sapa`` so that no test op is added to the library's namespace.)"""
    name = "reassemble_fwd_cpu"
    if not hasattr(torch.ops.sapatest, name):
        @torch.library.custom_op(f"sapatest::{name}", mutates_args=())
        def _op(weights: torch.Tensor, v: torch.Tensor, kernel_size: int, scale_factor: int,
                groups: int) -> torch.Tensor:
            return Fn.reassemble(weights, v, kernel_size, scale_factor, groups, backend="reference")

        @_op.register_fake
        def _(weights, v, kernel_size, scale_factor, groups):
            return v.new_empty(v.shape[0], v.shape[1], *weights.shape[-2:])
    monkeypatch.setattr(cx, "_NAMESPACE", "sapatest")
    op = getattr(torch.ops.sapatest, name)
    w, v = torch.softmax(torch.randn(2, 9, 6, 8), 1), torch.randn(2, 5, 3, 4)
    mc = _count(op, w, v, 3, 2, 1)
    assert mc.macs == 2 * 6 * 8 * 5 * 9
    assert all("einsum" not in k and "bmm" not in k for k in mc.by_op)


def test_library_cpu_custom_ops_counted_once():
    """The project's own forward custom ops (``torch.ops.sapa.<op>_fwd_cpu``), called directly or
    through the functional ops on the cpu backend, give the formula's count."""
    import importlib.util

    if not sapa.backends.can_run_cpu("sapa", torch.zeros(1)):
        pytest.skip("cpu backend unavailable")
    for mod in ("sapa.ops.window.op", "sapa.ops.deform.op"):
        if importlib.util.find_spec(mod) is not None:
            __import__(mod)
    if not hasattr(torch.ops.sapa, "sapa_fwd_cpu"):
        pytest.skip("no sapa_fwd_cpu custom op")
    q, k, v = torch.randn(1, 4, 8, 10), torch.randn(1, 4, 4, 5), torch.randn(1, 6, 4, 5)
    expected = 8 * 10 * (4 + 6) * 25
    assert _count(torch.ops.sapa.sapa_fwd_cpu, q, k, v, 5, 2).by_op == {"sapa.sapa": expected}
    assert _count(Fn.sapa, q, k, v, 5, 2, backend="cpu").by_op == {"sapa.sapa": expected}


def test_register_op_formula_for_other_names():
    name = "cxtest_double"
    if not hasattr(torch.ops.sapatest, name):
        @torch.library.custom_op(f"sapatest::{name}", mutates_args=())
        def _op(x: torch.Tensor) -> torch.Tensor:
            return x @ x  # would count n^3 MACs if the formula did not replace it

        @_op.register_fake
        def _(x):
            return torch.empty_like(x)
    op = getattr(torch.ops.sapatest, name)
    cx.register_op_formula(op, lambda x: 7 * x.numel())
    try:
        assert _count(op, torch.randn(4, 4)).macs == 7 * 16
    finally:
        cx._EXTRA_CUSTOM_FORMULAS.pop(op, None)
    with pytest.raises(TypeError):
        cx.register_op_formula("sapa::nope", lambda x: 0)


# --- standard layers -----------------------------------------------------------------------------------
class _Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.deconv = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))                      # 10x10
        y = self.dw(y)
        y = self.deconv(y)                                      # 20x20
        y = F.interpolate(y, scale_factor=0.5, mode="bilinear")  # fixed resize: not counted
        z = self.fc(y.flatten(2).transpose(1, 2))               # [1, 100, 4]
        return torch.bmm(z.transpose(1, 2), z)                  # [1, 4, 4]


def test_standard_layers(device):
    with torch.device(device):
        m = _Layers()
    c = count_complexity(m, torch.randn(1, 3, 10, 10, device=device))
    expected = (3 * 9 * 8 * 100          # conv: Cin*k^2*Cout per output pixel; bias, BN, ReLU ignored
                + 1 * 9 * 8 * 100        # depthwise: Cin/groups = 1
                + 8 * 9 * 8 * 400        # deconv per OUTPUT pixel (docs/SEMANTICS.md §4.1), not per input pixel
                + 100 * 8 * 4            # linear
                + 4 * 100 * 4)           # bmm
    assert c.macs == expected
    assert c.params == sum(p.numel() for p in m.parameters())


def test_attention_counted_cpu_kernel_and_meta(device):
    q = torch.randn(1, 2, 16, 8, device=device)
    k, v = torch.randn(1, 2, 4, 8, device=device), torch.randn(1, 2, 4, 8, device=device)
    mc = _count(F.scaled_dot_product_attention, q, k, v)
    assert mc.macs == 1 * 2 * 16 * 4 * (8 + 8)  # q k^T and attn v


def test_grid_sample_sampling_macs(device):
    x, g = torch.randn(1, 3, 5, 5, device=device), torch.rand(1, 6, 7, 2, device=device) * 2 - 1
    assert _count(F.grid_sample, x, g, align_corners=False).macs == 4 * 3 * 6 * 7
    assert _count(F.grid_sample, x, g, align_corners=False, sampling_macs=8).macs == 8 * 3 * 6 * 7
    assert _count(F.grid_sample, x, g, mode="nearest", align_corners=False).macs == 0


def test_counts_do_not_depend_on_backend_or_device():
    """SAPA-D / SAPA-B in a head: meta vs CPU and the reference vs an automatic backend agree."""
    from sapa.models.segformer import SegFormerHead

    feats = [torch.randn(1, c, h, h) for c, h in zip([8, 16, 24, 32], [16, 8, 4, 2])]
    for up in ("sapa_d", "sapa_b"):
        torch.manual_seed(0)
        head = SegFormerHead([8, 16, 24, 32], embed_dim=32, num_classes=3, upsampler=up)
        a = count_complexity(head, feats).macs
        b = count_complexity(head, feats, backend=None).macs
        with torch.device("meta"):
            mhead = SegFormerHead([8, 16, 24, 32], embed_dim=32, num_classes=3, upsampler=up)
        c = count_complexity(mhead, [f.to("meta") for f in feats]).macs
        assert a == b == c


def test_head_delta_is_the_op_formula():
    """SAPA-I adds exactly 2*K^2*C*N MACs to the SegFormer head (N = all high-res points of the six
    upsamplers) over the bilinear baseline; SAPA-B adds Cd(N + n) + K^2(d + C)N (docs/SEMANTICS.md §4.2)."""
    from sapa.models.segformer import SegFormerHead

    C, d, K = 32, 32, 5
    sizes = [16, 8, 4, 2]
    feats = [torch.randn(1, c, h, h, device="meta") for c, h in zip([8, 16, 24, 32], sizes)]
    hi = [4, 8, 16, 8, 16, 16]  # output side of up0..up5 (_c4: 2 -> 4 -> 8 -> 16, _c3: 4 -> 8 -> 16, _c2: 8 -> 16)
    lo = [2, 4, 8, 4, 8, 8]     # input side
    N, n = sum(h * h for h in hi), sum(h * h for h in lo)
    with torch.device("meta"):
        base = count_complexity(SegFormerHead([8, 16, 24, 32], C, 3, "bilinear"), feats).macs
        sapa_i = count_complexity(SegFormerHead([8, 16, 24, 32], C, 3, "sapa_i"), feats).macs
        sapa_b = count_complexity(SegFormerHead([8, 16, 24, 32], C, 3, "sapa_b"), feats).macs
    assert sapa_i - base == 2 * K * K * C * N
    assert sapa_b - base == C * d * N + C * d * n + K * K * d * N + K * K * C * N


# --- the papers' columns ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def segformer_rows():
    names = [n for n in ("sapa_i", "sapa_b", "carafe", "a2u", "deconv", "sapa_d") if n in sapa.list_upsamplers()]
    return {r["upsampler"]: r for r in cx.host_rows("segformer-b1", names, 512)}


def test_segformer_b1_baseline(segformer_rows):
    r = segformer_rows["bilinear"]
    assert abs(r["gflops"] - 15.9) <= 0.05 and abs(r["params_m"] - 13.7) <= 0.05


@pytest.mark.parametrize("name,gflops", [("sapa_i", 0.75), ("sapa_b", 1.02), ("carafe", 1.45), ("a2u", 0.41),
                                         ("deconv", 34.4)])
def test_segformer_b1_flops_deltas(segformer_rows, name, gflops):
    if name not in segformer_rows:
        pytest.skip(f"{name} is not registered")
    assert abs(segformer_rows[name]["d_gflops"] - gflops) <= 0.05


@pytest.mark.parametrize("name,params", [("carafe", 0.44), ("sapa_b", 0.10), ("a2u", 0.06), ("sapa_d", 0.84)])
def test_segformer_b1_params_deltas(segformer_rows, name, params):
    if name not in segformer_rows:
        pytest.skip(f"{name} is not registered")
    assert abs(segformer_rows[name]["d_params_m"] - params) <= 0.01


def test_sapa_d_with_eight_sampling_macs_matches_paper():
    a = cx.measure("segformer-b1", "sapa_d", 512, sampling_macs=8).macs
    b = cx.measure("segformer-b1", "bilinear", 512).macs
    assert abs((a - b) / 1e9 - 5.3) < 0.05


@pytest.mark.parametrize("host,baseline,paper", [("upernet-r50", "bilinear", 66.5),
                                                 ("faster-rcnn-r50", "nearest", 41.53)])
def test_other_hosts_baseline_params(host, baseline, paper):
    rows = cx.host_rows(host, [], 64)
    assert rows[0]["upsampler"] == baseline
    assert abs(rows[0]["params_m"] / paper - 1) < 0.02


# --- CLI -----------------------------------------------------------------------------------------------
def test_cli_json_and_table(capsys):
    from sapa.cli import main

    assert main(["complexity", "--host", "segformer-b1", "--size", "64", "--upsamplers", "sapa_i,sapa_b",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["upsampler"] for r in rows] == ["bilinear", "sapa_i", "sapa_b"]
    for r in rows:
        assert {"upsampler", "gflops", "params_m", "d_gflops", "d_params_m"} <= set(r)
    # 64x64: 1/32 = 2x2 ... 1/4 = 16x16; the six upsamplers output N points; SAPA-I adds 2*K^2*C*N MACs
    N = 4 ** 2 + 2 * 8 ** 2 + 3 * 16 ** 2
    assert abs(rows[1]["d_gflops"] - 2 * 25 * 256 * N / 1e9) < 1e-4
    assert rows[1]["d_params_m"] == 0 and abs(rows[2]["d_params_m"] - 6 * 17_472 / 1e6) < 1e-4
    assert main(["complexity", "--host", "faster-rcnn-r50", "--size", "64x96", "--upsamplers", "sapa_b"]) == 0
    out = capsys.readouterr().out
    assert "nearest" in out and "sapa_b" in out and "+0.05" in out
    assert main(["complexity", "--size", "7"]) == 2
    assert main(["complexity", "--upsamplers", "nope"]) == 2


def test_hosts_count_their_published_modules():
    """UPerNet and FPN build FADE ungated: 3 x (C*64 + 64 + C*64 + 64*25*9 + 25) parameters, no gate;
    SegFormer's is gated (+ C + 1 per instance). Each row says what was built."""
    def fade(C, gate):
        return C * 64 + 64 + C * 64 + 64 * 25 * 9 + 25 + (C + 1 if gate else 0)
    def delta(host, name, base):
        return cx.measure(host, name, 64).params - cx.measure(host, base, 64).params
    assert delta("upernet-r50", "fade", "bilinear") == 3 * fade(512, False)
    assert delta("faster-rcnn-r50", "fade", "nearest") == 3 * fade(256, False)
    assert delta("segformer-b1", "fade", "bilinear") == 6 * fade(256, True)
    up = {r["upsampler"]: r for r in cx.host_rows("upernet-r50", ["fade", "sapa_b"], 64)}
    assert up["fade"]["config"] == "ungated (released)" and up["sapa_b"]["config"].startswith("NeurIPS")
    seg = {r["upsampler"]: r for r in cx.host_rows("segformer-b1", ["dysample"], 64)}
    assert seg["dysample"]["config"] == "registered defaults (no published row)"
