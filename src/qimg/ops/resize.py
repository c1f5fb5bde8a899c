"""``resize``: the new size from an absolute or relative request, qemu-img's
checks in qemu-img's order, then the driver's truncate (img_resize)."""

from __future__ import annotations

from qimg.block.image import Image
from qimg.errors import QimgError, UnsupportedError

PREALLOC_MODES = ("off", "metadata", "falloc", "full")

_SHRINK_MSG = (
    "Use the --shrink option to perform a shrink operation.\n"
    "warning: Shrinking an image will delete all data beyond the shrunken image's end. "
    "Before performing such an operation, make sure there is no important data there."
)


def _int64(value: int) -> int:
    """qemu does this arithmetic in int64_t: wrap as C does."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def new_size(current: int, amount: int, relative: int) -> int:
    """The size img_resize computes: ``amount`` (a uint64 read as int64)
    added to, taken from, or replacing ``current``."""
    n = _int64(amount)
    return _int64(current + n * relative) if relative else n


def resize(img: Image, amount: int, relative: int = 0, prealloc: str = "off", shrink: bool = False) -> int:
    """Resize ``img`` (open read-write); returns the new size."""
    current = img.size
    total = new_size(current, amount, relative)
    if total <= 0:
        raise QimgError("New image size must be positive")
    if total <= current and prealloc != "off":
        raise QimgError("Preallocation can only be used for growing images")
    if total < current and not shrink:
        raise QimgError(_SHRINK_MSG)
    if not img.driver.supports_resize:
        raise UnsupportedError("Image format driver does not support resize")
    img.truncate(total, prealloc, shrink=True)
    img.flush()
    return total
