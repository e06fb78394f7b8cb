"""Optional dependencies: one clear error naming the extra to install and the tested versions.

Used where sapa imports torchvision, timm, transformers, pycocotools or matplotlib::

    with optional_import("timm", "UPerNet's ResNet encoder"):
        import timm

A missing package, or a torchvision built for another torch (``RuntimeError: operator
torchvision::nms does not exist``, raised while importing torchvision, timm or transformers),
becomes one :class:`OptionalDependencyError` (an ``ImportError``) instead of a long traceback.
Imports nothing heavy itself (the CLI imports it to catch the error).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

#: the versions tests run with (constraints.txt pins them; tests/test_packaging.py checks they agree)
TESTED: dict[str, str] = {
    "torch": "2.13.0",
    "torchvision": "0.28.0",
    "timm": "1.0.31",
    "transformers": "5.24.0",
    "pycocotools": "2.0.11",
    "matplotlib": "3.11.2",
}
#: package -> the extra of sapa that installs it
EXTRA: dict[str, str] = {
    "torchvision": "models",
    "timm": "models",
    "transformers": "models",
    "pycocotools": "train",
    "matplotlib": "train",
}


class OptionalDependencyError(ImportError):
    """An optional dependency is missing or does not match the installed torch."""


def _installed(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _mismatch_message(what: str) -> str:
    torch_v, tv_v = _installed("torch"), _installed("torchvision")
    return (f"{what} needs torchvision, but the installed torchvision {tv_v} was built for another torch "
            f"than the installed torch {torch_v} (torchvision's compiled operators do not load). Install a "
            f"matching pair, e.g. the tested torch=={TESTED['torch']} with torchvision=={TESTED['torchvision']}: "
            f"pip install -c constraints.txt torch torchvision (with a CPU-only torch, take torchvision "
            f"from the same package index as that torch).")


def missing_message(package: str, what: str, detail: str = "") -> str:
    extra = EXTRA.get(package, "models")
    tested = ", ".join(f"{p}=={v}" for p, v in TESTED.items() if EXTRA.get(p) == extra)
    have = _installed(package)
    state = "which is not installed" if have is None else f"but the installed {package} {have} does not work ({detail})"
    return (f"{what} needs {package}, {state}: pip install 'sapa[{extra}]' "
            f"(tested versions: {tested}; pip install -c constraints.txt 'sapa[{extra}]' pins them)")


@contextlib.contextmanager
def optional_import(package: str, what: str) -> Iterator[None]:
    """Turn a failed import of ``package`` (inside the block) into :class:`OptionalDependencyError`."""
    try:
        yield
    except OptionalDependencyError:
        raise
    except ImportError as err:
        root = (getattr(err, "name", None) or "").split(".")[0]
        if "torchvision::" in str(err):
            raise OptionalDependencyError(_mismatch_message(what)) from None
        if root and root != package and root in EXTRA:  # e.g. timm importing a missing torchvision
            raise OptionalDependencyError(missing_message(root, what, str(err))) from None
        if root in ("", package):
            raise OptionalDependencyError(missing_message(package, what, str(err))) from None
        raise
    except RuntimeError as err:
        if "torchvision::" in str(err):
            raise OptionalDependencyError(_mismatch_message(what)) from None
        raise
