"""sapa inside OpenMMLab configs (mmengine 0.10, mmcv 2.x, mmdet 3.x, mmseg 1.x), nothing compiled.

Import it from a config::

    custom_imports = dict(imports=['sapa.integrations.openmmlab'], allow_failed_imports=False)

What importing registers:

* every sapa upsampler in a child registry of mmengine's ``MODELS`` with scope ``sapa``, so
  ``type='sapa.<name>'`` (``sapa.carafe``, ``sapa.sapa_b``, ``sapa.sapa_d``, ``sapa.fade``, ...)
  resolves from ``mmcv.cnn.build_upsample_layer``, ``MODELS.build`` and any downstream registry
  (mmdet's, mmseg's), without touching mmcv's own ``nearest`` / ``bilinear`` / ``carafe``. The
  arguments are the official ones (``channels``, ``up_kernel``, ``up_group``, ``encoder_kernel``,
  ``encoder_dilation``, ``compressed_channels``, ``scale_factor``; the forks' ``up_kernel_size``,
  ``num_point``, ``gating``, ``style``, ``dyscope``, ...), translated by
  :func:`sapa.integrations._mmargs.translate`; unknown names raise ``TypeError`` listing the
  accepted ones. The module built is sapa's own (same class, same state-dict keys), called
  ``up(x)`` or ``up(x, guide)``; ``guide_first=True`` gives the forks' ``up(guide, x)`` order.
* ``SapaFPN`` in ``mmdet.registry.MODELS`` (also as ``FPN_UPSAMPLE`` unless the fork already
  registered that name): mmdet's ``FPN`` with swappable, possibly guided, top-down upsamplers.
  Needs only mmengine and ``mmcv.cnn`` (pure Python in mmcv-lite).
* ``SapaSegFormerHead`` and ``SapaUPerHead`` in ``mmseg.registry.MODELS`` when mmseg's
  ``BaseDecodeHead`` imports. In mmseg 1.2.2 that import goes through ``mmcv.ops`` and needs a
  compiled mmcv; without it the heads are not registered (``MMSEG_HEADS_ERROR`` says why) and the
  rest of this module works unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry
from torch import nn

from ..registry import Upsampler, build_upsampler, list_upsamplers
from ._mmargs import (FORK_TYPES, MM_DEFAULTS, accepted_args, build_mm_upsampler, convert_checkpoint,
                      convert_state_dict, translate)

__all__ = ["MODELS", "SCOPE", "SapaFPN", "build_mm_upsampler", "translate", "accepted_args",
           "convert_state_dict", "convert_checkpoint", "FORK_TYPES", "MM_DEFAULTS", "MMSEG_HEADS_ERROR"]

SCOPE = "sapa"
# A child registry (scope 'sapa') rather than names in mmengine's own table: mmcv already owns
# 'nearest', 'bilinear', 'carafe' there, and `get('sapa.x')` finds a child of the root by its scope.
MODELS: Registry = (MMENGINE_MODELS.children[SCOPE] if SCOPE in MMENGINE_MODELS.children
                    else Registry("sapa upsamplers", parent=MMENGINE_MODELS, scope=SCOPE))


def _builder(name: str):
    def build(*args, **cfg):
        if len(args) > 1:
            raise TypeError(f"sapa.{name}: pass arguments by keyword (channels=..., scale_factor=...); got "
                            f"{len(args)} positional arguments")
        if args:
            if "channels" in cfg or "in_channels" in cfg:
                raise TypeError(f"sapa.{name}: channels given twice (positionally and by keyword)")
            cfg["in_channels"] = args[0]
        return build_mm_upsampler(dict(type=f"sapa.{name}", **cfg))
    build.__name__ = build.__qualname__ = f"build_sapa_{name}"
    build.__doc__ = f"Build sapa's {name!r} from mm-style arguments (see sapa.integrations.openmmlab)."
    return build


for _name in list_upsamplers():
    if _name not in MODELS.module_dict:
        MODELS.register_module(name=_name, module=_builder(_name))


def _is_upsampler_cfg(cfg: Any) -> bool:
    return isinstance(cfg, dict) and "type" in cfg


class SapaFPN(BaseModule):
    """mmdet ``FPN`` (same arguments, same state-dict keys) whose top-down upsamplings are sapa's.

    ``upsample_cfg``:

    * ``dict(mode='nearest')`` (default) or any ``F.interpolate`` arguments without ``type``:
      mmdet's own resize, exactly (``size=`` the finer lateral's size unless ``scale_factor`` is given);
    * ``dict(type=..., **args)``: an upsampler per top-down step, built by
      :func:`build_mm_upsampler` on ``out_channels`` maps: ``sapa.<name>`` or a fork type
      (``sapa``, ``sapadeform``, ``fade``, ``carafe``, ``dysample``, ...; the fork's ``guided`` key
      is accepted). Guided upsamplers get the finer lateral as their guide; unguided ones get it
      for its size only (ceil-mode sizes such as 100x167 <- 50x84 work).

    ``upsampler=`` (alternative): any spec ``sapa.build_upsampler`` takes (name, dict, class) or a
    list of ``num levels - 1`` of them / instances.

    Keys: ``lateral_convs.i.conv``, ``fpn_convs.i.conv`` (mmdet's FPN checkpoints load unchanged),
    ``upsample_modules.i`` (the forks' name; their checkpoints load through
    :func:`convert_checkpoint`). ``init_cfg`` defaults to mmdet's Xavier-uniform on every Conv2d,
    which - as in the papers' runs - also re-initialises the convs inside the upsamplers when
    ``init_weights()`` runs.
    """

    def __init__(self, in_channels: list[int], out_channels: int, num_outs: int, start_level: int = 0,
                 end_level: int = -1, add_extra_convs: bool | str = False, relu_before_extra_convs: bool = False,
                 no_norm_on_lateral: bool = False, conv_cfg: dict | None = None, norm_cfg: dict | None = None,
                 act_cfg: dict | None = None, upsample_cfg: dict | None = None, upsampler: Any = None,
                 init_cfg: Any = dict(type="Xavier", layer="Conv2d", distribution="uniform")):
        super().__init__(init_cfg=init_cfg)
        from mmcv.cnn import ConvModule

        if not isinstance(in_channels, (list, tuple)) or not in_channels:
            raise TypeError(f"SapaFPN: in_channels must be a list of channel counts, got {in_channels!r}")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_ins = len(in_channels)
        self.num_outs = num_outs
        self.relu_before_extra_convs = relu_before_extra_convs
        self.no_norm_on_lateral = no_norm_on_lateral
        if end_level in (-1, self.num_ins - 1):
            self.backbone_end_level = self.num_ins
            if num_outs < self.num_ins - start_level:
                raise ValueError(f"SapaFPN: num_outs={num_outs} < {self.num_ins - start_level} used levels")
        else:
            self.backbone_end_level = end_level + 1
            if not (end_level < self.num_ins and num_outs == end_level - start_level + 1):
                raise ValueError(f"SapaFPN: end_level={end_level} needs end_level < {self.num_ins} and "
                                 f"num_outs == end_level - start_level + 1, got num_outs={num_outs}")
        self.start_level, self.end_level = start_level, end_level
        if isinstance(add_extra_convs, str):
            if add_extra_convs not in ("on_input", "on_lateral", "on_output"):
                raise ValueError(f"SapaFPN: add_extra_convs must be False, True, 'on_input', 'on_lateral' or "
                                 f"'on_output', got {add_extra_convs!r}")
        elif add_extra_convs:
            add_extra_convs = "on_input"
        self.add_extra_convs = add_extra_convs

        if upsample_cfg is not None and upsampler is not None:
            raise TypeError("SapaFPN: pass upsample_cfg= or upsampler=, not both")
        self.upsample_cfg = None
        n_up = self.backbone_end_level - start_level - 1
        if upsampler is not None:
            from ..models._common import build_stage_upsamplers

            ups = build_stage_upsamplers(upsampler, n_up, out_channels, "SapaFPN")
        elif _is_upsampler_cfg(upsample_cfg):
            ups = nn.ModuleList(build_mm_upsampler(upsample_cfg, out_channels, 2) for _ in range(n_up))
        else:
            self.upsample_cfg = dict(mode="nearest") if upsample_cfg is None else dict(upsample_cfg)
            ups = nn.ModuleList()
        for u in ups:
            if getattr(type(u), "__name__", "").endswith("GuideFirst"):
                raise ValueError("SapaFPN: guide_first=True is for the forks' heads; SapaFPN calls up(x, guide)")
        self.upsample_modules = ups

        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        for i in range(start_level, self.backbone_end_level):
            self.lateral_convs.append(ConvModule(in_channels[i], out_channels, 1, conv_cfg=conv_cfg,
                                                 norm_cfg=norm_cfg if not no_norm_on_lateral else None,
                                                 act_cfg=act_cfg, inplace=False))
            self.fpn_convs.append(ConvModule(out_channels, out_channels, 3, padding=1, conv_cfg=conv_cfg,
                                             norm_cfg=norm_cfg, act_cfg=act_cfg, inplace=False))
        extra_levels = num_outs - self.backbone_end_level + start_level
        if self.add_extra_convs and extra_levels >= 1:
            for i in range(extra_levels):
                cin = (self.in_channels[self.backbone_end_level - 1]
                       if i == 0 and self.add_extra_convs == "on_input" else out_channels)
                self.fpn_convs.append(ConvModule(cin, out_channels, 3, stride=2, padding=1, conv_cfg=conv_cfg,
                                                 norm_cfg=norm_cfg, act_cfg=act_cfg, inplace=False))

    def _up(self, i: int, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        if self.upsample_cfg is not None:  # mmdet's resize, exactly
            if "scale_factor" in self.upsample_cfg:
                return F.interpolate(coarse, **self.upsample_cfg)
            return F.interpolate(coarse, size=fine.shape[2:], **self.upsample_cfg)
        return self.upsample_modules[i](coarse, fine)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"SapaFPN: expected {len(self.in_channels)} feature maps, got {len(inputs)}")
        lat = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        used = len(lat)
        for i in range(used - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + self._up(i - 1, lat[i], lat[i - 1])
        outs = [self.fpn_convs[i](lat[i]) for i in range(used)]
        if self.num_outs > len(outs):
            if not self.add_extra_convs:
                for _ in range(self.num_outs - used):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                src = {"on_input": inputs[self.backbone_end_level - 1], "on_lateral": lat[-1],
                       "on_output": outs[-1]}[self.add_extra_convs]
                outs.append(self.fpn_convs[used](src))
                for i in range(used + 1, self.num_outs):
                    t = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](t))
        return tuple(outs)


def _register_mmdet() -> str | None:
    try:
        from mmdet.registry import MODELS as MMDET_MODELS
    except Exception as err:  # mmdet not installed
        return f"{type(err).__name__}: {err}"
    for name in ("SapaFPN", "FPN_UPSAMPLE"):
        if name not in MMDET_MODELS.module_dict:
            MMDET_MODELS.register_module(name=name, module=SapaFPN)
    return None


MMDET_ERROR = _register_mmdet()


def _register_mmseg() -> str | None:
    """SegFormer / UPerNet decode heads on mmseg's ``BaseDecodeHead``, if it imports."""
    try:
        from mmseg.models.decode_heads.decode_head import BaseDecodeHead
        from mmseg.registry import MODELS as MMSEG_MODELS
    except Exception as err:  # mmseg missing, or mmcv.ops not compiled (mmseg 1.2.2 imports it)
        return f"{type(err).__name__}: {err}"
    from ..models.segformer import SegFormerHead
    from ..models.upernet import UPerHead

    def _norm(owner, head, core):
        """sapa's hosts use ConvModule + BatchNorm + ReLU (mmseg's configs: ``norm_cfg=dict(type='SyncBN')``)."""
        kind = (head.norm_cfg or {}).get("type")
        if kind not in ("BN", "SyncBN"):
            raise ValueError(f"{owner}: norm_cfg must be dict(type='BN') or dict(type='SyncBN') (the papers' "
                             f"configs), got {head.norm_cfg!r}")
        return nn.SyncBatchNorm.convert_sync_batchnorm(core) if kind == "SyncBN" else core

    def _head_kwargs(kwargs):
        """mmseg ``BaseDecodeHead`` keywords with the defaults of sapa's hosts: all four stages, BN."""
        kwargs.setdefault("in_index", [0, 1, 2, 3])
        kwargs.setdefault("norm_cfg", dict(type="BN", requires_grad=True))
        return kwargs

    def _adopt(owner, head, upsampler, n, build_core, names):
        """Build sapa's head ``build_core(spec)`` for ``head`` (an mm upsampler config becomes ``n``
        upsamplers at ``head.channels``), apply ``head.norm_cfg`` and take its ``names`` as ``head``'s
        own submodules (the keys of mmseg's head); returns the core."""
        spec = upsampler
        if _is_upsampler_cfg(upsampler):
            spec = [build_mm_upsampler(upsampler, head.channels, 2) for _ in range(n)]
        core = _norm(owner, head, build_core(spec))
        for name in names:
            setattr(head, name, getattr(core, name))
        return core

    class SapaSegFormerHead(BaseDecodeHead):
        """NVlabs' SegFormer head (the papers' placement, six upsamplers) on mmseg's BaseDecodeHead.

        ``in_channels`` (four stages), ``channels`` (embed dim E), ``upsampler`` (``'bilinear'``:
        the one-step resize; a sapa spec; or an mm config ``dict(type='sapa.<name>' | fork type,
        ...)``); everything else goes to ``BaseDecodeHead`` (``num_classes``, ``loss_decode``,
        ``dropout_ratio``, ...). Keys: ``linear_c{1..4}.proj``, ``linear_fuse.{conv,bn}``,
        ``upsamplers.i``, ``conv_seg`` (mmseg's classifier). mmseg's own ``SegformerHead`` is a
        different head (ConvModule projections with BN + ReLU); its checkpoints do not apply.
        """

        def __init__(self, upsampler: Any = "bilinear", **kwargs):
            super().__init__(input_transform="multiple_select", **_head_kwargs(kwargs))
            core = _adopt("SapaSegFormerHead", self, upsampler, 6, lambda spec: SegFormerHead(
                self.in_channels, embed_dim=self.channels, num_classes=1, upsampler=spec, dropout=0.0,
                align_corners=self.align_corners),
                ("linear_c1", "linear_c2", "linear_c3", "linear_c4", "upsamplers", "linear_fuse"))
            self.one_step = core.one_step
            self.embed_dim = self.channels

        def forward(self, inputs):
            feats = self._transform_inputs(inputs)
            _c1, _c2, _c3, _c4 = SegFormerHead.project(self, feats)
            _c4, _c3, _c2 = SegFormerHead.fuse(self, _c1, _c2, _c3, _c4)
            return self.cls_seg(self.linear_fuse(torch.cat([_c4, _c3, _c2, _c1], dim=1)))

    class SapaUPerHead(BaseDecodeHead):
        """mmseg ``UPerHead`` (same keys: ``psp_modules``, ``bottleneck``, ``lateral_convs``,
        ``fpn_convs``, ``fpn_bottleneck``, ``conv_seg``) with three swappable top-down upsamplers
        (``upsampler``: ``'bilinear'`` = mmseg's resize; a sapa spec; an mm config)."""

        def __init__(self, pool_scales=(1, 2, 3, 6), upsampler: Any = "bilinear", **kwargs):
            super().__init__(input_transform="multiple_select", **_head_kwargs(kwargs))
            _adopt("SapaUPerHead", self, upsampler, 3, lambda spec: UPerHead(
                self.in_channels, self.channels, num_classes=1, upsampler=spec, pool_scales=pool_scales,
                dropout=0.0, align_corners=self.align_corners),
                ("psp_modules", "bottleneck", "lateral_convs", "fpn_convs", "upsamplers", "fpn_bottleneck"))

        psp_forward = UPerHead.psp_forward

        def forward(self, inputs):
            feats = self._transform_inputs(inputs)
            lat = UPerHead.laterals(self, feats)
            outs = [conv(t) for conv, t in zip(self.fpn_convs, lat[:-1])] + [lat[-1]]
            size = outs[0].shape[-2:]
            outs = [outs[0]] + [F.interpolate(t, size=size, mode="bilinear", align_corners=self.align_corners)
                                for t in outs[1:]]
            return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))

    for cls in (SapaSegFormerHead, SapaUPerHead):
        if cls.__name__ not in MMSEG_MODELS.module_dict:
            MMSEG_MODELS.register_module(name=cls.__name__, module=cls)
        globals()[cls.__name__] = cls
    return None


MMSEG_HEADS_ERROR = _register_mmseg()
