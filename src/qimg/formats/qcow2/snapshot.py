"""qcow2 internal snapshots (docs/interop/qcow2.txt, "Snapshots").

The snapshot table is a list of QCowSnapshot entries, each padded to 8
bytes: a 40-byte header, extra data (vm_state_size_large, disk_size,
icount, and whatever later versions add: kept verbatim), the ID string and
the name.  It is always rewritten whole to newly allocated clusters and
only then pointed at from the header, so a crash leaves the old or the new
table.

Creating, applying and deleting a snapshot add or drop one reference to
every cluster an L1 table reaches (its L2 tables, their data clusters) and
then recompute QCOW_OFLAG_COPIED (set only where the refcount is exactly 1),
as QEMU's qcow2_update_snapshot_refcount.  The refcount work is done on
numpy arrays, one L2 table at a time; this module imports numpy lazily so
that ``qimg info`` (which parses the table) never loads it.

Order on disk, as QEMU's, so that a crash leaves at worst leaked clusters:
create writes the L1 copy, adds the references, then writes the new table
and only then the header pointer; apply counts the snapshot's references
before it overwrites the active L1 and drops the old ones after; delete
takes the snapshot out of the table before dropping its references.  A
reference update QEMU refuses (refcount overflow with narrow refcounts)
stops where QEMU stops, keeping the earlier updates, so that images end up
byte for byte as qemu-img leaves them.  Freed clusters are punched in the
file (QEMU's pass-discard-snapshot).
"""

from __future__ import annotations

import os
import re
import struct
from typing import TYPE_CHECKING, Any

from qimg.errors import QimgError
from qimg.formats.qcow2.header import hx
from qimg.record import dataclass

if TYPE_CHECKING:
    import numpy as np

    from qimg.formats.qcow2.driver import Qcow2Driver
    from qimg.protocols.file import File

SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # 40 bytes
EXTRA_DATA = struct.Struct(">QQQ")  # vm_state_size_large, disk_size, icount
#: QEMU's limits against hostile tables
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS
QCOW_MAX_L1_SIZE = 32 << 20
INT64_MAX = (1 << 63) - 1
ICOUNT_NONE = (1 << 64) - 1
#: qemu's QEMUSnapshotInfo buffers: longer IDs and names are cut there
ID_STR_MAX = 127
NAME_MAX = 255
#: where nb_snapshots and snapshots_offset sit in the header
HEADER_NB_SNAPSHOTS = 60


class SnapshotErrno(QimgError):
    """A failure QEMU reports as a negative errno (``-errno (strerror)`` in
    ``snapshot -c``, ``strerror`` elsewhere)."""

    def __init__(self, errno: int, message: str | None = None, detail: str = "") -> None:
        super().__init__(message or os.strerror(errno), detail=detail)
        self.errno = errno


@dataclass
class QCowSnapshot:
    l1_table_offset: int
    l1_size: int
    id_str: bytes
    name: bytes
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int = 0
    icount: int = ICOUNT_NONE
    extra_data_size: int = EXTRA_DATA.size
    #: extra data past the fields this implementation knows, kept as it was
    unknown_extra_data: bytes = b""

    def info(self) -> dict[str, Any]:
        """The SnapshotInfo dict ``info`` and ``snapshot -l`` print, keys in
        the QAPI schema's order."""
        d: dict[str, Any] = {
            "id": _text(self.id_str[:ID_STR_MAX]),
            "name": _text(self.name[:NAME_MAX]),
            "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        }
        if self.icount != ICOUNT_NONE:
            d["icount"] = self.icount
        return d


def _text(raw: bytes) -> str:
    # C strings: the name ends at the first NUL
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _cstr(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


# ---- the table -------------------------------------------------------------------


class _Reader:
    """Sequential reads of the table through one buffer (the table is
    bounded by QCOW_MAX_SNAPSHOTS_SIZE, so this never grows without end)."""

    CHUNK = 1 << 16

    def __init__(self, file: "File", offset: int) -> None:
        self.file = file
        self.base = offset
        self.buf = b""

    def get(self, offset: int, length: int) -> bytes:
        rel = offset - self.base
        if rel + length > len(self.buf):
            want = max(rel + length, len(self.buf) + self.CHUNK) - len(self.buf)
            self.buf += self.file.pread(self.base + len(self.buf), want)
        return self.buf[rel:rel + length]


def read_table(file: "File", offset: int, nb: int, disk_size: int) -> tuple[list[QCowSnapshot], int]:
    """Parse ``nb`` entries at ``offset`` (qcow2_read_snapshots); returns the
    entries and the table's size in bytes.  Past the end of the file reads
    as zeroes, as QEMU's file protocol does."""
    snaps: list[QCowSnapshot] = []
    if not nb:
        return snaps, 0
    rd = _Reader(file, offset)
    pos = offset
    for i in range(nb):
        pos = -(-pos // 8) * 8
        (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, clock, vm_state,
         extra_size) = SNAPSHOT_HEADER.unpack(rd.get(pos, SNAPSHOT_HEADER.size))
        pos += SNAPSHOT_HEADER.size
        if extra_size > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise SnapshotErrno(27, f"Too much extra metadata in snapshot table entry {i}",
                                "You can force-remove this extra metadata with qemu-img check -r all\n")
        extra = rd.get(pos, extra_size)
        known = extra[:EXTRA_DATA.size].ljust(EXTRA_DATA.size, b"\0")
        large, dsize, icount = EXTRA_DATA.unpack(known)
        sn = QCowSnapshot(l1_off, l1_size, b"", b"", date_sec, date_nsec, clock, vm_state,
                          disk_size, ICOUNT_NONE, extra_size, extra[EXTRA_DATA.size:])
        if extra_size >= 8:
            sn.vm_state_size = large
        if extra_size >= 16:
            sn.disk_size = dsize
        if extra_size >= 24:
            sn.icount = icount
        pos += extra_size
        sn.id_str = _cstr(rd.get(pos, id_len))
        pos += id_len
        sn.name = _cstr(rd.get(pos, name_len))
        pos += name_len
        if pos - offset > QCOW_MAX_SNAPSHOTS_SIZE:
            raise SnapshotErrno(27, "Snapshot table is too big",
                                f"You can force-remove all {nb - i} overhanging snapshots with qemu-img check -r all\n")
        snaps.append(sn)
    return snaps, pos - offset


def encode_table(snaps: list[QCowSnapshot]) -> bytes:
    """The table as qcow2_write_snapshots lays it out: extra data at least
    the 24 known bytes, unknown extra data after them."""
    out = bytearray()
    for sn in snaps:
        out += bytes(-len(out) % 8)
        extra_size = max(EXTRA_DATA.size, sn.extra_data_size)
        vm32 = sn.vm_state_size if sn.vm_state_size <= 0xFFFFFFFF else 0
        out += SNAPSHOT_HEADER.pack(sn.l1_table_offset, sn.l1_size, len(sn.id_str), len(sn.name),
                                    sn.date_sec, sn.date_nsec, sn.vm_clock_nsec, vm32, extra_size)
        out += EXTRA_DATA.pack(sn.vm_state_size, sn.disk_size, sn.icount)
        out += sn.unknown_extra_data[:extra_size - EXTRA_DATA.size].ljust(extra_size - EXTRA_DATA.size, b"\0")
        out += sn.id_str + sn.name
        if len(out) > QCOW_MAX_SNAPSHOTS_SIZE:
            raise SnapshotErrno(27)
    return bytes(out)


def _overlap_check(d: "Qcow2Driver", offset: int, length: int) -> None:
    """qcow2_pre_write_overlap_check before writing new metadata: refuse
    (marking the image corrupt) to write over metadata in use."""
    from qimg.formats.qcow2 import io

    if length <= 0:
        return
    try:
        io.check_overlap(d, offset, length)
    except QimgError:
        raise SnapshotErrno(5) from None
    cb = d.cluster_bits
    first, last = offset >> cb, (offset + length - 1) >> cb

    def hits(start: int, nbytes: int) -> bool:
        return nbytes > 0 and start >> cb <= last and (start + nbytes - 1) >> cb >= first

    name = None
    if hits(d.header.snapshots_offset, d._snapshots_size):
        name = "snapshot table"
    elif any(sn.l1_size <= QCOW_MAX_L1_SIZE // 8 and hits(sn.l1_table_offset, sn.l1_size * 8)
             for sn in d.snapshots):
        name = "inactive L1 table"
    if name is None:
        return
    import sys

    h = d.header
    if not h.incompatible_features & 2 and h.version >= 3:
        d._write_incompat(h.incompatible_features | 2)
        sys.stderr.write(f"qcow2: Marking image as corrupt: Preventing invalid write on metadata "
                         f"(overlaps with {name}); further corruption events will be suppressed\n")
    raise SnapshotErrno(5)


def _free(d: "Qcow2Driver", offset: int, length: int) -> bool:
    """qcow2_free_clusters: a failure is reported and otherwise ignored."""
    try:
        d.refs.free(offset, length)
    except QimgError:
        import sys

        sys.stderr.write("qcow2_free_clusters failed: Invalid argument\n")
        return False
    return True


def write_table(d: "Qcow2Driver", snaps: list[QCowSnapshot], freed: "list[np.ndarray] | None" = None) -> None:
    """Write the whole table to new clusters, point the header at it, then
    free the old one (qcow2_write_snapshots)."""
    data = encode_table(snaps)
    refs = d.refs
    d.flush_metadata()
    # an empty table is stored as offset 0, as qemu-img leaves it
    new_offset = refs.alloc(len(data)) if data else 0
    refs.flush()
    try:
        _overlap_check(d, new_offset, len(data))
    except SnapshotErrno:
        refs.free(new_offset, len(data))
        refs.flush()
        raise
    if data:
        d.file.pwrite(new_offset, data)
    d.file.flush()
    d.file.pwrite(HEADER_NB_SNAPSHOTS, struct.pack(">IQ", len(snaps), new_offset))
    d.file.flush()
    old_offset, old_size = d.header.snapshots_offset, d._snapshots_size
    d.header.nb_snapshots, d.header.snapshots_offset = len(snaps), new_offset
    d._snapshots, d._snapshots_size = snaps, len(data)
    if old_size and _free(d, old_offset, old_size):
        refs.flush()
        if freed is not None:
            freed.append(_range_clusters(d, old_offset, old_size))


# ---- finding ---------------------------------------------------------------------


def find(snaps: list[QCowSnapshot], snapshot_id: str | None, name: str | None) -> int:
    """find_snapshot_by_id_and_name: both must match when both are given."""
    sid = snapshot_id.encode("utf-8", "surrogateescape") if snapshot_id is not None else None
    nm = name.encode("utf-8", "surrogateescape") if name is not None else None
    if sid is None and nm is None:
        return -1
    for i, sn in enumerate(snaps):
        if (sid is None or sn.id_str == sid) and (nm is None or sn.name == nm):
            return i
    return -1


def find_id_or_name(snaps: list[QCowSnapshot], id_or_name: str) -> int:
    i = find(snaps, id_or_name, None)
    return i if i >= 0 else find(snaps, None, id_or_name)


def _strtoul(text: bytes) -> int:
    m = re.match(rb"\s*([+-]?)(\d+)", text)
    if not m:
        return 0
    value = int(m.group(2))
    if value > (1 << 64) - 1:
        return (1 << 64) - 1
    return (-value) % (1 << 64) if m.group(1) == b"-" else value


def _validate_l1(d: "Qcow2Driver", sn: QCowSnapshot) -> None:
    """qcow2_validate_table for a snapshot's L1 table."""
    if sn.l1_size > QCOW_MAX_L1_SIZE // 8:
        raise SnapshotErrno(27, "Snapshot L1 table too large")
    if (INT64_MAX - sn.l1_size * 8 < sn.l1_table_offset) or sn.l1_table_offset % d.cluster_size:
        raise SnapshotErrno(22, "Snapshot L1 table offset invalid")


def _read_l1(d: "Qcow2Driver", offset: int, size: int) -> "np.ndarray":
    import numpy as np

    return np.frombuffer(d.file.pread(offset, size * 8), dtype=">u8").astype(np.uint64)


# ---- references ------------------------------------------------------------------


def _refcounts_of(refs: Any, idx: "np.ndarray") -> "np.ndarray":
    """Refcounts of the (sorted, unique) cluster indices ``idx``, one
    refcount block at a time."""
    import numpy as np

    out = np.zeros(len(idx), dtype=np.uint64)
    if not len(idx):
        return out
    bb = refs.block_bits
    blocks = idx >> np.uint64(bb)
    cuts = np.flatnonzero(np.diff(blocks)) + 1
    for lo, hi in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [len(idx)]))):
        b = int(blocks[lo])
        rc = refs.get_range(b << bb, 1 << bb)
        out[lo:hi] = rc[(idx[lo:hi] & np.uint64((1 << bb) - 1)).astype(np.int64)]
    return out


def _add_refs(d: "Qcow2Driver", idx: "np.ndarray", counts: "np.ndarray", addend: int) -> "np.ndarray":
    """Add ``addend * count`` to each cluster, checking every result first so
    a refused update changes nothing (QEMU: -EINVAL).  Returns the clusters
    left unreferenced."""
    import numpy as np

    from qimg.formats.qcow2.refcount import _Again

    refs = d.refs
    tables = np.unique(idx >> np.uint64(refs.block_bits)).astype(np.int64)
    in_table = tables < len(refs.table)
    have = np.zeros(len(tables), dtype=bool)
    have[in_table] = (refs.table[tables[in_table]] & np.uint64(0xFFFFFFFFFFFFFE00)) != 0
    if not have.all():
        # QEMU places the refcount block and fails with -EAGAIN here
        raise SnapshotErrno(11)
    cur = _refcounts_of(refs, idx).astype(np.int64)
    new = cur + counts.astype(np.int64) * addend
    if len(new) and ((new < 0).any() or (new > refs.max).any()):
        raise SnapshotErrno(22)
    cb = d.cluster_bits
    for c in np.unique(counts):
        sel = idx[counts == c].astype(np.int64)
        cuts = np.flatnonzero(np.diff(sel) != 1) + 1
        for run in np.split(sel, cuts):
            while True:
                try:
                    refs.update(int(run[0]) << cb, len(run) << cb, int(c) * addend)
                    break
                except _Again:
                    # a new refcount block was placed: the same update again
                    continue
    return idx[new == 0]


def _corrupt(d: "Qcow2Driver", message: str) -> None:
    """qcow2_signal_corruption: mark the image corrupt, say why, fail with EIO."""
    d.report_corruption(message)
    raise SnapshotErrno(5)


def _compressed_clusters(entries: "np.ndarray", cb: int, keep: bool = False) -> list:
    """Host clusters each compressed descriptor's bytes touch (one, two or
    three per descriptor: a reference for each, as QEMU counts them)."""
    import numpy as np

    from qimg.formats.qcow2.compress import descriptor_layout

    shift, mask, off_mask = descriptor_layout(cb)
    u64 = np.uint64
    host = entries & u64(off_mask)
    size = (((entries >> u64(shift)) & u64(mask)) + u64(1)) * u64(512) - (host & u64(511))
    first = host >> u64(cb)
    last = (host + size - u64(1)) >> u64(cb)
    out: list = [first]
    for k in (1, 2):
        sel = first + u64(k) <= last
        # with ``keep``: (clusters, which descriptors they belong to)
        out.append((first[sel] + u64(k), sel) if keep else first[sel] + u64(k))
    return out


def _first_refused(d: "Qcow2Driver", cl: "np.ndarray", addend: int) -> tuple[int, int] | None:
    """(index, errno) of the first update in ``cl`` (one cluster each, in
    order) that QEMU refuses: a cluster without a refcount block (EAGAIN,
    after QEMU placed one) or a refcount out of range (EINVAL); or None."""
    import numpy as np

    if not len(cl):
        return None
    refs = d.refs
    ti = (cl >> np.uint64(refs.block_bits)).astype(np.int64)
    inside = ti < len(refs.table)
    missing = ~inside
    missing[inside] = (refs.table[ti[inside]] & np.uint64(0xFFFFFFFFFFFFFE00)) == 0
    uniq, inv = np.unique(cl, return_inverse=True)
    cur = _refcounts_of(refs, uniq).astype(np.int64)
    order = np.argsort(inv, kind="stable")
    grouped = inv[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.empty(len(cl), dtype=np.int64)
    rank[order] = np.arange(len(order)) - group_start + 1
    new = cur[inv] + rank * addend
    bad = (new < 0) | (new > refs.max) | missing
    if not bad.any():
        return None
    first = int(np.argmax(bad))
    return first, 11 if missing[first] else 22


def _set_copied(d: "Qcow2Driver", off: int, limit: int) -> None:
    """QCOW_OFLAG_COPIED on the first ``limit`` entries of an L2 table:
    set exactly where the cluster's refcount is 1."""
    import numpy as np

    from qimg.formats.qcow2 import cluster as C

    u64 = np.uint64
    copied = u64(C.QCOW_OFLAG_COPIED)
    m = d.map
    tab = m.l2_table(off)
    part = tab[:limit]
    kinds = C.classify(part)
    want = part & ~copied
    pi = np.flatnonzero((kinds == C.NORMAL) | (kinds == C.ZERO_ALLOC))
    if len(pi):
        hosts = (part[pi] & u64(C.L2E_OFFSET_MASK)) >> u64(d.cluster_bits)
        uniq, inv = np.unique(hosts, return_inverse=True)
        rc = _refcounts_of(d.refs, uniq)[inv]
        want[pi[rc == 1]] |= copied
    if not np.array_equal(want, part):
        tab[:limit] = want
        m.mark_dirty(off)


def update_snapshot_refcount(d: "Qcow2Driver", l1: "np.ndarray", addend: int,
                             freed: "list[np.ndarray] | None" = None) -> "np.ndarray":
    """Add ``addend`` (+1, -1 or 0) to the refcount of every cluster ``l1``
    reaches, then set QCOW_OFLAG_COPIED exactly where a refcount is 1, in
    the L2 tables (through the driver's L2 cache) and in the returned copy
    of ``l1`` (qcow2_update_snapshot_refcount).  Clusters left unreferenced
    are not written to again and are added to ``freed``."""
    import numpy as np

    from qimg.formats.qcow2 import cluster as C

    cb, cs = d.cluster_bits, d.cluster_size
    m = d.map
    u64 = np.uint64
    copied = u64(C.QCOW_OFLAG_COPIED)
    l1 = l1.copy()
    used = np.flatnonzero(l1 & u64(C.L1E_OFFSET_MASK))
    l2_offsets = (l1[used] & u64(C.L1E_OFFSET_MASK))
    bad = np.flatnonzero((l2_offsets & u64(cs - 1)) != 0)
    if len(bad):
        _corrupt(d, f"L2 table offset {hx(int(l2_offsets[bad[0]]))} unaligned (L1 index: {hx(int(used[bad[0]]))})")
    if addend:
        # QEMU's order of reference updates: each L2 table's entries, then
        # the table itself; a refused update stops there, keeping the ones
        # before it (and their flags), as qemu-img leaves the image.
        ev_cl, ev_call = [], []
        for t, off in enumerate(l2_offsets.tolist()):
            tab = m.l2_table(off)
            kinds = C.classify(tab)
            pi = np.flatnonzero((kinds == C.NORMAL) | (kinds == C.ZERO_ALLOC))
            plain = tab[pi] & u64(C.L2E_OFFSET_MASK)
            bad = np.flatnonzero((plain & u64(cs - 1)) != 0)
            if len(bad):
                _corrupt(d, f"Cluster allocation offset {hx(int(plain[bad[0]]))} unaligned "
                            f"(L2 offset: {hx(off)}, L2 index: {hx(int(pi[bad[0]]))})")
            js, cls = [pi], [plain >> u64(cb)]
            ci = np.flatnonzero(kinds == C.COMPRESSED)
            if len(ci):
                first, *more = _compressed_clusters(tab[ci], cb, keep=True)
                js.append(ci)
                cls.append(first)
                for extra in more:
                    js.append(ci[extra[1]])
                    cls.append(extra[0])
            j = np.concatenate(js).astype(np.int64)
            c = np.concatenate(cls).astype(u64)
            order = np.argsort(j, kind="stable")
            ev_call.append(t * (m.l2_size + 1) + np.append(j[order], m.l2_size))
            ev_cl.append(np.append(c[order], u64(off >> cb)))
        cl = np.concatenate(ev_cl).astype(u64) if ev_cl else np.zeros(0, dtype=u64)
        call = np.concatenate(ev_call) if ev_call else np.zeros(0, dtype=np.int64)
        fail = _first_refused(d, cl, addend)
        limit = None
        if fail is not None:
            fail_call = int(call[fail[0]])
            cl = cl[call < fail_call]
            limit = divmod(fail_call, m.l2_size + 1)
        idx, counts = np.unique(cl, return_counts=True)
        gone = _add_refs(d, idx, counts, addend)
        if freed is not None:
            freed.append(gone)
        if limit is not None:
            t_fail, j_fail = limit
            for t, off in enumerate(l2_offsets.tolist()[:t_fail + 1]):
                _set_copied(d, off, j_fail if t == t_fail else m.l2_size)
            d.flush_metadata()
            raise SnapshotErrno(fail[1])
    # QCOW_OFLAG_COPIED from the new refcounts
    l2_rc = _refcounts_of(d.refs, np.unique(l2_offsets >> u64(cb)))
    l2_rc_map = dict(zip(np.unique(l2_offsets >> u64(cb)).tolist(), l2_rc.tolist()))
    for off in l2_offsets.tolist():
        if l2_rc_map[off >> cb] == 0:
            continue  # freed: nothing more to write there
        _set_copied(d, off, m.l2_size)
    rcs = np.array([l2_rc_map[int(o) >> cb] for o in l2_offsets.tolist()], dtype=u64)
    l1[used] = np.where(rcs == 1, l2_offsets | copied, l2_offsets)
    return l1


def _range_clusters(d: "Qcow2Driver", offset: int, length: int) -> "np.ndarray":
    import numpy as np

    if length <= 0:
        return np.zeros(0, dtype=np.uint64)
    cb = d.cluster_bits
    return np.arange(offset >> cb, ((offset + length - 1) >> cb) + 1, dtype=np.uint64)


def _discard(d: "Qcow2Driver", freed: "list[np.ndarray]") -> None:
    """Punch the clusters these operations freed, as QEMU passes discards of
    snapshot metadata and data down to the file (pass-discard-snapshot is
    on by default); only those still unreferenced once all is written."""
    import numpy as np

    if not freed:
        return
    d.flush_metadata()
    idx = np.unique(np.concatenate(freed).astype(np.uint64))
    idx = idx[_refcounts_of(d.refs, idx) == 0].astype(np.int64)
    cb = d.cluster_bits
    size = d.file.size
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1
    for run in np.split(idx, cuts):
        if len(run):
            start = int(run[0]) << cb
            end = min((int(run[-1]) + 1) << cb, size)
            if end > start:
                d.file.write_zeroes(start, end - start)


# ---- operations --------------------------------------------------------------------


def create(d: "Qcow2Driver", name: str, date_sec: int, date_nsec: int,
           vm_clock_nsec: int = 0, icount: int = 0) -> None:
    """qcow2_snapshot_create for a disk-only snapshot (vm_state_size 0)."""
    snaps = list(d.snapshots)
    if len(snaps) >= QCOW_MAX_SNAPSHOTS:
        raise SnapshotErrno(27)
    new_id = max((_strtoul(s.id_str) for s in snaps), default=0) + 1
    d.flush_metadata()
    m, refs = d.map, d.refs
    l1 = m.l1.copy()
    sn = QCowSnapshot(0, len(l1), str(new_id).encode()[:ID_STR_MAX],
                      name.encode("utf-8", "surrogateescape")[:NAME_MAX],
                      date_sec, date_nsec, vm_clock_nsec, 0, d.size, icount)
    # The copy keeps the flags it had: QEMU copies before updating them.
    sn.l1_table_offset = refs.alloc(len(l1) * 8) if len(l1) else refs.alloc_noref(0)
    refs.flush()
    _overlap_check(d, sn.l1_table_offset, len(l1) * 8)
    d.file.pwrite(sn.l1_table_offset, l1.astype(">u8").tobytes())
    new_l1 = update_snapshot_refcount(d, l1, 1)
    _set_active_l1(d, new_l1)
    d.flush_metadata()
    d.file.flush()
    snaps.append(sn)
    freed: list = []
    write_table(d, snaps, freed)
    _discard(d, freed)


def _set_active_l1(d: "Qcow2Driver", l1: "np.ndarray") -> None:
    import numpy as np

    m = d.map
    changed = np.flatnonzero(m.l1 != l1)
    m.l1[:] = l1
    m.l1_dirty.update(changed.tolist())


def goto(d: "Qcow2Driver", id_or_name: str) -> None:
    """qcow2_snapshot_goto: the active L1 becomes a copy of the snapshot's."""
    import numpy as np

    snaps = d.snapshots
    i = find_id_or_name(snaps, id_or_name)
    if i < 0:
        raise SnapshotErrno(2)
    sn = snaps[i]
    try:
        _validate_l1(d, sn)
    except SnapshotErrno as e:
        raise SnapshotErrno(e.errno, e.message + "\n" + os.strerror(e.errno)) from None
    if sn.disk_size != d.size:
        # QEMU resizes the image to the snapshot's size first (exact, may shrink)
        try:
            d.truncate(sn.disk_size, "off", True)
        except SnapshotErrno:
            raise
        except QimgError as e:
            err = getattr(e, "errno", 22)
            raise SnapshotErrno(err, e.message + "\n" + os.strerror(err)) from None
    d.flush_metadata()
    from qimg.formats.qcow2 import io

    io.grow_l1(d, sn.l1_size)
    m = d.map
    sn_l1 = np.zeros(len(m.l1), dtype=np.uint64)
    sn_l1[:sn.l1_size] = _read_l1(d, sn.l1_table_offset, sn.l1_size)
    own = update_snapshot_refcount(d, sn_l1[:sn.l1_size], 1)
    d.flush_metadata()
    if not np.array_equal(own, sn_l1[:sn.l1_size]):
        d.file.pwrite(sn.l1_table_offset, own.astype(">u8").tobytes())
    # New references are counted; now switch, then drop the old ones.
    d.file.pwrite(m.l1_offset, sn_l1.astype(">u8").tobytes())
    d.file.flush()
    old = m.l1.copy()
    m.l1[:] = sn_l1
    m.l1_dirty.clear()
    freed: list = []
    update_snapshot_refcount(d, old, -1, freed)
    d.flush_metadata()
    _set_active_l1(d, update_snapshot_refcount(d, m.l1, 0))
    d.flush_metadata()
    _discard(d, freed)
    d.file.flush()


def delete(d: "Qcow2Driver", snapshot_id: str | None, name: str | None) -> None:
    """qcow2_snapshot_delete: out of the table first, then its references."""
    snaps = list(d.snapshots)
    i = find(snaps, snapshot_id, name)
    if i < 0:
        raise SnapshotErrno(2, "Can't find the snapshot")
    sn = snaps.pop(i)
    _validate_l1(d, sn)
    d.flush_metadata()
    freed: list = []
    _phase("Failed to remove snapshot from snapshot list", write_table, d, snaps, freed)
    old = _read_l1(d, sn.l1_table_offset, sn.l1_size)
    _phase("Failed to free the cluster and L1 table", update_snapshot_refcount, d, old, -1, freed)
    d.flush_metadata()
    if sn.l1_size and _free(d, sn.l1_table_offset, sn.l1_size * 8):
        freed.append(_range_clusters(d, sn.l1_table_offset, sn.l1_size * 8))
    _set_active_l1(d, _phase("Failed to update snapshot status in disk", update_snapshot_refcount, d, d.map.l1, 0))
    d.flush_metadata()
    _discard(d, freed)
    d.file.flush()


def _phase(what: str, fn: Any, *a: Any) -> Any:
    """Run one step of a deletion; its errno failure is reported as QEMU's
    error_setg_errno(what) does."""
    try:
        return fn(*a)
    except SnapshotErrno as e:
        raise SnapshotErrno(e.errno, f"{what}: {os.strerror(e.errno)}") from None


def load_tmp(d: "Qcow2Driver", snapshot_id: str | None, name: str | None) -> None:
    """qcow2_snapshot_load_tmp: read the snapshot's L1 in place of the
    active one (read-only opens only)."""
    from qimg.formats.qcow2.cluster import ClusterMap

    if not d.read_only:
        raise QimgError("Device is not readonly")
    snaps = d.snapshots
    i = find(snaps, snapshot_id, name)
    if i < 0:
        raise SnapshotErrno(2, "Can't find snapshot")
    sn = snaps[i]
    _validate_l1(d, sn)
    d._map = ClusterMap(d.file, d.cluster_bits, sn.l1_table_offset, sn.l1_size, d.header.extended_l2)
