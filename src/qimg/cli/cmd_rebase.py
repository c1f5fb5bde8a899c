"""``qemu-img rebase`` command line (img_rebase's options and messages)."""

from __future__ import annotations

import sys

from qimg.cli import args as cli_args
from qimg.cli import common
from qimg.errors import QimgError
from qimg.ops.progress import Progress

SHORT = "hf:F:b:upt:T:qU"
LONG = ["help", "object=", "image-opts", "force-share"]


def run(prog: str, argv: list[str]) -> int:
    from qimg.cli import usage

    opts, operands = cli_args.parse(argv, SHORT, LONG)
    fmt = backing = backing_fmt = None
    cache, src_cache = "writeback", "writeback"
    unsafe = progress = quiet = image_opts = force_share = False
    for opt, val in opts:
        if opt in ("-h", "--help"):
            sys.stdout.write(usage.help_text(prog))
            return 0
        elif opt == "-f":
            fmt = val
        elif opt == "-F":
            backing_fmt = val
        elif opt == "-b":
            backing = val
        elif opt == "-u":
            unsafe = True
        elif opt == "-p":
            progress = True
        elif opt == "-t":
            cache = val
        elif opt == "-T":
            src_cache = val
        elif opt == "-q":
            quiet = True
        elif opt in ("-U", "--force-share"):
            force_share = True
        elif opt == "--object":
            common.add_object(val)
        elif opt == "--image-opts":
            image_opts = True
    if quiet:
        progress = False
    if len(operands) != 1:
        raise QimgError("Expecting one image file name", hint=True)
    if not unsafe and backing is None:
        raise QimgError("Must specify backing file (-b) or use unsafe mode (-u)", hint=True)

    from qimg.ops.rebase import rebase

    meter = Progress(progress, 2.0)
    meter.update(0)
    try:
        common.check_cache(cache)
        common.check_cache(src_cache, source=True)
        # Unsafe mode does not open the old backing file: it may be the
        # renamed or moved file whose name is being corrected.
        img = common.open_image(operands[0], fmt, read_only=False, backing=not unsafe,
                                force_share=False, use_image_opts=image_opts)
        try:
            rebase(img, backing, backing_fmt, unsafe=unsafe, progress=meter.update if progress else None)
        finally:
            img.close()
    except QimgError as e:
        # qemu-img reports the error before ending the progress line
        from qimg.cli.main import error

        error(prog, e.message)
        return e.code
    finally:
        meter.end()
    return 0
