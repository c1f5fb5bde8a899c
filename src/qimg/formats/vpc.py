"""vpc: Connectix / Microsoft Virtual PC images (VHD), as QEMU's block/vpc.c.

Layout (all big endian).  Every image ends with a 512-byte *footer*
("conectix"): disk type, CHS geometry, sizes, a checksum and a UUID.  A
*fixed* image is the raw disk followed by the footer.  A *dynamic* image
starts with a copy of the footer, then (at the footer's data_offset) a
1024-byte dynamic disk header ("cxsparse") naming the Block Allocation Table
(BAT): ``max_table_entries`` 32-bit sector numbers, one per block of
``block_size`` bytes (2 MiB as QEMU creates them), 0xffffffff when the block
is not allocated.  An allocated block is a sector bitmap (one bit per sector,
rounded up to whole sectors) followed by the block's data.

As QEMU, reads ignore the sector bitmaps (a block is either allocated or
not), and a write to a new block appends it at the end of the file: the
bitmap (all ones), then the footer moved past the new block, then the BAT
entry.  The virtual size comes from the CHS geometry unless the creator
application is one known to use current_size (or the geometry is the
largest one).
"""

from __future__ import annotations

import errno
import os
import re
import struct
import time
from typing import Any

from qimg.block.driver import Driver
from qimg.block.options import BOOL, SIZE, STRING, OptionSpec
from qimg.block.status import ALLOCATED, DATA, EOF, OFFSET_VALID, RECURSE, ZERO, Extent
from qimg.errors import QimgError

#: a block table entry other than 0xFFFFFFFF (unallocated): a byte that is not 0xFF
_ALLOCATED_ENTRY = re.compile(b"[^\\xff]")

SECTOR = 512
HEADER_SIZE = 512
DYN_HEADER_SIZE = 1024
VHD_FIXED = 2
VHD_DYNAMIC = 3
VHD_TIMESTAMP_BASE = 946684800
VHD_CHS_MAX_C = 65535
VHD_CHS_MAX_H = 16
VHD_CHS_MAX_S = 255
VHD_MAX_SECTORS = 0xFF000000  # 2040 GiB
VHD_MAX_GEOMETRY = VHD_CHS_MAX_C * VHD_CHS_MAX_H * VHD_CHS_MAX_S
DEFAULT_BLOCK_SIZE = 0x200000
UNALLOCATED = 0xFFFFFFFF
INT_MAX = 0x7FFFFFFF
#: the block layer's limits on one request (BDRV_REQUEST_MAX_BYTES, BDRV_MAX_LENGTH)
REQUEST_MAX_BYTES = 0x7FFFFE00
MAX_LENGTH = ((1 << 63) - 1) & ~((1 << 30) - 1)

# footer field offsets
F_DATA_OFFSET = 16
F_TIMESTAMP = 24
F_CREATOR_APP = 28
F_CURRENT_SIZE = 48
F_CYLS = 56
F_TYPE = 60
F_CHECKSUM = 64
F_UUID = 68

# creator applications whose images take their size from current_size
_SIZE_FROM_CURRENT = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")


def vpc_checksum(buf: bytes | bytearray) -> int:
    return ~sum(buf) & 0xFFFFFFFF


def _readable(offset: int, length: int) -> bool:
    """bdrv_pread's request checks: False where QEMU fails with an error."""
    if offset >= 1 << 63 or length > REQUEST_MAX_BYTES:
        return False
    return offset <= MAX_LENGTH - length


def calculate_geometry(total_sectors: int) -> tuple[int, int, int]:
    """(cyls, heads, secs_per_cyl) for ``total_sectors``, as the VHD
    specification's algorithm (the product may round down), with QEMU's
    C integer widths."""
    total_sectors = min(total_sectors, VHD_MAX_GEOMETRY)
    if total_sectors >= 65535 * 16 * 63:
        secs, heads = 255, 16
        cth = (total_sectors // secs) & 0xFFFFFFFF
    else:
        secs = 17
        cth = (total_sectors // secs) & 0xFFFFFFFF
        heads = ((cth + 1023) // 1024) & 0xFF
        if heads < 4:
            heads = 4
        if cth >= heads * 1024 or heads > 16:
            secs, heads = 31, 16
            cth = (total_sectors // secs) & 0xFFFFFFFF
        if cth >= heads * 1024:
            secs, heads = 63, 16
            cth = (total_sectors // secs) & 0xFFFFFFFF
    return (cth // heads) & 0xFFFF, heads, secs


def rounded_image_size(total_size: int, force_size: bool) -> tuple[int, int, int, int]:
    """calculate_rounded_image_size: (total_sectors, cyls, heads, secs);
    OSError(EFBIG) beyond 2040 GiB."""
    if force_size:
        cyls, heads, secs = VHD_CHS_MAX_C, VHD_CHS_MAX_H, VHD_CHS_MAX_S
    else:
        cyls = heads = secs = 0
        total_sectors = min(VHD_MAX_GEOMETRY, total_size // SECTOR)
        i = 0
        while total_sectors > cyls * heads * secs:
            cyls, heads, secs = calculate_geometry(total_sectors + i)
            i += 1
    if cyls * heads * secs == VHD_MAX_GEOMETRY:
        total_sectors = total_size // SECTOR
        if total_sectors > VHD_MAX_SECTORS:
            raise OSError(errno.EFBIG, "Disk size is too large, max size is 2040 GiB")
    else:
        total_sectors = cyls * heads * secs
    return total_sectors, cyls, heads, secs


class VpcDriver(Driver):
    format_name = "vpc"
    create_opts = [
        OptionSpec("size", SIZE, "Virtual disk size"),
        OptionSpec("subformat", STRING,
                   "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed} "),
        OptionSpec("force_size", BOOL, "Force disk size calculation to use the actual size specified, "
                   "rather than using the nearest CHS-based calculation"),
    ]
    #: a new image reads as zeroes (dynamic: no blocks; fixed: a new file)
    has_zero_init = True

    # ---- probing, creation ---------------------------------------------------
    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        return 100 if header[:8] == b"conectix" else 0

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        from qimg.formats.raw import RawDriver
        from qimg.protocols.file import File

        # qemu takes the vpc options out before creating the file (size 0)
        file_opts = {k: v for k, v in options.items() if k not in ("subformat", "force_size")}
        RawDriver.create(filename, 0, file_opts)
        subformat = options.get("subformat")
        if subformat is None or subformat == "dynamic":
            disk_type = VHD_DYNAMIC
        elif subformat == "fixed":
            disk_type = VHD_FIXED
        else:
            raise QimgError(f"Parameter 'subformat' does not accept value '{subformat}'")
        force_size = bool(options.get("force_size"))
        # silently round up to whole sectors, then to the CHS geometry
        total_size = (size + SECTOR - 1) // SECTOR * SECTOR
        if not force_size:
            total_size = rounded_image_size(total_size, False)[0] * SECTOR
        total_sectors, cyls, heads, secs = rounded_image_size(total_size, force_size)
        if total_size != total_sectors * SECTOR:
            raise QimgError("The requested image size cannot be represented in CHS geometry",
                            detail=f"Try size={total_sectors * SECTOR} or force-size=on (the latter makes "
                                   "the image incompatible with Virtual PC)")
        import uuid  # here: probing imports this module, and uuid is slow to import

        footer = bytearray(HEADER_SIZE)
        footer[0:8] = b"conectix"
        footer[F_CREATOR_APP:F_CREATOR_APP + 4] = b"qem2" if force_size else b"qemu"
        footer[36:40] = b"Wi2k"
        data_offset = HEADER_SIZE if disk_type == VHD_DYNAMIC else 0xFFFFFFFFFFFFFFFF
        struct.pack_into(">IIQI", footer, 8, 0x02, 0x00010000, data_offset,
                         (int(time.time()) - VHD_TIMESTAMP_BASE) & 0xFFFFFFFF)
        struct.pack_into(">HH", footer, 32, 5, 3)  # Virtual PC 2007
        struct.pack_into(">QQHBBI", footer, 40, total_size, total_size, cyls, heads, secs, disk_type)
        footer[F_UUID:F_UUID + 16] = uuid.uuid4().bytes
        struct.pack_into(">I", footer, F_CHECKSUM, vpc_checksum(footer))
        with File(filename, read_only=False) as f:
            if disk_type == VHD_FIXED:
                f.truncate(total_size + HEADER_SIZE)
                f.pwrite(total_size, footer)
                return
            entries = -(-total_sectors // (DEFAULT_BLOCK_SIZE // SECTOR))
            bat_bytes = (entries * 4 + SECTOR - 1) // SECTOR * SECTOR
            dyn = bytearray(DYN_HEADER_SIZE)
            dyn[0:8] = b"cxsparse"
            struct.pack_into(">QQIII", dyn, 8, 0xFFFFFFFFFFFFFFFF, 3 * SECTOR, 0x00010000, entries,
                             DEFAULT_BLOCK_SIZE)
            struct.pack_into(">I", dyn, 36, vpc_checksum(dyn))
            f.pwrite(0, footer)
            f.pwrite(1536 + bat_bytes, footer)
            if bat_bytes:
                f.pwrite(3 * SECTOR, b"\xff" * bat_bytes)
            f.pwrite(SECTOR, dyn)

    # ---- open ------------------------------------------------------------------
    def _fail(self, message: str) -> None:
        raise QimgError(message)

    def do_open(self, options: dict[str, Any]) -> None:
        file = self.file
        footer = bytearray(file.pread(0, HEADER_SIZE))
        disk_type = VHD_DYNAMIC
        if footer[:8] != b"conectix":
            length = file.size
            if length < HEADER_SIZE:
                self._fail("File too small for a VHD header")
            footer = bytearray(file.pread(length - HEADER_SIZE, HEADER_SIZE))
            # the footer at the end must say it is a fixed image
            if footer[:8] != b"conectix" or struct.unpack_from(">I", footer, F_TYPE)[0] != VHD_FIXED:
                self._fail("invalid VPC image")
            disk_type = VHD_FIXED
        checksum = struct.unpack_from(">I", footer, F_CHECKSUM)[0]
        footer[F_CHECKSUM:F_CHECKSUM + 4] = bytes(4)
        if vpc_checksum(footer) != checksum:
            self._fail("Incorrect header checksum")
        struct.pack_into(">I", footer, F_CHECKSUM, checksum)
        self.footer = bytes(footer)
        cyls, heads, secs, self.footer_type = struct.unpack_from(">HBBI", footer, F_CYLS)
        total_sectors = cyls * heads * secs
        use_chs = footer[F_CREATOR_APP:F_CREATOR_APP + 4] not in _SIZE_FROM_CURRENT
        size_calc = options.get("force_size_calc") if options else None
        if size_calc is not None:
            if size_calc == "current_size":
                use_chs = False
            elif size_calc == "chs":
                use_chs = True
            else:
                self._fail(f"Invalid size calculation mode: '{size_calc}'")
        if not use_chs or total_sectors == VHD_MAX_GEOMETRY:
            total_sectors = struct.unpack_from(">Q", footer, F_CURRENT_SIZE)[0] // SECTOR
        if total_sectors > VHD_MAX_SECTORS:
            self._fail(f"Could not open '{file.filename}': {os.strerror(errno.EFBIG)}")
        self.size = total_sectors * SECTOR
        self.block_size = 0
        self.bitmap_size = 0
        self.max_table_entries = 0
        self.bat_offset = 0
        self.free_data_block_offset = 0
        self.last_bitmap_offset = -1
        from array import array

        self.bat = array("I")
        if disk_type == VHD_DYNAMIC:
            self._open_dynamic(footer, total_sectors)
        self.cluster_size = self.block_size if self.footer_type != VHD_FIXED and self.block_size else None

    def _open_dynamic(self, footer: bytearray, total_sectors: int) -> None:
        from array import array

        file = self.file
        data_offset = struct.unpack_from(">Q", footer, F_DATA_OFFSET)[0]
        if not _readable(data_offset, HEADER_SIZE):
            self._fail("Error reading dynamic VHD header")
        dyn = file.pread(data_offset, HEADER_SIZE)
        if dyn[:8] != b"cxsparse":
            self._fail("Invalid header magic")
        table_offset, _version, entries, block_size = struct.unpack_from(">QIII", dyn, 16)
        if block_size < SECTOR or block_size & (block_size - 1):
            self._fail(f"Invalid block size {block_size}")
        self.block_size = block_size
        self.bitmap_size = ((block_size // (8 * 512)) + 511) & ~511
        signed = entries - (1 << 32) if entries >= 1 << 31 else entries
        if (total_sectors * 512) // block_size > 0xFFFFFFFF:
            self._fail("Too many blocks")
        computed = ((signed % (1 << 64)) * block_size) % (1 << 64)
        if computed < total_sectors * 512:
            self._fail("Page table too small")
        if signed < 0 or signed > INT_MAX // 4:
            self._fail(f"Max Table Entries too large ({signed})")
        table_size = entries * 4
        if not _readable(table_offset, table_size):
            self._fail("Error reading pagetable")
        # A table that runs past the end of the file always leaves
        # free_data_block_offset past it: refuse before reading it all.
        free = (table_offset + table_size + 511) & ~511
        file_size = file.size
        if free > file_size:
            self._fail("block-vpc: free_data_block_offset points after the end of file. "
                       "The image has been truncated.")
        bat = array("I")
        bat.frombytes(file.pread(table_offset, table_size))
        if bat.itemsize != 4:  # pragma: no cover - every platform qimg runs on
            raise QimgError("unsupported platform")
        if struct.pack("=I", 1) != struct.pack(">I", 1):
            bat.byteswap()
        top = max(filter(UNALLOCATED.__ne__, bat), default=None)
        if top is not None:
            free = max(free, 512 * top + self.bitmap_size + block_size)
        if free > file_size:
            self._fail("block-vpc: free_data_block_offset points after the end of file. "
                       "The image has been truncated.")
        self.bat = bat
        self.max_table_entries = entries
        self.bat_offset = table_offset
        self.free_data_block_offset = free

    # ---- mapping ---------------------------------------------------------------
    def _host(self, offset: int) -> int | None:
        """get_image_offset: the host offset of guest ``offset``, or None."""
        index = offset // self.block_size
        if index >= self.max_table_entries:
            return None
        entry = self.bat[index]
        if entry == UNALLOCATED:
            return None
        return 512 * entry + self.bitmap_size + offset % self.block_size

    @property
    def _fixed(self) -> bool:
        return self.footer_type == VHD_FIXED

    def block_status(self, offset: int, length: int) -> Extent:
        length = min(length, self.size - offset)
        eof_at = self.size
        if self._fixed:
            return Extent(offset, length, DATA | OFFSET_VALID | RECURSE | ALLOCATED
                          | (EOF if offset + length >= eof_at else 0), offset, self.file.filename)
        bs = self.block_size
        if not bs:
            return Extent(offset, length, ZERO | ALLOCATED | (EOF if offset + length >= eof_at else 0))
        host = self._host(offset)
        if host is not None:
            n = min(bs - offset % bs, length)
            return Extent(offset, n, DATA | OFFSET_VALID | ALLOCATED | (EOF if offset + n >= eof_at else 0),
                          host, self.file.filename)
        # a run of unallocated blocks
        end = offset + length
        index = offset // bs + 1
        last = (end - 1) // bs
        entries = min(self.max_table_entries, len(self.bat), last + 1)
        if index < entries:
            # the next allocated entry, found at C speed (the table is native u32s)
            hit = _ALLOCATED_ENTRY.search(memoryview(self.bat).cast("B"), 4 * index, 4 * entries)
            index = hit.start() // 4 if hit is not None else last + 1
        else:
            index = last + 1
        n = min(index * bs, end) - offset
        return Extent(offset, n, ZERO | ALLOCATED | (EOF if offset + n >= eof_at else 0))

    # ---- I/O --------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        if self._fixed:
            return self.file.pread(offset, length)
        bs = self.block_size
        if not bs:
            return bytes(length)
        parts = []
        end = offset + length
        while offset < end:
            n = min(end - offset, bs - offset % bs)
            host = self._host(offset)
            parts.append(bytes(n) if host is None else self.file.pread(host, n))
            offset += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        if self.read_only:
            raise QimgError("Image is read-only")
        if self._fixed:
            self.file.pwrite(offset, data)
            return
        bs = self.block_size
        if not bs:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            cur = offset + pos
            n = min(len(view) - pos, bs - cur % bs)
            host = self._host(cur)
            if host is not None:
                bitmap_offset = host - self.bitmap_size - cur % bs
                if bitmap_offset != self.last_bitmap_offset:
                    self.last_bitmap_offset = bitmap_offset
                    self.file.pwrite(bitmap_offset, b"\xff" * self.bitmap_size)
            else:
                host = self._alloc_block(cur)
            self.file.pwrite(host, view[pos:pos + n])
            pos += n

    def _alloc_block(self, offset: int) -> int:
        """alloc_block: bitmap at the end of the file, footer after the new
        block, then the BAT entry."""
        if offset < 0 or offset > self.size:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        index = offset // self.block_size
        start = self.free_data_block_offset
        entry = (start // 512) & 0xFFFFFFFF
        self.bat[index] = entry
        self.file.pwrite(start, b"\xff" * self.bitmap_size)
        self.free_data_block_offset = start + self.block_size + self.bitmap_size
        self.file.pwrite(self.free_data_block_offset, self.footer)
        self.file.pwrite(self.bat_offset + 4 * index, struct.pack(">I", entry))
        return 512 * entry + self.bitmap_size + offset % self.block_size
