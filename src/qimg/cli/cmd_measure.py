"""``qemu-img measure [--output=ofmt] [-O output_fmt] [-o options]
[--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param]
filename]`` (img_measure's options, checks and messages)."""

from __future__ import annotations

import getopt
import sys

from qimg.block.image import Image
from qimg.cli import args
from qimg.cli.common import CommonOptions, SnapshotParam, apply_common, open_image, parse_snapshot_param
from qimg.errors import QimgError
from qimg.ops import measure as ops_measure
from qimg.units import cvtnum

SHORT = "hf:O:o:l:U"
LONG = ["help", "object=", "image-opts", "output=", "size=", "force-share"]


def _getopt_message(e: getopt.GetoptError, argv: list[str]) -> str:
    """glibc getopt's own wording."""
    opt = e.opt
    if len(opt) == 1 and not any(a.startswith("--" + opt) for a in argv):
        if "requires argument" in e.msg:
            return f"option requires an argument -- '{opt}'"
        return f"invalid option -- '{opt}'"
    full = next((o.rstrip("=") for o in LONG if o.startswith(opt)), opt)
    if "requires argument" in e.msg:
        return f"option '--{full}' requires an argument"
    if "must not have an argument" in e.msg:
        return f"option '--{full}' doesn't allow an argument"
    return f"unrecognized option '--{opt}'"


def run(prog: str, argv: list[str]) -> int:
    try:
        opts, operands = getopt.gnu_getopt(argv, SHORT, LONG)
    except getopt.GetoptError as e:
        # img_measure's optstring has no leading ':': getopt itself reports
        # the error (named after argv[0], "measure") and help() follows
        from qimg.cli import usage

        sys.stderr.write(f"measure: {_getopt_message(e, argv)}\n")
        sys.stdout.write(usage.help_text(prog))
        return 0
    common = CommonOptions()
    out_fmt = "raw"
    options: str | None = None
    snapshot: SnapshotParam | None = None
    size: int | None = None
    output = "human"
    snapshot_ids: set[str] = set()
    for opt, val in opts:
        if apply_common(opt, val, common):
            continue
        if opt == "-O":
            out_fmt = val
        elif opt == "-o":
            # repeated -o options accumulate, as accumulate_options does
            options = val if options is None else f"{options},{val}"
        elif opt == "-l":
            snapshot = parse_snapshot_param(prog, val, snapshot_ids)
        elif opt == "--size":
            size = cvtnum("image size", val)
        elif opt == "--output":
            output = args.output_format(val)
    fmt, force_share, use_image_opts = common.fmt, common.force_share, common.image_opts
    if len(operands) > 1:
        raise QimgError("At most one filename argument is allowed.")
    filename = operands[0] if operands else None
    if filename is None and (use_image_opts or fmt or snapshot):
        raise QimgError("--image-opts, -f, and -l require a filename argument.")
    if filename is not None and size is not None:
        raise QimgError("--size N cannot be used together with a filename.")
    if filename is None and size is None:
        raise QimgError("Either --size N or one filename must be specified.")
    source: Image | None = None
    if filename is not None:
        source = open_image(filename, fmt, force_share=force_share, use_image_opts=use_image_opts)
    try:
        if source is not None and snapshot is not None:
            _load_snapshot(prog, source, snapshot)
        info = ops_measure.measure(out_fmt, options, size, source)
    except ops_measure.OptionsError as e:
        sys.stderr.write(f"{prog}: {e.reason}\n{prog}: Invalid options for file format '{e.fmt}'\n")
        return 1
    finally:
        if source is not None:
            source.close()
    if output == "json":
        sys.stdout.write(ops_measure.format_json(info))
    else:
        sys.stdout.write(ops_measure.format_human(info))
    return 0


def _load_snapshot(prog: str, img: Image, param: SnapshotParam) -> None:
    """``-l``: read the internal snapshot instead of the active image
    (bdrv_snapshot_load_tmp)."""
    loader = getattr(img.driver, "load_snapshot_tmp", None)
    if loader is None:
        raise QimgError(f"Failed to load snapshot: Block format '{img.format}' used by device '' "
                        "does not support temporarily loading internal snapshots")
    loader(param.snapshot_id, param.name, exact=param.exact)
