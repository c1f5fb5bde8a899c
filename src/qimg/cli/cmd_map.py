"""``qemu-img map [--object objectdef] [--image-opts] [-f fmt]
[--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename``."""

from __future__ import annotations

import sys

from qimg.cli import args
from qimg.cli.common import add_object, open_image
from qimg.errors import QimgError
from qimg.ops import map as ops_map
from qimg.units import cvtnum


def run(prog: str, argv: list[str]) -> int:
    opts, operands = args.parse(
        argv, "f:s:l:hU",
        ["help", "format=", "output=", "object=", "image-opts", "force-share", "start-offset=", "max-length="],
    )
    fmt: str | None = None
    output: str | None = None
    start = 0
    length: int | None = None
    use_image_opts = False
    force_share = False
    for opt, val in opts:
        if opt in ("-h", "--help"):
            from qimg.cli import usage

            sys.stdout.write(usage.help_text(prog))
            return 0
        if opt in ("-f", "--format"):
            fmt = val
        elif opt in ("-s", "--start-offset"):
            start = cvtnum("start offset", val)
        elif opt in ("-l", "--max-length"):
            length = cvtnum("max length", val)
        elif opt == "--output":
            output = val
        elif opt == "--object":
            add_object(val)
        elif opt == "--image-opts":
            use_image_opts = True
        elif opt in ("-U", "--force-share"):
            force_share = True
    if len(operands) != 1:
        raise QimgError("Expecting one image file name", hint=True)
    if output is not None:
        args.output_format(output)
    img = open_image(operands[0], fmt, force_share=force_share, use_image_opts=use_image_opts)
    try:
        ops_map.print_map(img, sys.stdout.write, start, length, output or "human")
    finally:
        img.close()
    return 0
