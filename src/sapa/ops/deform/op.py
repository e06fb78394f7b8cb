"""torch.library custom ops of the deformable (SAPA-D) ops, one section per backend. Same scheme as
``sapa/ops/window/op.py``: ``sapa::<op>_fwd_<backend>`` with ``register_fake`` and
``register_autograd`` whose backward is the custom op ``sapa::<op>_bwd_<backend>``.

Ops of the cpu backend (kernels in ``cpu.py``, imported lazily):

    sapa::deform_similarity_fwd_cpu(q, k, offset, P, G, s) -> logits [B, G, P, H', W']
    sapa::deform_similarity_bwd_cpu(grad, q, k, offset, P, G, s) -> (dq, dk, doffset)
    sapa::deform_reassemble_fwd_cpu(weights, v, offset, P, G, s) -> out
    sapa::deform_reassemble_bwd_cpu(grad, weights, v, offset, P, G, s) -> (dweights, dv, doffset)
    sapa::sapa_deform_fwd_cpu(q, k, v, offset, P, G, s) -> (out, saved, kf, vf)
    sapa::sapa_deform_bwd_cpu(grad, q, k, v, offset, saved, kf, vf, P, G, s) -> (dq, dk, dv, doffset)

``saved`` (flat, B*H'*W'*G*P*3 values in the compute dtype) holds each point's softmax probability
and the slopes of its logit along x and y; ``kf`` / ``vf`` are the forward's flat channels-last
copies of k and v (``_flat_cl_tensor``). All three are for the backward only (non-differentiable):
with them it neither recomputes the logits nor copies k and v again (the two copies on fresh memory
took 4-6 ms of the ~55 ms backward at the benchmark shape on two cores).

Gradients to the offsets are those of bilinear interpolation (piecewise linear: at an exactly
integer sampling coordinate the derivative is the one-sided one from the cell above/right, as in
the CUDA kernel; grid_sample's normalised coordinates may round to the other side there).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ...backends import register_impl
from .._common import compute_dtype
from ..window.op import as_numpy, cpu_kernels, nbands, new_tensor, run_bands

# ================================================================================= cpu backend


_new = new_tensor


def _flat_cl_tensor(kern, t: Tensor, dtype: torch.dtype) -> Tensor:
    """Flat channels-last copy of a low-res NCHW tensor (channel stride C + kern._PAD) followed by a
    zero tail of one channel stride, which outside bilinear corners read (see cpu.py)."""
    t = t.detach().to(dtype).contiguous()
    B, C, H, W = t.shape
    out = new_tensor(_flat_cl_size(kern, t.shape), dtype)
    Cl = C + kern._PAD
    out[B * H * W * Cl:] = 0  # the kernel zeroes the spare channels: no undefined contents in an output
    run_bands(kern.to_cl, B * H, t.numpy(), Cl, out.numpy())
    return out


def _flat_cl_size(kern, shape) -> int:
    B, C, H, W = shape
    return (B * H * W + 1) * (C + kern._PAD)


def _flat_cl(kern, t: Tensor, dtype: torch.dtype):
    return _flat_cl_tensor(kern, t, dtype).numpy()


class _Bands:
    """Per-band scatter buffers for dk / dv (see cpu.py): band t owns output rows
    [t*R/nb, (t+1)*R/nb) and a buffer for the flattened low-res rows lo[t]..hi[t] it can touch."""

    def __init__(self, kern, off, num_points, groups, scale_factor, H):
        B, _, Hq, _ = off.shape
        self.out_rows = B * Hq
        self.per_thread = 3
        nb = nbands(self.out_rows, self.per_thread)
        self.lo, self.hi = np.empty(nb, np.int64), np.empty(nb, np.int64)
        run_bands(kern.band_rows, self.out_rows, off, num_points, groups, scale_factor, H, self.lo,
                  self.hi, per_thread=self.per_thread)
        size = np.maximum(self.hi - self.lo + 1, 0)
        self.base = np.zeros(nb, np.int64)
        self.base[1:] = np.cumsum(size)[:-1]
        self.rows = int(size.sum())

    def run(self, kernel, *args) -> None:
        """``kernel(t, nb, *args)`` over this object's bands (the same split as ``lo`` / ``hi``)."""
        run_bands(kernel, self.out_rows, *args, per_thread=self.per_thread)

    def buffer(self, kern, W, C, dtype) -> Tensor:
        """Flat [rows, W, C + _PAD] buffer plus a scratch tail written by outside corners. The kernel
        zeroes each band's rows on the band's thread (``_zero_band``); the tail is zeroed here."""
        Cl = C + kern._PAD
        buf = new_tensor(self.rows * W * Cl + Cl, dtype)
        buf.numpy()[-Cl:] = 0
        return buf

    def reduce(self, kern, buf: Tensor, shape, dtype) -> Tensor:
        out = _new(shape, dtype)
        run_bands(kern.band_reduce, shape[0] * shape[2], buf.numpy(), self.lo, self.hi, self.base,
                  out.numpy())
        return out


# --- deform_similarity


@torch.library.custom_op("sapa::deform_similarity_fwd_cpu", mutates_args=(), device_types="cpu")
def deform_similarity_fwd_cpu(q: Tensor, k: Tensor, offset: Tensor, num_points: int, groups: int,
                              scale_factor: int) -> Tensor:
    kern, ct = cpu_kernels("deform"), compute_dtype(q.dtype)
    B, _, Hq, Wq = q.shape
    H, W = k.shape[-2:]
    out = _new((B, groups, num_points, Hq, Wq), ct)
    run_bands(kern.similarity_fwd, B * Hq, as_numpy(q, ct), _flat_cl(kern, k, ct), H, W,
              as_numpy(offset, ct), num_points, groups, scale_factor, out.numpy())
    return out.to(q.dtype)


@deform_similarity_fwd_cpu.register_fake
def _(q, k, offset, num_points, groups, scale_factor):
    B, _, Hq, Wq = q.shape
    return q.new_empty((B, groups, num_points, Hq, Wq))


@torch.library.custom_op("sapa::deform_similarity_bwd_cpu", mutates_args=(), device_types="cpu")
def deform_similarity_bwd_cpu(grad: Tensor, q: Tensor, k: Tensor, offset: Tensor, num_points: int,
                              groups: int, scale_factor: int) -> tuple[Tensor, Tensor, Tensor]:
    kern, ct = cpu_kernels("deform"), compute_dtype(q.dtype)
    B, Cq, H, W = k.shape
    off = as_numpy(offset, ct)
    bands = _Bands(kern, off, num_points, groups, scale_factor, H)
    gq, goff, gk_buf = _new(q.shape, ct), _new(offset.shape, ct), bands.buffer(kern, W, Cq, ct)
    bands.run(kern.similarity_bwd, as_numpy(grad, ct), as_numpy(q, ct),
              _flat_cl(kern, k, ct), H, W, off, num_points, groups, scale_factor, bands.lo, bands.base,
              gq.numpy(), goff.numpy(), gk_buf.numpy())
    gk = bands.reduce(kern, gk_buf, k.shape, ct)
    return gq.to(q.dtype), gk.to(k.dtype), goff.to(offset.dtype)


@deform_similarity_bwd_cpu.register_fake
def _(grad, q, k, offset, num_points, groups, scale_factor):
    cf = torch.contiguous_format
    return (torch.empty_like(q, memory_format=cf), torch.empty_like(k, memory_format=cf),
            torch.empty_like(offset, memory_format=cf))


def _similarity_setup(ctx, inputs, output):
    q, k, offset, ctx.P, ctx.G, ctx.s = inputs
    ctx.save_for_backward(q, k, offset)


def _similarity_backward(ctx, grad):
    q, k, offset = ctx.saved_tensors
    gq, gk, goff = torch.ops.sapa.deform_similarity_bwd_cpu(grad, q, k, offset, ctx.P, ctx.G, ctx.s)
    return gq, gk, goff, None, None, None


torch.library.register_autograd("sapa::deform_similarity_fwd_cpu", _similarity_backward,
                                setup_context=_similarity_setup)


# --- deform_reassemble


@torch.library.custom_op("sapa::deform_reassemble_fwd_cpu", mutates_args=(), device_types="cpu")
def deform_reassemble_fwd_cpu(weights: Tensor, v: Tensor, offset: Tensor, num_points: int, groups: int,
                              scale_factor: int) -> Tensor:
    kern, ct = cpu_kernels("deform"), compute_dtype(v.dtype)
    B, C, H, W = v.shape
    Hq, Wq = offset.shape[-2:]
    out = _new((B, C, Hq, Wq), ct)
    run_bands(kern.reassemble_fwd, B * Hq, as_numpy(weights, ct), _flat_cl(kern, v, ct), H, W,
              as_numpy(offset, ct), num_points, groups, scale_factor, out.numpy())
    return out.to(v.dtype)


@deform_reassemble_fwd_cpu.register_fake
def _(weights, v, offset, num_points, groups, scale_factor):
    return v.new_empty((v.shape[0], v.shape[1], offset.shape[2], offset.shape[3]))


@torch.library.custom_op("sapa::deform_reassemble_bwd_cpu", mutates_args=(), device_types="cpu")
def deform_reassemble_bwd_cpu(grad: Tensor, weights: Tensor, v: Tensor, offset: Tensor, num_points: int,
                              groups: int, scale_factor: int) -> tuple[Tensor, Tensor, Tensor]:
    kern, ct = cpu_kernels("deform"), compute_dtype(v.dtype)
    B, C, H, W = v.shape
    off = as_numpy(offset, ct)
    bands = _Bands(kern, off, num_points, groups, scale_factor, H)
    gw, goff, gv_buf = _new(weights.shape, ct), _new(offset.shape, ct), bands.buffer(kern, W, C, ct)
    bands.run(kern.reassemble_bwd, as_numpy(grad, ct), as_numpy(weights, ct),
              _flat_cl(kern, v, ct), H, W, off, num_points, groups, scale_factor, bands.lo, bands.base,
              gw.numpy(), goff.numpy(), gv_buf.numpy())
    gv = bands.reduce(kern, gv_buf, v.shape, ct)
    return gw.to(weights.dtype), gv.to(v.dtype), goff.to(offset.dtype)


@deform_reassemble_bwd_cpu.register_fake
def _(grad, weights, v, offset, num_points, groups, scale_factor):
    cf = torch.contiguous_format
    return (torch.empty_like(weights, memory_format=cf), torch.empty_like(v, memory_format=cf),
            torch.empty_like(offset, memory_format=cf))


def _reassemble_setup(ctx, inputs, output):
    weights, v, offset, ctx.P, ctx.G, ctx.s = inputs
    ctx.save_for_backward(weights, v, offset)


def _reassemble_backward(ctx, grad):
    weights, v, offset = ctx.saved_tensors
    gw, gv, goff = torch.ops.sapa.deform_reassemble_bwd_cpu(grad, weights, v, offset, ctx.P, ctx.G,
                                                            ctx.s)
    return gw, gv, goff, None, None, None


torch.library.register_autograd("sapa::deform_reassemble_fwd_cpu", _reassemble_backward,
                                setup_context=_reassemble_setup)


# --- sapa_deform (fused)


@torch.library.custom_op("sapa::sapa_deform_fwd_cpu", mutates_args=(), device_types="cpu")
def sapa_deform_fwd_cpu(q: Tensor, k: Tensor, v: Tensor, offset: Tensor, num_points: int, groups: int,
                        scale_factor: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    kern, ct = cpu_kernels("deform"), compute_dtype(v.dtype)
    B, C, H, W = v.shape
    Hq, Wq = q.shape[-2:]
    out, saved = _new((B, C, Hq, Wq), ct), _new((_saved_size(B, Hq, Wq, groups, num_points),), ct)
    kf, vf = _flat_cl_tensor(kern, k, ct), _flat_cl_tensor(kern, v, ct)
    run_bands(kern.sapa_fwd, B * Hq, as_numpy(q, ct), kf.numpy(), vf.numpy(), H, W,
              as_numpy(offset, ct), num_points, groups, scale_factor, out.numpy(), saved.numpy())
    return out.to(v.dtype), saved, kf, vf


def _saved_size(B, Hq, Wq, groups, num_points):
    return B * Hq * Wq * groups * num_points * 3


@sapa_deform_fwd_cpu.register_fake
def _(q, k, v, offset, num_points, groups, scale_factor):
    B, C = v.shape[:2]
    Hq, Wq = q.shape[-2:]
    kern, ct = cpu_kernels("deform"), compute_dtype(v.dtype)
    return (v.new_empty((B, C, Hq, Wq)), v.new_empty((_saved_size(B, Hq, Wq, groups, num_points),), dtype=ct),
            v.new_empty((_flat_cl_size(kern, k.shape),), dtype=ct),
            v.new_empty((_flat_cl_size(kern, v.shape),), dtype=ct))


@torch.library.custom_op("sapa::sapa_deform_bwd_cpu", mutates_args=(), device_types="cpu")
def sapa_deform_bwd_cpu(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, offset: Tensor, saved: Tensor,
                        kf: Tensor, vf: Tensor, num_points: int, groups: int,
                        scale_factor: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    kern, ct = cpu_kernels("deform"), compute_dtype(v.dtype)
    B, C, H, W = v.shape
    Cq = k.shape[1]
    off = as_numpy(offset, ct)
    bands = _Bands(kern, off, num_points, groups, scale_factor, H)
    gq, goff = _new(q.shape, ct), _new(offset.shape, ct)
    gk_buf, gv_buf = bands.buffer(kern, W, Cq, ct), bands.buffer(kern, W, C, ct)
    bands.run(kern.sapa_bwd, as_numpy(grad, ct), as_numpy(q, ct), as_numpy(kf, ct),
              as_numpy(vf, ct), H, W, off, as_numpy(saved, ct), num_points, groups, scale_factor,
              bands.lo, bands.base, gq.numpy(), goff.numpy(), gk_buf.numpy(), gv_buf.numpy())
    gk = bands.reduce(kern, gk_buf, k.shape, ct)
    del gk_buf
    gv = bands.reduce(kern, gv_buf, v.shape, ct)
    return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype), goff.to(offset.dtype)


@sapa_deform_bwd_cpu.register_fake
def _(grad, q, k, v, offset, saved, kf, vf, num_points, groups, scale_factor):
    cf = torch.contiguous_format
    return (torch.empty_like(q, memory_format=cf), torch.empty_like(k, memory_format=cf),
            torch.empty_like(v, memory_format=cf), torch.empty_like(offset, memory_format=cf))


def _sapa_setup(ctx, inputs, output):
    q, k, v, offset, ctx.P, ctx.G, ctx.s = inputs
    _, saved, kf, vf = output
    ctx.mark_non_differentiable(saved, kf, vf)
    # no zero-filled grads for the three non-differentiable outputs (25 MB at the benchmark shape):
    # besides the fill, torch's OpenMP worker then spin-waited through the kernel's first milliseconds
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, offset, saved, kf, vf)


def _sapa_backward(ctx, grad, *_grad_saved):
    q, k, v, offset, saved, kf, vf = ctx.saved_tensors
    if grad is None:  # (grads are not materialised) the output took no part in the loss
        return None, None, None, None, None, None, None
    gq, gk, gv, goff = torch.ops.sapa.sapa_deform_bwd_cpu(grad, q, k, v, offset, saved, kf, vf, ctx.P, ctx.G,
                                                           ctx.s)
    return gq, gk, gv, goff, None, None, None


torch.library.register_autograd("sapa::sapa_deform_fwd_cpu", _sapa_backward, setup_context=_sapa_setup)


# --- implementations picked up by sapa.backends


@register_impl("deform_similarity", "cpu")
def deform_similarity_cpu(q, k, offset, num_points, groups, scale_factor):
    return torch.ops.sapa.deform_similarity_fwd_cpu(q, k, offset, num_points, groups, scale_factor)


@register_impl("deform_reassemble", "cpu")
def deform_reassemble_cpu(weights, v, offset, num_points, groups, scale_factor):
    return torch.ops.sapa.deform_reassemble_fwd_cpu(weights, v, offset, num_points, groups, scale_factor)


@register_impl("sapa_deform", "cpu")
def sapa_deform_cpu(q, k, v, offset, num_points, groups, scale_factor):
    return torch.ops.sapa.sapa_deform_fwd_cpu(q, k, v, offset, num_points, groups, scale_factor)[0]


# ============================================================================== triton backend
# (added by the GPU work: sapa::<op>_fwd_triton / _bwd_triton and @register_impl(..., "triton"))
# Only the fused op has triton kernels (it is what SAPA-D runs); deform_similarity and
# deform_reassemble on CUDA fall back to the reference (grid_sample), with the reason logged.


def _tk():
    from . import triton as kernels

    return kernels


@torch.library.custom_op("sapa::sapa_deform_fwd_triton", mutates_args=())
def sapa_deform_fwd_triton(q: Tensor, k: Tensor, v: Tensor, offset: Tensor, num_points: int, groups: int,
                           scale_factor: int) -> tuple[Tensor, Tensor]:
    return _tk().sapa_deform_fwd(q, k, v, offset, num_points, groups, scale_factor)


@sapa_deform_fwd_triton.register_fake
def _(q, k, v, offset, num_points, groups, scale_factor):
    B, C = v.shape[:2]
    Hq, Wq = q.shape[-2:]
    stat = torch.float64 if v.dtype == torch.float64 else torch.float32
    return v.new_empty((B, C, Hq, Wq)), v.new_empty((B, groups, Hq, Wq), dtype=stat)


@torch.library.custom_op("sapa::sapa_deform_bwd_triton", mutates_args=())
def sapa_deform_bwd_triton(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, offset: Tensor, out: Tensor,
                           lse: Tensor, num_points: int, groups: int,
                           scale_factor: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _tk().sapa_deform_bwd(grad, q, k, v, offset, out, lse, num_points, groups, scale_factor)


@sapa_deform_bwd_triton.register_fake
def _(grad, q, k, v, offset, out, lse, num_points, groups, scale_factor):
    cf = torch.contiguous_format
    return tuple(torch.empty_like(t, memory_format=cf) for t in (q, k, v, offset))


def _sapa_deform_setup_triton(ctx, inputs, output):
    q, k, v, offset, ctx.P, ctx.G, ctx.s = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, offset, out, lse)


def _sapa_deform_backward_triton(ctx, grad, _grad_lse):
    q, k, v, offset, out, lse = ctx.saved_tensors
    gq, gk, gv, go = torch.ops.sapa.sapa_deform_bwd_triton(grad, q, k, v, offset, out, lse, ctx.P, ctx.G, ctx.s)
    return gq, gk, gv, go, None, None, None


torch.library.register_autograd("sapa::sapa_deform_fwd_triton", _sapa_deform_backward_triton,
                                setup_context=_sapa_deform_setup_triton)


@register_impl("sapa_deform", "triton")
def sapa_deform_triton(q, k, v, offset, num_points, groups, scale_factor):
    return torch.ops.sapa.sapa_deform_fwd_triton(q, k, v, offset, num_points, groups, scale_factor)[0]
