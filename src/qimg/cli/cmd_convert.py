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


def _snapshot_param(text: str) -> str:
    """-l: ``snapshot.id=ID,snapshot.name=NAME`` or a bare id-or-name."""
    if not text.startswith("snapshot."):
        return text
    from qimg.block.options import split_options

    found: dict[str, str] = {}
    for key, value in split_options(text):
        if key not in ("snapshot.id", "snapshot.name") or value is None:
            if key not in ("snapshot.id", "snapshot.name"):
                raise QimgError(f"Invalid parameter '{key}'\nFailed in parsing snapshot param '{text}'")
            raise QimgError(f"Failed in parsing snapshot param '{text}'")
        found[key] = value
    return found.get("snapshot.name") or found.get("snapshot.id", "")


def _coroutines(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_COROUTINES:
        raise QimgError(f"Invalid number of coroutines. Allowed number of coroutines is between 1 and {MAX_COROUTINES}")
    return n


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
            snapshot = _snapshot_param(val)
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
            _coroutines(val)
        elif opt == "-W":
            pass  # out-of-order writes: ours are always in order
        elif opt == "-r":
            cvtnum("rate limit", val)
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

    def open_target(name: str, fmt_: str | None, **_: object):
        common.check_cache(cache)
        return common.open_image(name, None if tgt_image_opts else fmt_, read_only=False,
                                 use_image_opts=tgt_image_opts)

    from qimg.ops.convert import convert

    meter = Progress(progress, 1.0)
    meter.update(0)
    try:
        convert(
            operands[:-1], operands[-1], src_format=fmt, out_format=out_fmt or "raw", options=options,
            compressed=compressed, sparse_size=sparse_size, backing_file=backing, backing_format=backing_fmt,
            skip_create=skip_create, progress=meter.update if progress else None, snapshot=snapshot,
            target_is_zero=target_is_zero, bitmaps=bitmaps, skip_broken_bitmaps=skip_broken,
            force_share=force_share,
            opener=open_source, target_opener=open_target,
        )
        meter.update(100)
    except QimgError as e:
        # qemu-img reports the error before ending the progress line
        from qimg.cli.main import report

        return report(prog, e)
    finally:
        meter.end()
    return 0
