"""Option schemas (create/amend ``-o``) and qemu's ``key=value,...`` syntax."""

from __future__ import annotations

import re
from typing import Any

from qimg.errors import QimgError
from qimg.record import dataclass
from qimg.units import SizeRangeError, parse_size

# Option types, spelled as qemu-img's ``-o help`` spells them.
STRING = "str"
SIZE = "size"
BOOL = "bool (on/off)"
NUMBER = "num"


@dataclass(frozen=True)
class OptionSpec:
    name: str
    type: str
    help: str
    default: Any = None  # None: not set unless given
    #: the text qemu's ``def_value_str`` holds: shown in create's "Formatting
    #: ..." line when the option is not given (None: derived from ``default``)
    def_value_str: str | None = None

    def default_text(self) -> str | None:
        """The default as the "Formatting" line prints it, or None."""
        if self.def_value_str is not None:
            return self.def_value_str
        if self.default is None:
            return None
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        return str(self.default)


def split_options(text: str) -> list[tuple[str, str | None]]:
    """Split ``a=1,b=x,,y,c`` into pairs; ``,,`` is a literal comma.

    A bare word (no ``=``) gives ``(word, None)``: ``help`` and qemu's implied
    ``on`` for booleans use that.
    """
    items: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    items.append("".join(cur))
    out: list[tuple[str, str | None]] = []
    for item in items:
        if item == "" and not out and len(items) == 1:
            continue
        key, sep, value = item.partition("=")
        out.append((key, value if sep else None))
    return out


def parse_bool(name: str, value: str) -> bool:
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise QimgError(f"Parameter '{name}' expects 'on' or 'off'")


def parse_u64(text: str) -> int | None:
    """qemu_strtou64(text, NULL, 0): C prefixes (0x hex, 0 octal), a '-'
    wraps modulo 2^64 as strtoull does; None when invalid or out of range."""
    m = re.fullmatch(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if not m:
        return None
    digits = m.group(2)
    if digits[:2].lower() == "0x":
        n = int(digits, 16)
    elif digits.startswith("0"):
        n = int(digits, 8)
    else:
        n = int(digits)
    if n >= 1 << 64:
        return None
    return (-n) % (1 << 64) if m.group(1) == "-" else n


def coerce(spec: OptionSpec, value: str) -> Any:
    """Turn one ``-o`` value into its typed form, with qemu's error texts."""
    if spec.type == BOOL:
        return parse_bool(spec.name, value)
    if spec.type == SIZE:
        try:
            return parse_size(value)
        except SizeRangeError:
            raise QimgError(f"Value '{value}' is out of range for parameter '{spec.name}'") from None
        except ValueError:
            raise QimgError(
                f"Parameter '{spec.name}' expects a non-negative number below 2^64\n"
                "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                "and exabytes, respectively."
            ) from None
    if spec.type == NUMBER:
        number = parse_u64(value)
        if number is None:
            raise QimgError(f"Parameter '{spec.name}' expects a number")
        return number
    return value


def parse_options(text: str, schema: list[OptionSpec]) -> dict[str, Any]:
    """Parse ``-o`` text against a format's schema; unknown keys are errors."""
    by_name = {s.name: s for s in schema}
    result: dict[str, Any] = {}
    for key, value in split_options(text):
        spec = by_name.get(key)
        if spec is None:
            raise QimgError(f"Invalid parameter '{key}'")
        if value is None:
            if spec.type != BOOL:
                raise QimgError(f"Parameter '{key}' is missing value")
            value = "on"
        result[key] = coerce(spec, value)
    return result


def format_help(schema: list[OptionSpec], title: str = "Supported options:") -> str:
    """``-o help`` text, as qemu_opts_print_help prints it (sorted by name)."""
    lines = [title]
    for spec in sorted(schema, key=lambda s: s.name):
        left = f"  {spec.name}=<{spec.type}>"
        lines.append(f"{left:<24} - {spec.help}" if len(left) < 24 else f"{left} - {spec.help}")
    return "\n".join(lines) + "\n"
