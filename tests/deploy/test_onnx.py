"""Plain-operator ONNX export: checker, no custom domain, onnxruntime parity at an unseen size,
node count independent of H and W, bad input. Every registered upsampler in the slow sweep; a
representative few (window ops with a ceil-mode guide, grouped CARAFE, GridSample) by default,
since one export takes 10-60 s on 2 cores."""
from __future__ import annotations

import io
import os
from unittest import mock

import pytest
import torch

import sapa
from sapa import export as E

from ._helpers import build, inputs, max_rel_error

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

DEFAULT = ["sapa_b", "dysample"]
NAMES = [pytest.param(n, marks=() if n in DEFAULT else pytest.mark.slow) for n in sapa.list_upsamplers()]
_CACHE: dict = {}


def exported(name):
    """(module, ModelProto) exported once per session at B=2, 4x5 -> 8x10."""
    if name not in _CACHE:
        up = build(name).eval()
        _CACHE[name] = up, E.export_onnx(up, inputs(name, 2, 4, 5), io.BytesIO())
    return _CACHE[name]


@pytest.mark.parametrize("name", NAMES)
def test_onnx_plain_operators_and_parity_at_unseen_size(name):
    up, model = exported(name)
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, f"{name}: custom-domain nodes"
    assert not model.functions
    assert model.opset_import[0].version >= E.MIN_OPSET
    sess = E.onnx_session(model, threads=1)
    for B, H, W, ceil in ((3, 6, 7, 1), (1, 3, 9, 0)):  # batch, sizes and a ceil-mode guide not exported
        args = inputs(name, B, H, W, ceil)
        with torch.no_grad():
            ref = up(*args)
        (out,) = E.run_onnx(sess, args)
        assert tuple(out.shape) == tuple(ref.shape), name
        assert max_rel_error(out, ref) < 1e-4, f"{name} at {[list(a.shape) for a in args]}"


def test_window_graph_never_unfolds_and_sizes_are_symbolic():
    up, model = exported("sapa_b")
    K = up.kernel_size
    ops = E.count_nodes(model)
    assert "Im2Col" not in ops and "Col2Im" not in ops and "DeformConv" not in ops
    # row windows: K horizontal shifts of k and of v, then one MatMul per kernel row for q.k and for
    # the reassembly (sapa/ops/window/export.py)
    assert ops.get("Slice", 0) >= 2 * K and ops.get("MatMul", 0) == 2 * K
    # no tensor with K*K on one axis and the C channels on another
    inferred = onnx.shape_inference.infer_shapes(model)
    for vi in inferred.graph.value_info:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        assert not (K * K in dims and up.in_channels in dims), f"{vi.name} has shape {dims}"
    # batch and spatial dims of inputs and output are symbolic: the graph is one graph for all sizes
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        assert [bool(dims[i].dim_param) for i in (0, 2, 3)] == [True] * 3, vi.name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sapa_b", "carafe", "sapa_d"])
def test_node_count_independent_of_size(name):
    up, model = exported(name)
    other = E.export_onnx(up, inputs(name, 3, 9, 3, 1), io.BytesIO())
    assert len(other.graph.node) == len(model.graph.node)


def test_gridsample_for_deformable_sampling():
    _, model = exported("dysample")
    assert "GridSample" in E.count_nodes(model)


@pytest.mark.slow
@pytest.mark.parametrize("host", E.HOSTS)
def test_host_onnx_parity(host, tmp_path):
    m = E.build_host(host, upsampler="sapa_b" if host != "faster-rcnn-r50" else None)
    model = E.export_onnx(m, (torch.randn(1, 3, 64, 64),), tmp_path / "h.onnx")
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        ref = m(x)
    refs = ref if isinstance(ref, tuple) else (ref,)
    outs = E.run_onnx(E.onnx_session(tmp_path / "h.onnx"), (x,))
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert max_rel_error(o, r) < 1e-4, host


# ---------------------------------------------------------------------------------- bad input


def test_training_mode_is_refused(tmp_path):
    up = build("bilinear", train=True)
    with pytest.raises(ValueError, match=r"training mode.*\.eval\(\)"):
        E.export_onnx(up, inputs("bilinear", 2, 4, 4), tmp_path / "a.onnx")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("obj", ["sapa_b", lambda x: x, 3], ids=["str", "function", "int"])
def test_non_module_is_refused(obj, tmp_path):
    with pytest.raises(TypeError, match="module must be a sapa upsampler"):
        E.export_onnx(obj, torch.randn(1, 4, 4, 4), tmp_path / "a.onnx")


def test_bad_example_inputs():
    with pytest.raises(TypeError, match="example_inputs"):
        E.export_onnx(build("nearest").eval(), [1, 2], io.BytesIO())


@pytest.mark.parametrize("opset", [16, 17, 999])
def test_unsupported_opset(opset, tmp_path):
    with pytest.raises(ValueError, match=rf"opset {opset} is not supported.*GridSample.*16"):
        E.export_onnx(build("dysample").eval(), inputs("dysample", 2, 4, 4), tmp_path / "a.onnx", opset=opset)
    assert os.listdir(tmp_path) == []


def test_unwritable_path(tmp_path):
    up, args = build("nearest").eval(), inputs("nearest", 2, 4, 4)
    with pytest.raises(OSError, match="does not exist"):
        E.export_onnx(up, args, tmp_path / "missing" / "a.onnx")
    with pytest.raises(OSError, match="is a directory"):
        E.export_onnx(up, args, tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write a read-only folder (root)")
        with pytest.raises(OSError, match="not writable"):
            E.export_onnx(up, args, ro / "a.onnx")
    finally:
        ro.chmod(0o700)


def test_failed_export_leaves_no_file_and_keeps_an_old_one(tmp_path):
    target = tmp_path / "a.onnx"
    target.write_bytes(b"old")
    up, args = build("nearest").eval(), inputs("nearest", 2, 4, 4)
    with mock.patch.object(E, "export_program", side_effect=RuntimeError("boom")):  # fails while exporting
        with pytest.raises(RuntimeError, match="boom"):
            E.export_onnx(up, args, target)
    with mock.patch("os.replace", side_effect=OSError("disk full")):  # fails while writing
        with pytest.raises(OSError, match="disk full"):
            E.export_onnx(up, args, target)
    assert os.listdir(tmp_path) == ["a.onnx"] and target.read_bytes() == b"old"


def test_cli_export_and_errors(tmp_path, capsys):
    from sapa.cli import main

    out = tmp_path / "n.onnx"
    assert main(["export", "--upsampler", "nearest", "--channels", "8", "--size", "4", "5", "--check",
                 "--json", "-o", str(out)]) == 0
    import json
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["max_rel_error"] == 0.0 and info["checked_at"] == [[2, 8, 5, 7]] and out.exists()
    assert main(["export", "--upsampler", "nearest", "-o", str(tmp_path / "no" / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", "--upsampler", "nope", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "unknown upsampler 'nope'" in capsys.readouterr().err
    assert main(["export", "--host", "resnet", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "unknown host 'resnet'" in capsys.readouterr().err


def test_deploy_md_worked_example_runs(capsys):
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[2] / "docs" / "DEPLOY.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "docs/DEPLOY.md has no python example"
    for code in blocks:
        exec(compile(code, "docs/DEPLOY.md", "exec"), {})
    shape, err = capsys.readouterr().out.strip().splitlines()[-1].rsplit(" ", 1)
    assert shape == "(1, 16, 11, 18)" and float(err) < 1e-5
