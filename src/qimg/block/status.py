"""Block status: the one truth about allocation, as QEMU's bdrv_block_status.

An Extent describes a run of guest bytes of one node that all share the same
state.  ``map``, convert's sparseness, compare, commit and rebase are all built
on this.
"""

from __future__ import annotations

from qimg.record import dataclass

# Flags, named as QEMU's BDRV_BLOCK_*.
DATA = 0x01          # reads come from a data area (not known to be zero)
ZERO = 0x02          # reads return zeroes
OFFSET_VALID = 0x04  # host_offset is meaningful (in ``file``)
ALLOCATED = 0x10     # the content is defined by this layer, not its backing
EOF = 0x20           # the extent reaches the end of the image
COMPRESSED = 0x40    # the data is stored compressed (no straight host mapping)
RECURSE = 0x80       # ask the data file whether the host range is a hole (QEMU's BDRV_BLOCK_RECURSE)


@dataclass(frozen=True, slots=True)
class Extent:
    """``length`` bytes at guest ``offset`` share ``flags``.

    ``host_offset`` is the byte offset in ``file`` (a filename, as ``qemu-img
    map`` prints it) where the data lives, when OFFSET_VALID is set.
    """

    offset: int
    length: int
    flags: int
    host_offset: int | None = None
    file: str | None = None

    @property
    def allocated(self) -> bool:
        return bool(self.flags & ALLOCATED)

    @property
    def zero(self) -> bool:
        return bool(self.flags & ZERO)

    @property
    def data(self) -> bool:
        return bool(self.flags & DATA)

    @property
    def end(self) -> int:
        return self.offset + self.length
