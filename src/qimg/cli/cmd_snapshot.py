"""``qemu-img snapshot [--object objectdef] [--image-opts] [-U] [-q]
[-l | -a snapshot | -c snapshot | -d snapshot] filename``.

As in qemu-img 7.2 there is no ``-f``: the format is probed (or given with
``--image-opts``).  Without an action the image is opened read-write and
nothing else happens, as in qemu-img.
"""

from __future__ import annotations

import sys

from qimg.cli import args
from qimg.cli.common import CommonOptions, apply_common, one_image, open_image, warn_probed_raw
from qimg.errors import QimgError


def run(prog: str, argv: list[str]) -> int:
    opts, operands = args.parse(argv, "la:c:d:hqU", ["help", "object=", "image-opts", "force-share"])
    action: str | None = None
    name = ""
    common = CommonOptions()
    for opt, val in opts:
        if apply_common(opt, val, common):
            continue
        if opt in ("-l", "-a", "-c", "-d"):
            if action is not None:
                raise QimgError("Cannot mix '-l', '-a', '-c', '-d'", hint=True)
            action, name = opt, val
    filename = one_image(operands)
    return _run(prog, action, name, filename, common.quiet, common.force_share, common.image_opts)


def _run(prog: str, action: str | None, name: str, filename: str, quiet: bool, force_share: bool,
         use_image_opts: bool) -> int:
    from qimg.ops import snapshot as ops

    if force_share and action != "-l":
        raise QimgError(f"Could not open '{filename}': force-share=on can only be used with read-only images")
    # without an action qemu-img opens the image read-write and does nothing
    img = open_image(filename, None, read_only=action == "-l", force_share=force_share,
                     use_image_opts=use_image_opts)
    try:
        if action == "-l":
            sys.stdout.write(ops.list_text(img))
        elif action == "-c":
            ops.create(img, name)
        elif action == "-a":
            if img.probed and img.format == "raw":
                # qemu-img reopens the file node to fall back to, warning again
                warn_probed_raw(filename)
            ops.apply(img, name)
        elif action == "-d":
            ops.delete(img, name)
    finally:
        img.close()
    return 0
