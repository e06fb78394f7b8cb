"""Named shape sets for ``sapa bench``: the upsampling placements of the papers' host networks.

Each :class:`Placement` is one x``s`` upsampling of a ``[B, C, H, W]`` feature to ``[B, C, H', W']``;
:func:`make_inputs` builds the arguments of each public op of :mod:`sapa.functional` at that
placement with the papers' operator settings (K=5, d=32 for SAPA-B's embedding; SAPA-D with P=9
points, G=4 groups of d=32; CARAFE's reassembly with one group).
"""
from __future__ import annotations

import dataclasses

import torch

#: operator settings used for every placement (docs/SEMANTICS.md §2: SAPA-B d=32, K=5; SAPA-D P=9, G=4, d=32/group)
OP_SETTINGS = {"kernel_size": 5, "embed_dim": 32, "num_points": 9, "groups": 4, "group_dim": 32,
               "reassemble_groups": 1}
OPS = ("window_similarity", "reassemble", "sapa", "deform_similarity", "deform_reassemble", "sapa_deform")


@dataclasses.dataclass(frozen=True)
class Placement:
    batch: int
    channels: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    scale: int = 2

    @property
    def name(self) -> str:
        (h, w), (hq, wq) = self.in_hw, self.out_hw
        return f"{h}x{w}->{hq}x{wq}"


def _stages(batch: int, channels: int, sizes: list[tuple[int, int]]) -> list[Placement]:
    return [Placement(batch, channels, a, b) for a, b in zip(sizes[:-1], sizes[1:])]


# SegFormer-B1 / UPerNet at 512x512: strides 32 -> 16 -> 8 -> 4. FPN at 800x1333 (ceil-mode strides:
# 1333/8 = 166.6 -> 167 from 84 at stride 16, i.e. a guide one pixel short of 2*84).
SHAPE_SETS: dict[str, list[Placement]] = {
    "segformer-b1": _stages(2, 256, [(16, 16), (32, 32), (64, 64), (128, 128)]),
    "upernet": _stages(2, 512, [(16, 16), (32, 32), (64, 64), (128, 128)]),
    "fpn": _stages(2, 256, [(25, 42), (50, 84), (100, 167), (200, 334)]),
    # the authors' timing (SAPA-B 6.24 ms, CARAFE 2.75 ms on a GTX 1080 Ti, NeurIPS rebuttal): 256 channels,
    # 120x120 upsampled x2
    "authors": [Placement(1, 256, (120, 120), (240, 240))],
    # for tests and smoke runs: odd sizes, ceil mode
    "tiny": [Placement(1, 8, (5, 7), (10, 13))],
}


def shape_set(name: str) -> list[Placement]:
    if name not in SHAPE_SETS:
        raise KeyError(f"unknown shape set {name!r}; valid: {', '.join(SHAPE_SETS)}")
    return SHAPE_SETS[name]


def make_inputs(op: str, pl: Placement, dtype: torch.dtype = torch.float32,
                seed: int = 0) -> tuple[tuple, dict]:
    """(args, kwargs) of ``sapa.functional.<op>`` at placement ``pl``; tensor arguments first."""
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; valid: {', '.join(OPS)}")
    g = torch.Generator().manual_seed(seed)
    B, C, s = pl.batch, pl.channels, pl.scale
    (H, W), (Hq, Wq) = pl.in_hw, pl.out_hw
    S = OP_SETTINGS
    K, d, P, G, dg = S["kernel_size"], S["embed_dim"], S["num_points"], S["groups"], S["group_dim"]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    if op == "window_similarity":
        return (rnd(B, d, Hq, Wq), rnd(B, d, H, W)), dict(kernel_size=K, scale_factor=s)
    if op == "reassemble":
        Gr = S["reassemble_groups"]
        w = torch.softmax(rnd(B, Gr, K * K, Hq, Wq).float(), dim=2).to(dtype).view(B, Gr * K * K, Hq, Wq)
        return (w, rnd(B, C, H, W)), dict(kernel_size=K, scale_factor=s, groups=Gr)
    if op == "sapa":
        return (rnd(B, d, Hq, Wq), rnd(B, d, H, W), rnd(B, C, H, W)), dict(kernel_size=K, scale_factor=s)
    offset = rnd(B, 2 * G * P, Hq, Wq, scale=1.5)
    kw = dict(num_points=P, groups=G, scale_factor=s)
    if op == "deform_similarity":
        return (rnd(B, G * dg, Hq, Wq), rnd(B, G * dg, H, W), offset), kw
    if op == "deform_reassemble":
        w = torch.softmax(rnd(B, G, P, Hq, Wq).float(), dim=2).to(dtype)
        return (w, rnd(B, C, H, W), offset), kw
    return (rnd(B, G * dg, Hq, Wq), rnd(B, G * dg, H, W), rnd(B, C, H, W), offset), kw
