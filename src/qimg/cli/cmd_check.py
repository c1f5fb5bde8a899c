"""``qemu-img check [--object objectdef] [--image-opts] [-q] [-f fmt]
[--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename``.

Exit status as qemu-img's: 0 clean, 1 check not completed, 2 corruptions,
3 leaks only, 63 the format cannot be checked.
"""

from __future__ import annotations

import sys

from qimg.cli import args
from qimg.cli.common import CommonOptions, apply_common, check_cache, image_opts, one_image, warn_probed_raw
from qimg.errors import QimgError
from qimg.ops import check as ops_check


def run(prog: str, argv: list[str]) -> int:
    opts, operands = args.parse(
        argv, "hf:r:T:qU",
        ["help", "format=", "repair=", "output=", "object=", "image-opts", "force-share"],
    )
    common = CommonOptions()
    repair: str | None = None
    output: str | None = None
    cache = "writeback"
    for opt, val in opts:
        if apply_common(opt, val, common):
            continue
        if opt in ("-r", "--repair"):
            if val not in ops_check.REPAIR_MODES:
                raise QimgError(f"Unknown option value for -r (expecting 'leaks' or 'all'): {val}", hint=True)
            repair = val
        elif opt == "--output":
            output = val
        elif opt == "-T":
            cache = val
    name = one_image(operands)
    fmt, quiet = common.fmt, common.quiet
    if output is not None:
        args.output_format(output)
    check_cache(cache, source=True)
    if common.force_share and repair is not None:
        raise QimgError(f"Could not open '{name}': force-share=on can only be used with read-only images")
    filename, open_options = name, None
    if common.image_opts:
        if fmt:
            raise QimgError("--image-opts and --format are mutually exclusive")
        filename, fmt, open_options = image_opts(name)
    img = ops_check.open_for_check(filename, fmt, repair, open_options=open_options, display_name=name)
    if img.probed and img.format == "raw" and repair is not None:
        warn_probed_raw(filename)
    out = sys.stdout
    try:
        def repaired(result: ops_check.CheckResult) -> None:
            if output != "json" and not quiet:
                out.write(ops_check.repaired_text(result))
                out.flush()

        result = ops_check.check_image(img, repair, name, repaired)
    finally:
        img.close()
    if not quiet:
        if output == "json":
            from qimg.ops.info import json_text

            out.write(json_text(ops_check.to_dict(result)))
        else:
            out.write(ops_check.human_text(result))
    if result.check_errors:
        out.flush()
        raise QimgError("Check failed")
    return result.exit_code
