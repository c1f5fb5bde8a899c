"""raw: the guest bytes are the file's bytes."""

from __future__ import annotations

from typing import Any

from qimg.block.driver import Driver
from qimg.block.options import SIZE, STRING, OptionSpec
from qimg.block.status import ALLOCATED, DATA, EOF, OFFSET_VALID, ZERO, Extent
from qimg.errors import QimgError, UnsupportedError
from qimg.protocols.file import File

PREALLOC_MODES = ("off", "falloc", "full")


class RawDriver(Driver):
    format_name = "raw"
    create_opts = [
        OptionSpec("size", SIZE, "Virtual disk size"),
        OptionSpec("preallocation", STRING, "Preallocation mode (allowed values: off, falloc, full)"),
        OptionSpec("extent_size_hint", SIZE, "Extent size hint for the image file, 0 to disable"),
        OptionSpec("nocow", "bool (on/off)", "Turn off copy-on-write (valid only on btrfs)"),
    ]
    supports_resize = True

    @classmethod
    def measure(cls, size: int | None, options: dict[str, Any], source: Any) -> dict[str, int]:
        """raw_measure: the whole virtual size, allocated or not."""
        required = source.size if source is not None else (size or 0) + 511 & ~511
        return {"required": required, "fully-allocated": required}

    def do_open(self, options: dict[str, Any]) -> None:
        # block layer lengths are whole sectors: the tail reads as zeroes
        self.size = (self.file.size + 511) // 512 * 512

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        prealloc = options.get("preallocation") or "off"
        if prealloc not in PREALLOC_MODES:
            if prealloc == "metadata":
                # a known mode the file protocol refuses after creating the file
                File(filename, read_only=False, create=True).close()
                raise QimgError(f"Unsupported preallocation mode: {prealloc}")
            raise QimgError(f"invalid parameter value: {prealloc}")
        # file-posix creates whole sectors
        size = (size + 511) // 512 * 512
        with File(filename, read_only=False, create=True) as f:
            f.truncate(size, prealloc)

    def block_status(self, offset: int, length: int) -> Extent:
        length = min(length, self.size - offset)
        is_data, run = self.file.data_extent(offset, length)
        flags = OFFSET_VALID | ALLOCATED | (DATA if is_data else ZERO)
        if offset + run >= self.size:
            flags |= EOF
        return Extent(offset, run, flags, offset, self.file.filename)

    def read(self, offset: int, length: int) -> bytes:
        return self.file.pread(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self.file.pwrite(offset, data)
        self.size = max(self.size, offset + len(data))

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self.file.write_zeroes(offset, length)

    def discard(self, offset: int, length: int) -> None:
        self.file.write_zeroes(offset, length)

    def truncate(self, size: int, prealloc: str = "off", shrink: bool = False) -> None:
        if prealloc not in PREALLOC_MODES:
            # file-posix's wording (raw_co_truncate)
            raise UnsupportedError(f"Unsupported preallocation mode: {prealloc}")
        self.file.truncate(size, prealloc)
        self.size = size
