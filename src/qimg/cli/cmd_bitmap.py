"""``qemu-img bitmap`` command line (img_bitmap's options and messages)."""

from __future__ import annotations

from qimg.cli import args as cli_args
from qimg.cli import common
from qimg.errors import QimgError
from qimg.units import cvtnum

SHORT = "b:f:F:g:h"
LONG = ["help", "object=", "image-opts", "add", "remove", "clear", "enable", "disable", "merge=",
        "granularity=", "source-file=", "source-format="]


def run(prog: str, argv: list[str]) -> int:
    opts, operands = cli_args.parse(argv, SHORT, LONG)
    shared = common.CommonOptions()
    src_fmt = src_filename = None
    granularity = 0
    add = merge = False
    actions: list[tuple[str, str | None]] = []
    for opt, val in opts:
        if common.apply_common(opt, val, shared):
            continue
        if opt in ("-b", "--source-file"):
            src_filename = val
        elif opt in ("-F", "--source-format"):
            src_fmt = val
        elif opt in ("-g", "--granularity"):
            granularity = cvtnum("granularity", val)
        elif opt == "--merge":
            actions.append(("merge", val))
            merge = True
        else:
            act = opt[2:]
            actions.append((act, None))
            add = add or act == "add"
    fmt, image_opts = shared.fmt, shared.image_opts
    if not actions:
        raise QimgError("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
    if granularity and not add:
        raise QimgError("granularity only supported with --add")
    if src_fmt and not src_filename:
        raise QimgError("-F only supported with -b")
    if src_filename and not merge:
        raise QimgError("Merge bitmap source file only supported with --merge")
    if len(operands) != 2:
        raise QimgError("Expecting filename and bitmap name")
    filename, name = operands

    from qimg.ops.bitmap import run as run_actions

    img = src = None
    try:
        img = common.open_image(filename, fmt, read_only=False, use_image_opts=image_opts)
        if src_filename:
            src = common.open_image(src_filename, src_fmt, read_only=True)
        run_actions(img, name, actions, granularity, src)
    finally:
        if src is not None:
            src.close()
        if img is not None:
            img.close()
    return 0
