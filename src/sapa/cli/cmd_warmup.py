"""``sapa warmup``: compile (or load from the cache) every numba CPU kernel ahead of time, so the
first real call does not wait for it. The kernels are cached under SAPA_CACHE_DIR (see
``sapa.flags``); once warm, a new process loads them in about a second."""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterable

DTYPES = ("float32", "float64")


HELP = 'precompile every CPU kernel (numba) into the kernel cache'  # `sapa --help` lists it without importing the command


def register(sub) -> None:
    p = sub.add_parser("warmup", help=HELP,
                       description=__doc__)
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=DTYPES, metavar="DTYPE",
                   help="kernel dtypes to build: float32 (default; also serves float16/bfloat16) "
                        "and/or float64")
    p.set_defaults(func=run)


def _cases(torch, dtype) -> list[tuple[str, Callable[[], object]]]:
    """Every public op on tiny inputs, forward and backward, through the cpu backend."""
    import sapa.functional as F

    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)

    def fb(fn):
        def go():
            fn().square().sum().backward()
        return go

    B, C, H, W, s, K, P, G = 1, 8, 4, 4, 2, 3, 2, 2
    q, k, v = t(B, C, s * H, s * W), t(B, C, H, W), t(B, C, H, W)
    wk = t(B, K * K, s * H, s * W)
    off = t(B, 2 * G * P, s * H, s * W)
    wp = t(B, G, P, s * H, s * W)
    return [
        ("window_similarity", fb(lambda: F.window_similarity(q, k, K, s, backend="cpu"))),
        ("reassemble", fb(lambda: F.reassemble(wk, v, K, s, backend="cpu"))),
        ("sapa", fb(lambda: F.sapa(q, k, v, K, s, backend="cpu"))),
        ("deform_similarity", fb(lambda: F.deform_similarity(q, k, off, P, G, s, backend="cpu"))),
        ("deform_reassemble", fb(lambda: F.deform_reassemble(wp, v, off, P, G, s, backend="cpu"))),
        ("sapa_deform", fb(lambda: F.sapa_deform(q, k, v, off, P, G, s, backend="cpu"))),
    ]


def kernels() -> dict[str, object]:
    """``{'window.sapa_fwd': dispatcher, ...}``: every top-level (not inlined) CPU kernel."""
    from numba.core.registry import CPUDispatcher

    from ..ops.window.op import cpu_kernels

    out = {}
    for folder in ("window", "deform"):
        mod = cpu_kernels(folder)
        for name, obj in vars(mod).items():
            if isinstance(obj, CPUDispatcher) and obj.py_func.__module__ == mod.__name__ \
                    and obj.targetoptions.get("inline", "never") != "always":
                out[f"{folder}.{name}"] = obj
    return out


def warmup(dtypes: Iterable[str] = ("float32",), report: Callable[[str], None] | None = None) -> dict[str, list]:
    """Run every op once per dtype so that all CPU kernels are compiled or loaded.

    Returns ``{kernel: [signatures]}``. Raises ``RuntimeError`` naming any kernel that ended up
    without a signature for a requested dtype (an op path this function does not exercise).
    """
    import torch

    from ..ops._common import kernel_cache_dir

    dtypes = list(dtypes)
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"warmup: dtypes must be among {list(DTYPES)}, got {bad}")
    report = report or (lambda line: None)
    ks = kernels()
    where = kernel_cache_dir()
    report(f"kernel cache: {where or 'off (no writable folder; kernels are compiled in every process)'}")
    steps = [(d, name, fn) for d in dtypes for name, fn in _cases(torch, getattr(torch, d))]
    for i, (d, name, fn) in enumerate(steps, 1):
        misses = sum(sum(k.stats.cache_misses.values()) for k in ks.values())
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        compiled = sum(sum(k.stats.cache_misses.values()) for k in ks.values()) - misses
        how = f"compiled {compiled} kernel(s)" if compiled else "ready"
        report(f"[{i}/{len(steps)}] {name:<18} {d:<8} {dt:6.1f} s  {how}")
    sigs = {name: [str(sig) for sig in k.signatures] for name, k in ks.items()}
    for d in dtypes:
        missing = [name for name, ss in sigs.items() if not any(d in s for s in ss)]
        if missing:
            raise RuntimeError(f"warmup: no {d} build of {', '.join(sorted(missing))} "
                               "(sapa/cli/cmd_warmup.py does not exercise them)")
    return sigs


def run(args) -> int:
    t0 = time.perf_counter()
    sigs = warmup(args.dtypes, report=lambda line: print(line, flush=True))
    print(f"{len(sigs)} CPU kernels ready for {', '.join(args.dtypes)} in {time.perf_counter() - t0:.1f} s",
          file=sys.stdout)
    return 0
