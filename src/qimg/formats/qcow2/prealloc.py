"""QEMU's qcow2_detect_metadata_preallocation: far more clusters are
referenced than the file really stores, so data clusters may be holes in
the file and block status must ask the file (BDRV_BLOCK_RECURSE).

QEMU counts referenced clusters from the start of the file and stops at a
threshold just above the clusters the file really holds, so a preallocated
image is told from its first refcount block.  That block is read and counted
here without numpy (``qemu-img map`` of such an image must not pay for
importing it): the entries of a block, as one big integer, have their bits
folded onto each entry's lowest bit, and the set bits are counted.
"""

from __future__ import annotations

from typing import Any

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
#: refcount blocks the light count reads before it hands over to the
#: refcount arrays (a count that goes on that long covers a large image)
LIGHT_BLOCKS = 8


def metadata_preallocated(d: Any) -> bool:
    real_clusters = d.file.allocated_size() // d.cluster_size
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end = -(-d.file.size // d.cluster_size)
    if d._refs is None and not d._modified:
        found = _light_count(d, end, threshold)
        if found is not None:
            return found >= threshold
    import numpy as np

    refs = d.refs
    count = pos = 0
    while pos < end and count < threshold:
        n = min(1 << 20, end - pos)
        count += int(np.count_nonzero(refs.get_range(pos, n)))
        pos += n
    return count >= threshold


def _light_count(d: Any, end: int, threshold: int) -> int | None:
    """Referenced clusters among the first ``end``, counted until the
    threshold is reached; None where the refcount arrays must answer (a
    long count, or a refcount block that is not plainly readable, whose
    error they report as QEMU does)."""
    h = d.header
    cs = d.cluster_size
    width = 1 << h.refcount_order
    per_block = (cs * 8) // width
    blocks = -(-end // per_block)
    blocks_read = min(blocks, LIGHT_BLOCKS)
    table = d.file.pread(h.refcount_table_offset, min(blocks_read, h.refcount_table_clusters * cs // 8) * 8)
    count = 0
    for i in range(blocks_read):
        offset = int.from_bytes(table[i * 8:i * 8 + 8], "big") & REFT_OFFSET_MASK if i * 8 < len(table) else 0
        entries = min(per_block, end - i * per_block)
        if offset:
            if offset & (cs - 1):
                return None
            raw = d.file.pread(offset, cs)
            if len(raw) < cs:
                return None
            count += _nonzero(raw, entries, width)
        if count >= threshold:
            return count
    return count if blocks_read == blocks else None


def _nonzero(raw: bytes, entries: int, width: int) -> int:
    """How many of the first ``entries`` ``width``-bit refcounts in ``raw``
    are not zero (sub-byte ones packed from the low bits of each byte)."""
    bits = entries * width
    whole = bits >> 3
    value = int.from_bytes(raw[:whole], "big")
    shift = 1
    while shift < width:
        value |= value >> shift
        shift <<= 1
    group = max(1, width >> 3)  # bytes per entry, or one byte of several
    low = (1).to_bytes(group, "big") if width >= 8 else bytes([sum(1 << k for k in range(0, 8, width))])
    count = (value & int.from_bytes(low * (whole // group), "big")).bit_count()
    rest = bits & 7
    if rest:
        last = raw[whole] & ((1 << rest) - 1)
        count += sum(1 for k in range(0, rest, width) if (last >> k) & ((1 << width) - 1))
    return count
