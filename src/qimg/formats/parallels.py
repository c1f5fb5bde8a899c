"""parallels: the Parallels/Virtuozzo "expanding" disk (docs/interop/parallels.txt).

Layout: a 64-byte little-endian header, then the BAT (block allocation
table) of ``bat_entries`` 32-bit entries, then data clusters of ``tracks``
sectors.  A BAT entry times ``off_multiplier`` is the cluster's sector in the
file (0: not allocated); the multiplier is 1 for the old "WithoutFreeSpace"
magic and ``tracks`` for "WithouFreSpacExt".  New clusters are appended at
``data_end``; on close the file is cut back to it.

An image opened read-write is marked "in use" until it is closed; an image
still marked so was not closed cleanly and only opens read-only or for check.

The BAT is a numpy array, loaded on first I/O.  A BAT that runs past the end
of the file reads as zero entries, as QEMU's reads past EOF do; only the part
inside the file is kept in memory.
"""

from __future__ import annotations

import os
import struct
import sys
from typing import TYPE_CHECKING, Any

from qimg.block.check import CheckResult
from qimg.block.driver import Driver
from qimg.block.options import SIZE, OptionSpec
from qimg.block.status import ALLOCATED, DATA, EOF, OFFSET_VALID, Extent
from qimg.errors import QimgError

if TYPE_CHECKING:
    import numpy as np

SECTOR = 512
HEADER_MAGIC = b"WithoutFreeSpace"
HEADER_MAGIC2 = b"WithouFreSpacExt"
HEADER_VERSION = 2
HEADER_INUSE_MAGIC = 0x746F6E59
HEADER_SIZE = 64
HEADS_NUMBER = 16
SEC_IN_CYL = 32
DEFAULT_CLUSTER_SIZE = 1 << 20
MAX_PARALLELS_IMAGE_FACTOR = 1 << 32
INT32_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1
#: the largest single request QEMU's block layer accepts
BDRV_REQUEST_MAX_BYTES = (INT32_MAX >> 9) << 9
#: the largest image the block layer opens (INT64_MAX aligned down to 1 GiB)
BDRV_MAX_LENGTH = INT64_MAX & ~((1 << 30) - 1)
#: bdrv_opt_mem_align of a host file
MEM_ALIGN = 4096

# ParallelsHeader: magic[16] version heads cylinders tracks bat_entries
# nb_sectors(u64) inuse data_off flags ext_off(u64)
_HEADER = struct.Struct("<16sIIIIIQIIIQ")
OFF_INUSE = 44


EXT_MAGIC = 0xAB234CEF23DCEA87
EXT_DIRTY_BITMAP_MAGIC = 0x20385FAE252CB34A


def _s64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _warn(text: str) -> None:
    """warn_report(): "PROG: warning: TEXT" on stderr."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "qimg"
    if prog in ("__main__.py", "-m", "-c", ""):
        prog = "qimg"
    sys.stderr.write(f"{prog}: warning: {text}\n")


def bat_entry_off(index: int) -> int:
    return HEADER_SIZE + 4 * index


class ParallelsDriver(Driver):
    format_name = "parallels"
    create_opts = [
        OptionSpec("size", SIZE, "Virtual disk size"),
        OptionSpec("cluster_size", SIZE, "Parallels image cluster size", def_value_str=str(DEFAULT_CLUSTER_SIZE)),
    ]
    supports_check = True
    supports_get_info = False

    # ---- probing, creation ---------------------------------------------------
    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        if len(header) < HEADER_SIZE:
            return 0
        if header[:16] in (HEADER_MAGIC, HEADER_MAGIC2) and struct.unpack_from("<I", header, 16)[0] == HEADER_VERSION:
            return 100
        return 0

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        from qimg.formats.raw import RawDriver
        from qimg.protocols.file import File

        cl_size = options.get("cluster_size")
        if cl_size is None:
            cl_size = DEFAULT_CLUSTER_SIZE
        file_opts = {k: v for k, v in options.items() if k != "cluster_size"}
        RawDriver.create(filename, 0, file_opts)
        # sizes are silently rounded up to whole sectors
        size = -(-size // SECTOR) * SECTOR
        cl_size = -(-cl_size // SECTOR) * SECTOR
        if cl_size >= INT64_MAX // MAX_PARALLELS_IMAGE_FACTOR:
            raise QimgError("Cluster size is too large")
        if size >= MAX_PARALLELS_IMAGE_FACTOR * cl_size:
            raise QimgError("Image size is too large for this cluster size")
        bat_entries = -(-size // cl_size)
        bat_sectors = -(-bat_entry_off(bat_entries) // cl_size) * cl_size // SECTOR
        header = _HEADER.pack(HEADER_MAGIC2, HEADER_VERSION, HEADS_NUMBER,
                              size // SECTOR // HEADS_NUMBER // SEC_IN_CYL, cl_size // SECTOR,
                              bat_entries, size // SECTOR, 0, bat_sectors, 0, 0)
        with File(filename, read_only=False) as f:
            f.truncate(0)
            f.pwrite(0, header + bytes(SECTOR - HEADER_SIZE))
            # QEMU zeroes the BAT with write-zeroes, which allocates it
            f.truncate(bat_sectors * SECTOR, "falloc")

    # ---- open ------------------------------------------------------------------
    def do_open(self, options: dict[str, Any]) -> None:
        buf = self.file.pread(0, HEADER_SIZE)
        (magic, version, _heads, _cyl, tracks, bat_entries, nb_sectors, inuse, data_off, _flags,
         ext_off) = _HEADER.unpack(buf)
        if version != HEADER_VERSION:
            raise QimgError("Image not in Parallels format")
        if magic == HEADER_MAGIC:
            self.off_multiplier = 1
            nb_sectors &= 0xFFFFFFFF
        elif magic == HEADER_MAGIC2:
            self.off_multiplier = tracks
        else:
            raise QimgError("Image not in Parallels format")
        if tracks == 0:
            raise QimgError("Invalid image: Zero sectors per track")
        if tracks > INT32_MAX // 513:
            raise QimgError("Invalid image: Too big cluster")
        if bat_entries > INT32_MAX // 4:
            raise QimgError("Catalog too large")
        self.tracks = tracks
        self.bat_size = bat_entries
        # QEMU reads header and BAT in one request, rounded up to the
        # memory alignment unless that would reach into the data area
        # (data_end is in sectors there, compared with bytes: kept as is)
        table = bat_entry_off(bat_entries)
        request = -(-table // MEM_ALIGN) * MEM_ALIGN
        if (data_off or -(-table // SECTOR) * SECTOR) < request:
            request = table
        if request > BDRV_REQUEST_MAX_BYTES:
            raise QimgError(f"Could not open '{self.file.filename}': Input/output error")
        self.size = nb_sectors * SECTOR
        self._data_off = data_off
        self.header_unclean = inuse == HEADER_INUSE_MAGIC
        if self.header_unclean and not self.read_only and not options.get("check"):
            raise QimgError("parallels: Image was not closed correctly; cannot be opened read/write")
        self._bat: "np.ndarray | None" = None
        self._data_end: int | None = None
        # check -r opens read-write in QEMU from the start
        writable = not self.read_only or bool(options.get("check-repair"))
        if ext_off:
            if writable:
                _warn("Format Extension ignored in RW mode")
            else:
                self._check_extension(ext_off * SECTOR)
        if nb_sectors > BDRV_MAX_LENGTH // SECTOR:
            # the block layer's check once the driver has opened
            raise QimgError("Could not refresh total sector count: File too large")
        if not self.read_only:
            self.file.pwrite(OFF_INUSE, struct.pack("<I", HEADER_INUSE_MAGIC))

    # ---- the format extension (parallels-ext.c) --------------------------------
    def _check_extension(self, ext_off: int) -> None:
        """Validate the Format Extension cluster as QEMU does when it opens
        an image read-only (its dirty bitmaps are not kept: no command here
        shows them).  What lies past the end of the file reads as zeroes."""
        import hashlib

        cs = self.tracks * SECTOR
        inside = max(0, min(cs, self.file.size - ext_off))
        data = self.file.pread(ext_off, inside) if inside else b""
        magic = struct.unpack_from("<Q", data.ljust(8, b"\0"))[0]
        if magic != EXT_MAGIC:
            raise QimgError("Wrong parallels Format Extension magic: 0x%x, expected: 0x%x" % (magic, EXT_MAGIC))
        md5 = hashlib.md5(data[24:])
        zeros = cs - max(24, len(data))
        chunk = bytes(min(zeros, 1 << 20))
        while zeros > 0:
            md5.update(chunk[:min(zeros, len(chunk))])
            zeros -= len(chunk)
        checksum = data[8:24].ljust(16, b"\0")
        if md5.digest() != checksum:
            raise QimgError("Wrong checksum in Format Extension header. Format extension is corrupted.")
        pos = 24
        while True:
            remaining = cs - pos
            if remaining < 24:
                raise QimgError(f"Can not read feature header, as remaining bytes ({remaining}) in Format "
                                "Extension is less than Feature header size (24)")
            fmagic, flags, size = struct.unpack_from("<QQI", data[pos:pos + 24].ljust(24, b"\0"))
            pos += 24
            remaining -= 24
            if flags:
                raise QimgError("Flags for extension feature are unsupported")
            if size > remaining:
                raise QimgError("Feature data_size exceedes Format Extension cluster")
            if fmagic == 0:
                return
            if fmagic != EXT_DIRTY_BITMAP_MAGIC:
                raise QimgError(f"Unknown feature: 0x{fmagic:x}")
            self._check_bitmap(data[pos:pos + size].ljust(size, b"\0"), size)
            pos = -(-(pos + size) // 8) * 8

    def _check_bitmap(self, feature: bytes, size: int) -> None:
        if size < 32:
            raise QimgError("Too small Bitmap Feature area in Parallels Format Extension: "
                            f"{size} bytes, expected at least 32 bytes")
        sectors, granularity, l1_size = struct.unpack_from("<Q16xII", feature)
        total = self.size // SECTOR
        if sectors != total:
            raise QimgError(f"Bitmap size (in sectors) {_s64(sectors)} differs from disk size in sectors {total}")
        if l1_size * 8 > size - 32:
            raise QimgError("Bitmaps feature corrupted: l1 table exceeds extension data_size")
        granularity = (granularity << 9) & 0xFFFFFFFF
        if granularity < 512 or granularity & (granularity - 1):
            raise QimgError("Granularity must be power of 2")
        # the serialized bitmap: one bit per granule, in 64-bit words
        bits = -(-self.size // granularity)
        tab_size = -(-(-(-bits // 64) * 8) // (self.tracks * SECTOR))
        if tab_size != l1_size:
            raise QimgError(f"Bitmap table size {l1_size} does not correspond to bitmap size and cluster "
                            f"size. Expected {tab_size}")

    # ---- the BAT --------------------------------------------------------------
    @property
    def bat(self) -> "np.ndarray":
        """BAT entries stored inside the file (entries past it read as 0)."""
        if self._bat is None:
            import numpy as np

            want = self.bat_size * 4
            have = max(0, min(want, self.file.size - HEADER_SIZE))
            # a last entry cut by EOF reads with zeroes for its missing bytes
            raw = self.file.pread(HEADER_SIZE, -(-have // 4) * 4) if have > 0 else b""
            self._bat = np.frombuffer(raw, dtype="<u4").astype(np.uint32)
        return self._bat

    @property
    def data_end(self) -> int:
        """The first free sector: past the BAT, or past the last cluster."""
        if self._data_end is None:
            # QEMU takes the byte offset past the BAT for a sector number
            end = self._data_off or -(-bat_entry_off(self.bat_size) // SECTOR) * SECTOR
            bat = self.bat
            if len(bat):
                high = int(bat.max()) * self.off_multiplier
                if high >= end:
                    end = high + self.tracks
            self._data_end = end
        return self._data_end

    def _entries(self, first: int, count: int) -> "np.ndarray":
        import numpy as np

        bat = self.bat
        out = np.zeros(count, dtype=np.int64)
        stop = min(first + count, len(bat))
        if stop > first:
            out[:stop - first] = bat[first:stop]
        return out

    def _run(self, offset: int, length: int) -> tuple[int, int | None]:
        """(bytes, host offset or None) of the run at ``offset``: clusters of
        one state whose data lies contiguously in the file."""
        import numpy as np

        cs = self.tracks * SECTOR
        first = offset // cs
        last = (offset + length - 1) // cs
        stored = len(self.bat)
        if first >= stored:
            # past the stored BAT (or past bat_size): nothing is allocated
            return offset + length - offset, None
        window = 64
        while True:
            n = min(window, last - first + 1, stored - first)
            host = self._entries(first, n) * self.off_multiplier
            alloc = host != 0
            brk = alloc[1:] != alloc[:-1]
            if alloc[0]:
                brk |= host[1:] != host[:-1] + self.tracks
            hits = np.flatnonzero(brk)
            if len(hits):
                clusters = int(hits[0]) + 1
                break
            if first + n == stored or n == last - first + 1:
                # an unallocated run goes on through the entries not stored
                clusters = last - first + 1 if not alloc[0] else n
                break
            window *= 8
        run = min(offset + length, (first + clusters) * cs) - offset
        if not alloc[0]:
            return run, None
        return run, int(host[0]) * SECTOR + offset % cs

    # ---- I/O --------------------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> Extent:
        length = min(length, self.size - offset)
        run, host = self._run(offset, length)
        eof = EOF if offset + run >= self.size else 0
        if host is None:
            return Extent(offset, run, eof)
        return Extent(offset, run, DATA | OFFSET_VALID | ALLOCATED | eof, host, self.file.filename)

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
        pos = 0
        while pos < len(view):
            run, host = self._run(offset + pos, len(view) - pos)
            if host is None:
                host = self._allocate(offset + pos, run)
            self.file.pwrite(host, view[pos:pos + run])
            pos += run

    def _allocate(self, offset: int, length: int) -> int:
        """Append the clusters of an unallocated run at data_end, zeroed;
        the host offset of ``offset``."""
        import numpy as np

        cs = self.tracks * SECTOR
        idx = offset // cs
        count = -(-(offset + length) // cs) - idx
        if idx + count > self.bat_size:
            raise QimgError("Invalid argument")
        start = self.data_end
        space = count * self.tracks
        file_len = self._file_length()
        if (start + space) * SECTOR > file_len:
            # what lies past data_end may be stale: new clusters read as zeroes
            if file_len > start * SECTOR:
                self.file.write_zeroes(start * SECTOR, file_len - start * SECTOR)
            self.file.truncate((start + space) * SECTOR, "falloc")
        bat = self.bat
        if idx + count > len(bat):
            grown = np.zeros(idx + count, dtype=np.uint32)
            grown[:len(bat)] = bat
            self._bat = bat = grown
        values = (start + np.arange(count, dtype=np.int64) * self.tracks) // self.off_multiplier
        bat[idx:idx + count] = values.astype(np.uint32)
        self._data_end = start + space
        self.file.pwrite(bat_entry_off(idx), bat[idx:idx + count].astype("<u4").tobytes())
        return start * SECTOR + offset % cs

    def _file_length(self) -> int:
        """bdrv_getlength of the file: whole sectors."""
        return -(-self.file.size // SECTOR) * SECTOR

    def close(self) -> None:
        if not self.read_only and self.file.fd >= 0:
            self.file.pwrite(OFF_INUSE, bytes(4))
            self.file.truncate(self.data_end * SECTOR)

    # ---- check --------------------------------------------------------------------------
    def check(self, repair: str | None = None) -> CheckResult:
        import numpy as np

        fix_errors = repair == "all"
        fix_leaks = repair in ("leaks", "all")
        res = CheckResult()
        out = sys.stderr
        sys.stdout.flush()
        size = self._file_length()
        cs = self.tracks * SECTOR
        # data_end is QEMU's from open time: dropping clusters here does
        # not lower it, so close still cuts (or extends) the file to it
        _ = self.data_end
        if self.header_unclean:
            out.write(f"{'Repairing' if fix_errors else 'ERROR'} image was not closed correctly\n")
            res.corruptions += 1
            if fix_errors:
                res.corruptions_fixed += 1
                self.header_unclean = False
        bat = self._entries(0, self.bat_size)
        off = bat * self.off_multiplier * SECTOR
        outside = np.flatnonzero(off > size)
        if len(outside):
            word = "Repairing" if fix_errors else "ERROR"
            out.write("".join(f"{word} cluster {i} is outside image\n" for i in outside.tolist()))
            res.corruptions += len(outside)
            if fix_errors:
                off[outside] = 0
                self._set_entries_zero(outside)
                res.corruptions_fixed += len(outside)
        res.total_clusters = self.bat_size
        res.compressed_clusters = 0
        used = off != 0
        res.allocated_clusters = int(used.sum())
        high = int(off.max()) if len(off) else 0
        # a cluster right after its predecessor in the file is not fragmented
        prev = off[:-1]
        follows = used[1:] & (prev != 0) & (off[1:] != prev + cs)
        res.fragmented_clusters = int(follows.sum())
        res.image_end_offset = high + cs
        if size > res.image_end_offset:
            count = -(-(size - res.image_end_offset) // cs)
            out.write(f"{'Repairing' if fix_leaks else 'ERROR'} space leaked at the end of the image "
                      f"{size - res.image_end_offset}\n")
            res.leaks += count
            if fix_leaks:
                self.file.truncate(res.image_end_offset)
                res.leaks_fixed += count
        out.flush()
        return res

    def _set_entries_zero(self, indices: "np.ndarray") -> None:
        """Drop BAT entries (check -r all) and write the BAT back."""
        bat = self.bat
        inside = indices[indices < len(bat)]
        bat[inside] = 0
        self.file.pwrite(HEADER_SIZE, bat.astype("<u4").tobytes())
        self.file.flush()
