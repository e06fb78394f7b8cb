"""The module contract (sapa.registry docstring, DESIGN §4), checked on every registered upsampler:
the tests iterate over ``sapa.list_upsamplers()``, so an upsampler registered later is covered
without editing this file. All built with ``sapa.build_upsampler(name, 64)`` on small maps."""
from __future__ import annotations

import fnmatch

import pytest
import torch

import sapa
from _compare import assert_close
from sapa.registry import Upsampler, get_upsampler_class

C = 64
ALL = sapa.list_upsamplers()


@pytest.fixture(params=ALL)
def name(request):
    return request.param


def _build(name, **kw):
    return sapa.build_upsampler(name, C, **kw)


def _inputs(B=2, lo=(5, 7), hi=None, dtype=torch.float32):
    hi = hi or (2 * lo[0], 2 * lo[1])
    return torch.randn(B, C, *lo, dtype=dtype), torch.randn(B, C, *hi, dtype=dtype)


def _perturb(module, std=0.05):
    """Move every parameter off its initial value (zero-initialised layers would otherwise block
    gradients and make fresh instances look identical)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


def test_registry_is_not_empty():
    assert {"sapa_i", "sapa_b", "sapa_g", "sapa_d"} <= set(ALL)
    assert len(ALL) == len(set(ALL))


def test_class_attributes(name):
    cls = get_upsampler_class(name)
    assert issubclass(cls, Upsampler)
    assert isinstance(cls.needs_guide, bool)
    assert cls.name == name
    up = _build(name)
    assert (up.in_channels, up.guide_channels, up.scale_factor) == (C, C, 2)
    assert str(C) in repr(up)


@pytest.mark.parametrize("lo", [(4, 6), (5, 7), (1, 1)], ids=["even4x6", "odd5x7", "1x1"])
def test_output_shape(name, lo):
    up = _build(name)
    x, guide = _inputs(lo=lo)
    assert tuple(up(x, guide).shape) == (2, C, 2 * lo[0], 2 * lo[1])
    if not up.needs_guide:
        assert tuple(up(x).shape) == (2, C, 2 * lo[0], 2 * lo[1])


@pytest.mark.parametrize("hi", [(9, 13), (9, 14), (10, 13)], ids=["9x13", "9x14", "10x13"])
def test_output_shape_ceil_mode_guide(name, hi):
    """A guide smaller than s*H by less than s (ceil-mode strides) sets the output size."""
    up = _build(name)
    x, guide = _inputs(lo=(5, 7), hi=hi)
    out = up(x, guide)
    assert tuple(out.shape) == (2, C, *hi)
    # the ceil-mode output is the full-size output cropped, when the guide is the cropped full guide
    if not up.needs_guide:
        assert_close(out, up(x)[..., :hi[0], :hi[1]])


@pytest.mark.parametrize("spec", ["sapa_i", {"type": "sapa_b", "version": "neurips"}, "sapa_g", "sapa_d"],
                         ids=["sapa_i", "sapa_b-neurips", "sapa_g", "sapa_d"])
def test_sapa_ceil_mode_is_a_crop_of_the_full_output(spec):
    """SAPA modules without a per-image norm on the guide: every output pixel depends on its own guide
    pixel and the low-res map only, so cropping the guide crops the output. (Not part of the general
    contract: baselines with spatial convolutions on the guide see a different border.)"""
    up = _perturb(sapa.build_upsampler(spec, C)).eval()
    x, guide = _inputs(lo=(5, 7))
    with torch.no_grad():
        full = up(x, guide)
        part = up(x, guide[..., :9, :13])
    assert_close(part, full[..., :9, :13])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_dtype_kept(name, dtype):
    up = _build(name).to(dtype).eval()
    x, guide = _inputs(dtype=dtype)
    with torch.no_grad():
        out = up(x, guide)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


def test_float64_matches_float32(name):
    up = _perturb(_build(name)).eval()
    x, guide = _inputs()
    with torch.no_grad():
        out32 = up(x, guide)
        out64 = up.double()(x.double(), guide.double())
    assert_close(out32, out64.float(), rtol=1e-4)


def test_bfloat16(name):
    """bfloat16 in, bfloat16 out, close to the float32 result at bfloat16 precision."""
    up = _build(name).eval()
    x, guide = _inputs()
    with torch.no_grad():
        ref = up(x, guide)
        out = up.to(torch.bfloat16)(x.bfloat16(), guide.bfloat16())
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), ref, rtol=5e-2, atol=1e-2)


def test_gradients_reach_every_parameter(name):
    up = _perturb(_build(name))
    x, guide = _inputs()
    x.requires_grad_(True)
    guide.requires_grad_(True)
    out = up(x, guide)
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in up.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"{name}: no gradient reaches {missing}"
    assert x.grad is not None and x.grad.abs().sum() > 0
    if up.needs_guide:
        assert guide.grad is not None and guide.grad.abs().sum() > 0


def test_state_dict_round_trip(name):
    up = _perturb(_build(name)).eval()
    torch.manual_seed(1234)
    fresh = _build(name).eval()
    x, guide = _inputs()
    with torch.no_grad():
        out = up(x, guide)
        if any(True for _ in up.parameters()):
            assert (fresh(x, guide) - out).abs().max() > 0, "a fresh instance should differ before loading"
        fresh.load_state_dict(up.state_dict(), strict=True)
        assert torch.equal(fresh(x, guide), out)
    assert set(fresh.state_dict()) == set(up.state_dict())


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_batch_zero(name, train):
    up = _build(name).train(train)
    x, guide = _inputs(B=0)
    out = up(x, guide)
    assert tuple(out.shape) == (0, C, 10, 14)
    assert out.dtype == torch.float32


def test_batch_one_equals_slice_of_batch(name):
    """Batch items are independent (eval mode): item b of a batch of 3 = the batch of one."""
    up = _perturb(_build(name)).eval()
    x, guide = _inputs(B=3)
    with torch.no_grad():
        full = up(x, guide)
        for b in range(3):
            one = up(x[b:b + 1], guide[b:b + 1])
            assert tuple(one.shape) == (1, C, 10, 14)
            assert_close(one, full[b:b + 1])


def test_channels_last(name):
    up = _perturb(_build(name)).eval()
    x, guide = _inputs()
    with torch.no_grad():
        ref = up(x, guide)
        out = up(x.contiguous(memory_format=torch.channels_last),
                 guide.contiguous(memory_format=torch.channels_last))
    assert_close(out, ref)


def test_guided_without_guide_raises(name):
    up = _build(name)
    x, _ = _inputs()
    if up.needs_guide:
        with pytest.raises(ValueError, match="guide"):
            up(x)
    else:
        assert tuple(up(x).shape) == (2, C, 10, 14)


def test_guide_changes_output_only_if_guided(name):
    """needs_guide is truthful: a guided module's output depends on the guide's values, an unguided
    one's only on its size."""
    up = _perturb(_build(name)).eval()
    x, guide = _inputs()
    with torch.no_grad():
        a, b = up(x, guide), up(x, torch.randn_like(guide))
    if up.needs_guide:
        assert (a - b).abs().max() > 1e-6
    else:
        assert torch.equal(a, b)


def test_build_accepts_name_dict_class_instance(name):
    cls = get_upsampler_class(name)
    by_name = sapa.build_upsampler(name, C)
    by_dict = sapa.build_upsampler({"type": name}, C)
    by_class = sapa.build_upsampler(cls, C)
    for up in (by_name, by_dict, by_class):
        assert type(up) is cls and up.in_channels == C and up.scale_factor == 2
    assert sapa.build_upsampler(by_name, C) is by_name
    # the keyword arguments and the dict's keys reach the constructor
    up = sapa.build_upsampler({"type": name}, C, guide_channels=C, scale_factor=2)
    assert up.guide_channels == C


def test_build_dict_kwargs_reach_constructor():
    up = sapa.build_upsampler({"type": "sapa_b", "kernel_size": 3, "embedding_dim": 16}, C)
    assert (up.kernel_size, up.embedding_dim) == (3, 16)
    up = sapa.build_upsampler("sapa_d", C, num_points=4, groups=2)
    assert (up.num_points, up.groups) == (4, 2)
    # the dict does not get mutated
    spec = {"type": "sapa_b", "kernel_size": 3}
    sapa.build_upsampler(spec, C)
    assert spec == {"type": "sapa_b", "kernel_size": 3}


def test_list_upsamplers_patterns():
    assert sapa.list_upsamplers() == sapa.list_upsamplers("*") == ALL
    sapa_names = sapa.list_upsamplers("sapa*")
    assert set(sapa_names) >= {"sapa_i", "sapa_b", "sapa_g", "sapa_d"}
    assert all(n.startswith("sapa") for n in sapa_names)
    assert sapa_names == [n for n in ALL if fnmatch.fnmatchcase(n, "sapa*")]  # registration order
    assert sapa.list_upsamplers("sapa_[bd]") == ["sapa_b", "sapa_d"]
    assert sapa.list_upsamplers("sapa_?") == [n for n in ALL if len(n) == 6 and n.startswith("sapa_")]
    assert sapa.list_upsamplers("no_such_*") == []
    assert sapa.list_upsamplers("SAPA*") == []  # case-sensitive


def test_register_new_upsampler_is_listed_and_built():
    """A class registered at run time is listed and buildable by name (then removed again)."""
    from sapa import registry

    @sapa.register_upsampler("test_tmp_nearest")
    class Tmp(Upsampler):
        def forward(self, x, guide=None):
            H, W = self.output_size(x, guide)
            return x.repeat_interleave(self.scale_factor, -2).repeat_interleave(self.scale_factor, -1)[..., :H, :W]

    try:
        assert "test_tmp_nearest" in sapa.list_upsamplers("test_*")
        up = sapa.build_upsampler("test_tmp_nearest", 8, scale_factor=3)
        assert isinstance(up, Tmp) and up.scale_factor == 3
        assert tuple(up(torch.randn(1, 8, 2, 3)).shape) == (1, 8, 6, 9)
    finally:
        registry._REGISTRY.pop("test_tmp_nearest", None)
    assert "test_tmp_nearest" not in sapa.list_upsamplers()


@pytest.mark.parametrize("name", [n for n in ALL if get_upsampler_class(n).needs_guide])
def test_guide_channels_other_than_in_channels(name):
    """guide_channels != in_channels is supported (encoder and decoder widths differ in FPN/UPerNet),
    or refused at construction with a ValueError that names guide_channels (SAPA-I's inner product)."""
    try:
        up = sapa.build_upsampler(name, C, guide_channels=32)
    except ValueError as e:
        assert "guide_channels" in str(e)
        return
    assert up.guide_channels == 32
    out = up(torch.randn(2, C, 5, 7), torch.randn(2, 32, 10, 14))
    assert tuple(out.shape) == (2, C, 10, 14)


def test_build_upsampler_instance_checks_guide_channels():
    up = sapa.build_upsampler("sapa_b", 64, guide_channels=32)
    assert sapa.build_upsampler(up, 64, guide_channels=32) is up
    with pytest.raises(ValueError, match="guide_channels=64"):
        sapa.build_upsampler(up, 64)  # host would feed a 64-channel guide
    unguided = sapa.build_upsampler("nearest", 64)
    assert sapa.build_upsampler(unguided, 64, guide_channels=32) is unguided  # guide only gives a size
