"""``qemu-img commit`` command line (img_commit's options and messages)."""

from __future__ import annotations

import sys

from qimg.cli import args as cli_args
from qimg.cli import common
from qimg.errors import QimgError
from qimg.ops.progress import Progress
from qimg.units import cvtnum

SHORT = "f:ht:b:dpqr:"
LONG = ["help", "object=", "image-opts"]


def run(prog: str, argv: list[str]) -> int:
    opts, operands = cli_args.parse(argv, SHORT, LONG)
    shared = common.CommonOptions()
    base = None
    cache = "writeback"
    drop = progress = False
    for opt, val in opts:
        if common.apply_common(opt, val, shared):
            continue
        if opt == "-t":
            cache = val
        elif opt == "-b":
            base = val
            drop = True  # -b implies -d
        elif opt == "-d":
            drop = True
        elif opt == "-p":
            progress = True
        elif opt == "-r":
            cvtnum("rate limit", val)
    fmt, quiet, image_opts = shared.fmt, shared.quiet, shared.image_opts
    if quiet:
        progress = False
    filename = common.one_image(operands)
    common.check_cache(cache)

    from qimg.ops.commit import commit, find_base, reopen_writable

    img = common.open_image(filename, fmt, read_only=False, use_image_opts=image_opts)
    try:
        meter = Progress(progress, 1.0)
        meter.update(0)
        failure: QimgError | None = None
        try:
            target = reopen_writable(img, find_base(img, base, filename))
            commit(img, target, drop=drop, progress=meter.update if progress else None)
            meter.update(100)
        except QimgError as e:
            failure = e
        meter.end()
        if failure is not None:
            raise failure
    finally:
        img.close()
    if not quiet:
        sys.stdout.write("Image committed.\n")
    return 0
