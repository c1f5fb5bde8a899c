"""``qemu-img create [--object objectdef] [-q] [-f fmt] [-b backing_file
[-F backing_fmt]] [-u] [-o options] filename [size]``."""

from __future__ import annotations

import sys

from qimg.cli import args
from qimg.cli.common import CommonOptions, apply_common
from qimg.errors import QimgError
from qimg.ops import create as ops_create
from qimg.units import cvtnum


def run(prog: str, argv: list[str]) -> int:
    opts, operands = args.parse(argv, "F:b:f:ho:qu", ["help", "object="])
    common = CommonOptions(fmt="raw")
    base_fmt: str | None = None
    base: str | None = None
    options: str | None = None
    unsafe = False
    for opt, val in opts:
        if apply_common(opt, val, common):
            continue
        if opt == "-F":
            base_fmt = val
        elif opt == "-b":
            base = val
        elif opt == "-o":
            if not ops_create.valid_option_list(val):
                raise QimgError(f"Invalid option list: {val}")
            options = val if options is None else f"{options},{val}"
        elif opt == "-u":
            unsafe = True
    fmt, quiet = common.fmt, common.quiet

    filename = operands[0] if operands else None
    if options is not None and ops_create.has_help_option(options):
        sys.stdout.write(ops_create.option_help(fmt, filename))
        return 0
    if filename is None:
        raise QimgError("Expecting image file name", hint=True)
    size = cvtnum("image size", operands[1]) if len(operands) > 1 else None
    if len(operands) > 2:
        raise QimgError(f"Unexpected argument: {operands[2]}", hint=True)

    try:
        ops_create.create(filename, fmt, size, options, base, base_fmt, unsafe=unsafe, quiet=quiet)
    except QimgError as e:
        # error_reportf_err(err, "%s: ", filename): only the first line is a
        # report; the rest is qemu's hint text, printed as it is
        first, _, rest = e.message.partition("\n")
        sys.stderr.write(f"{prog}: {filename}: {first}\n")
        if rest:
            sys.stderr.write(rest + "\n")
        sys.stderr.write(e.full_detail())
        return 1
    return 0
