"""The benchmark runner behind ``sapa bench``: op x backend x placement x mode, timed and measured
in one process, one JSON-serialisable record per case.

Timing: each case runs once untimed (warm-up: numba compilation or cache load, allocator), then
``repeats`` timed calls (``time.perf_counter``); the record keeps median / min / max in ms. On
CUDA (``device="cuda"``) timing, peak memory and the copy bandwidth come from
:class:`sapa.bench.device.CudaProbe` (``triton.testing.do_bench``, ``torch.cuda.max_memory_allocated``);
every record says which method it used (``timing``, ``mem_method``) and carries the GPU's name,
driver and CUDA version (``gpu``). Each record states the bytes the op must move
(:mod:`sapa.bench.traffic`) and the fraction of the measured copy bandwidth that achieves; with
``floor`` the bilinear interpolation to the same output is timed too (``vs_bilinear``).
``fwd`` runs under ``torch.no_grad()``; ``fwd+bwd`` runs the op on inputs that require grad and
``out.backward(grad)`` with a fixed random ``grad`` (gradients are cleared outside the timed region).

Noise: each record carries ``loadavg_1m``, the machine's 1-minute load average when the case
started; with load above the core count the two backends are slowed unequally (torch's OpenMP
threads spin-wait on descheduled peers), so compare ratios measured at low load.

Speed-up: ``speedup_vs_reference`` = median of the reference backend / median of this backend for
the same op, placement and mode, measured in the same run on the same machine (1.0 for the
reference itself; absent when the reference was not run).

Peak memory (CPU): measured after all timings, one call per case, as the rise of the process's
resident-set high-water mark over its resident set just before the call: ``/proc/self/clear_refs``
(``5``) resets ``VmHWM`` to the current ``VmRSS``, the case runs, ``VmHWM - VmRSS(before)`` is
recorded. To make freed memory leave the process (so that the next case's allocations show up as
new resident pages) glibc's mmap threshold is fixed at 64 KiB (``mallopt``), and before each
measurement the cpu kernels' host cache is emptied (``sapa.ops.window.op.empty_cache``: a case then
allocates what its first call would) and ``malloc_trim(0)`` runs. This counts everything the call
touches: torch tensors, numpy and numba buffers, page-granular; the inputs already exist and are not counted, the outputs and saved
tensors are. ``mem_method`` says which method was used ("rss-hwm", or "unavailable" where
``/proc/self/clear_refs`` cannot be written, e.g. macOS).

GFLOP/s: ``2 * sapa.complexity.op_macs(...)`` per forward (the papers' MAC formulas, docs/SEMANTICS.md §4.2,
bilinear sampling at 4 MACs per scalar), times 3 for ``fwd+bwd`` (the usual backward = 2 x forward
convention), divided by the median time. ``matmul_gflops`` is ``torch.mm`` of two 2048 x 2048
float32 matrices on the same machine and threads, for scale.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import gc
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Iterable

import torch

from .. import functional
from ..backends import CAN_RUN
from ..complexity import op_macs
from .shapes import OPS, OP_SETTINGS, Placement, make_inputs, shape_set
from .traffic import bytes_moved

MODES = ("fwd", "fwd+bwd")
SCHEMA = 1


# ----------------------------------------------------------------------------- environment
def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict:
    out = {"torch": torch.__version__}
    for mod in ("numba", "numpy", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            out[mod] = None
    from .. import __version__
    out["sapa"] = __version__
    return out


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------- peak memory
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def rss_memory_available() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except (OSError, KeyError):
        return False


class PeakMemory:
    """``with PeakMemory() as pm: ...`` -> ``pm.peak_bytes``: rise of the resident-set high-water mark
    during the block (see the module doc). ``peak_bytes`` is None where unavailable."""

    _configured = False

    def __init__(self):
        self.available = rss_memory_available()
        self.peak_bytes: int | None = None
        libc = _libc()
        self._trim = getattr(libc, "malloc_trim", None) if libc else None
        if self.available and libc is not None and not PeakMemory._configured:
            try:  # M_MMAP_THRESHOLD = -3: allocations >= 64 KiB are mmapped and unmapped on free
                libc.mallopt(-3, 64 * 1024)
                PeakMemory._configured = True
            except AttributeError:
                pass

    def __enter__(self):
        gc.collect()
        from ..ops.window.op import empty_cache  # memory the cpu kernels keep for reuse is released,

        empty_cache()  # so the measured call allocates what a first call allocates
        if self._trim is not None:
            self._trim(0)
        if self.available:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
            self._base = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.available:
            self.peak_bytes = max(0, _status_kb("VmHWM") - self._base) * 1024
        return False


# ----------------------------------------------------------------------------- one case
FLOOR_OP = "bilinear"  # the floor: F.interpolate(v, size=out_hw, mode="bilinear"), the same output shape
FLOOR_BACKEND = "torch"


def _call(op: str, args: tuple, kwargs: dict, backend: str):
    if op == FLOOR_OP:
        return torch.nn.functional.interpolate(args[0], size=kwargs["size"], mode="bilinear", align_corners=False)
    return getattr(functional, op)(*args, backend=backend, **kwargs)


def _inputs(op: str, pl: Placement, dtype: torch.dtype, seed: int, device) -> tuple[tuple, dict]:
    if op == FLOOR_OP:  # the value tensor of the window ops, upsampled to the same output size
        args, _ = make_inputs("reassemble", pl, dtype, seed)
        args, kwargs = (args[1],), {"size": tuple(pl.out_hw)}
    else:
        args, kwargs = make_inputs(op, pl, dtype, seed)
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args), kwargs


def _make_runner(op: str, pl: Placement, backend: str, mode: str, dtype: torch.dtype,
                 seed: int, device="cpu") -> tuple[Callable[[], None], int]:
    """(run, bytes moved): ``run()`` makes one call of the case; bytes as :mod:`sapa.bench.traffic`."""
    args, kwargs = _inputs(op, pl, dtype, seed, device)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    with torch.no_grad():
        out_shape = tuple(_call(op, args, kwargs, backend).shape)
    moved = bytes_moved([t.shape for t in tensors], out_shape, mode, tensors[0].element_size())
    if mode == "fwd":
        def run():
            with torch.no_grad():
                _call(op, args, kwargs, backend)
        return run, moved
    args = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)
    grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)

    def run():
        for a in args:
            if isinstance(a, torch.Tensor):
                a.grad = None
        _call(op, args, kwargs, backend).backward(grad)
    return run, moved


def _flop(op: str, pl: Placement, mode: str) -> float:
    if op == FLOOR_OP:  # 4 MACs per output element (bilinear sampling), as op_macs counts sampling
        macs = 4 * pl.batch * pl.channels * pl.out_hw[0] * pl.out_hw[1]
    else:
        args, kwargs = make_inputs(op, Placement(pl.batch, pl.channels, pl.in_hw, pl.out_hw, pl.scale),
                                   torch.float32)
        macs = op_macs(op, *[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
    return 2.0 * macs * (3 if mode == "fwd+bwd" else 1)


def time_case(run: Callable[[], None], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------- the runner
def run_bench(ops: Iterable[str] | None = None, backends: Iterable[str] = ("reference", "cpu"),
              shapes: Iterable[str] = ("segformer-b1",), modes: Iterable[str] = MODES, repeats: int | None = None,
              quick: bool = False, dtype: torch.dtype = torch.float32, memory: bool = True, seed: int = 0,
              progress: Callable[[str], None] | None = None, device: str = "cpu", floor: bool | None = None,
              probe=None) -> list[dict]:
    """Run the benchmark grid and return one record (dict) per op x backend x placement x mode.

    Args:
        ops: names of :mod:`sapa.functional` ops (default: all six).
        backends: backends to time; a backend that cannot run on the device's tensors is skipped
            with a record ``{"skipped": reason}``. Put "reference" in to get speed-up ratios.
        shapes: names of shape sets (:data:`sapa.bench.shapes.SHAPE_SETS`).
        modes: "fwd" and/or "fwd+bwd".
        repeats: timed calls per case (after one warm-up call); default 5, or 3 with ``quick``
            (CPU; on CUDA ``triton.testing.do_bench`` repeats for ~100 ms).
        quick: only the largest placement of each shape set (and 3 repeats unless given).
        memory: also measure peak memory (one extra call per case).
        progress: called with a short description before each case (e.g. a progress bar's update).
        device: "cpu" or "cuda" (ValueError with the reason when no CUDA device is visible).
        floor: also time ``F.interpolate(mode="bilinear")`` to the same output (op "bilinear",
            backend "torch") and give every record ``vs_bilinear`` (its time / the floor's);
            default: on CUDA only.
        probe: the timing / memory probe (default :func:`sapa.bench.device.make_probe`); tests inject one.

    Every timed record also has ``bytes_moved`` (:mod:`sapa.bench.traffic`), ``achieved_gbs``
    (bytes / median time) and ``frac_copy_bw`` (that over the device-to-device copy bandwidth
    ``copy_gbs`` measured at the start of the same run).

    Example:
        >>> recs = run_bench(ops=["sapa"], shapes=["tiny"], modes=["fwd"], repeats=1, memory=False)
        >>> sorted(r["backend"] for r in recs)
        ['cpu', 'reference']
    """
    ops = list(ops or OPS)
    for op in ops:
        if op not in OPS:
            raise KeyError(f"unknown op {op!r}; valid: {', '.join(OPS)}")
    backends, modes = list(backends), list(modes)
    for b in backends:
        if b not in CAN_RUN:
            raise KeyError(f"unknown backend {b!r}; valid: {', '.join(CAN_RUN)}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; valid: {', '.join(MODES)}")
    if repeats is None:
        repeats = 3 if quick else 5
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    placements = []
    for name in shapes:
        pls = shape_set(name)
        placements += [(name, pl) for pl in (pls[-1:] if quick else pls)]
    if probe is None:
        from .device import make_probe
        probe = make_probe(device)
    dev = probe.device
    if floor is None:
        floor = dev.type == "cuda"

    copy_bw = probe.copy_bandwidth()
    common = {"schema": SCHEMA, **probe.info(), **versions(), "git_commit": git_commit(),
              "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "dtype": str(dtype).replace("torch.", ""), "matmul_gflops": round(probe.matmul_gflops(), 1),
              "copy_gbs": round(copy_bw / 1e9, 1) if copy_bw else None, "timing": probe.timing,
              "settings": dict(OP_SETTINGS)}
    cases = [(op, b) for op in ops for b in backends]
    if floor:
        cases.append((FLOOR_OP, FLOOR_BACKEND))
    records: list[dict] = []
    runners: dict[int, Callable[[], None]] = {}
    for op, backend in cases:
        for set_name, pl in placements:
            for mode in modes:
                rec = {**common, "op": op, "backend": backend, "mode": mode, "shape_set": set_name,
                       "shape": pl.name, "batch": pl.batch, "channels": pl.channels,
                       "in_hw": list(pl.in_hw), "out_hw": list(pl.out_hw), "scale": pl.scale,
                       "repeats": repeats, "gflop": _flop(op, pl, mode) / 1e9}
                if op != FLOOR_OP:
                    tiny = make_inputs(op, Placement(1, 8, (2, 2), (4, 4)), dtype)[0]
                    try:
                        CAN_RUN[backend](op, *[t.to(dev) for t in tiny], raise_error=True)
                    except RuntimeError as why:
                        records.append({**rec, "skipped": str(why)})
                        continue
                if progress is not None:
                    progress(f"{op} {backend} {set_name} {pl.name} {mode}")
                run, moved = _make_runner(op, pl, backend, mode, dtype, seed, dev)
                if hasattr(os, "getloadavg"):  # other processes on the machine make timings noisy
                    rec["loadavg_1m"] = round(os.getloadavg()[0], 2)
                med, lo, hi, _n = probe.time(run, repeats)
                rec.update(median_ms=round(med * 1e3, 4), min_ms=round(lo * 1e3, 4), max_ms=round(hi * 1e3, 4),
                           gflops=round(rec["gflop"] / med, 2), bytes_moved=moved,
                           achieved_gbs=round(moved / med / 1e9, 2))
                if copy_bw:
                    rec["frac_copy_bw"] = round(moved / med / copy_bw, 4)
                records.append(rec)
                runners[len(records) - 1] = run
    if memory:
        for idx, run in runners.items():
            if progress is not None:
                r = records[idx]
                progress(f"memory {r['op']} {r['backend']} {r['shape_set']} {r['shape']} {r['mode']}")
            records[idx]["peak_mem_bytes"] = probe.peak_bytes(run)
            records[idx]["mem_method"] = probe.mem_method
    runners.clear()
    _add_ratios(records)
    return records


def _add_ratios(records: list[dict]) -> None:
    ref = {(r["op"], r["shape_set"], r["shape"], r["mode"]): r for r in records
           if r["backend"] == "reference" and "median_ms" in r}
    for r in records:
        base = ref.get((r["op"], r["shape_set"], r["shape"], r["mode"]))
        if base is None or "median_ms" not in r:
            continue
        r["speedup_vs_reference"] = round(base["median_ms"] / r["median_ms"], 4)
        if r.get("peak_mem_bytes") and base.get("peak_mem_bytes"):
            r["mem_ratio_vs_reference"] = round(r["peak_mem_bytes"] / base["peak_mem_bytes"], 4)
    floor = {(r["shape_set"], r["shape"], r["mode"]): r for r in records
             if r["op"] == FLOOR_OP and "median_ms" in r}
    for r in records:
        base = floor.get((r["shape_set"], r["shape"], r["mode"]))
        if base is not None and "median_ms" in r:
            r["vs_bilinear"] = round(r["median_ms"] / base["median_ms"], 3)


def summary_table(records: list[dict]) -> str:
    """A plain-text table of the records (one line per case)."""
    head = (f"{'op':<18}{'backend':<10}{'shape':<18}{'mode':<8}{'median ms':>11}{'min':>9}{'max':>9}"
            f"{'x ref':>8}{'peak MB':>9}{'GFLOP/s':>9}{'/bilin':>8}{'%copy':>7}")
    lines = [head, "-" * len(head)]
    for r in records:
        if "skipped" in r:
            lines.append(f"{r['op']:<18}{r['backend']:<10}{r['shape']:<18}{r['mode']:<8}  skipped: "
                         f"{r['skipped']}")
            continue
        mem = r.get("peak_mem_bytes")
        lines.append(
            f"{r['op']:<18}{r['backend']:<10}{r['shape']:<18}{r['mode']:<8}{r['median_ms']:>11.4f}"
            f"{r['min_ms']:>9.4f}{r['max_ms']:>9.4f}"
            f"{(str(r['speedup_vs_reference']) + 'x') if 'speedup_vs_reference' in r else '-':>8}"
            f"{(mem / 2 ** 20 if mem is not None else float('nan')):>9.1f}{r['gflops']:>9.1f}"
            f"{r.get('vs_bilinear', float('nan')):>8.2f}{100 * r.get('frac_copy_bw', float('nan')):>7.1f}")
    return "\n".join(lines)
