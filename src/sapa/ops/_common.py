"""Small helpers shared by the op folders (private)."""
from __future__ import annotations

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is accumulated in float32; float32/float64 as they are."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def upcast(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(compute_dtype(t.dtype)) for t in tensors]


# ----------------------------------------------------------------------------- numba kernel cache
# Policy (documented in README "Compiled kernels" and sapa.flags): the numba CPU kernels are cached
# under flags.cache_dir() (SAPA_CACHE_DIR, default $XDG_CACHE_HOME/sapa or ~/.cache/sapa), never in
# the install folder (numba's default, site-packages/sapa/ops/*/__pycache__: read-only in many
# installs, where numba then raised "cannot cache function ...: no locator available"). If that
# folder cannot be created and written, the kernels compile in every process without a cache and
# one warning says so. The locator below serves only sapa's own source files; numba's other users
# in the process keep numba's own locators.
import logging as _logging
import os as _os
import threading as _threading

_log = _logging.getLogger("sapa")
_PKG_DIR = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))  # .../sapa
_cache_state: dict = {}  # "root": str | None, set once by numba_cache()
_cache_lock = _threading.Lock()


def _writable_dir(path: str) -> str | None:
    """None when ``path`` can be created and written, else the reason."""
    import tempfile

    try:
        _os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None


def numba_cache() -> bool:
    """Set up the kernel cache once per process; True when the kernels may be cached.

    Called by ``sapa/ops/*/cpu.py`` before their kernels are decorated (``cache=numba_cache()``).
    """
    with _cache_lock:
        if "root" in _cache_state:
            return _cache_state["root"] is not None
        from .. import flags

        root = None
        try:
            base = flags.cache_dir()
        except ValueError as err:  # e.g. a relative SAPA_CACHE_DIR
            why = str(err)
        else:
            if not _os.path.isabs(base):
                why = f"no usable cache folder ({base!r} is not an absolute path: HOME unset?)"
            else:
                why = _writable_dir(_os.path.join(base, "numba"))
                if why is None:
                    root = _os.path.join(base, "numba")
                else:
                    why = f"cache folder {base!r} is not writable ({why})"
        _cache_state["root"] = root
        if root is None:
            _log.warning("sapa: %s; the numba CPU kernels are compiled in every process without a cache "
                         "(set SAPA_CACHE_DIR to a writable folder to keep them)", why)
        else:
            _install_locator(root)
        _install_compile_notice()
        return root is not None


def kernel_cache_dir() -> str | None:
    """The folder the CPU kernels are cached in (None: caching is off in this process)."""
    numba_cache()
    return _cache_state["root"]


def _install_locator(root: str) -> None:
    from numba.core import caching

    base = caching._CacheLocator
    mixin = caching._SourceFileBackedLocatorMixin
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl

    class SapaCacheLocator(mixin, base):
        """Caches functions defined in sapa's own files under ``root`` (same layout as numba's
        NUMBA_CACHE_DIR locator: one folder per source folder, named by its path hash)."""

        def __init__(self, py_func, py_file):
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = _os.path.join(root, self.get_suitable_cache_subpath(py_file))

        def get_cache_path(self):
            return self._cache_path

        @classmethod
        def from_function(cls, py_func, py_file):
            try:
                if _os.path.commonpath([_os.path.abspath(py_file), _PKG_DIR]) != _PKG_DIR:
                    return None
            except ValueError:  # different drives (Windows)
                return None
            return super().from_function(py_func, py_file)

    classes = impl._locator_classes
    if not any(getattr(c, "__name__", "") == "SapaCacheLocator" for c in classes):
        classes.insert(0, SapaCacheLocator)


class _CompileNotice:
    """Logs once per process when a sapa kernel is really compiled (a cache miss), with where the
    result is kept. numba fires its "numba:compile" event only after the cache load failed."""

    done = False

    def on_start(self, event) -> None:
        if self.done:
            return
        disp = event.data.get("dispatcher")
        mod = getattr(getattr(disp, "py_func", None), "__module__", "") or ""
        if not mod.startswith("sapa.ops."):
            return
        self.done = True
        root = _cache_state.get("root")
        where = f"cached in {root}" if root else "not cached"
        _log.warning("sapa: compiling the numba CPU kernels on first use (once per kernel and dtype: "
                     "10 s to a few minutes; %s). `sapa warmup` does it ahead of time.", where)

    def on_end(self, event) -> None:
        pass

    def notify(self, event) -> None:
        if event.is_start:
            self.on_start(event)


def _install_compile_notice() -> None:
    from numba.core import event

    listener = _CompileNotice()
    # numba's Listener ABC only requires on_start/on_end; subclass it when it can be imported
    try:
        cls = type("SapaCompileNotice", (_CompileNotice, event.Listener), {})
        listener = cls()
    except TypeError:  # pragma: no cover - older numba
        pass
    event.register("numba:compile", listener)
