"""SegFormer head (docs/SEMANTICS.md §5.1) and the MiT-B1 model: every registered upsampler, the wiring of the six
upsamplers, the bilinear baseline, parameter counts and local weight loading."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sapa
from host_helpers import Recorder, check_upsampler_grads, n_params, same
from sapa.models.segformer import SegFormer, SegFormerHead, load_mit_weights, mit_config, segformer_b1

pytest.importorskip("transformers")

ALL = sapa.list_upsamplers()
TINY = dict(hidden_sizes=[16, 24, 40, 64], depths=[1, 1, 1, 1])  # heads 1/2/5/8 divide these
E = 32


def tiny_segformer(upsampler, num_classes=5):
    return SegFormer(mit_config("b1", **TINY), num_classes=num_classes, upsampler=upsampler, embed_dim=E)


@pytest.mark.parametrize("name", ["bilinear_one_step"] + ALL)
def test_every_upsampler_forward_backward_non_divisible(name):
    """Tiny MiT + head at 66x94 (1/4 = 17x24, 1/32 = 3x3: ceil-mode at every stage)."""
    spec = "bilinear" if name == "bilinear_one_step" else dict(type=name)
    model = tiny_segformer(spec)
    x = torch.randn(2, 3, 66, 94)
    out = model(x)
    assert out.shape == (2, 5, 17, 24)
    out.square().mean().backward()
    head = model.decode_head
    if name == "bilinear_one_step":
        assert len(head.upsamplers) == 0
    else:
        assert len(head.upsamplers) == 6
        assert all(type(u) is sapa.registry.get_upsampler_class(name) for u in head.upsamplers)
        check_upsampler_grads(head.upsamplers, name)
    assert model.backbone.stages[0].patch_embeddings.proj.weight.grad is not None


def test_wiring_of_the_six_upsamplers():
    """up0(_c4; _c3) -> up1(.; _c2) -> up2(.; _c1); up3(_c3; _c2) -> up4(.; _c1); up5(_c2; _c1);
    linear_fuse sees cat[c4 path, c3 path, c2 path, _c1]. Any swap of stages or guides fails."""
    head = SegFormerHead([16, 24, 40, 64], embed_dim=E, num_classes=3, upsampler=Recorder).eval()
    feats = [torch.randn(1, c, h, w) for c, (h, w) in zip([16, 24, 40, 64], [(17, 24), (9, 12), (5, 6), (3, 3)])]
    seen = {}
    head.linear_fuse.register_forward_pre_hook(lambda m, inp: seen.setdefault("fuse_in", inp[0].detach()))
    head(feats)
    _c1, _c2, _c3, _c4 = (t.detach() for t in head.project(feats))
    up = head.upsamplers
    assert all(len(u.calls) == 1 for u in up)
    (_, x0, g0, o0), (_, x1, g1, o1), (_, x2, g2, o2) = (up[i].calls[0] for i in range(3))
    (_, x3, g3, o3), (_, x4, g4, o4), (_, x5, g5, o5) = (up[i].calls[0] for i in range(3, 6))
    assert same(x0, _c4) and same(g0, _c3)
    assert same(x1, o0) and same(g1, _c2)
    assert same(x2, o1) and same(g2, _c1)
    assert same(x3, _c3) and same(g3, _c2)
    assert same(x4, o3) and same(g4, _c1)
    assert same(x5, _c2) and same(g5, _c1)
    fuse_in = seen["fuse_in"]
    for i, t in enumerate([o2, o4, o5, _c1]):
        assert same(fuse_in[:, i * E:(i + 1) * E], t), f"linear_fuse input block {i} is not the expected map"


def test_bilinear_baseline_is_one_step_resize():
    head = SegFormerHead([16, 24, 40, 64], embed_dim=E, num_classes=3).eval()
    feats = [torch.randn(1, c, h, w) for c, (h, w) in zip([16, 24, 40, 64], [(17, 24), (9, 12), (5, 6), (3, 3)])]
    _c1, _c2, _c3, _c4 = head.project(feats)
    c4, c3, c2 = head.fuse(_c1, _c2, _c3, _c4)
    for got, src in ((c4, _c4), (c3, _c3), (c2, _c2)):
        assert torch.equal(got, F.interpolate(src, size=(17, 24), mode="bilinear", align_corners=False))
    # a chain of three x2 bilinear steps is a different map: the one-step resize is what NVlabs does
    chained = F.interpolate(F.interpolate(F.interpolate(_c4, scale_factor=2, mode="bilinear"), scale_factor=2,
                                          mode="bilinear"), scale_factor=2, mode="bilinear")[..., :17, :24]
    assert not torch.allclose(chained, c4, atol=1e-4)


def test_instance_is_refused_list_is_accepted():
    with pytest.raises(TypeError, match="one instance cannot be shared"):
        SegFormerHead([16, 24, 40, 64], embed_dim=E, upsampler=sapa.build_upsampler("sapa_b", E))
    ups = [sapa.build_upsampler("sapa_b" if i % 2 else "carafe", E) for i in range(6)]
    head = SegFormerHead([16, 24, 40, 64], embed_dim=E, upsampler=ups)
    assert [type(u).__name__ for u in head.upsamplers] == ["CARAFE", "SAPAB"] * 3
    with pytest.raises(ValueError, match="6 upsampling stages"):
        SegFormerHead([16, 24, 40, 64], embed_dim=E, upsampler=ups[:3])
    with pytest.raises(KeyError, match="unknown upsampler"):
        SegFormerHead([16, 24, 40, 64], embed_dim=E, upsampler="no_such_upsampler")


def test_segformer_b1_size_and_forward():
    with torch.device("meta"):
        m = segformer_b1()
        enc = n_params(m.backbone)
        assert n_params(m) == 13_715_798  # NVlabs reports 13.74 M: + an unused 128->150 conv_seg (19,350)
        assert enc == 13_151_424
        b = segformer_b1(upsampler="sapa_b")
        assert n_params(b) - n_params(m) == 6 * 17_472
    cfg = m.backbone.config
    assert list(cfg.hidden_sizes) == [64, 128, 320, 512] and list(cfg.depths) == [2, 2, 2, 2]
    assert list(cfg.num_attention_heads) == [1, 2, 5, 8] and list(cfg.sr_ratios) == [8, 4, 2, 1]
    assert list(cfg.patch_sizes) == [7, 3, 3, 3] and list(cfg.strides) == [4, 2, 2, 2]
    model = segformer_b1(num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7, 16, 16)


# --- local weights ------------------------------------------------------------------------------
def _v5_to_v4(k: str) -> str:
    """transformers-4 / Hub spelling, written out independently of the loader's rules."""
    import re
    m = re.match(r"stages\.(\d+)\.(.*)", k)
    i, rest = m.group(1), m.group(2)
    if rest.startswith("patch_embeddings."):
        return f"segformer.encoder.patch_embeddings.{i}.{rest[len('patch_embeddings.'):]}"
    if rest.startswith("layer_norm."):
        return f"segformer.encoder.layer_norm.{i}.{rest[len('layer_norm.'):]}"
    m = re.match(r"blocks\.(\d+)\.(.*)", rest)
    j, r = m.group(1), m.group(2)
    table = {"layernorm_before.": "layer_norm_1.", "layernorm_after.": "layer_norm_2.",
             "attention.q_proj.": "attention.self.query.", "attention.k_proj.": "attention.self.key.",
             "attention.v_proj.": "attention.self.value.", "attention.o_proj.": "attention.output.dense.",
             "attention.sequence_reduction.sequence_reduction.": "attention.self.sr.",
             "attention.sequence_reduction.layer_norm.": "attention.self.layer_norm.",
             "mlp.fc1.": "mlp.dense1.", "mlp.fc2.": "mlp.dense2.", "mlp.dwconv.dwconv.": "mlp.dwconv.dwconv."}
    for a, b in table.items():
        if r.startswith(a):
            return f"segformer.encoder.block.{i}.{j}.{b}{r[len(a):]}"
    raise AssertionError(k)


def _v5_to_nvlabs(sd: dict) -> dict:
    import re
    out = {}
    for k, v in sd.items():
        m = re.match(r"stages\.(\d+)\.(.*)", k)
        i, rest = int(m.group(1)) + 1, m.group(2)
        if rest.startswith("patch_embeddings.proj."):
            out[f"patch_embed{i}.proj.{rest.split('.')[-1]}"] = v
        elif rest.startswith("patch_embeddings.layer_norm."):
            out[f"patch_embed{i}.norm.{rest.split('.')[-1]}"] = v
        elif rest.startswith("layer_norm."):
            out[f"norm{i}.{rest.split('.')[-1]}"] = v
        else:
            m = re.match(r"blocks\.(\d+)\.(.*)", rest)
            pre, r = f"block{i}.{m.group(1)}.", m.group(2)
            if r.startswith("attention.k_proj."):
                vk = sd[k]
                vv = sd[k.replace("k_proj", "v_proj")]
                out[pre + "attn.kv." + r.split(".")[-1]] = torch.cat([vk, vv], 0)
                continue
            if r.startswith("attention.v_proj."):
                continue
            table = {"layernorm_before.": "norm1.", "layernorm_after.": "norm2.", "attention.q_proj.": "attn.q.",
                     "attention.o_proj.": "attn.proj.", "attention.sequence_reduction.sequence_reduction.": "attn.sr.",
                     "attention.sequence_reduction.layer_norm.": "attn.norm.", "mlp.": "mlp."}
            for a, b in table.items():
                if r.startswith(a):
                    out[pre + b + r[len(a):]] = v
                    break
            else:
                raise AssertionError(k)
    out["head.weight"] = torch.zeros(1000, 64)  # an ImageNet classifier, dropped by the loader
    return out


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("spelling", ["v5_safetensors_dir", "hub_v4_bin", "nvlabs_pth"])
def test_load_mit_weights(spelling, tmp_path):
    src = tiny_segformer("bilinear").backbone
    dst = tiny_segformer("bilinear")
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    if spelling == "v5_safetensors_dir":
        from safetensors.torch import save_file
        save_file(sd, str(tmp_path / "model.safetensors"))
        path = tmp_path
    elif spelling == "hub_v4_bin":
        hub = {_v5_to_v4(k): v for k, v in sd.items()}
        hub["classifier.weight"] = torch.zeros(1000, 64)
        path = tmp_path / "pytorch_model.bin"
        torch.save(hub, path)
    else:
        path = tmp_path / "mit_tiny.pth"
        torch.save({"state_dict": _v5_to_nvlabs(sd)}, path)
    load_mit_weights(dst.backbone, path)
    _assert_same_weights(src, dst.backbone)


def test_load_mit_weights_errors(tmp_path):
    model = tiny_segformer("bilinear")
    sd = dict(model.backbone.state_dict())
    k0 = "stages.0.blocks.0.attention.q_proj.weight"
    bad = dict(sd)
    del bad[k0]
    bad["stages.1.patch_embeddings.proj.weight"] = torch.zeros(1, 1, 1, 1)
    bad["extra.thing"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        load_mit_weights(model.backbone, bad)
    msg = str(err.value)
    assert "missing keys" in msg and k0 in msg
    assert "shape mismatches" in msg and "stages.1.patch_embeddings.proj.weight" in msg
    assert "unexpected keys" in msg and "extra.thing" in msg
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_mit_weights(model.backbone, tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="pass the file itself"):
        load_mit_weights(model.backbone, tmp_path)
