"""qemu-img's progress display (util/qemu-progress.c).

qemu keeps the percentage in a C ``float`` and prints ``"    (%3.2f/100%%)\\r"``
whenever it moved by more than ``min_skip`` points, or is exactly 0 or 100;
the end of the command prints one newline.  We round every step to single
precision so that the printed digits are the ones qemu-img prints.
"""

from __future__ import annotations

import struct
import sys
from typing import Callable, TextIO

_F32 = struct.Struct("f")

#: what the library's ``progress`` callbacks receive: a percentage 0..100
ProgressFn = Callable[[float], None]


def f32(value: float) -> float:
    """``value`` rounded to a C float (one rounding, as one C operation)."""
    try:
        return _F32.unpack(_F32.pack(value))[0]
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


class FloatAccumulator:
    """qemu_progress_print(delta, 100) as compare uses it: the delta is added
    to the running float total, in float arithmetic, capped at 100."""

    def __init__(self) -> None:
        self.current = 0.0

    def add(self, delta: float) -> float:
        step = f32(f32(f32(delta) / 100) * 100)
        self.current = min(f32(self.current + step), 100.0)
        return self.current


class Progress:
    """The printer: ``update(percent)`` is qemu_progress_print(percent, 0)."""

    def __init__(self, enabled: bool, min_skip: float, out: TextIO | None = None) -> None:
        self.enabled = enabled
        self.min_skip = min_skip
        self.out = out
        self.current = 0.0
        self.last_print = 0.0

    def update(self, percent: float) -> None:
        current = min(f32(percent), 100.0)
        self.current = current
        if (
            current > self.last_print + self.min_skip
            or current < self.last_print - self.min_skip
            or current == 0
            or current == 100
        ):
            self.last_print = current
            if self.enabled:
                out = self.out or sys.stdout
                out.write("    (%3.2f/100%%)\r" % current)
                out.flush()

    def end(self) -> None:
        if self.enabled:
            out = self.out or sys.stdout
            out.write("\n")
            out.flush()
