"""The ``sapa`` command line. Each module in this folder named ``cmd_<name>.py`` defines
``register(subparsers)`` which adds its sub-command (with ``set_defaults(func=...)``); this file
finds them, so adding a command never touches another command's file."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sapa", description="Feature upsamplers for dense prediction: list, benchmark, compare.")
    parser.add_argument("--version", action="version", version=f"sapa {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def _version() -> str:
    from .. import __version__
    return __version__


def _arm_hang_dump() -> None:
    """``SAPA_TRACEBACK_AFTER=SECONDS``: if the command is still running after that long, print
    every thread's Python stack to stderr (and again every SECONDS); for diagnosing a hung run,
    e.g. one rank of a torchrun job. The command itself goes on."""
    import os
    value = os.environ.get("SAPA_TRACEBACK_AFTER")
    if not value:
        return
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"SAPA_TRACEBACK_AFTER must be a number of seconds, got {value!r}") from None
    if seconds > 0:
        import faulthandler
        faulthandler.dump_traceback_later(seconds, repeat=True, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from .._optional import OptionalDependencyError  # missing/mismatched extras: one line, no traceback

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _arm_hang_dump()
        rc = args.func(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError, OptionalDependencyError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"sapa {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
