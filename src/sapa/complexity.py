"""FLOPs and parameter counting in the papers' convention (docs/SEMANTICS.md §4).

Convention
----------
* "FLOPs" are **multiply-accumulates** (MACs), as in every table of the papers (mmcv / fvcore
  style): a convolution or linear layer costs ``in_features * out_features`` per output position
  (``Cin/groups * k^2 * Cout``); biases, norms, activations, softmax, pooling, element-wise ops and
  fixed resizes (``F.interpolate``) are not counted.
* Transposed convolutions are counted **per output pixel** (``Cin * k^2 * Cout * H_out * W_out``),
  the convention that reproduces the papers' Deconv rows (+34.4 G in SegFormer-B1), not per input
  pixel as ``torch.utils.flop_counter`` does.
* Matrix products inside attention (``q k^T`` and ``attn v``) are counted, whichever kernel runs
  them (``bmm``/``matmul`` or a fused SDPA, CPU one included).
* Our custom ops are counted by formula (docs/SEMANTICS.md §4.2), never by what their implementation happens to
  execute (the reference backend's unfold/einsum, a Numba kernel, a Triton kernel, or a
  ``torch.ops.sapa`` custom op are all counted the same):

  ==================== ===============================================================
  window_similarity    ``B * d * K^2 * H' * W'``
  reassemble           ``B * C * K^2 * H' * W'``  (CARAFE, A2U, FADE use it too)
  sapa                 ``B * (d + C) * K^2 * H' * W'``
  deform_similarity    ``B * G*d * P * H' * W' * (1 + sampling_macs)``
  deform_reassemble    ``B * C * P * H' * W' * (1 + sampling_macs)``
  sapa_deform          the sum of the two
  grid_sample          ``sampling_macs`` per output element (bilinear; 0 for nearest)
  ==================== ===============================================================

  ``sampling_macs`` (default 4) is the cost of one bilinear sample per scalar (four corner
  multiply-adds). With ``sampling_macs=8`` (corner weights recomputed for every channel, as a
  per-(pixel, channel) kernel does) SAPA-D in SegFormer-B1 comes to +5.28 G, the papers' +5.3.

How
---
:class:`MacCounter` runs the model under ``torch.utils.flop_counter.FlopCounterMode`` (aten-level:
conv, mm/addmm/bmm, SDPA) with the convolution formula replaced as above, and at the same time
*intercepts* the public ops of :mod:`sapa.functional`: inside the ``with`` block the backend
lookup every op goes through (``sapa.backends.get_impl``) and every module-level reference to the
ops in ``sapa.*`` modules (and in the modules defining the model's classes) point to wrappers that
add the formula's MACs and run the implementation with the dispatch modes disabled, so the aten
ops it executes internally are not counted a second time. Custom ops registered
under ``torch.ops.sapa`` with a functional op's name (optionally + ``_fwd``/``_fwd_cpu``/...; others via
:func:`register_op_formula`) are caught by a dispatch mode inside FlopCounterMode's, counted by the
same formulas and run with counting paused, so a direct call of such an op is counted once too.

Models can be counted on the ``meta`` device (no memory, no compute): :func:`measure` builds them
there by default. Not thread-safe (the interception patches module attributes for its duration).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = ["OP_FORMULAS", "op_macs", "count_params", "MacCounter", "Complexity", "count_complexity", "measure",
           "register_op_formula", "HOSTS", "host_rows"]


# --- formulas of the custom ops (arguments by the names of sapa.functional's signatures) -----------
def _hw(t) -> int:
    return int(t.shape[0]) * int(t.shape[-2]) * int(t.shape[-1])


def _window_similarity(a: dict, sampling_macs: int) -> int:
    K = a["kernel_size"]
    return _hw(a["q"]) * int(a["q"].shape[1]) * K * K


def _reassemble(a: dict, sampling_macs: int) -> int:
    K = a["kernel_size"]
    return _hw(a["weights"]) * int(a["v"].shape[1]) * K * K


def _sapa(a: dict, sampling_macs: int) -> int:
    K = a["kernel_size"]
    return _hw(a["q"]) * (int(a["q"].shape[1]) + int(a["v"].shape[1])) * K * K


def _deform_similarity(a: dict, sampling_macs: int) -> int:
    return _hw(a["q"]) * int(a["q"].shape[1]) * a["num_points"] * (1 + sampling_macs)


def _deform_reassemble(a: dict, sampling_macs: int) -> int:
    return _hw(a["offset"]) * int(a["v"].shape[1]) * a["num_points"] * (1 + sampling_macs)


def _sapa_deform(a: dict, sampling_macs: int) -> int:
    n = _hw(a["q"]) * a["num_points"] * (1 + sampling_macs)
    return n * (int(a["q"].shape[1]) + int(a["v"].shape[1]))


#: op name in :mod:`sapa.functional` -> formula(arguments by name, sampling_macs) -> MACs.
OP_FORMULAS: dict[str, Callable[[dict, int], int]] = {
    "window_similarity": _window_similarity,
    "reassemble": _reassemble,
    "sapa": _sapa,
    "deform_similarity": _deform_similarity,
    "deform_reassemble": _deform_reassemble,
    "sapa_deform": _sapa_deform,
}
_EXTRA_CUSTOM_FORMULAS: dict[Any, Callable[..., int]] = {}


def _bind(name: str, args: tuple, kwargs: dict) -> dict:
    from . import functional

    sig = inspect.signature(getattr(functional, name))
    bound = sig.bind_partial(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def op_macs(op: str, *args, sampling_macs: int = 4, **kwargs) -> int:
    """MACs of one call ``sapa.functional.<op>(*args, **kwargs)`` (tensors may be on ``meta``)."""
    if op not in OP_FORMULAS:
        raise KeyError(f"op_macs: unknown op {op!r}; valid: {', '.join(OP_FORMULAS)}")
    return OP_FORMULAS[op](_bind(op, args, kwargs), sampling_macs)


def register_op_formula(op, formula: Callable[..., int]) -> None:
    """Count a custom op (an ``OpOverloadPacket`` such as ``torch.ops.sapa.my_op``) by ``formula``.

    ``formula(*args, **kwargs)`` receives the op's real arguments and returns its MACs. Use this for
    custom ops whose name is not one of :data:`OP_FORMULAS` (those are found automatically)."""
    if not isinstance(op, torch._ops.OpOverloadPacket):
        raise TypeError(f"register_op_formula: op must be an OpOverloadPacket (torch.ops.<ns>.<name>), "
                        f"got {type(op).__name__}")
    _EXTRA_CUSTOM_FORMULAS[op] = formula


# --- aten formulas (FLOPs = 2 * MACs inside FlopCounterMode) -----------------------------------------
def _conv_per_output(x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed, *args,
                     out_shape=None, **kwargs) -> int:
    # prod(w_shape) = Cout * Cin/g * k^2 (normal) or Cin * Cout/g * k^2 (transposed): MACs per output
    # pixel in both cases (docs/SEMANTICS.md §4.1: Deconv counted per output pixel).
    return 2 * int(out_shape[0]) * math.prod(out_shape[2:]) * math.prod(w_shape)


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _grid_sampler_flops(sampling_macs: int):
    def formula(input, grid, interpolation_mode=0, *args, out_val=None, **kwargs) -> int:
        per = {0: sampling_macs, 1: 0, 2: 16}.get(int(interpolation_mode), sampling_macs)
        return 2 * per * out_val.numel()
    formula._get_raw = True
    return formula


# sapa/ops/<op>/op.py names its forward custom ops "<op>_fwd_<backend>" with the functional op's
# positional arguments; "_bwd" ops are never counted (the counter counts forward passes).
_CUSTOM_SUFFIXES = ("", "_fwd", "_forward", "_fwd_cpu", "_fwd_triton", "_fwd_cuda")
_NAMESPACE = "sapa"


def _aten_mapping(sampling_macs: int) -> dict:
    aten = torch.ops.aten
    mapping: dict[Any, Any] = {aten.convolution: _conv_per_output, aten._convolution: _conv_per_output,
                               aten.grid_sampler_2d: _grid_sampler_flops(sampling_macs)}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu
    return mapping


def _custom_op_formulas(sampling_macs: int) -> dict[Any, tuple[str, Callable[..., int]]]:
    """``torch.ops.sapa`` packets -> (label, formula(*args, **kwargs) -> MACs), for the custom ops
    registered so far: those named after a functional op (+ a suffix) and :func:`register_op_formula`'s."""
    out: dict[Any, tuple[str, Callable[..., int]]] = {}
    for name in OP_FORMULAS:
        for suffix in _CUSTOM_SUFFIXES:
            try:
                packet = getattr(getattr(torch.ops, _NAMESPACE), name + suffix)
            except (AttributeError, RuntimeError):
                continue
            out[packet] = (f"sapa.{name}",
                           functools.partial(lambda n, *a, **k: OP_FORMULAS[n](_bind(n, a, k), sampling_macs), name))
    for packet, fn in _EXTRA_CUSTOM_FORMULAS.items():
        out[packet] = (str(packet), fn)
    return out


def _custom_ops_mode(counter: "MacCounter", formulas: dict):
    """A dispatch mode entered inside FlopCounterMode: a ``torch.ops.sapa`` custom op with a formula
    is counted by it and run with every mode disabled (and the functional interception paused), so
    nothing it executes internally is counted too. Other ops pass through to FlopCounterMode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            entry = formulas.get(getattr(func, "_overloadpacket", None))
            if entry is None or counter._depth:
                return func(*args, **kwargs)
            label, formula = entry
            counter._add(label, int(formula(*args, **kwargs)))
            return counter._run_uncounted(func, args, kwargs)

    return _Mode()


# --- the counter -------------------------------------------------------------------------------------
def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (unique) parameters; ``trainable_only`` counts those with ``requires_grad`` (what
    mmcv's counter reports). Buffers (e.g. frozen BatchNorm statistics) never count."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


class MacCounter:
    """Context manager counting MACs of everything run inside it (see the module docstring).

        >>> import torch, sapa.functional as F
        >>> conv, x = torch.nn.Conv2d(4, 8, 1), torch.randn(1, 4, 2, 2)
        >>> with MacCounter() as mc:          # 1x1 conv: 4 * 8 MACs at each of 2 * 2 pixels
        ...     y = conv(x)
        >>> mc.macs, mc.by_op
        (128, {'aten.convolution': 128})
        >>> q, k = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 2, 2)
        >>> with MacCounter() as mc:          # (d + C) * K^2 * H' * W' = 8 * 9 * 16
        ...     out = F.sapa(q, k, k, kernel_size=3, scale_factor=2)
        >>> mc.by_op
        {'sapa.sapa': 1152}

    Args:
        sampling_macs: MACs of one bilinear sample per scalar (SAPA-D, grid_sample); default 4.
        modules: extra modules whose module-level references to ``sapa.functional`` ops are
            patched too (the classes of a model passed to :func:`count_complexity` are added).
    """

    def __init__(self, sampling_macs: int = 4, modules: Iterable[Any] = ()):
        self.sampling_macs = int(sampling_macs)
        self.extra_modules = list(modules)
        self.by_op: dict[str, int] = {}
        self.by_module: dict[str, int] = {}
        self.macs = 0
        self._depth = 0
        self._patched: list[tuple[Any, str, Any]] = []
        self._fc = None
        self._own: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    # interception of sapa.functional
    def _add(self, key: str, macs: int) -> None:
        for par in set(self._fc.mod_tracker.parents):
            self._own[par][key] += macs

    def _record(self, name: str, args: tuple, kwargs: dict) -> None:
        self._add(f"sapa.{name}", OP_FORMULAS[name](_bind(name, args, kwargs), self.sampling_macs))

    def _run_uncounted(self, fn: Callable, args: tuple, kwargs: dict):
        from torch.utils._python_dispatch import _disable_current_modes

        self._depth += 1
        try:
            with _disable_current_modes():
                return fn(*args, **kwargs)
        finally:
            self._depth -= 1

    def _wrapper(self, name: str, orig: Callable) -> Callable:
        @functools.wraps(orig)
        def wrapped(*args, **kwargs):
            if self._depth:
                return orig(*args, **kwargs)
            self._record(name, args, kwargs)
            return self._run_uncounted(orig, args, kwargs)
        wrapped.__sapa_complexity_wrapped__ = True
        return wrapped

    def _get_impl_wrapper(self, orig: Callable) -> Callable:
        # Every public op asks backends.get_impl(op, ...) for its implementation and calls it with
        # its own positional arguments (minus ``backend``): wrapping what get_impl returns catches
        # calls through references to the functional ops taken before the block started.
        @functools.wraps(orig)
        def get_impl(op, *tensors, **kw):
            backend_name, impl = orig(op, *tensors, **kw)
            if op not in OP_FORMULAS:
                return backend_name, impl

            def counted(*args, **kwargs):
                if self._depth:
                    return impl(*args, **kwargs)
                self._record(op, args, kwargs)
                return self._run_uncounted(impl, args, kwargs)
            return backend_name, counted
        get_impl.__sapa_complexity_wrapped__ = True
        return get_impl

    def _patch(self) -> None:
        from . import backends, functional

        originals = {name: getattr(functional, name) for name in OP_FORMULAS if hasattr(functional, name)}
        replace = {id(orig): self._wrapper(name, orig) for name, orig in originals.items()}
        replace[id(backends.get_impl)] = self._get_impl_wrapper(backends.get_impl)
        mods = {m for n, m in list(sys.modules.items()) if m is not None and (n == "sapa" or n.startswith("sapa."))}
        mods.update(m for m in self.extra_modules if m is not None)
        for mod in mods:
            for attr, val in list(vars(mod).items()):
                new = replace.get(id(val))
                if new is not None:
                    self._patched.append((mod, attr, val))
                    setattr(mod, attr, new)

    def _unpatch(self) -> None:
        for mod, attr, val in reversed(self._patched):
            setattr(mod, attr, val)
        self._patched.clear()

    def __enter__(self) -> "MacCounter":
        from torch.utils.flop_counter import FlopCounterMode

        self._own.clear()
        self._fc = FlopCounterMode(display=False, custom_mapping=_aten_mapping(self.sampling_macs))
        self._mode = _custom_ops_mode(self, _custom_op_formulas(self.sampling_macs))
        self._patch()
        try:
            self._fc.__enter__()
            self._mode.__enter__()
        except BaseException:
            self._unpatch()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._mode.__exit__(*exc)
            self._fc.__exit__(*exc)
        finally:
            self._unpatch()
        counts = self._fc.get_flop_counts()
        by_module: dict[str, int] = defaultdict(int)
        by_op: dict[str, int] = defaultdict(int)
        for mod, ops in counts.items():
            for op, flops in ops.items():
                by_module[mod] += flops // 2
                if mod == "Global":
                    by_op[str(op)] += flops // 2
        for mod, ops in self._own.items():
            for op, macs in ops.items():
                by_module[mod] += macs
                if mod == "Global":
                    by_op[op] += macs
        self.by_module = dict(by_module)
        self.by_op = dict(by_op)
        self.macs = self.by_module.get("Global", 0)


@dataclass
class Complexity:
    """MACs and parameters of one model at one input size."""

    macs: int
    params: int
    by_op: dict[str, int] = field(default_factory=dict)
    by_module: dict[str, int] = field(default_factory=dict)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def params_m(self) -> float:
        return self.params / 1e6


def _model_modules(model: nn.Module) -> list[Any]:
    return [sys.modules.get(type(m).__module__) for m in model.modules()]


def count_complexity(model: nn.Module, *inputs, sampling_macs: int = 4, target: nn.Module | None = None,
                     trainable_only: bool = False, backend: str | None = "reference") -> Complexity:
    """MACs of ``target(*inputs)`` (default: ``model``) under ``torch.no_grad``, and ``model``'s
    parameter count. ``backend`` is forced for the sapa ops while counting ("reference" runs on any
    device, ``meta`` included; the count does not depend on it)."""
    from .backends import use_backend

    target = model if target is None else target
    was_training = target.training
    target.eval()
    try:
        with torch.no_grad(), use_backend(backend), MacCounter(sampling_macs, _model_modules(target)) as mc:
            target(*inputs)
    finally:
        target.train(was_training)
    return Complexity(mc.macs, count_params(model, trainable_only), mc.by_op, mc.by_module)


# --- hosts of the papers' tables --------------------------------------------------------------------
@dataclass
class Host:
    name: str
    baseline: str
    build: Callable[[Any], nn.Module]
    target: Callable[[nn.Module], nn.Module]
    flops_note: str
    # paper deltas (GFLOPs, Params M) per upsampler and the paper baseline (absolute)
    paper: dict[str, tuple[float | None, float | None]]
    paper_source: str
    preset_host: str = "segformer"
    """the host key of :mod:`sapa.models.presets` whose published configurations the model builds"""


class _DenseDetector(nn.Module):
    """Backbone + FPN + RPN head of a torchvision detector: the part whose cost does not depend on
    how many proposals survive NMS."""

    def __init__(self, det: nn.Module):
        super().__init__()
        self.backbone = det.backbone
        self.rpn_head = det.rpn.head

    def forward(self, x):
        return self.rpn_head(list(self.backbone(x).values()))


def _segformer_b1(up):
    from .models.segformer import segformer_b1
    return segformer_b1(num_classes=150, upsampler=up)


def _upernet(depth):
    def build(up):
        from .models.upernet import upernet
        return upernet(depth, num_classes=150, upsampler=up)
    return build


def _faster_rcnn(depth):
    def build(up):
        from .models.faster_rcnn import faster_rcnn
        return faster_rcnn(depth, num_classes=81, upsampler=up)
    return build


def _with_aux(model):
    class _Both(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.forward_with_aux(x)
    return _Both(model)


# Papers' numbers (docs/SEMANTICS.md §7): SegFormer-B1 from the NeurIPS README where it has the row (2
# decimals), the extension README otherwise; UPerNet from the extension README; Faster R-CNN from
# the NeurIPS README (3 upsamplers, as the code builds) where it has the row, else the extension's.
_SEGFORMER_PAPER = {"bilinear": (15.91, 13.74), "deconv": (34.4, 3.5), "pixelshuffle": (34.4, 3.5),
                    "carafe": (1.45, 0.44), "indexnet": (30.65, 12.60), "a2u": (0.41, 0.06), "fade": (2.7, 0.3),
                    "sapa_i": (0.75, 0.0), "sapa_b": (1.02, 0.1), "sapa_g": (1.02, 0.1), "sapa_d": (5.3, 0.8)}
_UPERNET50_PAPER = {"bilinear": (None, 66.5), "deconv": (None, 7.1), "pixelshuffle": (None, 28.3),
                    "carafe": (None, 0.3), "indexnet": (None, 25.2), "a2u": (None, 0.1), "fade": (None, 0.1),
                    "sapa_i": (None, 0.0), "sapa_b": (None, 0.1), "sapa_d": (None, 0.1)}
_FRCNN50_PAPER = {"nearest": (None, 41.53), "deconv": (None, 2.4), "pixelshuffle": (None, 9.4),
                  "carafe": (None, 0.22), "indexnet": (None, 6.30), "a2u": (None, 0.03), "fade": (None, 0.2),
                  "sapa_i": (None, 0.0), "sapa_b": (None, 0.05), "sapa_g": (None, 0.05), "sapa_d": (None, 0.6)}

HOSTS: dict[str, Host] = {
    "segformer-b1": Host("segformer-b1", "bilinear", _segformer_b1, lambda m: m,
                         "whole model", _SEGFORMER_PAPER, "NeurIPS README (extension README for Deconv, "
                         "PixelShuffle, FADE, SAPA-D)"),
    "upernet-r50": Host("upernet-r50", "bilinear", _upernet(50), _with_aux,
                        "whole model with the auxiliary FCN head", _UPERNET50_PAPER, "extension README (params only)",
                        "upernet"),
    "upernet-r101": Host("upernet-r101", "bilinear", _upernet(101), _with_aux,
                         "whole model with the auxiliary FCN head",
                         {"bilinear": (None, 85.5), "sapa_d": (None, 0.1)}, "extension README (params only)",
                         "upernet"),
    "faster-rcnn-r50": Host("faster-rcnn-r50", "nearest", _faster_rcnn(50), _DenseDetector,
                            "backbone + FPN + RPN head (the RoI head's cost depends on the number of proposals)",
                            _FRCNN50_PAPER, "NeurIPS README (extension README for Deconv, PixelShuffle, FADE, "
                            "SAPA-D); params only", "fpn"),
    "faster-rcnn-r101": Host("faster-rcnn-r101", "nearest", _faster_rcnn(101), _DenseDetector,
                             "backbone + FPN + RPN head (the RoI head's cost depends on the number of proposals)",
                             {"nearest": (None, 65.8), "sapa_d": (None, 0.6)}, "extension README (params only)",
                             "fpn"),
}


def measure(host: str, upsampler: Any, size: int | Sequence[int] = 512, *, device: str | torch.device = "meta",
            sampling_macs: int = 4, batch: int = 1) -> Complexity:
    """Complexity of ``host`` (a key of :data:`HOSTS`) with ``upsampler`` at ``size`` (an int or
    ``(H, W)``). Built and run on ``device`` (``meta`` by default: no memory, no compute); if the
    model cannot run on ``meta`` it is rebuilt on the CPU."""
    if host not in HOSTS:
        raise KeyError(f"unknown host {host!r}; valid: {', '.join(HOSTS)}")
    h = HOSTS[host]
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    torch.manual_seed(0)

    def run(dev):
        with torch.device(dev):
            model = h.build(upsampler)
        x = torch.randn(batch, 3, H, W, device=dev)
        return count_complexity(model, x, sampling_macs=sampling_macs, target=h.target(model))

    if torch.device(device).type != "meta":
        return run(device)
    try:
        return run("meta")
    except (NotImplementedError, RuntimeError):  # a data-dependent op: count with real tensors
        return run("cpu")


def host_rows(host: str, upsamplers: Sequence[Any] | None = None, size: int | Sequence[int] = 512, *,
              sampling_macs: int = 4, device: str = "meta") -> list[dict]:
    """Rows of the complexity table of ``host``: the baseline first, then every upsampler (``None``:
    every registered one; ``[]``: the baseline only). Keys: ``upsampler``, ``config`` (which
    configuration the host builds for the name: the published row of :mod:`sapa.models.presets`
    with its basis, or the registered defaults), ``gflops`` (GMACs),
    ``params_m`` (absolute, whole model), ``d_gflops``, ``d_params_m`` (vs the baseline),
    ``paper_gflops``/``paper_params_m``
    (the papers' value for the row: absolute for the baseline, a delta otherwise; ``None`` where
    the papers have none)."""
    from .models.presets import describe
    from .registry import list_upsamplers

    if host not in HOSTS:
        raise KeyError(f"unknown host {host!r}; valid: {', '.join(HOSTS)}")
    h = HOSTS[host]
    names = list_upsamplers() if upsamplers is None else list(upsamplers)
    names = [h.baseline] + [n for n in names if n != h.baseline]
    base = None
    rows = []
    for name in names:
        c = measure(host, name, size, sampling_macs=sampling_macs, device=device)
        if base is None:
            base = c
        pg, pp = h.paper.get(name, (None, None)) if isinstance(name, str) else (None, None)
        rows.append({"upsampler": name if isinstance(name, str) else repr(name),
                     "config": describe(h.preset_host, name) if isinstance(name, str) else "as given",
                     "gflops": round(c.macs / 1e9, 4), "params_m": round(c.params / 1e6, 4),
                     "d_gflops": round((c.macs - base.macs) / 1e9, 4),
                     "d_params_m": round((c.params - base.params) / 1e6, 4),
                     "paper_gflops": pg, "paper_params_m": pp})
    return rows
