"""qemu-img check, format-neutral (qemu-img.c img_check/collect_image_check).

The format driver does the checking (``Driver.check(repair)`` returns a
CheckResult); this module adds what qemu-img adds: the refusal for formats
without checks (exit 63), and after a repair a second, read-only pass whose
report is the one shown, carrying the first pass's "fixed" counters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from qimg.block.check import CheckResult
from qimg.errors import QimgError

if TYPE_CHECKING:
    from qimg.block.image import Image

#: exit status of qemu-img check for a format that cannot be checked
NOT_SUPPORTED = 63
REPAIR_MODES = ("leaks", "all")
#: the open option that tells a driver it is opened for check (BDRV_O_CHECK)
CHECK_OPTION = "check"
#: set too when the check will repair: QEMU opens such an image read-write
#: from the start, which changes what some drivers do on open (parallels
#: ignores its format extension then)
CHECK_REPAIR_OPTION = "check-repair"


def check_image(img: "Image", repair: str | None = None, display_name: str | None = None,
                on_repaired: Callable[[CheckResult], None] | None = None) -> CheckResult:
    """Check an open image (opened writable when ``repair`` is given).

    ``on_repaired`` is called between the repairing pass and the double
    check, where qemu-img prints its "were found and repaired" summary.
    """
    if repair not in (None, *REPAIR_MODES):
        raise QimgError(f"Unknown option value for -r (expecting 'leaks' or 'all'): {repair}")
    driver = img.driver
    if not driver.supports_check:
        raise QimgError("This image format does not support checks", NOT_SUPPORTED)
    result = _collect(img, repair, display_name)
    if result.corruptions_fixed or result.leaks_fixed:
        if on_repaired is not None:
            on_repaired(result)
        again = _collect(img, None, display_name)
        again.corruptions_fixed = result.corruptions_fixed
        again.leaks_fixed = result.leaks_fixed
        result = again
    return result


def _collect(img: "Image", repair: str | None, display_name: str | None) -> CheckResult:
    result = img.driver.check(repair)
    result.filename = display_name or img.filename
    result.format = img.format
    return result


def open_for_check(filename: str, fmt: str | None = None, repair: str | None = None, *,
                   open_options: dict[str, Any] | None = None,
                   display_name: str | None = None) -> "Image":
    """Open as qemu-img check does: read-only unless repairing, with the
    backing chain, and in check mode (QEMU's BDRV_O_CHECK), where a driver
    neither refuses a corrupt image nor repairs a dirty one by itself: the
    check is what repairs it.

    Check mode is asked for with the CHECK_OPTION open option, and also
    ensured by opening read-only and only then giving the driver a writable
    file, before it has cached or written anything.
    """
    from qimg.block.image import open_image
    from qimg.formats import get_driver
    from qimg.protocols.file import File

    name = display_name or filename
    options = dict(open_options or {})
    options[CHECK_OPTION] = True
    if repair is not None:
        options[CHECK_REPAIR_OPTION] = True
    try:
        if repair is not None and fmt is not None and not get_driver(fmt).supports_write:
            raise QimgError(f"Could not open '{filename}': Driver '{fmt}' does not support write access")
        img = open_image(filename, fmt, read_only=True, options=options)
        if repair is not None:
            driver = img.driver
            if not driver.supports_write:
                img.close()
                raise QimgError(f"Could not open '{filename}': Driver '{img.format}' does not support write access")
            try:
                writable = File(driver.file.filename, read_only=False)
            except QimgError:
                img.close()
                raise
            driver.file.close()
            driver.file = writable
            driver.read_only = False
            img.read_only = False
            # QEMU opens a repaired image read-write from the start (its
            # persistent bitmaps, say, are loaded for writing and stored
            # again on close): the driver does what that adds
            reopen = getattr(driver, "reopen_for_repair", None)
            if reopen is not None:
                try:
                    reopen()
                except QimgError:
                    img.close()
                    raise
        return img
    except QimgError as e:
        raise QimgError(f"Could not open '{name}': {e.message}", e.code) from None


def check(filename: str, fmt: str | None = None, repair: str | None = None, *,
          open_options: dict[str, Any] | None = None, display_name: str | None = None,
          on_repaired: Callable[[CheckResult], None] | None = None) -> CheckResult:
    """Check ``filename`` (its format probed when ``fmt`` is None); with
    ``repair`` 'leaks' or 'all' fix what qemu-img check -r fixes.

    Returns the CheckResult; ``result.exit_code`` is qemu-img's status.
    """
    if repair not in (None, *REPAIR_MODES):
        raise QimgError(f"Unknown option value for -r (expecting 'leaks' or 'all'): {repair}")
    img = open_for_check(filename, fmt, repair, open_options=open_options, display_name=display_name)
    try:
        return check_image(img, repair, display_name or filename, on_repaired)
    finally:
        img.close()


def to_dict(result: CheckResult) -> dict[str, Any]:
    """ImageCheck as qemu-img's JSON has it: QAPI field order, optional
    counters only when non-zero."""
    out: dict[str, Any] = {"filename": result.filename, "format": result.format,
                           "check-errors": result.check_errors}
    optional = (
        ("image-end-offset", result.image_end_offset), ("corruptions", result.corruptions),
        ("leaks", result.leaks), ("corruptions-fixed", result.corruptions_fixed),
        ("leaks-fixed", result.leaks_fixed), ("total-clusters", result.total_clusters),
        ("allocated-clusters", result.allocated_clusters),
        ("fragmented-clusters", result.fragmented_clusters),
        ("compressed-clusters", result.compressed_clusters),
    )
    for key, value in optional:
        if value:
            out[key] = value
    return out


def human_text(result: CheckResult) -> str:
    """dump_human_image_check."""
    lines: list[str] = []
    if not (result.corruptions or result.leaks or result.check_errors):
        lines.append("No errors were found on the image.\n")
    else:
        if result.corruptions:
            lines.append(f"\n{result.corruptions} errors were found on the image.\n"
                         "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if result.leaks:
            lines.append(f"\n{result.leaks} leaked clusters were found on the image.\n"
                         "This means waste of disk space, but no harm to data.\n")
        if result.check_errors:
            lines.append(f"\n{result.check_errors} internal errors have occurred during the check.\n")
    total = result.total_clusters or 0
    allocated = result.allocated_clusters or 0
    if total and allocated:
        fragmented = result.fragmented_clusters or 0
        compressed = result.compressed_clusters or 0
        lines.append(f"{allocated}/{total} = {allocated * 100.0 / total:0.2f}% allocated, "
                     f"{fragmented * 100.0 / allocated:0.2f}% fragmented, "
                     f"{compressed * 100.0 / allocated:0.2f}% compressed clusters\n")
    if result.image_end_offset:
        lines.append(f"Image end offset: {result.image_end_offset}\n")
    return "".join(lines)


def repaired_text(result: CheckResult) -> str:
    """What qemu-img prints between the repair and the double check."""
    return ("The following inconsistencies were found and repaired:\n\n"
            f"    {result.leaks_fixed} leaked clusters\n"
            f"    {result.corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now...\n")
