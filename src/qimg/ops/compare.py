"""``qemu-img compare``: are two images' guest contents equal?  As
img_compare: both images are walked by block status in large chunks; runs
both know to be zero are skipped, runs allocated on one side only must read
as zeroes on the other, the rest is read and compared 512 bytes at a time
so the first mismatch is reported at the sector qemu-img reports."""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Iterator

from qimg.block.image import Image, open_image
from qimg.block.status import ALLOCATED, COMPRESSED, ZERO
from qimg.errors import QimgError
from qimg.ops.bulk import BulkRuns
from qimg.ops.copy import SECTOR, block_status_above, direct_host, read_error
from qimg.ops.progress import FloatAccumulator
from qimg.ops.workers import Workers
from qimg.record import dataclass

#: qemu-img's IO_BUF_SIZE: the most compared at once
CHUNK = 2 << 20

# Exit codes of img_compare.
IDENTICAL, DIFFERENT, OPEN_ERROR, STATUS_ERROR, READ_ERROR = 0, 1, 2, 3, 4


@dataclass
class CompareResult:
    """What compare found: ``identical``; ``offset`` of the first mismatch
    (None when there is none or the sizes differ in strict mode);
    ``message`` is the line qemu-img prints (without newline); ``warning``
    is "Warning: Image size mismatch!" when the sizes differ; ``code`` is
    qemu-img's exit code."""

    identical: bool
    offset: int | None
    message: str
    warning: str | None = None
    code: int = IDENTICAL


class _Mismatch(Exception):
    def __init__(self, offset: int) -> None:
        self.offset = offset


#: zeroes to compare a chunk with (memcmp speed, and no numpy to import)
_ZEROES = bytes(CHUNK)


def _first_nonzero(buf: bytes) -> int:
    """Offset of the first sector holding a non-zero byte, or -1."""
    n = len(buf)
    if n <= CHUNK and buf == _ZEROES[:n]:
        return -1
    import numpy as np

    whole = n // SECTOR * SECTOR
    if whole:
        nz = np.frombuffer(buf, dtype=np.uint64, count=whole // 8).reshape(-1, SECTOR // 8).any(axis=1)
        hit = np.flatnonzero(nz)
        if len(hit):
            return int(hit[0]) * SECTOR
    if whole < n and any(buf[whole:]):
        return whole
    return -1


def _first_difference(a: bytes, b: bytes) -> int:
    """Offset of the first 512-byte sector that differs, or -1."""
    if a == b:
        return -1
    import numpy as np

    n = len(a)
    whole = n // SECTOR * SECTOR
    if whole:
        x = np.frombuffer(a, dtype=np.uint64, count=whole // 8).reshape(-1, SECTOR // 8)
        y = np.frombuffer(b, dtype=np.uint64, count=whole // 8).reshape(-1, SECTOR // 8)
        hit = np.flatnonzero((x != y).any(axis=1))
        if len(hit):
            return int(hit[0]) * SECTOR
    return whole


def _read(img: Image, offset: int, length: int, name: str, host: int | None = None) -> bytes:
    """Guest bytes; ``host``: where they lie in the image's data file."""
    try:
        data = img.read(offset, length) if host is None else img.driver.data_node.pread(host, length)
    except (OSError, QimgError) as e:
        reason = read_error(e)
        if reason is None:
            raise
        raise QimgError(f"Error while reading offset {offset} of {name}: {reason}", READ_ERROR) from None
    return data if len(data) == length else data + bytes(length - len(data))


def _check_empty(img: Image, offset: int, length: int, name: str) -> None:
    idx = _first_nonzero(_read(img, offset, length, name))
    if idx >= 0:
        raise _Mismatch(offset + idx)


def _status(img: Image, offset: int, length: int, name: str) -> tuple[int, int]:
    try:
        flags, pnum = block_status_above(img, offset, length)
    except OSError:
        raise QimgError(f"Sector allocation test failed for {name}", STATUS_ERROR) from None
    if pnum <= 0:
        raise QimgError(f"Sector allocation test failed for {name}", STATUS_ERROR)
    return flags, pnum


def compare_images(
    img1: Image,
    img2: Image,
    *,
    name1: str = "",
    name2: str = "",
    strict: bool = False,
    progress: Callable[[float], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> CompareResult:
    """Compare two open images (see ``compare``); ``warn`` is told the size
    warning when it arises (between progress updates, as qemu-img prints)."""
    size1, size2 = img1.size, img2.size
    total = min(size1, size2)
    base = max(size1, size2)
    acc = FloatAccumulator()

    def advance(chunk: int) -> None:
        if progress is not None:
            progress(acc.add(_f32_div(chunk, base) * 100))

    if strict and size1 != size2:
        return CompareResult(False, None, "Strict mode: Image size mismatch!", code=DIFFERENT)
    offset = total
    try:
        with Workers(2) as pool:
            found = _compare_common(img1, img2, name1, name2, total, strict, pool, advance)
        if found is not None:
            return found

        warning = None
        if size1 != size2:
            warning = "Warning: Image size mismatch!"
            if warn is not None:
                warn(warning)
            over, name_over = (img1, name1) if size1 > size2 else (img2, name2)
            while offset < base:
                status, chunk = _status(over, offset, base - offset, name_over)
                if status & ALLOCATED and not status & ZERO:
                    chunk = min(chunk, CHUNK)
                    try:
                        _check_empty(over, offset, chunk, name_over)
                    except _Mismatch as m:
                        return CompareResult(
                            False, m.offset, f"Content mismatch at offset {m.offset}!", warning, DIFFERENT
                        )
                offset += chunk
                advance(chunk)
        return CompareResult(True, None, "Images are identical.", warning)
    except _Mismatch as m:
        return CompareResult(False, m.offset, f"Content mismatch at offset {m.offset}!", code=DIFFERENT)


#: chunks whose reads are under way ahead of the one being compared
AHEAD = 2


class _KnownStatus:
    """img_compare asks for the block status of the whole rest of each
    image at every chunk, and most chunks are a 2 MiB piece of a long run.
    raw and qcow2 (without backing file) end a run where its content ends,
    whatever offset inside it is asked about: the run found last answers
    for the rest of it, without a new look at the cluster map."""

    def __init__(self, img: Image) -> None:
        self.img = img
        self.reuse = img.backing is None and img.format in ("raw", "qcow2")
        self.start = self.end = 0
        self.flags = 0
        #: the run's data file offset, where it is plain data read straight from there
        self.host: int | None = None
        self.bulk = BulkRuns(img)
        # QEMU's qcow2 answers for one L2 table's clusters at most, and for
        # one compressed cluster at a time: the chunks (and so the progress
        # steps) end there
        self.cluster = self.table = 0
        if img.format == "qcow2":
            self.cluster = img.driver.cluster_size
            entry = 16 if getattr(img.driver.header, "extended_l2", False) else 8
            self.table = self.cluster * (self.cluster // entry)

    def status(self, offset: int, length: int, name: str, lock: threading.Lock) -> tuple[int, int]:
        """The run at ``offset``; the image is locked only when its
        driver must be asked (reads of it run in other threads)."""
        if not (self.reuse and self.start <= offset < self.end):
            with lock:
                ext = self.bulk.at(offset)
                if ext is not None:
                    self.start, self.end, self.flags = ext.offset, ext.end, ext.flags
                    self.host = direct_host(self.img, ext)
                else:
                    flags, pnum = _status(self.img, offset, length, name)
                    self.start, self.end, self.flags, self.host = offset, offset + pnum, flags, None
        flags, pnum = self.flags, self.end - offset
        if self.table:
            unit = self.cluster if flags & COMPRESSED else self.table
            pnum = min(pnum, unit - offset % unit)
        return flags, pnum

    def host_at(self, offset: int) -> int | None:
        return None if self.host is None else self.host + offset - self.start


def _plan(img1: Image, img2: Image, name1: str, name2: str, total: int, strict: bool,
          locks: tuple[threading.Lock, threading.Lock]
          ) -> Iterator[tuple[str, int, int, QimgError | None, int | None, int | None]]:
    """img_compare's walk over the common part: (what to do, offset, length,
    error) per chunk.  What to do: "skip", "both" (compare the two),
    "empty1"/"empty2" (only that image has data: it must read as zeroes),
    "strict" (a block status mismatch) or "error" (a block status failed;
    reported when the walk gets there, after the chunks before it), and
    where each image's chunk lies in its data file when it can be read
    straight from there."""
    size1, size2 = img1.size, img2.size
    known1, known2 = _KnownStatus(img1), _KnownStatus(img2)
    offset = 0
    while offset < total:
        try:
            status1, pnum1 = known1.status(offset, size1 - offset, name1, locks[0])
            status2, pnum2 = known2.status(offset, size2 - offset, name2, locks[1])
        except QimgError as e:
            yield "error", offset, 0, e, None, None
            return
        allocated1 = status1 & ALLOCATED
        allocated2 = status2 & ALLOCATED
        chunk = min(pnum1, pnum2)
        if strict and status1 != status2:
            yield "strict", offset, 0, None, None, None
            return
        kind = "skip"
        if status1 & ZERO and status2 & ZERO:
            pass
        elif bool(allocated1) == bool(allocated2):
            if allocated1:
                chunk = min(chunk, CHUNK)
                kind = "both"
        else:
            chunk = min(chunk, CHUNK)
            kind = "empty1" if allocated1 else "empty2"
        yield kind, offset, chunk, None, known1.host_at(offset), known2.host_at(offset)
        offset += chunk


def _compare_common(img1: Image, img2: Image, name1: str, name2: str, total: int, strict: bool,
                    pool: Workers, advance: Callable[[int], None]) -> CompareResult | None:
    """Compare the part both images have, the reads of the next chunks
    running in the pool (one image per thread at a time: format drivers'
    caches are not thread-safe) while this thread compares; the first
    mismatch or error in guest order wins, as in qemu-img's serial loop."""
    from qimg.protocols.file import keep_freed_buffers

    # the reads in flight each allocate a buffer: reuse freed ones
    keep_freed_buffers()
    lock = threading.Lock()
    locks = (lock, lock if img2 is img1 else threading.Lock())

    def read(i: int, offset: int, length: int, host: int | None) -> bytes:
        img, name = (img1, name1) if i == 0 else (img2, name2)
        if host is not None:
            return _read(img, offset, length, name, host)
        with locks[i]:
            return _read(img, offset, length, name)

    pending: deque = deque()

    def finish() -> CompareResult | None:
        kind, offset, chunk, err, f1, f2 = pending.popleft()
        if kind == "error":
            raise err
        if kind == "strict":
            return CompareResult(False, offset, f"Strict mode: Offset {offset} block status mismatch!",
                                 code=DIFFERENT)
        if kind == "both":
            idx = _first_difference(f1.result(), f2.result())
        elif kind == "empty1":
            idx = _first_nonzero(f1.result())
        elif kind == "empty2":
            idx = _first_nonzero(f2.result())
        else:
            idx = -1
        if idx >= 0:
            raise _Mismatch(offset + idx)
        advance(chunk)
        return None

    for kind, offset, chunk, err, host1, host2 in _plan(img1, img2, name1, name2, total, strict, locks):
        f1 = pool.submit(read, 0, offset, chunk, host1) if kind in ("both", "empty1") else None
        f2 = pool.submit(read, 1, offset, chunk, host2) if kind in ("both", "empty2") else None
        pending.append((kind, offset, chunk, err, f1, f2))
        if len(pending) > AHEAD:
            found = finish()
            if found is not None:
                return found
    while pending:
        found = finish()
        if found is not None:
            return found
    return None


def _f32_div(a: int, b: int) -> float:
    from qimg.ops.progress import f32

    return f32(f32(float(a)) / f32(float(b)))


def compare(
    a: str,
    b: str,
    *,
    fmt_a: str | None = None,
    fmt_b: str | None = None,
    strict: bool = False,
    progress: Callable[[float], None] | None = None,
) -> CompareResult:
    """Compare images ``a`` and ``b`` as ``qemu-img compare`` does.

    The result's ``identical`` is True when the guest contents are equal
    (sizes may differ if the extra part reads as zeroes, unless ``strict``,
    which also requires equal allocation).  Failing to open an image raises
    QimgError with exit code 2.
    """
    imgs: list[Image] = []
    try:
        for name, fmt in ((a, fmt_a), (b, fmt_b)):
            try:
                imgs.append(open_image(name, fmt))
            except QimgError as e:
                raise QimgError(f"Could not open '{name}': {e.message}", OPEN_ERROR) from None
        return compare_images(imgs[0], imgs[1], name1=a, name2=b, strict=strict, progress=progress)
    finally:
        for img in imgs:
            img.close()
