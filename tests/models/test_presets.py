"""The published-configuration table (sapa.models.presets): every row builds the stated module in its
host (class, norm, init, gating, biases), explicit arguments override it, FPN's neck Xavier init
reaches exactly the layers mmdet's reaches, and docs/RESULTS.md carries the table as the code has it.

The expectations below are written out by hand from the sources (not read from the table), so a
wrong table row fails here."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import sapa
from sapa.models import FPN, SegFormerHead, UPerHead
from sapa.models._common import Resize
from sapa.models.presets import PRESETS, get_preset, list_presets, presets_markdown, resolve_spec
from sapa.nn._layers import LayerNorm2d, Linear2d
from sapa.nn.a2u import A2U
from sapa.nn.carafe import CARAFE
from sapa.nn.fade import FADE
from sapa.nn.indexnet import IndexNet
from sapa.nn.interp import Deconv, PixelShuffle
from sapa.nn.sapa import SAPAB, SAPAD, SAPAG, SAPAI

E = 64
CHANS = [16, 24, 40, 64]


def host(name, spec, **kw):
    torch.manual_seed(0)
    if name == "segformer":
        return SegFormerHead(CHANS, embed_dim=E, num_classes=3, upsampler=spec, **kw)
    if name == "upernet":
        return UPerHead(CHANS, channels=E, num_classes=3, upsampler=spec, **kw)
    return FPN(CHANS, E, upsampler=spec, **kw)


def std_close(w, std, rel=0.15):
    return abs(float(w.detach().std()) - std) < rel * std


def xavier_bound(w):
    fan_in, fan_out = w.shape[1] * w[0, 0].numel(), w.shape[0] * w[0, 0].numel()
    return math.sqrt(6.0 / (fan_in + fan_out))


def is_xavier(conv):
    b = xavier_bound(conv.weight)
    w = conv.weight.detach()
    bias_zero = conv.bias is None or int(torch.count_nonzero(conv.bias)) == 0
    return bool(float(w.abs().max()) <= b + 1e-7 and std_close(w, b / math.sqrt(3)) and bias_zero)


# --- per-module checks, by hand from the sources ------------------------------------------------------
def neurips_sapa_b(m, xavier):
    assert type(m) is SAPAB and m.version == "neurips" and m.embedding_dim == 32 and m.kernel_size == 5
    for norm in (m.norm_y, m.norm_x):  # per-pixel LayerNorm(C), affine 1 / 0
        assert type(norm) is LayerNorm2d and norm.elementwise_affine
        assert torch.equal(norm.weight, torch.ones(E)) and torch.equal(norm.bias, torch.zeros(E))
    for lin in (m.q, m.k):  # nn.Linear(C -> 32), trunc_normal(0.02), zero bias: a Linear, so no Xavier in FPN
        assert isinstance(lin, nn.Linear) and not isinstance(lin, nn.Conv2d) and lin.weight.shape == (32, E)
        assert std_close(lin.weight, 0.02) and float(lin.weight.detach().abs().max()) < 0.2
        assert torch.count_nonzero(lin.bias) == 0


def sapa_i(m, xavier):
    assert type(m) is SAPAI and m.kernel_size == 5 and m.norm == "layer"
    assert type(m.norm_y) is LayerNorm2d and not m.norm_y.elementwise_affine
    assert sum(p.numel() for p in m.parameters()) == 0


def sapa_g(m, xavier):
    assert type(m) is SAPAG and m.embedding_dim == 32 and m.kernel_size == 5
    assert type(m.norm_x) is LayerNorm2d and type(m.norm_y) is LayerNorm2d
    for lin in (m.q, m.q_x, m.k, m.gate):
        assert isinstance(lin, Linear2d) and lin.bias is not None and std_close(lin.weight, 0.02, rel=0.5)


def sapa_d(m, xavier):
    assert type(m) is SAPAD and (m.num_points, m.groups, m.embedding_dim) == (9, 4, 32)
    assert m.high_offset and isinstance(m.norm_x, nn.Identity) and isinstance(m.norm_y, nn.Identity)
    assert m.offset.out_channels == 2 * 4 * 9 * 4
    for conv in (m.q, m.k, m.offset):
        assert conv.bias is not None
        assert is_xavier(conv) if xavier else (std_close(conv.weight, 0.02) and torch.count_nonzero(conv.bias) == 0)


def fade(gated):
    def check(m, xavier):
        assert type(m) is FADE and m.gating is gated and hasattr(m, "gate") is gated
        assert m.kernel_size == 5 and m.embedding_dim == 64
        assert all(is_xavier(c) for c in (m.compressor_en, m.compressor_de, m.content_encoder))
    return check


def carafe(m, xavier):
    assert type(m) is CARAFE and (m.kernel_size, m.groups, m.encoder_kernel, m.compressed_channels) == (5, 1, 3, 64)
    if xavier:
        assert is_xavier(m.content_encoder) and is_xavier(m.channel_compressor)
    else:
        assert std_close(m.content_encoder.weight, 0.001) and is_xavier(m.channel_compressor)


def a2u(m, xavier):
    assert type(m) is A2U and (m.kernel_size, m.encoder_kernel, m.rank) == (3, 6, 1)
    assert [is_xavier(c) for c in (m.proj, m.enc_u, m.enc_v)] == [xavier] * 3


def indexnet(m, xavier):
    assert type(m) is IndexNet and m.index_conv.bias is None
    w = m.index_conv.weight
    # Xavier per official Conv2d(C, C, 2, stride 2): fan_in = fan_out = 4C (not the fused 4C-output conv's)
    b = math.sqrt(6.0 / (8 * E))
    for k in range(4):
        blk = w[k * E:(k + 1) * E].detach()
        assert (b * 0.97 < float(blk.abs().max()) <= b + 1e-7) is xavier


def deconv(m, xavier):
    assert type(m) is Deconv and isinstance(m.deconv, nn.ConvTranspose2d) and m.deconv.kernel_size == (3, 3)


def pixelshuffle(m, xavier):
    assert type(m) is PixelShuffle and m.conv.kernel_size == (3, 3) and m.conv.out_channels == 4 * E
    assert is_xavier(m.conv) is xavier


def resize(mode):
    def check(m, xavier):
        assert type(m) is Resize and m.mode == mode
    return check


def one_step(head):
    assert head.one_step and len(head.upsamplers) == 0


COMMON = {"deconv": deconv, "pixelshuffle": pixelshuffle, "carafe": carafe, "indexnet": indexnet, "a2u": a2u,
          "sapa_i": sapa_i, "sapa_b": neurips_sapa_b, "sapa_d": sapa_d}
EXPECTED = {
    "segformer": {**COMMON, "bilinear": None, "fade": fade(True), "sapa_g": sapa_g},
    "upernet": {**COMMON, "bilinear": resize("bilinear"), "fade": fade(False)},
    "fpn": {**COMMON, "nearest": resize("nearest"), "fade": fade(False), "sapa_g": sapa_g},
}
ROWS = [(h, u) for h, d in EXPECTED.items() for u in d]


def test_the_table_has_exactly_the_papers_rows():
    assert {(p.host, p.upsampler) for p in PRESETS} == set(ROWS)
    assert len(PRESETS) == len(ROWS)  # no duplicates
    for p in PRESETS:
        assert p.basis in ("released", "inferred", "ours") and p.source
        assert (p.basis == "ours") == bool(p.why), f"{p.host}/{p.upsampler}: 'ours' rows say why, others do not"
    assert get_preset("segformer", "dysample") is None and get_preset("upernet", "sapa_g") is None
    with pytest.raises(KeyError, match="valid: segformer, upernet, fpn"):
        list_presets("mask2former")


@pytest.mark.parametrize("host_name,name", ROWS, ids=[f"{h}-{u}" for h, u in ROWS])
def test_every_row_builds_the_stated_module(host_name, name):
    h = host(host_name, name)
    check = EXPECTED[host_name][name]
    if check is None:
        one_step(h)
        return
    assert len(h.upsamplers) == (6 if host_name == "segformer" else 3)
    for m in h.upsamplers:
        check(m, host_name == "fpn")


def test_explicit_arguments_win():
    m = host("segformer", dict(type="sapa_b", version="journal")).upsamplers[0]
    assert m.version == "journal" and isinstance(m.norm_x, nn.GroupNorm) and isinstance(m.q, nn.Conv2d)
    m = host("segformer", dict(type="sapa_b", embedding_dim=16)).upsamplers[0]
    assert m.version == "neurips" and m.q.out_features == 16  # other keys of the row are kept
    assert host("upernet", dict(type="fade", gating=True)).upsamplers[0].gating is True
    assert host("segformer", dict(type="fade", gating=False)).upsamplers[0].gating is False
    assert host("fpn", dict(type="sapa_i", norm=None)).upsamplers[0].norm is None
    # a class is built with its own (registered) defaults: the journal SAPA-B
    assert host("segformer", SAPAB).upsamplers[0].version == "journal"
    # per-stage lists resolve each entry
    ups = host("upernet", ["fade", dict(type="fade", gating=True), FADE]).upsamplers
    assert [u.gating for u in ups] == [False, True, True]
    # FPN's neck init can be switched off: SAPA-D keeps normal(0.02)
    sapa_d(host("fpn", "sapa_d", xavier_upsamplers=False).upsamplers[0], False)
    assert resolve_spec("fpn", "dysample") == "dysample" and resolve_spec("fpn", SAPAD) is SAPAD


def test_biases_follow_qkv_bias():
    d = sapa.build_upsampler(dict(type="sapa_d", qkv_bias=False), 32)
    assert d.q.bias is None and d.k.bias is None and d.offset.bias is None
    assert sum(p.numel() for p in d.parameters()) == 2 * 32 * 128 + 32 * 288  # 139,808-style count, no biases
    g = sapa.build_upsampler(dict(type="sapa_g", qkv_bias=False), 32)
    assert all(lin.bias is None for lin in (g.q, g.q_x, g.k, g.gate))
    assert sapa.build_upsampler("sapa_g", 32).gate.bias is not None


# Which upsampler weights mmdet's neck init (Xavier on every Conv2d, after the modules' own init)
# reaches, by hand: not ConvTranspose2d (deconv), not Linear (NeurIPS SAPA-B/G), nothing parameter-free.
REACHED = {
    "nearest": set(), "bilinear": set(), "deconv": set(), "sapa_i": set(), "sapa_b": set(), "sapa_g": set(),
    "pixelshuffle": {"conv"}, "carafe": {"channel_compressor", "content_encoder"}, "indexnet": {"index_conv"},
    "a2u": {"proj", "enc_u", "enc_v"}, "fade": {"compressor_en", "compressor_de", "content_encoder"},
    "sapa_d": {"q", "k", "offset"}, "dysample": {"offset"},
}


@pytest.mark.parametrize("name", sapa.list_upsamplers())
def test_fpn_xavier_reaches_exactly_the_neck_convs(name):
    assert set(REACHED) == set(sapa.list_upsamplers()), "a new upsampler needs its REACHED entry"
    plain = host("fpn", dict(type=name), xavier_upsamplers=False).upsamplers
    init = host("fpn", dict(type=name)).upsamplers  # same seed: identical until the neck init
    for a, b in zip(plain, init):
        changed = {n.rsplit(".", 1)[0] for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters())
                   if not torch.equal(p, q)}
        # FADE's own init is Xavier too: its convs are redrawn (changed), same distribution
        assert changed == REACHED[name], f"{name}: neck init changed {sorted(changed)}"
        for conv in (dict(b.named_modules())[n] for n in REACHED[name]):
            if name != "indexnet":
                assert is_xavier(conv), f"{name}: {conv} is not Xavier-uniform with zero bias"
    if name == "dysample":  # the documented consequence: offset std 0.001 -> Xavier (0.177 at C = 64)
        assert float(init[0].offset.weight.std()) > 50 * float(plain[0].offset.weight.std())


def test_results_md_carries_the_table():
    text = (Path(__file__).resolve().parents[2] / "docs" / "RESULTS.md").read_text()
    assert presets_markdown() in text
