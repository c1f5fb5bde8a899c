"""``qemu-img info [--object objectdef] [--image-opts] [-f fmt]
[--output=ofmt] [--backing-chain] [-U] filename``."""

from __future__ import annotations

import sys

from qimg.cli import args
from qimg.cli.common import add_object, image_opts
from qimg.errors import QimgError
from qimg.ops import info as ops_info


def run(prog: str, argv: list[str]) -> int:
    opts, operands = args.parse(
        argv, "f:hU",
        ["help", "format=", "output=", "backing-chain", "object=", "image-opts", "force-share"],
    )
    fmt: str | None = None
    output = "human"
    chain = False
    use_image_opts = False
    for opt, val in opts:
        if opt in ("-h", "--help"):
            from qimg.cli import usage

            sys.stdout.write(usage.help_text(prog))
            return 0
        if opt in ("-f", "--format"):
            fmt = val
        elif opt == "--output":
            output = val
        elif opt == "--backing-chain":
            chain = True
        elif opt == "--object":
            add_object(val)
        elif opt == "--image-opts":
            use_image_opts = True
    if len(operands) != 1:
        raise QimgError("Expecting one image file name", hint=True)
    args.output_format(output)
    name = operands[0]
    filename, open_options = name, None
    if use_image_opts:
        if fmt:
            raise QimgError("--image-opts and --format are mutually exclusive")
        filename, fmt, open_options = image_opts(name)
    data = ops_info.info(filename, fmt, chain, open_options=open_options, display_name=name)
    if output == "json":
        sys.stdout.write(ops_info.json_text(data))
    else:
        sys.stdout.write(ops_info.human_info(data))
    return 0
