"""``qemu-img rebase`` command line (img_rebase's options and messages)."""

from __future__ import annotations

from qimg.cli import args as cli_args
from qimg.cli import common
from qimg.errors import QimgError
from qimg.ops.progress import Progress

SHORT = "hf:F:b:upt:T:qU"
LONG = ["help", "object=", "image-opts", "force-share"]


def run(prog: str, argv: list[str]) -> int:
    opts, operands = cli_args.parse(argv, SHORT, LONG)
    shared = common.CommonOptions()
    backing = backing_fmt = None
    cache, src_cache = "writeback", "writeback"
    unsafe = progress = False
    for opt, val in opts:
        if common.apply_common(opt, val, shared):
            continue
        if opt == "-F":
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
    # -U is accepted and, as in qemu-img 7.2, not used: the image is opened read-write
    fmt, quiet, image_opts = shared.fmt, shared.quiet, shared.image_opts
    if quiet:
        progress = False
    filename = common.one_image(operands)
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
        img = common.open_image(filename, fmt, read_only=False, backing=not unsafe,
                                force_share=False, use_image_opts=image_opts)
        try:
            rebase(img, backing, backing_fmt, unsafe=unsafe, progress=meter.update if progress else None)
        finally:
            img.close()
    except QimgError as e:
        # qemu-img reports the error before ending the progress line
        from qimg.cli.main import report

        return report(prog, e)
    finally:
        meter.end()
    return 0
