"""Bytes an op must move at least: the memory-bound floor that ``sapa bench`` compares each timing with.

The count is the op's compulsory DRAM traffic, independent of any implementation: every input tensor
read once and the output written once (forward); for forward+backward, that plus the backward's own
compulsory traffic: the output gradient read, the inputs read again (the backward needs them; no
cache holds tens of MB between two kernels) and one gradient per input written. Saved statistics
(our kernels' log-sum-exp, 1/C of the output) and re-reads inside a kernel are not counted, so
``bytes / time`` is a lower bound on the bandwidth a kernel achieved.

At the authors' shape (B=1, C=256, d=32, 120x120 -> 240x240) in bf16 the fused ``sapa`` forward moves
q 3.69 MB + k 0.92 MB + v 7.37 MB + out 29.49 MB = 41.5 MB (tested): about 9 us at the H200's
4.8 TB/s peak.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def bytes_moved(input_shapes: Iterable[Sequence[int]], output_shape: Sequence[int], mode: str,
                itemsize: int, differentiable: Sequence[bool] | None = None) -> int:
    """Compulsory bytes of one call (see the module doc).

    Args:
        input_shapes: shapes of the op's tensor inputs.
        output_shape: shape of its output.
        mode: "fwd" or "fwd+bwd".
        itemsize: bytes per element (2 for bf16/fp16, 4 for fp32).
        differentiable: per input, whether a gradient is written (default: every input).
    """
    shapes = [tuple(s) for s in input_shapes]
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"mode must be 'fwd' or 'fwd+bwd', got {mode!r}")
    if itemsize < 1:
        raise ValueError(f"itemsize must be >= 1, got {itemsize}")
    if differentiable is None:
        differentiable = [True] * len(shapes)
    if len(differentiable) != len(shapes):
        raise ValueError(f"differentiable has {len(differentiable)} entries for {len(shapes)} inputs")
    ins = sum(_numel(s) for s in shapes)
    out = _numel(output_shape)
    elems = ins + out
    if mode == "fwd+bwd":
        elems += out + ins + sum(_numel(s) for s, d in zip(shapes, differentiable) if d)
    return elems * itemsize
