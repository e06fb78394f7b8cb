"""Every environment flag sapa reads, in one place.

SAPA_CACHE_DIR    folder for compiled CPU kernels (default $XDG_CACHE_HOME/sapa, else ~/.cache/sapa;
                  never the install folder). If it cannot be written, kernels compile without a
                  cache in every process (one warning); see ``sapa.ops._common.numba_cache``.
SAPA_BACKEND      force a backend for every op ("reference", "cpu", "triton"); unset = automatic.
SAPA_LOG_LEVEL    log level of the ``sapa`` logger (e.g. DEBUG to see why a backend declined).
SAPA_SLOW         "1" runs the long test sweeps (tests marked ``slow``).
SAPA_CPU_CACHE_MB MiB of freed memory the cpu kernels keep for reuse (default 512; 0 = off); see
                  ``sapa.ops.window.op._HostCache``.
SAPA_TRACEBACK_AFTER  seconds after which the CLI dumps every thread's stack (faulthandler; for hangs).
SAPA_TRACEBACK    "1": the CLI prints the traceback of an expected failure too (bugs always show it).
TRITON_INTERPRET  "1" lets the triton backend run on CPU tensors (slow; how CI checks kernels).
SAPA_TRITON_AUTOTUNE  "0": every triton kernel runs its first config instead of autotuning (the
                  device check's kernel tests: each autotune config costs a compile).
SAPA_DDP_ALWAYS   "1": under torchrun, join a process group and wrap in DDP even with one process
                  (checks the nccl / DDP / SyncBatchNorm path on a single GPU).
"""
from __future__ import annotations

import logging
import os


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def backend_override() -> str | None:
    return _env("SAPA_BACKEND")


def slow_tests() -> bool:
    return _env("SAPA_SLOW", "0") not in ("0", "false", "False")


def cpu_cache_bytes() -> int:
    raw = _env("SAPA_CPU_CACHE_MB", "512")
    try:
        mb = int(raw)
    except ValueError:
        raise ValueError(f"SAPA_CPU_CACHE_MB must be a whole number of MiB (0 turns the cache off), "
                         f"got {raw!r}") from None
    if mb < 0:
        raise ValueError(f"SAPA_CPU_CACHE_MB must be >= 0, got {mb}")
    return mb << 20


def cache_dir() -> str:
    """SAPA_CACHE_DIR, else $XDG_CACHE_HOME/sapa (when absolute), else ~/.cache/sapa."""
    path = _env("SAPA_CACHE_DIR")
    if path is not None:
        path = os.path.expanduser(path)
        if not os.path.isabs(path):
            raise ValueError(f"SAPA_CACHE_DIR must be an absolute path, got {path!r}")
        return path
    xdg = _env("XDG_CACHE_HOME")
    if xdg is not None and os.path.isabs(xdg):  # the XDG spec says to ignore relative values
        return os.path.join(xdg, "sapa")
    return os.path.join(os.path.expanduser("~"), ".cache", "sapa")


def show_traceback() -> bool:
    return _env("SAPA_TRACEBACK", "0") not in ("0", "false", "False")


def triton_interpret() -> bool:
    return _env("TRITON_INTERPRET", "0") not in ("0", "false", "False")


def triton_autotune() -> bool:
    return _env("SAPA_TRITON_AUTOTUNE", "1") not in ("0", "false", "False")


def ddp_always() -> bool:
    return _env("SAPA_DDP_ALWAYS", "0") not in ("0", "false", "False")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def configure_logging() -> logging.Logger:
    logger = logging.getLogger("sapa")
    level = _env("SAPA_LOG_LEVEL")
    if level is not None:
        name = level.strip().upper()
        if name in LOG_LEVELS:
            logger.setLevel(name)
        else:
            # a bad flag must not break ``import sapa``: say so once and keep the default level
            import warnings
            warnings.warn(f"SAPA_LOG_LEVEL={level!r} is not a log level; valid: {', '.join(LOG_LEVELS)}; "
                          f"using the default", RuntimeWarning, stacklevel=2)
    return logger
