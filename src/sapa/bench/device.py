"""How ``sapa bench`` times and measures on each device: one *probe* object per device.

A probe has ``device``, ``timing`` / ``mem_method`` (names written into every record),
``time(run, repeats) -> (median_s, min_s, max_s, n)``, ``peak_bytes(run) -> int | None``,
``copy_bandwidth() -> bytes/s | None``, ``matmul_gflops() -> float`` and ``info() -> dict`` (the
machine tags). The runner only talks to a probe, so its record building is tested on CPU with a
probe whose clock is injected (``tests/ops/test_bench.py``).

CPU (:class:`CpuProbe`): ``time.perf_counter`` around each call (CPU ops are synchronous), peak
memory from the resident-set high-water mark (``runner.PeakMemory``).

CUDA (:class:`CudaProbe`): ``triton.testing.do_bench`` (CUDA events around each call, the L2 cache
flushed by a 256 MB write before every call: at the authors' shape the whole working set, 41.5 MB
in bf16, would otherwise sit in the H200's 60 MB L2 and time a cache, not memory); without triton,
CUDA events with the same flush. Never unsynchronised wall clock. Peak memory:
``torch.cuda.max_memory_allocated`` during one call minus the memory allocated before it (the
inputs), i.e. what the call allocates: outputs, saved tensors, workspaces. Copy bandwidth: a
device-to-device ``copy_`` of 1 GiB, counted as read + write (2 GiB moved), timed the same way.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch


class CpuProbe:
    timing = "time.perf_counter"

    def __init__(self):
        from .runner import PeakMemory

        self.device = torch.device("cpu")
        self._pm = PeakMemory
        self.mem_method = "rss-hwm" if PeakMemory().available else "unavailable"

    def time(self, run: Callable[[], None], repeats: int) -> tuple[float, float, float, int]:
        run()  # warm-up: numba compilation or cache load, allocator
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), min(times), max(times), repeats

    def peak_bytes(self, run: Callable[[], None]) -> int | None:
        with self._pm() as pm:
            run()
        return pm.peak_bytes

    def copy_bandwidth(self) -> float | None:
        n = 32 << 20  # 128 MB of float32: well past the caches
        src, dst = torch.ones(n), torch.empty(n)
        dst.copy_(src)
        t, _, _, _ = self.time(lambda: dst.copy_(src), 3)
        return 2 * 4 * n / t

    def matmul_gflops(self) -> float:
        from .runner import matmul_gflops

        return matmul_gflops()

    def info(self) -> dict:
        from .runner import machine_info

        return {"machine": machine_info(), "device": "cpu"}


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    line = out.stdout.strip().splitlines()
    return line[0].strip() if out.returncode == 0 and line else None


class CudaProbe:
    mem_method = "torch.cuda.max_memory_allocated"

    def __init__(self, index: int = 0):
        from .. import flags

        if not torch.cuda.is_available():
            raise ValueError(
                f"--device cuda: torch.cuda.is_available() is False (torch {torch.__version__}, built for "
                f"CUDA {torch.version.cuda}); run on a machine with an NVIDIA GPU and its driver, or use "
                f"--device cpu")
        if flags.triton_interpret():
            raise ValueError("--device cuda: TRITON_INTERPRET is set, which would time triton's CPU "
                             "interpreter instead of GPU kernels; unset it")
        self.device = torch.device("cuda", index)
        torch.cuda.set_device(self.device)
        try:
            from triton.testing import do_bench
            self._do_bench = do_bench
            self.timing = "triton.testing.do_bench(warmup=25ms, rep=100ms, L2 flushed)"
        except ImportError:  # pragma: no cover - triton ships with the CUDA torch wheels
            self._do_bench = None
            self.timing = "cuda-events (L2 flushed)"
        self._flush = None

    def _events(self, run: Callable[[], None], repeats: int) -> list[float]:
        if self._flush is None:
            self._flush = torch.empty(256 << 20, dtype=torch.int8, device=self.device)
        run()
        torch.cuda.synchronize()
        times = []
        for _ in range(max(repeats, 10)):
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return times

    def time(self, run: Callable[[], None], repeats: int) -> tuple[float, float, float, int]:
        if self._do_bench is not None:
            med, lo, hi = self._do_bench(run, quantiles=[0.5, 0.0, 1.0])
            return med / 1e3, lo / 1e3, hi / 1e3, 0  # n unknown: do_bench repeats for ~100 ms
        times = self._events(run, repeats)
        return statistics.median(times), min(times), max(times), len(times)

    def peak_bytes(self, run: Callable[[], None]) -> int | None:
        torch.cuda.synchronize()
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        run()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated(self.device) - base)

    def copy_bandwidth(self) -> float | None:
        n = 1 << 30
        src = torch.ones(n, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        t, _, _, _ = self.time(lambda: dst.copy_(src), 10)
        del src, dst
        torch.cuda.empty_cache()
        return 2 * n / t

    def matmul_gflops(self) -> float:
        n = 8192
        a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        t, _, _, _ = self.time(lambda: torch.mm(a, b), 10)
        return 2 * n ** 3 / t / 1e9

    def info(self) -> dict:
        p = torch.cuda.get_device_properties(self.device)
        driver = _nvidia_smi("driver_version")
        return {"device": "cuda",
                "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                            "threads": torch.get_num_threads(), "platform": platform.platform(),
                            "python": platform.python_version()},
                "gpu": {"name": p.name, "capability": f"{p.major}.{p.minor}",
                        "memory_gib": round(p.total_memory / 2 ** 30, 1),
                        "sm_count": p.multi_processor_count, "driver": driver, "cuda": torch.version.cuda}}


def make_probe(device: str):
    """The probe for ``device`` ("cpu" or "cuda"); ValueError with the reason when it cannot run."""
    if device == "cpu":
        return CpuProbe()
    if device == "cuda":
        return CudaProbe()
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
