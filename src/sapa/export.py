"""Deployment: ``torch.export`` and plain-operator ONNX for every upsampler and host (docs/DEPLOY.md).

    export_onnx(module, example_inputs, f, *, opset=18, dynamic=True, **options) -> onnx.ModelProto

How: ``torch.export.export`` (our ops appear as the custom ops they are, with dynamic batch and
spatial dims), then ``run_decompositions`` replaces every ``sapa::*_fwd_*`` op with its pure-aten
form (``sapa/ops/<op>/export.py``: row windows and one MatMul per kernel row for the window ops,
one ``grid_sample`` per point for SAPA-D), then torch's dynamo-based ONNX exporter writes standard operators only. The result is
checked (``onnx.checker``, no node outside the default ONNX domain) before anything is written; a
path is written through a temporary file in the same folder and ``os.replace``d, so a failed
export leaves no file behind and never clobbers an existing one.

Opset: torch 2.13's exporter writes opset 18 at the lowest (asked for 17 it converts down and fails
on ``Pad``: "No Adapter To Version $17 for Pad"), so 18 is the default and the minimum. GridSample
(SAPA-D, DySample) would need 16 on its own.

Requires the ``deploy`` extra (``pip install sapa[deploy]``: onnx, onnxscript; onnxruntime to run).
"""
from __future__ import annotations

import io
import os
import tempfile
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["export_onnx", "export_program", "decompositions", "MIN_OPSET", "count_nodes", "build_host", "HOSTS",
           "onnx_latency", "torch_latency"]

MIN_OPSET = 18  # the lowest opset torch.onnx's dynamo exporter writes (see the module docstring)
_OP_OPSET = {"GridSample": 16}  # ONNX ops our modules use that are newer than opset 13


def adaptive_avg_pool2d(y: torch.Tensor, output_size) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` for any input size, from cumulative sums (bin ``i`` of ``n`` rows is
    ``[floor(i n / k), ceil((i + 1) n / k))``, as PyTorch). torch.onnx writes the adaptive pool as
    an AveragePool sized for the example input, wrong at other sizes (A2U: relative error 0.06 at
    9x17 after exporting at 12x14; UPerNet's pyramid pooling likewise)."""
    if isinstance(output_size, int):
        output_size = (output_size, output_size)

    def pool(t, dim, k):
        if k == 1:
            return t.mean(dim, keepdim=True)
        n = t.shape[dim]
        i = torch.arange(k, device=t.device)
        start = torch.div(i * n, k, rounding_mode="floor")
        end = torch.div((i + 1) * n + k - 1, k, rounding_mode="floor")
        c = torch.cat([torch.zeros_like(t.narrow(dim, 0, 1)), t.cumsum(dim)], dim)
        shape = [1] * t.dim()
        shape[dim] = k
        return (c.index_select(dim, end) - c.index_select(dim, start)) / (end - start).to(t.dtype).view(shape)

    return pool(pool(y, -2, output_size[0]), -1, output_size[1])


def softmax_not_last(x: torch.Tensor, dim: int, half_to_float: bool):
    """``aten._softmax`` over a dimension other than the last, as max / exp / sum / div (the same
    formula). onnxruntime's ``Softmax`` moves a non-last axis to the end and back; the explicit form
    reduces in place. Measured on CARAFE's kernel normalisation (``[B, G, K*K, H', W']`` over
    ``K*K``) at the SegFormer-B1 placement, 2 threads: 64 -> 53 ms for the whole module. A softmax
    over the last dimension stays one ``Softmax`` node (``NotImplemented`` keeps the op)."""
    if half_to_float or dim % x.dim() == x.dim() - 1:
        return NotImplemented
    e = torch.exp(x - x.amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)


def pixel_shuffle(t: torch.Tensor, upscale_factor: int) -> torch.Tensor:
    """``F.pixel_shuffle`` as two single-axis moves with a reshape between them (so onnxruntime does
    not merge them back into one general 6-D transpose, which has no fast path: CARAFE's kernels,
    ``[1, 100, 64, 64] -> [1, 25, 128, 128]``, took 4.0 ms of the module's 63 at 2 threads)."""
    s = upscale_factor
    y = t.unflatten(1, (-1, s, s)).permute(0, 1, 2, 4, 5, 3)  # [B, C, a, H, W, b]
    y = y.flatten(4, 5).transpose(2, 3)  # [B, C, H, a, W*b]
    return y.flatten(2, 3)  # [B, C, H*s, W*s]


def decompositions() -> dict:
    """``{op: pure-aten decomposition}`` applied before writing ONNX: every forward sapa custom op of
    every backend, ``aten.adaptive_avg_pool2d`` (see :func:`adaptive_avg_pool2d`) and a softmax over
    a dimension other than the last (see :func:`softmax_not_last`)."""
    from .ops.deform import export as deform
    from .ops.window import export as window

    return {**window.decompositions(), **deform.decompositions(),
            torch.ops.aten.adaptive_avg_pool2d.default: adaptive_avg_pool2d,
            torch.ops.aten._adaptive_avg_pool2d.default: adaptive_avg_pool2d,
            torch.ops.aten._softmax.default: softmax_not_last,
            torch.ops.aten.pixel_shuffle.default: pixel_shuffle}


def _args(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(
            isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    got = type(example_inputs).__name__
    if isinstance(example_inputs, (tuple, list)):
        got += " of " + ", ".join(type(t).__name__ for t in example_inputs) if example_inputs else " (empty)"
    raise TypeError(f"example_inputs must be a tensor or a non-empty tuple of tensors "
                    f"(x or (x, guide)), got {got}")


def _check_module(module) -> nn.Module:
    from .registry import Upsampler

    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a sapa upsampler (sapa.build_upsampler(...)) or a host network "
                        f"(a torch.nn.Module), got {type(module).__name__}")
    if module.training:
        kind = "upsampler" if isinstance(module, Upsampler) else "module"
        raise ValueError(f"{kind} {type(module).__name__} is in training mode: call .eval() before "
                         f"exporting (batch statistics and dropout would be baked into the graph)")
    return module


def _dynamic_shapes(args: tuple, dynamic: bool):
    if not dynamic:
        return None
    D = torch.export.Dim.DYNAMIC
    return tuple({d: D for d in (0, 2, 3)} if t.dim() == 4 else {0: D} for t in args)


def export_program(module: nn.Module, example_inputs, *, dynamic: bool = True) -> torch.export.ExportedProgram:
    """``torch.export.export`` of an eval-mode module with dynamic batch and spatial dims (dims 0, 2, 3
    of every 4-D input; ceil-mode guide sizes stay a run-time check). sapa's ops appear as the
    custom ops they are (``torch.ops.sapa.*``)."""
    module = _check_module(module)
    args = _args(example_inputs)
    if dynamic:
        # torch.export specialises dims of size 0 and 1: a batch-1 example is traced as batch 2 (the
        # graph is the same); a spatial size below 2 cannot be made dynamic.
        if all(t.dim() > 0 and t.shape[0] == 1 for t in args):
            args = tuple(t.expand(2, *t.shape[1:]) for t in args)
        small = [f"input {i} {list(t.shape)}" for i, t in enumerate(args) if t.dim() == 4 and min(t.shape[2:]) < 2]
        if small:
            raise ValueError(f"example_inputs: a dynamic export needs spatial sizes >= 2, got {', '.join(small)}; "
                             f"use a larger example or dynamic=False")
    return torch.export.export(module, args, dynamic_shapes=_dynamic_shapes(args, bool(dynamic)))


def _required_opset(model) -> tuple[int, list[str]]:
    needs = sorted({n.op_type for n in model.graph.node if n.op_type in _OP_OPSET})
    return max([MIN_OPSET] + [_OP_OPSET[o] for o in needs]), needs


def _check_opset(opset) -> int:
    import onnx

    top = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int in [{MIN_OPSET}, {top}], got {opset!r}")
    if not MIN_OPSET <= opset <= top:
        raise ValueError(f"opset {opset} is not supported: torch.onnx's exporter writes opset {MIN_OPSET} or "
                         f"newer (GridSample, used by sapa_d and dysample, needs 16), and the installed "
                         f"onnx {onnx.__version__} knows opsets up to {top}; valid: {MIN_OPSET}..{top}")
    return opset


def _foreign_nodes(model) -> list[str]:
    bad = [f"{n.op_type} (domain {n.domain!r})" for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    bad += [f"function {fn.name} (domain {fn.domain!r})" for fn in model.functions]
    return bad


def _check_target(f) -> None:
    if isinstance(f, (str, os.PathLike)):
        path = os.fspath(f)
        folder = os.path.dirname(os.path.abspath(path)) or "."
        if os.path.isdir(path):
            raise OSError(f"output path {path!r} is a directory; give a file name such as model.onnx")
        if not os.path.isdir(folder):
            raise OSError(f"cannot write {path!r}: folder {folder!r} does not exist")
        if not os.access(folder, os.W_OK):
            raise OSError(f"cannot write {path!r}: folder {folder!r} is not writable")
    elif not (hasattr(f, "write") and not isinstance(f, io.TextIOBase)):
        raise TypeError(f"f must be a path or a binary file object opened for writing, got {type(f).__name__}")


def _write(data: bytes, f) -> None:
    if not isinstance(f, (str, os.PathLike)):
        f.write(data)
        return
    path = os.path.abspath(os.fspath(f))
    fd, tmp = tempfile.mkstemp(prefix=".sapa-export-", suffix=".onnx.tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_onnx(module: nn.Module, example_inputs, f, *, opset: int = MIN_OPSET, dynamic: bool = True,
                **options: Any):
    """Export ``module`` (eval mode) to ONNX with standard operators only.

    Args:
        module: a sapa upsampler or host network (any ``torch.nn.Module``) in eval mode.
        example_inputs: ``x`` or ``(x, guide)`` (a host: its input image).
        f: a path or a binary file object; a path is written atomically (temporary file + os.replace).
        opset: ONNX opset, ``>= 18`` (default 18, the lowest torch.onnx writes).
        dynamic: batch and spatial dims of every 4-D input dynamic (default); ``False`` fixes the
            example's shapes.
        options: passed to ``torch.onnx.export`` (e.g. ``input_names``, ``output_names``,
            ``optimize``, ``verbose``).

    Returns:
        the checked ``onnx.ModelProto`` that was written.

    Raises:
        TypeError: not a module, bad example_inputs or f. ValueError: training mode, unsupported
        opset. OSError: the output cannot be written (nothing is left behind).
    """
    module = _check_module(module)
    args = _args(example_inputs)
    opset = _check_opset(opset)
    _check_target(f)
    import onnx

    ep = export_program(module, args, dynamic=dynamic)
    table = torch.export.default_decompositions()
    for op, fn in decompositions().items():
        table[op] = fn
    ep = ep.run_decompositions(table)
    leftover = sorted({str(n.target) for n in ep.graph.nodes
                       if n.op == "call_function" and str(n.target).startswith("sapa.")})
    if leftover:  # pragma: no cover - a new custom op without a decomposition
        raise ValueError(f"no ONNX decomposition for custom op(s) {leftover}; add one to "
                         f"sapa/ops/<op>/export.py")
    options.setdefault("optimize", True)
    options.setdefault("verbose", False)
    program = torch.onnx.export(ep, f=None, dynamo=True, opset_version=opset, external_data=False, **options)
    model = program.model_proto
    need, ops = _required_opset(model)
    if opset < need:  # pragma: no cover - MIN_OPSET covers every op we emit today
        raise ValueError(f"{type(module).__name__} needs opset >= {need} ({', '.join(ops)}), got opset={opset}")
    bad = _foreign_nodes(model)
    if bad:
        raise ValueError(f"the exported graph has nodes outside the standard ONNX domain: {bad[:5]}")
    onnx.checker.check_model(model, full_check=True)
    _write(model.SerializeToString(), f)
    return model


# --------------------------------------------------------------------------------- measuring


def count_nodes(model) -> dict[str, int]:
    """``{op_type: count}`` of an ONNX model's top-level graph."""
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _median_ms(fn, repeats: int, warmup: int = 2) -> float:
    import statistics

    from .bench.runner import time_case

    return statistics.median(time_case(fn, repeats, warmup)) * 1e3


def onnx_session(model, threads: int | None = None):
    """An onnxruntime CPU session for a ModelProto or a path (``threads``: intra-op threads,
    default torch.get_num_threads())."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    src = model if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: Sequence[torch.Tensor]):
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def onnx_latency(session, inputs: Sequence[torch.Tensor], repeats: int = 10) -> float:
    """Median onnxruntime latency in ms."""
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    return _median_ms(lambda: session.run(None, feeds), repeats)


def torch_latency(module: nn.Module, inputs: Sequence[torch.Tensor], repeats: int = 10,
                  backend: str | None = "cpu") -> float:
    """Median eager forward latency in ms under ``sapa.use_backend(backend)``."""
    from .backends import use_backend

    with torch.inference_mode(), use_backend(backend):
        return _median_ms(lambda: module(*inputs), repeats)


# --------------------------------------------------------------------------------- hosts

HOSTS = ("segformer-b1", "upernet-r50", "faster-rcnn-r50")


class _FeatureTuple(nn.Module):
    """A module returning a dict of maps, as a tuple (ONNX outputs are positional)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return tuple(self.module(x).values())


def build_host(name: str, upsampler: Any = None, num_classes: int | None = None) -> nn.Module:
    """A host network in eval mode, randomly initialised (no weights are read or downloaded).

    ``segformer-b1`` and ``upernet-r50``: image ``[B, 3, H, W]`` -> logits. ``faster-rcnn-r50``: the
    ResNet-50 + FPN backbone, image -> the five FPN maps (P2..P5, pool) as a tuple; the detection
    heads (RPN proposals, RoIAlign, NMS, a data-dependent number of boxes) are not exported.
    """
    from . import models

    if name not in HOSTS:
        raise KeyError(f"unknown host {name!r}; valid hosts: {', '.join(HOSTS)}")
    kw = {} if upsampler is None else {"upsampler": upsampler}
    if name == "segformer-b1":
        m = models.segformer_b1(num_classes=num_classes or 150, **kw)
    elif name == "upernet-r50":
        m = models.upernet_r50(num_classes=num_classes or 150, aux=False, **kw)
    else:
        from .models.faster_rcnn import ResNetFPNBackbone

        m = _FeatureTuple(ResNetFPNBackbone(50, **kw))
    return m.eval()
