"""qcow2 size measurement (qcow2_measure, qcow2_calc_prealloc_size and
qcow2_refcount_metadata_size in QEMU): what a new qcow2 image needs for a
given virtual size and, when converting, for the data a source holds.

Pure integer arithmetic, plus one walk over the source's block status; no
numpy (the walk is per extent, not per cluster).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from qimg.block.status import ALLOCATED, DATA, ZERO
from qimg.errors import QimgError
from qimg.formats.qcow2 import header as H

if TYPE_CHECKING:
    from qimg.block.image import Image

QCOW_MAX_L1_SIZE = 32 << 20
MIN_CLUSTER_BITS_EXTL2 = 14
L1E_SIZE = 8
REFTABLE_ENTRY_SIZE = 8
_COMPAT = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_PREALLOC = ("off", "metadata", "falloc", "full")


def _div_round_up(n: int, d: int) -> int:
    return -(-n // d)


def _round_up(n: int, d: int) -> int:
    return _div_round_up(n, d) * d


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int,
                           generous_increase: bool = False) -> tuple[int, int]:
    """(bytes of refcount table + blocks, number of blocks) for an image of
    ``clusters`` clusters, counting the clusters the refcount structures
    themselves occupy (a fixed point, as QEMU iterates it)."""
    per_table_cluster = cluster_size // REFTABLE_ENTRY_SIZE
    per_block = (cluster_size * 8) >> refcount_order
    table = blocks = n = 0
    while True:
        last = n
        blocks = _div_round_up(clusters + table + blocks, per_block)
        table = _div_round_up(blocks, per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous_increase:
            clusters += _div_round_up(table, 2)
            n = 0
            generous_increase = False
        if n == last:
            return (blocks + table) * cluster_size, blocks


def calc_prealloc_size(total_size: int, cluster_size: int, refcount_order: int,
                       extended_l2: bool = False) -> int:
    """Size of a fully preallocated image: header, L2 tables, L1 table,
    refcount structures and every data cluster."""
    l2e_size = 16 if extended_l2 else 8
    aligned = _round_up(total_size, cluster_size)
    meta = cluster_size
    nl2e = _round_up(aligned // cluster_size, cluster_size // l2e_size)
    meta += nl2e * l2e_size
    nl1e = _round_up(nl2e * l2e_size // cluster_size, cluster_size // L1E_SIZE)
    meta += nl1e * L1E_SIZE
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size, refcount_order)[0]
    return meta + aligned


def _cluster_size(options: dict[str, Any], extended_l2: bool) -> int:
    cs = options.get("cluster_size")
    cs = 65536 if cs is None else cs
    if cs & (cs - 1) or not 1 << H.MIN_CLUSTER_BITS <= cs <= 1 << H.MAX_CLUSTER_BITS:
        raise QimgError("Cluster size must be a power of two between %d and %dk"
                        % (1 << H.MIN_CLUSTER_BITS, 1 << (H.MAX_CLUSTER_BITS - 10)))
    if extended_l2 and cs < 1 << MIN_CLUSTER_BITS_EXTL2:
        raise QimgError("Extended L2 entries are only supported with cluster sizes of at least %d bytes"
                        % (1 << MIN_CLUSTER_BITS_EXTL2))
    return cs


def _version(options: dict[str, Any]) -> int:
    compat = options.get("compat")
    if compat is None:
        return 3
    if compat not in _COMPAT:
        raise QimgError(f"Invalid compatibility level: '{compat}'")
    return _COMPAT[compat]


def _refcount_bits(options: dict[str, Any], version: int) -> int:
    bits = options.get("refcount_bits")
    bits = 16 if bits is None else bits
    if bits > 64 or bits <= 0 or bits & (bits - 1):
        raise QimgError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and bits != 16:
        raise QimgError("Different refcount widths than 16 bits require compatibility level 1.1 or above "
                        "(use compat=1.1 or greater)")
    return bits


def source_required(source: "Image", cluster_size: int) -> int:
    """Bytes of data clusters a copy of ``source`` (its whole chain) needs:
    every cluster touched by data, zero runs skipped."""
    ssize = source.size
    required = 0
    offset = 0
    while offset < ssize:
        ext, _depth = source.chain_status(offset, ssize - offset)
        pnum = ext.length
        if pnum <= 0:
            break
        if ext.flags & ZERO:
            pass
        elif ext.flags & (DATA | ALLOCATED) == DATA | ALLOCATED:
            pnum = _round_up(offset + pnum, cluster_size) - offset
            required += offset % cluster_size + pnum
        offset += pnum
    return required


def measure(size: int | None, options: dict[str, Any], source: "Image | None") -> dict[str, int]:
    """{"required", "fully-allocated"[, "bitmaps"]} as qcow2_measure."""
    extended_l2 = bool(options.get("extended_l2"))
    cluster_size = _cluster_size(options, extended_l2)
    version = _version(options)
    refcount_bits = _refcount_bits(options, version)
    prealloc = options.get("preallocation") or "off"
    if prealloc not in _PREALLOC:
        raise QimgError(f"invalid parameter value: {prealloc}")
    has_backing_file = options.get("backing_file") is not None
    luks_payload_size = 0
    if options.get("encrypt.format") == "luks":
        from qimg.crypto import luks

        # the LUKS header a new image would hold, in whole clusters
        header = luks.payload_size(luks.create_options(options, "encrypt."), "encrypt.")
        luks_payload_size = _round_up(header, cluster_size)
    virtual_size = _round_up(size or 0, cluster_size)
    l2e_size = 16 if extended_l2 else 8
    l2_tables = _div_round_up(virtual_size // cluster_size, cluster_size // l2e_size)
    if l2_tables * L1E_SIZE > QCOW_MAX_L1_SIZE:
        raise QimgError("The image size is too large (try using a larger cluster size)")
    required = 0
    if source is not None:
        virtual_size = _round_up(source.size, cluster_size)
        required = virtual_size if has_backing_file else source_required(source, cluster_size)
    if prealloc in ("full", "falloc"):
        required = virtual_size
    refcount_order = refcount_bits.bit_length() - 1
    fully = luks_payload_size + calc_prealloc_size(virtual_size, cluster_size, refcount_order, extended_l2)
    result = {"required": fully - virtual_size + required, "fully-allocated": fully}
    if version >= 3 and source is not None:
        bitmaps = source.driver.persistent_bitmaps_size(cluster_size)
        if bitmaps is not None:
            result["bitmaps"] = bitmaps
    return result


def _dir_entry_size(name_size: int, extra: int) -> int:
    return _round_up(24 + name_size + extra, 8)


def persistent_bitmaps_size(header: H.QCowHeader, file: Any, size: int, cluster_size: int) -> int:
    """Space the persistent bitmaps of an open v3 image (``header``, ``file``,
    virtual ``size``) would take in a new image of ``cluster_size``
    (qcow2_get_persistent_dirty_bitmap_size): every bitmap fully allocated,
    its table, and the directory."""
    total = 0
    dir_size = 0
    ext = header.bitmaps_ext
    if ext is not None and len(ext) >= 24 and header.autoclear_features & H.AUTOCLEAR_BITMAPS:
        nb, _res, dsize, doff = struct.unpack_from(">IIQQ", ext)
        if nb > 65535 or dsize > 64 << 20:
            return 0
        directory = file.pread(doff, dsize)
        pos = 0
        for _ in range(nb):
            if pos + 24 > len(directory):
                break
            gran_bits, name_size, extra = struct.unpack_from(">BHI", directory, pos + 17)
            if gran_bits > 63:
                break
            nbits = _div_round_up(size, 1 << gran_bits)
            clusters = _div_round_up(_div_round_up(nbits, 8), cluster_size)
            total += clusters * cluster_size + _round_up(clusters * 8, cluster_size)
            dir_size += _dir_entry_size(name_size, 0)
            pos += _dir_entry_size(name_size, extra)
    return total + _round_up(dir_size, cluster_size)
