"""vdi: VirtualBox's Virtual Disk Image, as QEMU's block/vdi.c reads and writes it.

Layout: a 512-byte header (all little endian), then a block map of
``blocks_in_image`` 32-bit entries at ``offset_bmap``, then the data blocks
(1 MiB each) at ``offset_data``.  Map entry N is the index of the data block
that holds guest block N; 0xffffffff is never allocated, 0xfffffffe discarded
(both read as zeroes).  New blocks are appended in order: the next one is
block number ``blocks_allocated``.

The block map is a numpy array, loaded on first I/O (``info`` stays light).
A map that runs past the end of the file reads as zero entries, as QEMU's
reads past EOF do; only the part inside the file is kept in memory, so a
hostile ``blocks_in_image`` allocates nothing.
"""

from __future__ import annotations

import struct
import sys
from typing import TYPE_CHECKING, Any

from qimg.block.check import CheckResult
from qimg.block.driver import Driver
from qimg.block.options import BOOL, SIZE, OptionSpec
from qimg.block.status import ALLOCATED, DATA, EOF, OFFSET_VALID, RECURSE, ZERO, Extent
from qimg.errors import QimgError, UnsupportedError

if TYPE_CHECKING:
    import numpy as np

SECTOR_SIZE = 512
DEFAULT_CLUSTER_SIZE = 1 << 20
VDI_SIGNATURE = 0xBEDA107F
VDI_VERSION_1_1 = 0x00010001
VDI_TYPE_DYNAMIC = 1
VDI_TYPE_STATIC = 2
VDI_TEXT = b"<<< QEMU VM Virtual Disk Image >>>\n"
VDI_UNALLOCATED = 0xFFFFFFFF
VDI_DISCARDED = 0xFFFFFFFE
# the block map must fit in one request of the block layer
VDI_BLOCKS_IN_IMAGE_MAX = ((0x7FFFFFFF >> 9) << 9) // 4
VDI_DISK_SIZE_MAX = VDI_BLOCKS_IN_IMAGE_MAX * DEFAULT_CLUSTER_SIZE
HEADER_SIZE = 512

# VdiHeader field offsets (the struct is packed)
OFF_SIGNATURE = 0x40
OFF_VERSION = 0x44
OFF_IMAGE_TYPE = 0x4C
OFF_BMAP = 0x154
OFF_DATA = 0x158
OFF_SECTOR_SIZE = 0x168
OFF_DISK_SIZE = 0x170
OFF_BLOCK_SIZE = 0x178
OFF_BLOCKS_IN_IMAGE = 0x180
OFF_BLOCKS_ALLOCATED = 0x184
OFF_UUID_IMAGE = 0x188
OFF_UUID_LAST_SNAP = 0x198
OFF_UUID_LINK = 0x1A8
OFF_UUID_PARENT = 0x1B8


def _u32(buf: bytes, off: int) -> int:
    return struct.unpack_from("<I", buf, off)[0]


class VdiDriver(Driver):
    format_name = "vdi"
    create_opts = [
        OptionSpec("size", SIZE, "Virtual disk size"),
        OptionSpec("static", BOOL, "VDI static (pre-allocated) image", def_value_str="off"),
    ]
    supports_check = True

    # ---- probing, creation ---------------------------------------------------
    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        if len(header) < HEADER_SIZE:
            return 0
        return 100 if _u32(header, OFF_SIGNATURE) == VDI_SIGNATURE else 0

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        from qimg.formats.raw import RawDriver
        from qimg.protocols.file import File

        # The file protocol is created first, without the size (vdi takes
        # that for itself), so its own options apply to an empty file.
        file_opts = {k: v for k, v in options.items() if k != "static"}
        RawDriver.create(filename, 0, file_opts)
        size = (size + SECTOR_SIZE - 1) // SECTOR_SIZE * SECTOR_SIZE
        if size > VDI_DISK_SIZE_MAX:
            raise QimgError("Unsupported VDI image size (size is 0x%x, max supported is 0x%x)"
                            % (size, VDI_DISK_SIZE_MAX))
        static = bool(options.get("static"))
        blocks = (size + DEFAULT_CLUSTER_SIZE - 1) // DEFAULT_CLUSTER_SIZE
        bmap_size = (blocks * 4 + SECTOR_SIZE - 1) // SECTOR_SIZE * SECTOR_SIZE
        header = bytearray(HEADER_SIZE)
        header[:len(VDI_TEXT)] = VDI_TEXT
        struct.pack_into("<IIIII", header, OFF_SIGNATURE, VDI_SIGNATURE, VDI_VERSION_1_1, 0x180,
                         VDI_TYPE_STATIC if static else VDI_TYPE_DYNAMIC, 0)
        struct.pack_into("<II", header, OFF_BMAP, 0x200, 0x200 + bmap_size)
        struct.pack_into("<I", header, OFF_SECTOR_SIZE, SECTOR_SIZE)
        struct.pack_into("<QIIII", header, OFF_DISK_SIZE, size, DEFAULT_CLUSTER_SIZE, 0, blocks,
                         blocks if static else 0)
        import uuid  # here: probing imports this module, and uuid is slow to import

        # VirtualBox stores UUIDs with the first three fields little endian
        header[OFF_UUID_IMAGE:OFF_UUID_IMAGE + 16] = uuid.uuid4().bytes_le
        header[OFF_UUID_LAST_SNAP:OFF_UUID_LAST_SNAP + 16] = uuid.uuid4().bytes_le
        import numpy as np

        if static:
            bmap = np.arange(blocks, dtype="<u4")
        else:
            bmap = np.full(blocks, VDI_UNALLOCATED, dtype="<u4")
        with File(filename, read_only=False) as f:
            f.pwrite(0, header)
            if bmap_size:
                f.pwrite(HEADER_SIZE, bmap.tobytes() + bytes(bmap_size - blocks * 4))
            if static:
                f.truncate(HEADER_SIZE + bmap_size + blocks * DEFAULT_CLUSTER_SIZE)

    # ---- open ------------------------------------------------------------------
    def do_open(self, options: dict[str, Any]) -> None:
        buf = self.file.pread(0, HEADER_SIZE)
        self.header = bytearray(buf)
        disk_size = struct.unpack_from("<Q", buf, OFF_DISK_SIZE)[0]
        if disk_size > VDI_DISK_SIZE_MAX:
            raise UnsupportedError("Unsupported VDI image size (size is 0x%x, max supported is 0x%x)"
                                   % (disk_size, VDI_DISK_SIZE_MAX))
        # VBoxManage convertfromraw writes odd sizes: QEMU rounds them up
        disk_size = (disk_size + SECTOR_SIZE - 1) // SECTOR_SIZE * SECTOR_SIZE
        signature, version = struct.unpack_from("<II", buf, OFF_SIGNATURE)
        self.image_type = _u32(buf, OFF_IMAGE_TYPE)
        self.offset_bmap, self.offset_data = struct.unpack_from("<II", buf, OFF_BMAP)
        sector_size = _u32(buf, OFF_SECTOR_SIZE)
        block_size = _u32(buf, OFF_BLOCK_SIZE)
        self.blocks_in_image, self.blocks_allocated = struct.unpack_from("<II", buf, OFF_BLOCKS_IN_IMAGE)
        if signature != VDI_SIGNATURE:
            raise QimgError("Image not in VDI format (bad signature %08x)" % signature)
        if version != VDI_VERSION_1_1:
            raise UnsupportedError("unsupported VDI image (version %d.%d)" % (version >> 16, version & 0xFFFF))
        if self.offset_bmap % SECTOR_SIZE:
            raise UnsupportedError("unsupported VDI image (unaligned block map offset 0x%x)" % self.offset_bmap)
        if self.offset_data % SECTOR_SIZE:
            raise UnsupportedError("unsupported VDI image (unaligned data offset 0x%x)" % self.offset_data)
        if sector_size != SECTOR_SIZE:
            raise UnsupportedError("unsupported VDI image (sector size %d is not %d)" % (sector_size, SECTOR_SIZE))
        if block_size != DEFAULT_CLUSTER_SIZE:
            raise UnsupportedError("unsupported VDI image (block size %d is not %d)"
                                   % (block_size, DEFAULT_CLUSTER_SIZE))
        room = self.blocks_in_image * block_size
        if disk_size > room:
            raise UnsupportedError("unsupported VDI image (disk size %d, image bitmap has room for %d)"
                                   % (disk_size, room))
        if any(buf[OFF_UUID_LINK:OFF_UUID_LINK + 16]):
            raise UnsupportedError("unsupported VDI image (non-NULL link UUID)")
        if any(buf[OFF_UUID_PARENT:OFF_UUID_PARENT + 16]):
            raise UnsupportedError("unsupported VDI image (non-NULL parent UUID)")
        if self.blocks_in_image > VDI_BLOCKS_IN_IMAGE_MAX:
            raise UnsupportedError("unsupported VDI image (too many blocks %d, max is %d)"
                                   % (self.blocks_in_image, VDI_BLOCKS_IN_IMAGE_MAX))
        struct.pack_into("<Q", self.header, OFF_DISK_SIZE, disk_size)
        self.size = disk_size
        self.block_size = block_size
        self.cluster_size = block_size
        self._bmap: "np.ndarray | None" = None

    # ---- the block map ------------------------------------------------------------
    @property
    def bmap(self) -> "np.ndarray":
        """Map entries stored inside the file (entries past it read as 0)."""
        if self._bmap is None:
            import numpy as np

            want = self.blocks_in_image * 4
            have = max(0, min(want, self.file.size - self.offset_bmap))
            # a last entry cut by EOF reads with zeroes for its missing bytes
            raw = self.file.pread(self.offset_bmap, -(-have // 4) * 4) if have > 0 else b""
            self._bmap = np.frombuffer(raw, dtype="<u4").astype(np.uint32)
        return self._bmap

    def _entries(self, first: int, count: int) -> "np.ndarray":
        import numpy as np

        bmap = self.bmap
        out = np.zeros(count, dtype=np.uint32)
        stop = min(first + count, len(bmap))
        if stop > first:
            out[:stop - first] = bmap[first:stop]
        return out

    def _set_entry(self, index: int, value: int) -> None:
        import numpy as np

        bmap = self.bmap
        if index >= len(bmap):
            grown = np.zeros(index + 1, dtype=np.uint32)
            grown[:len(bmap)] = bmap
            self._bmap = bmap = grown
        bmap[index] = value

    def _run(self, offset: int, length: int) -> tuple[int, int | None]:
        """(bytes, host offset or None) of the run at ``offset``: blocks of
        one state whose data lies contiguously in the file."""
        import numpy as np

        bs = self.block_size
        first = offset // bs
        last = (offset + length - 1) // bs
        window = 64
        while True:
            n = min(window, last - first + 1)
            entries = self._entries(first, n).astype(np.int64)
            alloc = entries < VDI_DISCARDED
            brk = alloc[1:] != alloc[:-1]
            if alloc[0]:
                brk |= entries[1:] != entries[:-1] + 1
            hits = np.flatnonzero(brk)
            if len(hits) or n == last - first + 1:
                blocks = int(hits[0]) + 1 if len(hits) else n
                break
            window *= 8
        run = min(offset + length, (first + blocks) * bs) - offset
        if not alloc[0]:
            return run, None
        return run, self.offset_data + int(entries[0]) * bs + offset % bs

    # ---- I/O --------------------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> Extent:
        length = min(length, self.size - offset)
        run, host = self._run(offset, length)
        eof = EOF if offset + run >= self.size else 0
        if host is None:
            # QEMU reports ZERO, which makes the range allocated
            return Extent(offset, run, ZERO | ALLOCATED | eof)
        flags = DATA | OFFSET_VALID | ALLOCATED | eof
        if self.image_type == VDI_TYPE_STATIC:
            flags |= RECURSE
        return Extent(offset, run, flags, host, self.file.filename)

    def read(self, offset: int, length: int) -> bytes:
        parts = []
        end = offset + length
        while offset < end:
            run, host = self._run(offset, end - offset)
            parts.append(bytes(run) if host is None else self.file.pread(host, run))
            offset += run
        return b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        bs = self.block_size
        first_new = last_new = -1
        pos = 0
        while pos < len(view):
            run, host = self._run(offset + pos, len(view) - pos)
            if host is not None:
                self.file.pwrite(host, view[pos:pos + run])
                pos += run
                continue
            # Allocate each block of the run at the end, written whole
            # (the part outside the write zeroed), in guest order.
            while run > 0:
                index = (offset + pos) // bs
                within = (offset + pos) % bs
                n = min(run, bs - within)
                number = self.blocks_allocated
                self._set_entry(index, number)
                self.blocks_allocated += 1
                block = bytearray(bs)
                block[within:within + n] = view[pos:pos + n]
                self.file.pwrite(self.offset_data + number * bs, block)
                if first_new < 0:
                    first_new = index
                last_new = index
                pos += n
                run -= n
        if first_new >= 0:
            struct.pack_into("<I", self.header, OFF_BLOCKS_ALLOCATED, self.blocks_allocated)
            self.file.pwrite(0, self.header)
            # QEMU writes back the whole sectors of the map it changed
            per = SECTOR_SIZE // 4
            lo, hi = first_new // per * per, (last_new // per + 1) * per
            self.file.pwrite(self.offset_bmap + lo * 4, self._entries(lo, hi - lo).astype("<u4").tobytes())

    # ---- description, check ----------------------------------------------------------
    def check(self, repair: str | None = None) -> CheckResult:
        import numpy as np

        if repair:
            raise UnsupportedError("This image format does not support checks", 63)
        res = CheckResult()
        total = self.blocks_in_image
        bmap = self.bmap[:total]
        tail = total - len(bmap)  # entries past EOF read as block 0
        alloc = bmap < VDI_DISCARDED
        valid = alloc & (bmap < total)
        too_large = alloc & ~valid
        # a block number used a second time is an error where it recurs
        idx = np.flatnonzero(valid)
        _, first = np.unique(bmap[idx], return_index=True)
        dup = np.ones(len(idx), dtype=bool)
        dup[first] = False
        dup_blocks = idx[dup]
        allocated = int(len(idx))
        errors = np.union1d(np.flatnonzero(too_large), dup_blocks)
        lines = []
        for b in errors.tolist():
            entry = int(bmap[b])
            if entry >= total:
                lines.append(f"ERROR: block index {b} too large, is {entry}\n")
            else:
                lines.append(f"ERROR: block index {entry} also used by {entry}\n")
        res.corruptions += len(lines)
        out = sys.stderr
        sys.stdout.flush()
        out.write("".join(lines))
        if tail:
            allocated += tail
            repeats = tail - (0 if bool((bmap[valid] == 0).any()) else 1)
            res.corruptions += repeats
            line = "ERROR: block index 0 also used by 0\n"
            while repeats > 0:
                n = min(repeats, 1 << 14)
                out.write(line * n)
                repeats -= n
        if allocated != self.blocks_allocated:
            out.write(f"ERROR: allocated blocks mismatch, is {allocated}, should be {self.blocks_allocated}\n")
            res.corruptions += 1
        out.flush()
        return res
