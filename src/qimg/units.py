"""Sizes as qemu-img reads and prints them."""

from __future__ import annotations

import math
import re

from qimg.errors import QimgError

_SUFFIXES = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([bBkKmMgGtTpPeE]?)\s*$")


def parse_size(text: str, default_suffix: str = "") -> int:
    """Parse ``text`` like qemu_strtosz: 1024-based suffixes, fractions allowed.

    Raises ValueError when the text is not a size; callers turn that into the
    command's own message.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(text)
    number, suffix = m.groups()
    suffix = (suffix or default_suffix).lower()
    mult = 1 << (10 * _SUFFIXES[suffix])
    if "." in number:
        # QEMU allows a fraction only with a suffix and rounds the result down.
        if mult == 1 and number.split(".")[1].strip("0"):
            raise ValueError(text)
        value = int(float(number) * mult)
    else:
        value = int(number) * mult
    if value >= 1 << 64:
        raise ValueError(text)
    return value


def size_to_str(val: int) -> str:
    """qemu's size_to_str(): '16 MiB', '2.46 MiB', '1000 KiB' -> '0.977 MiB'."""
    suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    _, exp = math.frexp(val / (1000.0 / 1024.0))
    i = (exp - 1) // 10 if exp > 0 else 0
    i = max(0, min(i, len(suffixes) - 1))
    return "%0.3g %sB" % (val / (1 << (i * 10)), suffixes[i])


def cvtnum(name: str, text: str) -> int:
    """qemu-img's cvtnum(): a size option with its own error message."""
    try:
        value = parse_size(text)
    except ValueError:
        raise QimgError(f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for") from None
    return value
