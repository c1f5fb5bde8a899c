"""qcow2 guest I/O: reads, allocating writes, zero writes, discards,
compressed clusters, growing the image.

Functions take the open Qcow2Driver (``d``) and work a whole L2 table slice
at a time: one pread or pwrite per contiguous host run, one vectorized update
of the L2 entries, one refcount update per allocation.
"""

from __future__ import annotations

import os
import struct
from bisect import bisect_left
from typing import TYPE_CHECKING

# numpy loads OpenBLAS, which starts a thread per core at import; we never
# use BLAS, and under load those threads cost more CPU than our copy does.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402

from qimg.errors import QimgError, UnsupportedError
from qimg.protocols.file import keep_freed_buffers
from qimg.formats.qcow2 import compress as Z
from qimg.formats.qcow2.deferred import drain as _drain, pwrite_data
from qimg.formats.qcow2.cluster import (
    ALL_ALLOC, ALL_ZEROES, COMPRESSED, INVALID, L2E_OFFSET_MASK, NORMAL, QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, SUBCLUSTERS, UNALLOCATED, UNALLOCATED_ALLOC, ZERO_ALLOC, ZERO_PLAIN,
    classify, classify_sub, hx, sub_range_mask,
)

if TYPE_CHECKING:
    from qimg.formats.qcow2.driver import Qcow2Driver

_U64 = np.uint64


# ---- data writes ----------------------------------------------------------------
def _data_pwrite(d: "Qcow2Driver", host: int, buf, guest: int) -> None:
    """Guest bytes at guest offset ``guest`` into data clusters at ``host``."""
    if d.cipher is not None:
        host, buf = _encrypted(d, host, buf, guest)
    pwrite_data(d, host, buf)


# ---- encryption: data clusters hold cipher text ------------------------------
# Each 512-byte sector is encrypted with its sector number as IV: the host
# sector for LUKS (QEMU's crypt_physical_offset), the guest sector for the
# legacy AES scheme.  The transformation happens right at the data file:
# plain text above, cipher text below; callers give the guest offset of the
# bytes with the host one (both lie at one offset within their cluster).
# Ranges that are not whole sectors are widened to them (read-modify-write
# on writes), as the 512-byte request alignment of an encrypted image makes
# QEMU do.
_SECTOR = 512


def _sector_span(host: int, length: int) -> tuple[int, int]:
    return host & ~(_SECTOR - 1), -(-(host + length) // _SECTOR) * _SECTOR


def _iv_sector(d: "Qcow2Driver", host: int, guest: int) -> int:
    return (guest if d.crypt_guest_iv else host) // _SECTOR


def _data_readinto(d: "Qcow2Driver", host: int, view: memoryview, guest: int) -> None:
    """Guest bytes at guest offset ``guest`` of a NORMAL run at ``host`` into ``view``."""
    cipher = d.cipher
    if cipher is None:
        d.data_file.preadinto(host, view)
        return
    start, end = _sector_span(host, len(view))
    if start == host and end == host + len(view):
        d.data_file.preadinto(host, view)
        cipher.decrypt(view, _iv_sector(d, host, guest))
        return
    buf = bytearray(end - start)
    d.data_file.preadinto(start, memoryview(buf))
    cipher.decrypt(buf, _iv_sector(d, start, guest - (host - start)))
    view[:] = memoryview(buf)[host - start:host - start + len(view)]


def _data_read(d: "Qcow2Driver", host: int, length: int, guest: int) -> bytearray:
    out = bytearray(length)
    _data_readinto(d, host, memoryview(out), guest)
    return out


def _encrypted(d: "Qcow2Driver", host: int, buf, guest: int) -> tuple[int, bytearray]:
    """Cipher text for writing ``buf`` at ``host`` (guest offset ``guest``),
    widened to whole sectors (their other bytes read back through the
    cipher first)."""
    view = memoryview(buf).cast("B")
    start, end = _sector_span(host, len(view))
    out = bytearray(end - start)
    gstart = guest - (host - start)
    if start < host or end > host + len(view):
        _drain(d)
        if start < host:
            out[:_SECTOR] = _data_read(d, start, _SECTOR, gstart)
        if end > host + len(view):
            out[-_SECTOR:] = _data_read(d, end - _SECTOR, _SECTOR, gstart + (end - start) - _SECTOR)
    out[host - start:host - start + len(view)] = view
    d.cipher.encrypt(out, _iv_sector(d, start, gstart))
    return start, out


# ---- reading -------------------------------------------------------------------
def read(d: "Qcow2Driver", offset: int, length: int) -> bytes:
    _drain(d)
    if length >= 1 << 20:
        keep_freed_buffers()
    length = max(0, min(length, d.size - offset))
    if d.map.extl2:
        return _read_ext(d, offset, length, False)
    cb, cs = d.cluster_bits, d.cluster_size
    if length:
        # One run of plain data or of zeroes (the usual case): no zeroed
        # buffer to fill and copy again.
        ci = offset >> cb
        kind, n, first = d.map.run(ci, ((offset + length - 1) >> cb) - ci + 1)
        if offset + length <= (ci + n) << cb:
            if kind == NORMAL:
                host = (first & L2E_OFFSET_MASK) + (offset & (cs - 1))
                if d.cipher is not None:
                    return bytes(_data_read(d, host, length, offset))
                return d.data_file.pread(host, length)
            if kind in (ZERO_PLAIN, ZERO_ALLOC) or (kind == UNALLOCATED and d.backing is None):
                return bytes(length)
    out = bytearray(length)
    view = memoryview(out)
    cb, cs = d.cluster_bits, d.cluster_size
    pos, end = offset, offset + length
    while pos < end:
        ci = pos >> cb
        kind, n, first = d.map.run(ci, ((end - 1) >> cb) - ci + 1)
        run_end = min(end, (ci + n) << cb)
        if kind == NORMAL:
            host = (first & L2E_OFFSET_MASK) + (pos & (cs - 1))
            _data_readinto(d, host, view[pos - offset:run_end - offset], pos)
        elif kind == COMPRESSED:
            if d.data_file is not d.file:
                from qimg.formats.qcow2.datafile import compressed_entry

                compressed_entry(d, pos)
            p = pos
            while p < run_end:
                c = p >> cb
                ent = int(d.map.entries(c, 1)[0])
                data = _decompressed(d, ent)
                q = min(run_end, (c + 1) << cb)
                view[p - offset:q - offset] = data[p - (c << cb):q - (c << cb)]
                p = q
        pos = run_end
    return bytes(out)


def _decompressed(d: "Qcow2Driver", entry: int) -> bytes:
    host, size = Z.parse_descriptor(entry, d.cluster_bits)
    if d._zcache is not None and d._zcache[0] == host:
        return d._zcache[1]
    _drain(d)
    data = Z.decompress_cluster(d.file.pread(host, size), d.cluster_size, d.header.compression_type)
    d._zcache = (host, data)
    return data


def _cluster_content(d: "Qcow2Driver", ci: int) -> bytearray:
    """The guest content of cluster ``ci`` as a read through this layer
    and the backing chain returns it (the source of copy-on-write)."""
    cs = d.cluster_size
    if d.map.extl2:
        return bytearray(_guest_content(d, ci * cs, cs))
    if d.backing is None and not d.map.entries(ci, 1)[0]:
        return bytearray(cs)  # unallocated, nothing below
    kind, _, first = d.map.run(ci, 1)
    if kind == NORMAL:
        _drain(d)
        return _data_read(d, first & L2E_OFFSET_MASK, cs, ci * cs)
    if kind == COMPRESSED:
        return bytearray(_decompressed(d, first))
    if kind == UNALLOCATED and d.backing is not None:
        start = ci * cs
        avail = max(0, min(cs, d.backing.size - start))
        data = d.backing.read(start, avail) if avail else b""
        return bytearray(data) + bytearray(cs - len(data))
    return bytearray(cs)


# ---- metadata overlap ------------------------------------------------------
def check_overlap(d: "Qcow2Driver", host: int, length: int) -> None:
    """Refuse a data write that would land on metadata (a damaged L2 entry
    pointing at it): mark the image corrupt and fail, as QEMU's
    qcow2_pre_write_overlap_check does."""
    if d.data_file is not d.file:
        return  # guest data lives in the external data file, away from metadata
    cb = d.cluster_bits
    first, last = host >> cb, (host + length - 1) >> cb
    m, h = d.map, d.header

    def hits(start: int, nbytes: int) -> bool:
        return nbytes > 0 and start >> cb <= last and (start + nbytes - 1) >> cb >= first

    name = None
    if first == 0:
        name = "qcow2_header"
    elif hits(m.l1_offset, len(m.l1) * 8):
        name = "active L1 table"
    elif d._refs is not None and hits(d._refs.table_offset, len(d._refs.table) * 8):
        name = "refcount table"
    elif d._refs is None and hits(h.refcount_table_offset, h.refcount_table_clusters << cb):
        name = "refcount table"
    elif h.nb_snapshots and hits(h.snapshots_offset, 1):
        name = "snapshot table"
    elif _any_within(_l2_clusters(m), first, last):
        name = "active L2 table"
    elif _any_within(d.refs.block_clusters(), first, last):
        name = "refcount block"
    if name is None:
        return
    import sys

    if not h.incompatible_features & 2 and h.version >= 3:
        d._write_incompat(h.incompatible_features | 2)
        sys.stderr.write(f"qcow2: Marking image as corrupt: Preventing invalid write on metadata "
                         f"(overlaps with {name}); further corruption events will be suppressed\n")
    raise QimgError("Input/output error")


def _any_within(sorted_clusters: list[int], first: int, last: int) -> bool:
    i = bisect_left(sorted_clusters, first)
    return i < len(sorted_clusters) and sorted_clusters[i] <= last


def _l2_clusters(m) -> list[int]:
    """Sorted host cluster indices of the active L2 tables, cached on the map
    under the L1 table's current bytes (the L1 is small, and is changed in
    place by several modules, so its content is the only safe key)."""
    key = m.l1.tobytes()
    cached = getattr(m, "_l2_cluster_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    l2 = (m.l1 & _U64(L2E_OFFSET_MASK)) >> _U64(m.cluster_bits)
    clusters = sorted(set(l2[l2 != 0].tolist()))
    m._l2_cluster_cache = (key, clusters)
    return clusters


# ---- allocation helpers ----------------------------------------------------
def _ensure_l2(d: "Qcow2Driver", l1_index: int) -> np.ndarray:
    """The L2 table for ``l1_index``, allocated if needed (l2_allocate)."""
    m = d.map
    ent = int(m.l1[l1_index]) if l1_index < len(m.l1) else 0
    if ent & L2E_OFFSET_MASK:
        if ent & QCOW_OFLAG_COPIED:
            return m.l2_table(ent & L2E_OFFSET_MASK)
        # Shared with a snapshot: copy the table; its data clusters keep
        # their (shared) references and are copied on write in turn.
        old_off = ent & L2E_OFFSET_MASK
        contents = m.l2_raw(old_off).copy()
        off = d.refs.alloc(d.cluster_size)
        tab = m.new_l2_table(off, contents)
        m.l1[l1_index] = _U64(off | QCOW_OFLAG_COPIED)
        m.l1_dirty.add(l1_index)
        d.flush_metadata()
        d.refs.free(old_off, d.cluster_size)
        return tab
    if l1_index >= len(m.l1):
        raise QimgError("Invalid argument")
    off = d.refs.alloc(d.cluster_size)
    tab = m.new_l2_table(off)
    m.l1[l1_index] = _U64(off | QCOW_OFLAG_COPIED)
    m.l1_dirty.add(l1_index)
    return tab


def _l2_offset(d: "Qcow2Driver", l1_index: int) -> int:
    return int(d.map.l1[l1_index]) & L2E_OFFSET_MASK


def _release(d: "Qcow2Driver", old: np.ndarray, punch: bool = False) -> None:
    """Drop the references held by the (already replaced) L2 entries ``old``:
    write the new L2 tables first, then decrease the refcounts.  ``punch``:
    the guest asked for it (discard, zero write with unmap), so clusters
    left unreferenced are discarded in the file too, as QEMU passes such
    requests down."""
    kinds = classify(old, d.map.data_file)
    hosts = old & _U64(L2E_OFFSET_MASK)
    plain = np.flatnonzero((kinds == NORMAL) | (kinds == ZERO_ALLOC))
    comp = np.flatnonzero(kinds == COMPRESSED)
    if not len(plain) and not len(comp):
        return
    d.map.flush()
    cs = d.cluster_size
    refs = d.refs
    if d.data_file is not d.file:
        # Data clusters in an external file carry no refcounts.
        if punch and len(plain):
            _drain(d)
            # one hole per contiguous run (host == guest there, so runs are long)
            hs = np.sort(hosts[plain])
            breaks = np.flatnonzero(np.diff(hs) != _U64(cs)) + 1
            starts = np.concatenate(([0], breaks))
            ends = np.concatenate((breaks, [len(hs)]))
            size = d.data_file.size  # a discard does not extend the file
            for a, b in zip(hs[starts].tolist(), hs[ends - 1].tolist()):
                end = min(b + cs, size)
                if end > a:
                    d.data_file.write_zeroes(a, end - a)
        return
    if len(plain):
        hs = np.sort(hosts[plain])
        # Free contiguous host runs in one update each.
        breaks = np.flatnonzero(np.diff(hs) != _U64(cs)) + 1
        for run in np.split(hs, breaks):
            refs.free(int(run[0]), len(run) * cs)
    for i in comp:
        host, size = Z.parse_descriptor(int(old[i]), d.cluster_bits)
        refs.free(host, size)
    if punch:
        ranges = [(int(h), cs) for h in hosts[plain]]
        ranges += [Z.parse_descriptor(int(old[i]), d.cluster_bits) for i in comp]
        _punch_free(d, ranges)
    # Packing compressed data must not go on in a cluster that was just
    # freed (it may be handed out whole next).
    fbo = d._free_byte_offset
    if fbo and refs.get(fbo >> d.cluster_bits) == 0:
        d._free_byte_offset = 0


def alloc_data(d: "Qcow2Driver", guest: int, nbytes: int) -> int:
    """Host offset for new data clusters at guest offset ``guest``: in an
    external data file a cluster lives at its guest offset and has no
    refcount; otherwise it is a fresh run of the image file."""
    if d.data_file is not d.file:
        return guest
    host = d.refs.alloc(nbytes)
    check_overlap(d, host, nbytes)
    return host


# ---- writes ------------------------------------------------------------------------
def write(d: "Qcow2Driver", offset: int, data: memoryview) -> None:
    if offset + len(data) > d.size:
        raise QimgError("Invalid argument")
    if d.map.extl2:
        _write_ext(d, offset, data)
        return
    cb, cs = d.cluster_bits, d.cluster_size
    l2_bits = d.map.l2_bits
    pos, end = offset, offset + len(data)
    while pos < end:
        ci = pos >> cb
        table_end = ((ci >> l2_bits) + 1) << l2_bits
        last = min((end - 1) >> cb, table_end - 1)
        ents = d.map.entries(ci, last - ci + 1)
        if not ents.any():
            # all unallocated (a new image): one allocating write
            inplace_first, n = False, len(ents)
        else:
            kinds = classify(ents, d.map.data_file)
            # Clusters we own alone (COPIED) are written in place, zero clusters
            # with a host cluster too (as QEMU's handle_copied does).
            inplace = ((kinds == NORMAL) | (kinds == ZERO_ALLOC)) & ((ents & _U64(QCOW_OFLAG_COPIED)) != 0)
            change = np.flatnonzero(inplace != inplace[0])
            n = int(change[0]) if len(change) else len(ents)
            inplace_first = bool(inplace[0])
        if inplace_first:
            if int(ents[0]) & L2E_OFFSET_MASK & (cs - 1):
                d.signal_corruption(f"Data cluster offset {int(ents[0]) & L2E_OFFSET_MASK:#x} unaligned "
                                    f"(guest offset: {hx(pos)})")
            kind, n, first = d.map.run(ci, n)
            seg_end = min(end, (ci + n) << cb)
            base = first & L2E_OFFSET_MASK
            host = base + (pos & (cs - 1))
            if kind == ZERO_ALLOC:
                check_overlap(d, base, n << cb)
                # The rest of the edge clusters must read as zeroes after.
                run_end = min(d.size, (ci + n) << cb)
                if pos & (cs - 1):
                    _data_pwrite(d, base, bytes(pos & (cs - 1)), ci << cb)
                if seg_end < run_end and seg_end & (cs - 1):
                    tail_end = min(((seg_end >> cb) + 1) << cb, (ci + n) << cb)
                    _data_pwrite(d, base + seg_end - (ci << cb), bytes(tail_end - seg_end), seg_end)
            check_overlap(d, host, seg_end - pos)
            _data_pwrite(d, host, data[pos - offset:seg_end - offset], pos)
            d._zcache = None
            if kind == ZERO_ALLOC:
                tab = _ensure_l2(d, ci >> l2_bits)
                i = ci & ((1 << l2_bits) - 1)
                k = ((seg_end - 1) >> cb) - ci + 1
                tab[i:i + k] &= ~_U64(QCOW_OFLAG_ZERO)
                d.map.mark_dirty(_l2_offset(d, ci >> l2_bits))
        else:
            seg_end = min(end, (ci + n) << cb)
            _alloc_write(d, ci, n, pos, data[pos - offset:seg_end - offset])
        pos = seg_end


def _alloc_write(d: "Qcow2Driver", ci: int, n: int, pos: int, data: memoryview) -> None:
    """Write to ``n`` clusters from ``ci`` (one L2 table) that need new host
    clusters: one contiguous allocation, one pwrite, copy-on-write for the
    partial head and tail clusters."""
    cb, cs = d.cluster_bits, d.cluster_size
    tab = _ensure_l2(d, ci >> d.map.l2_bits)
    start = ci << cb
    head = pos - start
    tail = (n << cb) - head - len(data)
    host = alloc_data(d, start, n << cb)
    if head or tail:
        # Only the partial edge clusters are assembled in memory (with the
        # copy-on-write data around the new bytes); the middle goes straight.
        first = bytearray(_cluster_content(d, ci)) if head else None
        last = bytearray(_cluster_content(d, ci + n - 1)) if tail and (n > 1 or not head) else None
        if n == 1:
            buf = first if first is not None else last
            assert buf is not None
            buf[head:head + len(data)] = data
            _data_pwrite(d, host, buf, start)
        else:
            mid_start = cs if head else 0
            mid_end = (n - 1) << cb if tail else n << cb
            if first is not None:
                first[head:] = data[:cs - head]
                _data_pwrite(d, host, first, start)
            if mid_end > mid_start:
                _data_pwrite(d, host + mid_start, data[mid_start - head:mid_end - head], start + mid_start)
            if last is not None:
                keep = cs - tail
                last[:keep] = data[len(data) - keep:]
                _data_pwrite(d, host + ((n - 1) << cb), last, start + ((n - 1) << cb))
    else:
        _data_pwrite(d, host, data, start)
    i = ci & ((1 << d.map.l2_bits) - 1)
    old = tab[i:i + n].copy()
    tab[i:i + n] = (_U64(host) + np.arange(n, dtype=_U64) * _U64(cs)) | _U64(QCOW_OFLAG_COPIED)
    d.map.mark_dirty(_l2_offset(d, ci >> d.map.l2_bits))
    d._zcache = None
    if old.any():
        _release(d, old)


def write_compressed_raw(d: "Qcow2Driver", offset: int, comp: bytes) -> None:
    cb, cs = d.cluster_bits, d.cluster_size
    if offset & (cs - 1) or offset >= d.size:
        raise QimgError("Invalid argument")
    ci = offset >> cb
    tab = _ensure_l2(d, ci >> d.map.l2_bits)
    i = ci & ((1 << d.map.l2_bits) - 1)
    # Compression cannot overwrite anything (qcow2_alloc_compressed_cluster_offset).
    if int(tab[i]) & L2E_OFFSET_MASK:
        raise QimgError("Input/output error")
    _drain(d)
    host = _alloc_bytes(d, len(comp))
    check_overlap(d, host, len(comp))
    d.file.pwrite(host, comp)
    d._zcache = None
    tab[i] = _U64(Z.make_descriptor(host, len(comp), cb))
    if d.map.extl2:
        # compressed clusters have no subcluster bitmap
        d.map.l2_bitmaps(_l2_offset(d, ci >> d.map.l2_bits))[i] = 0
    d.map.mark_dirty(_l2_offset(d, ci >> d.map.l2_bits))


def _alloc_bytes(d: "Qcow2Driver", size: int) -> int:
    """Sub-cluster allocation for compressed data, packed one after the
    other as qcow2_alloc_bytes does; each touched cluster gets a reference."""
    from qimg.formats.qcow2.refcount import _Again

    refs = d.refs
    cs = d.cluster_size
    offset = d._free_byte_offset
    if offset and refs.get(offset >> d.cluster_bits) == refs.max:
        offset = 0
    free_in_cluster = cs - (offset & (cs - 1))
    while True:
        if not offset or free_in_cluster < size:
            new_cluster = refs.alloc_noref(1)
            if not offset or -(-offset // cs) * cs != new_cluster:
                offset = new_cluster
                free_in_cluster = cs
            else:
                free_in_cluster += cs
        try:
            refs.update(offset, size, 1)
        except _Again:
            offset = 0
            continue
        break
    d._free_byte_offset = offset + size
    if not d._free_byte_offset & (cs - 1):
        d._free_byte_offset = 0
    return offset


# ---- zeroes and discards -----------------------------------------------------
def _aligned_range(d: "Qcow2Driver", offset: int, length: int) -> tuple[int, int]:
    """[start, end) of whole clusters inside the range; a range reaching the
    image end counts its last partial cluster as whole."""
    cs = d.cluster_size
    start = -(-offset // cs) * cs
    end = offset + length
    end = d.size if end >= d.size else end // cs * cs
    if end >= d.size:
        end = -(-d.size // cs) * cs
    return start, max(start, end)


def _chain_reads_zero(d: "Qcow2Driver", offset: int, length: int) -> bool:
    """Does the backing chain read as zeroes here (block status, as is_zero)?"""
    if d.backing is None or length <= 0:
        return True
    end = offset + length
    while offset < end:
        if offset >= d.backing.size:
            return True
        ext, _ = d.backing.chain_status(offset, end - offset)
        if not ext.zero:
            return False
        offset += ext.length
    return True


def write_zeroes(d: "Qcow2Driver", offset: int, length: int, unmap: bool) -> None:
    length = min(length, d.size - offset)
    if length <= 0:
        return
    if d.map.extl2:
        _write_zeroes_ext(d, offset, length, unmap)
        return
    cs, cb = d.cluster_size, d.cluster_bits
    end = offset + length
    pos = offset
    while pos < end:
        cstart = pos // cs * cs
        cend = min(cstart + cs, d.size) if cstart + cs >= d.size else cstart + cs
        if pos > cstart or end < cend:
            # A partial cluster: zero the whole cluster if the rest of it
            # already reads as zeroes, else write zeroes (qcow2_co_pwrite_zeroes).
            seg_end = min(end, cend)
            kind, _, _ = d.map.run(pos >> cb, 1)
            rest_zero = kind in (ZERO_PLAIN, ZERO_ALLOC) or (
                kind == UNALLOCATED and _chain_reads_zero(d, cstart, pos - cstart)
                and _chain_reads_zero(d, seg_end, cend - seg_end))
            if rest_zero and d.header.version >= 3:
                _zeroize(d, cstart, cs, unmap)
            elif rest_zero and kind == UNALLOCATED and d.backing is None:
                pass  # v2 without backing: unallocated already reads as zeroes
            else:
                write(d, pos, memoryview(bytes(seg_end - pos)))
            pos = seg_end
            continue
        # Whole clusters up to the last complete one.
        last_end = end // cs * cs if end < d.size else -(-d.size // cs) * cs
        _zeroize_or_write(d, pos, last_end - pos, unmap)
        pos = min(end, last_end)


def _zeroize_or_write(d: "Qcow2Driver", offset: int, length: int, unmap: bool) -> None:
    if d.header.version >= 3:
        _zeroize(d, offset, length, unmap)
    elif d.backing is None:
        _discard_clusters(d, offset, length)
    else:
        chunk = 4 << 20
        zero = bytes(min(chunk, length))
        pos, end = offset, min(offset + length, d.size)
        while pos < end:
            n = min(chunk, end - pos)
            write(d, pos, memoryview(zero)[:n])
            pos += n


def _zeroize(d: "Qcow2Driver", offset: int, length: int, unmap: bool) -> None:
    """Set the zero flag on whole clusters (zero_in_l2_slice)."""
    cb = d.cluster_bits
    l2_bits = d.map.l2_bits
    ci, last = offset >> cb, (offset + length - 1) >> cb
    while ci <= last:
        l1i = ci >> l2_bits
        i = ci & ((1 << l2_bits) - 1)
        n = min(last + 1 - ci, (1 << l2_bits) - i)
        tab = _ensure_l2(d, l1i)
        old = tab[i:i + n].copy()
        kinds = classify(old, d.map.data_file)
        drop = (kinds == COMPRESSED) | (unmap & ((kinds == NORMAL) | (kinds == ZERO_ALLOC)))
        new = np.where(drop, _U64(0), old) | _U64(QCOW_OFLAG_ZERO)
        if (new != old).any():
            tab[i:i + n] = new
            d.map.mark_dirty(_l2_offset(d, l1i))
            d._zcache = None
            _release(d, np.where(drop, old, _U64(0)), punch=True)
        ci += n


def discard(d: "Qcow2Driver", offset: int, length: int) -> None:
    """qcow2_co_pdiscard: whole clusters only; on v3 they then read as
    zeroes, on v2 without a backing file they are deallocated, and on v2
    with one nothing happens (stale backing data must not show through)."""
    if d.header.version < 3 and d.backing is not None:
        return
    length = min(length, d.size - offset)
    if length <= 0:
        return
    start, end = _aligned_range(d, offset, length)
    if end > start:
        _discard_clusters(d, start, end - start)


def _discard_clusters(d: "Qcow2Driver", offset: int, length: int) -> None:
    cb = d.cluster_bits
    l2_bits = d.map.l2_bits
    v3 = d.header.version >= 3
    ci, last = offset >> cb, (offset + length - 1) >> cb
    while ci <= last:
        l1i = ci >> l2_bits
        i = ci & ((1 << l2_bits) - 1)
        n = min(last + 1 - ci, (1 << l2_bits) - i)
        old = d.map.entries(ci, n).copy()
        kinds = classify(old, d.map.data_file)
        allocated = (kinds == NORMAL) | (kinds == ZERO_ALLOC) | (kinds == COMPRESSED)
        touch = allocated | (d.backing is not None)
        if d.map.extl2:
            # the cluster goes, its subclusters read as zeroes (discard_in_l2_slice)
            new = np.where(touch, _U64(0), old)
            old_bm = d.map.bitmaps(ci, n)
            new_bm = np.where(touch, _U64(ALL_ZEROES), old_bm)
            changed = (new != old).any() or (new_bm != old_bm).any()
        else:
            new = np.where(touch, _U64(QCOW_OFLAG_ZERO if v3 else 0), old)
            changed = (new != old).any()
        if changed:
            tab = _ensure_l2(d, l1i)
            tab[i:i + n] = new
            if d.map.extl2:
                d.map.l2_bitmaps(_l2_offset(d, l1i))[i:i + n] = new_bm
            d.map.mark_dirty(_l2_offset(d, l1i))
            d._zcache = None
            _release(d, np.where(allocated, old, _U64(0)), punch=True)
        ci += n


# ---- growing -------------------------------------------------------------------
def grow_l1(d: "Qcow2Driver", new_size: int) -> None:
    """Move the L1 table to a new, larger place (qcow2_grow_l1_table, exact size)."""
    m = d.map
    if new_size <= len(m.l1):
        return
    d.flush_metadata()
    new = np.zeros(new_size, dtype=_U64)
    new[:len(m.l1)] = m.l1
    off = d.refs.alloc(new_size * 8)
    d.refs.flush()
    d.file.pwrite(off, new.astype(">u8").tobytes())
    d.file.pwrite(36, struct.pack(">IQ", new_size, off))
    old_off, old_size = m.l1_offset, len(m.l1)
    m.l1 = new
    m.l1_offset = off
    d.header.l1_size, d.header.l1_table_offset = new_size, off
    d.refs.free(old_off, old_size * 8)


def truncate(d: "Qcow2Driver", size: int, prealloc: str, shrink: bool) -> None:
    from qimg.formats.qcow2.driver import size_to_l1

    _drain(d)
    if size % 512:
        raise QimgError("The new size must be a multiple of 512")
    if size < d.size:
        if prealloc != "off":
            raise QimgError("Preallocation can't be used for shrinking an image")
        shrink_image(d, size)
        return
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise UnsupportedError(f"Unsupported preallocation mode '{prealloc}'")
    old = d.size
    grow_l1(d, size_to_l1(size, d.cluster_bits, d.map.extl2))
    if prealloc in ("falloc", "full"):
        preallocate_data(d, old, size, prealloc)
    d.size = d.header.size = size
    d.flush_metadata()
    d.file.pwrite(24, struct.pack(">Q", size))
    if prealloc == "metadata":
        preallocate_metadata(d, old, size)
    if prealloc in ("off", "metadata") and d.backing is not None and d.backing.size > old \
            and d.header.version >= 3:
        _zero_new_area(d, old, size)


def _zero_new_area(d: "Qcow2Driver", old: int, size: int) -> None:
    """The grown area must not show the backing file (bdrv_co_truncate's
    BDRV_REQ_ZERO_WRITE when the backing file reaches past the old end):
    zero clusters or subclusters from the first whole one, explicit zeroes
    before it (qcow2_co_truncate)."""
    granule = 1 << d.map.sc_bits
    zero_start = -(-old // granule) * granule
    if size > zero_start:
        if d.map.extl2:
            _zeroize_ext(d, zero_start, size - zero_start, False)
        else:
            _zeroize(d, zero_start, size - zero_start, False)
    if zero_start > old:
        write(d, old, memoryview(bytes(min(zero_start, size) - old)))


def preallocate_data(d: "Qcow2Driver", old: int, size: int, prealloc: str) -> None:
    """falloc/full (qcow2_co_truncate): new refcount structures sized for
    all the new data first, then the data area in one piece past them
    (fallocated or written), then the L2 entries pointing into it.  A
    partial cluster at the old end moves there too, its old head copied."""
    cb, cs = d.cluster_bits, d.cluster_size
    refs = d.refs
    d.flush_metadata()
    file_size = d.file.size
    ncl = -(-file_size // cs)
    nz = np.flatnonzero(refs.get_range(0, ncl))
    old_file_size = (int(nz[-1]) + 1) * cs if len(nz) else ncl * cs
    first = old >> cb
    # (Even with no new data QEMU rebuilds the refcount structures.)
    nb_data = max(0, -(-size // cs) - first)
    nb_l2 = -(-nb_data // d.map.l2_size) + 1
    start = refs.refcount_area(old_file_size, nb_data + nb_l2, True, 0, 0)
    got = refs.alloc_at(start, nb_data)
    if got != nb_data:
        raise QimgError("Could not allocate the preallocated area")
    head = old & (cs - 1) if nb_data else 0
    head_data = bytes(_cluster_content(d, first)[:head]) if head else b""
    d.file.truncate(start + nb_data * cs, prealloc)
    if head_data:
        if d.cipher is not None:
            # it moves: encrypted again, for its new host sectors
            start, head_data = _encrypted(d, start, head_data, first << cb)
        d.file.pwrite(start, head_data)
    l2_bits = d.map.l2_bits
    # bdrv_co_truncate's BDRV_REQ_ZERO_WRITE: a backing file reaching past
    # the old end
    zero_write = d.map.extl2 and d.backing is not None and d.backing.size > old
    ci, host = first, start
    while ci < first + nb_data:
        i = ci & ((1 << l2_bits) - 1)
        n = min(first + nb_data - ci, (1 << l2_bits) - i)
        tab = _ensure_l2(d, ci >> l2_bits)
        old_ents = tab[i:i + n].copy()
        tab[i:i + n] = (_U64(host) + np.arange(n, dtype=_U64) * _U64(cs)) | _U64(QCOW_OFLAG_COPIED)
        if zero_write:
            # the new area must hide the backing file: every subcluster is
            # allocated (else QEMU leaves the bitmaps as they were)
            d.map.l2_bitmaps(_l2_offset(d, ci >> l2_bits))[i:i + n] = ALL_ALLOC
        d.map.mark_dirty(_l2_offset(d, ci >> l2_bits))
        _release(d, old_ents)
        ci += n
        host += n * cs


def preallocate_metadata(d: "Qcow2Driver", start: int, end: int) -> None:
    """Allocate L2 tables and data clusters for [start, end) without writing
    data (preallocate_co): per L2 table, the table first, then its data
    clusters in one contiguous run; the file is then extended to cover them."""
    cb, cs = d.cluster_bits, d.cluster_size
    l2_bits = d.map.l2_bits
    max_clusters = ((1 << 31) - 1 - 511) >> cb  # BDRV_REQUEST_MAX_BYTES
    ci = start >> cb
    last = (end - 1) >> cb if end > start else ci - 1
    host_end = 0
    while ci <= last:
        l1i = ci >> l2_bits
        i = ci & ((1 << l2_bits) - 1)
        n = min(last + 1 - ci, (1 << l2_bits) - i, max_clusters)
        tab = _ensure_l2(d, l1i)
        ents = tab[i:i + n]
        need = classify(ents) == UNALLOCATED
        skip = np.flatnonzero(~need)
        if len(skip):
            if skip[0] == 0:
                ci += 1
                continue
            n = int(skip[0])
        # (an external data file holds a cluster at its guest offset, with no refcount)
        host = ci << cb if d.data_file is not d.file else d.refs.alloc(n << cb)
        tab[i:i + n] = (_U64(host) + np.arange(n, dtype=_U64) * _U64(cs)) | _U64(QCOW_OFLAG_COPIED)
        d.map.mark_dirty(_l2_offset(d, l1i))
        host_end = host + (n << cb)
        if d.map.extl2:
            # no copy-on-write pads the last cluster: the file ends with the
            # last subcluster the image covers
            sc_end = -(-end >> d.map.sc_bits) << d.map.sc_bits
            host_end = host + min(n << cb, sc_end - (ci << cb))
        ci += n
        # QEMU's allocation loop goes on with the next L2 table (allocating
        # it) before it finds it cannot extend the data run contiguously.
        if ci <= last and not (ci & ((1 << l2_bits) - 1)) and n == (1 << l2_bits) - i:
            _ensure_l2(d, ci >> l2_bits)
    d.flush_metadata()
    if d.data_file is d.file and host_end > d.file.size:
        d.file.truncate(host_end)


def shrink_image(d: "Qcow2Driver", size: int) -> None:
    """Cut the image to ``size`` as qcow2_co_truncate does: drop the
    clusters past it, the L2 tables past the new L1 size and the refcount
    blocks left counting nothing, then cut the file after its last used
    cluster.  Freed clusters are punched (QEMU's discard passthrough)."""
    from qimg.formats.qcow2.driver import size_to_l1

    cb, cs = d.cluster_bits, d.cluster_size
    l2_bits = d.map.l2_bits
    m, refs = d.map, d.refs
    punch: list[tuple[int, int]] = []
    start = -(-size // cs)
    last = -(-d.size // cs) - 1
    ci = start
    while ci <= last:
        l1i = ci >> l2_bits
        i = ci & ((1 << l2_bits) - 1)
        n = min(last + 1 - ci, (1 << l2_bits) - i)
        if _l2_offset(d, l1i):
            tab = _ensure_l2(d, l1i)
            old = tab[i:i + n].copy()
            bms = m.l2_bitmaps(_l2_offset(d, l1i))[i:i + n] if m.extl2 else None
            if old.any() or (bms is not None and bms.any()):
                tab[i:i + n] = 0
                if bms is not None:
                    bms[:] = 0
                m.mark_dirty(_l2_offset(d, l1i))
                kinds = classify(old)
                for k in np.flatnonzero((kinds == NORMAL) | (kinds == ZERO_ALLOC)):
                    punch.append((int(old[k]) & L2E_OFFSET_MASK, cs))
                for k in np.flatnonzero(kinds == COMPRESSED):
                    punch.append(Z.parse_descriptor(int(old[k]), cb))
                _release(d, old)
        ci += n
    d._zcache = None
    new_l1 = size_to_l1(size, cb, m.extl2)
    d.flush_metadata()
    for l1i in range(len(m.l1) - 1, new_l1 - 1, -1):
        off = int(m.l1[l1i]) & L2E_OFFSET_MASK
        if off:
            refs.free(off, cs)
            m._l2.pop(off, None)
            m._l2_dirty.discard(off)
            m.l1[l1i] = 0
            punch.append((off, cs))
    if new_l1 < len(m.l1):
        d.file.pwrite(m.l1_offset + new_l1 * 8, bytes((len(m.l1) - new_l1) * 8))
    d.flush_metadata()
    punch += [(off, cs) for off in refs.shrink_table()]
    d.flush_metadata()
    d.size = d.header.size = size
    d.file.pwrite(24, struct.pack(">Q", size))
    _punch_free(d, punch)
    file_size = d.file.size
    last_used = refs.last_used_cluster(file_size)
    if (last_used + 1) * cs < file_size:
        d.file.truncate((last_used + 1) * cs)


def _punch_free(d: "Qcow2Driver", ranges: list[tuple[int, int]]) -> None:
    """Zero freed host clusters that are now unreferenced (as QEMU's
    discards do): whole clusters only, since compressed data may share,
    one hole per contiguous run."""
    if not ranges:
        return
    _drain(d)
    cb = d.cluster_bits
    refs = d.refs
    parts = [np.arange(off >> cb, ((off + n - 1) >> cb) + 1, dtype=np.int64) for off, n in ranges]
    clusters = np.unique(np.concatenate(parts))
    breaks = np.flatnonzero(np.diff(clusters) != 1) + 1
    file_size = d.file.size
    for run in np.split(clusters, breaks):
        first = int(run[0])
        free = np.concatenate(([0], (refs.get_range(first, len(run)) == 0).astype(np.int8), [0]))
        edges = np.diff(free)
        for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
            start = (first + int(a)) << cb
            end = min((first + int(b)) << cb, file_size)
            if end > start:
                d.file.write_zeroes(start, end - start)


# ---- extended L2 entries (subclusters) ------------------------------------------
# With extended_l2 each cluster has 32 subclusters, each allocated, zero or
# unallocated on its own (docs/interop/qcow2.txt "Extended L2 Entries").  QEMU
# allocates whole host clusters but copies on write and marks allocation per
# subcluster; the functions below follow qcow2_alloc_host_offset,
# calculate_l2_meta, qcow2_subcluster_zeroize and discard_in_l2_slice.

def invalid_entry(d: "Qcow2Driver", offset: int) -> None:
    """A contradictory subcluster bitmap (QEMU's QCOW2_SUBCLUSTER_INVALID):
    the image is corrupt; the request fails with EIO (an OSError)."""
    m = d.map
    ci = offset >> d.cluster_bits
    d.signal_corruption(f"Invalid cluster entry found  (L2 offset: {m.l2_offset(ci >> m.l2_bits):#x}, "
                        f"L2 index: {hx(ci & (m.l2_size - 1))})")


def _read_ext(d: "Qcow2Driver", offset: int, length: int, through: bool) -> bytes:
    """Guest bytes of this layer, one pread per contiguous host run;
    unallocated subclusters read as zeroes, or from the backing chain when
    ``through`` (the source of copy-on-write)."""
    m = d.map
    scb, cb = m.sc_bits, d.cluster_bits
    out = bytearray(length)
    view = memoryview(out)
    pos, end = offset, offset + length
    while pos < end:
        sci = pos >> scb
        kind, n, first = m.subrun(sci, ((end - 1) >> scb) - sci + 1)
        run_end = min(end, (sci + n) << scb)
        dst = view[pos - offset:run_end - offset]
        if kind == NORMAL:
            host = (first & L2E_OFFSET_MASK) + pos - ((pos >> cb) << cb)
            _data_readinto(d, host, dst, pos)
        elif kind == COMPRESSED:
            base = (pos >> cb) << cb
            dst[:] = _decompressed(d, first)[pos - base:run_end - base]
        elif kind in (UNALLOCATED, UNALLOCATED_ALLOC) and through and d.backing is not None:
            avail = max(0, min(run_end, d.backing.size) - pos)
            if avail:
                dst[:avail] = d.backing.read(pos, avail)
        elif kind == INVALID:
            invalid_entry(d, first << cb)
        pos = run_end
    return bytes(out)


def _guest_content(d: "Qcow2Driver", offset: int, length: int) -> bytes:
    """What a read of [offset, +length) returns now, through the backing
    chain; zeroes past the end of the image."""
    if length <= 0:
        return b""
    _drain(d)
    avail = max(0, min(length, d.size - offset))
    data = _read_ext(d, offset, avail, True) if avail else b""
    return data + bytes(length - avail)


def _ctz32(x: int) -> int:
    return (x & -x).bit_length() - 1 if x else 32


def _clz32(x: int) -> int:
    return 32 - x.bit_length()


def _write_ext(d: "Qcow2Driver", offset: int, data: memoryview) -> None:
    m = d.map
    cb, cs = d.cluster_bits, d.cluster_size
    pos, end = offset, offset + len(data)
    want = None  # where the host run of this request goes on
    while pos < end:
        ci = pos >> cb
        table_end = ((ci >> m.l2_bits) + 1) << m.l2_bits
        last = min((end - 1) >> cb, table_end - 1)
        ents = m.entries(ci, last - ci + 1)
        # Clusters we own alone are written in place (handle_copied), as
        # long as they follow each other on the host.
        inplace = (classify(ents, m.data_file) == NORMAL) & ((ents & _U64(QCOW_OFLAG_COPIED)) != 0)
        keep = bool(inplace[0])
        same = inplace == keep
        if keep and int(ents[0]) & L2E_OFFSET_MASK & (cs - 1):
            d.signal_corruption(f"Data cluster offset {int(ents[0]) & L2E_OFFSET_MASK:#x} unaligned "
                                f"(guest offset: {hx(pos)})")
        if keep:
            hosts = ents & _U64(L2E_OFFSET_MASK)
            same &= hosts == hosts[0] + np.arange(len(ents), dtype=_U64) * _U64(cs)
        change = np.flatnonzero(~same)
        n = int(change[0]) if len(change) else len(ents)
        host = None
        if not keep and want is not None and d.data_file is d.file:
            # QEMU goes on with the host run the request has so far when
            # the clusters right after it are free (qcow2_alloc_clusters_at)
            got = d.refs.alloc_at(want, n)
            if got:
                n, host = got, want
        seg_end = min(end, (ci + n) << cb)
        want = _write_ext_run(d, ci, n, pos, data[pos - offset:seg_end - offset], keep, host)
        pos = seg_end


def _write_ext_run(d: "Qcow2Driver", ci: int, n: int, pos: int, buf: memoryview, keep: bool,
                   new_host: int | None = None) -> int:
    """Write ``buf`` at guest ``pos`` into the ``n`` clusters from ``ci``
    (one L2 table): in place (``keep``) or into a new host run (at
    ``new_host`` if the caller already referenced one), with copy-on-write
    of the partial edge subclusters, and the allocation bits of every
    written subcluster set.  Returns the host offset after the run."""
    m = d.map
    cb, cs, scb = d.cluster_bits, d.cluster_size, m.sc_bits
    l1i = ci >> m.l2_bits
    tab = _ensure_l2(d, l1i)
    l2_off = _l2_offset(d, l1i)
    i = ci & (m.l2_size - 1)
    bms = m.l2_bitmaps(l2_off)[i:i + n]
    ents = tab[i:i + n]
    kinds = classify_sub(ents, bms, m.data_file)
    if (kinds == INVALID).any():
        invalid_entry(d, (ci + int(np.flatnonzero((kinds == INVALID).any(axis=1))[0])) << cb)
    start = ci << cb
    wfrom = pos - start
    wto = wfrom + len(buf)
    sc_first, sc_last = wfrom >> scb, (wto - 1) >> scb
    k_first = int(kinds[0, sc_first])
    k_last = int(kinds[n - 1, sc_last & (SUBCLUSTERS - 1)])
    sc_size = 1 << scb
    round_sc = -(-wto // sc_size) * sc_size
    if keep:
        if (kinds.ravel()[sc_first:sc_last + 1] == NORMAL).all():
            # nothing but allocated subclusters: a plain overwrite
            host = int(ents[0]) & L2E_OFFSET_MASK
            check_overlap(d, host + wfrom, len(buf))
            _data_pwrite(d, host + wfrom, buf, start + wfrom)
            d._zcache = None
            return host + (n << cb)
        cow_from = wfrom if k_first == NORMAL else sc_first << scb
        cow_to = wto if k_last == NORMAL else round_sc
        host = int(ents[0]) & L2E_OFFSET_MASK
    else:
        if k_first == COMPRESSED:
            cow_from = 0
        elif k_first in (NORMAL, ZERO_ALLOC, UNALLOCATED_ALLOC):
            # a shared cluster: copy from its first allocated subcluster on
            cow_from = min(sc_first, _ctz32(int(bms[0]) & ALL_ALLOC)) << scb
        else:
            cow_from = sc_first << scb
        sl = sc_last & (SUBCLUSTERS - 1)
        if k_last == COMPRESSED:
            cow_to = n << cb
        elif k_last in (NORMAL, ZERO_ALLOC, UNALLOCATED_ALLOC):
            cow_to = (n << cb) - (min(SUBCLUSTERS - 1 - sl, _clz32(int(bms[-1]) & ALL_ALLOC)) << scb)
        else:
            cow_to = round_sc
        host = new_host
    # The copy-on-write data is read before any table changes.
    head = _guest_content(d, start + cow_from, wfrom - cow_from)
    tail = _guest_content(d, start + wto, cow_to - wto)
    if host is None:
        host = alloc_data(d, start, n << cb)
    check_overlap(d, host + cow_from, cow_to - cow_from)
    if len(buf) <= 1 << 20 and (head or tail):
        _data_pwrite(d, host + cow_from, b"".join((head, buf, tail)), start + cow_from)
    else:
        if head:
            _data_pwrite(d, host + cow_from, head, start + cow_from)
        _data_pwrite(d, host + wfrom, buf, start + wfrom)
        if tail:
            _data_pwrite(d, host + wto, tail, start + wto)
    d._zcache = None
    # qcow2_alloc_cluster_link_l2: subclusters [cow_from, cow_to) become
    # allocated, their zero bits go.
    masks = np.full(n, ALL_ALLOC, dtype=_U64)
    first_lo = cow_from >> scb
    last_hi = ((cow_to - 1) >> scb) - ((n - 1) << 5) + 1
    if n == 1:
        masks[0] = sub_range_mask(first_lo, last_hi)
    else:
        masks[0] = sub_range_mask(first_lo, SUBCLUSTERS)
        masks[-1] = sub_range_mask(0, last_hi)
    old = ents.copy()
    new_bms = (bms | masks) & ~(masks << _U64(32))
    if not keep:
        tab[i:i + n] = (_U64(host) + np.arange(n, dtype=_U64) * _U64(cs)) | _U64(QCOW_OFLAG_COPIED)
    bms[:] = new_bms
    m.mark_dirty(l2_off)
    if not keep and old.any():
        _release(d, old)
    return host + (n << cb)


def _write_zeroes_ext(d: "Qcow2Driver", offset: int, length: int, unmap: bool) -> None:
    """bdrv_co_do_pwrite_zeroes with the subcluster as alignment: a partial
    subcluster at either end is zeroed whole if the rest of it already
    reads as zeroes, else written with zero data; the aligned middle goes
    to qcow2_subcluster_zeroize."""
    m = d.map
    scb = m.sc_bits
    ss = 1 << scb
    size = d.size
    end = offset + length
    pos = offset
    while pos < end:
        gstart = pos >> scb << scb
        gend = min(gstart + ss, size)
        if pos > gstart or end < gend:
            seg_end = min(end, gstart + ss)
            kind, _, _ = m.subrun(pos >> scb, 1)
            rest_zero = kind in (ZERO_PLAIN, ZERO_ALLOC) or (
                kind in (UNALLOCATED, UNALLOCATED_ALLOC) and _chain_reads_zero(d, gstart, pos - gstart)
                and _chain_reads_zero(d, seg_end, gend - seg_end))
            if rest_zero:
                _zeroize_ext(d, gstart, gend - gstart, unmap)
            else:
                write(d, pos, memoryview(bytes(seg_end - pos)))
            pos = seg_end
            continue
        last_end = end >> scb << scb if end < size else end
        _zeroize_ext(d, pos, last_end - pos, unmap)
        pos = last_end


def _zeroize_ext(d: "Qcow2Driver", offset: int, length: int, unmap: bool) -> None:
    """qcow2_subcluster_zeroize: zero bits for the subclusters of partial
    clusters at either end, whole clusters as zero_in_l2_slice does.  A
    partial compressed cluster cannot be zeroed so: the whole request is
    then written with zero data, as the block layer falls back."""
    cs, cb = d.cluster_size, d.cluster_bits
    end = offset + length
    head = min(end, -(-offset // cs) * cs) - offset
    mid = offset + head
    tail = 0 if end >= d.size else end - max(mid, end >> cb << cb)
    mid_end = end - tail
    ok = not head or _zero_subclusters(d, offset, head)
    if ok and mid_end > mid:
        _zero_clusters_ext(d, mid, mid_end - mid, unmap)
    if ok and tail:
        ok = _zero_subclusters(d, mid_end, tail)
    if not ok:
        chunk = 4 << 20
        p = offset
        while p < end:
            k = min(chunk, end - p)
            write(d, p, memoryview(bytes(k)))
            p += k


def _zero_subclusters(d: "Qcow2Driver", offset: int, length: int) -> bool:
    """zero_l2_subclusters for part of one cluster; False for a compressed
    cluster (which cannot be zeroed in part)."""
    m = d.map
    cb, scb = d.cluster_bits, m.sc_bits
    ci = offset >> cb
    first = (offset >> scb) & (SUBCLUSTERS - 1)
    count = -(-length // (1 << scb))
    tab = _ensure_l2(d, ci >> m.l2_bits)
    l2_off = _l2_offset(d, ci >> m.l2_bits)
    i = ci & (m.l2_size - 1)
    if int(tab[i]) & QCOW_OFLAG_COMPRESSED:
        return False
    bms = m.l2_bitmaps(l2_off)
    mask = sub_range_mask(first, first + count)
    new = (int(bms[i]) | (mask << 32)) & ~mask
    if new != int(bms[i]):
        bms[i] = _U64(new)
        m.mark_dirty(l2_off)
        d._zcache = None
    return True


def _zero_clusters_ext(d: "Qcow2Driver", offset: int, length: int, unmap: bool) -> None:
    """zero_in_l2_slice on whole clusters: every subcluster reads as zeroes;
    compressed clusters, and with ``unmap`` allocated ones, lose their host
    cluster."""
    m = d.map
    cb = d.cluster_bits
    ci, last = offset >> cb, (offset + length - 1) >> cb
    while ci <= last:
        l1i = ci >> m.l2_bits
        i = ci & (m.l2_size - 1)
        n = min(last + 1 - ci, m.l2_size - i)
        tab = _ensure_l2(d, l1i)
        l2_off = _l2_offset(d, l1i)
        bms = m.l2_bitmaps(l2_off)[i:i + n]
        old = tab[i:i + n].copy()
        kinds = classify(old, m.data_file)
        comp = kinds == COMPRESSED
        drop = comp | (unmap & (kinds == NORMAL))
        new = np.where(drop, _U64(0), old)
        if (new != old).any() or (bms != _U64(ALL_ZEROES)).any():
            tab[i:i + n] = new
            bms[:] = ALL_ZEROES
            m.mark_dirty(l2_off)
            d._zcache = None
            _release(d, np.where(drop, old, _U64(0)), punch=True)
        ci += n
