"""qemu-img check for qcow2: rebuild the refcounts from the metadata, compare
them with the on-disk ones, and repair what ``-r leaks``/``-r all`` allows.

This follows QEMU's block/qcow2-refcount.c (qcow2_check_refcounts and its
helpers) step for step, so that messages, their order and the counters are
qemu-img's.  What QEMU does one cluster at a time is done here on numpy
arrays: every reference found in the metadata becomes one cluster index in
an array, and np.bincount turns those into refcounts.

Messages are keyed by the position of the reference ("slot") that caused
them, so that vectorized passes still print them in QEMU's order.

The checker reads the image through ``driver.file`` only and never through
the driver's caches; after rewriting metadata it calls
``driver.drop_caches()`` so the driver writes nothing stale on close.

Repairs are ordered so that a crash leaves an image no worse than before:
refcount increases are written before decreases, and a rebuilt refcount
structure is written to free clusters before the header is switched to it.
"""

from __future__ import annotations

import os
import struct
import sys
import weakref
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from qimg.block.check import CheckResult
from qimg.errors import QimgError
from qimg.formats.qcow2.header import (
    AUTOCLEAR_BITMAPS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
)
from qimg.formats.qcow2.scan import read_tables, uniform_rows
from qimg.protocols.file import keep_freed_buffers
from qimg.record import dataclass

if TYPE_CHECKING:
    from qimg.protocols.file import File

FIX_LEAKS = 1
FIX_ERRORS = 2

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L2_BITMAP_ALL_ALLOC = 0xFFFFFFFF
BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_RESERVED_MASK = 0xFF000000000001FE
BME_FLAG_ALL_ONES = 1

# What a metadata write may not overlap (QCow2MetadataOverlap bits).
OL_MAIN_HEADER = 1 << 0
OL_ACTIVE_L1 = 1 << 1
OL_ACTIVE_L2 = 1 << 2
OL_REFCOUNT_TABLE = 1 << 3
OL_REFCOUNT_BLOCK = 1 << 4
OL_SNAPSHOT_TABLE = 1 << 5
OL_INACTIVE_L1 = 1 << 6
OL_BITMAP_DIRECTORY = 1 << 8

QCOW_MAX_L1_SIZE = 32 << 20
QCOW_MAX_SNAPSHOTS = 65536
SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # 40 bytes
BITMAP_DIR_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes
#: QEMU's limits on the bitmap directory and on one bitmap table
BME_MAX_PHYS_SIZE = 64 << 20
BME_MAX_TABLE_SIZE = 0x8000000
#: bytes of L2 tables read and processed at once
_BATCH_BYTES = 2 << 20

_U64 = np.uint64

#: drivers a fatal corruption report made unusable (QEMU sets bs->drv to
#: NULL): a further check of them fails with ENOMEDIUM
_UNUSABLE: "weakref.WeakSet[Any]" = weakref.WeakSet()


class _CheckFailed(Exception):
    """QEMU's negative return: the check stops, qemu-img prints
    "Check failed: <strerror>" instead of a report."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


# ---- the on-disk refcounts ---------------------------------------------------
# The checker must not trust the driver's allocator (the very thing it
# checks), so it keeps its own view of the refcount table and blocks: whole
# refcount blocks are decoded into numpy arrays on first use, and single
# entries are written back in place when a repair changes them.  Entries
# narrower than a byte are packed from the least significant bit up.

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF
#: QEMU's BDRV_MAX_LENGTH: requests ending past it fail with EIO
MAX_IO_END = ((1 << 63) - 1) // ((1 << 31) - 512) * ((1 << 31) - 512)


def io_ok(offset: int, length: int) -> bool:
    """Whether the block layer would accept this request at all."""
    return 0 <= offset and offset + length <= MAX_IO_END

#: a refcount block that get_refcount refuses (QEMU's -EIO)
BAD = "bad"


def decode_refblock(buf: bytes, order: int) -> np.ndarray:
    """A refcount block's bytes as uint64 refcounts."""
    if order >= 3:
        return np.frombuffer(buf, dtype=f">u{1 << (order - 3)}").astype(np.uint64)
    bits = 1 << order
    per_byte = 8 // bits
    b = np.frombuffer(buf, dtype=np.uint8)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return ((b[:, None] >> shifts) & ((1 << bits) - 1)).ravel().astype(np.uint64)


def encode_refblock(values: np.ndarray, order: int) -> bytes:
    """The inverse of decode_refblock (values must fit the width)."""
    if order >= 3:
        return values.astype(f">u{1 << (order - 3)}").tobytes()
    bits = 1 << order
    per_byte = 8 // bits
    v = values.astype(np.uint8).reshape(-1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(v << shifts, axis=1).astype(np.uint8).tobytes()


class RefcountView:
    """get_refcount / update_refcount over the on-disk structures."""

    def __init__(self, file: "File", reftable: np.ndarray, cluster_bits: int, refcount_order: int,
                 on_bad: Callable[[int, int], None]) -> None:
        self.file = file
        self.reftable = reftable
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.order = refcount_order
        #: log2 of the refcount entries in one block
        self.block_bits = cluster_bits + 3 - refcount_order
        self._blocks: dict[int, np.ndarray | str | None] = {}
        #: lookups of clusters below this use one dense array of refcounts
        self.dense_limit = 1 << 22
        self._dense: tuple[np.ndarray, np.ndarray | None] | None = None
        #: called once per bad block met: (refblock offset, reftable index)
        self._on_bad = on_bad

    def block(self, index: int) -> np.ndarray | str | None:
        """Block ``index`` decoded, None when not allocated, BAD when unusable."""
        if index in self._blocks:
            return self._blocks[index]
        blk: np.ndarray | str | None = None
        if index < len(self.reftable):
            offset = int(self.reftable[index]) & REFT_OFFSET_MASK
            if offset and offset & (self.cluster_size - 1):
                self._on_bad(offset, index)
                blk = BAD
            elif offset and not io_ok(offset, self.cluster_size):
                blk = BAD  # the read fails: EIO, with no corruption report
            elif offset:
                blk = decode_refblock(self.file.pread(offset, self.cluster_size), self.order)
        self._blocks[index] = blk
        return blk

    def range(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(refcounts, unreadable mask or None when all are readable) of
        clusters 0..n-1.

        The refcounts keep the on-disk width (a 16-bit image's take a
        quarter of the memory uint64 would), and refcount blocks are read
        straight into the array, neighbours on the host with one request."""
        per = 1 << self.block_bits
        nblocks = -(-n // per)
        raw = self.order >= 3
        values = np.zeros(nblocks * per, dtype=np.dtype(f"u{1 << (self.order - 3)}") if raw else np.uint8)
        view = memoryview(values.view(np.uint8))  # type: ignore[arg-type]
        width = values.itemsize
        bad: np.ndarray | None = None
        cached: list[tuple[int, np.ndarray]] = []
        pending: tuple[int, int, int] | None = None  # (first block, count, host offset)

        def read(run: tuple[int, int, int] | None) -> None:
            if run is not None:
                first, count, host = run
                self.file.preadinto(host, view[first * per * width:(first + count) * per * width])

        for index in range(min(len(self.reftable), nblocks)):
            offset = int(self.reftable[index]) & REFT_OFFSET_MASK
            direct = (raw and index not in self._blocks and offset and not offset & (self.cluster_size - 1)
                      and io_ok(offset, self.cluster_size))
            if direct:
                if pending is not None and pending[0] + pending[1] == index and \
                        pending[2] + pending[1] * self.cluster_size == offset:
                    pending = (pending[0], pending[1] + 1, pending[2])
                else:
                    read(pending)
                    pending = (index, 1, offset)
                continue
            blk = self._transient(index)
            if blk is BAD:
                if bad is None:
                    bad = np.zeros(nblocks * per, dtype=bool)
                bad[index * per:(index + 1) * per] = True
            elif blk is not None:
                cached.append((index, blk))  # type: ignore[arg-type]
        read(pending)
        if raw and width > 1 and sys.byteorder == "little":
            values.byteswap(inplace=True)
        for index, blk in cached:
            values[index * per:(index + 1) * per] = blk
        return values[:n], None if bad is None else bad[:n]

    def _transient(self, index: int) -> np.ndarray | str | None:
        """Like _peek() but a good block not yet cached is decoded without
        being kept: range() already copies it, and keeping every block of a
        big image as well would double the memory check needs."""
        if index not in self._blocks:
            offset = int(self.reftable[index]) & REFT_OFFSET_MASK
            if offset and not offset & (self.cluster_size - 1) and io_ok(offset, self.cluster_size):
                return decode_refblock(self.file.pread(offset, self.cluster_size), self.order)
        return self._peek(index)

    def _peek(self, index: int) -> np.ndarray | str | None:
        """Like block() but without reporting a bad block: compare_refcounts
        reports it when it first meets one of its clusters."""
        if index in self._blocks:
            return self._blocks[index]
        offset = int(self.reftable[index]) & REFT_OFFSET_MASK
        if offset and offset & (self.cluster_size - 1):
            return BAD
        return self.block(index)

    def lookup(self, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(refcounts, unreadable mask) of arbitrary cluster indexes (uint64)."""
        values = np.zeros(len(clusters), dtype=np.uint64)
        bad = np.zeros(len(clusters), dtype=bool)
        if not len(clusters):
            return values, bad
        top = int(clusters.max())
        if top < self.dense_limit or (self._dense is not None and top < len(self._dense[0])):
            return self._lookup_dense(clusters, top + 1)
        blocks = clusters >> np.uint64(self.block_bits)
        # Only blocks the reftable has can hold a refcount (others read 0).
        inside = blocks < np.uint64(len(self.reftable))
        if not inside.any():
            return values, bad
        uniq, first, inverse = np.unique(blocks[inside], return_index=True, return_inverse=True)
        within = (clusters[inside] & np.uint64((1 << self.block_bits) - 1)).astype(np.int64)
        # One row per block the clusters need, decoded once, then one gather.
        table = np.zeros((len(uniq), 1 << self.block_bits), dtype=np.uint64)
        row_bad = np.zeros(len(uniq), dtype=bool)
        for row in np.argsort(first, kind="stable").tolist():
            blk = self.block(int(uniq[row]))
            if blk is BAD:
                row_bad[row] = True
            elif blk is not None:
                table[row] = blk  # type: ignore[assignment]
        values[inside] = table[inverse, within]
        bad[inside] = row_bad[inverse]
        return values, bad

    def _lookup_dense(self, clusters: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """lookup through one array of all refcounts up to ``n`` (cached)."""
        if self._dense is None or len(self._dense[0]) < n:
            self._dense = self.range(max(n, self.dense_limit // 4))
        values, bad = self._dense
        idx = clusters.astype(np.int64)
        hit = bad[idx] if bad is not None else np.zeros(len(idx), dtype=bool)
        if hit.any():
            # get_refcount reports an unusable block when it first meets it.
            self.block(int(idx[np.argmax(hit)]) >> self.block_bits)
        return values[idx], hit

    def set(self, cluster: int, value: int, write: bool = True) -> None:
        """Write one refcount in place (its block must exist and be good);
        with ``write`` False only this view sees the change."""
        index = cluster >> self.block_bits
        blk = self.block(index)
        assert isinstance(blk, np.ndarray)
        within = cluster & ((1 << self.block_bits) - 1)
        blk[within] = value
        if self._dense is not None and cluster < len(self._dense[0]):
            self._dense[0][cluster] = value
        offset = int(self.reftable[index]) & REFT_OFFSET_MASK
        if not write:
            return
        if self.order >= 3:
            width = 1 << (self.order - 3)
            self.file.pwrite(offset + within * width, int(value).to_bytes(width, "big"))
        else:
            per_byte = 8 >> self.order
            byte = within // per_byte
            chunk = blk[byte * per_byte:(byte + 1) * per_byte]
            self.file.pwrite(offset + byte, encode_refblock(chunk, self.order))


def _hx(value: int) -> str:
    """C's %#x: no prefix for zero."""
    return "%#x" % value if value else "0"


def _read_u64s(file: "File", offset: int, count: int) -> np.ndarray:
    """Big-endian u64 table entries; past the end of the file reads zeroes,
    as QEMU's file driver does.  Raises _CheckFailed(EIO) for a request
    the block layer refuses."""
    if count <= 0:
        return np.zeros(0, dtype=_U64)
    if not io_ok(offset, count * 8):
        raise _CheckFailed(5)
    return np.frombuffer(file.pread(offset, count * 8), dtype=">u8").astype(_U64)


@dataclass
class _Snapshot:
    id_str: str
    name: str
    l1_table_offset: int
    l1_size: int


class _Runs:
    """References to runs of consecutive clusters: [starts[i], ends[i])."""

    def __init__(self, starts: np.ndarray, ends: np.ndarray) -> None:
        self.starts = starts
        self.ends = ends

    def __len__(self) -> int:
        return int((self.ends - self.starts).sum())

    def max(self) -> int:
        return int(self.ends.max()) - 1

    def expand(self) -> np.ndarray:
        """One cluster index per reference, in order."""
        lengths = self.ends - self.starts
        within = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return np.repeat(self.starts, lengths) + within


class _Pass:
    """One calculate_refcounts run: every reference in QEMU's order, with the
    messages it printed on the way keyed by (slot, phase, sequence)."""

    def __init__(self, file_len: int) -> None:
        self.file_len = file_len
        self.refs: list[np.ndarray | _Runs] = []
        #: every data entry of the active L2 tables has OFLAG_COPIED set
        #: (and all went through the fast path): see check_oflag_copied
        self.active_copied = True
        #: arrays, or callables that build one (kept small until an overflow needs them)
        self.ref_slots: list[np.ndarray | Callable[[], np.ndarray]] = []
        self.msgs: list[tuple[int, int, int, str]] = []
        self.slot = 0

    def msg(self, slot: int, phase: int, text: str) -> None:
        self.msgs.append((slot, phase, len(self.msgs), text))


class Qcow2Checker:
    """qcow2_co_check_locked over a driver's file and header."""

    def __init__(self, driver: Any, fix: int, report: Callable[[str], None],
                 error_report: Callable[[str], None]) -> None:
        self.driver = driver
        self.file: "File" = driver.file
        h = driver.header
        self.header = h
        self.cluster_bits = h.cluster_bits
        self.cs = 1 << h.cluster_bits
        self.order = h.refcount_order
        self.refcount_max = (1 << (1 << h.refcount_order)) - 1
        self.extl2 = h.extended_l2
        self.l2_entries = self.cs >> (4 if self.extl2 else 3)
        self.has_data_file = bool(h.incompatible_features & INCOMPAT_DATA_FILE)
        self.fix = fix
        self.report = report
        self.error_report = error_report
        self.writable = not driver.read_only
        self.signaled = False
        self.wrote = False
        #: a fatal corruption report disabled the driver (bs->drv = NULL)
        self.unusable = False
        #: refcount updates not written because of that
        self.unflushed: list[tuple[int, int]] = []
        self.csize_shift = 62 - (h.cluster_bits - 8)
        self.csize_mask = (1 << (h.cluster_bits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1
        self.l1_offset = h.l1_table_offset
        self.l1_size = h.l1_size
        self.l1 = _read_u64s(self.file, self.l1_offset, self.l1_size)
        self._set_reftable(h.refcount_table_offset, h.refcount_table_clusters)
        self.snapshots: list[_Snapshot] = []
        #: the table's entries as snapshot.py writes them (for a repair)
        self.snap_entries: list[Any] = []
        self.snapshots_offset = h.snapshots_offset
        self.snapshots_size = 0
        #: what the last calculate() found: the highest refcount, and
        #: whether every active data entry carries OFLAG_COPIED
        self.max_count = 0
        self.active_copied = False
        #: mismatches the last compare() met
        self.mismatches = 0

    # ---- on-disk refcounts ---------------------------------------------------
    def _set_reftable(self, offset: int, clusters: int) -> None:
        self.reftable_offset = offset
        self.reftable_clusters = clusters
        entries = clusters * self.cs // 8
        self.view = RefcountView(self.file, _read_u64s(self.file, offset, entries),
                                 self.cluster_bits, self.order, self._signal_bad_refblock)
        self.view.dense_limit = max(1 << 22, 2 * -(-self.file.size // self.cs))

    def _signal_bad_refblock(self, offset: int, index: int) -> None:
        self._signal(f"Refblock offset {_hx(offset)} unaligned (reftable index: {_hx(index)})")

    def _signal(self, what: str, fatal: bool = True) -> None:
        """qcow2_signal_corruption: reported once (a fatal one after a
        non-fatal one still is); fatal only on a writable image, where it
        sets the corrupt bit."""
        fatal = fatal and self.writable
        corrupt = bool(self.header.incompatible_features & INCOMPAT_CORRUPT)
        if self.signaled and (not fatal or corrupt):
            return
        self.signaled = True
        if fatal:
            self.report(f"qcow2: Marking image as corrupt: {what}; further corruption events will be suppressed")
            self._set_incompat(self.header.incompatible_features | INCOMPAT_CORRUPT)
            self.unusable = True
            try:
                _UNUSABLE.add(self.driver)
            except TypeError:
                pass
        else:
            self.report(f"qcow2: Image is corrupt: {what}; further non-fatal corruption events will be suppressed")

    def _overlap(self, ign: int, offset: int, size: int) -> str | None:
        """qcow2_check_metadata_overlap with QEMU's default ("cached")
        checks: the name of the metadata [offset, offset+size) would hit."""
        if not size:
            return None
        cs = self.cs
        if not ign & OL_MAIN_HEADER and offset < cs:
            return "qcow2_header"
        size = -(-((offset & (cs - 1)) + size) // cs) * cs
        offset &= ~(cs - 1)

        def hits(start: int, length: int) -> bool:
            return offset < start + length and start < offset + size

        if not ign & OL_ACTIVE_L1 and self.l1_size and hits(self.l1_offset, self.l1_size * 8):
            return "active L1 table"
        reftable = self.view.reftable
        if not ign & OL_REFCOUNT_TABLE and len(reftable) and hits(self.reftable_offset, len(reftable) * 8):
            return "refcount table"
        if not ign & OL_SNAPSHOT_TABLE and self.snapshots_size and hits(self.snapshots_offset, self.snapshots_size):
            return "snapshot table"
        if not ign & OL_INACTIVE_L1:
            for sn in self.snapshots:
                if sn.l1_size and hits(sn.l1_table_offset, sn.l1_size * 8):
                    return "inactive L1 table"

        def any_cluster(table: np.ndarray, mask: int) -> bool:
            starts = (table & _U64(mask)).astype(np.int64)
            starts = starts[starts != 0]
            return bool(((offset < starts + cs) & (starts < offset + size)).any())

        if not ign & OL_ACTIVE_L2 and any_cluster(self.l1, L1E_OFFSET_MASK):
            return "active L2 table"
        if not ign & OL_REFCOUNT_BLOCK and any_cluster(reftable, REFT_OFFSET_MASK):
            return "refcount block"
        bitmaps = self._bitmap_directory()
        if not ign & OL_BITMAP_DIRECTORY and bitmaps and hits(*bitmaps):
            return "bitmap directory"
        return None

    def _may_write(self, ign: int, offset: int, size: int) -> bool:
        """qcow2_pre_write_overlap_check: False (and the image marked
        corrupt) when the write would hit metadata."""
        what = self._overlap(ign, offset, size)
        if what is None:
            return True
        self._signal(f"Preventing invalid write on metadata (overlaps with {what})")
        return False

    def _bitmap_directory(self) -> tuple[int, int] | None:
        ext = self.header.bitmaps_ext
        if not ext or len(ext) < 24 or not self.header.autoclear_features & AUTOCLEAR_BITMAPS:
            return None
        nb_bitmaps, _, dir_size, dir_offset = struct.unpack(">IIQQ", ext[:24])
        return (dir_offset, dir_size) if nb_bitmaps else None

    def _set_incompat(self, features: int) -> None:
        """Set the incompatible feature bits; a version 2 header has no
        field for them, so there they live in memory only, as in QEMU."""
        if features == self.header.incompatible_features:
            return
        self.header.incompatible_features = features
        if self.header.version < 3:
            return
        self.file.pwrite(72, struct.pack(">Q", features))
        self.file.flush()
        self.wrote = True

    # ---- the whole check -----------------------------------------------------
    def run(self) -> CheckResult:
        result = CheckResult(format="qcow2")
        snap_res = CheckResult()
        ref_res = CheckResult()
        try:
            self._read_snapshot_table(snap_res)
        except _CheckFailed as e:
            result.add(snap_res, False)
            raise self._failed(e) from None
        try:
            self.check_refcounts(ref_res)
        except _CheckFailed as e:
            result.add(ref_res, True)
            result.add(snap_res, False)
            raise self._failed(e) from None
        finally:
            self._done()
        result.add(ref_res, True)
        try:
            self._fix_snapshot_table(snap_res)
        except _CheckFailed as e:
            result.add(snap_res, False)
            raise self._failed(e) from None
        result.add(snap_res, False)
        if self.fix and result.check_errors == 0 and result.corruptions == 0:
            # qcow2_mark_clean, then qcow2_mark_consistent; both flush the
            # caches first when they have a bit to clear.
            if self.unflushed and self.header.incompatible_features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT):
                for cluster, value in self.unflushed:
                    self.view.set(cluster, value)
                self.wrote = True
            self._set_incompat(self.header.incompatible_features & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT))
            self._done()
        return result

    def _failed(self, e: _CheckFailed) -> QimgError:
        return QimgError(f"Check failed: {os.strerror(e.errno)}", 1)

    def _done(self) -> None:
        if self.wrote:
            self.file.flush()
            drop = getattr(self.driver, "drop_caches", None)
            if drop is not None:
                drop()

    def check_refcounts(self, res: CheckResult) -> None:
        size = self.file.size
        nb = -(-size // self.cs)
        if nb > 0x7FFFFFFF:
            res.check_errors += 1
            raise _CheckFailed(27)  # EFBIG
        res.total_clusters = -(-(self.header.size // 512 * 512) // self.cs)
        counts, nb, rebuild = self.calculate(res, self.fix, nb)
        pre = CheckResult(**vars(res))
        highest, rebuild = self.compare(res, 0, counts, nb, rebuild)
        if rebuild and self.fix & FIX_ERRORS:
            old = CheckResult(**vars(res))
            self.report("Rebuilding refcount structure")
            counts, nb = self.rebuild(res, counts, nb)
            res.corruptions = 0
            res.leaks = 0
            counts, nb, rebuild = self.calculate(res, 0, nb)
            fresh_leaks = 0
            if self.fix & FIX_LEAKS:
                scratch = CheckResult()
                highest, rebuild = self.compare(scratch, FIX_LEAKS, counts, nb, False)
                if rebuild:
                    self.report("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = scratch.leaks
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif self.fix:
            if rebuild:
                self.report("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise _CheckFailed(5)  # EIO
            if res.leaks or res.corruptions:
                vars(res).update(vars(pre))
                highest, rebuild = self.compare(res, self.fix, counts, nb, rebuild)
        del counts  # not needed any more: free it before the L2 tables are read again
        if not self._oflag_copied_clean(res):
            self.check_oflag_copied(res, self.fix)
        res.image_end_offset = (highest + 1) * self.cs

    # ---- snapshots -----------------------------------------------------------
    def _read_snapshot_table(self, res: CheckResult) -> None:
        """The snapshot table's entries and size, read (and with -r all
        repaired) as qcow2_check_read_snapshot_table (check_snapshots.py)."""
        offset = self.snapshots_offset
        if not self.header.nb_snapshots and not offset & (self.cs - 1) and offset <= (1 << 63) - 1:
            return  # nothing to read, and nothing qcow2_validate_table refuses
        from qimg.formats.qcow2 import check_snapshots

        self.snap_entries = check_snapshots.check_read(self, res, bool(self.fix & FIX_ERRORS))
        self.snapshots = [_Snapshot(sn.id_str.decode("utf-8", "replace"), sn.name.decode("utf-8", "replace"),
                                    sn.l1_table_offset, sn.l1_size) for sn in self.snap_entries]

    def _fix_snapshot_table(self, res: CheckResult) -> None:
        """qcow2_check_fix_snapshot_table."""
        if res.corruptions and self.fix & FIX_ERRORS:
            from qimg.formats.qcow2 import check_snapshots

            check_snapshots.check_fix(self, res, self.snap_entries, True)

    # ---- calculate_refcounts -------------------------------------------------
    def calculate(self, res: CheckResult, fix: int, nb: int) -> tuple[np.ndarray, int, bool]:
        """The refcounts the metadata implies: (counts, clusters, rebuild)."""
        p = _Pass(self.file.size)
        try:
            self._calculate(p, res, fix)
        except _CheckFailed:
            for _, _, _, text in sorted(p.msgs):
                self.report(text)
            raise
        counts = self._count(p, res, nb)
        self.active_copied = p.active_copied
        for _, _, _, text in sorted(p.msgs):
            self.report(text)
        return self._check_refblocks(res, fix, counts)

    def _calculate(self, p: _Pass, res: CheckResult, fix: int) -> None:
        self._inc(p, res, 0, self.cs)
        self._check_l1(p, res, self.l1_offset, self.l1_size, True, fix)
        if self.has_data_file and self.snapshots:
            p.msg(p.slot, 0, f"ERROR {len(self.snapshots)} snapshots in image with data file")
            res.corruptions += 1
        for sn in self.snapshots:
            if sn.l1_table_offset & (self.cs - 1):
                p.msg(p.slot, 0, f"ERROR snapshot {sn.id_str} ({sn.name}) l1_offset={_hx(sn.l1_table_offset)}: "
                      "L1 table is not cluster aligned; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            if sn.l1_size > QCOW_MAX_L1_SIZE // 8:
                p.msg(p.slot, 0, f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={_hx(sn.l1_size)}: "
                      "L1 table is too large; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            self._check_l1(p, res, sn.l1_table_offset, sn.l1_size, False, fix, active=False)
        self._inc(p, res, self.snapshots_offset, self.snapshots_size)
        self._inc(p, res, self.reftable_offset, len(self.view.reftable) * 8)
        if self.header.crypto_header:
            self._inc(p, res, *self.header.crypto_header)
        self._check_bitmaps(p, res)

    def _count(self, p: _Pass, res: CheckResult, nb: int) -> np.ndarray:
        """The refcounts the references imply, capped at the refcount width
        with QEMU's overflow messages for the references beyond it.

        Runs of clusters are counted as +1 at their start and -1 past their
        end, and one cumulative sum turns that into counts: a preallocated
        image's millions of references cost a few hundred scatters.  Single
        references are added after, by bincount or add.at, whichever touches
        less memory."""
        top = max((int(r.max()) for r in p.refs if len(r)), default=-1)
        n = max(nb, top + 1)
        # No cluster has more references than there are runs and single
        # references: count in the narrowest unsigned type that bound fits
        # (a preallocated image's few hundred runs fit 16 bits: a quarter of
        # the memory).  The -1 at a run's end wraps; the sums do not.
        bound = sum(len(r.starts) if isinstance(r, _Runs) else len(r) for r in p.refs)
        dtype = np.uint16 if bound < 1 << 16 else np.uint32 if bound < 1 << 32 else _U64
        counts = np.zeros(n + 1, dtype=dtype)
        runs = [r for r in p.refs if isinstance(r, _Runs)]
        if runs:
            np.add.at(counts, np.concatenate([r.starts for r in runs]), 1)
            np.subtract.at(counts, np.concatenate([r.ends for r in runs]), 1)
            np.cumsum(counts, out=counts)
        counts = counts[:n]
        for r in p.refs:
            if isinstance(r, _Runs) or not len(r):
                continue
            if len(r) > n >> 6:
                counts += np.bincount(r, minlength=n).astype(dtype, copy=False)
            else:
                np.add.at(counts, r.astype(np.int64), 1)
        self.max_count = int(counts.max()) if top >= 0 else 0
        if self.max_count > self.refcount_max:
            refs = np.concatenate([r.expand() if isinstance(r, _Runs) else r.astype(np.int64)
                                   for r in p.refs])
            slots = np.concatenate([s() if callable(s) else s for s in p.ref_slots])
            order = np.lexsort((slots, refs))
            ranked = refs[order]
            group_start = np.searchsorted(ranked, ranked, side="left")
            over = np.sort(order[np.arange(len(ranked)) - group_start >= self.refcount_max])
            for i in over:
                p.msg(int(slots[i]), 1, f"ERROR: overflow cluster offset=0x{int(refs[i]) << self.cluster_bits:x}\n"
                      "Use qemu-img amend to increase the refcount entry width or qemu-img convert "
                      "to create a clean copy if the image cannot be opened for writing")
            res.corruptions += len(over)
            counts = np.minimum(counts, _U64(self.refcount_max))
        return counts

    def _inc(self, p: _Pass, res: CheckResult, offset: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt for one range."""
        slot = p.slot
        p.slot += 1
        if size <= 0:
            return
        if offset + size - p.file_len >= self.cs:
            p.msg(slot, 1, "ERROR: counting reference for region exceeding the end of the file by one "
                  f"cluster or more: offset 0x{offset:x} size 0x{size:x}")
            res.corruptions += 1
            return
        first = offset >> self.cluster_bits
        last = (offset + size - 1) >> self.cluster_bits
        p.refs.append(np.arange(first, last + 1, dtype=np.int64))
        p.ref_slots.append(np.full(last - first + 1, slot, dtype=np.int64))

    def _inc_many(self, p: _Pass, res: CheckResult, slots: np.ndarray, offsets: np.ndarray,
                  sizes: np.ndarray, valid: np.ndarray) -> None:
        """_inc for many ranges at once (int64 arrays, in slot order)."""
        exceed = valid & (offsets + sizes - p.file_len >= self.cs)
        for i in np.flatnonzero(exceed):
            p.msg(int(slots[i]), 1, "ERROR: counting reference for region exceeding the end of the file by "
                  f"one cluster or more: offset 0x{int(offsets[i]):x} size 0x{int(sizes[i]):x}")
        res.corruptions += int(exceed.sum())
        ok = valid & ~exceed
        first = offsets[ok] >> self.cluster_bits
        last = (offsets[ok] + sizes[ok] - 1) >> self.cluster_bits
        n = last - first + 1
        if not len(n):
            return
        if int(n.max()) == 1:
            p.refs.append(first)
            p.ref_slots.append(slots[ok])
            return
        total = int(n.sum())
        starts = np.repeat(np.cumsum(n) - n, n)
        p.refs.append(np.repeat(first, n) + (np.arange(total) - starts))
        p.ref_slots.append(np.repeat(slots[ok], n))

    # ---- L1 and L2 tables ------------------------------------------------------
    def _check_l1(self, p: _Pass, res: CheckResult, l1_offset: int, l1_size: int, frag: bool, fix: int,
                  active: bool = True) -> None:
        """check_refcounts_l1 with check_refcounts_l2 for all its tables."""
        if not l1_size:
            return
        self._inc(p, res, l1_offset, l1_size * 8)
        try:
            l1 = _read_u64s(self.file, l1_offset, l1_size)
        except _CheckFailed:
            p.msg(p.slot, 0, "ERROR: I/O error in check_refcounts_l1")
            res.check_errors += 1
            raise
        rows = np.flatnonzero(l1)
        per_batch = max(1, _BATCH_BYTES // self.cs)
        for b in range(0, len(rows), per_batch):
            idx = rows[b:b + per_batch]
            self._check_l2_batch(p, res, l1[idx], frag, fix, active)

    def _read_l2(self, offsets: np.ndarray) -> np.ndarray:
        """The L2 tables at ``offsets`` as a (tables, cluster_size/8) array."""
        return read_tables(self.file, offsets.tolist(), self.cs)

    def _check_l2_batch(self, p: _Pass, res: CheckResult, l1e: np.ndarray, frag: bool, fix: int,
                        active: bool) -> None:
        cs, n = self.cs, self.l2_entries
        rows = len(l1e)
        l2off = (l1e & _U64(L1E_OFFSET_MASK)).astype(np.int64)
        raw = self._read_l2(l2off)
        if self.extl2:
            entries, bitmaps = raw[:, 0::2], raw[:, 1::2]
        else:
            entries, bitmaps = raw, raw  # no bitmaps: replaced by zeroes below if needed
        base = p.slot
        p.slot += rows * (n + 1)
        row_slot = base + np.arange(rows, dtype=np.int64) * (n + 1)

        # Messages about the L1 entries and the L2 tables themselves.
        reserved_l1 = (l1e & _U64(L1E_RESERVED_MASK)) != 0
        unaligned_l2 = (l2off & (cs - 1)) != 0
        for r in np.flatnonzero(reserved_l1 | unaligned_l2):
            if reserved_l1[r]:
                p.msg(int(row_slot[r]), 0, f"ERROR found L1 entry with reserved bits set: {int(l1e[r]):x}")
            if unaligned_l2[r]:
                p.msg(int(row_slot[r]), 2,
                      f"ERROR l2_offset={int(l2off[r]):x}: Table is not cluster aligned; L1 entry corrupted")
        res.corruptions += int(reserved_l1.sum() + unaligned_l2.sum())

        if self._plain_tables(p, res, entries, l2off, base, frag):
            return
        if frag:
            p.active_copied = False
        if not self.extl2:
            bitmaps = np.zeros_like(raw)
        e = entries
        comp = (e & _U64(OFLAG_COMPRESSED)) != 0
        zero = ((e & _U64(OFLAG_ZERO)) != 0) & ~comp if not self.extl2 else np.zeros_like(comp)
        offs = (e & _U64(L2E_OFFSET_MASK)).astype(np.int64)
        has_off = offs != 0
        if self.has_data_file:
            has_off |= (e & _U64(OFLAG_COPIED)) != 0
        normal = ~comp & (zero & (offs != 0) | ~zero & has_off)
        unalloc = ~comp & ~zero & ~has_off
        reserved = ~comp & ((e & _U64(L2E_STD_RESERVED_MASK)) != 0)
        comp_copied = comp & ((e & _U64(OFLAG_COPIED)) != 0)
        comp_bad = comp & (self.has_data_file | (bitmaps != 0))
        comp_ok = comp & ~comp_bad
        bad_bitmap = normal & (((bitmaps >> _U64(32)) & bitmaps) != 0)
        unaligned = normal & ((offs & (cs - 1)) != 0)
        if self.extl2:
            holds_data = (bitmaps & _U64(L2_BITMAP_ALL_ALLOC)) != 0
        else:
            holds_data = (e & _U64(OFLAG_ZERO)) == 0
        prealloc_unaligned = unaligned & ~holds_data
        bad_unalloc = unalloc & ((bitmaps & _U64(L2_BITMAP_ALL_ALLOC)) != 0)
        fixed = np.zeros_like(comp)

        flagged = reserved | comp_copied | comp_bad | bad_bitmap | unaligned | bad_unalloc
        for r, i in zip(*np.nonzero(flagged)):
            slot = int(row_slot[r]) + 1 + int(i)
            entry = int(e[r, i])
            if reserved[r, i]:
                p.msg(slot, 0, f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            if comp[r, i]:
                if comp_copied[r, i]:
                    p.msg(slot, 0, f"ERROR: coffset=0x{entry & self.coffset_mask:x}: "
                          "copied flag must never be set for compressed clusters")
                    entry &= ~OFLAG_COPIED
                    res.corruptions += 1
                if self.has_data_file:
                    p.msg(slot, 0, f"ERROR compressed cluster {i} with data file, entry=0x{entry:x}")
                    res.corruptions += 1
                elif bitmaps[r, i]:
                    p.msg(slot, 0, f"ERROR compressed cluster {i} with non-zero subcluster allocation "
                          f"bitmap, entry=0x{entry:x}")
                    res.corruptions += 1
            elif normal[r, i]:
                off = int(offs[r, i])
                if bad_bitmap[r, i]:
                    res.corruptions += 1
                    p.msg(slot, 0, f"ERROR offset={off:x}: Allocated cluster has corrupted subcluster "
                          "allocation bitmap")
                if unaligned[r, i]:
                    res.corruptions += 1
                    if prealloc_unaligned[r, i]:
                        p.msg(slot, 0, f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} offset={off:x}: "
                              "Preallocated cluster is not properly aligned; L2 entry corrupted.")
                        if fix & FIX_ERRORS:
                            report = self.report
                            self.report = lambda text, slot=slot: p.msg(slot, 0, text)  # type: ignore[misc]
                            try:
                                written = self._zero_l2_entry(int(l2off[r]), int(i), int(bitmaps[r, i]), active)
                            finally:
                                self.report = report  # type: ignore[method-assign]
                            if not written:
                                p.msg(slot, 0, "ERROR: Overlap check failed")
                                res.check_errors += 1
                                raise _CheckFailed(5)
                            res.corruptions -= 1
                            res.corruptions_fixed += 1
                            fixed[r, i] = True
                    else:
                        p.msg(slot, 0, f"ERROR offset={off:x}: Data cluster is not properly aligned; "
                              "L2 entry corrupted.")
            elif bad_unalloc[r, i]:
                res.corruptions += 1
                p.msg(slot, 0, "ERROR: Unallocated cluster has non-zero subcluster allocation map")

        counted = normal & ~fixed
        if frag:
            ncomp = int(comp_ok.sum())
            res.allocated_clusters = (res.allocated_clusters or 0) + ncomp + int(counted.sum())
            res.compressed_clusters = (res.compressed_clusters or 0) + ncomp
            res.fragmented_clusters = (res.fragmented_clusters or 0) + ncomp + self._fragmented(counted, offs)

        # References in slot order: the L2 table, then its entries.
        coffset = (e & _U64(self.coffset_mask)).astype(np.int64)
        nb_sectors = ((e >> _U64(self.csize_shift)) & _U64(self.csize_mask)).astype(np.int64) + 1
        csize = nb_sectors * 512 - (coffset & 511)
        starts = np.where(comp_ok, coffset, offs)
        sizes = np.where(comp_ok, csize, cs)
        valid = comp_ok | (counted & (not self.has_data_file))
        all_starts = np.concatenate([l2off[:, None], starts], axis=1).ravel()
        all_sizes = np.concatenate([np.full((rows, 1), cs, dtype=np.int64), sizes], axis=1).ravel()
        all_valid = np.concatenate([np.ones((rows, 1), dtype=bool), valid], axis=1).ravel()
        slots = base + np.arange(rows * (n + 1), dtype=np.int64)
        self._inc_many(p, res, slots, all_starts, all_sizes, all_valid)

    def _plain_tables(self, p: _Pass, res: CheckResult, e: np.ndarray, l2off: np.ndarray, base: int,
                      frag: bool) -> bool:
        """The common case, fast: L2 tables with nothing to report (no
        compressed, reserved, unaligned or out-of-file entries, standard
        entries, no data file).  False when the general path must run.

        The data clusters are kept as runs of consecutive clusters (a
        preallocated image has one per table), not one index per entry."""
        if self.extl2 or self.has_data_file:
            return False
        cs, n = self.cs, self.l2_entries
        suspicious = OFLAG_COMPRESSED | L2E_STD_RESERVED_MASK | ((cs - 1) & ~0x1FF)
        if self._contiguous_tables(p, res, e, l2off, base, frag, suspicious):
            return True
        flat_e = e.ravel()
        offs = flat_e & _U64(suspicious)
        if offs.any():
            return False
        np.bitwise_and(flat_e, _U64(L2E_OFFSET_MASK), out=offs)
        used = int(np.count_nonzero(offs))
        flat: np.ndarray | None = None
        data = offs
        if used < len(offs):
            flat = np.flatnonzero(offs)
            data = offs[flat]
        top = int(data.max()) if used else 0
        if top >= p.file_len:
            return False
        rows = len(l2off)
        if frag and used and p.active_copied:
            # check_oflag_copied's fast path needs every data entry of the
            # active tables to carry OFLAG_COPIED
            p.active_copied = int((flat_e if flat is None else flat_e[flat]).min()) >= OFLAG_COPIED
        del flat_e
        table_slots = base + np.arange(rows, dtype=np.int64) * (n + 1)
        self._inc_many(p, res, table_slots, l2off, np.full(rows, cs, dtype=np.int64), np.ones(rows, dtype=bool))
        clusters = np.right_shift(data, _U64(self.cluster_bits), out=data)
        if top >> self.cluster_bits < 1 << 32:
            clusters = clusters.astype(np.uint32)  # half the memory; bincount takes it as is
        del offs, data
        breaks = np.flatnonzero((clusters[1:] - clusters[:-1]) != 1) if used > 1 else np.zeros(0, np.int64)
        if frag:
            res.allocated_clusters = (res.allocated_clusters or 0) + used
            res.compressed_clusters = res.compressed_clusters or 0
            # a jump to another host cluster within one table is a fragment
            pos = breaks if flat is None else flat[breaks]
            after = breaks + 1 if flat is None else flat[breaks + 1]
            res.fragmented_clusters = (res.fragmented_clusters or 0) + int(np.count_nonzero(pos // n == after // n))
        if used and len(breaks) * 4 < used:
            first = np.concatenate([[0], breaks + 1])
            last = np.concatenate([breaks, [used - 1]])
            p.refs.append(_Runs(clusters[first].astype(np.int64), clusters[last].astype(np.int64) + 1))
        else:
            p.refs.append(clusters)
        # Slots matter only for overflow messages: keep the batch-local
        # indexes (small) and build the slots on demand.
        if flat is None:
            p.ref_slots.append(lambda base=base, used=used, n=n:
                               base + np.arange(used, dtype=np.int64) + np.arange(used, dtype=np.int64) // n + 1)
        else:
            local = flat.astype(np.int32) if rows * (n + 1) < 1 << 31 else flat
            p.ref_slots.append(lambda base=base, local=local, n=n:
                               base + local.astype(np.int64) + local // n + 1)
        return True

    def _contiguous_tables(self, p: _Pass, res: CheckResult, e: np.ndarray, l2off: np.ndarray, base: int,
                           frag: bool, suspicious: int) -> bool:
        """_plain_tables for a batch whose every table maps consecutive host
        clusters with one set of flags (as preallocation lays them out):
        everything follows from each table's first entry."""
        if not uniform_rows(e, self.cluster_bits).all():
            return False
        first = e[:, 0]
        if ((first & _U64(suspicious)) != 0).any() or not first.all():
            return False  # flags to report, or tables of zeroes: the general path
        cs, n = self.cs, self.l2_entries
        starts = (first & _U64(L2E_OFFSET_MASK)) >> _U64(self.cluster_bits)
        if (int(starts.max()) + n - 1) << self.cluster_bits >= p.file_len:
            return False
        rows = len(l2off)
        used = rows * n
        if frag:
            res.allocated_clusters = (res.allocated_clusters or 0) + used
            res.compressed_clusters = res.compressed_clusters or 0
            res.fragmented_clusters = res.fragmented_clusters or 0  # none within a table
            if p.active_copied:
                p.active_copied = bool((first >= _U64(OFLAG_COPIED)).all())
        table_slots = base + np.arange(rows, dtype=np.int64) * (n + 1)
        self._inc_many(p, res, table_slots, l2off, np.full(rows, cs, dtype=np.int64), np.ones(rows, dtype=bool))
        starts = starts.astype(np.int64)
        p.refs.append(_Runs(starts, starts + n))
        p.ref_slots.append(lambda base=base, used=used, n=n:
                           base + np.arange(used, dtype=np.int64) + np.arange(used, dtype=np.int64) // n + 1)
        return True

    def _fragmented(self, counted: np.ndarray, offs: np.ndarray) -> int:
        """Allocated clusters not right after the previous one of the same
        L2 table (QEMU resets its "next contiguous offset" per table)."""
        r, _ = np.nonzero(counted)
        o = offs[counted]
        if len(o) < 2:
            return 0
        same_table = r[1:] == r[:-1]
        return int((same_table & (o[1:] != o[:-1] + self.cs)).sum())

    def _zero_l2_entry(self, l2_offset: int, index: int, bitmap: int, active: bool) -> bool:
        """fix_l2_entry_by_zero: the entry reads as zeroes and owns no cluster."""
        if self.extl2:
            bitmap |= (bitmap << 32) & 0xFFFFFFFFFFFFFFFF
            bitmap &= 0xFFFFFFFF00000000
            data = struct.pack(">QQ", 0, bitmap)
            where = l2_offset + index * 16
        else:
            data = struct.pack(">Q", OFLAG_ZERO)
            where = l2_offset + index * 8
        if not self._may_write(OL_ACTIVE_L2 if active else 0, where, len(data)):
            return False
        self.file.pwrite(where, data)
        self.file.flush()
        self.wrote = True
        return True

    # ---- bitmaps -------------------------------------------------------------
    def _check_bitmaps(self, p: _Pass, res: CheckResult) -> None:
        """qcow2_check_bitmaps_refcounts."""
        ext = self.header.bitmaps_ext
        if not ext or len(ext) < 24 or not self.header.autoclear_features & AUTOCLEAR_BITMAPS:
            return
        nb_bitmaps, _, dir_size, dir_offset = struct.unpack(">IIQQ", ext[:24])
        if nb_bitmaps == 0:
            return
        self._inc(p, res, dir_offset, dir_size)
        if dir_size > BME_MAX_PHYS_SIZE:
            res.corruptions += 1
            raise _CheckFailed(22)
        if not io_ok(dir_offset, dir_size):
            res.corruptions += 1
            raise _CheckFailed(22)
        directory = self.file.pread(dir_offset, dir_size)
        pos = 0
        tables: list[tuple[int, int]] = []
        for _ in range(nb_bitmaps):
            if pos + BITMAP_DIR_ENTRY.size > len(directory):
                res.corruptions += 1
                raise _CheckFailed(22)
            t_off, t_size, _f, _t, _g, name_size, extra = BITMAP_DIR_ENTRY.unpack_from(directory, pos)
            pos += (BITMAP_DIR_ENTRY.size + extra + name_size + 7) & ~7
            if t_size > BME_MAX_TABLE_SIZE or pos > len(directory):
                res.corruptions += 1
                raise _CheckFailed(22)
            tables.append((t_off, t_size))
        for t_off, t_size in tables:
            self._inc(p, res, t_off, t_size * 8)
            try:
                table = _read_u64s(self.file, t_off, t_size)
            except _CheckFailed:
                res.corruptions += 1
                raise
            offsets = (table & _U64(BME_OFFSET_MASK)).astype(np.int64)
            bad = ((table & _U64(BME_RESERVED_MASK)) != 0) | (offsets != 0) & (
                ((table & _U64(BME_FLAG_ALL_ONES)) != 0) | ((offsets & (self.cs - 1)) != 0))
            res.corruptions += int(bad.sum())
            use = ~bad & (offsets != 0)
            slots = p.slot + np.arange(len(table), dtype=np.int64)
            p.slot += len(table)
            self._inc_many(p, res, slots, offsets, np.full(len(table), self.cs, dtype=np.int64), use)

    # ---- check_refblocks -----------------------------------------------------
    def _check_refblocks(self, res: CheckResult, fix: int, counts: np.ndarray) -> tuple[np.ndarray, int, bool]:
        rebuild = False
        reftable = self.view.reftable
        for i in np.flatnonzero(reftable).tolist():
            entry = int(reftable[i])
            offset = entry & REFT_OFFSET_MASK
            cluster = offset >> self.cluster_bits
            if entry & REFT_RESERVED_MASK:
                self.report(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                rebuild = True
                continue
            if offset & (self.cs - 1):
                self.report(f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted")
                res.corruptions += 1
                rebuild = True
                continue
            if cluster >= len(counts):
                res.corruptions += 1
                self.report(f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} refcount block {i} is outside image")
                if fix & FIX_ERRORS:
                    err = self._grow_file(offset + self.cs)
                    if err is None:
                        new_nb = -(-self.file.size // self.cs)
                        if cluster < new_nb:
                            counts = np.concatenate([counts, np.zeros(new_nb - len(counts), dtype=_U64)])
                            res.corruptions -= 1
                            res.corruptions_fixed += 1
                            counts[cluster] += _U64(1)
                            continue
                        err = 22
                    rebuild = True
                    self.report(f"ERROR could not resize image: {os.strerror(err)}")
                continue
            if counts[cluster] == self.refcount_max:
                self.report(f"ERROR: overflow cluster offset=0x{offset:x}")
                self.report("Use qemu-img amend to increase the refcount entry width or qemu-img convert "
                            "to create a clean copy if the image cannot be opened for writing")
                res.corruptions += 1
            else:
                counts[cluster] += _U64(1)
            if counts[cluster] != 1:
                self.report(f"ERROR refcount block {i} refcount={int(counts[cluster])}")
                res.corruptions += 1
                rebuild = True
        return counts, len(counts), rebuild

    def _grow_file(self, size: int) -> int | None:
        """Extend the file for a refcount block past its end; errno or None."""
        if size > (1 << 63) - 1:
            return 22  # EINVAL
        if -(-size // self.cs) > 0x7FFFFFFF:
            # More clusters than the check may count: refuse as a file system
            # refuses a file that large, rather than allocate without bound.
            self.error_report(f"Could not resize file: {os.strerror(27)}")
            return 27
        try:
            self.file.truncate(size)
        except OSError as e:
            err = e.errno or 5
            self.error_report(f"Could not resize file: {os.strerror(err)}")
            return err
        self.wrote = True
        return None

    # ---- compare_refcounts ---------------------------------------------------
    def compare(self, res: CheckResult, fix: int, counts: np.ndarray, nb: int,
                rebuild: bool) -> tuple[int, bool]:
        """Compare with the on-disk refcounts; (highest used cluster, rebuild)."""
        ondisk, bad = self.view.range(nb)
        if self.view._dense is None:
            # Kept as the view's dense copy (set() keeps it current): the
            # OFLAG_COPIED pass looks refcounts up there instead of decoding
            # and caching every refcount block once more.
            self.view._dense = (ondisk, bad)
        used = ondisk > 0
        used |= counts > 0
        if bad is not None:
            used &= ~bad
        last = len(used) - 1 - int(np.argmax(used[::-1])) if len(used) else 0
        highest = last if len(used) and used[last] else 0
        del used
        raising: list[tuple[int, int]] = []
        lowering: list[tuple[int, int]] = []
        differ = ondisk != counts
        if bad is not None:
            differ |= bad
        mismatched = np.flatnonzero(differ)
        del differ
        self.mismatches = len(mismatched)
        for i in mismatched.tolist():
            if bad is not None and bad[i]:
                self.view.block(i >> self.view.block_bits)  # reports the bad block once
                self.report(f"Can't get refcount for cluster {i}: Input/output error")
                res.check_errors += 1
                continue
            r1, r2 = int(ondisk[i]), int(counts[i])
            fixing = None
            if r1 == 0:
                rebuild = True
            elif r1 > r2 and fix & FIX_LEAKS:
                fixing = lowering
            elif r1 < r2 and fix & FIX_ERRORS:
                fixing = raising
            word = "Repairing" if fixing is not None else "ERROR" if r1 < r2 else "Leaked"
            self.report(f"{word} cluster {i} refcount={r1} reference={r2}")
            if fixing is not None:
                fixing.append((i, r2))
                if r1 > r2:
                    res.leaks_fixed += 1
                else:
                    res.corruptions_fixed += 1
                continue
            if r1 < r2:
                res.corruptions += 1
            else:
                res.leaks += 1
        # Raise refcounts before lowering any: a crash in between leaves
        # leaks, never a cluster in use with too low a refcount.
        for batch in (raising, lowering):
            if self.unusable:
                # QEMU keeps these in its refcount cache, which a driver
                # made unusable never writes back unless the image is then
                # marked consistent.
                for cluster, value in batch:
                    self.view.set(cluster, value, write=False)
                self.unflushed.extend(batch)
                continue
            for cluster, value in batch:
                self.view.set(cluster, value)
                if not value:
                    # update_refcount discards a cluster it frees
                    # (QCOW2_DISCARD_ALWAYS): the file gets a hole there
                    self.file.punch_hole(cluster << self.cluster_bits, self.cs)
            if batch:
                self.file.flush()
                self.wrote = True
        return highest, rebuild

    # ---- rebuild_refcount_structure ----------------------------------------
    def rebuild(self, res: CheckResult, counts: np.ndarray, nb: int) -> tuple[np.ndarray, int]:
        """New refblocks and reftable from ``counts``, in clusters nothing uses,
        then the header switched to them (the old ones are left leaked)."""
        self.imrt = counts.copy()
        self._rebuild_res = res
        self.reftable_new = np.zeros(0, dtype=_U64)
        self._write_refblocks(0, len(self.imrt))
        while True:
            length = len(self.reftable_new) * 8
            clusters = -(-length // self.cs)
            offset, _ = self._alloc(clusters, 0)
            start = offset >> self.cluster_bits
            if not self._write_refblocks(start, start + clusters):
                break
        if not self._may_write(0, offset, len(self.reftable_new) * 8):
            self.error_report("ERROR writing reftable: Input/output error")
            raise _CheckFailed(5)
        self.file.pwrite(offset, self.reftable_new.astype(">u8").tobytes())
        self.file.flush()
        self.file.pwrite(48, struct.pack(">QI", offset, clusters))
        self.file.flush()
        self.wrote = True
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters
        self._set_reftable(offset, clusters)
        imrt = self.imrt
        del self.imrt, self.reftable_new
        return imrt, len(imrt)

    def _alloc(self, count: int, first_free: int) -> tuple[int, int]:
        """alloc_clusters_imrt: first run of ``count`` free clusters at or
        after ``first_free``, growing the table past its end if needed."""
        imrt = self.imrt
        nb = len(imrt)
        free = np.flatnonzero(imrt[first_free:] == 0) + first_free
        start = nb
        if len(free):
            first_free = int(free[0])
            breaks = np.flatnonzero(np.diff(free) != 1)
            run_starts = np.concatenate([[0], breaks + 1])
            run_ends = np.concatenate([breaks + 1, [len(free)]])
            lengths = run_ends - run_starts
            fits = np.flatnonzero(lengths >= count)
            if len(fits):
                start = int(free[run_starts[fits[0]]])
            elif int(free[-1]) == nb - 1:
                start = int(free[run_starts[-1]])
        if start + count > nb:
            self.imrt = imrt = np.concatenate([imrt, np.zeros(start + count - nb, dtype=_U64)])
        imrt[start:start + count] = 1
        return start << self.cluster_bits, first_free

    def _write_refblocks(self, first: int, end: int) -> bool:
        """rebuild_refcounts_write_refblocks; True when the reftable grew."""
        bits = self.view.block_bits
        per = 1 << bits
        first_free = 0
        grown = False
        cur = first
        while cur < end:
            index = cur >> bits
            block_start = index << bits
            block_end = block_start + per
            if not self.imrt[cur:min(block_end, end)].any():
                cur = block_end
                continue
            if index < len(self.reftable_new) and self.reftable_new[index]:
                block_offset = int(self.reftable_new[index])
            else:
                first_free = max(first_free, block_start)
                block_offset, first_free = self._alloc(1, first_free)
                end = max(end, (block_offset >> self.cluster_bits) + 1)
                if len(self.reftable_new) <= index:
                    entries = -(-(index + 1) * 8 // self.cs) * self.cs // 8
                    self.reftable_new = np.concatenate(
                        [self.reftable_new, np.zeros(entries - len(self.reftable_new), dtype=_U64)])
                    grown = True
                self.reftable_new[index] = block_offset
            values = np.zeros(per, dtype=_U64)
            chunk = self.imrt[block_start:block_end]
            values[:len(chunk)] = chunk
            if not self._may_write(0, block_offset, self.cs):
                self.error_report("ERROR writing refblock: Input/output error")
                self._rebuild_res.check_errors += 1
                raise _CheckFailed(5)
            self.file.pwrite(block_offset, encode_refblock(values, self.order))
            cur = block_end
        return grown

    # ---- check_oflag_copied --------------------------------------------------
    def _oflag_copied_clean(self, res: CheckResult) -> bool:
        """Whether check_oflag_copied would find nothing, known without
        reading the L2 tables again: the refcounts on disk are the computed
        ones, none is above 1, so every active L2 table and data cluster
        has refcount 1, and the first pass saw OFLAG_COPIED on all of them."""
        if not self.active_copied or self.max_count > 1 or self.mismatches:
            return False
        if res.corruptions or res.leaks or res.check_errors or res.corruptions_fixed or res.leaks_fixed:
            return False
        tables = self.l1[(self.l1 & _U64(L1E_OFFSET_MASK)) != 0]
        return bool((tables >= _U64(OFLAG_COPIED)).all())

    def check_oflag_copied(self, res: CheckResult, fix: int) -> None:
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not (res.check_errors or res.corruptions or res.leaks)
        else:
            repair = False
        word = "Repairing" if repair else "ERROR"
        rows = np.flatnonzero(self.l1 & _U64(L1E_OFFSET_MASK))
        per_batch = max(1, _BATCH_BYTES // self.cs)
        for b in range(0, len(rows), per_batch):
            idx = rows[b:b + per_batch]
            l2off = (self.l1[idx] & _U64(L1E_OFFSET_MASK)).astype(np.int64)
            l2_rc, l2_bad = self.view.lookup(l2off.astype(_U64) >> _U64(self.cluster_bits))
            keep = ~l2_bad
            idx, l2off, l2_rc = idx[keep], l2off[keep], l2_rc[keep]
            raw = self._read_l2(l2off)
            e = (raw[:, 0::2] if self.extl2 else raw).ravel()
            n = self.l2_entries
            # Normal and preallocated-zero clusters: those with a host cluster.
            offs = e & _U64(L2E_OFFSET_MASK)
            data = offs != 0
            if self.has_data_file:
                # With a data file, host offset 0 is data when OFLAG_COPIED says so.
                flags = OFLAG_COPIED if self.extl2 else OFLAG_ZERO | OFLAG_COPIED
                data |= (e & _U64(flags)) == _U64(OFLAG_COPIED)
            if ((e & _U64(OFLAG_COMPRESSED)) != 0).any():
                data &= (e & _U64(OFLAG_COMPRESSED)) == 0
            where = np.flatnonzero(data)
            if self.has_data_file:
                rc = np.ones(len(where), dtype=_U64)
                rc_bad = np.zeros(len(where), dtype=bool)
            else:
                rc, rc_bad = self.view.lookup(offs[where] >> _U64(self.cluster_bits))
            copied = (e[where] & _U64(OFLAG_COPIED)) != 0
            wrong = ~rc_bad & ((rc == 1) != copied)
            wrong_at, wrong_rc = where[wrong], rc[wrong]
            bounds = np.searchsorted(wrong_at, np.arange(len(idx) + 1) * n)
            for r in range(len(idx)):
                i = int(idx[r])
                l1e = int(self.l1[i])
                refcount = int(l2_rc[r])
                if (refcount == 1) != bool(l1e & OFLAG_COPIED):
                    res.corruptions += 1
                    self.report(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={refcount}")
                    if repair:
                        l1e = l1e | OFLAG_COPIED if refcount == 1 else l1e & ~OFLAG_COPIED
                        self.l1[i] = l1e
                        first = i & ~63  # qcow2_write_l1_entry writes one sector of entries
                        count = min(64, self.l1_size - first)
                        if not self._may_write(OL_ACTIVE_L1, self.l1_offset + first * 8, count * 8):
                            res.check_errors += 1
                            raise _CheckFailed(5)
                        self.file.pwrite(self.l1_offset + i * 8, struct.pack(">Q", l1e))
                        self.file.flush()
                        self.wrote = True
                        res.corruptions -= 1
                        res.corruptions_fixed += 1
                lo, hi = int(bounds[r]), int(bounds[r + 1])
                if lo == hi:
                    continue
                for at, refcount in zip(wrong_at[lo:hi].tolist(), wrong_rc[lo:hi].tolist()):
                    self.report(f"{word} OFLAG_COPIED data cluster: l2_entry={int(e[at]):x} "
                                f"refcount={refcount}")
                bad_entries = wrong_at[lo:hi] - r * n
                res.corruptions += len(bad_entries)
                if repair:
                    step = 2 if self.extl2 else 1
                    table = raw[r].copy()
                    table[bad_entries * step] ^= _U64(OFLAG_COPIED)
                    if not self._may_write(OL_ACTIVE_L2, int(l2off[r]), self.cs):
                        self.report("ERROR: Could not write L2 table; metadata overlap check failed: "
                                    "Input/output error")
                        res.check_errors += 1
                        raise _CheckFailed(5)
                    self.file.pwrite(int(l2off[r]), table.astype(">u8").tobytes())
                    self.file.flush()
                    self.wrote = True
                    res.corruptions -= len(bad_entries)
                    res.corruptions_fixed += len(bad_entries)


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")


def _error_report(line: str) -> None:
    """error_report(): the message prefixed with the program's name."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "qimg"
    if prog in ("__main__.py", "-m", "-c", ""):
        prog = "qimg"
    sys.stderr.write(f"{prog}: {line}\n")


def check_image(driver: Any, repair: str | None = None,
                report: Callable[[str], None] | None = None,
                error_report: Callable[[str], None] | None = None) -> CheckResult:
    """Check (and with ``repair`` 'leaks' or 'all', repair) a qcow2 image.

    ``driver`` offers file, header, read_only and drop_caches().  Findings
    are reported line by line to ``report`` (stderr by default), as QEMU
    prints them, and QEMU's error_report() lines to ``error_report``
    (stderr, after the program name); a check that cannot complete raises QimgError("Check
    failed: ...").
    """
    fix = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}[repair]
    try:
        unusable = driver in _UNUSABLE
    except TypeError:
        unusable = False
    if unusable:
        raise QimgError("Check failed: No medium found", 1)
    sys.stdout.flush()
    # the passes free and allocate batch buffers of megabytes: reuse them
    # rather than fault fresh pages in for each
    keep_freed_buffers()
    try:
        checker = Qcow2Checker(driver, fix, report or _stderr, error_report or _error_report)
    except _CheckFailed as e:
        raise QimgError(f"Check failed: {os.strerror(e.errno)}", 1) from None
    return checker.run()
