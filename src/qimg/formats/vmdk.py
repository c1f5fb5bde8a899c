"""vmdk: VMware virtual disks, read as QEMU's block/vmdk.c reads them.

An image is a list of *extents* laid end to end.  A *hosted sparse* extent
(magic "KDMV", VMDK4) starts with a 512-byte header (little endian): the
capacity and grain size in sectors, the number of entries per grain table
(512), the grain directory's sector (and, with the RGD flag, a redundant
one's), an embedded text descriptor.  The grain directory (GD) holds one
32-bit sector number per grain table (GT); a GT holds one 32-bit sector
number per grain (0: unallocated; 1 with the zero-grain flag: zeroes).
streamOptimized images compress every grain (deflate, after a 12-byte
marker: LBA and size) and keep the real header in a footer at the end of
the file when the header's GD offset is all ones.  The older "COWD" sparse
extent (VMDK3) has 4096-entry tables.

Other images are a text *descriptor file* whose extent lines name the
extent files: FLAT (raw data at a sector offset), SPARSE (a hosted sparse
file), VMFS / VMFSSPARSE.  monolithicFlat and the twoGbMaxExtent*
subformats are of this kind.

As QEMU: unallocated grains read from the parent image named by
``parentFileNameHint`` (or as zeroes), the CID and parent CID come from the
descriptor's first "CID" and "parentCID" strings.  Creating and writing
are done for monolithicSparse only (as vmdk.c: all grain tables made at
create time, a new grain appended, GT and redundant GT updated); other
subformats are refused.
"""

from __future__ import annotations

import errno
import os
import re
import struct
from typing import Any

from qimg.block.driver import Driver
from qimg.block.options import BOOL, SIZE, STRING, OptionSpec
from qimg.block.status import ALLOCATED, COMPRESSED, DATA, EOF, OFFSET_VALID, ZERO, Extent
from qimg.errors import QimgError

SECTOR = 512
VMDK3_MAGIC = b"COWD"
VMDK4_MAGIC = b"KDMV"
DESC_SIZE = 20 * SECTOR
VMDK4_GD_AT_END = 0xFFFFFFFFFFFFFFFF
VMDK4_FLAG_RGD = 1 << 1
VMDK4_FLAG_ZERO_GRAIN = 1 << 2
VMDK4_FLAG_MARKER = 1 << 17
VMDK4_COMPRESSION_DEFLATE = 1
VMDK_GTE_ZEROED = 1
MARKER_END_OF_STREAM = 0
MARKER_FOOTER = 3
#: the VMDK4Header after the magic: version, flags, capacity, granularity,
#: desc_offset, desc_size, num_gtes_per_gt, rgd_offset, gd_offset,
#: grain_offset, filler, check_bytes, compressAlgorithm
_VMDK4 = struct.Struct("<IIQQQQIQQQc4sH")
#: VMDK3Header after the magic: version, flags, disk_sectors, granularity,
#: l1dir_offset, l1dir_size, file_sectors, cylinders, heads, sectors_per_track
_VMDK3 = struct.Struct("<IIIIIIIIII")
L2_CACHE_SIZE = 16

_UNALLOC, _ZEROED, _OK = 0, 1, 2

_WS = b" \t\n\v\f\r"
#: a grain table entry other than 0 (a 4-aligned hit is found by its first nonzero byte)
_NONZERO = re.compile(b"[^\\x00]")


def _eio() -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO))


def _einval() -> OSError:
    return OSError(errno.EINVAL, os.strerror(errno.EINVAL))


def _cstr(buf: bytes) -> bytes:
    """The C string at the start of ``buf`` (up to its first NUL)."""
    end = buf.find(b"\0")
    return buf if end < 0 else buf[:end]


def _scan_hex32(buf: bytes) -> int | None:
    """sscanf("%x"): None when there is no hex number."""
    m = re.match(rb"[ \t\n\v\f\r]*([+-]?)(?:0[xX](?=[0-9a-fA-F]))?([0-9a-fA-F]+)", buf)
    if m is None:
        return None
    value = int(m.group(2), 16)
    if value > 0xFFFFFFFF:
        value = 0xFFFFFFFF  # strtoul saturates
    if m.group(1) == b"-":
        value = -value
    return value & 0xFFFFFFFF


def _scan_extent_line(buf: bytes, pos: int) -> tuple[int, list[Any]]:
    """sscanf(p, "%10s %ld %10s \\"%511[^\\n\\r\\"]\\" %ld"): the number of
    fields matched and their values."""
    n = len(buf)
    out: list[Any] = []

    def skip(i: int) -> int:
        while i < n and buf[i] in _WS:
            i += 1
        return i

    def word(i: int) -> tuple[int, bytes | None]:
        i = skip(i)
        j = i
        while j < n and j - i < 10 and buf[j] not in _WS:
            j += 1
        return j, (buf[i:j] if j > i else None)

    def number(i: int) -> tuple[int, int | None]:
        i = skip(i)
        m = re.compile(rb"[+-]?[0-9]+").match(buf, i)
        if m is None:
            return i, None
        v = int(m.group(0))
        v = max(min(v, (1 << 63) - 1), -(1 << 63))
        return m.end(), v

    pos, access = word(pos)
    if access is None:
        return 0, out
    out.append(access)
    pos, sectors = number(pos)
    if sectors is None:
        return 1, out
    out.append(sectors)
    pos, typ = word(pos)
    if typ is None:
        return 2, out
    out.append(typ)
    pos = skip(pos)
    if pos >= n or buf[pos] != 0x22:
        return 3, out
    pos += 1
    j = pos
    while j < n and j - pos < 511 and buf[j] not in b"\n\r\"":
        j += 1
    if j == pos:
        return 3, out
    out.append(buf[pos:j])
    pos = j
    if pos >= n or buf[pos] != 0x22:
        return 4, out
    pos += 1
    pos, flat = number(pos)
    if flat is None:
        return 4, out
    out.append(flat)
    return 5, out


class _Extent:
    """One VmdkExtent."""

    def __init__(self, file: Any, flat: bool, sectors: int, l1_offset: int, l1_backup_offset: int,
                 l1_size: int, l2_size: int, cluster_sectors: int, end_sector: int) -> None:
        self.file = file
        self.flat = flat
        self.sectors = sectors
        self.l1_table_offset = l1_offset
        self.l1_backup_table_offset = l1_backup_offset
        self.l1_size = l1_size
        self.l1_entry_sectors = (l2_size * cluster_sectors) & 0xFFFFFFFF
        self.l2_size = l2_size
        self.cluster_sectors = sectors if flat else cluster_sectors
        self.end_sector = end_sector
        self.flat_start_offset = 0
        self.compressed = False
        self.has_marker = False
        self.has_zero_grain = False
        self.version = 0
        self.type: str | None = None
        self.l1_table: Any = None
        self.l2_cache: dict[int, bytes] = {}
        self.l1_backup: Any = None
        self.next_cluster_sector = 0

    @property
    def start(self) -> int:
        """The guest byte offset where the extent starts."""
        return (self.end_sector - self.sectors) * SECTOR


class VmdkDriver(Driver):
    format_name = "vmdk"
    create_opts = [
        OptionSpec("size", SIZE, "Virtual disk size"),
        OptionSpec("adapter_type", STRING,
                   "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX"),
        OptionSpec("backing_file", STRING, "File name of a base image"),
        OptionSpec("backing_fmt", STRING, "Must be 'vmdk' if present"),
        OptionSpec("compat6", BOOL, "VMDK version 6 image", def_value_str="off"),
        OptionSpec("hwversion", STRING, "VMDK hardware version", def_value_str="undefined"),
        OptionSpec("toolsversion", STRING, "VMware guest tools version"),
        OptionSpec("subformat", STRING,
                   "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | "
                   "twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} "),
        OptionSpec("zeroed_grain", BOOL, "Enable efficient zero writes using the zeroed-grain GTE feature"),
    ]
    supports_create = True
    supports_write = True
    supports_backing = True
    has_zero_init = True

    # ---- creation (monolithicSparse only) -------------------------------------------
    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        import random

        from qimg.formats.raw import RawDriver
        from qimg.protocols.file import File

        size = (size + SECTOR - 1) // SECTOR * SECTOR
        subformat = options.get("subformat") or "monolithicSparse"
        if subformat not in ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
                             "twoGbMaxExtentFlat", "streamOptimized"):
            raise QimgError(f"Unknown subformat: {subformat}")
        if subformat != "monolithicSparse":
            raise QimgError(f"Creating {subformat} images is not supported")
        if options.get("backing_file"):
            raise QimgError("Creating vmdk images with a backing file is not supported")
        adapter = options.get("adapter_type") or "ide"
        if adapter not in ("ide", "buslogic", "lsilogic", "legacyESX"):
            raise QimgError(f"Unknown adapter type: '{adapter}'")
        compat6 = bool(options.get("compat6"))
        hwversion = options.get("hwversion")
        if compat6 and hwversion:
            raise QimgError("compat6 cannot be enabled with hwversion set")
        hw = "6" if compat6 else (hwversion or "4")
        tools = options.get("toolsversion") or "2147483647"
        zeroed_grain = bool(options.get("zeroed_grain"))
        heads = 16 if adapter == "ide" else 255
        cylinders = size // (63 * heads * SECTOR)
        file_opts = {k: v for k, v in options.items() if k not in {o.name for o in cls.create_opts} - {"size"}}
        RawDriver.create(filename, 0, file_opts)
        capacity = size // SECTOR
        granularity = 128
        gtes = 512
        grains = -(-capacity // granularity)
        gt_size = -(-(gtes * 4) // SECTOR)
        gt_count = -(-grains // gtes)
        gd_sectors = -(-(gt_count * 4) // SECTOR)
        rgd_offset = 1 + 20
        gd_offset = rgd_offset + gd_sectors + gt_size * gt_count
        grain_offset = -(-(gd_offset + gd_sectors + gt_size * gt_count) // granularity) * granularity
        version = 2 if zeroed_grain else 1
        flags = VMDK4_FLAG_RGD | 1 | (VMDK4_FLAG_ZERO_GRAIN if zeroed_grain else 0)
        header = VMDK4_MAGIC + _VMDK4.pack(version, flags, capacity, granularity, 1, 20, gtes, rgd_offset,
                                           gd_offset, grain_offset, b"\0", b"\n \r\n", 0)
        desc = ("# Disk DescriptorFile\n"
                "version=1\n"
                f"CID={random.getrandbits(32):x}\n"
                "parentCID=ffffffff\n"
                "createType=\"monolithicSparse\"\n"
                "\n"
                "# Extent description\n"
                f"RW {capacity} SPARSE \"{os.path.basename(filename)}\"\n"
                "\n"
                "# The Disk Data Base\n"
                "#DDB\n"
                "\n"
                f"ddb.virtualHWVersion = \"{hw}\"\n"
                f"ddb.geometry.cylinders = \"{cylinders}\"\n"
                f"ddb.geometry.heads = \"{heads}\"\n"
                "ddb.geometry.sectors = \"63\"\n"
                f"ddb.adapterType = \"{adapter}\"\n"
                f"ddb.toolsVersion = \"{tools}\"\n").encode()
        import array

        with File(filename, read_only=False) as f:
            f.pwrite(0, header)
            f.truncate(grain_offset * SECTOR)
            for start in (rgd_offset, gd_offset):
                gd = array.array("I", range(start + gd_sectors, start + gd_sectors + gt_count * gt_size, gt_size))
                if struct.pack("=I", 1) != struct.pack("<I", 1):
                    gd.byteswap()
                raw = gd.tobytes()
                raw += bytes(gd_sectors * SECTOR - len(raw))
                if raw:
                    f.pwrite(start * SECTOR, raw)
            f.pwrite(SECTOR, desc)

    # ---- probing ---------------------------------------------------------------
    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        """vmdk_probe: the sparse magics, or a descriptor whose first
        non-comment, non-blank line is version=1/2/3."""
        if len(header) < 4:
            return 0
        if header[:4] in (VMDK3_MAGIC, VMDK4_MAGIC):
            return 100
        p, end = 0, len(header)
        while p < end:
            c = header[p]
            if c == 0x23:  # '#'
                while p < end and header[p] != 0x0A:
                    p += 1
                p += 1
                continue
            if c == 0x20:
                while p < end and header[p] == 0x20:
                    p += 1
                if p < end and header[p] == 0x0D:
                    p += 1
                if p == end or header[p] != 0x0A:
                    return 0
                p += 1
                continue
            rest = header[p:p + 11]
            if rest[:10] in (b"version=1\n", b"version=2\n", b"version=3\n"):
                return 100
            if rest in (b"version=1\r\n", b"version=2\r\n", b"version=3\r\n"):
                return 100
            return 0
        return 0

    # ---- open ------------------------------------------------------------------
    def do_open(self, options: dict[str, Any]) -> None:
        self.extents: list[_Extent] = []
        self.create_type: str | None = None
        self.desc_offset = 0
        self._own_files: list[Any] = []
        self._parent_hint: str | None = None
        self.cid_updated = False
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        buf = self._read_desc(self.file, 0)
        if buf[:4] in (VMDK3_MAGIC, VMDK4_MAGIC):
            self._open_sparse(self.file, buf)
            self.desc_offset = 0x200
        else:
            self._open_desc_file(buf)
        self._parent_open()
        self.cid = self._read_cid(False)
        self.parent_cid = self._read_cid(True)
        self.size = self.extents[-1].end_sector * SECTOR if self.extents else 0
        ext0 = self.extents[0] if self.extents else None
        self.cluster_size = None
        if ext0 is not None and not ext0.flat and all(self._type_eq(ext0, e) for e in self.extents[1:]):
            self.cluster_size = ext0.cluster_sectors * SECTOR

    def allocated_file_size(self) -> int:
        # vmdk_get_allocated_file_size: the descriptor and every extent file
        return self.file.allocated_size() + sum(f.allocated_size() for f in self._own_files)

    @staticmethod
    def _type_eq(a: _Extent, b: _Extent) -> bool:
        return a.flat == b.flat and a.compressed == b.compressed and (a.flat or a.cluster_sectors == b.cluster_sectors)

    @staticmethod
    def _read_desc(file: Any, desc_offset: int) -> bytes:
        size = (file.size + SECTOR - 1) // SECTOR * SECTOR  # bdrv_getlength: whole sectors
        if size < 4:
            raise QimgError("File is too small, not a valid image")
        size = min(size, (1 << 20) - 1)
        return file.pread(desc_offset, size)

    def _open_sparse(self, file: Any, buf: bytes) -> None:
        magic = buf[:4]
        if magic == VMDK3_MAGIC:
            self._open_vmfs_sparse(file)
        elif magic == VMDK4_MAGIC:
            self._open_vmdk4(file)
        else:
            raise QimgError("Image not in VMDK format")

    def _add_extent(self, file: Any, flat: bool, sectors: int, l1_offset: int, l1_backup_offset: int,
                    l1_size: int, l2_size: int, cluster_sectors: int) -> _Extent:
        if cluster_sectors > 0x200000:
            raise QimgError("Invalid granularity, image may be corrupt")
        if l1_size > 32 * 1024 * 1024:
            raise QimgError("L1 size too big")
        prev = self.extents[-1].end_sector if self.extents else 0
        ext = _Extent(file, flat, sectors, l1_offset, l1_backup_offset, l1_size, l2_size, cluster_sectors,
                      prev + sectors)
        nb = (file.size + SECTOR - 1) // SECTOR
        ext.next_cluster_sector = -(-nb // cluster_sectors) * cluster_sectors if cluster_sectors else nb
        self.extents.append(ext)
        return ext

    def _init_tables(self, ext: _Extent) -> None:
        from array import array

        nbytes = ext.l1_size * 4
        file_size = ext.file.size
        # past the end of the file the table reads as zeroes: read only what is there
        avail = max(0, min(nbytes, file_size - ext.l1_table_offset))
        table = array("I")
        table.frombytes(ext.file.pread(ext.l1_table_offset, avail - avail % 4) if avail >= 4 else b"")
        if struct.pack("=I", 1) != struct.pack("<I", 1):
            table.byteswap()
        ext.l1_table = table
        if ext.l1_backup_table_offset:
            avail = max(0, min(nbytes, file_size - ext.l1_backup_table_offset))
            backup = array("I")
            backup.frombytes(ext.file.pread(ext.l1_backup_table_offset, avail - avail % 4) if avail >= 4 else b"")
            if struct.pack("=I", 1) != struct.pack("<I", 1):
                backup.byteswap()
            ext.l1_backup = backup

    def _open_vmfs_sparse(self, file: Any) -> None:
        hdr = file.pread(4, _VMDK3.size)
        _v, _f, disk_sectors, granularity, l1dir_offset, l1dir_size = _VMDK3.unpack(hdr)[:6]
        ext = self._add_extent(file, False, disk_sectors, l1dir_offset << 9, 0, l1dir_size, 4096, granularity)
        self._init_tables(ext)

    def _open_vmdk4(self, file: Any) -> None:
        hdr = file.pread(4, _VMDK4.size)
        fields = list(_VMDK4.unpack(hdr))
        capacity, desc_offset = fields[2], fields[4]
        if capacity == 0 and desc_offset:
            buf = self._read_desc(file, (desc_offset << 9) & ((1 << 64) - 1))
            self._open_desc_file(buf)
            return
        if self.create_type is None:
            self.create_type = "monolithicSparse"
        if fields[8] == VMDK4_GD_AT_END:
            total = (file.size + SECTOR - 1) // SECTOR * SECTOR
            foot = file.pread(total - 1536, 1536) if total >= 1536 else b""
            ok = len(foot) == 1536
            if ok:
                fval, fsize, ftype = struct.unpack_from("<QII", foot, 0)
                eval_, esize, etype = struct.unpack_from("<QII", foot, 1024)
                ok = (foot[512:516] == VMDK4_MAGIC and fsize == 0 and ftype == MARKER_FOOTER
                      and eval_ == 0 and esize == 0 and etype == MARKER_END_OF_STREAM)
            if not ok:
                raise QimgError("Invalid footer")
            fields = list(_VMDK4.unpack_from(foot, 516))
        (version, flags, capacity, granularity, _desc_offset, _desc_size, num_gtes, rgd_offset, gd_offset,
         grain_offset, _filler, _check, compress) = fields
        compressed = compress == VMDK4_COMPRESSION_DEFLATE
        if version > 3:
            raise QimgError(f"Unsupported VMDK version {version}")
        if version == 3 and not self.read_only and not compressed:
            raise QimgError("VMDK version 3 must be read only")
        if num_gtes > 512:
            raise QimgError("L2 table size too big")
        l1_entry_sectors = (num_gtes * granularity) & 0xFFFFFFFF
        if l1_entry_sectors == 0:
            raise QimgError("L1 entry size is invalid")
        l1_size = ((capacity + l1_entry_sectors - 1) // l1_entry_sectors) & 0xFFFFFFFF
        l1_backup_offset = (rgd_offset << 9) & ((1 << 64) - 1) if flags & VMDK4_FLAG_RGD else 0
        if (file.size + SECTOR - 1) // SECTOR < grain_offset:
            raise QimgError(f"File truncated, expecting at least {(grain_offset * SECTOR) & ((1 << 63) - 1)} bytes")
        if capacity >= 1 << 63:
            capacity -= 1 << 64
        ext = self._add_extent(file, False, capacity, (gd_offset << 9) & ((1 << 64) - 1), l1_backup_offset,
                               l1_size, num_gtes, granularity)
        ext.compressed = compressed
        if compressed:
            self.create_type = "streamOptimized"
        ext.has_marker = bool(flags & VMDK4_FLAG_MARKER)
        ext.version = version
        ext.has_zero_grain = bool(flags & VMDK4_FLAG_ZERO_GRAIN)
        self._init_tables(ext)

    def _parse_description(self, desc: bytes, name: bytes) -> str | None:
        desc = _cstr(desc)
        pos = desc.find(name)
        if pos < 0:
            return None
        pos += len(name) + 2
        if pos >= len(desc):
            return None
        end = desc.find(b"\"", pos)
        if end < 0 or end - pos + 1 > 128:
            return None
        return desc[pos:end].decode("latin-1")

    def _open_desc_file(self, buf: bytes) -> None:
        ct = self._parse_description(buf, b"createType")
        if ct is None:
            raise QimgError("invalid VMDK image descriptor")
        if ct not in ("monolithicFlat", "vmfs", "vmfsSparse", "seSparse", "twoGbMaxExtentSparse",
                      "twoGbMaxExtentFlat"):
            raise QimgError(f"Unsupported image type '{ct}'")
        self.create_type = ct
        self.desc_offset = 0
        self._parse_extents(_cstr(buf))

    def _parse_extents(self, desc: bytes) -> None:
        from qimg.protocols.file import File

        desc_dir = os.path.dirname(self.file.filename)
        p = 0
        n = len(desc)
        while p < n:
            nl = desc.find(b"\n", p)
            np_ = n if nl < 0 else nl + 1
            matches, vals = _scan_extent_line(desc, p)
            line_p = p
            p = np_
            if matches < 4 or vals[0] != b"RW":
                continue
            sectors, typ, fname = vals[1], vals[2], vals[3]
            flat_offset = vals[4] if matches == 5 else -1
            invalid = False
            if typ == b"FLAT":
                invalid = matches != 5 or flat_offset < 0
            elif typ == b"VMFS":
                if matches == 4:
                    flat_offset = 0
                else:
                    invalid = True
            elif matches != 4:
                invalid = True
            if invalid:
                end = np_
                if end > line_p and desc[end - 1:end] == b"\n":
                    end -= 1
                raise QimgError("Invalid extent line: " + desc[line_p:end].decode("latin-1"))
            if sectors <= 0 or typ not in (b"FLAT", b"SPARSE", b"VMFS", b"VMFSSPARSE", b"SESPARSE"):
                continue
            name = os.fsdecode(fname)
            path = name if os.path.isabs(name) else (os.path.join(desc_dir, name) if desc_dir else name)
            if typ == b"SESPARSE":
                raise QimgError("Unsupported extent type 'SESPARSE'")
            f = File(path, read_only=True)
            self._own_files.append(f)
            if typ in (b"FLAT", b"VMFS"):
                ext = self._add_extent(f, True, sectors, 0, 0, 0, 0, 0)
                ext.flat_start_offset = (flat_offset << 9) & ((1 << 63) - 1)
            else:
                self._open_sparse(f, self._read_desc(f, 0))
                ext = self.extents[-1]
            ext.type = typ.decode()

    def _desc_text(self) -> bytes:
        return self.file.pread(self.desc_offset, DESC_SIZE)

    def _parent_open(self) -> None:
        desc = _cstr(self._desc_text())
        pos = desc.find(b"parentFileNameHint")
        if pos < 0:
            return
        pos += len("parentFileNameHint") + 2
        end = desc.find(b"\"", pos)
        if end < 0 or end - pos > 4095:
            raise self._open_einval()
        self._parent_hint = os.fsdecode(desc[pos:end])

    def _open_einval(self) -> QimgError:
        """A failure vmdk_open leaves without a message: the block layer's."""
        return QimgError(f"Could not open '{self.file.filename}': {os.strerror(errno.EINVAL)}")

    def _read_cid(self, parent: bool) -> int:
        desc = _cstr(self._desc_text()[:DESC_SIZE - 1])
        name = b"parentCID" if parent else b"CID"
        pos = desc.find(name)
        value = None if pos < 0 else _scan_hex32(desc[pos + len(name) + 1:])
        if value is None:
            raise self._open_einval()
        return value

    def close(self) -> None:
        for f in getattr(self, "_own_files", []):
            try:
                f.close()
            except Exception:  # noqa: BLE001 - closing read-only files
                pass
        self._own_files = []

    # ---- backing -----------------------------------------------------------------
    @property
    def backing_filename(self) -> str | None:
        return self._parent_hint

    @property
    def backing_format(self) -> str | None:
        return "vmdk" if self._parent_hint is not None else None

    # ---- mapping -------------------------------------------------------------------
    def _find_extent(self, offset: int) -> _Extent:
        sector = offset >> 9
        for ext in self.extents:
            if sector < ext.end_sector:
                return ext
        raise _eio()

    def _l2_table(self, ext: _Extent, l2_offset: int) -> bytes:
        table = ext.l2_cache.get(l2_offset)
        if table is None:
            if len(ext.l2_cache) >= L2_CACHE_SIZE:
                ext.l2_cache.pop(next(iter(ext.l2_cache)))
            table = ext.file.pread(l2_offset * SECTOR, ext.l2_size * 4)
            ext.l2_cache[l2_offset] = table
        return table

    def _locate(self, ext: _Extent, offset: int) -> tuple[int, bytes, int]:
        """(l1_index, the grain table, l2_index) of guest ``offset`` in a
        sparse extent; empty table when the GT is not allocated."""
        rel = offset - ext.start
        l1_index = (rel >> 9) // ext.l1_entry_sectors
        if l1_index >= ext.l1_size:
            raise _eio()
        l2_offset = ext.l1_table[l1_index] if l1_index < len(ext.l1_table) else 0
        l2_index = ((rel >> 9) // ext.cluster_sectors) % ext.l2_size
        if not l2_offset:
            return l1_index, b"", l2_index
        return l1_index, self._l2_table(ext, l2_offset), l2_index

    def _cluster(self, ext: _Extent, offset: int) -> tuple[int, int]:
        """get_cluster_offset without allocation: (state, host offset)."""
        if ext.flat:
            return _OK, ext.flat_start_offset
        _l1, table, l2_index = self._locate(ext, offset)
        if not table:
            return _UNALLOC, 0
        entry = struct.unpack_from("<I", table, 4 * l2_index)[0]
        if ext.has_zero_grain and entry == VMDK_GTE_ZEROED:
            return _ZEROED, 0
        if not entry:
            return _UNALLOC, 0
        return _OK, entry << 9

    def _in_cluster(self, ext: _Extent, offset: int) -> int:
        return (offset - ext.start) % (ext.cluster_sectors * SECTOR)

    def block_status(self, offset: int, length: int) -> Extent:
        length = min(length, self.size - offset)
        ext = self._find_extent(offset)
        in_cluster = self._in_cluster(ext, offset)
        grain = ext.cluster_sectors * SECTOR
        ext_end = ext.end_sector * SECTOR
        length = min(length, ext_end - offset)
        fname = ext.file.filename

        def done(n: int, flags: int, host: int | None = None, file: str | None = None) -> Extent:
            if offset + n >= self.size:
                flags |= EOF
            return Extent(offset, n, flags, host, file)

        if ext.flat:
            host = ext.flat_start_offset + (offset - ext.start)
            flags = DATA | OFFSET_VALID | ALLOCATED
            n = length
            if host >= ext.file.size:
                flags |= ZERO
            else:
                is_data, run = ext.file.data_extent(host, n)
                if not is_data:
                    flags |= ZERO
                n = min(n, run)
            return done(n, flags, host, fname)
        state, host = self._cluster(ext, offset)
        n = min(grain - in_cluster, length)
        if state == _OK and ext.compressed:
            return done(n, DATA | ALLOCATED | COMPRESSED, None, fname)
        # extend the run through the rest of this grain table and the following ones
        end = offset + length
        pos = offset + n
        want = host + in_cluster + n if state == _OK else 0
        while pos < end:
            _l1, table, l2_index = self._locate(ext, pos)
            entries = ext.l2_size - l2_index
            limit = min(entries, -(-(end - pos) // grain))
            k = self._run_in_table(ext, table, l2_index, limit, state, want)
            if k == 0:
                break
            pos += k * grain
            if state == _OK:
                want += k * grain
            if k < limit:
                break
        n = min(pos, end) - offset
        if state == _OK:
            return done(n, DATA | OFFSET_VALID | ALLOCATED, host + in_cluster, fname)
        if state == _ZEROED:
            return done(n, ZERO | ALLOCATED)
        return done(n, 0)

    def _run_in_table(self, ext: _Extent, table: bytes, start: int, limit: int, state: int, want: int) -> int:
        """How many of the ``limit`` entries from ``start`` share ``state``
        (for allocated grains: continue the host run at byte ``want``)."""
        zero_grain = ext.has_zero_grain
        if not table:
            return limit if state == _UNALLOC else 0
        if state == _UNALLOC:
            hit = _NONZERO.search(table, 4 * start, 4 * (start + limit))
            if hit is None:
                return limit
            return hit.start() // 4 - start
        if limit <= 4:
            entries = struct.unpack_from(f"<{limit}I", table, 4 * start)
            k = 0
            for e in entries:
                if state == _ZEROED:
                    if not (zero_grain and e == VMDK_GTE_ZEROED):
                        break
                elif e != (want >> 9) + k * ext.cluster_sectors or (zero_grain and e == VMDK_GTE_ZEROED) or not e:
                    break
                k += 1
            return k
        import numpy as np

        arr = np.frombuffer(table, dtype="<u4", count=limit, offset=4 * start).astype(np.int64)
        if state == _ZEROED:
            good = arr == VMDK_GTE_ZEROED
        else:
            expect = (want >> 9) + np.arange(limit, dtype=np.int64) * ext.cluster_sectors
            good = (arr == expect) & (arr != 0)
            if zero_grain:
                good &= arr != VMDK_GTE_ZEROED
        bad = np.flatnonzero(~good)
        return int(bad[0]) if bad.size else limit

    # ---- I/O ---------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        parts: list[bytes] = []
        end = offset + length
        ext: _Extent | None = None
        while offset < end:
            if ext is None or (offset >> 9) >= ext.end_sector:
                ext = self._find_extent(offset)
            in_cluster = self._in_cluster(ext, offset)
            n = min(end - offset, ext.cluster_sectors * SECTOR - in_cluster)
            state, host = self._cluster(ext, offset)
            if state != _OK:
                parts.append(bytes(n))
            elif ext.compressed:
                parts.append(self._read_compressed(ext, host, in_cluster, n))
            else:
                parts.append(ext.file.pread(host + in_cluster, n))
            offset += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        """vmdk_pwritev for hosted sparse extents in the image's own file
        (monolithicSparse): a new grain goes at the end of the extent, the
        rest of it zeroes (or the parent's data), then the GT entry and the
        redundant GT's; the CID changes on the first write."""
        if self.read_only:
            raise QimgError("Image is read-only")
        view = memoryview(data)
        pos = 0
        ext: _Extent | None = None
        while pos < len(view):
            cur = offset + pos
            if ext is None or (cur >> 9) >= ext.end_sector:
                ext = self._find_extent(cur)
            if ext.flat or ext.compressed or ext.file is not self.file:
                raise OSError(errno.ENOTSUP, "Writing to this kind of vmdk extent is not supported")
            grain = ext.cluster_sectors * SECTOR
            in_cluster = self._in_cluster(ext, cur)
            n = min(len(view) - pos, grain - in_cluster)
            state, host = self._cluster(ext, cur)
            if state == _OK:
                ext.file.pwrite(host + in_cluster, view[pos:pos + n])
                ext.next_cluster_sector = max(ext.next_cluster_sector, -(-(host + in_cluster + n) // SECTOR))
            else:
                self._allocate(ext, cur, in_cluster, view[pos:pos + n], state == _ZEROED)
            pos += n
            if not self.cid_updated:
                self._write_cid()
                self.cid_updated = True

    def _allocate(self, ext: _Extent, offset: int, in_cluster: int, data: memoryview, zeroed: bool) -> None:
        l1_index, table, l2_index = self._locate(ext, offset)
        if not table:
            raise _einval()
        if ext.next_cluster_sector >= 1 << 32:  # VMDK_EXTENT_MAX_SECTORS
            raise _einval()
        grain = ext.cluster_sectors * SECTOR
        sector = ext.next_cluster_sector
        ext.next_cluster_sector += ext.cluster_sectors
        host = sector * SECTOR
        start = offset - in_cluster
        end_in = in_cluster + len(data)
        if self.backing is not None and not zeroed:
            whole = bytearray(self.backing.read(start, grain))
        else:
            whole = bytearray(grain)
        whole[in_cluster:end_in] = data
        if in_cluster:
            ext.file.pwrite(host, bytes(whole[:in_cluster]))
        ext.file.pwrite(host + in_cluster, bytes(data))
        if end_in < grain:
            ext.file.pwrite(host + end_in, bytes(whole[end_in:]))
        entry = struct.pack("<I", sector & 0xFFFFFFFF)
        l2_offset = ext.l1_table[l1_index]
        ext.file.pwrite(l2_offset * SECTOR + 4 * l2_index, entry)
        if ext.l1_backup_table_offset and ext.l1_backup is not None and l1_index < len(ext.l1_backup):
            ext.file.pwrite(ext.l1_backup[l1_index] * SECTOR + 4 * l2_index, entry)
        cached = ext.l2_cache.get(l2_offset)
        if cached is not None:
            ext.l2_cache[l2_offset] = cached[:4 * l2_index] + entry + cached[4 * l2_index + 4:]

    def _write_cid(self) -> None:
        """vmdk_write_cid with a random CID."""
        import random

        desc = bytearray(self.file.pread(self.desc_offset, DESC_SIZE))
        desc[-1] = 0
        text = _cstr(bytes(desc))
        tail_at = text.find(b"parentCID")
        if tail_at < 0:
            raise _einval()
        tail = text[tail_at:]
        at = text.find(b"CID")
        if at >= 0:
            at += 4
            new = text[:at] + f"{random.getrandbits(32):x}\n".encode() + tail
            new = new[:DESC_SIZE - 1]
            desc[:len(new)] = new
            desc[len(new)] = 0
        self.file.pwrite(self.desc_offset, bytes(desc))

    def _read_compressed(self, ext: _Extent, host: int, in_cluster: int, n: int) -> bytes:
        import zlib

        cluster_bytes = ext.cluster_sectors * SECTOR
        buf = ext.file.pread(host, 2 * cluster_bytes)
        data = buf
        data_len = cluster_bytes
        if ext.has_marker:
            data_len = struct.unpack_from("<I", buf, 8)[0]
            data = buf[12:]
        if not data_len or data_len > 2 * cluster_bytes:
            raise _einval()
        d = zlib.decompressobj()
        try:
            out = d.decompress(data[:data_len], cluster_bytes)
        except zlib.error:
            raise _einval() from None
        # uncompress() wants the whole stream, in at most one cluster
        if not d.eof:
            raise _einval()
        if in_cluster + n > len(out):
            raise _einval()
        return out[in_cluster:in_cluster + n]

    # ---- description ---------------------------------------------------------------------
    def info_specific(self) -> dict[str, Any] | None:
        extents = []
        for ext in self.extents:
            item: dict[str, Any] = {}
            if ext.compressed:
                item["compressed"] = True
            item["virtual-size"] = ext.sectors * SECTOR
            item["filename"] = ext.file.filename
            if not ext.flat:
                item["cluster-size"] = ext.cluster_sectors * SECTOR
            item["format"] = ext.type or ""
            extents.append(item)
        return {"type": "vmdk", "data": {
            "cid": self.cid, "parent-cid": self.parent_cid, "create-type": self.create_type,
            "extents": extents}}
