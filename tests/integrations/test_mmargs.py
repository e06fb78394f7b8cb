"""OpenMMLab argument names and official state dicts -> sapa (default suite; no mmengine needed).

Official outputs come from tests/integrations/_mm_reference.py: the official modules' forwards
written out from their definitions (float64), fed the same state dict in the official key layout.
"""
from __future__ import annotations

import pytest
import torch

import sapa
from _mm_reference import (carafepack_forward, fork_dysample_init_pos, fork_dysample_lp_forward,
                           fork_fade_forward, fork_sapa_forward, fork_sapadeform_forward)
from sapa.integrations._mmargs import (MM_DEFAULTS, accepted_args, build_mm_upsampler, convert_checkpoint,
                                       convert_state_dict, translate)
from sapa.nn.carafe import CARAFE
from sapa.nn.dysample import DySample
from sapa.nn.fade import FADE
from sapa.nn.sapa import SAPAB, SAPAD

D = torch.float64


def _rand_sd(shapes, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v, generator=g, dtype=D) * scale for k, v in shapes.items()}


def test_official_carafe_config_builds_sapa_carafe():
    """The config from the issue: mmcv CARAFEPack names, the host's channels and scale_factor."""
    cfg = dict(type="carafe", channels=256, scale_factor=2, up_kernel=5, up_group=1, encoder_kernel=3,
               encoder_dilation=1, compressed_channels=64)
    up = build_mm_upsampler(cfg)
    assert type(up) is CARAFE
    assert (up.in_channels, up.scale_factor, up.kernel_size, up.groups, up.encoder_kernel,
            up.encoder_dilation, up.compressed_channels) == (256, 2, 5, 1, 3, 1, 64)
    up2 = build_mm_upsampler(dict(type="sapa.carafe", up_kernel=3, up_group=2, compressed_channels=16),
                             in_channels=32, scale_factor=3)
    assert (up2.in_channels, up2.scale_factor, up2.kernel_size, up2.groups, up2.compressed_channels) == (32, 3, 3, 2, 16)


@pytest.mark.parametrize("cfg,cls,attrs", [
    (dict(type="sapa", up_kernel_size=3, embedding_dim=16, qkv_bias=False, norm=False), SAPAB,
     dict(kernel_size=3, embedding_dim=16, version="journal")),
    (dict(type="sapadeform", num_point=4, groups=2, embedding_dim=8, high_offset=False), SAPAD,
     dict(num_points=4, groups=2, embedding_dim=8, high_offset=False)),
    (dict(type="fade", up_kernel_size=3, gating=True), FADE, dict(kernel_size=3, gating=True)),
    (dict(type="dysample", style="pl", groups=2, dyscope=True), DySample, dict(style="pl", groups=2, dyscope=True)),
], ids=["sapa", "sapadeform", "fade", "dysample"])
def test_fork_build_upsampler_arguments(cfg, cls, attrs):
    up = build_mm_upsampler(cfg, in_channels=64, scale_factor=2)
    assert type(up) is cls
    for k, v in attrs.items():
        assert getattr(up, k) == v, k


def test_official_defaults_are_pinned():
    """mm configs get the forks' defaults, e.g. FADE ungated, even though sapa's own fade is gated."""
    assert build_mm_upsampler(dict(type="sapa.fade"), 32).gating is False
    assert sapa.build_upsampler("fade", 32).gating is True
    d = build_mm_upsampler(dict(type="sapadeform"), 32)
    assert (d.num_points, d.groups, d.embedding_dim, d.high_offset, d.norm) == (9, 4, 32, True, False)
    b = build_mm_upsampler(dict(type="sapa"), 32)
    assert (b.kernel_size, b.embedding_dim, b.version) == (5, 32, "journal")
    assert isinstance(b.norm_x, torch.nn.GroupNorm)
    assert MM_DEFAULTS["carafe"] == dict(kernel_size=5, groups=1, encoder_kernel=3, encoder_dilation=1,
                                         compressed_channels=64)


def test_every_registered_upsampler_builds_from_an_mm_config():
    for name in sapa.list_upsamplers():
        up = build_mm_upsampler(dict(type=f"sapa.{name}", channels=32, scale_factor=2))
        x = torch.randn(1, 32, 5, 6)
        out = up(x, torch.randn(1, 32, 10, 12)) if up.needs_guide else up(x)
        assert out.shape == (1, 32, 10, 12), name


def test_unknown_argument_names_the_accepted_ones():
    with pytest.raises(TypeError) as info:
        build_mm_upsampler(dict(type="sapa.carafe", channels=16, upkernel=5))
    msg = str(info.value)
    assert "'upkernel'" in msg and "up_kernel" in msg and "compressed_channels" in msg
    assert set(accepted_args("carafe")) >= {"channels", "up_kernel", "up_group", "encoder_kernel",
                                            "encoder_dilation", "compressed_channels", "scale_factor"}
    with pytest.raises(KeyError, match="sapa.sapa_b"):
        build_mm_upsampler(dict(type="sapa.nope", channels=16))
    with pytest.raises(TypeError, match="'up_kernel' and 'kernel_size' both set"):
        build_mm_upsampler(dict(type="carafe", channels=16, up_kernel=3, kernel_size=5))
    with pytest.raises(TypeError, match="channel count is missing"):
        build_mm_upsampler(dict(type="carafe"))
    with pytest.raises(ValueError, match="channels=8 but the host builds it with in_channels=16"):
        build_mm_upsampler(dict(type="carafe", channels=8), in_channels=16)
    with pytest.raises(ValueError, match="guided=False"):
        build_mm_upsampler(dict(type="sapa", guided=False), 32)


def test_fixed_official_arguments_are_checked():
    up = build_mm_upsampler(dict(type="deconv", kernel_size=3, stride=2, padding=1, output_padding=1), 16)
    assert up.kernel_size == 3
    with pytest.raises(ValueError, match="padding=0 is not supported"):
        build_mm_upsampler(dict(type="deconv", padding=0), 16)
    with pytest.raises(ValueError, match="out_channels=8"):
        build_mm_upsampler(dict(type="pixelshuffle", out_channels=8), 16)
    assert build_mm_upsampler(dict(type="pixel_shuffle", upsample_kernel=5), 16).kernel_size == 5


def test_nearest_without_channels_takes_any_channel_count():
    up = build_mm_upsampler(dict(type="sapa.nearest", scale_factor=2))
    for c in (3, 17):
        x = torch.randn(1, c, 4, 5)
        assert torch.equal(up(x), x.repeat_interleave(2, -2).repeat_interleave(2, -1))


def test_guide_first_takes_the_forks_argument_order():
    a = build_mm_upsampler(dict(type="sapa", guide_first=True), 32)
    b = build_mm_upsampler(dict(type="sapa"), 32)
    b.load_state_dict(a.state_dict())
    assert isinstance(a, SAPAB) and a.state_dict().keys() == b.state_dict().keys()
    x, y = torch.randn(1, 32, 4, 4), torch.randn(1, 32, 8, 8)
    assert torch.equal(a(y, x), b(x, y))


def test_translate_returns_sapa_names():
    name, kw, meta = translate(dict(type="sapadeform", num_point=5, guided=True), 48, 2)
    assert name == "sapa_d" and kw["num_points"] == 5 and kw["in_channels"] == 48 and meta == {"guided": True}


def test_mmcv_carafepack_state_dict_loads_unchanged_with_equal_outputs():
    C, Cm, K, G, s = 16, 8, 5, 2, 2
    sd = _rand_sd({"channel_compressor.weight": (Cm, C, 1, 1), "channel_compressor.bias": (Cm,),
                   "content_encoder.weight": (K * K * G * s * s, Cm, 3, 3), "content_encoder.bias": (K * K * G * s * s,)})
    up = build_mm_upsampler(dict(type="carafe", channels=C, up_kernel=K, up_group=G, compressed_channels=Cm)).double()
    up.load_state_dict(convert_state_dict(sd, up), strict=True)
    assert convert_state_dict(sd, up).keys() == sd.keys()
    x = torch.randn(2, C, 7, 9, dtype=D)
    ref = carafepack_forward(sd, x, K, G, s)
    assert torch.allclose(up(x), ref, atol=1e-12, rtol=0)


def test_fork_fade_state_dict_converts_with_equal_outputs():
    C, K = 32, 5
    for gating in (False, True):
        shapes = {"ker_generator.compressor_en.weight": (64, C, 1, 1), "ker_generator.compressor_en.bias": (64,),
                  "ker_generator.compressor_de.weight": (64, C, 1, 1),
                  "ker_generator.content_encoder.weight": (K * K, 64, 3, 3),
                  "ker_generator.content_encoder.bias": (K * K,)}
        if gating:
            shapes.update({"gate_generator.conv.weight": (1, C, 1, 1), "gate_generator.conv.bias": (1,)})
        sd = _rand_sd(shapes, seed=1, scale=0.1)
        up = build_mm_upsampler(dict(type="fade", gating=gating), C).double()
        up.load_state_dict(convert_state_dict(sd, up), strict=True)
        x, y = torch.randn(2, C, 6, 5, dtype=D), torch.randn(2, C, 12, 10, dtype=D)
        assert torch.allclose(up(x, y), fork_fade_forward(sd, y, x, K, gating), atol=1e-12, rtol=0)


def test_fork_dysample_state_dict_converts_with_equal_outputs():
    C, G, s = 16, 4, 2
    sd = _rand_sd({"offset.weight": (2 * G * s * s, C, 1, 1), "offset.bias": (2 * G * s * s,)}, seed=2, scale=1.0)
    sd["init_pos"] = fork_dysample_init_pos(s, G)
    up = build_mm_upsampler(dict(type="dysample"), C).double()
    conv = convert_state_dict(sd, up)
    assert "init_pos" not in conv
    up.load_state_dict(conv, strict=True)
    x = torch.randn(2, C, 5, 7, dtype=D)
    assert torch.allclose(up(x), fork_dysample_lp_forward(sd, x, s, G), atol=1e-10, rtol=0)


def test_fork_sapa_and_sapadeform_keys_load_unchanged_sapa_outputs_equal():
    C = 64
    b = build_mm_upsampler(dict(type="sapa"), C).double()
    fork_b = {"norm_y.weight": (C,), "norm_y.bias": (C,), "norm_x.weight": (C,), "norm_x.bias": (C,),
              "q.weight": (32, C, 1, 1), "q.bias": (32,), "k.weight": (32, C, 1, 1), "k.bias": (32,)}
    sd_b = _rand_sd(fork_b)
    b.load_state_dict(convert_state_dict(sd_b, b), strict=True)
    x, y = torch.randn(2, C, 5, 7, dtype=D), torch.randn(2, C, 10, 14, dtype=D)
    assert torch.allclose(b(x, y), fork_sapa_forward(sd_b, y, x), atol=1e-12, rtol=0)
    d = build_mm_upsampler(dict(type="sapadeform", qkv_bias=False), C)
    fork_d = {"q.weight": (128, C, 1, 1), "k.weight": (128, C, 1, 1), "offset.weight": (2 * 4 * 9 * 4, C, 1, 1)}
    conv = convert_state_dict(_rand_sd(fork_d), d)
    if "offset.bias" in d.state_dict():  # a sapa whose offset conv always has a bias: a zero one is added
        assert torch.equal(conv["offset.bias"], torch.zeros(2 * 4 * 9 * 4))
    else:  # the offset bias follows qkv_bias, as the fork's
        assert "offset.bias" not in conv
    d.load_state_dict(conv, strict=True)


def test_pixelshuffle_and_deconv_layouts_convert():
    C = 8
    ps = build_mm_upsampler(dict(type="pixelshuffle"), C)
    for prefix in ("0.", "upsample_conv."):  # fork nn.Sequential, mmcv PixelShufflePack
        sd = {prefix + "weight": torch.randn(4 * C, C, 3, 3), prefix + "bias": torch.randn(4 * C)}
        ps.load_state_dict(convert_state_dict(sd, ps), strict=True)
        assert torch.equal(ps.conv.weight, sd[prefix + "weight"])
    dc = build_mm_upsampler(dict(type="deconv"), C)
    sd = {"weight": torch.randn(C, C, 3, 3), "bias": torch.randn(C)}
    dc.load_state_dict(convert_state_dict(sd, dc), strict=True)
    assert torch.equal(dc.deconv.weight, sd["weight"])


def test_convert_checkpoint_for_a_whole_network_drops_unused_fork_upsamplers():
    net = torch.nn.Module()
    net.upsample_modules = torch.nn.ModuleList(build_mm_upsampler(dict(type="fade"), 32) for _ in range(2))
    net.conv = torch.nn.Conv2d(3, 3, 1)
    sd = {"conv.weight": torch.randn(3, 3, 1, 1), "conv.bias": torch.randn(3)}
    for i in range(3):  # the fork's FPN also built one for the extra level, never used
        for k, v in net.upsample_modules[0].state_dict().items():
            k = k.replace("compressor", "ker_generator.compressor").replace("content_encoder",
                                                                              "ker_generator.content_encoder")
            sd[f"upsample_modules.{i}.{k}"] = torch.randn_like(v)
    out = convert_checkpoint(sd, net)
    net.load_state_dict(out, strict=True)
    assert torch.equal(net.upsample_modules[1].compressor_en.weight,
                       sd["upsample_modules.1.ker_generator.compressor_en.weight"])


def test_fork_sapadeform_state_dict_gives_equal_outputs():
    C, G, P, d = 32, 4, 9, 8
    fork = {"q.weight": (G * d, C, 1, 1), "q.bias": (G * d,), "k.weight": (G * d, C, 1, 1), "k.bias": (G * d,),
            "offset.weight": (2 * G * P * 4, C, 1, 1), "offset.bias": (2 * G * P * 4,)}
    sd = _rand_sd(fork, seed=4, scale=0.3)  # offsets of about +-1 low-res pixel: fractional, some outside
    up = build_mm_upsampler(dict(type="sapadeform", num_point=P, groups=G, embedding_dim=d), C).double()
    up.load_state_dict(convert_state_dict(sd, up), strict=True)
    x, y = torch.randn(2, C, 5, 6, dtype=D), torch.randn(2, C, 10, 12, dtype=D)
    assert torch.allclose(up(x, y), fork_sapadeform_forward(sd, y, x, P, G, 2), atol=1e-10, rtol=0)

