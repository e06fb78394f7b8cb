"""SegFormer (Xie et al., NeurIPS 2021) with a swappable upsampler: the NVlabs all-MLP head and a
MiT encoder from ``transformers`` (docs/SEMANTICS.md §5.1).

Head wiring (``poppinace/fade`` ``segformer/segformer_head.py``, the code behind the papers'
SegFormer-B1 tables): the four encoder stages are projected by per-pixel Linear layers to
``embed_dim`` channels, ``_c1`` (1/4) ... ``_c4`` (1/32); then, with ``up_i = upsamplers[i]``::

    _c4 = up2(up1(up0(_c4, guide=_c3), guide=_c2), guide=_c1)     # 1/32 -> 1/16 -> 1/8 -> 1/4
    _c3 = up4(up3(_c3, guide=_c2), guide=_c1)                     # 1/16 -> 1/8 -> 1/4
    _c2 = up5(_c2, guide=_c1)                                     # 1/8 -> 1/4
    logits = linear_pred(dropout(linear_fuse(cat[_c4, _c3, _c2, _c1])))

The bilinear baseline (``upsampler="bilinear"``, the default) instead resizes ``_c4``, ``_c3`` and
``_c2`` to the size of ``_c1`` in one ``F.interpolate`` each, as NVlabs' head does. Every other
spec builds six modules; unguided ones get the guide only for its size.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._common import ConvModule, build_stage_upsamplers, load_checked, strip_prefix
from ._weights import load_segformer_weights, read_state_dict

__all__ = ["SegFormerHead", "SegFormer", "segformer", "segformer_b1", "mit_config", "MIT_VARIANTS",
           "load_mit_weights"]

# MiT variants (NVlabs mix_transformer.py): hidden sizes, depths, decoder embed_dim.
MIT_VARIANTS: dict[str, dict[str, Any]] = {
    "b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], embed_dim=256),
    "b1": dict(hidden_sizes=[64, 128, 320, 512], depths=[2, 2, 2, 2], embed_dim=256),
    "b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], embed_dim=768),
    "b3": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 18, 3], embed_dim=768),
    "b4": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 8, 27, 3], embed_dim=768),
    "b5": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 6, 40, 3], embed_dim=768),
}


class MLP(nn.Module):
    """NVlabs' "Linear Embedding": a Linear layer on every pixel (``proj`` as in their state dict)."""

    def __init__(self, input_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        y = self.proj(x.flatten(2).transpose(1, 2))  # [B, HW, E]
        return y.transpose(1, 2).reshape(B, self.proj.out_features, H, W)  # not -1: B may be 0


def _is_one_step_bilinear(spec: Any) -> bool:
    return spec is None or (isinstance(spec, str) and spec == "bilinear")


class SegFormerHead(nn.Module):
    """The NVlabs SegFormer all-MLP decode head with six swappable upsamplers (see module doc).

    Args:
        in_channels: channels of the four encoder stages, finest first (MiT-B1: 64, 128, 320, 512).
        embed_dim: projection width E (256 for B0/B1, 768 for B2-B5).
        num_classes: output channels of ``linear_pred``.
        upsampler: ``"bilinear"`` (default) / ``None``: the original one-step bilinear resize, no
            upsampler modules. Otherwise a registered name, ``dict(type=..., **kw)`` or an
            ``Upsampler`` class (six modules are built, one per stage, on E channels guided by
            E-channel maps), or a list of six specs/instances ``[up0, ..., up5]``. A single
            instance is refused (``TypeError``): it cannot serve six stages. Names and dicts get
            the published SegFormer configuration (:mod:`sapa.models.presets`: ``"sapa_b"`` is
            the NeurIPS LayerNorm + Linear SAPA-B with d = 32, ``"fade"`` is gated); keys you pass
            win, and a class is built with its own defaults.
        dropout: ``Dropout2d`` rate before ``linear_pred`` (0.1).
        align_corners: of the one-step bilinear resize (False, as NVlabs).

    ``forward(features)`` takes the four maps ``[B, C_i, H_i, W_i]`` (finest first; ceil-mode sizes
    such as 18/9/5/3 are fine) and returns logits ``[B, num_classes, H_1, W_1]`` at 1/4.
    """

    def __init__(self, in_channels: Sequence[int], embed_dim: int = 256, num_classes: int = 150,
                 upsampler: Any = "bilinear", dropout: float = 0.1, align_corners: bool = False):
        super().__init__()
        in_channels = list(in_channels)
        if len(in_channels) != 4:
            raise ValueError(f"SegFormerHead: in_channels must list the 4 encoder stages, got {in_channels}")
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.align_corners = align_corners
        c1, c2, c3, c4 = in_channels
        self.linear_c4 = MLP(c4, embed_dim)
        self.linear_c3 = MLP(c3, embed_dim)
        self.linear_c2 = MLP(c2, embed_dim)
        self.linear_c1 = MLP(c1, embed_dim)
        self.one_step = _is_one_step_bilinear(upsampler)
        self.upsamplers = (nn.ModuleList() if self.one_step else
                           build_stage_upsamplers(upsampler, 6, embed_dim, "SegFormerHead", preset_host="segformer"))
        self.linear_fuse = ConvModule(4 * embed_dim, embed_dim, 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)

    def project(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``(_c1, _c2, _c3, _c4)``: the four stages projected to ``embed_dim`` channels."""
        if len(features) != 4:
            raise ValueError(f"SegFormerHead: expected 4 feature maps (1/4 ... 1/32), got {len(features)}")
        c1, c2, c3, c4 = features
        for i, (f, c) in enumerate(zip(features, self.in_channels)):
            if f.dim() != 4 or f.shape[1] != c:
                raise ValueError(f"SegFormerHead: feature {i} has shape {list(f.shape)}, expected "
                                 f"[B, {c}, H, W]")
        return self.linear_c1(c1), self.linear_c2(c2), self.linear_c3(c3), self.linear_c4(c4)

    def fuse(self, _c1: torch.Tensor, _c2: torch.Tensor, _c3: torch.Tensor,
             _c4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bring ``_c4``, ``_c3``, ``_c2`` to the size of ``_c1`` (the upsampling part of the head)."""
        if self.one_step:
            size = _c1.shape[-2:]
            def rs(t):
                return F.interpolate(t, size=size, mode="bilinear", align_corners=self.align_corners)
            return rs(_c4), rs(_c3), rs(_c2)
        up = self.upsamplers
        _c4 = up[2](up[1](up[0](_c4, _c3), _c2), _c1)
        _c3 = up[4](up[3](_c3, _c2), _c1)
        _c2 = up[5](_c2, _c1)
        return _c4, _c3, _c2

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        _c1, _c2, _c3, _c4 = self.project(features)
        _c4, _c3, _c2 = self.fuse(_c1, _c2, _c3, _c4)
        x = self.linear_fuse(torch.cat([_c4, _c3, _c2, _c1], dim=1))
        return self.linear_pred(self.dropout(x))


def mit_config(variant: str = "b1", **overrides: Any) -> Any:
    """A ``transformers.SegformerConfig`` for MiT-``variant``, built by hand (nothing is downloaded).

    Shared by all variants: heads 1/2/5/8, sr ratios 8/4/2/1, patch sizes 7/3/3/3, strides 4/2/2/2,
    mlp ratio 4, drop path 0.1 (NVlabs' training default). ``overrides`` go to the config.
    """
    if variant not in MIT_VARIANTS:
        raise KeyError(f"unknown MiT variant {variant!r}; valid: {', '.join(MIT_VARIANTS)}")
    from .._optional import optional_import

    with optional_import("transformers", "the MiT encoder (SegFormer)"):
        from transformers import SegformerConfig

    v = MIT_VARIANTS[variant]
    kw = dict(num_channels=3, num_encoder_blocks=4, hidden_sizes=list(v["hidden_sizes"]),
              depths=list(v["depths"]), num_attention_heads=[1, 2, 5, 8], sr_ratios=[8, 4, 2, 1],
              patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], mlp_ratios=[4, 4, 4, 4], hidden_act="gelu",
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.1,
              reshape_last_stage=True)
    kw.update(overrides)
    return SegformerConfig(**kw)


def _install_output_hooks(backbone: nn.Module) -> None:
    """Install transformers' output-capturing hooks now, not on the first forward. transformers 5
    installs them on the first call that asks for hidden states, under a ``threading.Lock`` that
    ``torch.compile(fullgraph=True)`` cannot trace (a graph break on a fresh model); once installed,
    that call returns before the lock. transformers 4 has no such hooks."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:
        return
    maybe_install_capturing_hooks(backbone)


class SegFormer(nn.Module):
    """MiT encoder (``transformers.SegformerModel``) + :class:`SegFormerHead`.

    Args:
        config: a ``SegformerConfig`` (see :func:`mit_config`) or a dict of its fields.
        num_classes: see :class:`SegFormerHead`.
        upsampler: see :class:`SegFormerHead`.
        embed_dim: see :class:`SegFormerHead`.
        dropout: see :class:`SegFormerHead`.
        align_corners: see :class:`SegFormerHead`.

    ``forward(img [B, 3, H, W])`` returns logits ``[B, num_classes, ceil(H/4), ceil(W/4)]`` (any
    H, W: the MiT strides are ceil-mode). Attributes ``backbone`` and ``decode_head``.
    """

    def __init__(self, config: Any, num_classes: int = 150, upsampler: Any = "bilinear", embed_dim: int = 256,
                 dropout: float = 0.1, align_corners: bool = False):
        super().__init__()
        from .._optional import optional_import

        with optional_import("transformers", "the MiT encoder (SegFormer)"):
            from transformers import SegformerConfig, SegformerModel

        if isinstance(config, dict):
            config = SegformerConfig(**config)
        self.backbone = SegformerModel(config)
        _install_output_hooks(self.backbone)
        self.decode_head = SegFormerHead(list(config.hidden_sizes), embed_dim=embed_dim, num_classes=num_classes,
                                         upsampler=upsampler, dropout=dropout, align_corners=align_corners)

    def extract_features(self, img: torch.Tensor) -> list[torch.Tensor]:
        out = self.backbone(pixel_values=img, output_hidden_states=True, return_dict=True)
        return list(out.hidden_states)[-4:]

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.extract_features(img))


def segformer(variant: str = "b1", num_classes: int = 150, upsampler: Any = "bilinear",
              pretrained: str | os.PathLike | None = None, **config_overrides) -> SegFormer:
    """SegFormer-``variant`` (b0 ... b5). ``config_overrides`` go to :func:`mit_config`.

    ``pretrained``: a local folder (``save_pretrained`` output), a checkpoint file, a state dict, or a
    hub id found in the local Hugging Face cache (never downloaded). Hugging Face / NVlabs SegFormer
    checkpoints load the encoder and, when the classifier has ``num_classes`` outputs, the decode head;
    MiT checkpoints (``nvidia/mit-b1``, ``mit_b1.pth``) load the encoder (see
    ``sapa.models._weights.load_segformer_weights``)."""
    cfg = mit_config(variant, **config_overrides)
    model = SegFormer(cfg, num_classes=num_classes, upsampler=upsampler,
                      embed_dim=MIT_VARIANTS[variant]["embed_dim"])
    if pretrained is not None:
        load_segformer_weights(model, pretrained)
    return model


def segformer_b1(num_classes: int = 150, upsampler: Any = "bilinear", pretrained: str | os.PathLike | None = None,
                 **config_overrides) -> SegFormer:
    """SegFormer-B1 (MiT-B1 + all-MLP head, E = 256): 13.7 M params, 15.9 GMACs at 512x512 with the
    bilinear head (``sapa complexity --host segformer-b1``)."""
    return segformer("b1", num_classes=num_classes, upsampler=upsampler, pretrained=pretrained, **config_overrides)


# --- MiT checkpoint key names -------------------------------------------------------------------
# Three spellings exist: transformers >= 5 ("stages.{i}.blocks.{j}.attention.q_proj"), transformers 4
# and every checkpoint on the Hub ("encoder.block.{i}.{j}.attention.self.query"), and NVlabs'
# mix_transformer ("block{i+1}.{j}.attn.q", with k and v stacked in one "kv" Linear). Everything is
# converted to the v5 spelling first, then to whatever the installed transformers uses.
_V4_TO_V5 = [
    (r"^encoder\.patch_embeddings\.(\d+)\.", r"stages.\1.patch_embeddings."),
    (r"^encoder\.block\.(\d+)\.", r"stages.\1.blocks."),
    (r"^encoder\.layer_norm\.(\d+)\.", r"stages.\1.layer_norm."),
    (r"\.attention\.self\.query\.", ".attention.q_proj."),
    (r"\.attention\.self\.key\.", ".attention.k_proj."),
    (r"\.attention\.self\.value\.", ".attention.v_proj."),
    (r"\.attention\.self\.sr\.", ".attention.sequence_reduction.sequence_reduction."),
    (r"\.attention\.self\.layer_norm\.", ".attention.sequence_reduction.layer_norm."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."),
    (r"\.mlp\.dense2\.", ".mlp.fc2."),
    (r"\.layer_norm_1\.", ".layernorm_before."),
    (r"\.layer_norm_2\.", ".layernorm_after."),
]
_V5_TO_V4 = [
    (r"^stages\.(\d+)\.patch_embeddings\.", r"encoder.patch_embeddings.\1."),
    (r"^stages\.(\d+)\.blocks\.", r"encoder.block.\1."),
    (r"^stages\.(\d+)\.layer_norm\.", r"encoder.layer_norm.\1."),
    (r"\.attention\.q_proj\.", ".attention.self.query."),
    (r"\.attention\.k_proj\.", ".attention.self.key."),
    (r"\.attention\.v_proj\.", ".attention.self.value."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attention.self.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attention.self.layer_norm."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".mlp.dense1."),
    (r"\.mlp\.fc2\.", ".mlp.dense2."),
    (r"\.layernorm_before\.", ".layer_norm_1."),
    (r"\.layernorm_after\.", ".layer_norm_2."),
]
_NV_TO_V5 = [
    (r"^patch_embed(\d)\.proj\.", lambda m: f"stages.{int(m.group(1)) - 1}.patch_embeddings.proj."),
    (r"^patch_embed(\d)\.norm\.", lambda m: f"stages.{int(m.group(1)) - 1}.patch_embeddings.layer_norm."),
    (r"^block(\d)\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}."),
    (r"^norm(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.layer_norm."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
    (r"\.attn\.q\.", ".attention.q_proj."),
    (r"\.attn\.proj\.", ".attention.o_proj."),
    (r"\.attn\.sr\.", ".attention.sequence_reduction.sequence_reduction."),
    (r"\.attn\.norm\.", ".attention.sequence_reduction.layer_norm."),
]


def _rename(key: str, rules) -> str:
    import re

    for pat, rep in rules:
        key = re.sub(pat, rep, key)
    return key


def _mit_to_v5(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = strip_prefix(sd, ["module.", "backbone.", "segformer.", "model."])
    if any(k.startswith(("patch_embed1.", "block1.")) for k in sd):  # NVlabs
        out = {}
        for k, v in sd.items():
            if k.startswith("head."):
                continue
            if ".attn.kv." in k:  # NVlabs stacks [k; v] in one Linear(C, 2C)
                kk, vv = v.chunk(2, dim=0)
                out[_rename(k.replace(".attn.kv.", ".attention.k_proj."), _NV_TO_V5)] = kk
                out[_rename(k.replace(".attn.kv.", ".attention.v_proj."), _NV_TO_V5)] = vv
            else:
                out[_rename(k, _NV_TO_V5)] = v
        return out
    if any(k.startswith("encoder.") for k in sd):  # transformers 4 / Hub checkpoints
        return {_rename(k, _V4_TO_V5): v for k, v in sd.items() if not k.startswith(("classifier.", "decode_head."))}
    return {k: v for k, v in sd.items() if not k.startswith(("classifier.", "decode_head."))}


def load_mit_weights(backbone: nn.Module, source: str | os.PathLike | dict) -> None:
    """Load MiT encoder weights into a ``transformers.SegformerModel`` from a local directory, a
    ``.safetensors`` / ``.pth`` / ``.bin`` file, or a state dict.

    Accepted key spellings: transformers (Hub checkpoints such as ``nvidia/mit-b1``, with or without
    the ``segformer.`` prefix; both the v4 and the v5 module names) and NVlabs ``mit_b1.pth``
    (``patch_embed1``, ``block1.0.attn.kv``, ...; an ImageNet ``head`` is dropped). Raises
    ``ValueError`` listing every missing, unexpected or mis-shaped key."""
    what = "load_mit_weights"
    sd = dict(source) if isinstance(source, dict) else read_state_dict(source, what)
    name = "state dict" if isinstance(source, dict) else repr(os.fspath(source))
    sd = _mit_to_v5(sd)
    if not any(k.startswith("stages.") for k in backbone.state_dict()):  # transformers 4 module names
        sd = {_rename(k, _V5_TO_V4): v for k, v in sd.items()}
    load_checked(backbone, sd, what, name)
