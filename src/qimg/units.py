"""Sizes as qemu-img reads and prints them."""

from __future__ import annotations

import math
import re

from qimg.errors import QimgError

_SUFFIXES = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_INT_RE = re.compile(r"\s*([+-]?)(\d+)")
_FRAC_RE = re.compile(r"\.(\d*)")


class SizeRangeError(ValueError):
    """A well-formed size that does not fit in 64 bits (qemu: -ERANGE)."""


def parse_size(text: str, default_suffix: str = "") -> int:
    """Parse ``text`` exactly like qemu_strtosz (util/cutils.c do_strtosz).

    Decimal integer part (leading blanks and '+' allowed, no '-'), ``0x`` hex
    without fraction, an optional fraction that needs a suffix (kept as
    64-bit fixed point from a double and rounded half up, as qemu does), one
    1024-based suffix letter, nothing after it.  Raises ValueError when the
    text is not a size and SizeRangeError (a ValueError) when it overflows 64
    bits; callers turn those into their own messages.  (qemu's deprecation
    warning for a suffix on a hex number is not printed.)
    """
    m = _INT_RE.match(text)
    if not m or m.group(1) == "-":
        raise ValueError(text)
    val = int(m.group(2))
    if val >= 1 << 64:
        raise SizeRangeError(text)
    rest = text[m.end():]
    valf = 0
    if val == 0 and m.group(2) == "0" and rest[:1] in ("x", "X"):
        hm = re.match(r"[xX]([0-9a-fA-F]+)", rest)
        if not hm:
            raise ValueError(text)
        val = int(hm.group(1), 16)
        if val >= 1 << 64:
            raise SizeRangeError(text)
        rest = rest[hm.end():]
        if rest[:1] == ".":
            raise ValueError(text)
    elif rest[:1] == ".":
        fm = _FRAC_RE.match(rest)
        assert fm is not None
        tail = rest[fm.end():]
        if tail[:1] in ("e", "E") and re.match(r"[eE][+-]?\d", tail):
            raise ValueError(text)  # an exponent makes the whole input invalid
        if fm.group(1):
            valf = min(int(float("0." + fm.group(1)) * 2.0 ** 64), (1 << 64) - 1)
        rest = tail
    suffix = rest[:1].lower()
    if suffix and suffix in _SUFFIXES:
        rest = rest[1:]
    else:
        suffix = default_suffix.lower() or "b"
    if rest:
        raise ValueError(text)
    mult = 1 << (10 * _SUFFIXES[suffix])
    if mult == 1:
        if valf:
            raise ValueError(text)
        return val
    # 64.64 fixed point times the multiplier, rounding 0.5 up
    fmul = valf * mult
    value = val * mult + (fmul >> 64) + ((fmul >> 63) & 1)
    if value >= 1 << 64:
        raise SizeRangeError(text)
    return value


def size_to_str(val: int) -> str:
    """qemu's size_to_str(): '16 MiB', '2.46 MiB', '1000 KiB' -> '0.977 MiB'."""
    suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    _, exp = math.frexp(val / (1000.0 / 1024.0))
    i = (exp - 1) // 10 if exp > 0 else 0
    i = max(0, min(i, len(suffixes) - 1))
    return "%0.3g %sB" % (val / (1 << (i * 10)), suffixes[i])


def cvtnum(name: str, text: str, min_value: int = 0, max_value: int = (1 << 63) - 1) -> int:
    """qemu-img's cvtnum_full(): a size option with its own error messages."""
    try:
        value = parse_size(text)
    except SizeRangeError:
        value = -1
    except ValueError:
        raise QimgError(
            f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for\n"
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        ) from None
    if not min_value <= value <= max_value:
        raise QimgError(f"Invalid {name} specified. Must be between {min_value} and {max_value}.")
    return value
