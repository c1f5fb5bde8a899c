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
    from qimg.cli import usage

    opts, operands = cli_args.parse(argv, SHORT, LONG)
    fmt1 = fmt2 = None
    cache = "writeback"
    progress = quiet = strict = image_opts = force_share = False
    for opt, val in opts:
        if opt in ("-h", "--help"):
            sys.stdout.write(usage.help_text(prog))
            return 0
        elif opt == "-f":
            fmt1 = val
        elif opt == "-F":
            fmt2 = val
        elif opt == "-T":
            cache = val
        elif opt == "-p":
            progress = True
        elif opt == "-q":
            quiet = True
        elif opt == "-s":
            strict = True
        elif opt in ("-U", "--force-share"):
            force_share = True
        elif opt == "--object":
            common.add_object(val)
        elif opt == "--image-opts":
            image_opts = True
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
        from qimg.cli.main import error

        error(prog, e.message, e.hint)
        return e.code
    finally:
        for img in imgs:
            img.close()
        meter.end()


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
