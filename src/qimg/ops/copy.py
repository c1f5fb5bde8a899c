"""The shared copy engine, shaped like nbdcopy and like qemu-img's
convert_do_copy: walk the sources' block status in large extents, skip what
the target needs not be told, read big buffers ahead in a thread pool, find
zero runs with numpy and hand writes and zero writes to the target in guest
order (so a format allocating on write lays clusters out as qemu-img does).

The walk follows convert_iteration_sectors(): every request is in 512-byte
sectors, data requests are at most ``buf_sectors`` long, an extent's end is
cut back to the source's cluster alignment, and compressed output goes one
cluster at a time.  Reproducing qemu's chunking keeps the progress output
and the sparse layout of the output byte-identical to qemu-img's.
"""

from __future__ import annotations

import bisect
import itertools
import os
import sys
import threading
from collections import deque
from typing import Callable, Iterator

from qimg.block.image import Image
from qimg.block.status import ALLOCATED, COMPRESSED, DATA, EOF, OFFSET_VALID, RECURSE, ZERO, Extent
from qimg.errors import QimgError
from qimg.ops.bulk import BulkRuns
from qimg.ops.workers import Task, Workers
from qimg.ops.zeroes import ZeroScan, classify, is_zero
from qimg.protocols.file import keep_freed_buffers
from qimg.record import dataclass, field

SECTOR = 512
#: qemu-img's IO_BUF_SIZE: the default request size (2 MiB)
BUF_SECTORS = 4096
#: qemu-img's MAX_BUF_SECTORS: the largest -S and buffer (16 MiB)
MAX_BUF_SECTORS = 32768
#: BDRV_REQUEST_MAX_SECTORS: the longest single block-status request
REQUEST_MAX_SECTORS = (0x7FFFFFFF >> 9)

# What a chunk of the target must become (qemu's ImgConvertBlockStatus).
BLK_ZERO = "zero"
BLK_DATA = "data"
BLK_BACKING_FILE = "backing"

#: seconds a thread computes before one waiting for the GIL takes over
SWITCH_INTERVAL = 0.001
#: reads kept in flight ahead of the writer
READ_AHEAD = 3
#: plain data lying in a row in the source file is read this much at a time
#: (no more: a worker's buffer stays in its core's L2 cache from the read
#: to the write, which makes both kernel copies cheaper)
BATCH_BYTES = 2 << 20
#: clusters one worker reads and compresses in one task
COMPRESS_BATCH = 16
WORKERS = max(2, min(4, os.cpu_count() or 1))
#: chunks of a plan kept from its first walk instead of walking it again
PLAN_KEEP = 1 << 16


def block_status_above(img: Image, offset: int, length: int, top_only: bool = False) -> tuple[int, int]:
    """(flags, length) of the run at ``offset`` as bdrv_block_status_above
    sees it: through the whole chain (``top_only``: only the top layer, the
    base being its backing file).  ALLOCATED tells a layer defines the run;
    a run past the end of a shorter backing file reads as allocated zeroes."""
    flags, pnum, _host, _z = _status_above(img, offset, length, top_only)
    return flags, pnum


#: formats whose OFFSET_VALID data extents may be read straight from the file
_DIRECT_FORMATS = ("raw", "qcow2")


def direct_host(img: Image, ext: Extent) -> int | None:
    """Where this layer's extent can be read straight from its data file
    (plain data of a raw or qcow2 image), else None."""
    if (
        ext.flags & (DATA | ZERO | OFFSET_VALID | COMPRESSED) == DATA | OFFSET_VALID
        and img.format in _DIRECT_FORMATS
        and ext.file == img.driver.data_node.filename
    ):
        return ext.host_offset
    return None


def _status_above(img: Image, offset: int, length: int, top_only: bool) -> tuple[int, int, int | None, bool]:
    """block_status_above, plus the host offset when the run is plain data
    of the top layer that can be read straight from its data file, and
    whether it is compressed qcow2 clusters of the top layer (which the
    engine inflates in its worker threads)."""
    ext = img.block_status(offset, length)
    flags, pnum = ext.flags & ~RECURSE, ext.length
    below = img.backing
    if pnum == 0 or ext.allocated or below is None:
        host = direct_host(img, ext)
        ztop = bool(flags & COMPRESSED and flags & ALLOCATED) and img.format == "qcow2"
        return flags, pnum, host, ztop
    if top_only:
        # qemu adds ZERO where the backing file is too short to reach
        if offset >= below.size:
            flags |= ZERO
        return flags, pnum, None, False
    eof = offset + pnum if flags & EOF else -1
    p: Image | None = below
    while p is not None:
        if offset >= p.size:
            flags = ZERO | ALLOCATED
            break
        unit = _status_unit(p)
        if unit:
            pnum = min(pnum, unit - offset % unit)
        ext = p.block_status(offset, pnum)
        flags, pnum = ext.flags & ~RECURSE, ext.length
        if ext.allocated:
            flags &= ~EOF
            break
        p = p.backing
    if offset + pnum == eof:
        flags |= EOF
    return flags, pnum, None, False


def _known_status(img: Image, bulk: BulkRuns, offset: int, length: int,
                  top_only: bool) -> tuple[int, int, int | None, bool]:
    """_status_above, from the bulk walk where it answers."""
    ext = bulk.at(offset)
    if ext is None:
        return _status_above(img, offset, length, top_only)
    host = direct_host(img, ext)
    if host is not None:
        host += offset - ext.offset
    ztop = bool(ext.flags & COMPRESSED and ext.flags & ALLOCATED)
    return ext.flags & ~RECURSE, min(ext.end - offset, length), host, ztop


@dataclass
class Chunk:
    """``sectors`` target sectors from ``sector`` on, from source ``src``."""

    sector: int
    sectors: int
    status: str
    src: int
    #: where the chunk's data lies in the source's data file, when it can be
    #: read from there directly (plain data of the top layer)
    host: int | None = None
    #: the chunk is compressed qcow2 clusters of the source's top layer
    zsrc: bool = False


@dataclass
class CopyJob:
    """Everything convert_do_copy needs to know (qemu's ImgConvertState)."""

    sources: list[Image]
    target: Image
    #: -S in sectors; 0 writes everything, zeroes included
    min_sparse: int = 8
    compressed: bool = False
    #: the target has a backing file: copy only the sources' top layers
    target_has_backing: bool = False
    #: the target is known to read as zeroes everywhere
    has_zero_init: bool = False
    #: the target was created for this copy (not -n): a cluster it gets data
    #: for is newly allocated, so the rest of that cluster reads as zeroes
    target_is_new: bool = True
    #: size of the target's backing file in sectors, -1 when unknown
    target_backing_sectors: int = -1
    cluster_sectors: int = 0
    buf_sectors: int = BUF_SECTORS
    progress: Callable[[float], None] | None = None
    #: -C: data goes from file to file in the kernel, without zero detection;
    #: cleared (for the rest of the copy) at the first chunk that cannot
    #: (qemu-img falls back to plain copying the same way)
    copy_range: bool = False
    #: --salvage: sectors that fail to read become zeroes, with a warning
    salvage: bool = False
    #: prints a warning line (None: -q, no warnings)
    warn: Callable[[str], None] | None = None
    #: -r: bytes per second written to the target, 0 for no limit
    rate_limit: int = 0
    #: -r's throttle, made when the copy starts
    limiter: "_RateLimit | None" = None
    #: -m: requests in flight at most
    coroutines: int = 8
    src_sectors: list[int] = field(default_factory=list)
    src_alignment: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        #: salvage warnings of the chunks read but not yet written, by sector
        self.pending_warnings: dict[int, list[str]] = {}
        self.src_sectors = [-(-img.size // SECTOR) for img in self.sources]
        self.src_alignment = [max(1, (img.driver.cluster_size or 0) // SECTOR) for img in self.sources]
        #: bytes of guest data one qcow2 L2 table maps (0: not qcow2)
        self.src_table = [_l2_coverage(img) for img in self.sources]
        #: bytes one block status answer covers at most (0: no limit)
        self.src_unit = [_status_unit(img) for img in self.sources]

    @property
    def total_sectors(self) -> int:
        return sum(self.src_sectors)

    @property
    def alignment(self) -> int:
        """Zero detection's grid: pow2floor(min_sparse) sectors."""
        return 1 << (max(self.min_sparse, 1).bit_length() - 1)


#: formats whose QEMU driver answers block status one block (vdi) or one
#: cluster (qcow) at a time, whatever follows: each is a request of its own
#: in qemu-img's convert (its progress steps and zero detection follow them)
_STATUS_PER_CLUSTER = ("vdi", "qcow")


def _status_unit(img: Image) -> int:
    return (img.driver.cluster_size or 0) if img.format in _STATUS_PER_CLUSTER else 0


def _l2_coverage(img: Image) -> int:
    if img.format != "qcow2":
        return 0
    cluster = img.driver.cluster_size
    entry = 16 if getattr(img.driver.header, "extended_l2", False) else 8
    return cluster * (cluster // entry)


def plan(job: CopyJob, locks: list | None = None) -> Iterator[Chunk]:
    """The chunks of the copy, in order (convert_iteration_sectors).
    ``locks`` (one per source, or None) guard the sources' drivers against
    the reader threads."""
    total = job.total_sectors
    sector = 0
    src = 0
    src_start = 0
    next_status = 0
    status = BLK_DATA
    status_sector, status_host, status_z = 0, None, False
    bulk: list[BulkRuns | None] = [None] * len(job.sources)
    while sector < total:
        while sector - src_start >= job.src_sectors[src]:
            src_start += job.src_sectors[src]
            src += 1
        n = min(total - sector, REQUEST_MAX_SECTORS)
        post_backing_zero = False
        if job.target_backing_sectors >= 0:
            if sector >= job.target_backing_sectors:
                post_backing_zero = True
            elif sector + n > job.target_backing_sectors:
                n = job.target_backing_sectors - sector
        if next_status <= sector:
            img = job.sources[src]
            local = sector - src_start
            n = min(n, job.src_sectors[src] - local)
            offset = local * SECTOR
            lock = locks[src] if locks else None
            if bulk[src] is None:
                bulk[src] = BulkRuns(img)
            while True:
                try:
                    if lock is None:
                        flags, count, host, ztop = _known_status(img, bulk[src], offset, n * SECTOR,
                                                                 job.target_has_backing)
                    else:
                        with lock:
                            flags, count, host, ztop = _known_status(img, bulk[src], offset, n * SECTOR,
                                                                     job.target_has_backing)
                    break
                except (OSError, QimgError) as e:
                    # a driver's metadata lookup failed (corrupt metadata,
                    # an offset outside the file)
                    reason = read_error(e)
                    if reason is None:
                        raise
                    if not job.salvage:
                        raise QimgError(f"error while reading block status at offset {offset}: {reason}") from None
                    if n > 1:
                        # --salvage: qemu-img asks again for a quarter of the range
                        n = -(-n // 4)
                        continue
                    # ... down to one sector, which it then reads as data
                    _status_warning(job, sector, f"error while reading block status at offset {offset}: {reason}")
                    flags, count, host, ztop = DATA, SECTOR, None, False
                    break
            status_sector, status_host, status_z = sector, host, ztop
            unit = job.src_unit[src]
            if unit:
                count = min(count, unit - offset % unit)
            table = job.src_table[src]
            if table and flags & DATA and not flags & ZERO:
                # QEMU's qcow2 answers for one L2 table's clusters at most:
                # its data requests (and zero detection's buffer ends) stop there
                count = min(count, table - offset % table)
            if count <= 0:
                # the rounded-up tail sector past the source's end reads as zeroes
                flags, count = ZERO, n * SECTOR
            n = -(-count // SECTOR)
            tail = (local + n) % job.src_alignment[src]
            if n > tail:
                n -= tail
            if flags & ZERO:
                status = BLK_BACKING_FILE if post_backing_zero else BLK_ZERO
            elif flags & DATA:
                status = BLK_DATA
            else:
                status = BLK_BACKING_FILE if job.target_has_backing else BLK_DATA
            next_status = sector + n
        n = min(n, next_status - sector)
        if status_z:
            # qemu's block status gives compressed clusters one at a time:
            # each is a request of its own (what allocating targets lay out
            # and zero detection sees depends on it)
            align = job.src_alignment[src]
            n = min(n, src_start + ((sector - src_start) // align + 1) * align - sector)
        if status == BLK_DATA or (status == BLK_ZERO and not job.min_sparse):
            n = min(n, job.buf_sectors)
        chunk_status = status
        if status == BLK_ZERO and not job.min_sparse:
            # -S 0: zeroes are written out as data
            chunk_status = BLK_DATA
        if job.compressed:
            if n < job.cluster_sectors:
                # a compressed cluster is written whole
                n = min(job.cluster_sectors, total - sector)
                chunk_status = BLK_DATA
            else:
                n -= n % job.cluster_sectors
        host = None
        whole = chunk_status == status == BLK_DATA and sector + n <= next_status
        zsrc = status_z and whole
        if (
            status_host is not None
            and chunk_status == status == BLK_DATA
            and sector + n <= next_status
            and (sector + n - src_start) * SECTOR <= job.sources[src].size
        ):
            host = status_host + (sector - status_sector) * SECTOR
        yield Chunk(sector, n, chunk_status, src, host, zsrc)
        sector += n
        if job.compressed and chunk_status != status:
            # qemu changes s->status itself; the next chunk re-reads status
            status = chunk_status


def _status_warning(job: CopyJob, sector: int, line: str) -> None:
    """A --salvage block status warning.  qemu-img walks the block status
    twice, once to count the data and once copying, so it prints each such
    warning twice: now (the plan is made whole before copying when
    salvaging), and again with the chunk's read warnings."""
    if job.warn is None:
        return
    job.warn(line)
    with _warn_lock:
        job.pending_warnings.setdefault(sector, []).append(line)


def _counts(job: CopyJob, chunk: Chunk) -> bool:
    return chunk.status == BLK_DATA


class _BufferPool:
    """Read buffers reused across chunks: a fresh buffer costs a zeroing
    pass and a page fault per 4 KiB page, as much again as the read itself.
    ``get`` hands out a view of a pooled buffer, waiting while ``limit``
    are out (queued writes hold them: memory stays bounded); ``put`` takes
    it back once its data is written.  With ``limit`` above the number of
    reads in flight some buffer is always on its way back, so a wait ends."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        self._free: list[bytearray] = []
        self._out = 0
        self._cond = threading.Condition()

    def get(self, nbytes: int) -> memoryview | bytearray:
        if nbytes > self.size:
            return bytearray(nbytes)
        with self._cond:
            while self._out >= self.limit:
                self._cond.wait()
            self._out += 1
            buf = self._free.pop() if self._free else None
        if buf is None:
            buf = bytearray(self.size)
        return memoryview(buf)[:nbytes]

    def close(self) -> None:
        """Stop waiting (the copy failed: buffers out may never come back)."""
        with self._cond:
            self.limit = 1 << 62
            self._cond.notify_all()

    def put(self, view) -> None:
        if not isinstance(view, memoryview):
            return
        buf = view.obj
        try:
            view.release()
        except BufferError:
            pass
        if isinstance(buf, bytearray) and len(buf) == self.size:
            with self._cond:
                self._out -= 1
                self._free.append(buf)
                self._cond.notify()


def run(job: CopyJob) -> None:
    """Copy all sources into the target; QimgError/OSError on failure."""
    keep_freed_buffers()
    locks = [None if img.format == "raw" and img.backing is None else threading.Lock() for img in job.sources]
    chunks: Iterator[Chunk] | list[Chunk] = plan(job, locks)
    total_alloc = 0
    if job.progress is not None or job.salvage:
        chunks = list(chunks)
        total_alloc = sum(c.sectors for c in chunks if _counts(job, c))
    elif any(img.format != "raw" or img.backing is not None for img in job.sources):
        # qemu-img walks all the block status once, counting the data,
        # before it copies: a block status that fails stops it with nothing
        # written.  (A plain raw file's cannot fail: no need to walk twice.)
        # A plan of a few chunks is kept from that walk; a longer one is
        # walked again rather than held in memory.
        kept = list(itertools.islice(chunks, PLAN_KEEP))
        if len(kept) < PLAN_KEEP:
            chunks = kept
        else:
            for _ in chunks:
                pass
            chunks = plan(job, locks)
    compressor = _compressor(job) if job.compressed else None
    # A raw target has no allocation order to keep: workers write to it
    # directly.  Other formats get their writes from this thread, in order.
    direct = job.target.format == "raw" and compressor is None
    # compressed work goes COMPRESS_BATCH clusters per task: two per worker in flight
    ahead = 2 * WORKERS + 2 if compressor is not None else READ_AHEAD
    # -m: never more requests in flight than qemu-img would have coroutines
    ahead = max(1, min(ahead, job.coroutines))
    bufs = None if compressor is not None else _BufferPool(max(BATCH_BYTES, job.buf_sectors * SECTOR), ahead + 2)
    writer = None
    # Threads waiting for the GIL after their I/O returns (the writer
    # above all) would otherwise wait out the default 5 ms switch interval
    # whenever another thread computes.
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    if job.target.format == "qcow2" and compressor is None:
        # qcow2 allocates in this thread, in guest order; the data itself
        # goes to the file from a writer thread, in the same order.
        writer = _SerialWriter(job.target.driver.data_node)
        writer.attach(job.target.driver)
        # a new image fills front to back without its cluster map (no numpy)
        job.target.driver.begin_fill()
    try:
        _copy_loop(job, chunks, locks, compressor, direct, ahead, bufs, writer, total_alloc)
    finally:
        if writer is not None:
            writer.detach(job.target.driver)
            job.target.driver.end_fill()
        sys.setswitchinterval(old_interval)
    if compressor is not None:
        _align_file_end(job.target)


#: data writes queued to the writer thread before the allocating thread waits
WRITE_DEPTH = 16
#: most queued writes one pwritev takes
WRITE_BATCH = 64


class _SerialWriter:
    """One thread that does a target's data pwrites in the order they are
    handed over, so that the allocating thread can go on with the next
    request's metadata meanwhile (the kernel serialises writes to one file
    anyway).  A failed write is reported, with the guest sector of the
    request it belonged to, at the next hand-over or drain."""

    def __init__(self, file) -> None:
        import queue

        self.file = file
        self.sector = 0
        self.error: tuple[OSError, int] | None = None
        self._q: "queue.Queue" = queue.Queue(WRITE_DEPTH)
        self._thread = threading.Thread(target=self._loop, name="qimg-writer", daemon=True)
        self._thread.start()

    def attach(self, driver) -> None:
        from qimg.formats.qcow2.deferred import defer_data_writes

        defer_data_writes(driver, self.pwrite, self.drain)

    def detach(self, driver) -> None:
        from qimg.formats.qcow2.deferred import defer_data_writes

        self._q.put(None)
        self._thread.join()
        defer_data_writes(driver, None)

    def _loop(self) -> None:
        import queue

        q = self._q
        while True:
            items = [q.get()]
            # Take whatever else is queued: writes that continue each other
            # in the file go out in one pwritev.
            while len(items) < WRITE_BATCH:
                try:
                    items.append(q.get_nowait())
                except queue.Empty:
                    break
            run_host, run_bufs, run_len, run_sector = 0, [], 0, 0
            for item in items:
                if item is not None and item[0] is None and run_bufs and item[1] == run_host + run_len:
                    run_bufs.append(item[2][0])
                    run_len += len(item[2][0])
                    continue
                if run_bufs:
                    self._write(run_host, run_bufs, run_sector)
                    run_bufs = []
                if item is None:
                    return
                fn, a, b = item
                if fn is not None:
                    fn(a)
                else:
                    run_host, run_bufs, run_len, run_sector = a, [b[0]], len(b[0]), b[1]
            if run_bufs:
                self._write(run_host, run_bufs, run_sector)

    def _write(self, host: int, bufs: list, sector: int) -> None:
        if self.error is None:
            try:
                self.file.pwritev(host, bufs)
            except OSError as e:
                self.error = (e, sector)

    def _check(self) -> None:
        if self.error is not None:
            e, sector = self.error
            raise QimgError(f"error while writing at byte {sector * SECTOR}: {e.strerror}")

    def pwrite(self, host: int, buf) -> None:
        self._check()
        self._q.put((None, host, (memoryview(buf).cast("B"), self.sector)))

    def call(self, fn: Callable, arg) -> None:
        """Run ``fn(arg)`` in the writer thread after the writes before it."""
        self._q.put((fn, arg, None))

    def drain(self) -> None:
        done = threading.Event()
        self._q.put((lambda ev: ev.set(), done, None))
        done.wait()
        self._check()


def _copy_loop(job: CopyJob, chunks, locks: list, compressor, direct: bool, ahead: int,
               bufs: "_BufferPool | None", writer: "_SerialWriter | None", total_alloc: int) -> None:
    done = 0
    counted = 0
    last: Chunk | None = None

    def count(chunk: Chunk) -> None:
        nonlocal done, counted, last
        if job.progress is not None and _counts(job, chunk):
            done += chunk.sectors
            counted += 1
            last = chunk
            job.progress(100.0 * done / total_alloc)

    try:
        _copy_chunks(job, chunks, locks, compressor, direct, ahead, bufs, writer, count)
    except QimgError:
        if job.progress is not None and last is not None and counted < job.coroutines:
            # qemu-img's coroutines each take (and count) a data request
            # before the first one completes: a failure among the first ones
            # leaves one counted per coroutine
            start = bisect.bisect_right(chunks, last.sector, key=lambda c: c.sector)
            for chunk in itertools.islice(chunks, start, None):
                if counted >= job.coroutines:
                    break
                count(chunk)
        raise


def _copy_chunks(job: CopyJob, chunks, locks: list, compressor, direct: bool, ahead: int,
                 bufs: "_BufferPool | None", writer: "_SerialWriter | None", count: Callable[[Chunk], None]) -> None:
    job.limiter = _RateLimit(job.rate_limit) if job.rate_limit else None
    with Workers(max(1, min(WORKERS, job.coroutines))) as pool:
        try:
            pending: deque[tuple[list[Chunk], Task | None]] = deque()
            it = iter(chunks)
            carry: Chunk | None = None
            exhausted = False
            while True:
                while not exhausted and len(pending) < ahead:
                    chunk = carry if carry is not None else next(it, None)
                    carry = None
                    if chunk is None:
                        exhausted = True
                        break
                    group = [chunk]
                    fut = None
                    if chunk.status == BLK_DATA:
                        if compressor is not None:
                            # a few clusters per task: fewer hand-overs
                            carry, exhausted = _extend_group(group, it, COMPRESS_BATCH * chunk.sectors * SECTOR,
                                                             contiguous=False)
                            fut = pool.submit(_compress_group, job, group, locks, compressor)
                        else:
                            offload = _offload(job, chunk)
                            if chunk.host is not None and bufs is not None and not offload:
                                carry, exhausted = _extend_group(group, it, bufs.size)
                            elif chunk.zsrc and bufs is not None:
                                carry, exhausted = _extend_group(group, it, bufs.size, False, True)
                            fut = pool.submit(_produce, job, group, locks, direct, bufs, offload)
                    elif direct:
                        fut = pool.submit(_write_chunk, job, chunk, None, None)
                    pending.append((group, fut))
                if not pending:
                    break
                group, fut = pending.popleft()
                try:
                    result = fut.result() if fut is not None else None
                except QimgError:
                    if job.salvage:
                        raise
                    _replay_failed(job, group, locks, compressor, direct, writer, count)
                    raise
                if job.pending_warnings:
                    _emit_warnings(job, group)
                if compressor is not None:
                    # each cluster counted as its write comes (qemu-img
                    # counts a request before doing it)
                    for chunk, part in zip(group, result if result is not None else [None]):
                        count(chunk)
                        _write_chunk(job, chunk, part, compressor)
                    continue
                if direct:
                    for chunk in group:
                        count(chunk)
                    continue
                buf, parts = result if result is not None else (None, [None])
                for chunk, part in zip(group, parts):
                    count(chunk)
                    if writer is not None:
                        writer.sector = chunk.sector
                    _write_chunk(job, chunk, part, None)
                if buf is not None and bufs is not None:
                    if writer is not None:
                        # the buffer is free once the writes before this are done
                        writer.call(bufs.put, buf)
                    else:
                        bufs.put(buf)
            if writer is not None:
                writer.drain()
        finally:
            if bufs is not None:
                # workers waiting for a buffer must not outlive a failure
                bufs.close()


def _replay_failed(job: CopyJob, group: list[Chunk], locks: list, compressor, direct: bool,
                   writer: "_SerialWriter | None", count: Callable[[Chunk], None]) -> None:
    """A group's read failed.  qemu-img reads each of these chunks as a
    request of its own, counting it in the progress before reading it: so
    the chunks before the failing one are written, and each one up to it
    counted, before the failing read raises its own error (with -m 1 that
    is exactly qemu-img's output and resulting file)."""
    for chunk in group:
        count(chunk)
        if compressor is not None:
            _write_chunk(job, chunk, compressor.work(_read_chunk(job, chunk, locks)), compressor)
            continue
        result = _produce(job, [chunk], locks, direct)
        if not direct:
            if writer is not None:
                writer.sector = chunk.sector
            _write_chunk(job, chunk, result[1][0], None)


def _compress_group(job: CopyJob, group: list[Chunk], locks: list, compressor: "_Compressor") -> list:
    """Worker: read and compress a few clusters (zlib and zstd release the GIL)."""
    return [compressor.work(_read_chunk(job, chunk, locks)) for chunk in group]


def _extend_group(group: list[Chunk], it: Iterator[Chunk], limit: int,
                  contiguous: bool = True, compressed: bool = False) -> tuple["Chunk | None", bool]:
    """Append to ``group`` the chunks that follow it in the source file, up
    to ``limit`` bytes in all, so one worker reads them in one go (fewer
    hand-overs between threads; each chunk is still classified and written
    on its own, exactly as qemu-img's requests).  Returns the chunk that
    did not fit (None at the end of the plan) and whether the plan ended.
    ``compressed``: chunks of compressed clusters that follow each other in
    the guest, inflated in one go."""
    size = group[0].sectors * SECTOR
    while True:
        nxt = next(it, None)
        if nxt is None:
            return None, True
        last = group[-1]
        nbytes = nxt.sectors * SECTOR
        if nxt.status != BLK_DATA or size + nbytes > limit or (contiguous and (
                nxt.host is None or nxt.src != last.src or nxt.host != last.host + last.sectors * SECTOR)):
            return nxt, False
        if compressed and (not nxt.zsrc or nxt.src != last.src or nxt.sector != last.sector + last.sectors):
            return nxt, False
        group.append(nxt)
        size += nbytes


def _offload(job: CopyJob, chunk: Chunk) -> bool:
    """-C for this data chunk?  Only where qemu-img's copy_range succeeds:
    plain data of a raw or qcow2 source's top layer (a compressed, backing
    or other format's chunk makes qemu-img give up offloading for the rest
    of the copy, and so do we), into a raw or qcow2 target."""
    if job.copy_range and (chunk.host is None or job.target.format not in _DIRECT_FORMATS):
        job.copy_range = False
    return job.copy_range


def _copy_range(job: CopyJob, chunk: Chunk) -> bool:
    """Copy a chunk in the kernel into a raw target; False if the kernel
    cannot (then the chunk goes through a buffer, and so does the rest)."""
    src = job.sources[chunk.src].driver.data_node
    dst = getattr(job.target.driver, "file", None)
    if not hasattr(src, "copy_range_to") or not hasattr(dst, "fd"):
        job.copy_range = False
        return False
    _throttle(job, chunk.sectors * SECTOR)
    try:
        src.copy_range_to(chunk.host, dst, chunk.sector * SECTOR, chunk.sectors * SECTOR)
    except OSError:
        job.copy_range = False
        return False
    return True


def _produce(job: CopyJob, group: list[Chunk], locks: list, direct: bool,
             bufs: "_BufferPool | None" = None, offload: bool = False):
    """Worker: read a group of data chunks (one read when they lie in a row
    in the source file) and find each one's zero runs while the buffer is
    still in the CPU cache; with ``direct`` also write them out.  Returns
    (buffer to give back to the pool or None, [(data, runs) per chunk]).
    ``offload`` (-C, one chunk): no zero detection, and into a raw target
    the kernel copies file to file."""
    if offload and direct and len(group) == 1 and _copy_range(job, group[0]):
        return None
    #: the group's data in one buffer, when it is
    whole = None
    if len(group) == 1:
        data = _read_chunk(job, group[0], locks, bufs)
        buf, views = data, [data]
    elif group[0].zsrc:
        first = group[0]
        buf = None
        whole = _read_chunk(job, Chunk(first.sector, sum(c.sectors for c in group), first.status, first.src,
                                       None, True), locks)
        mv = memoryview(whole)
        views, pos = [], 0
        for c in group:
            views.append(mv[pos:pos + c.sectors * SECTOR])
            pos += c.sectors * SECTOR
    else:
        total = sum(c.sectors for c in group) * SECTOR
        buf = bufs.get(total) if bufs is not None else bytearray(total)
        try:
            job.sources[group[0].src].driver.data_node.preadinto(group[0].host, memoryview(buf))
            whole = buf
            mv = memoryview(buf)
            views, pos = [], 0
            for c in group:
                views.append(mv[pos:pos + c.sectors * SECTOR])
                pos += c.sectors * SECTOR
        except OSError as e:
            if bufs is not None:
                bufs.put(buf)
            if not job.salvage:
                raise QimgError(f"error while reading at byte {group[0].sector * SECTOR}: {e.strerror}") from None
            # read again chunk by chunk, sector by sector where it fails
            buf = whole = None
            views = [_read_chunk(job, c, locks) for c in group]
    parts = []
    # one look for non-zero sectors over the whole buffer, split per chunk
    # (a group of compressed clusters is many small chunks)
    scan = ZeroScan(whole, group[0].sector, job.alignment) if whole is not None and job.min_sparse and not offload \
        else None
    pos = 0
    for chunk, data in zip(group, views):
        if offload:
            runs = [(0, chunk.sectors, True)]
        elif scan is not None:
            runs = scan.runs(pos, chunk.sectors, job.min_sparse)
        elif job.min_sparse:
            runs = classify(data, chunk.sector, job.min_sparse, job.alignment)
        else:
            runs = [(0, chunk.sectors, True)]
        pos += chunk.sectors
        parts.append((data, runs))
    scan = None  # its view of the buffer goes before the buffer goes back to the pool
    if direct:
        for chunk, part in zip(group, parts):
            try:
                _write_runs(job, chunk, part[0], part[1])
            except OSError as e:
                raise QimgError(f"error while writing at byte {chunk.sector * SECTOR}: {e.strerror}") from None
        if bufs is not None:
            bufs.put(buf)
        return None
    return buf, parts


def _align_file_end(target: Image) -> None:
    """qemu-img ends compressed output with an empty compressed write, on
    which qcow2 rounds its file up to whole sectors (the packed compressed
    data may end anywhere)."""
    if not getattr(target.driver, "aligns_compressed_end", True):
        return
    f = target.driver.data_node
    size = f.size
    if size % SECTOR:
        f.truncate(size + SECTOR - size % SECTOR)


def _read_chunk(job: CopyJob, chunk: Chunk, locks: list, bufs: "_BufferPool | None" = None) -> bytes | bytearray:
    try:
        return _read_chunk_raw(job, chunk, locks, bufs)
    except (OSError, QimgError) as e:
        reason = read_error(e)
        if reason is None:
            raise
        if job.salvage:
            return _salvage(job, chunk, locks)
        raise QimgError(f"error while reading at byte {_failing_sector(job, chunk, locks) * SECTOR}: "
                        f"{reason}") from None


def _failing_sector(job: CopyJob, chunk: Chunk, locks: list) -> int:
    """Where qemu-img's request failed: compressed clusters are requests of
    their own there (one cluster per block status), so a chunk of several
    reports its first cluster that fails to read."""
    if not chunk.zsrc:
        return chunk.sector
    step = job.src_alignment[chunk.src]
    base = sum(job.src_sectors[:chunk.src])
    first = chunk.sector
    end = chunk.sector + chunk.sectors
    while first < end:
        n = min(end, base + ((first - base) // step + 1) * step) - first
        try:
            _read_chunk_raw(job, Chunk(first, n, chunk.status, chunk.src, None, True), locks)
        except (OSError, QimgError):
            return first
        first += n
    return chunk.sector


def read_error(e: BaseException) -> str | None:
    """strerror of a failed read, None for an error that is no read error
    (a driver reports corrupt data it cannot decode as EIO, as QEMU's do)."""
    if isinstance(e, OSError):
        return e.strerror or os.strerror(e.errno or 5)
    if isinstance(e, QimgError) and e.message == os.strerror(5):
        return e.message
    return None


def _salvage(job: CopyJob, chunk: Chunk, locks: list) -> bytearray:
    """--salvage: read a chunk that failed again sector by sector; a sector
    that fails reads as zeroes, with qemu-img's warning naming its offset in
    its source (emitted in order by the copy loop)."""
    out = bytearray(chunk.sectors * SECTOR)
    warnings: list[str] = []
    src = chunk.src
    src_start = sum(job.src_sectors[:src])
    for i in range(chunk.sectors):
        sector = chunk.sector + i
        while sector - src_start >= job.src_sectors[src]:
            src_start += job.src_sectors[src]
            src += 1
        img = job.sources[src]
        offset = (sector - src_start) * SECTOR
        length = min(SECTOR, img.size - offset)
        try:
            data = _locked_read(img, locks[src], offset, length)
        except (OSError, QimgError) as e:
            reason = read_error(e)
            if reason is None:
                raise
            warnings.append(f"error while reading offset {offset}: {reason}")
            continue
        out[i * SECTOR:i * SECTOR + len(data)] = data
    if warnings and job.warn is not None:
        with _warn_lock:
            job.pending_warnings.setdefault(chunk.sector, []).extend(warnings)
    return out


_warn_lock = threading.Lock()


def _emit_warnings(job: CopyJob, group: list[Chunk]) -> None:
    with _warn_lock:
        found = [job.pending_warnings.pop(c.sector, None) for c in group]
    for lines in found:
        for line in lines or ():
            job.warn(line)  # type: ignore[misc]


class _RateLimit:
    """-r: qemu-img throttles the target's writes (bps-write, a leaky
    bucket without a burst size): a write goes once the bucket has leaked
    down to a tenth of a second's worth, then adds its bytes to it."""

    def __init__(self, rate: int) -> None:
        import threading
        import time

        self.rate = rate
        self._clock = time.monotonic
        self._sleep = time.sleep
        self._lock = threading.Lock()
        self.level = 0.0
        self.when = self._clock()

    def _leak(self) -> None:
        now = self._clock()
        self.level = max(0.0, self.level - (now - self.when) * self.rate)
        self.when = now

    def wait(self, nbytes: int) -> None:
        with self._lock:
            self._leak()
            extra = self.level - self.rate / 10
            if extra > 0:
                self._sleep(extra / self.rate)
                self._leak()
            self.level += nbytes


def _throttle(job: CopyJob, nbytes: int) -> None:
    if job.limiter is not None:
        job.limiter.wait(nbytes)


def _read_chunk_raw(job: CopyJob, chunk: Chunk, locks: list,
                    bufs: "_BufferPool | None" = None) -> bytes | bytearray:
    """The chunk's guest bytes, padded with zeroes to whole sectors.  A
    compressed cluster may span the end of one source and the start of the
    next (convert_co_read)."""
    sector, left = chunk.sector, chunk.sectors
    if chunk.host is not None:
        buf = bufs.get(left * SECTOR) if bufs is not None else bytearray(left * SECTOR)
        try:
            job.sources[chunk.src].driver.data_node.preadinto(chunk.host, memoryview(buf))
        except OSError:
            if bufs is not None:
                bufs.put(buf)
            raise
        return buf
    src_start = sum(job.src_sectors[: chunk.src])
    src = chunk.src
    if chunk.zsrc:
        img = job.sources[src]
        offset = (sector - src_start) * SECTOR
        length = min(left * SECTOR, img.size - offset)
        data = _inflate(img, locks[src], offset, length)
        return data if len(data) == left * SECTOR else data + bytes(left * SECTOR - len(data))
    if sector + left <= src_start + job.src_sectors[src]:
        # the common case: one read from one source, no copy
        length = left * SECTOR
        data = _locked_read(job.sources[src], locks[src], (sector - src_start) * SECTOR, length)
        return data if len(data) == length else data + bytes(length - len(data))
    buf = bytearray()
    while left > 0:
        while sector - src_start >= job.src_sectors[src]:
            src_start += job.src_sectors[src]
            src += 1
        n = min(left, job.src_sectors[src] - (sector - src_start))
        length = n * SECTOR
        data = _locked_read(job.sources[src], locks[src], (sector - src_start) * SECTOR, length)
        buf += data
        if len(data) < length:
            buf += bytes(length - len(data))
        sector += n
        left -= n
    return buf


def _inflate(img: Image, lock: threading.Lock | None, offset: int, length: int) -> bytearray:
    """Read compressed qcow2 clusters: the descriptors and compressed bytes
    under the source's lock, the inflating (zlib/zstd release the GIL)
    outside it, so that workers decompress in parallel as QEMU's threads do.
    Compressed clusters are packed one after the other in the file: their
    bytes come in one read when they lie close together."""
    from qimg.formats.qcow2.compress import decompress_cluster, parse_descriptor

    d = img.driver
    cb, cs = d.cluster_bits, d.cluster_size
    ctype = d.header.compression_type
    first, last = offset >> cb, (offset + length - 1) >> cb
    where: list[tuple[int, int]] = []
    with lock or threading.Lock():
        ci = first
        while ci <= last:
            ents = d.map.entries(ci, last - ci + 1)
            where += [parse_descriptor(ent, cb) for ent in ents.tolist()]
            ci += len(ents)
        lo = min(h for h, _ in where)
        hi = max(h + n for h, n in where)
        if hi - lo <= 2 * sum(n for _, n in where) + 65536:
            span = memoryview(d.file.pread(lo, hi - lo))
            blobs = [span[h - lo:h - lo + n] for h, n in where]
        else:
            blobs = [d.file.pread(h, n) for h, n in where]
    out = bytearray((last - first + 1) * cs)
    for i, blob in enumerate(blobs):
        out[i * cs:(i + 1) * cs] = decompress_cluster(blob, cs, ctype)
    start = offset - (first << cb)
    return out[start:start + length] if start or len(out) != length else out


def _locked_read(img: Image, lock: threading.Lock | None, offset: int, length: int) -> bytes:
    """Format drivers keep caches that are not thread-safe: one reader at a
    time per source, except plain raw files (a bare pread)."""
    if lock is None:
        return img.read(offset, length)
    with lock:
        return img.read(offset, length)


def _write_chunk(job: CopyJob, chunk: Chunk, data, compressor) -> None:
    try:
        _write_chunk_raw(job, chunk, data, compressor)
    except (OSError, QimgError) as e:
        # a driver refuses a request with EIO as a QimgError too (qcow2: a
        # compressed write over an allocated cluster)
        reason = read_error(e)
        if reason is None:
            raise
        raise QimgError(f"error while writing at byte {chunk.sector * SECTOR}: {reason}") from None


def _write_chunk_raw(job: CopyJob, chunk: Chunk, data, compressor) -> None:
    target = job.target
    offset = chunk.sector * SECTOR
    length = chunk.sectors * SECTOR
    if chunk.status == BLK_BACKING_FILE:
        return
    if chunk.status == BLK_ZERO:
        if not job.has_zero_init:
            _throttle(job, length)
            target.write_zeroes(offset, length, unmap=True)
        return
    if compressor is not None:
        compressor.place(job, chunk, data)
        return
    buf, runs = data
    _write_runs(job, chunk, buf, runs)


def _write_runs(job: CopyJob, chunk: Chunk, data, runs: list[tuple[int, int, bool]]) -> None:
    target = job.target
    offset = chunk.sector * SECTOR
    view = memoryview(data)
    if job.has_zero_init and job.target_is_new and not job.target_has_backing and job.cluster_sectors > 1:
        # a qcow2 target with extended L2 entries allocates per subcluster
        unit = getattr(target.driver, "subcluster_size", None)
        runs = _whole_clusters(runs, chunk, unit // SECTOR if unit else job.cluster_sectors)
    for first, count, is_data in runs:
        start = first * SECTOR
        end = start + count * SECTOR
        if is_data or not job.has_zero_init:
            _throttle(job, end - start)
        if is_data:
            _write_data(target, offset + start, view[start:end] if count != chunk.sectors else data)
        elif not job.has_zero_init:
            target.write_zeroes(offset + start, end - start, unmap=True)


def _whole_clusters(runs: list[tuple[int, int, bool]], chunk: Chunk, cluster: int) -> list[tuple[int, int, bool]]:
    """Widen data runs to the target's cluster boundaries (within the chunk).

    On a zero-initialised target without backing file, a cluster that gets
    any data is allocated whole and its unwritten part reads as zeroes,
    which are exactly the bytes the buffer holds there.  Writing the whole
    clusters at once gives the same clusters, in the same order, with the
    same content, without the format's copy-on-write of partial clusters."""
    out: list[tuple[int, int, bool]] = []
    base = chunk.sector
    for first, count, is_data in runs:
        if not is_data:
            continue
        start = max(0, (base + first) // cluster * cluster - base)
        end = min(chunk.sectors, -(-(base + first + count) // cluster) * cluster - base)
        if out and start <= out[-1][0] + out[-1][1]:
            prev = out[-1][0]
            out[-1] = (prev, max(end, prev + out[-1][1]) - prev, True)
        else:
            out.append((start, end - start, True))
    return out


def _write_data(target: Image, offset: int, data) -> None:
    # raw and qcow2 take views without a copy; other formats get bytes
    target.write(offset, data if target.format in _DIRECT_FORMATS else bytes(data))


class _Compressor:
    """Compressed output: clusters compress in the pool (zlib releases the
    GIL) and are placed in guest order by the writer."""

    def __init__(self, job: CopyJob) -> None:
        self.cluster_size = job.cluster_sectors * SECTOR
        self.fn: Callable[[bytes, int], bytes | None] | None = None
        if job.target.format == "qcow2":
            ctype = getattr(getattr(job.target.driver, "header", None), "compression_type", 0)
            if ctype == 0:
                self.fn = _zlib_compress
            elif ctype == 1:
                self.fn = _zstd_compress
        #: -S 0 writes even zero clusters (compressed)
        self.sparse = job.min_sparse > 0
        self.raw_writer = getattr(job.target.driver, "write_compressed_raw", None)
        if self.raw_writer is None:
            self.fn = None

    def work(self, data):
        """Worker side of one cluster: what ``place`` gets."""
        fn = self.fn
        if fn is None:
            return data
        cluster_size = self.cluster_size
        if self.sparse and is_zero(data):
            return data, None, True
        padded = data if len(data) == cluster_size else data + bytes(cluster_size - len(data))
        return data, fn(bytes(padded), cluster_size), False

    def place(self, job: CopyJob, chunk: Chunk, result) -> None:
        offset = chunk.sector * SECTOR
        if self.fn is None:
            data = result
            if self.sparse and is_zero(data):
                self._zero(job, offset, len(data))
            else:
                _throttle(job, len(data))
                job.target.write_compressed(offset, bytes(data))
            return
        data, compressed, zero = result
        if zero:
            self._zero(job, offset, len(data))
            return
        # a compressed write counts its guest bytes
        _throttle(job, len(data))
        if compressed is None:
            # incompressible: qcow2 stores such a cluster uncompressed
            job.target.write(offset, bytes(data))
        else:
            self.raw_writer(offset, compressed)

    @staticmethod
    def _zero(job: CopyJob, offset: int, length: int) -> None:
        if not job.has_zero_init:
            _throttle(job, length)
            job.target.write_zeroes(offset, length, unmap=True)


def _zlib_compress(data: bytes, cluster_size: int) -> bytes | None:
    """One qcow2 cluster, zlib.  QEMU gives deflate a buffer of
    cluster_size - 1 bytes, and deflate reports a buffer it filled exactly
    as not finished: a result of cluster_size - 1 bytes is stored
    uncompressed too."""
    from qimg.formats.qcow2.compress import compress_cluster

    out = compress_cluster(data, cluster_size)
    return out if out is not None and len(out) < cluster_size - 1 else None


_zstd_local = threading.local()


def _zstd_compress(data: bytes, cluster_size: int) -> bytes | None:
    """One qcow2 cluster as a zstd frame (qcow2's compression_type=zstd);
    None when it does not shrink below a cluster, as for zlib."""
    import zstandard

    if len(data) < cluster_size:
        data = bytes(data) + bytes(cluster_size - len(data))
    cctx = getattr(_zstd_local, "cctx", None)
    if cctx is None:
        # QEMU compresses at zstd's default level
        cctx = _zstd_local.cctx = zstandard.ZstdCompressor(level=3)
    out = cctx.compress(data)
    return out if len(out) <= cluster_size - 1 else None


def _compressor(job: CopyJob) -> _Compressor:
    return _Compressor(job)
