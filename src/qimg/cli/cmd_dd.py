"""``qemu-img dd`` command line: getopt options (-f, -O, -U, --image-opts,
--object), then dd(1)-style ``name=value`` operands, read in order, the
last of each name winning; see qimg.ops.dd for the copy."""

from __future__ import annotations

from qimg.cli import args as cli_args
from qimg.cli import common
from qimg.errors import QimgError
from qimg.units import cvtnum

SHORT = "hf:O:U"
LONG = ["help", "object=", "image-opts", "force-share"]
OPERANDS = ("bs", "count", "if", "of", "skip")


def _operands(operands: list[str]) -> tuple[dict[str, str], dict[str, int]]:
    """The operands as img_dd reads them: split at the first '=', each
    value checked as soon as it is seen.  Returns (file names, numbers)."""
    from qimg.ops.dd import MAX_BS

    names: dict[str, str] = {}
    numbers: dict[str, int] = {}
    for arg in operands:
        name, eq, value = arg.partition("=")
        if not eq:
            raise QimgError(f"unrecognized operand {arg}")
        if name not in OPERANDS:
            raise QimgError(f"unrecognized operand {name}")
        if name == "bs":
            numbers[name] = cvtnum("bs", value, 1, MAX_BS)
        elif name in ("count", "skip"):
            numbers[name] = cvtnum(name, value)
        else:
            names[name] = value
    return names, numbers


def run(prog: str, argv: list[str]) -> int:
    opts, operands = cli_args.parse(argv, SHORT, LONG)
    shared = common.CommonOptions()
    out_fmt = "raw"
    for opt, val in opts:
        if common.apply_common(opt, val, shared):
            continue
        if opt == "-O":
            out_fmt = val
    names, numbers = _operands(operands)
    if "if" not in names or "of" not in names:
        raise QimgError("Must specify both input and output files")

    def open_input(name: str, fmt: str | None, **_: object):
        return common.open_image(name, fmt, read_only=True, force_share=shared.force_share,
                                 use_image_opts=shared.image_opts)

    def warn(message: str) -> None:
        from qimg.cli.main import error

        error(prog, message)

    from qimg.ops.dd import dd

    dd(
        names["if"], names["of"], fmt=shared.fmt, out_format=out_fmt, bs=numbers.get("bs", 512),
        count=numbers.get("count"), skip=numbers.get("skip"), force_share=shared.force_share,
        opener=open_input, warn=warn,
    )
    return 0
