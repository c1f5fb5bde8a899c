"""QED's L1 table and a bounded cache of L2 tables, as numpy arrays.

Tables are ``table_size`` clusters of little-endian 64-bit offsets.  Updates
write only the sectors holding the changed entries (QEMU's qed_write_table);
a new L2 table is written whole before the L1 entry pointing at it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

from qimg.formats.qed import header as H

if TYPE_CHECKING:
    from qimg.formats.qed.driver import QedDriver

#: L2 tables kept in memory: a count, and a byte budget (tables can be
#: up to 1 GiB in hostile or extreme geometries)
L2_CACHE_TABLES = 64
L2_CACHE_BYTES = 64 << 20
ENTRIES_PER_SECTOR = H.SECTOR // 8


class Tables:
    def __init__(self, drv: "QedDriver") -> None:
        self.drv = drv
        h = drv.header
        self.table_bytes = h.cluster_size * h.table_size
        self.l1 = self.read_table(h.l1_table_offset)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def read_table(self, offset: int) -> np.ndarray:
        # the offset was validated to lie inside the file: the read is bounded
        data = self.drv.file.pread(offset, self.table_bytes)
        data += bytes(self.table_bytes - len(data))
        return np.frombuffer(data, dtype="<u8").astype(np.uint64)

    def l2(self, offset: int) -> np.ndarray:
        table = self._cache.get(offset)
        if table is None:
            table = self.read_table(offset)
            self._remember(offset, table)
        else:
            self._cache.move_to_end(offset)
        return table

    def _remember(self, offset: int, table: np.ndarray) -> None:
        self._cache[offset] = table
        limit = max(1, min(L2_CACHE_TABLES, L2_CACHE_BYTES // self.table_bytes))
        while len(self._cache) > limit:
            self._cache.popitem(last=False)

    def write_entries(self, offset: int, table: np.ndarray, index: int, n: int) -> None:
        """Write the whole sectors of ``table`` (at file ``offset``) that
        hold entries index..index+n-1."""
        first = index & ~(ENTRIES_PER_SECTOR - 1)
        last = -(-(index + n) // ENTRIES_PER_SECTOR) * ENTRIES_PER_SECTOR
        last = min(last, len(table))
        self.drv.file.pwrite(offset + first * 8, table[first:last].astype("<u8").tobytes())

    def write_l1(self, index: int, n: int) -> None:
        self.write_entries(self.drv.header.l1_table_offset, self.l1, index, n)

    def link(self, pos: int, nclusters: int, cluster: int, new_table: bool) -> None:
        """Point the L2 entries of ``nclusters`` clusters from guest ``pos``
        at ``cluster`` (consecutive clusters from it, or the zero marker),
        allocating the L2 table first when ``new_table``."""
        drv = self.drv
        l1_index = pos >> drv.l1_shift
        index = (pos >> drv.l2_shift) & drv.l2_mask
        if new_table:
            l2_offset = drv.allocate(drv.header.table_size)
            table = np.zeros(drv.table_nelems, dtype=np.uint64)
        else:
            l2_offset = int(self.l1[l1_index])
            table = self.l2(l2_offset)
        n = min(nclusters, drv.table_nelems - index)
        if cluster == H.ZERO_CLUSTER:
            table[index:index + n] = H.ZERO_CLUSTER
        else:
            table[index:index + n] = np.uint64(cluster) + np.arange(n, dtype=np.uint64) * np.uint64(drv.cluster_size)
        if new_table:
            drv.file.pwrite(l2_offset, table.astype("<u8").tobytes())
            self.l1[l1_index] = l2_offset
            self.write_l1(l1_index, 1)
            self._remember(l2_offset, table)
        else:
            self.write_entries(l2_offset, table, index, n)

    def write_l2(self, offset: int, table: np.ndarray) -> None:
        """Write a whole (repaired) L2 table and keep it cached."""
        self.drv.file.pwrite(offset, table.astype("<u8").tobytes())
        self._remember(offset, table)
