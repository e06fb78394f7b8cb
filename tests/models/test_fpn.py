"""FPN (docs/SEMANTICS.md §5.3) and Faster R-CNN on torchvision: every registered upsampler, the top-down wiring,
the nearest baseline (mmdet's F.interpolate(size=...)), ceil-mode sizes, parameter counts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sapa
from host_helpers import Recorder, check_upsampler_grads, n_params, same
from sapa.models._common import Resize
from sapa.models.faster_rcnn import ResNetFPNBackbone, faster_rcnn, faster_rcnn_r50, faster_rcnn_r101
from sapa.models.fpn import FPN

pytest.importorskip("torchvision")

ALL = sapa.list_upsamplers()
CHANS = [16, 24, 40, 64]
SIZES = [(25, 42), (13, 21), (7, 11), (4, 6)]  # 100x167 input: ceil mode at every stride


def _feats(B=2):
    return [torch.randn(B, c, h, w) for c, (h, w) in zip(CHANS, SIZES)]


@pytest.mark.parametrize("name", ["nearest_resize"] + ALL)
def test_fpn_every_upsampler_ceil_sizes(name):
    spec = "nearest" if name == "nearest_resize" else dict(type=name)
    fpn = FPN(CHANS, 32, upsampler=spec)
    feats = [f.requires_grad_() for f in _feats()]
    out = fpn(feats)
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(t.shape[-2:]) for t in out.values()] == SIZES + [(2, 3)]
    assert all(t.shape[:2] == (2, 32) for t in out.values())
    sum(t.square().mean() for t in out.values()).backward()
    if name == "nearest_resize":
        assert all(isinstance(u, Resize) for u in fpn.upsamplers)
    else:
        check_upsampler_grads(fpn.upsamplers, name)
    assert feats[3].grad is not None


def test_fpn_wiring_top_down():
    fpn = FPN(CHANS, 32, upsampler=Recorder)
    feats = _feats(1)
    with torch.no_grad():
        out = fpn(feats)
        lat = [conv(f) for conv, f in zip(fpn.lateral_convs, feats)]
    up = fpn.upsamplers
    (t2, x2, g2, o2), (t1, x1, g1, o1), (t0, x0, g0, o0) = up[2].calls[0], up[1].calls[0], up[0].calls[0]
    assert t2 < t1 < t0
    assert same(x2, lat[3]) and same(g2, lat[2])
    assert same(x1, lat[2] + o2) and same(g1, lat[1])
    assert same(x0, lat[1] + o1) and same(g0, lat[0])
    assert same(out["0"], fpn.fpn_convs[0](lat[0] + o0))
    assert same(out["3"], fpn.fpn_convs[3](lat[3]))
    assert same(out["pool"], out["3"][..., ::2, ::2])


def test_fpn_nearest_baseline_is_mmdet():
    fpn = FPN(CHANS, 32)
    feats = _feats(1)
    with torch.no_grad():
        got = fpn(feats)
        lat = [conv(f) for conv, f in zip(fpn.lateral_convs, feats)]
        for i in (3, 2, 1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        exp = [conv(t) for conv, t in zip(fpn.fpn_convs, lat)]
    for i in range(4):
        assert torch.equal(got[str(i)], exp[i])
    assert torch.equal(got["pool"], F.max_pool2d(exp[3], 1, 2))
    with pytest.raises(TypeError, match="cannot be shared"):
        FPN(CHANS, 32, upsampler=sapa.build_upsampler("carafe", 32))


@pytest.mark.parametrize("name", ["nearest_resize"] + ALL)
def test_faster_rcnn_every_upsampler_train_step(name):
    """ResNet-18 Faster R-CNN at 128x160 with a few proposals: losses, backward, gradients."""
    spec = "nearest" if name == "nearest_resize" else dict(type=name)
    model = faster_rcnn(18, num_classes=4, upsampler=spec, min_size=128, max_size=160,
                        rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=16, box_batch_size_per_image=16,
                        rpn_batch_size_per_image=32)
    images = [torch.rand(3, 128, 160), torch.rand(3, 128, 160)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 5.0, 120.0, 70.0], [0.0, 0.0, 40.0, 40.0]]),
                "labels": torch.tensor([2, 3])}]
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    if name != "nearest_resize":
        check_upsampler_grads(model.backbone.fpn.upsamplers, name)
    assert model.backbone.body.layer1[0].conv1.weight.grad is None  # frozen like mmdet frozen_stages=1
    assert model.backbone.body.layer2[0].conv1.weight.grad is not None


def test_backbone_any_size_without_padding():
    bb = ResNetFPNBackbone(18, upsampler="sapa_b").eval()
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 97, 131))
    # conv1/maxpool/stride-2 stages are ceil mode: 97 -> 49 -> 25 -> 13 -> 7 -> 4; 131 -> 66 -> 33 -> 17 -> 9 -> 5
    assert [tuple(t.shape[-2:]) for t in out.values()] == [(25, 33), (13, 17), (7, 9), (4, 5), (2, 3)]
    assert bb.out_channels == 256


def test_faster_rcnn_r50_sizes_and_forward():
    with torch.device("meta"):
        m = faster_rcnn_r50(num_classes=81)
        total = n_params(m)
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        assert total == 41_704_036
        assert abs(total / 41.53e6 - 1) < 0.02
        # mmcv counts requires_grad params; mmdet's BN affine terms in layer2-4 are trainable (50,176)
        # and its bbox head has no background row (1024*4 + 4 = 4,100): exactly the NeurIPS 41.53 M.
        assert trainable + 50_176 - 4_100 == 41_527_712
        assert n_params(faster_rcnn_r50(num_classes=81, upsampler="carafe")) - total == 3 * 74_148
        assert n_params(faster_rcnn_r101(num_classes=81)) == 60_643_940
    model = faster_rcnn_r50(num_classes=5, upsampler="sapa_b", min_size=128, max_size=160,
                            rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=10).eval()
    with torch.no_grad():
        det = model([torch.rand(3, 128, 160)])
    assert set(det[0]) == {"boxes", "labels", "scores"}
