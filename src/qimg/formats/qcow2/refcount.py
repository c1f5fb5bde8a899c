"""qcow2 reference counts: the refcount table, refcount blocks, and cluster
allocation.

Allocation follows QEMU's own policy (first fit from a moving
free_cluster_index, self-describing refcount blocks, refcount table growth
placing new blocks and the new table past the covered area) so that images we
create are laid out exactly as qemu-img lays them out.  Refcount blocks are
numpy arrays; updates are applied one refcount block slice at a time.

This module imports numpy at top level: ``qimg info`` never imports it (the
driver imports it lazily, when the image is first written).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, NoReturn

# numpy loads OpenBLAS, which starts a thread per core at import; we never
# use BLAS, and under load those threads cost more CPU than our copy does.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402

from qimg.errors import QimgError
from qimg.formats.qcow2.header import hx

if TYPE_CHECKING:
    from qimg.protocols.file import File

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
#: QEMU's limit on the refcount table (in bytes)
QCOW_MAX_REFTABLE_SIZE = 8 << 20
_DTYPES = {3: ">u1", 4: ">u2", 5: ">u4", 6: ">u8"}
#: refcount blocks kept in memory before clean ones are dropped
_CACHE_BYTES = 32 << 20


class _Again(Exception):
    """QEMU's -EAGAIN: new refcount metadata took the space the caller
    meant to use; search again."""


def _refuse(what: str) -> NoReturn:
    raise QimgError(what)


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int,
                           generous: bool) -> tuple[int, int]:
    """(bytes of refcount metadata, refcount blocks) to cover ``clusters``
    clusters plus the metadata itself (a fixed point, as QEMU computes it)."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 >> refcount_order
    table = blocks = 0
    n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous:
            clusters += -(-table // 2)
            n = 0
            generous = False
            continue
        if n == last:
            break
    return (blocks + table) * cluster_size, blocks


def max_refcount(refcount_order: int) -> int:
    return (1 << (1 << refcount_order)) - 1


class Refcounts:
    """The refcount structures of one open image."""

    def __init__(self, file: "File", cluster_bits: int, refcount_order: int,
                 table_offset: int, table_clusters: int) -> None:
        self.file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.refcount_order = refcount_order
        # Sub-byte refcounts are kept unpacked, one uint8 per cluster.
        self.dtype = np.dtype(_DTYPES.get(refcount_order, "u1"))
        self.block_bits = cluster_bits + 3 - refcount_order
        self.block_size = 1 << self.block_bits  # refcounts per block
        self.max = max_refcount(refcount_order)
        self.table_offset = table_offset
        nbytes = table_clusters << cluster_bits
        self.table = np.frombuffer(file.pread(table_offset, nbytes), dtype=">u8").astype(np.uint64)
        self.free_cluster_index = 0
        #: sorted host cluster indices of the refcount blocks (block_clusters)
        self._block_list: list[int] | None = None
        self._blocks: dict[int, np.ndarray] = {}
        self._dirty: set[int] = set()
        #: a refcount structure that cannot be right: the driver's
        #: qcow2_signal_corruption (it reports, and fails the request)
        self.on_corruption: Callable[[str], NoReturn] = _refuse

    # ---- refcount blocks ----------------------------------------------------
    def _load(self, offset: int) -> np.ndarray:
        blk = self._blocks.get(offset)
        if blk is None:
            if offset & (self.cluster_size - 1):
                hits = np.flatnonzero((self.table & np.uint64(REFT_OFFSET_MASK)) == np.uint64(offset))
                index = int(hits[0]) if len(hits) else 0  # (a table being built holds it)
                self.on_corruption(f"Refblock offset {offset:#x} unaligned (reftable index: {hx(index)})")
            if len(self._blocks) * self.cluster_size > _CACHE_BYTES:
                self._evict()
            blk = self._decode(self.file.pread(offset, self.cluster_size))
            self._blocks[offset] = blk
        return blk

    def _decode(self, raw: bytes) -> np.ndarray:
        if self.refcount_order >= 3:
            return np.frombuffer(raw, dtype=self.dtype).copy()
        width = 1 << self.refcount_order
        b = np.frombuffer(raw, dtype=np.uint8)
        per = 8 // width
        # Entries are packed from the least significant bits up (QEMU's get_refcount_ro0..2).
        shifts = (np.arange(per, dtype=np.uint8) * width)[None, :]
        return ((b[:, None] >> shifts) & ((1 << width) - 1)).reshape(-1).astype(np.uint8)

    def _encode(self, blk: np.ndarray) -> bytes:
        if self.refcount_order >= 3:
            return blk.tobytes()
        width = 1 << self.refcount_order
        per = 8 // width
        shifts = (np.arange(per, dtype=np.uint8) * width)[None, :]
        return np.bitwise_or.reduce(blk.reshape(-1, per).astype(np.uint8) << shifts, axis=1).astype(np.uint8).tobytes()

    def _empty(self, offset: int) -> np.ndarray:
        blk = np.zeros(self.block_size, dtype=self.dtype)
        self._blocks[offset] = blk
        self._dirty.add(offset)
        return blk

    def _evict(self) -> None:
        self.flush()
        self._blocks.clear()

    def _block_offset(self, table_index: int) -> int:
        if table_index >= len(self.table):
            return 0
        return int(self.table[table_index]) & REFT_OFFSET_MASK

    def block_clusters(self) -> list[int]:
        """Sorted host cluster indices of all refcount blocks, kept between
        calls (every change to the table below drops it), so the overlap
        check before each data write is a bisection, not a table scan."""
        if self._block_list is None:
            rt = self.table & np.uint64(REFT_OFFSET_MASK)
            self._block_list = sorted(set((rt[rt != 0] >> np.uint64(self.cluster_bits)).tolist()))
        return self._block_list

    def get(self, cluster_index: int) -> int:
        off = self._block_offset(cluster_index >> self.block_bits)
        if not off:
            return 0
        return int(self._load(off)[cluster_index & (self.block_size - 1)])

    def get_range(self, start: int, count: int) -> np.ndarray:
        """Refcounts of clusters [start, start+count) as one array."""
        out = np.zeros(count, dtype=np.uint64)
        pos = start
        while pos < start + count:
            ti = pos >> self.block_bits
            bi = pos & (self.block_size - 1)
            n = min(self.block_size - bi, start + count - pos)
            off = self._block_offset(ti)
            if off:
                out[pos - start:pos - start + n] = self._load(off)[bi:bi + n]
            pos += n
        return out

    def flush(self) -> None:
        for off in sorted(self._dirty):
            self.file.pwrite(off, self._encode(self._blocks[off]))
        self._dirty.clear()

    def drop_caches(self) -> None:
        self._blocks.clear()
        self._dirty.clear()

    # ---- allocation ---------------------------------------------------------
    def alloc_noref(self, nclusters: int) -> int:
        """Find ``nclusters`` free clusters in a row from free_cluster_index
        (no refcount change), as alloc_clusters_noref."""
        idx = self.free_cluster_index
        # Usually (a growing image) the clusters right there are free.
        if nclusters > 0 and not self.get_range(idx, nclusters).any():
            if (idx + nclusters - 1) > ((1 << 63) - 1) >> self.cluster_bits:
                raise QimgError("File too large")
            self.free_cluster_index = idx + nclusters
            return idx << self.cluster_bits
        window = max(nclusters, 256)
        while True:
            # Look at a window of refcounts (growing: free space is usually
            # near); clusters past the covered area are free.
            window = min(window * 4, max(nclusters, 1 << 20))
            rc = self.get_range(idx, window + nclusters)
            free = np.concatenate(([0], (rc == 0).view(np.int8) if rc.dtype == bool else (rc == 0).astype(np.int8), [0]))
            d = np.diff(free)
            starts = np.flatnonzero(d == 1)
            ends = np.flatnonzero(d == -1)
            fit = np.flatnonzero(ends - starts >= nclusters)
            if len(fit):
                start = idx + int(starts[fit[0]])
                self.free_cluster_index = start + nclusters
                if (start + nclusters - 1) > ((1 << 63) - 1) >> self.cluster_bits:
                    raise QimgError("File too large")
                return start << self.cluster_bits
            # Continue at the last free run if it reaches the window's end.
            if len(ends) and ends[-1] == len(rc):
                idx += int(starts[-1])
            else:
                idx += len(rc)

    def alloc(self, size: int) -> int:
        """Allocate and reference clusters for ``size`` bytes (qcow2_alloc_clusters)."""
        n = -(-size >> self.cluster_bits)
        while True:
            offset = self.alloc_noref(n)
            try:
                self.update(offset, size, 1)
            except _Again:
                continue
            return offset

    def alloc_at(self, offset: int, nclusters: int) -> int:
        """Reference as many free clusters as possible from ``offset`` (at
        most ``nclusters``); returns how many (qcow2_alloc_clusters_at)."""
        while True:
            rc = self.get_range(offset >> self.cluster_bits, nclusters)
            nz = np.flatnonzero(rc)
            n = int(nz[0]) if len(nz) else nclusters
            try:
                self.update(offset, n << self.cluster_bits, 1)
            except _Again:
                continue
            return n

    def free(self, offset: int, size: int) -> None:
        """qcow2_free_clusters: a failure is told and the clusters leak; the
        request that freed them goes on (QEMU neither retries nor fails it)."""
        import errno
        import sys

        try:
            self.update(offset, size, -1)
        except (_Again, OSError, QimgError) as e:
            code = errno.EAGAIN if isinstance(e, _Again) else getattr(e, "errno", None) or errno.EINVAL
            sys.stderr.write(f"qcow2_free_clusters failed: {os.strerror(code)}\n")

    def update(self, offset: int, length: int, addend: int) -> None:
        """Add ``addend`` to the refcount of each cluster touching the range.

        Raises _Again after new refcount metadata was placed (the caller
        searches free space again); partial updates are undone first.
        """
        if length <= 0:
            return
        start = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        pos = start
        try:
            while pos <= last:
                ti = pos >> self.block_bits
                bi = pos & (self.block_size - 1)
                n = min(self.block_size - bi, last + 1 - pos)
                try:
                    blk = self._alloc_block(pos)
                except _Again:
                    # Let the caller's search restart where this update began.
                    self.free_cluster_index = min(self.free_cluster_index, start)
                    raise
                seg = blk[bi:bi + n].astype(np.int64) + addend
                if (seg < 0).any() or (seg > self.max).any():
                    raise QimgError("Invalid refcount update")
                blk[bi:bi + n] = seg
                self._dirty.add(self._block_offset(ti))
                if addend < 0:
                    zeros = np.flatnonzero(seg == 0)
                    if len(zeros) and pos + int(zeros[0]) < self.free_cluster_index:
                        self.free_cluster_index = pos + int(zeros[0])
                pos += n
        except (_Again, QimgError):
            if pos > start:
                self.update(offset, (pos - start) << self.cluster_bits, -addend)
            raise

    def _alloc_block(self, cluster_index: int) -> np.ndarray:
        """The refcount block covering ``cluster_index``, creating it (and
        growing the table) if needed, as alloc_refcount_block."""
        ti = cluster_index >> self.block_bits
        off = self._block_offset(ti)
        if off:
            return self._load(off)
        new_block = self.alloc_noref(1)
        if new_block == 0:
            self.on_corruption("Preventing invalid allocation of refcount block at offset 0")
        if (new_block >> (self.cluster_bits + self.block_bits)) == ti:
            blk = self._empty(new_block)
            blk[(new_block >> self.cluster_bits) & (self.block_size - 1)] = 1
        else:
            self.update(new_block, self.cluster_size, 1)
            self.flush()
            self._empty(new_block)
        self.flush()
        if ti < len(self.table):
            self.file.pwrite(self.table_offset + ti * 8, int(new_block).to_bytes(8, "big"))
            self.table[ti] = new_block
            self._block_list = None
            raise _Again()
        blocks_used = -(-max(cluster_index + 1, (new_block >> self.cluster_bits) + 1) // self.block_size)
        self.refcount_area(blocks_used * self.block_size * self.cluster_size, 0, False, ti, new_block)
        raise _Again()

    def refcount_area(self, start_offset: int, additional_clusters: int, exact_size: bool,
                      new_index: int, new_offset: int) -> int:
        """Place new refcount blocks and a new, larger refcount table at
        ``start_offset`` covering everything up to the area's end plus
        ``additional_clusters``; returns the end of the new metadata
        (qcow2_refcount_area)."""
        cs = self.cluster_size
        _, total_blocks = refcount_metadata_size(start_offset // cs + additional_clusters, cs,
                                                 self.refcount_order, not exact_size)
        if total_blocks > QCOW_MAX_REFTABLE_SIZE:
            raise QimgError("File too large")
        area_index = (start_offset // cs) // self.block_size
        table_size = total_blocks if exact_size else total_blocks + -(-total_blocks // 2)
        per = cs // 8
        table_size = -(-table_size // per) * per
        table_clusters = table_size * 8 // cs
        if table_size > QCOW_MAX_REFTABLE_SIZE:
            raise QimgError("File too large")
        new_table = np.zeros(table_size, dtype=np.uint64)
        n = min(table_size, len(self.table))
        new_table[:n] = self.table[:n]
        if new_offset:
            new_table[new_index] = new_offset
        extra = int(np.count_nonzero(new_table[area_index:total_blocks] == 0))
        table_offset = start_offset + extra * cs
        end_offset = table_offset + table_clusters * cs
        block_offset = start_offset
        for i in range(area_index, total_blocks):
            if new_table[i]:
                blk = self._load(int(new_table[i]) & REFT_OFFSET_MASK)
                boff = int(new_table[i]) & REFT_OFFSET_MASK
            else:
                blk = self._empty(block_offset)
                boff = block_offset
                new_table[i] = block_offset
                block_offset += cs
            first = i * self.block_size * cs
            if first < end_offset:
                j = (start_offset - first) // cs if first < start_offset else 0
                end_index = min((end_offset - first) // cs, self.block_size)
                blk[j:end_index] = 1
                self._dirty.add(boff)
        self.flush()
        self.file.pwrite(table_offset, new_table.astype(">u8").tobytes())
        self.file.pwrite(48, table_offset.to_bytes(8, "big") + table_clusters.to_bytes(4, "big"))
        old_offset, old_size = self.table_offset, len(self.table)
        self.table = new_table
        self._block_list = None
        self.table_offset = table_offset
        self.free(old_offset, old_size * 8)
        return end_offset

    def shrink_table(self) -> list[int]:
        """Drop refcount blocks that count nothing but themselves
        (qcow2_shrink_reftable); returns the offsets of the dropped blocks,
        already forgotten here (the caller punches them)."""
        self.flush()
        new = self.table.copy()
        for i in np.flatnonzero(self.table & np.uint64(REFT_OFFSET_MASK)):
            off = int(self.table[i]) & REFT_OFFSET_MASK
            blk = self._load(off)
            own = off >> self.cluster_bits
            if (own >> self.block_bits) == i:
                j = own & (self.block_size - 1)
                unused = not blk[:j].any() and not blk[j + 1:].any()
            else:
                unused = not blk.any()
            if unused:
                new[i] = 0
        self.file.pwrite(self.table_offset, new.astype(">u8").tobytes())
        dropped = []
        for i in np.flatnonzero((self.table != 0) & (new == 0)):
            off = int(self.table[i]) & REFT_OFFSET_MASK
            own = off >> self.cluster_bits
            desc = self._block_offset(own >> self.block_bits)
            if desc:
                self._load(desc)[own & (self.block_size - 1)] = 0
                self._dirty.add(desc)
            self.free_cluster_index = min(self.free_cluster_index, own)
            self.table[i] = 0
            self._block_list = None
            dropped.append(off)
        for off in dropped:
            self._blocks.pop(off, None)
            self._dirty.discard(off)
        return dropped

    def last_used_cluster(self, file_size: int) -> int:
        """Index of the last cluster with a reference below ``file_size``, or -1."""
        n = -(-file_size >> self.cluster_bits)
        nz = np.flatnonzero(self.get_range(0, n))
        return int(nz[-1]) if len(nz) else -1

    @property
    def table_clusters(self) -> int:
        return len(self.table) * 8 >> self.cluster_bits
