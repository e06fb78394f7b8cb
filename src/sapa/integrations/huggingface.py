"""Hugging Face ``transformers`` SegFormer and sapa's SegFormer head, both ways.

* Into sapa: ``sapa.models.segformer_b1(pretrained=...)`` reads a ``save_pretrained`` folder, a
  checkpoint file or a hub id from the local HF cache (encoder + decode head, see
  ``sapa.models._weights.load_segformer_weights``); :func:`swap_upsampler` then replaces the
  head's upsamplers for fine-tuning, the projections and ``linear_fuse`` keeping their weights.
* Into ``transformers``: :func:`sapa_decode_head` builds a :class:`sapa.models.SegFormerHead` from
  an HF ``SegformerForSemanticSegmentation`` (same shapes, its head's weights copied), to be set as
  ``model.decode_head``; HF's ``forward(pixel_values, labels=...)`` and its loss then run through
  sapa's upsamplers. HF calls ``decode_head(hidden_states)`` with the four stage maps, which is
  exactly ``SegFormerHead.forward``.

Nothing here downloads anything.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models.segformer import SegFormer, SegFormerHead

__all__ = ["sapa_decode_head", "swap_upsampler", "copy_hf_decode_head"]


def _head_of(model_or_head: Any) -> SegFormerHead:
    head = getattr(model_or_head, "decode_head", model_or_head)
    if not isinstance(head, SegFormerHead):
        raise TypeError(f"expected a sapa SegFormerHead, a sapa SegFormer or an HF model whose decode_head is "
                        f"one, got {type(model_or_head).__name__} (decode_head: {type(head).__name__})")
    return head


def swap_upsampler(model_or_head: Any, upsampler: Any) -> SegFormerHead:
    """Replace the six upsamplers of a :class:`SegFormerHead` (or of ``model.decode_head``) in place.

    ``upsampler`` is any spec ``SegFormerHead(upsampler=...)`` takes (``"bilinear"`` restores the
    one-step resize). Only the upsamplers change: projections, ``linear_fuse`` and ``linear_pred``
    keep their weights, devices and dtypes. Returns the head. A bad spec raises before anything
    changes.
    """
    head = _head_of(model_or_head)
    # Built by a throw-away head, so the six modules are exactly what SegFormerHead(upsampler=...)
    # builds (its per-host defaults included); only its upsamplers are kept.
    fresh = SegFormerHead(head.in_channels, embed_dim=head.embed_dim, num_classes=1, upsampler=upsampler,
                          dropout=0.0, align_corners=head.align_corners)
    ref = head.linear_fuse.conv.weight
    head.upsamplers = fresh.upsamplers.to(device=ref.device, dtype=ref.dtype).train(head.training)
    head.one_step = fresh.one_step
    return head


def copy_hf_decode_head(hf_head: nn.Module, head: SegFormerHead) -> None:
    """Copy an HF ``SegformerDecodeHead``'s weights into ``head`` (projections, fuse conv + BatchNorm,
    classifier). Raises ``ValueError`` naming the first mismatching shape; ``head`` is unchanged then."""
    pairs = [(hf_head.linear_projections[i].proj, getattr(head, f"linear_c{i + 1}").proj) for i in range(4)]
    pairs += [(hf_head.linear_fuse, head.linear_fuse.conv), (hf_head.batch_norm, head.linear_fuse.bn),
              (hf_head.classifier, head.linear_pred)]
    for src, dst in pairs:
        a, b = src.state_dict(), dst.state_dict()
        for k in b:
            if k in a and a[k].shape != b[k].shape:
                raise ValueError(f"copy_hf_decode_head: {type(dst).__name__}.{k} is {tuple(b[k].shape)} in the sapa "
                                 f"head but {tuple(a[k].shape)} in the HF head")
    with torch.no_grad():
        for src, dst in pairs:
            dst.load_state_dict(src.state_dict())


def sapa_decode_head(hf_model: nn.Module, upsampler: Any = "bilinear", copy_weights: bool = True) -> SegFormerHead:
    """A :class:`SegFormerHead` shaped like ``hf_model``'s (``SegformerForSemanticSegmentation``).

    ``in_channels = config.hidden_sizes``, ``embed_dim = config.decoder_hidden_size``, ``num_classes
    = config.num_labels``, dropout ``config.classifier_dropout_prob``; with ``copy_weights`` the HF
    head's weights are copied (the upsamplers, which HF's head does not have, keep their init).
    Use it as ``hf_model.decode_head = sapa_decode_head(hf_model, "sapa_b")``. With
    ``upsampler="bilinear"`` the swapped model's logits equal HF's (tested).

    Note: HF's ``save_pretrained`` then writes sapa's head keys; to reload, build the HF model, swap
    the head the same way, then ``load_state_dict`` (``from_pretrained`` rebuilds HF's own head).
    """
    cfg = getattr(hf_model, "config", None)
    if cfg is None or not hasattr(cfg, "decoder_hidden_size"):
        raise TypeError(f"sapa_decode_head: expected a transformers SegformerForSemanticSegmentation, got "
                        f"{type(hf_model).__name__}")
    head = SegFormerHead(list(cfg.hidden_sizes), embed_dim=cfg.decoder_hidden_size, num_classes=cfg.num_labels,
                         upsampler=upsampler, dropout=cfg.classifier_dropout_prob)
    old = getattr(hf_model, "decode_head", None)
    if copy_weights and old is not None:
        if isinstance(old, SegFormerHead):
            head.load_state_dict({k: v for k, v in old.state_dict().items() if not k.startswith("upsamplers.")},
                                 strict=False)
        else:
            copy_hf_decode_head(old, head)
    ref = next(hf_model.parameters())
    return head.to(device=ref.device, dtype=ref.dtype).train(hf_model.training)

