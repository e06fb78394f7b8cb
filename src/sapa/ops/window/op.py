"""torch.library custom ops of the window ops, one section per backend.

Each backend adds, per op, a forward custom op ``sapa::<op>_fwd_<backend>`` with ``register_fake``
(shape inference: meta tensors, torch.compile, torch.export) and ``register_autograd`` whose backward
is itself a custom op ``sapa::<op>_bwd_<backend>``, so a traced graph contains both. The functions
registered with :func:`sapa.backends.register_impl` are what ``sapa.functional`` calls; they receive
validated, same-dtype tensors with the reference's positional arguments.

Ops of the cpu backend (kernels in ``cpu.py``, imported lazily so that importing this module does
not import numba):

    sapa::window_similarity_fwd_cpu(q, k, K, s) -> logits
    sapa::window_similarity_bwd_cpu(grad, q, k, K, s) -> (dq, dk)
    sapa::reassemble_fwd_cpu(weights, v, K, s, groups) -> out
    sapa::reassemble_bwd_cpu(grad, weights, v, K, s, groups) -> (dweights, dv)
    sapa::sapa_fwd_cpu(q, k, v, K, s) -> (out, lse)        lse [B, H', W'] is non-differentiable
    sapa::sapa_bwd_cpu(grad, q, k, v, lse, K, s) -> (dq, dk, dv)

Outputs are contiguous NCHW in the input dtype; float16/bfloat16 are computed in float32 (lse stays
float32). Second derivatives are not implemented (the backward ops have no autograd formula).
"""
from __future__ import annotations

import concurrent.futures
import itertools
import math
import os
import sys
import threading
import weakref

import numpy as np
import torch
from torch import Tensor

from ... import flags
from ...backends import register_impl
from .._common import compute_dtype

# ================================================================================= cpu backend


def cpu_kernels(module: str):
    """Import ``sapa.ops.<module>.cpu`` (numba) on first use."""
    import importlib

    return importlib.import_module(f"sapa.ops.{module}.cpu")


# The kernels are serial ``@njit(nogil=True)`` functions of one band of rows, ``kernel(t, nb, ...)``,
# run on ``nb`` Python threads (numba releases the GIL). Measured: compiling a kernel with
# ``parallel=True`` (prange) took 2.8 s against 0.9 s serial, and the cold compile of all kernels
# for float32 + float64 dropped from ~90 s to ~25 s; run time is the same. It also avoids numba's
# OpenMP layer (not fork-safe with GNU OpenMP, and spin-waiting when the cores are oversubscribed).
_POOL = None


def _reset_pool() -> None:
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):  # a forked child (DataLoader worker) has no pool threads
    os.register_at_fork(after_in_child=_reset_pool)


def num_threads() -> int:
    return max(1, torch.get_num_threads())


def nbands(rows: int, per_thread: int = 3) -> int:
    """Bands for ``rows`` rows of work: ``per_thread`` per thread (at least 1, at most ``rows``), one
    band with one thread. Bands are handed out dynamically, so a thread that loses its core to
    another process only delays its current band: with one band per thread the fused forward went
    from 10 to 39 ms whenever another process took one of the 2 cores."""
    n = num_threads()
    return max(1, min(rows, n if n == 1 else n * per_thread))


def run_bands(kernel, rows: int, *args, per_thread: int = 3) -> None:
    """``kernel(t, nb, *args)`` for every band t < nb = nbands(rows, per_thread), on up to
    torch.get_num_threads() threads (the caller's included), bands taken in order as threads free up."""
    global _POOL
    nb = nbands(rows, per_thread)
    workers = min(num_threads(), nb)
    if workers == 1:
        for t in range(nb):
            kernel(t, nb, *args)
        return
    if _POOL is None or _POOL._max_workers < workers - 1:
        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="sapa-cpu")
    counter = itertools.count()
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                t = next(counter)
            if t >= nb:
                return
            kernel(t, nb, *args)

    futures = [_POOL.submit(worker) for _ in range(workers - 1)]
    try:
        worker()
    finally:
        for f in futures:
            f.result()


def as_numpy(t: Tensor, dtype: torch.dtype):
    """C-contiguous numpy view of ``t`` in ``dtype`` (a copy only when the dtype or strides differ)."""
    return t.detach().to(dtype).contiguous().numpy()


# Large outputs and buffers of the cpu kernels are advised into transparent huge pages before the
# kernel first touches them (Linux, THP mode "madvise" or "always"; a no-op elsewhere). Measured:
# the first write of a fresh 33 MB output (B=2, C=256, 128x128) took 9.8 ms in 4 KiB page faults
# and 1.8 ms with the hint, on one core, which was half of the fused forward's time. Only the
# 2 MiB-aligned interior of each allocation is advised, so no memory is added.
_HUGE = 1 << 21
_MADV_HUGEPAGE = 14
_madvise = None


def _advise_huge(start: int, nbytes: int) -> None:
    """madvise(MADV_HUGEPAGE) the 2 MiB-aligned interior of [start, start + nbytes)."""
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _madvise = libc.madvise
            except (OSError, AttributeError):
                pass
    if not _madvise:
        return
    lo = (start + _HUGE - 1) & ~(_HUGE - 1)
    hi = (start + nbytes) & ~(_HUGE - 1)
    if hi > lo:
        _madvise(lo, hi - lo, _MADV_HUGEPAGE)


class _HostCache:
    """Reuse of the memory of large (>= 4 MiB) cpu-kernel outputs and buffers across calls.

    Fresh memory costs a page fault and the kernel's zeroing of every page on first touch: at the
    SAPA-D benchmark shape (about 110 MB of outputs and buffers per forward+backward) that was
    10-12 ms of a 64 ms forward+backward on two cores (measured by keeping glibc from returning
    memory to the system). A block is handed out as a numpy array wrapped by ``torch.from_numpy``;
    the tensor keeps that array alive, so a weak reference to it tells when every tensor on the block
    is gone and the block can be handed out again. Blocks are matched by size (a block serves requests
    of half to all of its size). Whenever a block is freed or a new one is needed, free blocks beyond
    ``SAPA_CPU_CACHE_MB`` (default 512; 0 turns the cache off) are released, oldest first, so the
    process keeps at most that much memory it does not use; :func:`empty_cache` releases all free
    blocks.
    """

    def __init__(self):
        self._lock = threading.RLock()
        self._blocks: list[list] = []  # [capacity in bytes, uint8 ndarray, weakref to the handed-out array]
        self._limit: int | None = None

    def _released(self, _ref) -> None:
        """Weak-reference callback: a handed-out array died; keep the free blocks within the limit."""
        try:
            with self._lock:
                self._trim(self.limit())
        except Exception:  # e.g. at interpreter exit, with modules torn down: nothing to keep tidy
            pass

    def limit(self) -> int:
        if self._limit is None:
            self._limit = flags.cpu_cache_bytes()
        return self._limit

    @staticmethod
    def _free(entry) -> bool:
        return entry[2] is None or entry[2]() is None

    def _trim(self, keep: int) -> None:
        total = sum(e[0] for e in self._blocks if self._free(e))
        kept = []
        for e in self._blocks:  # oldest first
            if total > keep and self._free(e):
                total -= e[0]
            else:
                kept.append(e)
        self._blocks = kept

    def empty(self, shape: tuple, dtype: torch.dtype) -> Tensor | None:
        """An uninitialised float32/float64 tensor on a cached block, or None (cache off, other dtype)."""
        np_dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(dtype)
        if np_dtype is None or self.limit() == 0:
            return None
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            best = None
            for e in self._blocks:
                if nbytes <= e[0] <= 2 * nbytes and self._free(e) and (best is None or e[0] < best[0]):
                    best = e
            if best is None:
                self._trim(max(0, self.limit() - nbytes))
                cap = -(-nbytes // _HUGE) * _HUGE
                raw = np.empty(cap + 64, np.uint8)
                start = (-raw.ctypes.data) % 64
                best = [cap, raw[start:start + cap], None]
                _advise_huge(best[1].ctypes.data, cap)  # once per block, before its first touch
                self._blocks.append(best)
            arr = best[1][:nbytes].view(np_dtype).reshape(shape)
            best[2] = weakref.ref(arr, self._released)
        return torch.from_numpy(arr)

    def clear(self) -> None:
        with self._lock:
            self._trim(0)


_CACHE = _HostCache()


def empty_cache() -> None:
    """Release the memory the cpu kernels keep for reuse (free blocks of :class:`_HostCache`)."""
    _CACHE.clear()


if hasattr(os, "register_at_fork"):  # a lock held by another thread while forking stays held in the child
    os.register_at_fork(after_in_child=lambda: setattr(_CACHE, "_lock", threading.RLock()))


def new_tensor(shape, dtype, zero: bool = False) -> Tensor:
    """An output or buffer of a cpu kernel: from the host cache when >= 4 MiB (float32/float64),
    else torch.empty; huge-page advised when >= 4 MiB; zero-filled on request."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    big = math.prod(shape) * dtype.itemsize >= 2 * _HUGE
    t = _CACHE.empty(shape, dtype) if big else None
    if t is None:
        t = torch.empty(shape, dtype=dtype)
        if big:
            _advise_huge(t.data_ptr(), t.numel() * t.element_size())
    return t.zero_() if zero else t


_new = new_tensor


# --- window_similarity


@torch.library.custom_op("sapa::window_similarity_fwd_cpu", mutates_args=(), device_types="cpu")
def window_similarity_fwd_cpu(q: Tensor, k: Tensor, kernel_size: int, scale_factor: int) -> Tensor:
    K, s, ct = kernel_size, scale_factor, compute_dtype(q.dtype)
    B, _, Hq, Wq = q.shape
    out = _new((B, K * K, Hq, Wq), ct)
    run_bands(cpu_kernels("window").similarity_fwd, B * k.shape[2], as_numpy(q, ct), as_numpy(k, ct), K, s,
              out.numpy())
    return out.to(q.dtype)


@window_similarity_fwd_cpu.register_fake
def _(q, k, kernel_size, scale_factor):
    B, _, Hq, Wq = q.shape
    return q.new_empty((B, kernel_size * kernel_size, Hq, Wq))


@torch.library.custom_op("sapa::window_similarity_bwd_cpu", mutates_args=(), device_types="cpu")
def window_similarity_bwd_cpu(grad: Tensor, q: Tensor, k: Tensor, kernel_size: int,
                              scale_factor: int) -> tuple[Tensor, Tensor]:
    ct = compute_dtype(q.dtype)
    gq, gk = _new(q.shape, ct), _new(k.shape, ct)
    run_bands(cpu_kernels("window").similarity_bwd, k.shape[0] * k.shape[2], as_numpy(grad, ct),
              as_numpy(q, ct), as_numpy(k, ct), kernel_size, scale_factor, gq.numpy(), gk.numpy(),
              per_thread=2)
    return gq.to(q.dtype), gk.to(k.dtype)


@window_similarity_bwd_cpu.register_fake
def _(grad, q, k, kernel_size, scale_factor):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format)


def _similarity_setup(ctx, inputs, output):
    q, k, ctx.K, ctx.s = inputs
    ctx.save_for_backward(q, k)


def _similarity_backward(ctx, grad):
    q, k = ctx.saved_tensors
    gq, gk = torch.ops.sapa.window_similarity_bwd_cpu(grad, q, k, ctx.K, ctx.s)
    return gq, gk, None, None


torch.library.register_autograd("sapa::window_similarity_fwd_cpu", _similarity_backward,
                                setup_context=_similarity_setup)


# --- reassemble


@torch.library.custom_op("sapa::reassemble_fwd_cpu", mutates_args=(), device_types="cpu")
def reassemble_fwd_cpu(weights: Tensor, v: Tensor, kernel_size: int, scale_factor: int,
                       groups: int) -> Tensor:
    ct = compute_dtype(v.dtype)
    B, C = v.shape[:2]
    out = _new((B, C) + tuple(weights.shape[-2:]), ct)
    run_bands(cpu_kernels("window").reassemble_fwd, B * v.shape[2], as_numpy(weights, ct),
              as_numpy(v, ct), kernel_size, scale_factor, groups, out.numpy())
    return out.to(v.dtype)


@reassemble_fwd_cpu.register_fake
def _(weights, v, kernel_size, scale_factor, groups):
    return v.new_empty((v.shape[0], v.shape[1], weights.shape[2], weights.shape[3]))


@torch.library.custom_op("sapa::reassemble_bwd_cpu", mutates_args=(), device_types="cpu")
def reassemble_bwd_cpu(grad: Tensor, weights: Tensor, v: Tensor, kernel_size: int, scale_factor: int,
                       groups: int) -> tuple[Tensor, Tensor]:
    ct = compute_dtype(v.dtype)
    gw, gv = _new(weights.shape, ct), _new(v.shape, ct)
    run_bands(cpu_kernels("window").reassemble_bwd, v.shape[0] * v.shape[2], as_numpy(grad, ct),
              as_numpy(weights, ct), as_numpy(v, ct), kernel_size, scale_factor, groups, gw.numpy(),
              gv.numpy(), per_thread=2)
    return gw.to(weights.dtype), gv.to(v.dtype)


@reassemble_bwd_cpu.register_fake
def _(grad, weights, v, kernel_size, scale_factor, groups):
    return torch.empty_like(weights, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _reassemble_setup(ctx, inputs, output):
    weights, v, ctx.K, ctx.s, ctx.G = inputs
    ctx.save_for_backward(weights, v)


def _reassemble_backward(ctx, grad):
    weights, v = ctx.saved_tensors
    gw, gv = torch.ops.sapa.reassemble_bwd_cpu(grad, weights, v, ctx.K, ctx.s, ctx.G)
    return gw, gv, None, None, None


torch.library.register_autograd("sapa::reassemble_fwd_cpu", _reassemble_backward,
                                setup_context=_reassemble_setup)


# --- sapa (fused)


@torch.library.custom_op("sapa::sapa_fwd_cpu", mutates_args=(), device_types="cpu")
def sapa_fwd_cpu(q: Tensor, k: Tensor, v: Tensor, kernel_size: int,
                 scale_factor: int) -> tuple[Tensor, Tensor]:
    ct = compute_dtype(v.dtype)
    B, C = v.shape[:2]
    Hq, Wq = q.shape[-2:]
    out, lse = _new((B, C, Hq, Wq), ct), _new((B, Hq, Wq), ct)
    run_bands(cpu_kernels("window").sapa_fwd, B * v.shape[2], as_numpy(q, ct), as_numpy(k, ct),
              as_numpy(v, ct), kernel_size, scale_factor, out.numpy(), lse.numpy())
    return out.to(v.dtype), lse


@sapa_fwd_cpu.register_fake
def _(q, k, v, kernel_size, scale_factor):
    B, C = v.shape[:2]
    Hq, Wq = q.shape[-2:]
    return v.new_empty((B, C, Hq, Wq)), v.new_empty((B, Hq, Wq), dtype=compute_dtype(v.dtype))


@torch.library.custom_op("sapa::sapa_bwd_cpu", mutates_args=(), device_types="cpu")
def sapa_bwd_cpu(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, kernel_size: int,
                 scale_factor: int) -> tuple[Tensor, Tensor, Tensor]:
    ct = compute_dtype(v.dtype)
    gq, gk, gv = _new(q.shape, ct), _new(k.shape, ct), _new(v.shape, ct)
    run_bands(cpu_kernels("window").sapa_bwd, v.shape[0] * v.shape[2], as_numpy(grad, ct),
              as_numpy(q, ct), as_numpy(k, ct), as_numpy(v, ct), as_numpy(lse, ct), kernel_size,
              scale_factor, gq.numpy(), gk.numpy(), gv.numpy(), per_thread=2)
    return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype)


@sapa_bwd_cpu.register_fake
def _(grad, q, k, v, lse, kernel_size, scale_factor):
    cf = torch.contiguous_format
    return (torch.empty_like(q, memory_format=cf), torch.empty_like(k, memory_format=cf),
            torch.empty_like(v, memory_format=cf))


def _sapa_setup(ctx, inputs, output):
    q, k, v, ctx.K, ctx.s = inputs
    lse = output[1]
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, lse)


def _sapa_backward(ctx, grad, _grad_lse):
    q, k, v, lse = ctx.saved_tensors
    gq, gk, gv = torch.ops.sapa.sapa_bwd_cpu(grad, q, k, v, lse, ctx.K, ctx.s)
    return gq, gk, gv, None, None


torch.library.register_autograd("sapa::sapa_fwd_cpu", _sapa_backward, setup_context=_sapa_setup)


# --- implementations picked up by sapa.backends


@register_impl("window_similarity", "cpu")
def window_similarity_cpu(q, k, kernel_size, scale_factor):
    return torch.ops.sapa.window_similarity_fwd_cpu(q, k, kernel_size, scale_factor)


@register_impl("reassemble", "cpu")
def reassemble_cpu(weights, v, kernel_size, scale_factor, groups):
    return torch.ops.sapa.reassemble_fwd_cpu(weights, v, kernel_size, scale_factor, groups)


@register_impl("sapa", "cpu")
def sapa_cpu(q, k, v, kernel_size, scale_factor):
    return torch.ops.sapa.sapa_fwd_cpu(q, k, v, kernel_size, scale_factor)[0]


# ============================================================================== triton backend
# (added by the GPU work: sapa::<op>_fwd_triton / _bwd_triton and @register_impl(..., "triton"))
# Kernels in triton.py, imported on first call (importing triton is slow and, on CPU, must follow
# TRITON_INTERPRET). device_types is left open: CUDA tensors normally, CPU tensors under the
# interpreter (sapa.backends only routes CPU tensors here when asked explicitly).


def _tk():
    from . import triton as kernels

    return kernels


def _contig(*ts: Tensor) -> list[Tensor]:
    return [t.contiguous() for t in ts]


@torch.library.custom_op("sapa::window_similarity_fwd_triton", mutates_args=())
def window_similarity_fwd_triton(q: Tensor, k: Tensor, kernel_size: int, scale_factor: int) -> Tensor:
    return _tk().similarity_fwd(q, k, kernel_size, scale_factor)


@window_similarity_fwd_triton.register_fake
def _(q, k, kernel_size, scale_factor):
    return q.new_empty((q.shape[0], kernel_size * kernel_size, q.shape[2], q.shape[3]))


@torch.library.custom_op("sapa::window_similarity_bwd_triton", mutates_args=())
def window_similarity_bwd_triton(grad: Tensor, q: Tensor, k: Tensor, kernel_size: int,
                                 scale_factor: int) -> tuple[Tensor, Tensor]:
    return _tk().similarity_bwd(grad, q, k, kernel_size, scale_factor)


@window_similarity_bwd_triton.register_fake
def _(grad, q, k, kernel_size, scale_factor):
    cf = torch.contiguous_format
    return torch.empty_like(q, memory_format=cf), torch.empty_like(k, memory_format=cf)


def _similarity_backward_triton(ctx, grad):
    q, k = ctx.saved_tensors
    gq, gk = torch.ops.sapa.window_similarity_bwd_triton(grad, q, k, ctx.K, ctx.s)
    return gq, gk, None, None


torch.library.register_autograd("sapa::window_similarity_fwd_triton", _similarity_backward_triton,
                                setup_context=_similarity_setup)


@torch.library.custom_op("sapa::reassemble_fwd_triton", mutates_args=())
def reassemble_fwd_triton(weights: Tensor, v: Tensor, kernel_size: int, scale_factor: int,
                          groups: int) -> Tensor:
    return _tk().reassemble_fwd(weights, v, kernel_size, scale_factor, groups)


@reassemble_fwd_triton.register_fake
def _(weights, v, kernel_size, scale_factor, groups):
    return v.new_empty((v.shape[0], v.shape[1], weights.shape[2], weights.shape[3]))


@torch.library.custom_op("sapa::reassemble_bwd_triton", mutates_args=())
def reassemble_bwd_triton(grad: Tensor, weights: Tensor, v: Tensor, kernel_size: int, scale_factor: int,
                          groups: int) -> tuple[Tensor, Tensor]:
    return _tk().reassemble_bwd(grad, weights, v, kernel_size, scale_factor, groups)


@reassemble_bwd_triton.register_fake
def _(grad, weights, v, kernel_size, scale_factor, groups):
    cf = torch.contiguous_format
    return torch.empty_like(weights, memory_format=cf), torch.empty_like(v, memory_format=cf)


def _reassemble_backward_triton(ctx, grad):
    weights, v = ctx.saved_tensors
    gw, gv = torch.ops.sapa.reassemble_bwd_triton(grad, weights, v, ctx.K, ctx.s, ctx.G)
    return gw, gv, None, None, None


torch.library.register_autograd("sapa::reassemble_fwd_triton", _reassemble_backward_triton,
                                setup_context=_reassemble_setup)


@torch.library.custom_op("sapa::sapa_fwd_triton", mutates_args=())
def sapa_fwd_triton(q: Tensor, k: Tensor, v: Tensor, kernel_size: int,
                    scale_factor: int) -> tuple[Tensor, Tensor]:
    return _tk().sapa_fwd(q, k, v, kernel_size, scale_factor)


@sapa_fwd_triton.register_fake
def _(q, k, v, kernel_size, scale_factor):
    B, C = v.shape[:2]
    Hq, Wq = q.shape[-2:]
    stat = torch.float64 if v.dtype == torch.float64 else torch.float32
    return v.new_empty((B, C, Hq, Wq)), v.new_empty((B, Hq, Wq), dtype=stat)


@torch.library.custom_op("sapa::sapa_bwd_triton", mutates_args=())
def sapa_bwd_triton(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kernel_size: int,
                    scale_factor: int) -> tuple[Tensor, Tensor, Tensor]:
    return _tk().sapa_bwd(grad, q, k, v, out, lse, kernel_size, scale_factor)


@sapa_bwd_triton.register_fake
def _(grad, q, k, v, out, lse, kernel_size, scale_factor):
    cf = torch.contiguous_format
    return (torch.empty_like(q, memory_format=cf), torch.empty_like(k, memory_format=cf),
            torch.empty_like(v, memory_format=cf))


def _sapa_setup_triton(ctx, inputs, output):
    q, k, v, ctx.K, ctx.s = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)


def _sapa_backward_triton(ctx, grad, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    gq, gk, gv = torch.ops.sapa.sapa_bwd_triton(grad, q, k, v, out, lse, ctx.K, ctx.s)
    return gq, gk, gv, None, None


torch.library.register_autograd("sapa::sapa_fwd_triton", _sapa_backward_triton, setup_context=_sapa_setup_triton)


@register_impl("window_similarity", "triton")
def window_similarity_triton(q, k, kernel_size, scale_factor):
    return torch.ops.sapa.window_similarity_fwd_triton(q, k, kernel_size, scale_factor)


@register_impl("reassemble", "triton")
def reassemble_triton(weights, v, kernel_size, scale_factor, groups):
    return torch.ops.sapa.reassemble_fwd_triton(weights, v, kernel_size, scale_factor, groups)


@register_impl("sapa", "triton")
def sapa_triton(q, k, v, kernel_size, scale_factor):
    return torch.ops.sapa.sapa_fwd_triton(q, k, v, kernel_size, scale_factor)[0]
