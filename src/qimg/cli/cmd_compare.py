"""``qemu-img compare`` command line: parse, call qimg.ops.compare, print."""

from __future__ import annotations

import sys

from qimg.cli import args as cli_args
from qimg.cli import common
from qimg.errors import QimgError
from qimg.ops.progress import Progress

SHORT = "hf:F:T:pqsU"
LONG = ["help", "object=", "image-opts", "force-share"]


def run(prog: str, argv: list[str]) -> int:
    opts, operands = cli_args.parse(argv, SHORT, LONG)
    shared = common.CommonOptions()
    fmt2 = None
    cache = "writeback"
    progress = strict = False
    for opt, val in opts:
        if common.apply_common(opt, val, shared):
            continue
        if opt == "-F":
            fmt2 = val
        elif opt == "-T":
            cache = val
        elif opt == "-p":
            progress = True
        elif opt == "-s":
            strict = True
    fmt1, quiet, force_share, image_opts = shared.fmt, shared.quiet, shared.force_share, shared.image_opts
    if quiet:
        progress = False
    if len(operands) != 2:
        raise QimgError("Expecting two image file names", hint=True)
    name1, name2 = operands

    from qimg.ops.compare import OPEN_ERROR, compare_images

    meter = Progress(progress, 2.0)
    imgs = []
    try:
        try:
            common.check_cache(cache, source=True)
        except QimgError as e:
            raise QimgError(e.message, OPEN_ERROR) from None
        for name, fmt in ((name1, fmt1), (name2, fmt2)):
            try:
                imgs.append(common.open_image(name, fmt, force_share=force_share, use_image_opts=image_opts))
            except QimgError as e:
                raise QimgError(e.message, OPEN_ERROR) from None
        meter.update(0)
        result = compare_images(imgs[0], imgs[1], name1=name1, name2=name2, strict=strict,
                                progress=meter.update, warn=None if quiet else _say)
        if not quiet:
            sys.stdout.write(result.message + "\n")
        return result.code
    except QimgError as e:
        # qemu-img reports the error before ending the progress line
        from qimg.cli.main import report

        return report(prog, e)
    finally:
        for img in imgs:
            img.close()
        meter.end()


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
