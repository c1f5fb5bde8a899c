"""``rebase``: give an image a new backing file (qemu-img.c img_rebase).

Safe mode keeps what the guest sees: every range the overlay does not
allocate itself reads from the backing chain, so where the old and the new
backing files differ the old data is copied into the overlay first, and the
backing name is rewritten last, in one header write.  A crash before that
write leaves the overlay over its old backing with the same content; after
it, over the new one.  Unsafe mode only rewrites the name.

The comparison goes in qemu-img's 2 MiB requests, so that the same sector
runs are written as qemu-img writes them; block status decides what is read
(zero runs are not, plain data comes straight from its file into reused
buffers) and numpy compares whole buffers in 64-bit words, then splits the
differing ones into 512-byte sectors.  (A reader thread overlapping reads
with writes was tried and gave nothing: the qcow2 write path holds the GIL.)
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

from qimg.block.image import Image, open_image, resolve_backing
from qimg.block.status import COMPRESSED, OFFSET_VALID
from qimg.errors import QimgError, UnsupportedError
from qimg.ops.progress import FloatAccumulator, f32
from qimg.record import dataclass

#: qemu-img's IO_BUF_SIZE: the request size of the comparison
IO_BUF_SIZE = 2 << 20
SECTOR = 512

#: driver names qemu-img 7.2 knows besides ours (bdrv_find_format), so that
#: -F accepts what qemu-img accepts
QEMU_FORMATS = frozenset((
    "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write",
    "copy-on-read", "dmg", "file", "ftp", "ftps", "host_cdrom", "host_device", "http", "https",
    "luks", "nbd", "null-aio", "null-co", "nvme", "preallocate", "quorum", "raw", "replication",
    "snapshot-access", "throttle", "vhdx", "vmdk", "vpc", "vvfat", "qcow", "qcow2", "qed", "vdi",
    "parallels", "iscsi", "rbd", "ssh", "gluster", "nfs",
))


def check_format_name(fmt: str) -> None:
    from qimg.formats import format_names

    if fmt not in QEMU_FORMATS and fmt not in format_names():
        raise QimgError(f"Invalid format name: '{fmt}'")


@dataclass
class RebasePlan:
    """The images a safe rebase compares (qemu's blk_old_backing,
    blk_new_backing and prefix_chain_bs)."""

    old: Image | None
    new: Image | None
    #: the new backing file is already in the chain below: only what lies
    #: above it in the old chain can differ
    prefix: Image | None = None
    #: ``new`` was opened here and is closed here
    owns_new: bool = False


def has_protocol(name: str) -> bool:
    """path_has_protocol: a "proto:" prefix before any slash."""
    return ":" in name.split("/", 1)[0]


def _realpath(path: str) -> str | None:
    return os.path.realpath(path) if os.path.exists(path) else None


def find_backing_image(top: Image, name: str) -> Image | None:
    """The image in ``top``'s chain (``top`` excluded) that ``name`` names,
    as bdrv_find_backing_image: a relative ``name`` is taken relative to
    each overlay's directory in turn and compared, canonicalised, with that
    overlay's backing file; names with a protocol compare as strings."""
    curr = top
    while curr.backing is not None:
        below = curr.backing
        stored = curr.driver.backing_filename or ""
        if has_protocol(name) or has_protocol(stored):
            if name in (stored, resolve_backing(curr.filename, stored)):
                return below
        else:
            mine = _realpath(resolve_backing(curr.filename, name))
            theirs = _realpath(resolve_backing(curr.filename, stored)) if stored else None
            if mine is not None and mine == theirs:
                return below
        curr = below
    return None


def plan_safe(top: Image, backing: str, backing_fmt: str | None) -> RebasePlan:
    """Open (or find in the chain) the new backing file; errors as qemu-img."""
    plan = RebasePlan(old=top.backing, new=None)
    if not backing:
        return plan
    path = resolve_backing(top.filename, backing)
    found = find_backing_image(top, path)
    if found is not None:
        plan.new = plan.prefix = found
        return plan
    try:
        plan.new = open_image(path, backing_fmt, read_only=True)
    except QimgError as e:
        raise QimgError(f"Could not open new backing file '{backing}': {e.message}", e.code) from None
    plan.owns_new = True
    return plan


def _allocated_above(img: Image | None, base: Image | None, offset: int, length: int) -> tuple[bool, int]:
    """bdrv_is_allocated_above(img, base, include_base=false): (allocated,
    run length).  Past the end of a shorter layer below ``img`` the chain
    reads zeroes that count as allocated there, as in QEMU."""
    n = length
    p = img
    while p is not None and p is not base:
        if offset >= p.size:
            return p is not img, n
        ext = p.block_status(offset, n)
        if ext.allocated:
            return True, ext.length
        if ext.length > 0:
            n = min(n, ext.length)
        p = p.backing
    return False, n


#: formats whose plain data extents may be read straight from their file
_DIRECT_FORMATS = ("raw", "qcow2")


def _fill(img: Image, offset: int, n: int, buf: bytearray, zeroes: memoryview, what: str) -> memoryview:
    """The chain's bytes at [offset, offset+n) in ``buf`` (reused between
    requests), guided by block status: zero runs are not read at all and
    plain data is read straight from the file that holds it.  A range that
    is all zeroes returns a view of ``zeroes`` instead."""
    view = memoryview(buf)[:n]
    pos = 0
    try:
        while pos < n:
            ext, depth = img.chain_status(offset + pos, n - pos)
            ln = min(max(ext.length, 1), n - pos)
            if ext.zero:
                if ln == n:
                    return zeroes[:n]
                view[pos:pos + ln] = zeroes[:ln]
            else:
                layer = img
                for _ in range(depth):
                    assert layer.backing is not None
                    layer = layer.backing
                node = layer.driver.data_node
                if (ext.flags & (OFFSET_VALID | COMPRESSED) == OFFSET_VALID and layer.format in _DIRECT_FORMATS
                        and ext.host_offset is not None and ext.file == node.filename):
                    got = node.preadinto(ext.host_offset, view[pos:pos + ln])
                    if got < ln:  # past the end of the file: zeroes
                        view[pos + got:pos + ln] = zeroes[:ln - got]
                else:
                    view[pos:pos + ln] = img.read(offset + pos, ln)
            pos += ln
    except QimgError:
        raise QimgError(f"error while reading from {what} backing file") from None
    return view


def _differing_runs(old: bytes | memoryview, new: bytes | memoryview) -> list[tuple[int, int]]:
    """(start, end) byte runs of 512-byte sectors that differ, as
    compare_buffers() splits a buffer (the last sector may be short)."""
    import numpy as np

    n = len(old)
    if old is new:
        return []
    nsec = -(-n // SECTOR)
    if n % SECTOR:
        # Pad the short last sector (rare: only at an odd-sized end).
        old = bytes(old) + bytes(nsec * SECTOR - n)
        new = bytes(new) + bytes(nsec * SECTOR - n)
    # Compared as 64-bit words (eight times fewer elements).  A sector's 64
    # word flags are 8 bytes x 8: OR-ing eight uint64 columns tells which
    # sectors differ without a slow reduction along a short axis.
    words = np.frombuffer(old, np.uint64) != np.frombuffer(new, np.uint64)
    cols = words.view(np.uint64).reshape(nsec, 8)
    acc = cols[:, 0].copy()
    for k in range(1, 8):
        acc |= cols[:, k]
    diff = acc != 0
    edges = np.flatnonzero(diff[1:] != diff[:-1]) + 1
    if not len(edges) and not diff[0]:
        return []
    bounds = [0, *edges.tolist(), nsec]
    first_differs = bool(diff[0])
    return [(s * SECTOR, min(e * SECTOR, n))
            for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])) if (i % 2 == 0) == first_differs]


@dataclass
class _Work:
    """One request that needs writes: where, and the runs to write."""

    offset: int
    old_zero: bool
    old_buf: memoryview
    runs: list[tuple[int, int]]


def _requests(top: Image, plan: RebasePlan) -> Iterator[_Work]:
    """img_rebase's loop without the writes: for each request that is not
    skipped, the sector runs where the old and new backing files differ.
    The buffers are reused: a request's writes are done before the next."""
    size = top.size
    old_size = plan.old.size if plan.old is not None else 0
    new_size = plan.new.size if plan.new is not None else 0
    zeroes = memoryview(bytes(min(size, IO_BUF_SIZE)))
    old_mem = bytearray(min(size, IO_BUF_SIZE))
    new_mem = bytearray(min(size, IO_BUF_SIZE))
    offset = 0
    while offset < size:
        n = min(IO_BUF_SIZE, size - offset)
        ext = top.block_status(offset, n)
        n = ext.length
        if ext.allocated:
            offset += n
            continue
        if plan.prefix is not None:
            allocated, n = _allocated_above(plan.old, plan.prefix, offset, n)
            if not allocated:
                offset += n
                continue
        old_zero = offset >= old_size
        if not old_zero:
            n = min(n, old_size - offset)
        if offset < new_size and plan.new is not None:
            n = min(n, new_size - offset)
        # Ranges whose block status says zero are not read (same bytes).
        if old_zero:
            old_buf = zeroes[:n]
        else:
            assert plan.old is not None
            old_buf = _fill(plan.old, offset, n, old_mem, zeroes, "old")
        if offset >= new_size or plan.new is None:
            new_buf = zeroes[:n]
        else:
            new_buf = _fill(plan.new, offset, n, new_mem, zeroes, "new")
        yield _Work(offset, old_zero, old_buf, _differing_runs(old_buf, new_buf))
        offset += n


def copy_differences(top: Image, plan: RebasePlan, progress: Callable[[float], None] | None = None) -> None:
    """Copy into ``top`` the old backing data wherever it differs from the
    new backing and ``top`` does not allocate the range itself."""
    size = top.size
    step = f32(100 / f32(size // min(size, IO_BUF_SIZE))) if size else 0.0
    acc = FloatAccumulator()
    works = _requests(top, plan)
    for work in works:
        for s, e in work.runs:
            try:
                if work.old_zero:
                    top.write_zeroes(work.offset + s, e - s)
                else:
                    top.write(work.offset + s, work.old_buf[s:e])
            except QimgError as err:
                raise QimgError(f"Error while writing to COW image: {err.message}") from None
        if progress is not None:
            progress(acc.add(step))


def change_backing(top: Image, backing: str | None, backing_fmt: str | None, require_format: bool) -> None:
    """bdrv_change_backing_file with img_rebase's messages."""
    name = backing or None
    fmt = backing_fmt if name else None
    shown = backing if backing is not None else "(null)"
    if require_format and name and not fmt:
        raise QimgError(f"Could not change the backing file to '{shown}': backing format must be specified")
    try:
        top.driver.change_backing_file(name, fmt)
    except UnsupportedError:
        raise QimgError(f"Could not change the backing file to '{shown}': Operation not supported") from None
    except QimgError as e:
        raise QimgError(f"Could not change the backing file to '{shown}': {e.message}") from None


def rebase(
    top: Image,
    backing: str | None,
    backing_fmt: str | None = None,
    unsafe: bool = False,
    progress: Callable[[float], None] | None = None,
) -> None:
    """Rebase the open image ``top`` (read-write; opened without its backing
    chain in unsafe mode) onto ``backing`` ("" or None: no backing file)."""
    if backing_fmt is not None:
        check_format_name(backing_fmt)
    if not unsafe:
        plan = plan_safe(top, backing or "", backing_fmt)
        try:
            copy_differences(top, plan, progress)
            top.flush()
        finally:
            if plan.owns_new and plan.new is not None:
                plan.new.close()
    # The data the new backing file lacks is in place (and flushed): now the
    # name, in one write.  qemu-img ends the progress line at 100% even when
    # this fails.
    try:
        change_backing(top, backing, backing_fmt, require_format=bool(backing))
    finally:
        if progress is not None:
            progress(100.0)
