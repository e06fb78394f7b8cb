"""The published configurations: which upsampler module produced each row of the papers' tables.

One row per (host, upsampler) of the papers' tables (SegFormer-B1 and UPerNet on ADE20K, Faster
R-CNN on COCO): the module configuration behind the published number and where that comes from.
The hosts build these by default: ``SegFormerHead(upsampler="sapa_b")`` builds the NeurIPS SAPA-B
(per-pixel LayerNorm + Linear, d = 32), because every published SAPA-B number is a NeurIPS-era run,
not the registry's default journal module (GroupNorm(32) + 1x1 convs), which has no published row.

Rules:

* A **name** (``"sapa_b"``) or a **dict** (``dict(type="sapa_b", ...)``) gets the row's
  configuration; keys the user passes win (``dict(type="sapa_b", version="journal")`` builds the
  journal module, with the row's other keys).
* A **class** or an **instance** is taken as given (the class with its own defaults): that is the
  way to build a module with no preset at all.
* Upsamplers without a row in a host (DySample: in none of the papers' tables) are built with
  their registered defaults.
* Host-level parts of a configuration are the host's: FPN re-initialises every ``nn.Conv2d`` inside
  the neck, upsamplers included, with Xavier-uniform (mmdet's neck ``init_cfg``); opt out with
  ``FPN(..., xavier_upsamplers=False)``. ``nn.Linear`` (the NeurIPS SAPA modules) and
  ``nn.ConvTranspose2d`` (deconv) are not ``Conv2d`` and keep their own init.

``basis`` says how sure a row is: ``released`` (a released config file, log or code path builds
exactly this), ``inferred`` (the published number is a NeurIPS-era run whose host code is not
released; the module is the one those runs printed, its size matches the published parameter
count), ``ours`` (no released code at all: our documented choice, not a reproduction).

Sources are named as repository + file: ``poppinace/sapa`` (NeurIPS code and SegFormer logs),
``poppinace/fade`` (the SegFormer head and baseline logs), ``tiny-smart/segmentation-with-upsamplers``
(mmseg fork: UPerNet), ``tiny-smart/detection-with-upsamplers`` (mmdet fork: FPN). The semantics
of every module are in docs/SEMANTICS.md.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Preset", "PRESETS", "PRESET_HOSTS", "get_preset", "list_presets", "resolve_spec", "describe",
           "presets_markdown"]

#: host key -> the classes / builders that use it
PRESET_HOSTS: dict[str, str] = {
    "segformer": "SegFormerHead (segformer_b1, the demo's TinySegmenter)",
    "upernet": "UPerHead (upernet_r50 / upernet_r101)",
    "fpn": "FPN (faster_rcnn_r50 / faster_rcnn_r101, tiny_faster_rcnn)",
}
BASES = ("released", "inferred", "ours")


@dataclass(frozen=True)
class Preset:
    """One published row: ``host``, ``upsampler``, the module keyword arguments ``config`` (what
    :func:`sapa.build_upsampler` receives besides the channels), a short ``label``, the ``basis``
    (see the module docstring), the ``source`` and, for ``basis="ours"``, ``why``."""

    host: str
    upsampler: str
    config: Mapping[str, Any]
    label: str
    basis: str
    source: str
    why: str = ""
    init: str = field(default="", compare=False)

    def spec(self) -> dict[str, Any]:
        """``dict(type=upsampler, **config)``."""
        return {"type": self.upsampler, **dict(self.config)}


_FORK_SEG = "tiny-smart/segmentation-with-upsamplers"
_FORK_DET = "tiny-smart/detection-with-upsamplers"
_NEURIPS_SAPA_B = dict(version="neurips", embedding_dim=32, kernel_size=5)
_NEURIPS_SAPA_B_WHY = ("the SegFormer logs of poppinace/sapa print LCAExp(q_mode='encoder_only'): LayerNorm(256) on "
                       "y and x, Linear(256->32) q/k; the journal GroupNorm module has no published row")
_SAPA_I_WHY = ("no SAPA-I module is released. The NeurIPS code normalises both inputs with a per-pixel LayerNorm "
               "before every similarity and its authors report that training fails without a normalisation; "
               "non-affine keeps the published '+0' parameters")
_SAPA_D = dict(num_points=9, groups=4, embedding_dim=32, high_offset=True, norm=False, qkv_bias=True)
_SAPA_D_WHY = ("no SegFormer/UPerNet SAPA-D config is released; we use the released detection config "
               "(sapadeform-p9g4, norm off) and SAPADeform's defaults. 6 x 139,808 = 0.84 M matches the "
               "SegFormer table's +0.8 M")
_PLACEMENT_WHY = ("the forks register no IndexNet / A2U type, so their placement in this host is not released; "
                  "we use the module the SegFormer log prints")
_XAVIER = "; then Xavier-uniform (neck init_cfg) on every Conv2d"

PRESETS: tuple[Preset, ...] = (
    # --- SegFormer-B1 (NVlabs head of poppinace/fade segformer/segformer_head.py, 6 upsamplers) ---
    Preset("segformer", "bilinear", {}, "one-step resize", "released",
           "poppinace/fade segformer/segformer_head.py (NVlabs head: F.interpolate of _c4/_c3/_c2 to 1/4)"),
    Preset("segformer", "deconv", {"kernel_size": 3}, "ConvT 3x3 s2", "released",
           f"{_FORK_SEG} mmseg/models/upsamplers/build_upsampler.py (deconv)", init="PyTorch default"),
    Preset("segformer", "pixelshuffle", {"kernel_size": 3}, "conv3x3 + PS", "released",
           f"{_FORK_SEG} build_upsampler.py (pixelshuffle)", init="PyTorch default"),
    Preset("segformer", "carafe", {"kernel_size": 5, "groups": 1, "encoder_kernel": 3, "encoder_dilation": 1,
                                   "compressed_channels": 64}, "CARAFEPack k5 c64", "released",
           "poppinace/fade segformer/*.log (CARAFEPack printout)", init="Xavier, encoder normal(0.001)"),
    Preset("segformer", "indexnet", {}, "M2O index block", "released",
           "poppinace/fade segformer/*.log (one linear depthwise M2O index block per upsampler); the wrapper "
           "that applies it is not released: we apply the decoder index to NN-upsampled x",
           init="PyTorch default"),
    Preset("segformer", "a2u", {"kernel_size": 3, "encoder_kernel": 6, "rank": 1}, "A2U k3 r1", "released",
           "poppinace/fade segformer/*.log (A2U printout; its dead bconv_DP branch, 9,252 params, is not built)",
           init="PyTorch default"),
    Preset("segformer", "fade", {"gating": True, "kernel_size": 5, "embedding_dim": 64}, "gated", "released",
           "poppinace/fade segformer/segformer_head.py (FADE with the decoder-dependent gate)", init="Xavier"),
    Preset("segformer", "sapa_i", {"norm": "layer", "kernel_size": 5}, "LayerNorm (non-affine)", "ours",
           "no released module", why=_SAPA_I_WHY),
    Preset("segformer", "sapa_b", _NEURIPS_SAPA_B, "NeurIPS LN+Linear d32", "released",
           "poppinace/sapa SAPA.py; segformer/*.log: LCAExp(q_mode='encoder_only', embedding_dim=32, "
           "up_kernel_size=5)", init="trunc_normal(0.02), zero bias; LayerNorm 1/0"),
    Preset("segformer", "sapa_g", {"embedding_dim": 32, "kernel_size": 5, "qkv_bias": True}, "NeurIPS gate d32",
           "released", "poppinace/sapa SAPAExp.py; segformer/*.log: LCAExp(q_mode='gate', embedding_dim=32)",
           init="trunc_normal(0.02), zero bias"),
    Preset("segformer", "sapa_d", _SAPA_D, "P9 G4 d32, no norm", "ours", "no released SegFormer config",
           why=_SAPA_D_WHY, init="normal(0.02), zero bias"),
    # --- UPerNet (mmseg fork uper_head_upsample.py, 3 upsamplers; mmseg's head init leaves them) ---
    Preset("upernet", "bilinear", {}, "mmseg resize", "released", f"{_FORK_SEG} decode_heads/uper_head_upsample.py"),
    Preset("upernet", "deconv", {"kernel_size": 3}, "ConvT 3x3 s2", "released",
           f"{_FORK_SEG} build_upsampler.py; configs/dynamic_upsampling/", init="PyTorch default"),
    Preset("upernet", "pixelshuffle", {"kernel_size": 3}, "conv3x3 + PS", "released",
           f"{_FORK_SEG} build_upsampler.py; configs/dynamic_upsampling/", init="PyTorch default"),
    Preset("upernet", "carafe", {"kernel_size": 5, "groups": 1, "encoder_kernel": 3, "encoder_dilation": 1,
                                 "compressed_channels": 64}, "CARAFEPack k5 c64", "released",
           f"{_FORK_SEG} configs/dynamic_upsampling/upernet_r50_4xb4_carafe-80k_ade20k-512x512.py",
           init="Xavier, encoder normal(0.001)"),
    Preset("upernet", "indexnet", {}, "M2O index block", "ours", "not released", why=_PLACEMENT_WHY,
           init="PyTorch default"),
    Preset("upernet", "a2u", {"kernel_size": 3, "encoder_kernel": 6, "rank": 1}, "A2U k3 r1", "ours", "not released",
           why=_PLACEMENT_WHY, init="PyTorch default"),
    Preset("upernet", "fade", {"gating": False, "kernel_size": 5, "embedding_dim": 64}, "ungated", "released",
           f"{_FORK_SEG} mmseg/models/upsamplers/build_upsampler.py (fade: gating=False by default)", init="Xavier"),
    Preset("upernet", "sapa_i", {"norm": "layer", "kernel_size": 5}, "LayerNorm (non-affine)", "ours",
           "no released module", why=_SAPA_I_WHY),
    Preset("upernet", "sapa_b", _NEURIPS_SAPA_B, "NeurIPS LN+Linear d32", "inferred",
           "NeurIPS rebuttal (poppinace/sapa README at 8f4eec9: UPerNet-R50 41.47); module of the NeurIPS "
           "SegFormer runs (" + _NEURIPS_SAPA_B_WHY + "); 3 x 34,880 = +0.1 M as published",
           init="trunc_normal(0.02), zero bias; LayerNorm 1/0"),
    Preset("upernet", "sapa_d", _SAPA_D, "P9 G4 d32, no norm", "ours", "no released UPerNet config",
           why=_SAPA_D_WHY, init="normal(0.02), zero bias"),
    # --- Faster R-CNN FPN (mmdet fork necks/fpn_upsample.py, 3 upsamplers, Xavier neck init) ---
    Preset("fpn", "nearest", {}, "mmdet interpolate", "released", f"{_FORK_DET} mmdet/models/necks/fpn_upsample.py"),
    Preset("fpn", "deconv", {"kernel_size": 3}, "ConvT 3x3 s2", "released",
           f"{_FORK_DET} configs/dynamic_upsampling/faster-rcnn_r50_fpn_*.py",
           init="PyTorch default (ConvTranspose2d is not reached by the neck init)"),
    Preset("fpn", "pixelshuffle", {"kernel_size": 3}, "conv3x3 + PS", "released",
           f"{_FORK_DET} configs/dynamic_upsampling/faster-rcnn_r50_fpn_*.py", init="PyTorch default" + _XAVIER),
    Preset("fpn", "carafe", {"kernel_size": 5, "groups": 1, "encoder_kernel": 3, "encoder_dilation": 1,
                             "compressed_channels": 64}, "CARAFEPack k5 c64", "released",
           f"{_FORK_DET} configs/dynamic_upsampling/faster-rcnn_r50_fpn_carafe_1x_coco.py",
           init="Xavier, encoder normal(0.001)" + _XAVIER),
    Preset("fpn", "indexnet", {}, "M2O index block", "ours", "not released", why=_PLACEMENT_WHY,
           init="PyTorch default" + _XAVIER + " (per official 2x2 conv)"),
    Preset("fpn", "a2u", {"kernel_size": 3, "encoder_kernel": 6, "rank": 1}, "A2U k3 r1", "ours", "not released",
           why=_PLACEMENT_WHY, init="PyTorch default" + _XAVIER),
    Preset("fpn", "fade", {"gating": False, "kernel_size": 5, "embedding_dim": 64}, "ungated", "released",
           f"{_FORK_DET} build_upsampler.py (gating=False by default); the configs 'fade' and "
           "'fade-without-gating' build the same module", init="Xavier" + _XAVIER),
    Preset("fpn", "sapa_i", {"norm": "layer", "kernel_size": 5}, "LayerNorm (non-affine)", "ours",
           "no released module", why=_SAPA_I_WHY),
    Preset("fpn", "sapa_b", _NEURIPS_SAPA_B, "NeurIPS LN+Linear d32", "inferred",
           "NeurIPS README detection row (37.8 AP, +0.05 M = 3 x 17,472); module of the NeurIPS SegFormer runs; "
           "its Linear layers are not Conv2d, so the neck init leaves them",
           init="trunc_normal(0.02), zero bias; LayerNorm 1/0"),
    Preset("fpn", "sapa_g", {"embedding_dim": 32, "kernel_size": 5, "qkv_bias": True}, "NeurIPS gate d32",
           "inferred", "NeurIPS README detection row (37.8 AP); module of the NeurIPS SegFormer runs (SAPAExp "
           "q_mode='gate'); Linear layers, untouched by the neck init", init="trunc_normal(0.02), zero bias"),
    Preset("fpn", "sapa_d", _SAPA_D, "P9 G4 d32, no norm", "released",
           f"{_FORK_DET} configs/dynamic_upsampling/faster-rcnn_r50_fpn_sapadeform-p9g4_1x_coco.py",
           init="normal(0.02), zero bias" + _XAVIER),
)

_BY_KEY: dict[tuple[str, str], Preset] = {(p.host, p.upsampler): p for p in PRESETS}


def _check_host(host: str) -> None:
    if host not in PRESET_HOSTS:
        raise KeyError(f"unknown preset host {host!r}; valid: {', '.join(PRESET_HOSTS)}")


def get_preset(host: str, upsampler: str) -> Preset | None:
    """The published configuration of ``upsampler`` in ``host`` (``'segformer'``, ``'upernet'``,
    ``'fpn'``), or ``None`` where the papers have no such row."""
    _check_host(host)
    return _BY_KEY.get((host, upsampler))


def list_presets(host: str | None = None) -> list[Preset]:
    """Every row (of one host, if given), in table order."""
    if host is not None:
        _check_host(host)
    return [p for p in PRESETS if host is None or p.host == host]


def resolve_spec(host: str, spec: Any) -> Any:
    """The spec a host builds for the user's ``spec``: a name or a dict gets the published
    configuration, the user's keys winning; anything else (class, instance, unknown name) is
    returned unchanged."""
    _check_host(host)
    if isinstance(spec, str):
        p = _BY_KEY.get((host, spec))
        return p.spec() if p is not None and p.config else spec
    if isinstance(spec, Mapping) and isinstance(spec.get("type"), str):
        p = _BY_KEY.get((host, spec["type"]))
        if p is not None:
            return {**p.spec(), **dict(spec)}
    return spec


def describe(host: str, upsampler: str) -> str:
    """A short ``'label (basis)'`` of what ``host`` builds for the name ``upsampler``."""
    p = get_preset(host, upsampler)
    return "registered defaults (no published row)" if p is None else f"{p.label} ({p.basis})"


def _kwargs_text(config: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items()) or "—"


def presets_markdown() -> str:
    """The table as Markdown (docs/RESULTS.md carries this text; a test keeps them equal)."""
    lines = ["| host | upsampler | configuration | init | basis | source / why |", "|---|---|---|---|---|---|"]
    for p in PRESETS:
        src = p.source + (f". Why: {p.why}" if p.why else "")
        lines.append(f"| {p.host} | {p.upsampler} | {_kwargs_text(p.config)} | {p.init or '—'} | {p.basis} | "
                     f"{src.replace('|', '/')} |")
    return "\n".join(lines)
