"""qcow2 operations on the backing chain: changing the backing file name
(qcow2_change_backing_file + qcow2_update_header) and emptying the image after
a commit (qcow2_make_empty).

Both rewrite metadata in place; the comments say how each step keeps a crash
from leaving an image that ``qemu-img check`` refuses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qimg.errors import QimgError
from qimg.formats.qcow2 import header as H

if TYPE_CHECKING:
    from qimg.formats.qcow2.driver import Qcow2Driver

#: qcow2_change_backing_file refuses longer names (the header field limit)
MAX_BACKING_NAME = 1023


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
    from qimg.formats.qcow2 import io
    from qimg.formats.qcow2.cluster import L2E_OFFSET_MASK

    d._writable()
    per_table = d.map.l2_size
    total = -(-d.size // d.cluster_size)
    m = d.map
    for l1i in range(min(len(m.l1), -(-total // per_table))):
        if not int(m.l1[l1i]) & L2E_OFFSET_MASK:
            continue
        ci = l1i * per_table
        n = min(per_table, total - ci)
        old = m.entries(ci, n).copy()
        if not old.any() and not (m.extl2 and m.bitmaps(ci, n).any()):
            continue
        tab = io._ensure_l2(d, l1i)
        tab[:n] = 0
        if m.extl2:
            # no subcluster may read as zeroes either: the backing shows through
            m.l2_bitmaps(io._l2_offset(d, l1i))[:n] = 0
        m.mark_dirty(io._l2_offset(d, l1i))
        d._zcache = None
        io._release(d, old, punch=True)


def _make_completely_empty(d: "Qcow2Driver", l1_clusters: int) -> None:
    """The result of QEMU's make_completely_empty (only the header, the
    refcount structures and an all-zero L1 table stay; the file is cut after
    the last of them) reached in an order that keeps the image consistent
    at every step, without leaning on the dirty bit: the L1 table is zeroed
    first (from then on every other cluster is merely leaked), then their
    references are dropped, then the file is cut.  For an image with QEMU's
    usual layout the file ends up byte for byte as QEMU leaves it."""
    import numpy as np

    d._writable()
    d.flush_metadata()
    d.drop_caches()
    h = d.header
    cs = d.cluster_size
    keep = [0]
    rt_first = h.refcount_table_offset // cs
    keep += range(rt_first, rt_first + h.refcount_table_clusters)
    table = np.frombuffer(d.file.pread(h.refcount_table_offset, h.refcount_table_clusters * cs), ">u8")
    blocks = (table & np.uint64(0xFFFFFFFFFFFFFE00)) // np.uint64(cs)
    keep += [int(b) for b in blocks[blocks != 0]]
    l1_first = h.l1_table_offset // cs
    keep += range(l1_first, l1_first + l1_clusters)
    # 1. Nothing is mapped any more: the image reads all from its backing.
    d.file.pwrite(h.l1_table_offset, bytes(h.l1_size * 8))
    d.file.flush()
    d.drop_caches()
    # 2. Drop the references of everything else, run by run of equal counts.
    refs = d.refs
    nclusters = -(-d.file.size // cs)
    counts = refs.get_range(0, nclusters).astype(np.int64)
    keep_idx = np.array([k for k in keep if k < nclusters], dtype=np.int64)
    counts[keep_idx] = 0
    bounds = [0, *(np.flatnonzero(counts[1:] != counts[:-1]) + 1).tolist(), nclusters]
    for start, end in zip(bounds[:-1], bounds[1:]):
        value = int(counts[start])
        if value:
            refs.update(start * cs, (end - start) * cs, -value)
    refs.flush()
    d.file.flush()
    # 3. Cut the file after the last cluster still in use.
    last = refs.last_used_cluster(d.file.size)
    d.file.truncate((last + 1) * cs)
    d.drop_caches()


