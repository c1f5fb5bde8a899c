"""``qemu-img convert`` command line: parse the qemu-img way, call
qimg.ops.convert.convert, show progress."""

from __future__ import annotations

import sys

from qimg.cli import args as cli_args
from qimg.cli import common
from qimg.errors import QimgError
from qimg.ops.progress import Progress
from qimg.units import cvtnum

SHORT = "hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:"
LONG = [
    "help", "object=", "image-opts", "force-share", "target-image-opts", "salvage",
    "target-is-zero", "bitmaps", "skip-broken-bitmaps",
]
MAX_COROUTINES = 16


def _strtoul(text: str) -> int | None:
    """C strtoul with base 0 over the whole text (qemu_strtoul): leading
    blanks and a sign, 0x for hex, a leading 0 for octal; None if invalid.
    A negative number wraps around, as unsigned long does."""
    body = text.lstrip(" \t\n\r\f\v")
    sign = 1
    if body[:1] in "+-" and body:
        sign = -1 if body[0] == "-" else 1
        body = body[1:]
    base = 10
    if body[:2].lower() == "0x" and len(body) > 2:
        base, body = 16, body[2:]
    elif body[:1] == "0" and len(body) > 1:
        base, body = 8, body[1:]
    if not body or not all(c in "0123456789abcdefABCDEF"[:base if base <= 10 else 22] for c in body):
        return None
    value = int(body, base)
    if value >= 1 << 64:
        return None
    return value if sign > 0 else (-value) % (1 << 64)


def _coroutines(text: str) -> int:
    n = _strtoul(text)
    if n is None or not 1 <= n <= MAX_COROUTINES:
        raise QimgError(f"Invalid number of coroutines. Allowed number of coroutines is between 1 and {MAX_COROUTINES}")
    return n


def _warner(prog: str):
    def warn(line: str) -> None:
        sys.stdout.flush()
        sys.stderr.write(f"{prog}: warning: {line}\n")
        sys.stderr.flush()

    return warn


def run(prog: str, argv: list[str]) -> int:
    from qimg.ops.create import has_help_option, option_help, valid_option_list

    opts, operands = cli_args.parse(argv, SHORT, LONG)
    shared = common.CommonOptions()
    out_fmt = backing = backing_fmt = options = snapshot = None
    cache, src_cache = "unsafe", "writeback"
    compressed = copy_range = progress = skip_create = False
    tgt_image_opts = target_is_zero = bitmaps = skip_broken = salvage = False
    sparse_size = 4096
    explicit_sparse = False
    coroutines, rate_limit = 8, 0
    snapshot_ids: set[str] = set()
    for opt, val in opts:
        if common.apply_common(opt, val, shared):
            continue
        if opt == "-O":
            out_fmt = val
        elif opt == "-B":
            backing = val
        elif opt == "-C":
            copy_range = True
        elif opt == "-c":
            compressed = True
        elif opt == "-F":
            backing_fmt = val
        elif opt == "-o":
            if not valid_option_list(val):
                raise QimgError(f"Invalid option list: {val}")
            options = val if options is None else f"{options},{val}"
        elif opt == "-l":
            sn = common.parse_snapshot_param(prog, val, snapshot_ids)
            snapshot = (sn.snapshot_id, sn.name, sn.exact)
        elif opt == "-S":
            sparse_size = cvtnum("buffer size for sparse output", val)
            from qimg.ops.convert import check_sparse_size

            check_sparse_size(sparse_size)
            explicit_sparse = True
        elif opt == "-p":
            progress = True
        elif opt == "-t":
            cache = val
        elif opt == "-T":
            src_cache = val
        elif opt == "-n":
            skip_create = True
        elif opt == "-m":
            coroutines = _coroutines(val)
        elif opt == "-W":
            # out-of-order writes allowed: our writes go in guest order all
            # the same (a raw target's workers write as they finish)
            pass
        elif opt == "-r":
            rate_limit = cvtnum("rate limit", val)
        elif opt == "--salvage":
            salvage = True
        elif opt == "--target-image-opts":
            tgt_image_opts = True
        elif opt == "--target-is-zero":
            target_is_zero = True
        elif opt == "--bitmaps":
            bitmaps = True
        elif opt == "--skip-broken-bitmaps":
            skip_broken = True
    fmt, quiet, force_share, image_opts = shared.fmt, shared.quiet, shared.force_share, shared.image_opts

    # -O with --target-image-opts is refused when the target is opened
    given_out_fmt = out_fmt
    if out_fmt is None and not tgt_image_opts:
        out_fmt = "raw"
    if skip_broken and not bitmaps:
        raise QimgError("Use of --skip-broken-bitmaps requires --bitmaps")
    if compressed and copy_range:
        raise QimgError("Cannot enable copy offloading when -c is used")
    if explicit_sparse and copy_range:
        raise QimgError("Cannot enable copy offloading when -S is used")
    if copy_range and salvage:
        raise QimgError("Cannot use copy offloading in salvaging mode")
    if tgt_image_opts and not skip_create:
        raise QimgError("--target-image-opts requires use of -n flag")
    if skip_create and options:
        raise QimgError("-o has no effect when skipping image creation")
    if target_is_zero and not skip_create:
        raise QimgError("--target-is-zero requires use of -n flag")
    out_filename = operands[-1] if operands else None
    if options and has_help_option(options):
        if not out_fmt:
            raise QimgError("Option help requires a format be specified")
        sys.stdout.write(option_help(out_fmt, out_filename))
        return 0
    if len(operands) < 2:
        raise QimgError("Must specify image file name")
    common.check_cache(src_cache, source=True)
    if quiet:
        progress = False

    def open_source(name: str, fmt_: str | None, **_: object):
        return common.open_image(name, fmt_, read_only=True, force_share=force_share, use_image_opts=image_opts)

    def open_target(name: str, fmt_: str | None, options: dict | None = None, **_: object):
        common.check_cache(cache)
        return common.open_image(name, given_out_fmt if tgt_image_opts else fmt_, read_only=False,
                                 use_image_opts=tgt_image_opts, open_options=options)

    from qimg.ops.convert import UnreportedError, convert

    meter = Progress(progress, 1.0)
    meter.update(0)
    try:
        convert(
            operands[:-1], operands[-1], src_format=fmt, out_format=out_fmt or "raw", options=options,
            compressed=compressed, sparse_size=sparse_size, backing_file=backing, backing_format=backing_fmt,
            skip_create=skip_create, progress=meter.update if progress else None, snapshot=snapshot,
            target_is_zero=target_is_zero, bitmaps=bitmaps, skip_broken_bitmaps=skip_broken,
            force_share=force_share, copy_range=copy_range, salvage=salvage, rate_limit=rate_limit,
            coroutines=coroutines, warn=None if quiet else _warner(prog),
            opener=open_source, target_opener=open_target,
        )
        meter.update(100)
    except UnreportedError:
        return 1
    except QimgError as e:
        # qemu-img reports the error before ending the progress line
        from qimg.cli.main import report

        code = report(prog, e)
        if code == 0:
            # an error that leaves qemu-img's ret at 0 still ends at 100%
            meter.update(100)
        return code
    finally:
        meter.end()
    return 0
