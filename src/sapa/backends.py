"""Backend table and dispatch.

Every public op in :mod:`sapa.functional` has implementations registered per backend::

    reference   pure PyTorch (unfold / grid_sample), any device, any float dtype: the specification
    cpu         fused Numba kernels for CPU tensors (sapa/ops/<op>/cpu.py, registered in op.py)
    triton      fused Triton kernels for CUDA tensors (sapa/ops/<op>/triton.py, registered in op.py);
                runs on CPU tensors under TRITON_INTERPRET=1 when asked for explicitly

Choice order: the ``backend=`` argument, then :func:`use_backend`, then ``SAPA_BACKEND``, then the
first of ``PRIORITY`` whose ``can_run_<name>(op, *tensors, raise_error=False)`` accepts. Each
``can_run_<name>`` returns False (or raises ``RuntimeError`` with the reason when
``raise_error=True``); a declined backend is logged at DEBUG level on the ``sapa`` logger with why.
An explicitly requested backend that cannot run raises the reason.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
from typing import Callable, Iterator

import torch

from . import flags

logger = flags.configure_logging()

# op name -> folder under sapa/ops
OP_FOLDERS: dict[str, str] = {
    "window_similarity": "window",
    "reassemble": "window",
    "sapa": "window",
    "deform_similarity": "deform",
    "deform_reassemble": "deform",
    "sapa_deform": "deform",
}
# backend name -> module (inside sapa/ops/<folder>/) whose import registers its implementations
_BACKEND_MODULES: dict[str, str] = {"reference": "reference", "cpu": "op", "triton": "op"}
PRIORITY: tuple[str, ...] = ("triton", "cpu", "reference")

_IMPLS: dict[tuple[str, str], Callable] = {}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("sapa_backend", default=None)


def register_impl(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator used by ``sapa/ops/*`` to register ``fn`` as ``backend``'s implementation of ``op``."""
    if op not in OP_FOLDERS:
        raise KeyError(f"unknown op {op!r}; valid ops: {sorted(OP_FOLDERS)}")
    if backend not in _BACKEND_MODULES:
        raise KeyError(f"unknown backend {backend!r}; valid backends: {sorted(_BACKEND_MODULES)}")

    def deco(fn: Callable) -> Callable:
        _IMPLS[(op, backend)] = fn
        return fn

    return deco


def _load(op: str, backend: str) -> Callable | None:
    key = (op, backend)
    if key not in _IMPLS:
        mod = f"sapa.ops.{OP_FOLDERS[op]}.{_BACKEND_MODULES[backend]}"
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)
    return _IMPLS.get(key)


def _decline(reason: str, raise_error: bool) -> bool:
    if raise_error:
        raise RuntimeError(reason)
    return False


def _tensors(tensors) -> list[torch.Tensor]:
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def can_run_reference(op: str, *tensors: object, raise_error: bool = False) -> bool:
    if _load(op, "reference") is None:
        return _decline(f"reference: no implementation of {op}", raise_error)
    return True


def numba_available() -> bool:
    return importlib.util.find_spec("numba") is not None


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def can_run_cpu(op: str, *tensors: object, raise_error: bool = False) -> bool:
    ts = _tensors(tensors)
    bad = [t.device for t in ts if t.device.type != "cpu"]
    if bad:
        return _decline(f"cpu: tensors are on {bad[0]}, the cpu backend needs CPU tensors", raise_error)
    if not numba_available():
        return _decline("cpu: numba is not installed (pip install numba)", raise_error)
    if _load(op, "cpu") is None:
        return _decline(f"cpu: no cpu implementation of {op}", raise_error)
    return True


def can_run_triton(op: str, *tensors: object, raise_error: bool = False) -> bool:
    ts = _tensors(tensors)
    on_cuda = all(t.device.type == "cuda" for t in ts)
    if not on_cuda and not (flags.triton_interpret() and all(t.device.type == "cpu" for t in ts)):
        return _decline("triton: tensors are not on a CUDA device (set TRITON_INTERPRET=1 to run "
                        "the kernels on CPU tensors)", raise_error)
    if not triton_available():
        return _decline("triton: triton is not installed (pip install triton)", raise_error)
    if _load(op, "triton") is None:
        return _decline(f"triton: no triton implementation of {op}", raise_error)
    return True


CAN_RUN: dict[str, Callable[..., bool]] = {
    "reference": can_run_reference,
    "cpu": can_run_cpu,
    "triton": can_run_triton,
}


def list_backends() -> list[str]:
    return list(CAN_RUN)


def _check_name(name: str, what: str) -> str:
    if name not in CAN_RUN:
        raise ValueError(f"{what}: unknown backend {name!r}; valid backends: {sorted(CAN_RUN)}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` for every op inside the ``with`` block (``None`` restores automatic choice)."""
    if name is not None:
        _check_name(name, "use_backend")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def choose_backend(op: str, *tensors: object, backend: str | None = None) -> str:
    """Name of the backend that will run ``op`` on ``tensors``."""
    requested = backend or _forced.get() or flags.backend_override()
    if requested is not None:
        _check_name(requested, "backend")
        CAN_RUN[requested](op, *tensors, raise_error=True)
        return requested
    auto = PRIORITY
    if not any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in tensors):
        auto = tuple(b for b in PRIORITY if b != "triton")  # interpret mode is opt-in only
    for name in auto:
        try:
            CAN_RUN[name](op, *tensors, raise_error=True)
            return name
        except RuntimeError as why:
            logger.debug("sapa: %s declined for %s: %s", name, op, why)
    raise RuntimeError(f"no backend can run {op}")  # unreachable: reference always accepts


def _choose_while_compiling(op: str, device_types: tuple[str, ...], backend: str | None) -> str:
    # torch.compile cannot trace the ContextVar read in choose_backend; the choice depends only on
    # the op, the devices and the settings, so it is made once here and frozen into the graph.
    return choose_backend(op, *[torch.empty(0, device=d) for d in device_types], backend=backend)


def _assume_constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` at import time.

    The public decorator imports torch._dynamo (0.7 s of a 2 s ``import sapa``, most of
    ``sapa --help``) only to set one attribute on ``fn``; when dynamo is already loaded the public
    decorator is used, otherwise the attribute is set directly. tests/test_packaging.py checks that
    the public decorator still marks a function exactly this way, so a torch that changes the
    mechanism fails that test instead of silently breaking ``torch.compile(fullgraph=True)``.
    """
    import sys

    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


_choose_while_compiling = _assume_constant_result(_choose_while_compiling)


def get_impl(op: str, *tensors: object, backend: str | None = None) -> tuple[str, Callable]:
    if torch.compiler.is_compiling():
        devices = tuple(sorted({t.device.type for t in tensors if isinstance(t, torch.Tensor)}))
        name = _choose_while_compiling(op, devices, backend)
    else:
        name = choose_backend(op, *tensors, backend=backend)
    impl = _load(op, name)
    assert impl is not None
    return name, impl
