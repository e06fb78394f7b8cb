"""Hugging Face SegFormer checkpoints into sapa, and sapa's head into HF models (default suite).

The reference is HF's own ``SegformerForSemanticSegmentation`` forward on the same checkpoint; its
weights (BatchNorm statistics included) are randomised so that a wrong key mapping cannot hide.
"""
from __future__ import annotations

import logging
import os
import pickle
import socket

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from transformers import SegformerForSemanticSegmentation  # noqa: E402

from sapa.integrations.huggingface import sapa_decode_head, swap_upsampler  # noqa: E402
from sapa.models import segformer_b1  # noqa: E402
from sapa.models._weights import load_segformer_weights  # noqa: E402
from sapa.models.segformer import mit_config  # noqa: E402

NUM_LABELS = 7


def _randomise(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def hf_b1(tmp_path_factory):
    """A randomly initialised HF SegFormer with the real B1 configuration, saved with save_pretrained."""
    cfg = mit_config("b1", num_labels=NUM_LABELS, decoder_hidden_size=256)
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(cfg)
    _randomise(model)
    model.eval()
    folder = tmp_path_factory.mktemp("hf_b1")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))


def _hf_logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


def test_hf_checkpoint_folder_and_file_give_hf_logits(hf_b1, image, caplog):
    hf, folder = hf_b1
    ref = _hf_logits(hf, image)
    assert ref.abs().max() > 0.1  # logits of random weights are not ~0, so the tolerance means something
    for src in (folder, os.path.join(folder, "model.safetensors"), str(folder)):
        with caplog.at_level(logging.INFO, logger="sapa"):
            caplog.clear()
            ours = segformer_b1(num_classes=NUM_LABELS, pretrained=src).eval()
        lines = [r.getMessage() for r in caplog.records if r.name == "sapa"]
        assert len(lines) == 1 and "encoder and decode head" in lines[0]
        with torch.no_grad():
            out = ours(image)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= 1e-5


def test_in_memory_hf_state_dict_loads_too(hf_b1, image):
    """transformers 5 names the projections linear_projections in memory, linear_c on disk."""
    hf, _ = hf_b1
    sd = hf.state_dict()
    assert any(".linear_projections." in k for k in sd)
    ours = segformer_b1(num_classes=NUM_LABELS, pretrained=sd).eval()
    with torch.no_grad():
        assert (ours(image) - _hf_logits(hf, image)).abs().max().item() <= 1e-5


def test_other_num_classes_loads_the_encoder_alone_in_one_log_line(hf_b1, caplog):
    hf, folder = hf_b1
    with caplog.at_level(logging.INFO, logger="sapa"):
        ours = segformer_b1(num_classes=NUM_LABELS + 3, pretrained=folder)
    lines = [r.getMessage() for r in caplog.records if r.name == "sapa"]
    assert len(lines) == 1 and "encoder only" in lines[0] and f"{NUM_LABELS} classes" in lines[0]
    hf_sd = hf.segformer.state_dict()
    own = ours.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in hf_sd.items())
    hf_proj = hf.decode_head.linear_projections[0].proj.weight
    assert not torch.equal(ours.decode_head.linear_c1.proj.weight, hf_proj)
    assert ours.decode_head.linear_pred.weight.shape[0] == NUM_LABELS + 3


def test_swap_upsampler_after_loading_keeps_projections_and_fuse(hf_b1, image):
    hf, folder = hf_b1
    ours = segformer_b1(num_classes=NUM_LABELS, pretrained=folder).eval()
    keep = {k: v.clone() for k, v in ours.decode_head.state_dict().items()}
    with torch.no_grad():
        before = ours(image)
    swap_upsampler(ours, "sapa_b")
    head = ours.decode_head
    assert len(head.upsamplers) == 6 and not head.training
    after_sd = head.state_dict()
    for k, v in keep.items():
        assert torch.equal(after_sd[k], v), k
    with torch.no_grad():
        after = ours(image)
    assert after.shape == before.shape and not torch.allclose(after, before, atol=1e-3)
    swap_upsampler(ours, "bilinear")  # back to the one-step resize: HF's logits again
    with torch.no_grad():
        assert (ours(image) - _hf_logits(hf, image)).abs().max().item() <= 1e-5
    swap_upsampler(ours, dict(type="carafe"))
    ours.train()
    ours(image).square().mean().backward()
    assert all(p.grad is not None for p in ours.decode_head.upsamplers.parameters())
    assert ours.decode_head.linear_c1.proj.weight.grad is not None


def test_checkpoint_with_upsamplers_into_a_model_without_raises_and_leaves_it_unchanged(hf_b1, tmp_path):
    _, folder = hf_b1
    src = segformer_b1(num_classes=NUM_LABELS, upsampler="sapa_b", pretrained=folder)
    path = tmp_path / "sapa_b.pt"
    torch.save(src.state_dict(), path)
    target = segformer_b1(num_classes=NUM_LABELS)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="unexpected keys: upsamplers"):
        load_segformer_weights(target, path)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    # and with the same upsampler it is a full round trip
    again = segformer_b1(num_classes=NUM_LABELS, upsampler="sapa_b", pretrained=path)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in again.state_dict().items())


def _fake_cache(root, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in os.listdir(folder):
        os.symlink(os.path.join(folder, name), snap / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_hub_id_resolves_from_a_local_hf_cache(hf_b1, image, tmp_path, monkeypatch, no_network):
    hf, folder = hf_b1
    _fake_cache(tmp_path / "hub", "someorg/segformer-b1-test", folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    ours = segformer_b1(num_classes=NUM_LABELS, pretrained="someorg/segformer-b1-test").eval()
    with torch.no_grad():
        assert (ours(image) - _hf_logits(hf, image)).abs().max().item() <= 1e-5
    # HF_HOME/hub is the fallback when HF_HUB_CACHE is unset
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    segformer_b1(num_classes=NUM_LABELS, pretrained="someorg/segformer-b1-test")


def test_hub_id_not_in_the_cache_says_nothing_is_downloaded(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(OSError) as info:
        segformer_b1(pretrained="nvidia/mit-b1")
    msg = str(info.value)
    assert "'nvidia/mit-b1'" in msg and "nothing is downloaded" in msg
    assert "huggingface-cli download nvidia/mit-b1" in msg and "save_pretrained" in msg
    assert str(tmp_path / "empty") in msg


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name", ["garbage.pth", "garbage.bin", "garbage.safetensors", "garbage.ckpt"])
def test_garbage_file_is_one_clear_oserror(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x03this is not a checkpoint at all" * 7)
    with pytest.raises(OSError) as info:
        segformer_b1(pretrained=path)
    assert not isinstance(info.value, pickle.UnpicklingError)
    msg = str(info.value)
    assert str(path) in msg and "expected a .safetensors file or a torch.save state dict" in msg


def test_folder_without_a_checkpoint_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        segformer_b1(pretrained=tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        segformer_b1(pretrained=tmp_path / "nope.pth")


def test_checkpoint_of_another_module_names_the_file_and_what_was_expected(tmp_path):
    path = tmp_path / "conv.pth"
    torch.save(nn.Conv2d(3, 8, 3).state_dict(), path)
    with pytest.raises(ValueError) as info:
        segformer_b1(pretrained=path)
    msg = str(info.value)
    assert str(path) in msg and "not a SegFormer / MiT checkpoint" in msg and "segformer.encoder" in msg
    path2 = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path2)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        segformer_b1(pretrained=path2)


def test_sapa_head_inside_an_hf_model_forward_and_loss(hf_b1, image):
    """The recipe of docs/INTEGRATIONS.md: hf.decode_head = sapa_decode_head(hf, ...)."""
    hf, folder = hf_b1
    model = SegformerForSemanticSegmentation.from_pretrained(folder).eval()
    ref = _hf_logits(model, image)
    model.decode_head = sapa_decode_head(model)  # bilinear: HF's head, exactly
    assert (_hf_logits(model, image) - ref).abs().max().item() <= 1e-5
    swap_upsampler(model, "sapa_b")
    model.train()
    labels = torch.randint(0, NUM_LABELS, (2, 64, 96))
    labels[:, :4] = 255  # HF's semantic_loss_ignore_index
    out = model(pixel_values=image, labels=labels)
    assert out.logits.shape == (2, NUM_LABELS, 16, 24)
    manual = nn.functional.cross_entropy(
        nn.functional.interpolate(out.logits, size=(64, 96), mode="bilinear", align_corners=False),
        labels, ignore_index=255)
    assert torch.allclose(out.loss, manual)
    out.loss.backward()
    head = model.decode_head
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.upsamplers.parameters())
    assert model.segformer.stages[0].patch_embeddings.proj.weight.grad is not None


def test_sapa_decode_head_rejects_other_models():
    with pytest.raises(TypeError, match="SegformerForSemanticSegmentation"):
        sapa_decode_head(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="SegFormerHead"):
        swap_upsampler(nn.Conv2d(1, 1, 1), "sapa_b")
