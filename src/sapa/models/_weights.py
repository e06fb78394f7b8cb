"""Local weights for every host (private): one ``pretrained=`` source format, one reader, clear errors.

A source is

* a file: ``.safetensors`` or a ``torch.save`` state dict (``.pth`` / ``.pt`` / ``.bin`` /
  ``.ckpt``; a ``state_dict`` / ``model`` / ``module`` entry is unwrapped);
* a folder: ``model.safetensors`` or ``pytorch_model.bin`` in it (what ``save_pretrained``
  writes), else its only checkpoint file;
* a Hugging Face hub id (``"nvidia/mit-b1"``), resolved from the local HF cache only
  (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``): the cache is read
  as files, no hub client is asked, so nothing can be downloaded;
* a state dict (``dict`` of tensors).

Anything that cannot be read becomes an ``OSError`` naming the file and what was expected (never a
raw ``UnpicklingError`` / ``SafetensorError``); a readable checkpoint of the wrong network is a
``ValueError`` from the host's loader.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["resolve_checkpoint", "read_state_dict", "hf_cache_dir", "describe_source"]

_CKPT_EXT = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_EXPECTED = ("a .safetensors file or a torch.save state dict (.pth/.pt/.bin/.ckpt), a folder holding "
             "model.safetensors / pytorch_model.bin, or a hub id present in the local Hugging Face cache")


def hf_cache_dir() -> str:
    """The Hugging Face hub cache folder, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def describe_source(source: Any) -> str:
    return "state dict" if isinstance(source, Mapping) else repr(os.fspath(source))


def _from_hf_cache(repo_id: str, what: str, cache_dir: str | None, revision: str = "main") -> str:
    cache = cache_dir or hf_cache_dir()
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snaps = os.path.join(repo, "snapshots")
    commit = None
    ref = os.path.join(repo, "refs", revision)
    if os.path.isfile(ref):
        with open(ref) as f:
            commit = f.read().strip()
    elif os.path.isdir(os.path.join(snaps, revision)):  # a commit hash given as revision
        commit = revision
    elif os.path.isdir(snaps) and len(os.listdir(snaps)) == 1:
        commit = os.listdir(snaps)[0]
    folder = os.path.join(snaps, commit) if commit else None
    if folder is None or not os.path.isdir(folder):
        raise FileNotFoundError(
            f"{what}: {repo_id!r} is neither a local file or folder nor a model in the local Hugging Face "
            f"cache ({cache}); nothing is downloaded. Provide the files yourself: on a machine with network "
            f"run `huggingface-cli download {repo_id}` (or huggingface_hub.snapshot_download({repo_id!r})) "
            f"and copy the cache, or save the model with save_pretrained(<folder>) and pass that folder "
            f"(or its model.safetensors) as pretrained=")
    return folder


def resolve_checkpoint(source: str | os.PathLike, what: str, cache_dir: str | None = None) -> str:
    """The checkpoint *file* a ``pretrained=`` source names (see the module docstring)."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{what}: pretrained must be a path, a hub id or a state dict, got "
                        f"{type(source).__name__}")
    path = os.fspath(source)
    if not os.path.exists(path):
        if _HUB_ID.match(path) and not path.endswith(_CKPT_EXT):
            path = _from_hf_cache(path, what, cache_dir)
        else:
            raise FileNotFoundError(f"{what}: no such file or folder: {path!r} (weights are only read "
                                    f"from local files, never downloaded; expected {_EXPECTED})")
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        ckpts = sorted(f for f in os.listdir(path) if f.endswith(_CKPT_EXT))
        if len(ckpts) != 1:
            shards = [f for f in os.listdir(path) if f.endswith(".index.json")]
            extra = f" (sharded checkpoints such as {shards[0]} are not supported)" if shards else ""
            raise FileNotFoundError(f"{what}: folder {path!r} has no model.safetensors / pytorch_model.bin "
                                    f"and {len(ckpts)} other checkpoint files ({', '.join(ckpts) or 'none'})"
                                    f"{extra}; pass the file itself")
        return os.path.join(path, ckpts[0])
    return path


def read_state_dict(source: str | os.PathLike | Mapping, what: str,
                    cache_dir: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint (file, folder, cached hub id or state dict) as ``{key: tensor}``."""
    if isinstance(source, Mapping):
        sd: Any = source
        path = "state dict"
    else:
        path = resolve_checkpoint(source, what, cache_dir)
        try:
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file

                sd = load_file(path)
            else:
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except ImportError as err:  # pragma: no cover - safetensors ships with transformers
            raise ImportError(f"{what}: reading {path!r} needs the safetensors package") from err
        except Exception as err:  # UnpicklingError, SafetensorError, RuntimeError, EOFError, ...
            raise OSError(f"{what}: cannot read {path!r} as a checkpoint ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); expected {_EXPECTED}") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{what}: {path!r} holds a {type(sd).__name__}, not a state dict; expected {_EXPECTED}")
    out = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not out:
        raise ValueError(f"{what}: {path!r} holds no tensors (keys: {list(sd)[:8]}); expected a state dict")
    return out


# --- SegFormer: encoder + decode head ----------------------------------------------------------
# Hugging Face's SegformerDecodeHead splits NVlabs' head differently: linear_projections[i] (saved as
# linear_c.{i} on disk and on the Hub, the in-memory name in transformers 5) is linear_c{i+1}, linear_fuse (1x1 conv, no bias) + batch_norm is our ConvModule linear_fuse (conv, bn),
# classifier is linear_pred. NVlabs / mmseg-0.x checkpoints already use our names (plus an unused
# conv_seg, dropped).
_HF_HEAD = [
    (re.compile(r"^linear_(?:projections|c)\.(\d+)\."), lambda m: f"linear_c{int(m.group(1)) + 1}."),
    (re.compile(r"^linear_fuse\.weight$"), lambda m: "linear_fuse.conv.weight"),
    (re.compile(r"^batch_norm\."), lambda m: "linear_fuse.bn."),
    (re.compile(r"^classifier\."), lambda m: "linear_pred."),
]


def _head_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    head = {k[len("decode_head."):]: v for k, v in sd.items() if k.startswith("decode_head.")}
    out = {}
    for k, v in head.items():
        if k.startswith("conv_seg."):
            continue
        for pat, rep in _HF_HEAD:
            k = pat.sub(rep, k)
        out[k] = v
    return out


def load_segformer_weights(model, source, cache_dir: str | None = None) -> str:
    """Load a SegFormer checkpoint into :class:`sapa.models.SegFormer`; returns what was loaded
    (``"encoder+head"`` or ``"encoder"``) and says it in one log line on the ``sapa`` logger.

    Accepted: a Hugging Face ``SegformerForSemanticSegmentation`` checkpoint (``segformer.*`` +
    ``decode_head.linear_projections`` / ``linear_fuse`` / ``batch_norm`` / ``classifier``), an
    encoder-only one (``nvidia/mit-b1``: ``SegformerForImageClassification`` / ``SegformerModel``),
    NVlabs ``mit_b1.pth`` or NVlabs / mmseg SegFormer checkpoints, and sapa's own ``SegFormer``
    state dict. The head (four projections, ``linear_fuse`` with its BatchNorm, classifier) is
    loaded when the checkpoint has one and its classifier has ``num_classes`` outputs; otherwise the
    encoder alone. Upsampler parameters absent from the checkpoint keep their initialisation.
    """
    import logging

    from ._common import strip_prefix
    from .segformer import load_mit_weights

    what = "segformer(pretrained=...)"
    name = describe_source(source)
    sd = strip_prefix(read_state_dict(source, what, cache_dir), ["module.", "model."])
    head_sd = _head_keys(sd)
    enc_sd = {k: v for k, v in sd.items() if not k.startswith("decode_head.")}
    enc_like = ("segformer.", "encoder.", "stages.", "backbone.", "patch_embed1.", "block1.")
    if not any(k.startswith(enc_like) for k in enc_sd):
        raise ValueError(f"{what}: {name} is not a SegFormer / MiT checkpoint: none of its {len(sd)} keys is an "
                         f"MiT encoder key (expected e.g. 'segformer.encoder.block.0.0.attention.self.query.weight' "
                         f"(Hugging Face), 'block1.0.attn.q.weight' (NVlabs) or 'backbone.stages.0...' (sapa); "
                         f"first keys: {', '.join(list(sd)[:4])})")
    log = logging.getLogger("sapa")
    head = model.decode_head
    own = head.state_dict()
    want = own.get("linear_pred.weight")
    have = head_sd.get("linear_pred.weight")
    load_head = have is not None and want is not None and have.shape == want.shape
    if load_head:
        # Check the head before touching the encoder, so a failed call leaves the model as it was.
        no_ups = not any(k.startswith("upsamplers.") for k in head_sd)
        need = [k for k in own if not k.endswith("num_batches_tracked") and not (no_ups and k.startswith("upsamplers."))]
        missing = [k for k in need if k not in head_sd]
        unexpected = [k for k in head_sd if k not in own and not k.endswith("num_batches_tracked")]
        shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in head_sd.items() if k in own and v.shape != own[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(f"{what}: cannot load the decode head of {name}: "
                             + " | ".join(f"{t}: {'; '.join(v[:6])}" for t, v in
                                          (("missing keys", missing), ("unexpected keys", unexpected),
                                           ("shape mismatches", shapes)) if v)
                             + " (a checkpoint saved with upsamplers needs the same upsampler=)")
    backup = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    load_mit_weights(model.backbone, enc_sd)
    if load_head:
        try:
            head.load_state_dict({k: v for k, v in head_sd.items() if k in own}, strict=False)
        except Exception:
            model.backbone.load_state_dict(backup)
            raise
        ups = ("; upsamplers keep their initialisation (not in the checkpoint)"
               if len(head.upsamplers) and not any(k.startswith("upsamplers.") for k in head_sd) else "")
        log.info("segformer: loaded encoder and decode head (projections, linear_fuse + BatchNorm, "
                 "classifier) from %s%s", name, ups)
        return "encoder+head"
    why = ("it has no decode head" if have is None else
           f"its classifier has {have.shape[0]} classes and the model {want.shape[0]}")
    log.warning("segformer: loaded the encoder only from %s (%s); the decode head keeps its initialisation",
                name, why)
    return "encoder"


def take_pretrained(pretrained: Any, kwargs: dict, where: str) -> Any:
    """``pretrained=`` is the one keyword for local weights; the old ``pretrained_backbone=`` still
    works with a ``DeprecationWarning`` (it is popped from ``kwargs``). Giving both is an error."""
    if "pretrained_backbone" not in kwargs:
        return pretrained
    import warnings

    old = kwargs.pop("pretrained_backbone")
    if pretrained is not None and old is not None:
        raise TypeError(f"{where}: got both pretrained= and the deprecated pretrained_backbone=; pass only "
                        f"pretrained=")
    warnings.warn(f"{where}: pretrained_backbone= is deprecated, use pretrained= (same meaning: local "
                  f"backbone weights)", DeprecationWarning, stacklevel=3)
    return old
