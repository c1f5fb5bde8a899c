"""``qemu-img resize [--object objectdef] [--image-opts] [-f fmt]
[--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size``.

As img_resize, the last argument is the size and is taken off before option
parsing, so that "-1G" is never read as an option.
"""

from __future__ import annotations

import sys

from qimg.block.options import SIZE, OptionSpec, coerce
from qimg.cli import args
from qimg.cli.common import CommonOptions, apply_common, open_image
from qimg.errors import QimgError
from qimg.ops.resize import PREALLOC_MODES, resize

_SIZE_SPEC = OptionSpec("size", SIZE, "Virtual disk size")


def run(prog: str, argv: list[str]) -> int:
    if len(argv) < 2:
        raise QimgError("Not enough arguments", hint=True)
    size_text = argv[-1]
    opts, operands = args.parse(argv[:-1], "f:hq", ["help", "object=", "image-opts", "preallocation=", "shrink"])
    common = CommonOptions()
    shrink = False
    prealloc = "off"
    for opt, val in opts:
        if apply_common(opt, val, common):
            continue
        if opt == "--preallocation":
            if val not in PREALLOC_MODES:
                raise QimgError(f"Invalid preallocation mode '{val}'")
            prealloc = val
        elif opt == "--shrink":
            shrink = True
    if len(operands) != 1:
        raise QimgError("Expecting image file name and size", hint=True)
    relative = {"+": 1, "-": -1}.get(size_text[:1], 0)
    try:
        amount = coerce(_SIZE_SPEC, size_text[1:] if relative else size_text)
    except QimgError as e:
        # one error_report_err: only its first line carries the program name
        sys.stderr.write(f"{prog}: {e.message}\n")
        return 1
    img = open_image(operands[0], common.fmt, read_only=False, use_image_opts=common.image_opts)
    try:
        resize(img, amount, relative, prealloc, shrink)
    finally:
        img.close()
    if not common.quiet:
        sys.stdout.write("Image resized.\n")
    return 0
