"""Bulk block status for qcow2: the allocation runs of a whole guest range,
from its L2 tables read in large batches and classified all at once.

Driver.block_status answers one run per call through the L2 cache, which
for a big image means a call, a cache lookup and a dozen numpy steps per
table.  Here the tables of a range are read with one request per stretch of
tables that are neighbours on the host, every entry is classified and run
boundaries are found with a few vectorized passes per batch, and only the
runs themselves (one per table for a preallocated image) cost Python work.

The answers are exactly what successive Driver.block_status calls would
give (same run boundaries up to merging of equal neighbours, same flags and
host offsets).  What this scanner does not handle is left to that generic
path: images with extended L2 entries, an external data file or encryption
(no scan at all), and L2 tables that are unaligned or past the end of the
file (the scan stops before them and says where it may resume).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Iterator

import numpy as np

from qimg.block.status import ALLOCATED, COMPRESSED as S_COMPRESSED, DATA, EOF, OFFSET_VALID, RECURSE, ZERO, Extent

if TYPE_CHECKING:
    from qimg.protocols.file import File

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1

# Cluster types, numbered as cluster.py's: the odd ones have a host cluster.
UNALLOCATED = 0
NORMAL = 1
ZERO_PLAIN = 2
ZERO_ALLOC = 3
COMPRESSED = 4

#: bytes of L2 tables read and classified at once
BATCH_BYTES = 4 << 20

_U64 = np.uint64


def read_tables(file: "File", offsets: list[int], table_size: int) -> np.ndarray:
    """The tables (of big-endian u64) at host ``offsets`` as a native
    (tables, table_size/8) array.  Tables that follow each other on the
    host are read with one request, straight into the array."""
    buf = np.empty(len(offsets) * table_size, dtype=np.uint8)
    view = memoryview(buf)  # type: ignore[arg-type]
    i = 0
    while i < len(offsets):
        j = i + 1
        while j < len(offsets) and offsets[j] == offsets[j - 1] + table_size:
            j += 1
        file.preadinto(offsets[i], view[i * table_size:j * table_size])
        i = j
    tables = buf.view(_U64).reshape(len(offsets), table_size // 8)
    if sys.byteorder == "little":
        tables.byteswap(inplace=True)
    return tables


def _kinds(entries: np.ndarray) -> np.ndarray:
    """cluster.classify, in fewer passes: 1 for a host offset, +2 for the
    zero flag, 4 for compressed."""
    kinds = ((entries & _U64(L2E_OFFSET_MASK)) != 0).view(np.uint8)
    kinds |= ((entries & _U64(OFLAG_ZERO)) << _U64(1)).astype(np.uint8)
    kinds[(entries & _U64(OFLAG_COMPRESSED)) != 0] = COMPRESSED
    return kinds


class _Runs:
    """Runs of clusters, merged as Driver.block_status's run() merges them
    (same type, and for types with a host cluster, contiguous on the
    host), turned into Extents of [start, end) bytes."""

    def __init__(self, driver: object, start: int, end: int) -> None:
        self.driver = driver
        self.cb = driver.cluster_bits  # type: ignore[attr-defined]
        self.start = start
        self.end = end
        self.size = driver.size  # type: ignore[attr-defined]
        self.filename = driver.file.filename  # type: ignore[attr-defined]
        self.kind = -1
        self.first = 0  # first cluster of the pending run
        self.count = 0
        self.host = 0  # host offset of its first cluster
        self._recurse: bool | None = None

    def add(self, kind: int, first: int, count: int, host: int) -> Iterator[Extent]:
        """Append a run; yields the pending one when this one does not
        continue it."""
        if (kind == self.kind and first == self.first + self.count
                and (not kind & 1 or host == self.host + (self.count << self.cb))):
            self.count += count
            return
        if self.count:
            yield self.extent()
        self.kind, self.first, self.count, self.host = kind, first, count, host

    def extent(self) -> Extent:
        cb = self.cb
        lo = max(self.start, self.first << cb)
        hi = min(self.end, (self.first + self.count) << cb)
        kind = self.kind
        host = None
        if kind == NORMAL:
            flags = DATA | ALLOCATED | OFFSET_VALID
            if self._recurse is None:
                self._recurse = bool(self.driver._metadata_preallocated())  # type: ignore[attr-defined]
            if self._recurse:
                flags |= RECURSE
        elif kind == ZERO_ALLOC:
            flags = ZERO | ALLOCATED | OFFSET_VALID
        elif kind == ZERO_PLAIN:
            flags = ZERO | ALLOCATED
        elif kind == COMPRESSED:
            flags = DATA | ALLOCATED | S_COMPRESSED
        else:
            flags = 0
        if flags & OFFSET_VALID:
            host = self.host + (lo - (self.first << cb))
        if hi >= self.size:
            flags |= EOF
        return Extent(lo, hi - lo, flags, host, self.filename if host is not None else None)


def scannable(driver: object) -> bool:
    """Whether the scan can answer for this driver at all."""
    h = driver.header  # type: ignore[attr-defined]
    return not (getattr(h, "extended_l2", False) or driver.encrypted  # type: ignore[attr-defined]
                or getattr(driver, "data_file", driver.file) is not driver.file  # type: ignore[attr-defined]
                or getattr(h, "data_file", None) or getattr(driver, "_modified", False))


def block_status_runs(driver: object, offset: int, length: int) -> Iterator[Extent | int]:
    """The extents of [offset, offset+length) (clipped to the image), in
    order.  When the scan meets an L2 table it leaves to the generic path,
    it yields instead the guest offset up to which that path must answer,
    and stops."""
    end = min(offset + length, driver.size)  # type: ignore[attr-defined]
    if offset >= end:
        return
    cb = driver.cluster_bits  # type: ignore[attr-defined]
    cs = 1 << cb
    l2_bits = cb - 3
    n = 1 << l2_bits
    file = driver.file  # type: ignore[attr-defined]
    l1 = driver.map.l1  # type: ignore[attr-defined]
    first_cluster = offset >> cb
    last_cluster = (end - 1) >> cb
    lo = first_cluster >> l2_bits
    hi = last_cluster >> l2_bits  # inclusive
    l2 = l1[lo:min(hi + 1, len(l1))] & _U64(L1E_OFFSET_MASK)
    mapped = np.flatnonzero(l2)
    tables = l2[mapped]
    # Tables the generic path handles (it reports them): the scan ends there.
    odd = np.flatnonzero((tables & _U64(cs - 1)) | (tables > _U64(max(0, file.size - cs))))
    stop = None
    if len(odd):
        stop = int(mapped[odd[0]]) + lo
        mapped, tables = mapped[:odd[0]], tables[:odd[0]]
    l1_index = (mapped + lo).tolist()
    offsets = tables.tolist()
    runs = _Runs(driver, offset, end)
    cluster = first_cluster  # the next cluster not yet accounted for
    per_batch = max(1, BATCH_BYTES >> cb)
    for b in range(0, len(l1_index), per_batch):
        rows = l1_index[b:b + per_batch]
        tables = read_tables(file, offsets[b:b + per_batch], cs)
        for kind, first, count, host in _batch_runs(rows, tables, cb):
            if first + count <= first_cluster or first > last_cluster:
                continue
            if first > cluster:
                yield from runs.add(UNALLOCATED, cluster, first - cluster, 0)
            yield from runs.add(kind, first, count, host)
            cluster = first + count
    if stop is not None:
        gap_end = min(stop << l2_bits, last_cluster + 1)
    else:
        gap_end = last_cluster + 1
    if gap_end > cluster:
        yield from runs.add(UNALLOCATED, cluster, gap_end - cluster, 0)
    if runs.count:
        yield runs.extent()
    if stop is not None:
        yield min(end, (stop + 1) << (l2_bits + cb))


def _batch_runs(rows: list[int], tables: np.ndarray, cb: int) -> list[tuple[int, int, int, int]]:
    """(type, first cluster, clusters, host offset) of the runs of a batch
    of tables (L1 indexes ``rows``), in order; neighbours may continue each
    other (the caller merges).  Tables that are one run (all unallocated,
    or one stretch of consecutive host clusters, as preallocation lays them
    out) cost two passes; the others are classified entry by entry."""
    l2_bits = cb - 3
    n = 1 << l2_bits
    one_run = uniform_rows(tables, cb)
    firsts = tables[:, 0].tolist()
    out: list[tuple[int, int, int, int]] = []
    r = 0
    while r < len(rows):
        if one_run[r]:
            e = firsts[r]
            kind = (COMPRESSED if e & OFLAG_COMPRESSED else
                    (1 if e & L2E_OFFSET_MASK else 0) | (2 if e & OFLAG_ZERO else 0))
            out.append((kind, rows[r] << l2_bits, n, e & L2E_OFFSET_MASK))
            r += 1
            continue
        q = r
        while q < len(rows) and not one_run[q]:
            q += 1
        out += _entry_runs(rows[r:q], tables[r:q].ravel(), cb)
        r = q
    return out


def uniform_rows(tables: np.ndarray, cb: int) -> np.ndarray:
    """Per table: all its entries are zero, or it maps consecutive host
    clusters with the same flags (entry i == entry 0 + i * cluster size,
    with no carry out of the offset field, so every flag bit and every
    offset bit below the cluster size is entry 0's)."""
    n = tables.shape[1]
    cs = 1 << cb
    first = tables[:, 0]
    offsets = first & _U64(L2E_OFFSET_MASK)
    uniform = np.equal(tables[:, :1] + _ramp(n, cs), tables).all(axis=1)
    uniform &= (offsets != 0) & (offsets + _U64((n - 1) * cs) <= _U64(L2E_OFFSET_MASK))
    zero = first == 0
    if zero.any():
        rows = np.flatnonzero(zero)
        uniform[rows] = ~tables[rows].any(axis=1)
    return uniform


_RAMPS: dict[tuple[int, int], np.ndarray] = {}


def _ramp(n: int, step: int) -> np.ndarray:
    ramp = _RAMPS.get((n, step))
    if ramp is None:
        ramp = _RAMPS[(n, step)] = np.arange(n, dtype=_U64) * _U64(step)
    return ramp


def _entry_runs(rows: list[int], entries: np.ndarray, cb: int) -> list[tuple[int, int, int, int]]:
    """The runs of these tables, entry by entry (vectorized)."""
    cs = 1 << cb
    l2_bits = cb - 3
    n = 1 << l2_bits
    kinds = _kinds(entries)
    hosts = entries & _U64(L2E_OFFSET_MASK)
    # a run breaks where the type changes, where a host cluster does not
    # follow the one before, and between tables that are not neighbours
    brk = kinds[1:] != kinds[:-1]
    step = hosts[1:] - hosts[:-1]
    brk |= (step != _U64(cs)) & (kinds[1:] & 1).view(bool)
    del step
    row_starts = np.arange(1, len(rows)) * n
    brk[row_starts - 1] |= np.diff(np.asarray(rows, dtype=np.int64)) != 1
    starts = np.concatenate([[0], np.flatnonzero(brk) + 1]).tolist()
    del brk
    run_kinds = kinds[starts].tolist()
    run_hosts = hosts[starts].tolist()
    starts.append(len(rows) * n)
    out = []
    for r in range(len(run_kinds)):
        s, e = starts[r], starts[r + 1]
        out.append((run_kinds[r], (rows[s >> l2_bits] << l2_bits) + (s & (n - 1)), e - s, run_hosts[r]))
    return out
