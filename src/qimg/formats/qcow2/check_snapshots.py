"""The snapshot table as qemu-img check reads and repairs it
(block/qcow2-snapshot.c: qcow2_check_read_snapshot_table,
qcow2_check_fix_snapshot_table).

Reading in check mode reports what a normal open refuses, and with
``-r all`` repairs what it can, as QEMU does:

- more than 65536 entries: the overhang is dropped, and the header's count
  is rewritten at once (the dropped entries' clusters become leaks that the
  refcount pass repairs);
- an entry with more than 1 KiB of extra data: the extra data is cut to
  1 KiB;
- a table past 64 MiB: the entries from the one that crosses it are dropped;
- a version 3 entry with less than 16 bytes of extra data is incomplete.

Dropped extra data and incomplete entries are corruptions fixed by writing
the whole table anew (snapshot.write_table), after the refcount pass has
made the refcounts trustworthy for the allocation.

Every read is bounded: at most 65536 entries, each read through a window
of the file, and the table stops at 64 MiB.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING

from qimg.block.check import CheckResult
from qimg.errors import QimgError
from qimg.formats.qcow2.snapshot import (
    EXTRA_DATA,
    HEADER_NB_SNAPSHOTS,
    ICOUNT_NONE,
    QCOW_MAX_SNAPSHOT_EXTRA_DATA,
    QCOW_MAX_SNAPSHOTS,
    QCOW_MAX_SNAPSHOTS_SIZE,
    SNAPSHOT_HEADER,
    QCowSnapshot,
)

if TYPE_CHECKING:
    from qimg.formats.qcow2.check import Qcow2Checker
    from qimg.protocols.file import File

INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1
#: extra data a version 3 entry must have (vm_state_size_large, disk_size)
V3_MIN_EXTRA = 16


class ReadFailed(Exception):
    """qcow2_do_read_snapshots failed: errno, message and hint."""

    def __init__(self, err: int, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.errno = err
        self.message = message
        self.hint = hint


class _Window:
    """Reads through a 64 KiB window that moves to where it is asked for, so
    that a huge skip (an entry's claimed extra data) reads nothing."""

    SIZE = 1 << 16

    def __init__(self, file: "File") -> None:
        self.file = file
        self.start = 0
        self.buf = b""

    def get(self, offset: int, length: int) -> bytes:
        from qimg.formats.qcow2.check import io_ok

        if not length:
            return b""
        if not io_ok(offset, length):
            raise ReadFailed(5, f"Failed to read snapshot table: {os.strerror(5)}")
        if not (self.start <= offset and offset + length <= self.start + len(self.buf)):
            self.start = offset
            self.buf = self.file.pread(offset, max(length, self.SIZE))
        rel = offset - self.start
        return self.buf[rel:rel + length]


def _int(value: int) -> int:
    """As a C int holds it: QEMU counts overhanging snapshots in one, and
    prints what wraps."""
    return (value + (1 << 31)) % (1 << 32) - (1 << 31)


def _cstr(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


def read_table(file: "File", offset: int, nb: int, disk_size: int, repair: bool,
               report: "callable") -> tuple[list[QCowSnapshot], int, int, int]:
    """qcow2_do_read_snapshots: (entries, table size, entries dropped for a
    table too big, entries whose extra data was cut).  Raises ReadFailed."""
    snaps: list[QCowSnapshot] = []
    rd = _Window(file)
    pos = offset
    length = 0  # the table's length as it will be written (cut extra data)
    reduced = dropped = 0
    for i in range(nb):
        before = pos
        length = -(-length // 8) * 8
        pos = -(-pos // 8) * 8
        (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, clock, vm_state,
         extra_size) = SNAPSHOT_HEADER.unpack(rd.get(pos, SNAPSHOT_HEADER.size))
        pos += SNAPSHOT_HEADER.size
        cut = False
        if extra_size > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            if not repair:
                raise ReadFailed(27, f"Too much extra metadata in snapshot table entry {i}",
                                 "You can force-remove this extra metadata with qemu-img check -r all\n")
            report(f"Discarding too much extra metadata in snapshot table entry {i} "
                   f"({extra_size} > {QCOW_MAX_SNAPSHOT_EXTRA_DATA})")
            dropped += 1
            cut = True
        known = rd.get(pos, min(EXTRA_DATA.size, extra_size))
        pos += len(known)
        large, dsize, icount = EXTRA_DATA.unpack(known.ljust(EXTRA_DATA.size, b"\0"))
        sn = QCowSnapshot(l1_off, l1_size, b"", b"", date_sec, date_nsec, clock, vm_state, disk_size,
                          ICOUNT_NONE, extra_size)
        if extra_size >= 8:
            sn.vm_state_size = large
        if extra_size >= 16:
            sn.disk_size = dsize
        if extra_size >= 24:
            sn.icount = icount
        if extra_size > EXTRA_DATA.size:
            extra_end = pos + extra_size - EXTRA_DATA.size
            if cut:
                sn.extra_data_size = QCOW_MAX_SNAPSHOT_EXTRA_DATA
            sn.unknown_extra_data = rd.get(pos, sn.extra_data_size - EXTRA_DATA.size)
            pos = extra_end
        sn.id_str = _cstr(rd.get(pos, id_len))
        pos += id_len
        sn.name = _cstr(rd.get(pos, name_len))
        pos += name_len
        length += SNAPSHOT_HEADER.size + sn.extra_data_size + id_len + name_len
        if length > QCOW_MAX_SNAPSHOTS_SIZE or pos - offset > INT_MAX:
            if not repair:
                raise ReadFailed(27, "Snapshot table is too big",
                                 f"You can force-remove all {nb - i} overhanging snapshots with "
                                 "qemu-img check -r all\n")
            report(f"Discarding {nb - i} overhanging snapshots (snapshot table is too big)")
            reduced += nb - i
            pos = before
            break
        snaps.append(sn)
    return snaps, pos - offset, reduced, dropped


def check_read(checker: "Qcow2Checker", res: CheckResult, fix_errors: bool) -> list[QCowSnapshot]:
    """qcow2_check_read_snapshot_table: the entries, with the findings in
    ``res``; raises the checker's failure (after reporting) where QEMU's
    check stops."""
    from qimg.formats.qcow2.check import _CheckFailed

    h = checker.header
    nb = h.nb_snapshots
    offset = checker.snapshots_offset
    reduced = 0
    if nb > QCOW_MAX_SNAPSHOTS and fix_errors:
        checker.report(f"Discarding {nb - QCOW_MAX_SNAPSHOTS} overhanging snapshots")
        reduced = _int(nb - QCOW_MAX_SNAPSHOTS)
        nb = QCOW_MAX_SNAPSHOTS
    # qcow2_validate_table
    err = None
    if nb > QCOW_MAX_SNAPSHOTS:
        err, what = 27, "too large"
    elif INT64_MAX - nb * SNAPSHOT_HEADER.size < offset or offset & (checker.cs - 1):
        err, what = 22, "offset invalid"
    if err is not None:
        res.check_errors += 1
        checker.error_report(f"ERROR snapshot table {what}")
        if nb > QCOW_MAX_SNAPSHOTS:
            checker.report(f"You can force-remove all {nb - QCOW_MAX_SNAPSHOTS} overhanging snapshots "
                           "with qemu-img check -r all")
        checker.snapshots_offset = 0
        raise _CheckFailed(err)
    try:
        snaps, size, cut_off, dropped = read_table(checker.file, offset, nb, h.size, fix_errors, checker.report)
    except ReadFailed as e:
        res.check_errors += 1
        checker.error_report(f"ERROR failed to read the snapshot table: {e.message}")
        if e.hint:
            checker.report(e.hint.rstrip("\n"))
        checker.snapshots_offset = 0
        raise _CheckFailed(e.errno) from None
    reduced = _int(reduced + cut_off)
    res.corruptions = _int(res.corruptions + reduced + dropped)
    if reduced:
        try:
            checker.file.pwrite(HEADER_NB_SNAPSHOTS, struct.pack(">I", len(snaps)))
            checker.file.flush()
        except OSError as e:
            res.check_errors += 1
            checker.report("ERROR failed to update the snapshot count in the image header: "
                           f"{os.strerror(e.errno or 5)}")
            raise _CheckFailed(e.errno or 5) from None
        checker.wrote = True
        h.nb_snapshots = len(snaps)
        res.corruptions_fixed = _int(res.corruptions_fixed + reduced)
        res.corruptions = _int(res.corruptions - reduced)
    if h.version >= 3:
        word = "Repairing" if fix_errors else "ERROR"
        for i, sn in enumerate(snaps):
            if sn.extra_data_size < V3_MIN_EXTRA:
                res.corruptions += 1
                checker.report(f"{word} snapshot table entry {i} is incomplete")
    checker.snapshots_size = size
    return snaps


def check_fix(checker: "Qcow2Checker", res: CheckResult, snaps: list[QCowSnapshot], fix_errors: bool) -> None:
    """qcow2_check_fix_snapshot_table: write the table anew when reading it
    found corruptions and -r all asks for repairs."""
    from qimg.formats.qcow2.check import _CheckFailed

    if not (res.corruptions and fix_errors):
        return
    d = checker.driver
    # the driver opened in check mode never read the table: give it the
    # one the check read, as QEMU's state holds it
    d._snapshots, d._snapshots_size = snaps, checker.snapshots_size
    d.header.nb_snapshots, d.header.snapshots_offset = len(snaps), checker.snapshots_offset
    try:
        _write_table(d, snaps)
    except QimgError as e:
        err = getattr(e, "errno", 5)
        res.check_errors += 1
        checker.report(f"ERROR failed to update snapshot table: {os.strerror(err)}")
        raise _CheckFailed(err) from None
    d.flush_metadata()
    d.file.flush()
    checker.wrote = True
    res.corruptions_fixed = _int(res.corruptions_fixed + res.corruptions)
    res.corruptions = 0


def _write_table(d: object, snaps: list[QCowSnapshot]) -> None:
    """qcow2_write_snapshots as check -r all meets it: like
    snapshot.write_table, except that when the overlap check refuses the
    new clusters, their allocation stays on disk: QEMU has flushed it, and
    the image it then marks corrupt never writes the release."""
    from qimg.formats.qcow2 import snapshot

    data = snapshot.encode_table(snaps)
    refs = d.refs  # type: ignore[attr-defined]
    d.flush_metadata()  # type: ignore[attr-defined]
    new_offset = refs.alloc(len(data)) if data else 0
    refs.flush()
    snapshot._overlap_check(d, new_offset, len(data))  # type: ignore[arg-type]
    file = d.file  # type: ignore[attr-defined]
    if data:
        file.pwrite(new_offset, data)
    file.flush()
    file.pwrite(HEADER_NB_SNAPSHOTS, struct.pack(">IQ", len(snaps), new_offset))
    file.flush()
    h = d.header  # type: ignore[attr-defined]
    old_offset, old_size = h.snapshots_offset, d._snapshots_size  # type: ignore[attr-defined]
    h.nb_snapshots, h.snapshots_offset = len(snaps), new_offset
    d._snapshots, d._snapshots_size = snaps, len(data)  # type: ignore[attr-defined]
    # the old table's clusters are freed, and those no longer used are
    # discarded whole (pass-discard-snapshot), past the end of file too
    if old_size and snapshot._free(d, old_offset, old_size):  # type: ignore[arg-type]
        refs.flush()
        cb = d.cluster_bits  # type: ignore[attr-defined]
        for cluster in range(old_offset >> cb, ((old_offset + old_size - 1) >> cb) + 1):
            if not refs.get(cluster):
                file.punch_hole(cluster << cb, 1 << cb)
