"""qcow2 persistent dirty bitmaps (docs/interop/qcow2.txt, "Bitmaps extension").

The header extension points at a bitmap directory; each directory entry names a
bitmap and points at its bitmap table, whose entries point at clusters of
bitmap data (bit k of the bitmap is bit k % 8 of byte k // 8, one bit per
``granularity`` bytes of guest data).  A zero table entry means a cluster of
zero bits.

As QEMU does (block/qcow2-bitmap.c), a read-write open loads every bitmap and
marks it IN_USE in the image, so that a crash leaves it flagged inconsistent;
writes are tracked in memory; closing stores every bitmap afresh (new data
clusters, table and directory) and only then frees the old ones.  A bitmap
found IN_USE at open is inconsistent: it is kept untouched and may only be
removed.

Reading the directory (for ``info``) uses struct only; bitmap data is numpy.
"""

from __future__ import annotations

import os
import struct
import sys
from typing import TYPE_CHECKING, Any

from qimg.errors import QimgError
from qimg.formats.qcow2 import header as H
from qimg.record import dataclass

if TYPE_CHECKING:
    import numpy as np

    from qimg.formats.qcow2.driver import Qcow2Driver

BITMAPS_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, offset
DIR_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes, then extra data and name

#: QEMU's limits (qcow2.h, qcow2-bitmap.c)
MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_TABLE_SIZE = 0x8000000
MAX_PHYS_SIZE = 0x20000000
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_NAME_SIZE = 1023

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
RESERVED_FLAGS = 0xFFFFFFFC
TYPE_DIRTY_TRACKING = 1

TABLE_RESERVED_MASK = 0xFF000000000001FE
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_ALL_ONES = 1


@dataclass
class DirEntry:
    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int


def _ext(d: "Qcow2Driver") -> tuple[int, int, int]:
    """(nb_bitmaps, directory size, directory offset); zeros when the image
    has no valid bitmaps extension (QEMU ignores it without the autoclear bit)."""
    h = d.header
    ext = h.bitmaps_ext
    if ext is None or not h.autoclear_features & H.AUTOCLEAR_BITMAPS or len(ext) < BITMAPS_EXT.size:
        return 0, 0, 0
    nb, _, size, offset = BITMAPS_EXT.unpack_from(ext)
    return nb, size, offset


def validate_ext(h: H.QCowHeader) -> None:
    """The checks qcow2_read_extensions makes on open (any open)."""
    ext = h.bitmaps_ext
    if ext is None:
        return
    if len(ext) != BITMAPS_EXT.size:
        raise QimgError("bitmaps_ext: Invalid extension length")
    if not h.autoclear_features & H.AUTOCLEAR_BITMAPS:
        # The bitmaps are ignored; qemu's error_printf adds no newline.
        if h.version < 3:
            _warn("This qcow2 v2 image contains bitmaps, but they may have been modified by a program "
                  "without persistent bitmap support; so now they must all be considered inconsistent")
        else:
            _warn("a program lacking bitmap support modified this file, so all bitmaps are now "
                  "considered inconsistent")
        sys.stderr.write("Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.")
        sys.stderr.flush()
        return
    nb, reserved, size, offset = BITMAPS_EXT.unpack(ext)
    if reserved:
        raise QimgError("bitmaps_ext: Reserved field is not zero")
    if nb > MAX_BITMAPS:
        raise QimgError(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}")
    if nb == 0:
        raise QimgError("found bitmaps extension with zero bitmaps")
    if offset % h.cluster_size:
        raise QimgError("bitmaps_ext: invalid bitmap directory offset")
    if size > MAX_DIRECTORY_SIZE:
        raise QimgError(f"bitmaps_ext: bitmap directory size ({size}) exceeds the maximum supported size "
                        f"({MAX_DIRECTORY_SIZE})")


def _warn(text: str) -> None:
    """warn_report(): "PROG: warning: TEXT" on stderr."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "qimg"
    if prog in ("__main__.py", "-m", "-c", ""):
        prog = "qimg"
    sys.stderr.write(f"{prog}: warning: {text}\n")


def _entry_size(name_size: int, extra: int = 0) -> int:
    return (DIR_ENTRY.size + name_size + extra + 7) & ~7


def _entry_ok(d: "Qcow2Driver", off: int, size: int, flags: int, typ: int, gbits: int, nsize: int) -> bool:
    cs = d.cluster_size
    if (size == 0 or off == 0 or off % cs or size > MAX_TABLE_SIZE or gbits > MAX_GRANULARITY_BITS
            or gbits < MIN_GRANULARITY_BITS or flags & RESERVED_FLAGS or nsize > MAX_NAME_SIZE
            or typ != TYPE_DIRTY_TRACKING):
        return False
    phys = size * cs
    if phys > MAX_PHYS_SIZE:
        return False
    return bool(flags & FLAG_IN_USE) or d.size <= (phys * 8) << gbits


def load_directory(d: "Qcow2Driver") -> list[DirEntry]:
    """The bitmap directory, checked as bitmap_list_load checks it."""
    nb, size, offset = _ext(d)
    if nb == 0:
        return []
    if size == 0:
        raise QimgError("Requested bitmap directory size is zero")
    if size > MAX_DIRECTORY_SIZE:
        raise QimgError("Requested bitmap directory size is too big")
    buf = d.file.pread(offset, size)
    if len(buf) < size:
        raise QimgError("Failed to read bitmap directory: Input/output error")
    out: list[DirEntry] = []
    pos = 0
    while pos < size:
        if pos + DIR_ENTRY.size > size:
            raise QimgError("Broken bitmap directory")
        if len(out) + 1 > nb:
            raise QimgError("More bitmaps found than specified in header extension")
        toff, tsize, flags, typ, gbits, nsize, extra = DIR_ENTRY.unpack_from(buf, pos)
        end = pos + _entry_size(nsize, extra)
        if end > size:
            raise QimgError("Broken bitmap directory")
        name_at = pos + DIR_ENTRY.size + extra
        name = buf[name_at:name_at + nsize].decode("utf-8", "replace")
        if extra:
            raise QimgError("Bitmap extra data is not supported")
        if not _entry_ok(d, toff, tsize, flags, typ, gbits, nsize):
            raise QimgError(f"Bitmap '{name}' doesn't satisfy the constraints")
        out.append(DirEntry(name, toff, tsize, flags, gbits))
        pos = end
    if len(out) != nb:
        raise QimgError("Less bitmaps found than specified in header extension")
    return out


def validate_on_open(d: "Qcow2Driver") -> None:
    """What qcow2_load_dirty_bitmaps refuses on every open (info included):
    a bad directory, and for bitmaps not IN_USE a bad table or one of the
    wrong size.  Plain struct: tables are short (a cluster of bits covers
    cluster_size * 8 granules)."""
    cs = d.cluster_size
    for e in load_directory(d):
        if e.flags & FLAG_IN_USE:
            continue
        raw = d.file.pread(e.table_offset, e.table_size * 8).ljust(e.table_size * 8, b"\0")
        for entry in struct.unpack(">%dQ" % e.table_size, raw):
            off = entry & TABLE_OFFSET_MASK
            if entry & TABLE_RESERVED_MASK or (off and (entry & TABLE_ALL_ONES or off % cs)):
                raise QimgError(f"Could not read bitmap_table table from image for bitmap '{e.name}': "
                                "Invalid argument")
        nbits = -(-d.size // (1 << e.granularity_bits))
        if -(-nbits // (cs * 8)) != e.table_size:
            raise QimgError(f"Could not read bitmap '{e.name}' from image: Invalid argument")


def info_list(d: "Qcow2Driver") -> list[dict[str, Any]] | None:
    """``info``'s "bitmaps" list (qcow2_get_bitmap_info_list), or None."""
    entries = load_directory(d)
    if not entries:
        return None
    result = []
    for e in entries:
        flags = []
        if e.flags & FLAG_IN_USE:
            flags.append("in-use")
        if e.flags & FLAG_AUTO:
            flags.append("auto")
        result.append({"flags": flags, "name": e.name, "granularity": 1 << e.granularity_bits})
    return result


def check_new(d: "Qcow2Driver", name: str, granularity: int) -> str | None:
    """Why a new persistent bitmap cannot be stored (qcow2_can_store_new_dirty_bitmap), or None."""
    if d.header.version < 3:
        return "Cannot store dirty bitmaps in qcow2 v2 files"
    gbits = granularity.bit_length() - 1
    if gbits > MAX_GRANULARITY_BITS:
        return f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)"
    if gbits < MIN_GRANULARITY_BITS:
        return f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)"
    if d.size > MAX_PHYS_SIZE << gbits or d.size > (MAX_TABLE_SIZE * d.cluster_size) << gbits:
        return "Too much space will be occupied by the bitmap. Use larger granularity"
    if len(name.encode()) > MAX_NAME_SIZE:
        return f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
    nb, size, _ = _ext(d)
    if nb >= MAX_BITMAPS:
        return "Maximum number of persistent bitmaps is already reached"
    if nb and size + _entry_size(len(name.encode())) > MAX_DIRECTORY_SIZE:
        return "Not enough space in the bitmap directory"
    return None


# ---- in-memory bitmaps ---------------------------------------------------------


def _packed_len(nbits: int) -> int:
    return (nbits + 7) >> 3


def _trim(packed: "np.ndarray", nbits: int) -> "np.ndarray":
    """Cut ``packed`` to ``nbits`` bits, the bits past the end cleared."""
    out = packed[:_packed_len(nbits)].copy()
    if nbits & 7:
        out[-1] &= (1 << (nbits & 7)) - 1
    return out


class DirtyBitmap:
    """One bitmap in memory, packed as in the image (bit k is bit k % 8 of
    byte k // 8), loaded from the image on first use."""

    def __init__(self, store: "BitmapStore", name: str, granularity: int, enabled: bool,
                 entry: DirEntry | None = None, inconsistent: bool = False, readonly: bool = False) -> None:
        self.store = store
        self.name = name
        self.granularity = granularity
        self.enabled = enabled
        self.entry = entry
        self.inconsistent = inconsistent
        self.readonly = readonly
        self._bits: "np.ndarray | None" = None

    @property
    def nbits(self) -> int:
        return -(-self.store.d.size // self.granularity)

    @property
    def bits(self) -> "np.ndarray":
        if self._bits is None:
            self._bits = self.store.load_bits(self) if self.entry is not None else self.store.zeros(self.nbits)
        return self._bits

    def granules(self) -> "np.ndarray":
        """One bool per granule (for merging and inspection)."""
        import numpy as np

        return np.unpackbits(self.bits, bitorder="little")[:self.nbits].astype(bool)

    def mark(self, offset: int, length: int) -> None:
        g = self.granularity
        a, b = offset // g, min(-(-(offset + length) // g), self.nbits)
        if a >= b:
            return
        arr = self.bits
        first, last = a >> 3, (b - 1) >> 3
        head = (0xFF << (a & 7)) & 0xFF
        tail = 0xFF >> (7 - ((b - 1) & 7))
        if first == last:
            arr[first] |= head & tail
        else:
            arr[first] |= head
            arr[first + 1:last] = 0xFF
            arr[last] |= tail

    def clear(self) -> None:
        self._bits = self.store.zeros(self.nbits)

    def merge_from(self, src: "DirtyBitmap") -> None:
        """OR ``src`` in, converting between granularities as hbitmap_merge does
        (a destination bit is set where any source bit overlaps it)."""
        import numpy as np

        if src.granularity == self.granularity:
            self.bits[:] |= src.bits[:len(self.bits)]
            return
        bits = src.granules()
        if src.granularity > self.granularity:
            bits = np.repeat(bits, src.granularity // self.granularity)[:self.nbits]
        else:
            k = self.granularity // src.granularity
            pad = np.zeros(self.nbits * k, dtype=bool)
            pad[:len(bits)] = bits[:len(pad)]
            bits = pad.reshape(-1, k).any(axis=1)
        self.bits[:] |= np.packbits(bits, bitorder="little")[:len(self.bits)]


class BitmapStore:
    """The bitmaps of one open qcow2 image."""

    def __init__(self, d: "Qcow2Driver") -> None:
        self.d = d
        self.bitmaps: list[DirtyBitmap] = []
        self.entries = load_directory(d)
        writable = not d.read_only
        for e in self.entries:
            inconsistent = bool(e.flags & FLAG_IN_USE)
            self.bitmaps.insert(0, DirtyBitmap(self, e.name, 1 << e.granularity_bits, bool(e.flags & FLAG_AUTO),
                                            e, inconsistent, readonly=not writable))
        if writable and any(not b.inconsistent for b in self.bitmaps):
            self._mark_in_use()

    @property
    def supported(self) -> bool:
        return self.d.header.version >= 3

    @staticmethod
    def zeros(n: int) -> "np.ndarray":
        import numpy as np

        return np.zeros(_packed_len(n), dtype=np.uint8)

    def find(self, name: str) -> DirtyBitmap | None:
        for b in self.bitmaps:
            if b.name == name:
                return b
        return None

    # ---- reading ---------------------------------------------------------------
    def load_bits(self, bm: DirtyBitmap) -> "np.ndarray":
        import numpy as np

        e = bm.entry
        assert e is not None
        d = self.d
        cs = d.cluster_size
        n = bm.nbits
        per = cs * 8
        tsize = -(-n // per)
        if tsize != e.table_size:
            raise QimgError(f"Could not read bitmap '{bm.name}' from image: Invalid argument")
        table = np.frombuffer(d.file.pread(e.table_offset, tsize * 8).ljust(tsize * 8, b"\0"), dtype=">u8")
        offs = table & np.uint64(TABLE_OFFSET_MASK)
        bad = (table & np.uint64(TABLE_RESERVED_MASK)) != 0
        bad |= (offs != 0) & (((table & np.uint64(TABLE_ALL_ONES)) != 0) | (offs % np.uint64(cs) != 0))
        if bad.any():
            raise QimgError(f"Could not read bitmap_table table from image for bitmap '{bm.name}': Invalid argument")
        out = np.zeros(tsize * cs, dtype=np.uint8)
        for i in np.flatnonzero(offs | (table & np.uint64(TABLE_ALL_ONES))):
            off = int(offs[i])
            if off == 0:
                out[i * cs:(i + 1) * cs] = 0xFF
            else:
                out[i * cs:(i + 1) * cs] = np.frombuffer(d.file.pread(off, cs).ljust(cs, b"\0"), dtype=np.uint8)
        return _trim(out, n)

    # ---- writing ---------------------------------------------------------------
    def _mark_in_use(self) -> None:
        """Flag the image's bitmaps IN_USE, in place, before any write
        (update_ext_header_and_dir_in_place: drop the autoclear bit, rewrite the
        directory, set the bit again)."""
        for e in self.entries:
            e.flags |= FLAG_IN_USE
        _, size, offset = _ext(self.d)
        h = self.d.header
        self._write_header(h.bitmaps_ext, h.autoclear_features & ~H.AUTOCLEAR_BITMAPS)
        self.d.file.pwrite(offset, self._directory(self.entries))
        self._write_header(h.bitmaps_ext, h.autoclear_features | H.AUTOCLEAR_BITMAPS)

    def _directory(self, entries: list[DirEntry]) -> bytes:
        out = bytearray()
        for e in entries:
            name = e.name.encode()
            out += DIR_ENTRY.pack(e.table_offset, e.table_size, e.flags, TYPE_DIRTY_TRACKING,
                                  e.granularity_bits, len(name), 0)
            out += name
            out += bytes(-len(out) % 8)
        return bytes(out)

    def _write_header(self, ext: bytes | None, autoclear: int) -> None:
        d = self.d
        cs = d.cluster_size
        h = H.QCowHeader.parse(d.file.pread(0, cs))
        h.bitmaps_ext = ext
        h.autoclear_features = autoclear
        h.feature_table = []
        if h.version == 2:
            # bitmaps stored on close after amend's downgrade: QEMU's v2
            # header keeps the extension (with no autoclear bit to vouch for it)
            from qimg.formats.qcow2.amend import _pack_v2_keeping_bitmaps

            h.backing_format = d.header.backing_format
            buf = _pack_v2_keeping_bitmaps(h)
        else:
            h.header_length = H.V3_HEADER_LENGTH_COMPRESSION
            buf = h.pack()
        d.file.pwrite(0, buf + bytes(cs - len(buf)))
        d.file.flush()
        d.header.bitmaps_ext = ext
        d.header.autoclear_features = autoclear
        d.header.header_length = h.header_length
        d.header.backing_file_offset = h.backing_file_offset

    def _store_data(self, bm: DirtyBitmap) -> DirEntry:
        import numpy as np

        d = self.d
        cs = d.cluster_size
        per = cs * 8
        n = bm.nbits
        tsize = -(-n // per)
        packed = np.zeros(tsize * cs, dtype=np.uint8)
        packed[:_packed_len(n)] = bm.bits
        packed = packed.reshape(tsize, cs)
        table = np.zeros(tsize, dtype=">u8")
        # One cluster per bitmap chunk with a set bit: there are few (one
        # covers cs*8 granules), so allocating them one by one is fine.
        for i in np.flatnonzero(packed.any(axis=1)):
            off = d.refs.alloc(cs)
            d.file.pwrite(off, packed[i].tobytes())
            table[i] = off
        toff = d.refs.alloc(tsize * 8)
        d.file.pwrite(toff, table.tobytes())
        return DirEntry(bm.name, toff, tsize, FLAG_AUTO if bm.enabled else 0, bm.granularity.bit_length() - 1)

    def _free_table(self, e: DirEntry) -> None:
        import numpy as np

        d = self.d
        raw = d.file.pread(e.table_offset, e.table_size * 8).ljust(e.table_size * 8, b"\0")
        table = np.frombuffer(raw, dtype=">u8")
        offs = table & np.uint64(TABLE_OFFSET_MASK)
        ok = (table & np.uint64(TABLE_RESERVED_MASK)) == 0
        cs = d.cluster_size
        for off in offs[ok & (offs != 0)]:
            d.refs.free(int(off), cs)
            # QEMU frees bitmap data with QCOW2_DISCARD_ALWAYS: the file gets a hole
            if d.refs.get(int(off) // cs) == 0 and int(off) < d.file.size:
                d.file.write_zeroes(int(off), min(cs, d.file.size - int(off)))
        d.refs.free(e.table_offset, e.table_size * 8)

    def _update_dir(self, entries: list[DirEntry]) -> None:
        """A new directory in new clusters, then the header, then the old
        directory freed (update_ext_header_and_dir)."""
        d = self.d
        nb_old, old_size, old_offset = _ext(d)
        if not nb_old and self.entries and d.header.bitmaps_ext is not None:
            # amend's downgrade has cleared the autoclear bit since the
            # directory was loaded; QEMU still frees the one it loaded
            nb_old, _, old_size, old_offset = BITMAPS_EXT.unpack_from(d.header.bitmaps_ext)
        if entries:
            dir_bytes = self._directory(entries)
            dir_off = d.refs.alloc(len(dir_bytes))
            d.file.pwrite(dir_off, dir_bytes)
            d.flush_metadata()
            ext = BITMAPS_EXT.pack(len(entries), 0, len(dir_bytes), dir_off)
            self._write_header(ext, d.header.autoclear_features | H.AUTOCLEAR_BITMAPS)
        else:
            d.flush_metadata()
            self._write_header(None, d.header.autoclear_features & ~H.AUTOCLEAR_BITMAPS)
        if nb_old and old_size:
            d.refs.free(old_offset, old_size)
        self.entries = entries

    def store(self) -> None:
        """Write every bitmap back (qcow2_store_persistent_dirty_bitmaps), in
        QEMU's order so that clusters land where QEMU puts them: the image's
        directory list, extended by new bitmaps in memory-list order; data and
        tables in directory order; the new directory; then the old tables."""
        d = self.d
        # Inconsistent bitmaps alone leave the image as it is (as QEMU does).
        if d.read_only or all(bm.inconsistent for bm in self.bitmaps):
            return
        entries = list(self.entries)
        pending: dict[int, DirtyBitmap] = {}
        drop: list[DirEntry] = []
        for bm in self.bitmaps:
            if bm.inconsistent:
                continue
            pos = next((i for i, e in enumerate(entries) if e.name == bm.name), None)
            if pos is None:
                entries.append(DirEntry(bm.name, 0, 0, 0, 0))
                pos = len(entries) - 1
            else:
                drop.append(entries[pos])
            pending[pos] = bm
        for pos in sorted(pending):
            bm = pending[pos]
            entries[pos] = self._store_data(bm)
        self._update_dir(entries)
        # The new directory is in place: only now may the old clusters go.
        for e in drop:
            self._free_table(e)
        d.flush_metadata()
        for pos, bm in pending.items():
            bm.entry = entries[pos]

    # ---- operations (the qmp block-dirty-bitmap-* commands' storage side) ------
    def check_new(self, name: str, granularity: int) -> str | None:
        return check_new(self.d, name, granularity)

    def add(self, name: str, granularity: int, enabled: bool) -> DirtyBitmap:
        bm = DirtyBitmap(self, name, granularity, enabled)
        # QEMU's list of a node's bitmaps is newest first
        self.bitmaps.insert(0, bm)
        return bm

    def remove(self, bm: DirtyBitmap) -> None:
        """Forget ``bm``; one stored in the image leaves it at once
        (qcow2_remove_persistent_dirty_bitmap: new directory, then its
        clusters freed)."""
        self.bitmaps.remove(bm)
        if bm.entry is not None and not self.d.read_only:
            entry = bm.entry
            self._update_dir([e for e in self.entries if e is not entry])
            self._free_table(entry)
            self.d.flush_metadata()

    def prepare_resize(self) -> None:
        """Before the image size changes: every bitmap must be in memory
        (qcow2_truncate_bitmaps_check refuses inconsistent ones)."""
        for bm in self.bitmaps:
            if bm.inconsistent:
                raise inconsistent_error(bm.name)
            bm.bits

    def finish_resize(self) -> None:
        """Grow (with clean bits) or cut the bitmaps to the new size."""
        import numpy as np

        for bm in self.bitmaps:
            old = bm.bits
            new = np.zeros(max(len(old), _packed_len(bm.nbits)), dtype=np.uint8)
            new[:len(old)] = old
            bm._bits = _trim(new, bm.nbits)

    def mark(self, offset: int, length: int) -> None:
        """A guest write (or zero write, or discard) dirtied this range."""
        for bm in self.bitmaps:
            if bm.enabled and not bm.inconsistent and not bm.readonly:
                bm.mark(offset, length)


def open_store(d: "Qcow2Driver") -> BitmapStore | None:
    """Check the bitmaps as QEMU does on open; on a read-write open, load
    them (flagging them in use).  None when there are none or read-only."""
    if _ext(d)[0] == 0:
        return None
    validate_on_open(d)
    return None if d.read_only else BitmapStore(d)


def inconsistent_error(name: str) -> QimgError:
    """bdrv_dirty_bitmap_check's refusal of a bitmap found IN_USE."""
    return QimgError(f"Bitmap '{name}' is inconsistent and cannot be used",
                     detail="Try block-dirty-bitmap-remove to delete this bitmap from disk\n")
