"""Entry point: dispatch ``qimg COMMAND ...`` to qimg.cli.<command>.

Each command module exposes ``run(prog: str, argv: list[str]) -> int``.  Every
QimgError becomes one line ``PROG: message`` and its exit code; any other
exception is a bug, but still never reaches the user as a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

from qimg.errors import QimgError

COMMANDS = (
    "amend", "bench", "bitmap", "check", "commit", "compare", "convert", "create",
    "dd", "info", "map", "measure", "snapshot", "rebase", "resize",
)


def prog_name() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "qimg"
    if name in ("__main__.py", "-m", "-c", ""):
        return "qimg"
    return name


def error(prog: str, message: str, hint: bool = False, detail: str = "") -> None:
    """Print an error as error_report does; each line of ``message`` is one
    report (qemu-img prints multi-line errors as several reports), then
    ``detail`` as it is (qemu's hint text carries no program name)."""
    for line in message.split("\n"):
        sys.stderr.write(f"{prog}: {line}\n")
    sys.stderr.write(detail)
    if hint:
        sys.stderr.write(f"Try '{prog} --help' for more information\n")


def report(prog: str, e: QimgError) -> int:
    """Print a QimgError the one way every command does; return its code."""
    error(prog, e.message, e.hint, e.full_detail())
    return e.code


def main(argv: list[str] | None = None) -> int:
    prog = prog_name()
    args = sys.argv[1:] if argv is None else argv
    try:
        return _dispatch(prog, args)
    except QimgError as e:
        return report(prog, e)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # a bug: say what, not where
        error(prog, f"internal error: {type(e).__name__}: {e}")
        return 1
    finally:
        try:
            sys.stdout.flush()
        except Exception:
            pass


def _dispatch(prog: str, args: list[str]) -> int:
    from qimg.cli import usage
    from qimg.cli.common import HelpRequested

    if not args:
        raise QimgError("Not enough arguments", hint=True)
    cmd = args[0]
    if cmd in ("-h", "--help"):
        sys.stdout.write(usage.help_text(prog))
        return 0
    if cmd in ("-V", "--version"):
        sys.stdout.write(usage.version_text(prog))
        return 0
    if cmd not in COMMANDS:
        raise QimgError(f"Command not found: {cmd}", hint=True)
    try:
        mod = importlib.import_module(f"qimg.cli.cmd_{cmd}")
    except ModuleNotFoundError as e:
        if e.name == f"qimg.cli.cmd_{cmd}":
            raise QimgError(f"Command not supported yet: {cmd}") from None
        raise
    try:
        return mod.run(prog, args[1:])
    except HelpRequested:
        sys.stdout.write(usage.help_text(prog))
        return 0
