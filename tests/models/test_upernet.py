"""UPerNet (docs/SEMANTICS.md §5.2): every registered upsampler in the top-down path, the wiring (x = the
accumulated coarser lateral, guide = the finer lateral), the bilinear baseline, ResNetV1c sizes
and local weight loading."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sapa
from host_helpers import Recorder, check_upsampler_grads, n_params, same
from sapa.models._common import Resize
from sapa.models.resnet import ResNetEncoder, load_resnet_weights
from sapa.models.upernet import UPerHead, UPerNet, upernet_r50, upernet_r101

pytest.importorskip("timm")

ALL = sapa.list_upsamplers()
CH = 32


def small_upernet(upsampler, num_classes=5):
    """ResNet-18-D (deep stem, like V1c) with a 32-channel head: the same code as R50 at 1/50 the cost."""
    return UPerNet("resnet18d", num_classes=num_classes, upsampler=upsampler, channels=CH, aux_channels=16)


@pytest.mark.parametrize("name", ["bilinear_resize"] + ALL)
def test_every_upsampler_forward_backward_non_divisible(name):
    """66x70 input: stages 17x18, 9x9, 5x5, 3x3 (ceil mode)."""
    spec = "bilinear" if name == "bilinear_resize" else dict(type=name)
    model = small_upernet(spec)
    x = torch.randn(2, 3, 66, 70)
    main, aux = model.forward_with_aux(x)
    assert main.shape == (2, 5, 17, 18)
    assert aux.shape == (2, 5, 5, 5)
    (main.square().mean() + 0.4 * aux.square().mean()).backward()
    ups = model.decode_head.upsamplers
    assert len(ups) == 3
    if name == "bilinear_resize":
        assert all(isinstance(u, Resize) and u.mode == "bilinear" for u in ups)
    else:
        assert all(type(u) is sapa.registry.get_upsampler_class(name) for u in ups)
        check_upsampler_grads(ups, name)


def test_wiring_top_down():
    """upsamplers[2](lat3; guide lat2) first, then [1](lat2 + that; guide lat1), then
    [0](lat1 + that; guide lat0): x is the accumulated coarser map, the guide the raw finer lateral."""
    chans = [16, 24, 40, 64]
    head = UPerHead(chans, channels=CH, num_classes=3, upsampler=Recorder).eval()
    feats = [torch.randn(1, c, h, h) for c, h in zip(chans, [17, 9, 5, 3])]
    with torch.no_grad():
        head(feats)
        raw = [conv(f) for conv, f in zip(head.lateral_convs, feats[:-1])] + [head.psp_forward(feats[-1])]
    up = head.upsamplers
    assert all(len(u.calls) == 1 for u in up)
    (t2, x2, g2, o2), (t1, x1, g1, o1), (t0, x0, g0, o0) = up[2].calls[0], up[1].calls[0], up[0].calls[0]
    assert t2 < t1 < t0
    assert same(x2, raw[3]) and same(g2, raw[2])
    assert same(x1, raw[2] + o2) and same(g1, raw[1])
    assert same(x0, raw[1] + o1) and same(g0, raw[0])
    lat = head.laterals(feats)
    assert same(lat[0].detach(), raw[0] + up[0].calls[-1][3])


def test_bilinear_baseline_matches_mmseg_resize():
    """The string 'bilinear' is mmseg's resize(size=finer lateral), exactly (ceil sizes included)."""
    chans = [16, 24, 40, 64]
    head = UPerHead(chans, channels=CH, num_classes=3).eval()
    feats = [torch.randn(1, c, h, w) for c, (h, w) in zip(chans, [(17, 18), (9, 9), (5, 5), (3, 3)])]
    with torch.no_grad():
        lat = head.laterals(feats)
        raw = [conv(f) for conv, f in zip(head.lateral_convs, feats[:-1])] + [head.psp_forward(feats[-1])]
        exp = list(raw)
        for i in (3, 2, 1):
            exp[i - 1] = exp[i - 1] + F.interpolate(exp[i], size=exp[i - 1].shape[-2:], mode="bilinear",
                                                    align_corners=False)
    for a, b in zip(lat, exp):
        assert torch.equal(a, b)


def test_instances_and_lists():
    with pytest.raises(TypeError, match="3 upsampling stages"):
        UPerHead([16, 24, 40, 64], channels=CH, upsampler=sapa.build_upsampler("sapa_b", CH))
    ups = [sapa.build_upsampler(n, CH) for n in ("sapa_b", "carafe", "sapa_d")]
    head = UPerHead([16, 24, 40, 64], channels=CH, upsampler=ups)
    assert list(head.upsamplers) == ups


def test_sizes_r50_r101():
    with torch.device("meta"):
        r50, r101 = upernet_r50(), upernet_r101()
        # extension README: 66.5 M and 85.5 M (mmseg counts the auxiliary FCN head too)
        assert n_params(r50) == 66_516_108
        assert n_params(r101) == 85_508_236
        assert n_params(r50.auxiliary_head) == 1024 * 256 * 9 + 2 * 256 + 256 * 150 + 150
        assert abs(n_params(r50) / 66.5e6 - 1) < 0.02
        assert n_params(upernet_r50(upsampler="sapa_b")) - n_params(r50) == 3 * (4 * 512 + 2 * (512 * 32 + 32))
    stem = r50.backbone.model.conv1
    assert [m.out_channels for m in stem if isinstance(m, torch.nn.Conv2d)] == [32, 32, 64]  # V1c deep stem
    assert r50.backbone.out_channels == [256, 512, 1024, 2048]


def test_r50_forward_small():
    model = upernet_r50(num_classes=4, upsampler="sapa_b").eval()
    with torch.no_grad():
        main, aux = model.forward_with_aux(torch.randn(1, 3, 65, 65))
    assert main.shape == (1, 4, 17, 17) and aux.shape == (1, 4, 5, 5)


def test_load_resnet_weights_openmmlab_stem(tmp_path):
    src, dst = ResNetEncoder("resnet18d"), ResNetEncoder("resnet18d")
    stem = {"conv1.0.": "stem.0.", "conv1.1.": "stem.1.", "conv1.3.": "stem.3.", "conv1.4.": "stem.4.",
            "conv1.6.": "stem.6.", "bn1.": "stem.7."}
    sd = {}
    for k, v in src.model.state_dict().items():
        for a, b in stem.items():
            if k.startswith(a):
                k = b + k[len(a):]
                break
        sd["backbone." + k] = v.clone()
    sd["fc.weight"] = torch.zeros(1000, 512)
    torch.save({"state_dict": sd}, tmp_path / "r18_mm.pth")
    load_resnet_weights(dst.model, tmp_path / "r18_mm.pth")
    for k, v in src.model.state_dict().items():
        assert torch.equal(v, dst.model.state_dict()[k]), k
    del sd["backbone.layer1.0.conv1.weight"]
    with pytest.raises(ValueError, match="missing keys: layer1.0.conv1.weight"):
        load_resnet_weights(dst.model, sd)
