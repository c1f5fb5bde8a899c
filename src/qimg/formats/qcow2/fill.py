"""Filling a qcow2 image that was just created, front to back, without the
cluster map or the refcount arrays (and so without importing numpy, whose
import costs a noticeable part of converting a few GiB).

A new image is a header, a refcount table, one refcount block and an
empty L1 table, every cluster of the file referenced once.  Writes that
come in guest order (convert's) only ever allocate at the end of the file:
an L2 table when a write first enters the guest range it maps, then the
write's data clusters, exactly as io.write places them.  Here those
allocations are made on plain bytes: the first refcount block, the new L2
tables and the L1 entries, written out (refcounts, then L2 tables, then
L1, as ClusterMap.flush orders them) when the fill ends.

The fill ends, and the image's usual metadata takes over from the file,
at the first thing it does not do: a write behind the last one, a write
needing clusters past what the first refcount block counts, or anything
that needs the cluster map or the refcounts (the driver ends the fill
before handing those out).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from qimg.formats.qcow2.deferred import pwrite_data

if TYPE_CHECKING:
    from qimg.formats.qcow2.driver import Qcow2Driver

QCOW_OFLAG_COPIED = 1 << 63
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
#: 16-bit refcounts, the default: the only width filled here
REFCOUNT_ORDER = 4
_ONE = b"\x00\x01"
#: a new image's L1 table is this small up to a few hundred TiB of 64 KiB
#: clusters; a bigger one is not worth reading to find it empty
MAX_L1_BYTES = 1 << 20


class Fill:
    def __init__(self, d: "Qcow2Driver", refblock_offset: int, refblock: bytearray, used: int) -> None:
        self.d = d
        self.cb = d.cluster_bits
        self.l2_bits = d.cluster_bits - 3
        self.refblock_offset = refblock_offset
        self.refblock = refblock
        #: the next free cluster: every one before it is referenced
        self.next = used
        #: L1 index -> host offset of its new L2 table, and the table
        self.l1: dict[int, int] = {}
        self.tables: dict[int, bytearray] = {}
        #: the guest cluster written last and its host offset (-1: none yet)
        self.last = -1
        self.last_host = 0

    @classmethod
    def start(cls, d: "Qcow2Driver") -> "Fill | None":
        """A fill of ``d``, when it is an image as create leaves it and
        nothing has loaded its metadata."""
        h = d.header
        cs = d.cluster_size
        if (d.read_only or d._map is not None or d._refs is not None or h.extended_l2 or h.backing_file
                or h.refcount_order != REFCOUNT_ORDER or h.crypt_method or h.nb_snapshots
                or h.bitmaps_ext is not None or d.data_file is not d.file or h.refcount_table_clusters < 1):
            return None
        reftable = d.file.pread(h.refcount_table_offset, 8 * min(h.refcount_table_clusters << (d.cluster_bits - 3),
                                                                 1 << 16))
        first = int.from_bytes(reftable[:8], "big")
        if reftable[8:] != bytes(len(reftable) - 8) or not first or first & ~REFT_OFFSET_MASK or first & (cs - 1):
            return None
        if 8 * h.l1_size > MAX_L1_BYTES:
            return None
        l1 = d.file.pread(h.l1_table_offset, 8 * h.l1_size)
        if len(l1) != 8 * h.l1_size or l1 != bytes(len(l1)):
            return None
        used = -(-d.file.size // cs)
        if 2 * used > cs:
            return None
        refblock = bytearray(d.file.pread(first, cs))
        if len(refblock) != cs or refblock[:2 * used] != _ONE * used or refblock[2 * used:] != bytes(cs - 2 * used):
            return None
        return cls(d, first, refblock, used)

    def _alloc(self, n: int) -> int:
        i = self.next
        self.refblock[2 * i:2 * (i + n)] = _ONE * n
        self.next += n
        return i << self.cb

    def write(self, offset: int, data: memoryview) -> bool:
        """Write as io.write would; False (nothing done) for a write the
        fill does not make."""
        cb = self.cb
        cs = 1 << cb
        end = offset + len(data)
        if not data or end > self.d.size:
            return False
        first, last = offset >> cb, (end - 1) >> cb
        fresh = first + (first == self.last)  # the first cluster that needs allocating
        if first < self.last:
            return False
        if fresh <= last:
            tables = range(fresh >> self.l2_bits, (last >> self.l2_bits) + 1)
            need = last + 1 - fresh + sum(1 for li in tables if li not in self.l1)
            if self.next + need > len(self.refblock) // 2:
                return False
        pos = offset
        if first == self.last:
            # the rest of the cluster written last: in place
            seg_end = min(end, (first + 1) << cb)
            pwrite_data(self.d, self.last_host + (pos & (cs - 1)), data[:seg_end - offset])
            pos = seg_end
        while pos < end:
            ci = pos >> cb
            li = ci >> self.l2_bits
            seg_last = min(last, ((li + 1) << self.l2_bits) - 1)
            n = seg_last - ci + 1
            tab = self.tables.get(li)
            if tab is None:
                self.l1[li] = self._alloc(1)
                tab = self.tables[li] = bytearray(cs)
            host = self._alloc(n)
            seg_end = min(end, (seg_last + 1) << cb)
            # new clusters read as zeroes around the data (no backing file)
            head, tail = pos - (ci << cb), ((seg_last + 1) << cb) - seg_end
            if head:
                pwrite_data(self.d, host, bytes(head))
            pwrite_data(self.d, host + head, data[pos - offset:seg_end - offset])
            if tail:
                pwrite_data(self.d, host + (n << cb) - tail, bytes(tail))
            i = ci & ((1 << self.l2_bits) - 1)
            entry = host | QCOW_OFLAG_COPIED
            tab[8 * i:8 * (i + n)] = struct.pack(f">{n}Q", *range(entry, entry + (n << cb), cs))
            self.last, self.last_host = seg_last, host + ((n - 1) << cb)
            pos = seg_end
        return True

    def end(self) -> None:
        """Write the metadata out: the image is then what io.write leaves."""
        f = self.d.file
        if not self.l1:
            return
        f.pwrite(self.refblock_offset, self.refblock)
        for li in sorted(self.l1, key=self.l1.__getitem__):
            f.pwrite(self.l1[li], self.tables[li])
        lo, hi = min(self.l1), max(self.l1) + 1
        f.pwrite(self.d.header.l1_table_offset + 8 * lo,
                 struct.pack(f">{hi - lo}Q", *(self.l1[i] | QCOW_OFLAG_COPIED if i in self.l1 else 0
                                               for i in range(lo, hi))))
