"""Independent formulas of the official upsamplers, written from their definitions for these tests
(unfold-based CARAFE reassembly; the forks' FADE and DySample forwards), in float64."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def carafe_reassemble(x, kernels, K, G, s):
    """mmcv ``carafe(x, mask, K, G, s)``: out[c, i, j] = sum_n mask[g(c)*K^2 + n, i, j] * x[c, i//s + dy, j//s + dx]."""
    B, C, H, W = x.shape
    cols = F.unfold(x, K, padding=K // 2).view(B, G, C // G, K * K, H, W)
    cols = cols.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)  # [B, G, C/G, K^2, sH, sW]
    w = kernels.view(B, G, 1, K * K, s * H, s * W)
    return (cols * w).sum(3).reshape(B, C, s * H, s * W)


def carafepack_forward(sd, x, K=5, G=1, s=2, enc_k=3, dil=1):
    """mmcv CARAFEPack.forward from its state dict: compressor, encoder, pixel_shuffle, softmax, carafe."""
    m = F.conv2d(x, sd["channel_compressor.weight"], sd["channel_compressor.bias"])
    m = F.conv2d(m, sd["content_encoder.weight"], sd["content_encoder.bias"], padding=(enc_k - 1) * dil // 2,
                 dilation=dil)
    m = F.pixel_shuffle(m, s)
    B, mc, h, w = m.shape
    m = torch.softmax(m.view(B, mc // (K * K), K * K, h, w), dim=2).view(B, mc, h, w)
    return carafe_reassemble(x, m, K, G, s)


def fork_fade_forward(sd, en, de, K=5, gating=False):
    """The forks' FADE(en=guide, de=x): semi-shift kernels, softmax, carafe (+ gate)."""
    enc = F.conv2d(en, sd["ker_generator.compressor_en.weight"], sd["ker_generator.compressor_en.bias"])
    dec = F.conv2d(de, sd["ker_generator.compressor_de.weight"])
    w, b = sd["ker_generator.content_encoder.weight"], sd["ker_generator.content_encoder.bias"]
    logits = F.conv2d(enc, w, b, padding=1) + F.interpolate(F.conv2d(dec, w, b, padding=1), scale_factor=2)
    up = carafe_reassemble(de, torch.softmax(logits, dim=1), K, 1, 2)
    if not gating:
        return up
    gate = torch.sigmoid(F.interpolate(F.conv2d(de, sd["gate_generator.conv.weight"], sd["gate_generator.conv.bias"]),
                                       scale_factor=2))
    return gate * en + (1 - gate) * up


def fork_dysample_lp_forward(sd, x, s=2, G=4):
    """The forks' DySample(style='lp', dyscope=False): offset*0.25 + init_pos, grid_sample (border)."""
    B, C, H, W = x.shape
    off = F.conv2d(x, sd["offset.weight"], sd["offset.bias"]) * 0.25 + sd["init_pos"].to(x.dtype)
    off = off.view(B, 2, G * s * s, H, W)
    # base grid: pixel centres (x, y) in pixel-edge units
    cx = (torch.arange(W, dtype=x.dtype) + 0.5).view(1, 1, 1, 1, W)
    cy = (torch.arange(H, dtype=x.dtype) + 0.5).view(1, 1, 1, H, 1)
    gx = 2 * (cx[:, 0] + off[:, 0]) / W - 1  # [B, G*s*s, H, W]
    gy = 2 * (cy[:, 0] + off[:, 1]) / H - 1
    g = torch.stack([gx, gy], 1)  # [B, 2, G*s*s, H, W]; pixel_shuffle over (G*s*s) -> G groups at sH, sW
    g = F.pixel_shuffle(g.reshape(B, 2 * G * s * s, H, W), s).view(B, 2, G, s * H, s * W)
    g = g.permute(0, 2, 3, 4, 1).reshape(B * G, s * H, s * W, 2)
    out = F.grid_sample(x.reshape(B * G, C // G, H, W), g, mode="bilinear", align_corners=False,
                        padding_mode="border")
    return out.view(B, C, s * H, s * W)


def fork_dysample_init_pos(s=2, G=4):
    """The forks' ``init_pos`` buffer, [1, 2*G*s*s, 1, 1]."""
    h = torch.arange((-s + 1) / 2, (s - 1) / 2 + 1) / s
    return torch.stack(torch.meshgrid([h, h], indexing="ij")).transpose(1, 2).repeat(1, G, 1).reshape(1, -1, 1, 1)


def fork_sapa_forward(sd, y, x, K=5, s=2, norm=True):
    """The forks' SAPA(y=guide, x): GroupNorm(32) on both, 1x1 q / k, softmax over the K x K window of
    <q, k> (zero-padded keys: logit 0 at out-of-range positions), weighted sum of the raw x."""
    if norm:
        yn = F.group_norm(y, 32, sd["norm_y.weight"], sd["norm_y.bias"])
        xn = F.group_norm(x, 32, sd["norm_x.weight"], sd["norm_x.bias"])
    else:
        yn, xn = y, x
    q = F.conv2d(yn, sd["q.weight"], sd.get("q.bias"))
    k = F.conv2d(xn, sd["k.weight"], sd.get("k.bias"))
    B, C, H, W = x.shape
    d = q.shape[1]
    kc = F.unfold(k, K, padding=K // 2).view(B, d, K * K, H, W)
    kc = kc.repeat_interleave(s, -2).repeat_interleave(s, -1)  # [B, d, K^2, sH, sW]
    attn = torch.softmax((q.unsqueeze(2) * kc).sum(1), dim=1)  # [B, K^2, sH, sW]
    return carafe_reassemble(x, attn, K, 1, s)


def fork_sapadeform_forward(sd, y, x, P=9, G=4, s=2):
    """The forks' SAPADeform(y=guide, x) with high_offset=True, norm=False: per high-res pixel, group g and
    point p, offset channel 2(gP+p) is the x (width) offset, 2(gP+p)+1 the y one, in low-res pixels from
    the centre of pixel (i//s, j//s); keys and raw values sampled bilinearly with zero padding; softmax
    over the P points of each group. One grid_sample per (g, p), in float64."""
    q = F.conv2d(y, sd["q.weight"], sd.get("q.bias"))
    k = F.conv2d(x, sd["k.weight"], sd.get("k.bias"))
    off = F.pixel_shuffle(F.conv2d(x, sd["offset.weight"], sd.get("offset.bias")), s)  # [B, 2GP, sH, sW]
    B, C, H, W = x.shape
    d = q.shape[1] // G
    ii = (torch.arange(s * H, dtype=x.dtype) // s).view(1, -1, 1)  # parent low-res row
    jj = (torch.arange(s * W, dtype=x.dtype) // s).view(1, 1, -1)
    out = []
    for g in range(G):
        logits, vals = [], []
        for p in range(P):
            dx, dy = off[:, 2 * (g * P + p)], off[:, 2 * (g * P + p) + 1]
            gx = 2 * (jj + 0.5 + dx) / W - 1
            gy = 2 * (ii + 0.5 + dy) / H - 1
            grid = torch.stack([gx, gy], dim=-1)  # [B, sH, sW, 2]
            ks = F.grid_sample(k[:, g * d:(g + 1) * d], grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)
            logits.append((q[:, g * d:(g + 1) * d] * ks).sum(1))
            cg = C // G
            vals.append(F.grid_sample(x[:, g * cg:(g + 1) * cg], grid, mode="bilinear", padding_mode="zeros",
                                      align_corners=False))
        w = torch.softmax(torch.stack(logits, 1), dim=1)  # [B, P, sH, sW]
        out.append(sum(w[:, p:p + 1] * vals[p] for p in range(P)))
    return torch.cat(out, 1)
