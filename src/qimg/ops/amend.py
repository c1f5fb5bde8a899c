"""``amend``: parse ``-o`` against the image format's amend options and let
the driver change the image in place (img_amend, bdrv_amend_options)."""

from __future__ import annotations

from typing import Any

from qimg.block.image import Image
from qimg.block.options import format_help, parse_options
from qimg.errors import QimgError, UnsupportedError
from qimg.formats import get_driver
from qimg.ops.progress import Progress, f32


class AmendOptionsError(QimgError):
    """``-o`` the format rejects; ``hint`` (no program name) follows when
    the option exists for creation only."""

    def __init__(self, reason: str, hint: str | None) -> None:
        super().__init__(reason + (f"\n{hint}" if hint else ""))
        self.reason = reason
        self.hint_line = hint


def option_help(fmt: str) -> str:
    """``-o help``: the format's amendable options (print_amend_option_help)."""
    try:
        drv = get_driver(fmt)
    except QimgError:
        raise QimgError(f"Unknown file format '{fmt}'") from None
    if drv.amend_opts is None:
        raise UnsupportedError(f"Format driver '{fmt}' does not support option amendment")
    return format_help(drv.amend_opts, f"Amend options for '{fmt}':")


def parse(img: Image, text: str) -> dict[str, Any]:
    """Typed amend options; creation-only ones get qemu-img's hint."""
    drv = img.driver
    if drv.amend_opts is None:
        raise UnsupportedError(f"Format driver '{img.format}' does not support option amendment")
    try:
        return parse_options(text, drv.amend_opts)
    except QimgError as e:
        hint = None
        try:
            parse_options(text, drv.amend_opts + [o for o in drv.create_opts
                                                  if o.name not in {a.name for a in drv.amend_opts}])
            hint = "This option is only supported for image creation"
        except QimgError:
            pass
        raise AmendOptionsError(e.message, hint) from None


def amend(img: Image, options: dict[str, Any], meter: Progress, force: bool = False) -> None:
    """Amend ``img`` (open read-write); progress goes to ``meter`` as
    amend_status_cb prints it."""

    def status(offset: int, total: int) -> None:
        meter.update(f32(f32(100.0 * f32(offset)) / f32(total)) if total else 0.0)

    meter.update(0)
    try:
        img.driver.amend(options, status, force)
        img.flush()
    finally:
        # qemu-img prints 100% whether the driver succeeded or not
        meter.update(100)
