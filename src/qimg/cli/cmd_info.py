"""``qemu-img info [--object objectdef] [--image-opts] [-f fmt]
[--output=ofmt] [--backing-chain] [-U] filename``."""

from __future__ import annotations

import sys

from qimg.cli import args
from qimg.cli.common import CommonOptions, apply_common, image_opts, one_image
from qimg.errors import QimgError
from qimg.ops import info as ops_info


def run(prog: str, argv: list[str]) -> int:
    opts, operands = args.parse(
        argv, "f:hU",
        ["help", "format=", "output=", "backing-chain", "object=", "image-opts", "force-share"],
    )
    common = CommonOptions()
    output = "human"
    chain = False
    for opt, val in opts:
        if apply_common(opt, val, common):
            continue
        if opt == "--output":
            output = val
        elif opt == "--backing-chain":
            chain = True
    name = one_image(operands)
    args.output_format(output)
    fmt = common.fmt
    filename, open_options = name, None
    if common.image_opts:
        if fmt:
            raise QimgError("--image-opts and --format are mutually exclusive")
        filename, fmt, open_options = image_opts(name)
    data = ops_info.info(filename, fmt, chain, open_options=open_options, display_name=name)
    if output == "json":
        sys.stdout.write(ops_info.json_text(data))
    else:
        sys.stdout.write(ops_info.human_info(data))
    return 0
