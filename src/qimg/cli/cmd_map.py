"""``qemu-img map [--object objectdef] [--image-opts] [-f fmt]
[--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename``."""

from __future__ import annotations

import sys

from qimg.cli import args
from qimg.cli.common import CommonOptions, apply_common, one_image, open_image
from qimg.ops import map as ops_map
from qimg.units import cvtnum


def run(prog: str, argv: list[str]) -> int:
    opts, operands = args.parse(
        argv, "f:s:l:hU",
        ["help", "format=", "output=", "object=", "image-opts", "force-share", "start-offset=", "max-length="],
    )
    common = CommonOptions()
    output: str | None = None
    start = 0
    length: int | None = None
    for opt, val in opts:
        if apply_common(opt, val, common):
            continue
        if opt in ("-s", "--start-offset"):
            start = cvtnum("start offset", val)
        elif opt in ("-l", "--max-length"):
            length = cvtnum("max length", val)
        elif opt == "--output":
            output = val
    name = one_image(operands)
    if output is not None:
        args.output_format(output)
    img = open_image(name, common.fmt, force_share=common.force_share, use_image_opts=common.image_opts)
    try:
        ops_map.print_map(img, sys.stdout.write, start, length, output or "human")
    finally:
        img.close()
    return 0
