"""`pretrained=` is the one keyword for local weights on every host; unreadable files are one OSError."""
from __future__ import annotations

import inspect
import pickle
import warnings

import pytest
import torch

pytest.importorskip("torchvision")
from sapa.models import faster_rcnn, faster_rcnn_r50, faster_rcnn_r101, segformer_b1, upernet_r50  # noqa: E402
from sapa.models.faster_rcnn import ResNetFPNBackbone  # noqa: E402


def test_every_host_takes_pretrained():
    for fn in (segformer_b1, upernet_r50, faster_rcnn, faster_rcnn_r50, faster_rcnn_r101, ResNetFPNBackbone):
        assert "pretrained" in inspect.signature(fn).parameters, fn.__name__
        assert "pretrained_backbone" not in inspect.signature(fn).parameters, fn.__name__


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    body = torchvision.models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("r18") / "resnet18.pth"
    torch.save(body.state_dict(), path)
    return body.state_dict(), path


def test_faster_rcnn_backbone_pretrained_and_the_deprecated_name(r18_file):
    sd, path = r18_file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name does not warn
        new = ResNetFPNBackbone(18, pretrained=path)
    assert torch.equal(new.body.conv1.weight, sd["conv1.weight"])
    with pytest.warns(DeprecationWarning, match="pretrained_backbone= is deprecated, use pretrained="):
        old = ResNetFPNBackbone(18, pretrained_backbone=path)
    assert torch.equal(old.body.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])
    with pytest.raises(TypeError, match="both pretrained= and the deprecated pretrained_backbone="):
        ResNetFPNBackbone(18, pretrained=path, pretrained_backbone=path)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        ResNetFPNBackbone(18, pretrainedd=path)


def test_faster_rcnn_factory_forwards_the_deprecated_name(r18_file):
    sd, path = r18_file
    with pytest.warns(DeprecationWarning):
        model = faster_rcnn(18, num_classes=3, pretrained_backbone=path)
    assert torch.equal(model.backbone.body.conv1.weight, sd["conv1.weight"])
    model = faster_rcnn(18, num_classes=3, pretrained=path)
    assert torch.equal(model.backbone.body.conv1.weight, sd["conv1.weight"])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_garbage_file_into_the_resnet_hosts_is_one_oserror(tmp_path):
    path = tmp_path / "r50.pth"
    path.write_bytes(b"\x80\x03garbage" * 5)
    with pytest.raises(OSError) as info:
        ResNetFPNBackbone(18, pretrained=path)
    assert not isinstance(info.value, pickle.UnpicklingError) and str(path) in str(info.value)
    pytest.importorskip("timm")
    from sapa.models.resnet import ResNetEncoder

    with pytest.raises(OSError, match="cannot read"):
        ResNetEncoder("resnet18d", pretrained=path)


def test_checkpoint_of_another_network_into_the_detector_names_the_keys(tmp_path):
    path = tmp_path / "conv.pth"
    torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), path)
    with pytest.raises(ValueError) as info:
        ResNetFPNBackbone(18, pretrained=path)
    msg = str(info.value)
    assert str(path) in msg and "missing keys" in msg and "conv1.weight" in msg
