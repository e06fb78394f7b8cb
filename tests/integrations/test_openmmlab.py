"""sapa inside OpenMMLab (needs the openmmlab extra: `make test-openmmlab` runs these in their own venv).

mmcv-lite has no compiled ``mmcv._ext``; ``mmcv.ops`` - and through it ``mmdet.models`` and
``mmseg.models`` - cannot import without it. To test against the real OpenMMLab classes
(``CARAFEPack``'s module, mmdet's ``FPN``, mmseg's ``BaseDecodeHead``, the registries' lazy imports),
this module installs a stand-in ``mmcv._ext`` whose every op raises ``NotImplementedError``: nothing
compiled is ever *called*, only imported. CARAFEPack's ``carafe`` op is replaced by the unfold
formula of _mm_reference.py where its output is compared. The one test of the plain install (what
happens without the stand-in) runs in a subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("mmengine", reason="the openmmlab extra is not installed (make test-openmmlab)")
pytest.importorskip("mmcv.cnn", reason="the openmmlab extra is not installed (make test-openmmlab)")


def _install_fake_mmcv_ext() -> None:
    if "mmcv._ext" in sys.modules:
        return
    try:
        import mmcv._ext  # noqa: F401  (a compiled mmcv: use it)
        return
    except ImportError:
        pass
    mod = types.ModuleType("mmcv._ext")

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def op(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name}: test stand-in, compiled mmcv ops are not available")
        return op

    mod.__getattr__ = __getattr__
    sys.modules["mmcv._ext"] = mod


_install_fake_mmcv_ext()

import sapa  # noqa: E402
from _mm_reference import carafe_reassemble  # noqa: E402
from mmcv.cnn import build_upsample_layer  # noqa: E402
from mmengine.registry import MODELS as MMENGINE_MODELS  # noqa: E402
from sapa.integrations import openmmlab as om  # noqa: E402
from sapa.nn.carafe import CARAFE  # noqa: E402

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def test_mmseg_heads_registered_and_not_without_compiled_mmcv():
    assert om.MMSEG_HEADS_ERROR is None and om.MMDET_ERROR is None
    code = ("import sapa.integrations.openmmlab as m; from mmcv.cnn import build_upsample_layer; "
            "print(repr(m.MMSEG_HEADS_ERROR)); "
            "print(type(build_upsample_layer(dict(type='sapa.sapa_b', channels=32))).__name__)")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.strip().splitlines()[-2:]
    if first != "None":  # plain mmcv-lite: the heads are skipped with the reason, the upsamplers work
        assert "mmcv._ext" in first or "ftfy" in first
    assert second == "SAPAB"


@pytest.mark.parametrize("name", sapa.list_upsamplers())
def test_build_upsample_layer_builds_every_sapa_upsampler(name):
    up = build_upsample_layer(dict(type=f"sapa.{name}", channels=32, scale_factor=2))
    assert type(up) is sapa.registry.get_upsampler_class(name)
    x, y = torch.randn(1, 32, 5, 6), torch.randn(1, 32, 10, 12)
    out = up(x, y) if up.needs_guide else up(x)
    assert out.shape == (1, 32, 10, 12)
    # MODELS.build from the root registry and from a downstream scope find the same builder
    assert type(MMENGINE_MODELS.build(dict(type=f"sapa.{name}", channels=32))) is type(up)
    from mmdet.registry import MODELS as MMDET_MODELS
    assert type(MMDET_MODELS.build(dict(type=f"sapa.{name}", channels=32))) is type(up)


def test_mmcv_names_are_left_alone_and_the_official_config_translates():
    import torch.nn as nn
    assert MMENGINE_MODELS.get("nearest") is nn.Upsample  # mmcv's own entry, untouched
    up = build_upsample_layer(dict(type="sapa.carafe", channels=64, scale_factor=2, up_kernel=5, up_group=1,
                                   encoder_kernel=3, encoder_dilation=1, compressed_channels=16))
    assert isinstance(up, CARAFE) and up.compressed_channels == 16
    with pytest.raises(TypeError, match="accepted: .*up_kernel"):
        build_upsample_layer(dict(type="sapa.carafe", channels=64, upkernel=5))


def test_real_carafepack_state_dict_loads_with_equal_outputs(monkeypatch):
    import importlib

    mm_carafe = importlib.import_module("mmcv.ops.carafe")  # `mmcv.ops.carafe` the attribute is the op

    torch.manual_seed(1)
    C, K, G, s = 32, 5, 2, 2
    official = mm_carafe.CARAFEPack(C, s, up_kernel=K, up_group=G, encoder_kernel=3, encoder_dilation=1,
                                    compressed_channels=16).double()
    with torch.no_grad():
        for p in official.parameters():
            p.normal_(0, 0.2)
    monkeypatch.setattr(mm_carafe, "carafe", carafe_reassemble)  # the compiled op's formula
    ours = build_upsample_layer(dict(type="sapa.carafe", channels=C, scale_factor=s, up_kernel=K, up_group=G,
                                     compressed_channels=16)).double()
    ours.load_state_dict(official.state_dict(), strict=True)  # unchanged keys
    x = torch.randn(2, C, 7, 9, dtype=torch.float64)
    assert torch.allclose(ours(x), official(x), atol=1e-12, rtol=0)


def test_mmdet_neck_from_a_config_guided_and_ceil_mode_sizes():
    from mmdet.registry import MODELS as MMDET_MODELS

    cfg = dict(type="SapaFPN", in_channels=[16, 32, 64, 128], out_channels=32, num_outs=5,
               upsample_cfg=dict(type="sapadeform", guided=True, num_point=9, groups=4, high_offset=True, norm=False))
    neck = MMDET_MODELS.build(cfg)
    neck.init_weights()
    assert len(neck.upsample_modules) == 3 and all(type(u).__name__ == "SAPAD" for u in neck.upsample_modules)
    sizes = [(50, 84), (25, 42), (13, 21), (7, 11)]
    feats = tuple(torch.randn(1, c, *hw) for c, hw in zip([16, 32, 64, 128], sizes))
    outs = neck(feats)
    assert [tuple(o.shape[-2:]) for o in outs] == sizes + [(4, 6)]
    sum(o.square().mean() for o in outs).backward()
    assert all(p.grad is not None for p in neck.upsample_modules.parameters())
    # the fork's neck name resolves to the same class
    assert MMDET_MODELS.get("FPN_UPSAMPLE") is om.SapaFPN


def test_mmdet_neck_equals_mmdet_fpn_with_the_default_resize():
    from mmdet.models.necks import FPN

    kw = dict(in_channels=[8, 16, 32, 64], out_channels=16, num_outs=5, add_extra_convs="on_input")
    ref = FPN(**kw)
    ours = om.SapaFPN(**kw)
    ours.load_state_dict(ref.state_dict(), strict=True)  # mmdet FPN checkpoints load unchanged
    feats = tuple(torch.randn(2, c, s, s + 3) for c, s in zip([8, 16, 32, 64], [33, 17, 9, 5]))
    for a, b in zip(ours(feats), ref(feats)):
        assert torch.equal(a, b)


def test_mmdet_neck_with_upsampler_spec_and_xavier_init_reaches_the_upsamplers():
    neck = om.SapaFPN([8, 16, 32, 64], 32, 5, upsampler="sapa_b")
    before = neck.upsample_modules[0].q.weight.detach().clone()
    neck.init_weights()  # mmdet's Xavier init_cfg re-initialises every Conv2d of the neck, as in the papers
    after = neck.upsample_modules[0].q.weight
    assert not torch.equal(before, after) and after.std() > 5 * before.std()
    with pytest.raises(TypeError, match="not both"):
        om.SapaFPN([8, 16], 8, 2, upsample_cfg=dict(type="sapa"), upsampler="sapa_b")


def _mmseg_inputs(chs, size=64):
    return [torch.randn(2, c, size // s, size // s) for c, s in zip(chs, (4, 8, 16, 32))]


def test_mmseg_segformer_head_matches_sapa_head():
    from mmseg.registry import MODELS as MMSEG_MODELS
    from sapa.models.segformer import SegFormerHead

    chs = [16, 32, 40, 64]
    head = MMSEG_MODELS.build(dict(type="SapaSegFormerHead", in_channels=chs, channels=32, num_classes=5,
                                   upsampler=dict(type="sapa.sapa_b", up_kernel_size=3)))
    head.eval()
    # the mm config means the forks' (journal) SAPA-B; say so explicitly for sapa's own head
    ref = SegFormerHead(chs, embed_dim=32, num_classes=5,
                        upsampler=dict(type="sapa_b", kernel_size=3, version="journal", norm=True)).eval()
    sd = {k.replace("conv_seg.", "linear_pred."): v for k, v in head.state_dict().items()}
    ref.load_state_dict(sd, strict=True)
    feats = _mmseg_inputs(chs)
    with torch.no_grad():
        assert torch.allclose(head(feats), ref(feats), atol=1e-6)
    # mmseg's loss path: cross entropy on logits resized to the labels
    head.train()
    logits = head(feats)
    from mmseg.structures import SegDataSample
    from mmengine.structures import PixelData
    samples = []
    for _ in range(2):
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, 64, 64)))
        s.set_metainfo(dict(img_shape=(64, 64), pad_shape=(64, 64)))
        samples.append(s)
    losses = head.loss_by_feat(logits, samples)
    losses["loss_ce"].backward()
    assert torch.isfinite(losses["loss_ce"]) and all(p.grad is not None for p in head.upsamplers.parameters())


def test_mmseg_uper_head_with_bilinear_equals_mmseg_uperhead():
    from mmseg.models.decode_heads import UPerHead as MMUPerHead
    from mmseg.registry import MODELS as MMSEG_MODELS

    chs = [16, 32, 64, 128]
    kw = dict(in_channels=chs, in_index=[0, 1, 2, 3], channels=32, num_classes=5, pool_scales=(1, 2, 3, 6),
              norm_cfg=dict(type="BN", requires_grad=True))
    ref = MMUPerHead(**kw).eval()
    ours = MMSEG_MODELS.build(dict(type="SapaUPerHead", **kw)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # mmseg UPerHead checkpoints load unchanged
    feats = _mmseg_inputs(chs)
    with torch.no_grad():
        assert torch.allclose(ours(feats), ref(feats), atol=1e-6)
    guided = MMSEG_MODELS.build(dict(type="SapaUPerHead", upsampler=dict(type="sapadeform"), **kw))
    assert guided(feats).shape == (2, 5, 16, 16)
