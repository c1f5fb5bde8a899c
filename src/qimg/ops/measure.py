"""``measure``: what a new image of a format needs, for a size or for a copy
of an existing image (img_measure; the numbers come from the output
format's driver, as bdrv_measure)."""

from __future__ import annotations

from typing import Any

from qimg.block.image import Image
from qimg.block.options import OptionSpec, parse_options
from qimg.errors import QimgError
from qimg.formats import get_driver


class OptionsError(QimgError):
    """``-o`` text the format rejects: qemu-img reports ``reason`` (whose
    continuation lines carry no program name) and then, as its own report,
    "Invalid options for file format 'FMT'"."""

    def __init__(self, reason: str, fmt: str) -> None:
        super().__init__(f"{reason}\nInvalid options for file format '{fmt}'")
        self.reason = reason
        self.fmt = fmt


def _schema(drv_options: list[OptionSpec]) -> list[OptionSpec]:
    """The format's create options followed by the file protocol's, as
    qemu-img appends bdrv_file's create_opts (duplicates dropped)."""
    file_opts = get_driver("raw").create_opts
    names = {o.name for o in drv_options}
    return list(drv_options) + [o for o in file_opts if o.name not in names]


def measure(out_fmt: str, options_text: str | None, size: int | None,
            source: Image | None) -> dict[str, int]:
    """The measure result for output format ``out_fmt`` with ``-o`` text,
    either for ``size`` bytes or for a copy of ``source``."""
    try:
        drv = get_driver(out_fmt)
    except QimgError:
        raise QimgError(f"Unknown file format '{out_fmt}'") from None
    if not drv.supports_create:
        raise QimgError(f"Format driver '{out_fmt}' does not support image creation")
    options: dict[str, Any] = {}
    if options_text:
        try:
            options = parse_options(options_text, _schema(drv.create_opts))
        except QimgError as e:
            raise OptionsError(e.message, out_fmt) from None
    if size is not None:
        options["size"] = size
    return drv.measure(options.get("size"), options, source)


def format_human(info: dict[str, int]) -> str:
    text = f"required size: {info['required']}\nfully allocated size: {info['fully-allocated']}\n"
    if "bitmaps" in info:
        text += f"bitmaps size: {info['bitmaps']}\n"
    return text


def format_json(info: dict[str, int]) -> str:
    """qemu-img's JSON, keys in the order its QDict prints them."""
    keys = [k for k in ("bitmaps", "required", "fully-allocated") if k in info]
    body = ",\n".join(f'    "{k}": {info[k]}' for k in keys)
    return "{\n" + body + "\n}\n"
