"""QED consistency check and repair (QEMU's block/qed-check.c).

Every cluster the L1 table, the L2 tables and their data clusters point at
is marked in a bitmap: a cluster marked twice is a corruption, an offset
outside the file is a corruption (with repair: the entry is cleared), a
cluster past the header that nothing marks is a leak (leaks are reported,
never repaired: QED has no free-space map to return them to).  A repair
that leaves no corruption marks the image clean (clears NEED_CHECK).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from qimg.block.check import CheckResult
from qimg.formats.qed import header as H

if TYPE_CHECKING:
    from qimg.formats.qed.driver import QedDriver


class _Checker:
    def __init__(self, drv: "QedDriver", fix: bool) -> None:
        self.drv = drv
        self.fix = fix
        self.result = CheckResult(compressed_clusters=0, allocated_clusters=0, fragmented_clusters=0)
        self.nclusters = drv.bytes_to_clusters(drv.file_size)
        # a little slack: QEMU's rounding can mark a few bits past the end
        self.used = np.zeros(self.nclusters + drv.header.table_size + 2, dtype=bool)

    def _indices(self, offsets: np.ndarray) -> np.ndarray:
        cs = np.uint64(self.drv.cluster_size)
        return (((offsets + (cs - np.uint64(1))) & ~(cs - np.uint64(1))) // (cs - np.uint64(1))).astype(np.int64)

    def set_used(self, idx: np.ndarray) -> bool:
        """Mark clusters in order; each one marked before is a corruption."""
        idx = idx[idx < len(self.used)]
        fresh = np.unique(idx[~self.used[idx]])
        corruptions = len(idx) - len(fresh)
        self.used[idx] = True
        self.result.corruptions += corruptions
        return corruptions == 0

    def set_used_range(self, offset: int, n: int) -> bool:
        first = self.drv.bytes_to_clusters(offset)
        return self.set_used(np.arange(first, first + n, dtype=np.int64))

    def check_l2(self, table: np.ndarray) -> int:
        drv = self.drv
        cs = drv.cluster_size
        alloc = table > np.uint64(H.ZERO_CLUSTER)
        offsets = table[alloc]
        r = self.result
        r.allocated_clusters += len(offsets)
        if len(offsets) > 1:
            r.fragmented_clusters += int(np.count_nonzero(offsets[1:] != offsets[:-1] + np.uint64(cs)))
        valid = ((offsets & np.uint64(cs - 1)) == 0) & (offsets >= np.uint64(drv.header.header_size * cs)) \
            & (offsets < np.uint64(drv.file_size))
        invalid = len(offsets) - int(np.count_nonzero(valid))
        if invalid:
            if self.fix:
                positions = np.flatnonzero(alloc)[~valid]
                table[positions] = 0
                r.corruptions_fixed += invalid
            else:
                r.corruptions += invalid
        self.set_used(self._indices(offsets[valid]))
        return invalid

    def check_l1(self) -> int:
        drv = self.drv
        h = drv.header
        t = drv.tables
        self.set_used_range(h.l1_table_offset, h.table_size)
        last_error = 0
        invalid_l1 = 0
        used = np.flatnonzero(t.l1)
        # invalid table offsets, found for the whole L1 table at once
        offs = t.l1[used]
        cs = np.uint64(h.cluster_size)
        ends = offs + np.uint64((h.table_size - 1) * h.cluster_size)
        ok = (ends > offs) & ((offs & (cs - np.uint64(1))) == 0) \
            & (offs >= np.uint64(h.header_size * h.cluster_size)) & (ends < np.uint64(drv.file_size))
        invalid_l1 = len(used) - int(np.count_nonzero(ok))
        if invalid_l1:
            if self.fix:
                t.l1[used[~ok]] = 0
                self.result.corruptions_fixed += invalid_l1
            else:
                self.result.corruptions += invalid_l1
        for i in used[ok]:
            offset = int(t.l1[i])
            if not self.set_used_range(offset, h.table_size):
                continue  # a table that overlaps others is not trusted
            try:
                table = t.l2(offset)
            except OSError as e:
                self.result.check_errors += 1
                last_error = e.errno or 5
                continue
            if self.check_l2(table) and self.fix:
                try:
                    t.write_l2(offset, table)
                except OSError as e:
                    self.result.check_errors += 1
                    last_error = e.errno or 5
        if invalid_l1 and self.fix:
            try:
                t.write_l1(0, drv.table_nelems)
            except OSError as e:
                self.result.check_errors += 1
                last_error = e.errno or 5
        return last_error

    def count_leaks(self) -> None:
        start = self.drv.header.header_size
        if self.nclusters > start:
            self.result.leaks += int(np.count_nonzero(~self.used[start:self.nclusters]))

    def mark_clean(self) -> None:
        drv = self.drv
        r = self.result
        if r.corruptions or r.check_errors or not drv.header.features & H.QED_F_NEED_CHECK:
            return
        drv.file.flush()
        drv.header.features &= ~H.QED_F_NEED_CHECK
        drv.write_header()


def check_image(drv: "QedDriver", fix: bool) -> CheckResult:
    """Check (with ``fix``: repair) an open QED image."""
    h = drv.header
    if fix and h.autoclear_features & ~H.QED_AUTOCLEAR_FEATURE_MASK:
        # a read-write open drops autoclear bits this program does not know
        h.autoclear_features &= H.QED_AUTOCLEAR_FEATURE_MASK
        drv.write_header()
    c = _Checker(drv, fix)
    h = drv.header
    c.result.total_clusters = -(-h.image_size // h.cluster_size)
    if c.check_l1() == 0:
        c.count_leaks()
        if fix:
            c.mark_clean()
    return c.result
