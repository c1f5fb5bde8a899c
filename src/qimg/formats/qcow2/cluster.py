"""qcow2 cluster mapping: the L1 table, a bounded LRU cache of L2 tables, and
classification of L2 entries into runs (docs/interop/qcow2.txt, "Cluster
mapping").

Entries are classified a whole L2 slice at a time with numpy, so a run of a
million clusters costs a handful of vectorized steps, not a Python loop.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, NoReturn

# numpy loads OpenBLAS, which starts a thread per core at import; we never
# use BLAS, and under load those threads cost more CPU than our copy does.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402

from qimg.errors import QimgError
from qimg.formats.qcow2.header import hx

if TYPE_CHECKING:
    from qimg.protocols.file import File

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1

# Cluster types, as QEMU's QCow2ClusterType.
UNALLOCATED = 0
NORMAL = 1
ZERO_PLAIN = 2
ZERO_ALLOC = 3
COMPRESSED = 4
# Subcluster types that only extended L2 entries have (QCow2SubclusterType):
# a host cluster exists but this subcluster is not allocated in it (reads
# fall through to the backing file), and an entry whose bitmap contradicts
# itself.
UNALLOCATED_ALLOC = 5
INVALID = 6

#: subclusters per cluster with extended L2 entries
SUBCLUSTERS = 32
ALL_ALLOC = (1 << 32) - 1
ALL_ZEROES = ALL_ALLOC << 32

def _refuse(what: str) -> NoReturn:
    raise QimgError(what)


#: bytes of L2 tables kept in memory (QEMU's default l2-cache-size is 32 MiB max)
L2_CACHE_BYTES = 32 << 20


def classify(entries: np.ndarray, data_file: bool = False) -> np.ndarray:
    """The cluster type of each L2 entry (uint64 array in, uint8 array out).
    With an external ``data_file`` host offset 0 is a real cluster (guest
    cluster 0): such entries always carry QCOW_OFLAG_COPIED, which tells
    them from unallocated ones (qcow2_get_cluster_type)."""
    comp = (entries & np.uint64(QCOW_OFLAG_COMPRESSED)) != 0
    off_mask = L2E_OFFSET_MASK | QCOW_OFLAG_COPIED if data_file else L2E_OFFSET_MASK
    has_off = (entries & np.uint64(off_mask)) != 0
    zero = (entries & np.uint64(QCOW_OFLAG_ZERO)) != 0
    kinds = np.where(has_off, NORMAL, UNALLOCATED).astype(np.uint8)
    kinds[zero] = np.where(has_off[zero], ZERO_ALLOC, ZERO_PLAIN)
    kinds[comp] = COMPRESSED
    return kinds


def sub_range_mask(first: int, end: int) -> int:
    """Allocation bits of subclusters [first, end) (QCOW_OFLAG_SUB_ALLOC_RANGE);
    shift left by 32 for their zero bits."""
    return ((1 << end) - 1) ^ ((1 << first) - 1)


def classify_sub(entries: np.ndarray, bitmaps: np.ndarray, data_file: bool = False) -> np.ndarray:
    """Subcluster types of extended L2 entries: an (n, 32) uint8 array, as
    qcow2_get_subcluster_type.  Bit 0 of the entry (the zero flag of plain
    L2 entries) means nothing here; a contradictory bitmap makes the whole
    cluster INVALID."""
    shifts = np.arange(SUBCLUSTERS, dtype=np.uint64)
    b = bitmaps.astype(np.uint64)[:, None]
    alloc = ((b >> shifts) & np.uint64(1)).astype(bool)
    zero = ((b >> (shifts + np.uint64(32))) & np.uint64(1)).astype(bool)
    off_mask = L2E_OFFSET_MASK | QCOW_OFLAG_COPIED if data_file else L2E_OFFSET_MASK
    has_off = ((entries & np.uint64(off_mask)) != 0)[:, None]
    comp = (entries & np.uint64(QCOW_OFLAG_COMPRESSED)) != 0
    kinds = np.where(has_off,
                     np.where(zero, ZERO_ALLOC, np.where(alloc, NORMAL, UNALLOCATED_ALLOC)),
                     np.where(zero, ZERO_PLAIN, UNALLOCATED)).astype(np.uint8)
    lo = bitmaps & np.uint64(ALL_ALLOC)
    bad = np.where(has_off[:, 0], (bitmaps >> np.uint64(32)) & lo != 0, lo != 0)
    kinds[bad & ~comp] = INVALID
    kinds[comp] = COMPRESSED
    return kinds


class ClusterMap:
    """L1 and L2 tables of one image; dirty tables are written by flush().

    With extended L2 entries (``extl2``) each L2 entry is followed by its
    64-bit subcluster bitmap: tables are cached whole, ``l2_table`` gives a
    strided view of the entries and ``l2_bitmaps`` one of the bitmaps, so
    code that only knows entries works on either layout."""

    def __init__(self, file: "File", cluster_bits: int, l1_offset: int, l1_size: int,
                 extl2: bool = False) -> None:
        self.file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        #: guest data lives in an external data file (see classify)
        self.data_file = False
        self.extl2 = extl2
        self.l2_bits = cluster_bits - (4 if extl2 else 3)
        #: log2 of the subcluster size (the cluster size without extended L2)
        self.sc_bits = cluster_bits - 5 if extl2 else cluster_bits
        self.l2_size = 1 << self.l2_bits
        self.l1_offset = l1_offset
        raw = file.pread(l1_offset, l1_size * 8) if l1_size else b""
        self.l1 = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        self.l1_dirty: set[int] = set()
        self._l2: OrderedDict[int, np.ndarray] = OrderedDict()
        self._l2_dirty: set[int] = set()
        self._max_tables = max(16, L2_CACHE_BYTES >> cluster_bits)
        #: called before dirty L2 tables are written (refcounts go first)
        self.before_l2_flush: Callable[[], None] | None = None
        #: a table or cluster offset that cannot be right: the driver's
        #: qcow2_signal_corruption (it reports, and fails the request)
        self.on_corruption: Callable[[str], NoReturn] = _refuse

    # ---- tables -------------------------------------------------------------
    def l2_offset(self, l1_index: int) -> int:
        if l1_index >= len(self.l1):
            return 0
        return int(self.l1[l1_index]) & L1E_OFFSET_MASK

    def l2_raw(self, l2_offset: int) -> np.ndarray:
        """The whole table as stored (entries and, with extended L2, bitmaps)."""
        tab = self._l2.get(l2_offset)
        if tab is not None:
            self._l2.move_to_end(l2_offset)
            return tab
        if l2_offset & (self.cluster_size - 1):
            hits = np.flatnonzero((self.l1 & np.uint64(L1E_OFFSET_MASK)) == np.uint64(l2_offset))
            l1_index = int(hits[0]) if len(hits) else 0  # (a snapshot's table may name it)
            self.on_corruption(f"L2 table offset {l2_offset:#x} unaligned (L1 index: {hx(l1_index)})")
        if len(self._l2) >= self._max_tables:
            self._evict()
        tab = np.frombuffer(self.file.pread(l2_offset, self.cluster_size), dtype=">u8").astype(np.uint64)
        if len(tab) < self.cluster_size // 8:
            # a table cut short by the end of the file reads as zeroes
            tab = np.concatenate((tab, np.zeros(self.cluster_size // 8 - len(tab), dtype=np.uint64)))
        self._l2[l2_offset] = tab
        return tab

    def l2_table(self, l2_offset: int) -> np.ndarray:
        """The L2 entries of the table (a writable view with extended L2)."""
        raw = self.l2_raw(l2_offset)
        return raw[0::2] if self.extl2 else raw

    def l2_bitmaps(self, l2_offset: int) -> np.ndarray:
        """The subcluster bitmaps of an extended L2 table (a writable view)."""
        return self.l2_raw(l2_offset)[1::2]

    def new_l2_table(self, l2_offset: int, contents: np.ndarray | None = None) -> np.ndarray:
        """A new table at ``l2_offset``, zeroed or a copy of ``contents``
        (entries only, or the raw table with bitmaps); returns its entries."""
        if len(self._l2) >= self._max_tables:
            self._evict()
        raw = np.zeros(self.cluster_size // 8, dtype=np.uint64)
        if contents is not None:
            if len(contents) == len(raw):
                raw[:] = contents
            elif self.extl2:
                raw[0::2] = contents
            else:
                raw[:len(contents)] = contents
        self._l2[l2_offset] = raw
        self._l2_dirty.add(l2_offset)
        return raw[0::2] if self.extl2 else raw

    def mark_dirty(self, l2_offset: int) -> None:
        self._l2_dirty.add(l2_offset)

    def _evict(self) -> None:
        off, _ = next(iter(self._l2.items()))
        if off in self._l2_dirty:
            self.flush()
        self._l2.pop(off, None)

    def entries(self, cluster_index: int, count: int) -> np.ndarray:
        """L2 entries for clusters [cluster_index, +count) within one L2 table
        (zeroes where no L2 table is allocated)."""
        l1i = cluster_index >> self.l2_bits
        i = cluster_index & (self.l2_size - 1)
        count = min(count, self.l2_size - i)
        off = self.l2_offset(l1i)
        if not off:
            return np.zeros(count, dtype=np.uint64)
        return self.l2_table(off)[i:i + count]

    def bitmaps(self, cluster_index: int, count: int) -> np.ndarray:
        """Subcluster bitmaps for the clusters ``entries`` would return."""
        l1i = cluster_index >> self.l2_bits
        i = cluster_index & (self.l2_size - 1)
        count = min(count, self.l2_size - i)
        off = self.l2_offset(l1i)
        if not off:
            return np.zeros(count, dtype=np.uint64)
        return self.l2_bitmaps(off)[i:i + count]

    def check_host(self, cluster_index: int, entry: int) -> None:
        """A cluster's host offset must be cluster aligned (qcow2_get_host_offset)."""
        host = entry & L2E_OFFSET_MASK
        if host & (self.cluster_size - 1):
            self.on_corruption(
                f"Cluster allocation offset {host:#x} unaligned (L2 offset: "
                f"{hx(self.l2_offset(cluster_index >> self.l2_bits))}, "
                f"L2 index: {hx(cluster_index & (self.l2_size - 1))})")

    def subrun(self, sc_index: int, count: int) -> tuple[int, int, int]:
        """Extended L2: (subcluster type, n, L2 entry of the first cluster)
        of the longest run of subclusters from ``sc_index`` (at most
        ``count``) with one type, contiguous on the host where they have a
        host cluster (count_contiguous_subclusters).  A compressed cluster
        comes alone; the run stops at the end of the L2 table.  For a
        corrupt entry met on the way (as QEMU meets it: the first, or the
        next one a run goes on into) it is (INVALID, 1, its cluster index)."""
        ci, sc = sc_index >> 5, sc_index & 31
        nclusters = -(-(sc + count) // SUBCLUSTERS)
        gap = self._unmapped_clusters(ci, nclusters)
        if gap:
            return UNALLOCATED, min(count, gap * SUBCLUSTERS - sc), 0
        ents = self.entries(ci, nclusters)
        bms = self.bitmaps(ci, len(ents))
        limit = min(count, len(ents) * SUBCLUSTERS - sc)
        row = classify_sub(ents[:1], bms[:1], self.data_file)[0]
        first = int(ents[0])
        kind = int(row[sc])
        if kind == INVALID:
            return INVALID, 1, ci
        if kind == COMPRESSED:
            return kind, min(limit, SUBCLUSTERS - sc), first
        if kind in (NORMAL, ZERO_ALLOC, UNALLOCATED_ALLOC):
            self.check_host(ci, first)
        other = np.flatnonzero(row[sc:] != kind)
        if len(other):
            return kind, min(limit, int(other[0])), first
        n = SUBCLUSTERS - sc
        # Whole clusters of the same kind go on the run (host-contiguous
        # where they have a host cluster), looked at in growing windows so
        # that the work follows the run's length, not the table's.
        bitmap = {NORMAL: ALL_ALLOC, ZERO_ALLOC: ALL_ZEROES, ZERO_PLAIN: ALL_ZEROES}.get(kind, 0)
        hosted = kind in (NORMAL, ZERO_ALLOC, UNALLOCATED_ALLOC)
        off_mask = np.uint64(L2E_OFFSET_MASK | QCOW_OFLAG_COPIED if self.data_file else L2E_OFFSET_MASK)
        base = np.uint64(first & L2E_OFFSET_MASK)
        k, width = 1, 8
        while k < len(ents) and n < limit:
            e, b = ents[k:k + width], bms[k:k + width]
            ok = (b == np.uint64(bitmap)) & ((e & np.uint64(QCOW_OFLAG_COMPRESSED)) == 0)
            if hosted:
                ok &= (e & np.uint64(L2E_OFFSET_MASK)) == \
                    base + np.arange(k, k + len(e), dtype=np.uint64) * np.uint64(self.cluster_size)
                ok &= (e & off_mask) != 0
            else:
                ok &= (e & off_mask) == 0
            bad = np.flatnonzero(~ok)
            if not len(bad):
                n += len(e) * SUBCLUSTERS
                k += len(e)
                width *= 2
                continue
            j = k + int(bad[0])
            n += (j - k) * SUBCLUSTERS
            # count_contiguous_subclusters reads the entry the run goes on
            # into: a corrupt one fails the request, a matching one may add
            # its leading subclusters
            rowj = classify_sub(ents[j:j + 1], bms[j:j + 1], self.data_file)[0]
            if rowj[0] == INVALID:
                return INVALID, 1, ci + j
            same_host = not hosted or (int(ents[j]) & L2E_OFFSET_MASK) == \
                (first & L2E_OFFSET_MASK) + j * self.cluster_size
            if same_host:
                lead = np.flatnonzero(rowj != kind)
                n += int(lead[0]) if len(lead) else SUBCLUSTERS
            break
        return kind, min(n, limit), first

    def run(self, cluster_index: int, count: int) -> tuple[int, int, int]:
        """(type, n, first entry) of the longest run of clusters from
        ``cluster_index`` (at most ``count``) that share one type and, for
        clusters with a host offset, are contiguous on the host.
        Compressed clusters are merged by type only."""
        first: int | None = None
        kind = -1
        n = 0
        cs = self.cluster_size
        while n < count:
            if kind in (-1, UNALLOCATED):
                gap = self._unmapped_clusters(cluster_index + n, count - n)
                if gap:
                    # L1 entries without an L2 table: unallocated in one step,
                    # so a sparse petabyte image is not walked table by table.
                    first, kind = (0, UNALLOCATED) if first is None else (first, kind)
                    n += gap
                    continue
            ents = self.entries(cluster_index + n, count - n)
            kinds = classify(ents, self.data_file)
            if first is None:
                first = int(ents[0])
                kind = int(kinds[0])
                if kind in (NORMAL, ZERO_ALLOC):
                    self.check_host(cluster_index, first)
            same = kinds == kind
            if kind in (NORMAL, ZERO_ALLOC):
                base = (first & L2E_OFFSET_MASK) + n * cs
                hosts = ents & np.uint64(L2E_OFFSET_MASK)
                expect = np.uint64(base) + np.arange(len(ents), dtype=np.uint64) * np.uint64(cs)
                same &= hosts == expect
            bad = np.flatnonzero(~same)
            if len(bad):
                n += int(bad[0])
                break
            n += len(ents)
        assert first is not None
        return kind, n, first

    def _unmapped_clusters(self, cluster_index: int, count: int) -> int:
        """How many clusters from ``cluster_index`` (at most ``count``) lie
        under L1 entries that have no L2 table; 0 if the first one has one."""
        l1i = cluster_index >> self.l2_bits
        if self.l2_offset(l1i):
            return 0
        last = (cluster_index + count - 1) >> self.l2_bits
        nxt, width = l1i + 1, 64
        # Look ahead in growing windows: the work is proportional to the gap,
        # not to the rest of the table, however the tables alternate.
        # Past the end of the L1 table nothing is mapped.
        last = min(last, len(self.l1) - 1)
        while nxt <= last:
            window = self.l1[nxt:min(last + 1, nxt + width)] & np.uint64(L1E_OFFSET_MASK)
            mapped = np.flatnonzero(window)
            if len(mapped):
                nxt += int(mapped[0])
                break
            nxt += len(window)
            width *= 2
        if nxt > last:
            return count
        return min(count, (nxt << self.l2_bits) - cluster_index)

    # ---- writing back ---------------------------------------------------------
    def flush(self) -> None:
        """Write dirty L2 tables, then dirty L1 entries (QEMU's order)."""
        if self._l2_dirty and self.before_l2_flush is not None:
            self.before_l2_flush()
        for off in sorted(self._l2_dirty):
            tab = self._l2.get(off)
            if tab is not None:
                self.file.pwrite(off, tab.astype(">u8").tobytes())
        self._l2_dirty.clear()
        if self.l1_dirty:
            lo, hi = min(self.l1_dirty), max(self.l1_dirty) + 1
            self.file.pwrite(self.l1_offset + lo * 8, self.l1[lo:hi].astype(">u8").tobytes())
            self.l1_dirty.clear()

    def drop_caches(self) -> None:
        self._l2.clear()
        self._l2_dirty.clear()
        self.l1_dirty.clear()
