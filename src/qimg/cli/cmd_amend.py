"""``qemu-img amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt]
[-t cache] [--force] -o options filename`` (img_amend's checks and order)."""

from __future__ import annotations

import sys

from qimg.block.options import split_options
from qimg.cli import args
from qimg.cli.common import CommonOptions, apply_common, check_cache, open_image
from qimg.errors import QimgError
from qimg.ops import amend as ops_amend
from qimg.ops import create as ops_create
from qimg.ops.progress import Progress


def _has_help(options: str) -> bool:
    return any(k in ("help", "?") and v is None for k, v in split_options(options))


def run(prog: str, argv: list[str]) -> int:
    opts, operands = args.parse(argv, "ho:f:t:pq", ["help", "object=", "image-opts", "force"])
    common = CommonOptions()
    cache = "writeback"
    options: str | None = None
    progress = force = False
    for opt, val in opts:
        if apply_common(opt, val, common):
            continue
        if opt == "-o":
            # accumulate_options refuses a bad list as it is parsed
            if not ops_create.valid_option_list(val):
                raise QimgError(f"Invalid option list: {val}")
            options = val if options is None else f"{options},{val}"
        elif opt == "-t":
            cache = val
        elif opt == "-p":
            progress = True
        elif opt == "--force":
            force = True
    fmt, quiet, use_image_opts = common.fmt, common.quiet, common.image_opts
    if options is None:
        raise QimgError("Must specify options (-o)", hint=True)
    if quiet:
        progress = False
    meter = Progress(progress, 1.0)
    try:
        return _amend(prog, fmt, cache, options, operands, use_image_opts, force, meter)
    except QimgError as e:
        if e.hint:
            raise
        # error_report_err: the lines after the first are hints, printed
        # without the program name
        meter.end()
        meter.enabled = False
        first, _, hints = e.message.partition("\n")
        sys.stderr.write(f"{prog}: {first}\n" + (f"{hints}\n" if hints else "") + e.full_detail())
        return e.code
    finally:
        meter.end()


def _amend(prog: str, fmt: str | None, cache: str, options: str, operands: list[str],
           use_image_opts: bool, force: bool, meter: Progress) -> int:
    if fmt and _has_help(options):
        sys.stdout.write(ops_amend.option_help(fmt))
        return 0
    if len(operands) != 1:
        raise QimgError("Expecting one image file name")
    check_cache(cache)
    img = open_image(operands[0], fmt, read_only=False, use_image_opts=use_image_opts)
    try:
        if _has_help(options):
            sys.stdout.write(ops_amend.option_help(img.format))
            return 0
        try:
            parsed = ops_amend.parse(img, options)
        except ops_amend.AmendOptionsError as e:
            sys.stderr.write(f"{prog}: {e.reason}\n" + (f"{e.hint_line}\n" if e.hint_line else ""))
            return 1
        ops_amend.amend(img, parsed, meter, force)
    finally:
        img.close()
    return 0
