"""A float64 nested-loop oracle for every public op of :mod:`sapa.functional` (docs/SEMANTICS.md §1, §2.4).

Written from docs/SEMANTICS.md and the official CUDA kernels, independently of ``sapa.ops``: no unfold, no
grid_sample, no einsum — plain Python loops over b, i, j, window position / point and channel, one
formula per line. Slow by design: use tiny shapes (C <= 4, H, W <= 5 low-res).

Same names, argument order and defaults as ``sapa.functional`` (without ``backend``); inputs are
torch tensors of any float dtype (read as float64), outputs are float64 CPU tensors.

    from oracle import sapa as sapa_oracle
    assert_close(sapa.functional.sapa(q, k, v, 5, 2), sapa_oracle(q, k, v, 5, 2).float())

Conventions (docs/SEMANTICS.md):
* high-res (i, j) -> low-res (i // s, j // s); the low-res size is the size of k / v, the high-res
  size is the size of q / weights / offset (ceil-mode guides just have fewer rows / columns);
* window position n = (dy + r) * K + (dx + r), r = K // 2; out of range: logit 0 (it still
  enters the softmax) and value 0;
* deform: offset channel 2*(g*P + p) = dx, 2*(g*P + p) + 1 = dy, in low-res pixels; the sample
  position is (i // s + dy, j // s + dx) with integer coordinates at pixel centres; bilinear as
  the official ``deformable_im2col_bilinear``: 0 if y <= -1 or y >= H or x <= -1 or x >= W, else
  floor-based weights with out-of-range corners weighted 0;
* no 1/sqrt(d) temperature; softmax over the K*K window (window ops) or the P points of a group.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "window_similarity",
    "reassemble",
    "sapa",
    "deform_similarity",
    "deform_reassemble",
    "sapa_deform",
    "bilinear",
    "softmax",
]


def _lists(t: torch.Tensor) -> list:
    return t.detach().to(device="cpu", dtype=torch.float64).tolist()


def _zeros(*shape: int) -> list:
    if len(shape) == 1:
        return [0.0] * shape[0]
    return [_zeros(*shape[1:]) for _ in range(shape[0])]


def _tensor(nested: list, *shape: int) -> torch.Tensor:
    return torch.tensor(nested, dtype=torch.float64).reshape(*shape)


def softmax(logits: list[float]) -> list[float]:
    """Softmax of a list of floats (max-subtracted)."""
    m = max(logits)
    e = [math.exp(a - m) for a in logits]
    z = sum(e)
    return [x / z for x in e]


def bilinear(img: list, y: float, x: float) -> float:
    """Sample a 2-D list ``img[H][W]`` at (y, x), integer coordinates = pixel centres (official CUDA)."""
    H, W = len(img), len(img[0])
    if y <= -1 or y >= H or x <= -1 or x >= W:
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    total = 0.0
    for yy, wy in ((y0, 1.0 - ly), (y0 + 1, ly)):
        for xx, wx in ((x0, 1.0 - lx), (x0 + 1, lx)):
            if 0 <= yy < H and 0 <= xx < W:
                total += wy * wx * img[yy][xx]
    return total


# ---------------------------------------------------------------------------------------------
# window ops (docs/SEMANTICS.md §1)
# ---------------------------------------------------------------------------------------------

def window_similarity(q, k, kernel_size=5, scale_factor=2):
    """[B, d, H', W'] x [B, d, H, W] -> logits [B, K*K, H', W']."""
    B, d, Hq, Wq = q.shape
    H, W = k.shape[-2:]
    K, s, r = kernel_size, scale_factor, kernel_size // 2
    Q, Kk = _lists(q), _lists(k)
    out = _zeros(B, K * K, Hq, Wq) if B else []
    for b in range(B):
        for i in range(Hq):
            for j in range(Wq):
                for dy in range(-r, r + 1):
                    for dx in range(-r, r + 1):
                        n = (dy + r) * K + (dx + r)
                        y, x = i // s + dy, j // s + dx
                        if 0 <= y < H and 0 <= x < W:
                            out[b][n][i][j] = sum(Q[b][c][i][j] * Kk[b][c][y][x] for c in range(d))
    return _tensor(out, B, K * K, Hq, Wq)


def reassemble(weights, v, kernel_size=5, scale_factor=2, groups=1):
    """[B, groups*K*K, H', W'] x [B, C, H, W] -> [B, C, H', W']; channel c uses group c // (C/groups)."""
    B, Cv, H, W = v.shape
    Hq, Wq = weights.shape[-2:]
    K, s, r = kernel_size, scale_factor, kernel_size // 2
    per_group = Cv // groups
    Wt, V = _lists(weights), _lists(v)
    out = _zeros(B, Cv, Hq, Wq) if B else []
    for b in range(B):
        for c in range(Cv):
            g = c // per_group
            for i in range(Hq):
                for j in range(Wq):
                    acc = 0.0
                    for dy in range(-r, r + 1):
                        for dx in range(-r, r + 1):
                            n = (dy + r) * K + (dx + r)
                            y, x = i // s + dy, j // s + dx
                            if 0 <= y < H and 0 <= x < W:
                                acc += Wt[b][g * K * K + n][i][j] * V[b][c][y][x]
                    out[b][c][i][j] = acc
    return _tensor(out, B, Cv, Hq, Wq)


def sapa(q, k, v, kernel_size=5, scale_factor=2):
    """reassemble(softmax over the K*K window of window_similarity(q, k), v)."""
    B, _, Hq, Wq = q.shape
    KK = kernel_size * kernel_size
    L = _lists(window_similarity(q, k, kernel_size, scale_factor))
    Wt = _zeros(B, KK, Hq, Wq) if B else []
    for b in range(B):
        for i in range(Hq):
            for j in range(Wq):
                w = softmax([L[b][n][i][j] for n in range(KK)])
                for n in range(KK):
                    Wt[b][n][i][j] = w[n]
    return reassemble(_tensor(Wt, B, KK, Hq, Wq), v, kernel_size, scale_factor, 1)


# ---------------------------------------------------------------------------------------------
# deform ops (docs/SEMANTICS.md §2.4)
# ---------------------------------------------------------------------------------------------

def _position(O, b, g, p, i, j, P, s):
    dx = O[b][2 * (g * P + p)][i][j]
    dy = O[b][2 * (g * P + p) + 1][i][j]
    return i // s + dy, j // s + dx


def deform_similarity(q, k, offset, num_points=9, groups=4, scale_factor=2):
    """[B, G*d, H', W'] x [B, G*d, H, W] x offset [B, 2*G*P, H', W'] -> logits [B, G, P, H', W']."""
    B, Cq, Hq, Wq = q.shape
    G, P, s = groups, num_points, scale_factor
    d = Cq // G
    Q, Kk, O = _lists(q), _lists(k), _lists(offset)
    out = _zeros(B, G, P, Hq, Wq) if B else []
    for b in range(B):
        for g in range(G):
            for p in range(P):
                for i in range(Hq):
                    for j in range(Wq):
                        y, x = _position(O, b, g, p, i, j, P, s)
                        out[b][g][p][i][j] = sum(Q[b][g * d + c][i][j] * bilinear(Kk[b][g * d + c], y, x)
                                                 for c in range(d))
    return _tensor(out, B, G, P, Hq, Wq)


def deform_reassemble(weights, v, offset, num_points=9, groups=4, scale_factor=2):
    """[B, G, P, H', W'] x [B, C, H, W] x offset -> [B, C, H', W']; channel c uses group c // (C/G)."""
    B, Cv, H, W = v.shape
    Hq, Wq = offset.shape[-2:]
    G, P, s = groups, num_points, scale_factor
    per_group = Cv // G
    Wt, V, O = _lists(weights), _lists(v), _lists(offset)
    out = _zeros(B, Cv, Hq, Wq) if B else []
    for b in range(B):
        for c in range(Cv):
            g = c // per_group
            for i in range(Hq):
                for j in range(Wq):
                    acc = 0.0
                    for p in range(P):
                        y, x = _position(O, b, g, p, i, j, P, s)
                        acc += Wt[b][g][p][i][j] * bilinear(V[b][c], y, x)
                    out[b][c][i][j] = acc
    return _tensor(out, B, Cv, Hq, Wq)


def sapa_deform(q, k, v, offset, num_points=9, groups=4, scale_factor=2):
    """deform_reassemble(softmax over the P points of each group of deform_similarity, v, offset)."""
    B, _, Hq, Wq = q.shape
    G, P = groups, num_points
    L = _lists(deform_similarity(q, k, offset, P, G, scale_factor))
    Wt = _zeros(B, G, P, Hq, Wq) if B else []
    for b in range(B):
        for g in range(G):
            for i in range(Hq):
                for j in range(Wq):
                    w = softmax([L[b][g][p][i][j] for p in range(P)])
                    for p in range(P):
                        Wt[b][g][p][i][j] = w[p]
    return deform_reassemble(_tensor(Wt, B, G, P, Hq, Wq), v, offset, P, G, scale_factor)
