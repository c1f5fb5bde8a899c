"""Bulk block status for qcow2: the allocation runs of a whole guest range,
from its L2 tables read in large batches and classified all at once.

Driver.block_status answers one run per call through the L2 cache, which
for a big image means a call, a cache lookup and a dozen numpy steps per
table.  Here the tables of a range are read with one request per stretch of
tables that are neighbours on the host, every entry is classified and run
boundaries are found with a few vectorized passes per batch, and only the
runs themselves (one per table for a preallocated image) cost Python work.

A table that is one run (all entries alike, or consecutive host clusters
with one set of flags, as preallocation lays them out) is recognized with a
bytes comparison or one big-integer equation, without numpy: importing
numpy costs more than qemu-img's whole ``map`` of a preallocated 256 GiB
image, so numpy is loaded only when a table needs entry-by-entry work.

The answers are exactly what successive Driver.block_status calls would
give (same run boundaries up to merging of equal neighbours, same flags and
host offsets).  What this scanner does not handle is left to that generic
path: images with extended L2 entries, an external data file or encryption
(no scan at all), and L2 tables that are unaligned or past the end of the
file (the scan stops before them and says where it may resume).
"""

from __future__ import annotations

import struct
import sys
from typing import TYPE_CHECKING, Any, Iterator

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

#: L1 entries the scan reads itself when the cluster map is not loaded
#: (a bigger table goes through the map, which holds it as an array)
SMALL_L1 = 1 << 16
#: L2 tables a scan checks without numpy (see block_status_runs)
LIGHT_TABLES = 1024
#: entries of tables that are not one run a scan classifies one by one in
#: Python, at about 200 ns each, before it takes numpy, whose import costs
#: what some 2**17 of them do
LIGHT_ENTRIES = 1 << 16


def _read_into(file: "File", offsets: list[int], table_size: int, view: memoryview) -> None:
    """Tables that follow each other on the host are read with one request."""
    i = 0
    while i < len(offsets):
        j = i + 1
        while j < len(offsets) and offsets[j] == offsets[j - 1] + table_size:
            j += 1
        file.preadinto(offsets[i], view[i * table_size:j * table_size])
        i = j


def read_tables(file: "File", offsets: list[int], table_size: int) -> Any:
    """The tables (of big-endian u64) at host ``offsets`` as a native
    (tables, table_size/8) numpy array, read straight into it."""
    import numpy as np

    buf = np.empty(len(offsets) * table_size, dtype=np.uint8)
    _read_into(file, offsets, table_size, memoryview(buf))  # type: ignore[arg-type]
    return _native(buf, table_size)


def _native(buf: Any, table_size: int) -> Any:
    """A writable buffer of big-endian tables as a native array, in place."""
    import numpy as np

    tables = np.frombuffer(buf, dtype=np.uint64).reshape(-1, table_size // 8)
    if sys.byteorder == "little":
        tables.byteswap(inplace=True)
    return tables


def _kinds(entries: Any) -> Any:
    """cluster.classify, in fewer passes: 1 for a host offset, +2 for the
    zero flag, 4 for compressed."""
    import numpy as np

    _U64 = np.uint64
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


def _mapped_tables(driver: Any, lo: int, hi: int, cs: int) -> tuple[list[int], list[int], int | None]:
    """(L1 indexes, host offsets) of the L2 tables of L1 entries lo..hi
    that the scan reads, and the first L1 index it leaves to the generic
    path (a table unaligned or past the end of the file), if any."""
    limit = max(0, driver.file.size - cs)
    if driver._map is None and driver.header.l1_size <= SMALL_L1:
        # the map (and numpy with it) is not needed for a small L1
        h = driver.header
        hi = min(hi, h.l1_size - 1)
        if hi < lo:
            return [], [], None
        raw = driver.file.pread(h.l1_table_offset + lo * 8, (hi + 1 - lo) * 8)
        raw += bytes((hi + 1 - lo) * 8 - len(raw))
        l2 = [e & L1E_OFFSET_MASK for e in struct.unpack(f">{hi + 1 - lo}Q", raw)]
        rows = [i for i, t in enumerate(l2, lo) if t]
        offsets = [l2[i - lo] for i in rows]
        for k, t in enumerate(offsets):
            if t & (cs - 1) or t > limit:
                return rows[:k], offsets[:k], rows[k]
        return rows, offsets, None
    import numpy as np

    u64 = np.uint64
    l1 = driver.map.l1
    l2 = l1[lo:min(hi + 1, len(l1))] & u64(L1E_OFFSET_MASK)
    mapped = np.flatnonzero(l2)
    tables = l2[mapped]
    odd = np.flatnonzero((tables & u64(cs - 1)) | (tables > u64(limit)))
    stop = None
    if len(odd):
        stop = int(mapped[odd[0]]) + lo
        mapped, tables = mapped[:odd[0]], tables[:odd[0]]
    return (mapped + lo).tolist(), tables.tolist(), stop


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
    file = driver.file  # type: ignore[attr-defined]
    first_cluster = offset >> cb
    last_cluster = (end - 1) >> cb
    l1_index, offsets, stop = _mapped_tables(driver, first_cluster >> l2_bits, last_cluster >> l2_bits, cs)
    runs = _Runs(driver, offset, end)
    cluster = first_cluster  # the next cluster not yet accounted for
    per_batch = max(1, BATCH_BYTES >> cb)
    buf = bytearray(min(per_batch, len(l1_index)) * cs)
    # one_run costs about a microsecond per KiB of table; past a few
    # hundred tables numpy's import pays for itself
    vectorized = len(l1_index) > LIGHT_TABLES or "numpy" in sys.modules
    light = [LIGHT_ENTRIES]  # what is left of the entries Python may classify
    for b in range(0, len(l1_index), per_batch):
        rows = l1_index[b:b + per_batch]
        view = memoryview(buf)[:len(rows) * cs]
        _read_into(file, offsets[b:b + per_batch], cs, view)
        for kind, first, count, host in _batch_runs(rows, view, cb, vectorized, light):
            if first + count <= first_cluster or first > last_cluster:
                continue
            if first > cluster:
                yield from runs.add(UNALLOCATED, cluster, first - cluster, 0)
            if kind & 1 and host & (cs - 1):
                # an unaligned host cluster is corruption, which the
                # generic path reports as QEMU does
                if runs.count:
                    yield runs.extent()
                yield max(first, first_cluster) + 1 << cb
                return
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


def _batch_runs(rows: list[int], buf: memoryview, cb: int, vectorized: bool,
                light: list[int]) -> list[tuple[int, int, int, int]]:
    """(type, first cluster, clusters, host offset) of the runs of a batch
    of tables (L1 indexes ``rows``, their bytes in ``buf``), in order;
    neighbours may continue each other (the caller merges).  Tables that
    are one run are told by one_run (or, ``vectorized``, by uniform_rows
    over the whole batch); the others are classified entry by entry, in
    Python while ``light[0]`` entries allow it, else with numpy."""
    l2_bits = cb - 3
    cs = 1 << cb
    n = 1 << l2_bits
    tables = None
    if vectorized:
        tables = _native(buf, cs)
        firsts = [e if one else None for e, one in zip(tables[:, 0].tolist(), uniform_rows(tables, cb).tolist())]
    else:
        firsts = [one_run(buf[r * cs:(r + 1) * cs], cb) for r in range(len(rows))]
    out: list[tuple[int, int, int, int]] = []
    r = 0
    while r < len(rows):
        e = firsts[r]
        if e is not None:
            kind = (1 if e & L2E_OFFSET_MASK else 0) | (2 if e & OFLAG_ZERO else 0)
            out.append((kind, rows[r] << l2_bits, n, e & L2E_OFFSET_MASK))
            r += 1
            continue
        q = r + 1
        while q < len(rows) and firsts[q] is None:
            q += 1
        if tables is None and (q - r) * n <= light[0]:
            light[0] -= (q - r) * n
            out += _entry_runs_light(rows[r:q], buf[r * cs:q * cs], cb)
        else:
            entries = tables[r:q] if tables is not None else _native(buf[r * cs:q * cs], cs)
            out += _entry_runs(rows[r:q], entries.ravel(), cb)
        r = q
    return out


#: per (entries, cluster size): the big-endian table of entry i == i * cluster size, as one integer
_STEPS: dict[tuple[int, int], int] = {}


def one_run(table: memoryview, cb: int) -> int | None:
    """The first entry of an L2 table that is one run, else None.  One run:
    every entry the same and without a host cluster (unallocated or plain
    zero), or consecutive host clusters with one set of flags (entry i ==
    entry 0 + i * cluster size, with no carry out of the offset field, so
    every flag bit is entry 0's).  Compressed entries are never one run."""
    first = bytes(table[:8])
    e = int.from_bytes(first, "big")
    if e & OFLAG_COMPRESSED:
        return None
    n = len(table) >> 3
    host = e & L2E_OFFSET_MASK
    if not host:
        return e if table == first * n else None
    cs = 1 << cb
    if host + (n - 1) * cs > L2E_OFFSET_MASK:
        return None
    last = (n - 1) * cs
    if int.from_bytes(table[-8:], "big") != e + last or int.from_bytes(table[8:16], "big") != e + cs:
        return None  # the common case of a written table, told cheaply
    # As integers of n 64-bit digits: entry 0 in every digit, plus the
    # ramp 0, cs, 2*cs, ...; no digit carries into the next.
    steps = _STEPS.get((n, cs))
    if steps is None:
        steps = _STEPS[(n, cs)] = int.from_bytes(struct.pack(f">{n}Q", *range(0, n * cs, cs)), "big")
    expect = int.from_bytes(first * n, "big") + steps
    return e if int.from_bytes(table, "big") == expect else None


def uniform_rows(tables: Any, cb: int) -> Any:
    """Per table of a numpy array of them: all its entries are zero, or it
    maps consecutive host clusters with the same flags (as one_run)."""
    import numpy as np

    _U64 = np.uint64
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


_RAMPS: dict[tuple[int, int], Any] = {}


def _ramp(n: int, step: int) -> Any:
    import numpy as np

    ramp = _RAMPS.get((n, step))
    if ramp is None:
        ramp = _RAMPS[(n, step)] = np.arange(n, dtype=np.uint64) * np.uint64(step)
    return ramp


def _entry_runs(rows: list[int], entries: Any, cb: int) -> list[tuple[int, int, int, int]]:
    """The runs of these tables, entry by entry (vectorized)."""
    import numpy as np

    _U64 = np.uint64
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


def _entry_runs_light(rows: list[int], buf: memoryview, cb: int) -> list[tuple[int, int, int, int]]:
    """_entry_runs without numpy, entry by entry, a table at a time (the
    caller merges runs that go on into the next table)."""
    cs = 1 << cb
    n = cs >> 3
    l2_bits = cb - 3
    out = []
    for r, row in enumerate(rows):
        base = row << l2_bits
        kind, start, host, follow = -1, 0, 0, 0
        for i, e in enumerate(struct.unpack_from(f">{n}Q", buf, r * cs)):
            h = e & L2E_OFFSET_MASK
            k = COMPRESSED if e & OFLAG_COMPRESSED else (1 if h else 0) | (2 if e & OFLAG_ZERO else 0)
            if k != kind or (k & 1 and h != follow):
                if kind >= 0:
                    out.append((kind, base + start, i - start, host))
                kind, start, host = k, i, h
            follow = h + cs
        out.append((kind, base + start, n - start, host))
    return out
