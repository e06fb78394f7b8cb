"""The ``sapa`` command line. Each module in this folder named ``cmd_<name>.py`` defines
``register(subparsers)`` which adds its sub-command (with ``set_defaults(func=...)``); this file
finds them, so adding a command never touches another command's file."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


# Exit status of every command: one class of expected failure per code (a bug is 1, with its
# traceback); the first matching class wins, so subclasses come before their bases.
EXIT_CODES = {"bad usage, config or input": 2, "file system (missing file, disk full, permission)": 3,
              "corrupt or mismatched checkpoint": 4, "training diverged (NaN / inf)": 5,
              "run folder in use by another process": 6, "missing optional dependency": 7, "interrupted": 130}


def _exit_code(err: BaseException) -> int | None:
    """The exit code of an expected failure, None for a bug."""
    from ..engine.checkpoint import CheckpointError
    from ..engine.rundir import RunFolderBusy
    if isinstance(err, KeyboardInterrupt):
        return 130
    if isinstance(err, RunFolderBusy):
        return 6
    if isinstance(err, CheckpointError):
        return 4
    if isinstance(err, FloatingPointError):
        return 5
    if isinstance(err, ImportError):
        return 7
    if isinstance(err, OSError):
        return 3
    if isinstance(err, (ValueError, KeyError, TypeError)):
        return 2
    return None


def _epilog() -> str:
    codes = "; ".join(f"{c} {what}" for what, c in EXIT_CODES.items())
    return (f"exit status: 0 success; 1 internal error (a bug: the traceback is shown); {codes}. "
            f"Expected failures print one line 'sapa COMMAND: error: ...'; SAPA_TRACEBACK=1 also prints "
            f"their traceback.")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``sapa`` parser. With ``argv``, only the command named there registers its arguments (its
    ``register`` imports what its choices come from: torch, the bench tables, ...); the others are
    listed with their ``HELP`` line, so ``sapa --help`` imports no torch. Without ``argv``, every
    command registers in full."""
    parser = argparse.ArgumentParser(
        prog="sapa", description="Feature upsamplers for dense prediction: list, benchmark, compare.",
        epilog=_epilog())
    parser.add_argument("--version", action="version", version=f"sapa {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            module = importlib.import_module(f"{__name__}.{info.name}")
            name = info.name[len("cmd_"):]
            if chosen is None or chosen == name:
                module.register(sub)
            else:
                sub.add_parser(name, help=module.HELP, add_help=False)
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
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _arm_hang_dump()
        rc = args.func(args)
    except (Exception, KeyboardInterrupt) as err:
        code = _exit_code(err)
        if code is None:
            raise  # a bug: keep the traceback
        from .. import flags
        if flags.show_traceback():
            import traceback
            traceback.print_exception(err, file=sys.stderr)
        print(f"sapa {args.command}: error: {_message(err)}", file=sys.stderr)
        return code
    return int(rc or 0)


def _message(err: BaseException) -> str:
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    msg = err.args[0] if isinstance(err, KeyError) and err.args else err
    msg = str(msg) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in msg:
        msg = f"{msg}: {err.filename}"
    return " ".join(msg.split())  # one line


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
