"""bochs: Bochs' "growing" redolog disk, read-only, as QEMU's block/bochs.c.

Layout (all little endian): a 512-byte header

    magic[32] "Bochs Virtual HD Image", type[16] "Redolog",
    subtype[16] "Growing", version (0x00020000, or 0x00010000 for v1),
    header (its size: where the catalog starts), catalog (entries),
    bitmap (bytes per extent bitmap), extent (bytes per extent), then
    v2: reserved(u32) disk(u64)  /  v1: disk(u64)

then the catalog of ``catalog`` 32-bit entries at ``header``, then the
extents.  Catalog entry N is the number of the file extent that holds guest
extent N (0xffffffff: not allocated).  File extent K starts at
``data_offset + 512 * K * (bitmap_blocks + extent_blocks)`` with its
bitmap (one bit per sector, least significant bit first), and the sector
data follows ``bitmap_blocks`` sectors later.  A sector whose bit is clear
reads as zeroes.

As in QEMU, the arithmetic is that of the C source: ``data_offset`` and the
block counts are 32-bit (they wrap), file offsets 64-bit unsigned (they
wrap too); what lies past the end of the file reads as zeroes; an offset
the block layer refuses fails the read with EIO.  There is no
bdrv_co_block_status: the block layer reports every range as data, with
no host offset, and there is no check, no create and no write.
"""

from __future__ import annotations

import errno
import os
import re
import struct
import sys
from array import array
from typing import Any

from qimg.block.driver import Driver
from qimg.block.status import ALLOCATED, DATA, EOF, Extent
from qimg.errors import QimgError

SECTOR = 512
HEADER_SIZE = 512
HEADER_MAGIC = b"Bochs Virtual HD Image\0"
REDOLOG_TYPE = b"Redolog\0"
GROWING_TYPE = b"Growing\0"
HEADER_VERSION = 0x00020000
HEADER_V1 = 0x00010000
UNALLOCATED = 0xFFFFFFFF
#: QEMU limits the catalog to 1M entries (bximage's largest image, ~8 TB)
MAX_CATALOG = 0x100000
MAX_EXTENT = 0x800000
MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1
INT64_MAX = (1 << 63) - 1
#: the largest offset the block layer accepts (INT64_MAX aligned down to 1 GiB)
BDRV_MAX_LENGTH = INT64_MAX & ~((1 << 30) - 1)

# version header catalog bitmap extent, then v2: reserved disk / v1: disk
_FIELDS = struct.Struct("<IIIII")
OFF_VERSION = 64
OFF_DISK_V2 = 88
OFF_DISK_V1 = 84

_CLEAR_RUNS = re.compile("0+")


def _is_bochs(buf: bytes) -> bool:
    """bochs_probe's and bochs_open's test: the three strcmp()s and the version."""
    return (buf[0:len(HEADER_MAGIC)] == HEADER_MAGIC
            and buf[32:32 + len(REDOLOG_TYPE)] == REDOLOG_TYPE
            and buf[48:48 + len(GROWING_TYPE)] == GROWING_TYPE
            and struct.unpack_from("<I", buf, OFF_VERSION)[0] in (HEADER_VERSION, HEADER_V1))


def _eio() -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO))


def _check_offset(first: int, last_end: int) -> None:
    """bdrv_check_qiov_request for reads at uint64 offsets taken as int64:
    ``first`` is the first offset, ``last_end`` the end of the last read."""
    if first > INT64_MAX or first > BDRV_MAX_LENGTH or last_end > BDRV_MAX_LENGTH:
        raise _eio()


class BochsDriver(Driver):
    format_name = "bochs"
    supports_create = False
    # QEMU's bochs opens read-write only to refuse it with "Image is
    # read-only" (bdrv_apply_auto_read_only), not the generic "does not
    # support write access": open_image says so, before any lock
    supports_write = True
    refuses_write_open = True
    supports_get_info = False

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        if len(header) < HEADER_SIZE:
            return 0
        return 100 if _is_bochs(header) else 0

    # ---- open ------------------------------------------------------------------
    def do_open(self, options: dict[str, Any]) -> None:
        buf = self.file.pread(0, HEADER_SIZE)
        if not _is_bochs(buf):
            raise QimgError("Image not in Bochs format")
        version, header, catalog, bitmap, extent = _FIELDS.unpack_from(buf, OFF_VERSION)
        disk = struct.unpack_from("<Q", buf, OFF_DISK_V1 if version == HEADER_V1 else OFF_DISK_V2)[0]
        total_sectors = disk // SECTOR
        if catalog > MAX_CATALOG:
            raise QimgError("Catalog size is too large")
        # the catalog, past the end of the file reading as zeroes
        raw = self.file.pread(header, catalog * 4)
        cat = array("I")  # 4 bytes wherever CPython runs
        cat.frombytes(raw)
        if sys.byteorder != "little":  # pragma: no cover
            cat.byteswap()
        self.catalog = cat
        self.data_offset = (header + catalog * 4) & MASK32
        self.bitmap_blocks = (1 + ((bitmap - 1) & MASK32) // SECTOR) & MASK32
        self.extent_blocks = (1 + ((extent - 1) & MASK32) // SECTOR) & MASK32
        self.extent_size = extent
        if extent < SECTOR:
            raise QimgError("Extent size must be at least 512")
        if extent & (extent - 1):
            raise QimgError(f"Extent size {extent} is not a power of two")
        if extent > MAX_EXTENT:
            raise QimgError(f"Extent size {extent} is too large")
        per_extent = extent // SECTOR
        if catalog < -(-total_sectors // per_extent):
            raise QimgError("Catalog size is too small for this disk size")
        self.size = total_sectors * SECTOR
        self._stride = SECTOR * ((self.extent_blocks + self.bitmap_blocks) & MASK32)

    def reopen_for_repair(self) -> None:
        """check -r opens read-write: refused as any read-write open."""
        raise QimgError("Image is read-only")

    # ---- I/O --------------------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> Extent:
        # no bdrv_co_block_status: the block layer says "data", no offset
        length = min(length, self.size - offset)
        flags = DATA | ALLOCATED
        if offset + length >= self.size:
            flags |= EOF
        return Extent(offset, length, flags)

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if length <= 0:
            return b""
        # request_alignment 512: whole sectors are read, then cut
        first = offset // SECTOR
        end = -(-(offset + length) // SECTOR)
        per_extent = self.extent_size // SECTOR
        parts = []
        sector = first
        while sector < end:
            index = sector // per_extent
            within = sector % per_extent
            n = min(end - sector, per_extent - within)
            parts.append(self._read_extent(index, within, n))
            sector += n
        data = b"".join(parts)
        skip = offset - first * SECTOR
        if skip or len(data) != length:
            data = data[skip:skip + length]
        return data

    def _read_extent(self, index: int, within: int, count: int) -> bytes:
        """``count`` sectors of guest extent ``index`` from sector ``within``."""
        entry = self.catalog[index]
        if entry == UNALLOCATED:
            return bytes(count * SECTOR)
        bitmap_offset = (self.data_offset + entry * self._stride) & MASK64
        # one bitmap byte read per sector in QEMU: these are the bytes it reads
        b0 = within // 8
        b1 = (within + count - 1) // 8 + 1
        _check_offset(bitmap_offset + b0, (bitmap_offset + b1) & MASK64)
        bits = int.from_bytes(self.file.pread(bitmap_offset + b0, b1 - b0), "little")
        bits = (bits >> (within - b0 * 8)) & ((1 << count) - 1)
        if not bits:
            return bytes(count * SECTOR)
        # the sectors whose bit is set, from the first to the last of them
        lo = (bits & -bits).bit_length() - 1
        hi = bits.bit_length()
        start = (bitmap_offset + SECTOR * (self.bitmap_blocks + within + lo)) & MASK64
        stop = (bitmap_offset + SECTOR * (self.bitmap_blocks + within + hi)) & MASK64
        if start == 0 or stop < start:
            # an offset that wrapped: QEMU's int64 arithmetic has no good
            # answer there (it cannot happen with a file below 8 EiB)
            raise _eio()
        _check_offset(start, stop)
        buf = bytearray(lo * SECTOR)
        buf += self.file.pread(start, (hi - lo) * SECTOR)
        if bits != ((1 << hi) - 1) & ~((1 << lo) - 1):
            # bit i of ``bits`` is sector i: clear runs read as zeroes
            mask = format(bits >> lo, f"0{hi - lo}b")[::-1]
            for m in _CLEAR_RUNS.finditer(mask):
                a, b = (lo + m.start()) * SECTOR, (lo + m.end()) * SECTOR
                buf[a:b] = bytes(b - a)
        buf += bytes((count - hi) * SECTOR)
        return bytes(buf)
