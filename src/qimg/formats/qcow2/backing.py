"""qcow2 operations on the backing chain: changing the backing file name
(qcow2_change_backing_file + qcow2_update_header) and emptying the image after
a commit (qcow2_make_empty).

Both rewrite metadata in place; the comments say how each step keeps a crash
from leaving an image that ``qemu-img check`` refuses.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from qimg.errors import QimgError
from qimg.formats.qcow2 import header as H

if TYPE_CHECKING:
    from qimg.formats.qcow2.driver import Qcow2Driver

#: qcow2_change_backing_file refuses longer names (the header field limit)
MAX_BACKING_NAME = 1023
#: offset of l1_table_offset in the header; refcount_table_offset and
#: refcount_table_clusters follow it
L1_TABLE_OFFSET_FIELD = 40


class HeaderFull(QimgError):
    """The new header does not fit in the first cluster (qemu: -ENOSPC)."""


class BadBackingName(QimgError):
    """qemu's -EINVAL from bdrv_change_backing_file."""


def change_backing_file(d: "Qcow2Driver", backing_file: str | None, backing_format: str | None) -> None:
    if backing_file is not None and len(backing_file.encode()) > MAX_BACKING_NAME:
        raise BadBackingName("Invalid argument")
    cs = d.cluster_size
    # The header as it is on disk now (the dirty bit included), so that only
    # the name and format change.
    h = H.QCowHeader.parse(d.file.pread(0, cs))
    h.backing_file = backing_file or None
    h.backing_format = backing_format or None if backing_file else None
    # qcow2_update_header always writes QEMU's own feature table and the
    # full-size v3 header.
    h.feature_table = []
    if h.version >= 3:
        h.header_length = H.V3_HEADER_LENGTH_COMPRESSION
    try:
        buf = h.pack()
    except QimgError:
        raise HeaderFull("No space left in the file header") from None
    # One write of the whole header cluster: the old name or the new one,
    # never half of each.
    d.file.pwrite(0, buf + bytes(cs - len(buf)))
    d.file.flush()
    d.header.backing_file = h.backing_file
    d.header.backing_format = h.backing_format
    d.header.backing_file_offset = h.backing_file_offset
    d.header.backing_file_size = h.backing_file_size
    d.header.header_length = h.header_length


def make_empty(d: "Qcow2Driver") -> None:
    """Every cluster of the active layer dropped, as qcow2_make_empty.

    v3 images without snapshots or bitmaps are reset to the layout of a new
    image (header, refcount table, one refcount block, L1 table) and the file
    cut after it; others get every cluster discarded.
    """
    h = d.header
    cs = d.cluster_size
    l1_clusters = -(-h.l1_size * 8 // cs)
    refblock_entries = cs * 8 // h.refcount_bits
    if (h.version >= 3 and h.nb_snapshots == 0 and not h.bitmaps_ext
            and 3 + l1_clusters <= refblock_entries and h.crypt_method != 2 and not h.data_file):
        _make_completely_empty(d, l1_clusters)
    else:
        _discard_all(d)
        d.flush()


def _discard_all(d: "Qcow2Driver") -> None:
    """qcow2_cluster_discard(full_discard) over the whole image: every L2
    entry becomes unallocated (not a zero cluster: the backing file must
    show through) and the clusters are released after the tables are
    written, so a crash leaks clusters at worst.  A table at a time."""
    import numpy as np

    from qimg.formats.qcow2 import io
    from qimg.formats.qcow2.cluster import L2E_OFFSET_MASK

    d._writable()
    cb = d.cluster_bits
    per_table = 1 << (cb - 3)
    total = -(-d.size // d.cluster_size)
    m = d.map
    for l1i in range(min(len(m.l1), -(-total // per_table))):
        if not int(m.l1[l1i]) & L2E_OFFSET_MASK:
            continue
        ci = l1i * per_table
        n = min(per_table, total - ci)
        old = m.entries(ci, n).copy()
        if not old.any():
            continue
        tab = io._ensure_l2(d, l1i)
        tab[:n] = 0
        m.mark_dirty(io._l2_offset(d, l1i))
        d._zcache = None
        io._release(d, old, punch=True)


def _refblock_prefix(count: int, refcount_bits: int) -> bytes:
    """The start of a refcount block giving ``count`` clusters refcount 1."""
    if refcount_bits >= 8:
        return (1).to_bytes(refcount_bits // 8, "big") * count
    # Sub-byte entries are packed from the least significant bit up.
    value = sum(1 << (i * refcount_bits) for i in range(count))
    return value.to_bytes(-(-count * refcount_bits // 8), "little")


def _make_completely_empty(d: "Qcow2Driver", l1_clusters: int) -> None:
    """QEMU's make_completely_empty, step for step.  Between the first and
    the last step the refcounts are wrong; the dirty bit, set first and
    cleared last, tells QEMU (and us) to rebuild them on the next open, as
    for lazy refcounts."""
    h = d.header
    cs = d.cluster_size
    d.flush_metadata()
    d.drop_caches()
    h = d.header
    incompat = h.incompatible_features
    d._write_incompat(incompat | H.INCOMPAT_DIRTY)
    d.file.flush()
    # Drop the mapping first: from here on the image reads from its backing.
    d.file.pwrite(h.l1_table_offset, bytes(h.l1_size * 8))
    # Clusters 1.. become the refcount table, the first refcount block and
    # the L1 table.
    d.file.pwrite(cs, bytes((2 + l1_clusters) * cs))
    d.file.flush()
    d.file.pwrite(L1_TABLE_OFFSET_FIELD, struct.pack(">QQI", 3 * cs, cs, 1))
    d.file.pwrite(cs, struct.pack(">Q", 2 * cs))
    d.file.pwrite(2 * cs, _refblock_prefix(3 + l1_clusters, h.refcount_bits))
    d.file.flush()
    d._write_incompat(incompat & ~H.INCOMPAT_DIRTY)
    d.file.flush()
    d.file.truncate((3 + l1_clusters) * cs)
    d.drop_caches()
