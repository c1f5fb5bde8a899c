"""qemu-img's option grammar: getopt_long with permutation and its own messages.

Options may follow file names, ``--`` ends options, long options may be
abbreviated to a unique prefix.  Errors read as qemu-img's (``unrecognized
option '-x'``, ``missing argument for option '-O'``) followed by the
``Try 'PROG --help'`` hint.
"""

from __future__ import annotations

import getopt

from qimg.errors import QimgError


def parse(argv: list[str], shortopts: str, longopts: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Return (options, operands) like getopt.gnu_getopt, with qemu-img's errors.

    ``shortopts`` and ``longopts`` use getopt's notation ("f:hq", ["output="]).
    ``-h``/``--help`` handling is the caller's.
    """
    try:
        return getopt.gnu_getopt(argv, shortopts, longopts)
    except getopt.GetoptError as e:
        raise QimgError(_message(e, argv, longopts), hint=True) from None


def _message(e: getopt.GetoptError, argv: list[str], longopts: list[str]) -> str:
    opt = e.opt
    if "requires argument" in e.msg:
        return f"missing argument for option '{'-' + opt if len(opt) == 1 else '--' + _full_long(opt, longopts)}'"
    if len(opt) == 1 and not any(a == "--" + opt or a.startswith("--" + opt + "=") for a in argv):
        return f"unrecognized option '-{opt}'"
    # qemu-img's optstring starts with ':', so getopt stays silent (also
    # for an ambiguous prefix, or a value given to a flag) and qemu-img
    # names the whole argument, '=value' included
    whole = next((a for a in argv if a == "--" + opt or a.startswith("--" + opt + "=")), None)
    if whole is None:
        # an abbreviation given a value (getopt names the option in full)
        whole = next((a for a in argv if a.startswith("--") and "=" in a
                      and len(a.partition("=")[0]) > 2 and opt.startswith(a.partition("=")[0][2:])), "--" + opt)
    return f"unrecognized option '{whole}'"


def _full_long(opt: str, longopts: list[str]) -> str:
    for lo in longopts:
        name = lo.rstrip("=")
        if name.startswith(opt):
            return name
    return opt


def output_format(value: str) -> str:
    """Validate ``--output``: 'human' or 'json'."""
    if value not in ("human", "json"):
        raise QimgError("--output must be used with human or json as argument.")
    return value
