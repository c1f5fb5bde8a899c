"""The file protocol: a local file or block device, with sparse-file support.

Holes are found with SEEK_DATA/SEEK_HOLE, zeroes are written by punching
holes, and preallocation uses posix_fallocate or explicit zero writes.
An open file holds QEMU's OFD lock bytes for its permissions until it is
closed (qimg.block.lock).
"""

from __future__ import annotations

import errno
import os
import stat

from qimg.block import lock as lock_mod
from qimg.block.lock import Lock
from qimg.errors import QimgError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = 1 << 20


def _fallocate_fn():
    """libc's fallocate(2), loaded only when a hole is punched."""
    import ctypes

    # the libc this process runs on (find_library would run ldconfig)
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_malloc_tuned = False


def keep_freed_buffers() -> None:
    """Copies allocate and free a buffer of megabytes per request; glibc
    gives each one back to the kernel and the next one page-faults in
    again, which costs as much as the copy.  Raise malloc's mmap and trim
    thresholds once so that freed buffers are reused.  No-op elsewhere."""
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc's largest)


def _check_request(offset: int, length: int) -> None:
    """bdrv_check_request: an offset a header may name but no file can have
    fails with EIO, as in QEMU (not with os.pread's OverflowError)."""
    if offset < 0 or length < 0 or offset > (1 << 63) - 1 - length:
        raise OSError(errno.EIO, os.strerror(errno.EIO))


class File:
    """A protocol node over one host file."""

    _fallocate = None

    def __init__(self, filename: str, read_only: bool = True, create: bool = False, *,
                 perm: tuple[int, int] | None = None, lock: bool = True) -> None:
        """Open ``filename``; ``create`` makes it, or empties it once no one
        else holds it.  The file is locked for ``perm`` ((perm, shared), see
        qimg.block.lock) until close; by default as a data file of the image
        being opened, or for creating it.  ``lock=False`` defers locking to
        set_perm (the image's format decides it, and is probed first)."""
        self.filename = filename
        self.read_only = read_only
        self.fd = -1
        self._lock: Lock | None = None
        if not filename and not create:
            # creating '' fails in open(2) instead, as in file-posix
            raise QimgError("The 'file' block driver requires a file name")
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if create:
            # not O_TRUNC: an image someone else has open is refused
            # before anything of it is lost, as raw_co_create does
            flags |= os.O_CREAT
        try:
            self.fd = os.open(filename, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise QimgError(f"Could not open '{filename}': {e.strerror}") from None
        st = os.fstat(self.fd)
        if stat.S_ISDIR(st.st_mode):
            # a directory opens read-only, but is no image (file-posix)
            os.close(self.fd)
            self.fd = -1
            raise QimgError(f"'file' driver requires '{filename}' to be a regular file")
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self._can_punch = True
        #: (start, end, is_data, (mtime, size)) of the last extent found (read-only files)
        self._extent: tuple[int, int, bool, tuple[int, int]] | None = None
        if create or lock:
            if perm is None:
                perm = lock_mod.CREATE_PERMS if create else lock_mod.default_perms(read_only)
            try:
                self.set_perm(*perm)
                if create and stat.S_ISREG(st.st_mode):
                    os.ftruncate(self.fd, 0)
            except QimgError:
                self.close()
                raise
            except OSError as e:
                self.close()
                raise QimgError(f"Could not open '{filename}': {e.strerror}") from None

    def set_perm(self, perm: int, shared: int) -> None:
        """Hold ``perm`` and share only ``shared`` from now on (qimg.block.lock);
        QimgError, with qemu's words and hint, when another process's locks
        are in the way (the old permissions then stay)."""
        if self._lock is None:
            self._lock = lock_mod.acquire(self.fd, self.filename, perm, shared)
        else:
            self._lock.change(perm, shared)

    # ---- size -------------------------------------------------------------
    @property
    def size(self) -> int:
        if self.is_block_device:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    def allocated_size(self) -> int:
        """Bytes the host really uses (``info``'s "disk size")."""
        return os.fstat(self.fd).st_blocks * 512

    # ---- I/O ----------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes; past the end of file reads as zeroes."""
        _check_request(offset, length)
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            # A short read in the middle (rare, but allowed) is continued.
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(self.fd, length - got, offset + got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
            if got < length:
                data += bytes(length - got)
        return data

    def preadinto(self, offset: int, buf: memoryview) -> int:
        _check_request(offset, len(buf))
        n = os.preadv(self.fd, [buf], offset)
        total = n
        while 0 < n and total < len(buf):
            n = os.preadv(self.fd, [buf[total:]], offset + total)
            total += n
        if total < len(buf):
            buf[total:] = bytes(len(buf) - total)
        return len(buf)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            n = os.pwrite(self.fd, view, offset)
            offset += n
            view = view[n:]

    def pwritev(self, offset: int, buffers: list) -> None:
        """Write ``buffers`` one after the other from ``offset`` in one
        system call (when the kernel takes it all)."""
        if len(buffers) == 1:
            self.pwrite(offset, buffers[0])
            return
        n = os.pwritev(self.fd, buffers, offset)
        for buf in buffers:
            size = len(memoryview(buf).cast("B")) if not isinstance(buf, (bytes, bytearray)) else len(buf)
            if n < size:
                self.pwrite(offset + n, memoryview(buf).cast("B")[n:])
                n = 0
            else:
                n -= size
            offset += size

    def copy_range_to(self, offset: int, dst: "File", dst_offset: int, length: int) -> None:
        """Copy ``length`` bytes to ``dst`` inside the kernel (copy_file_range:
        convert -C's offloading).  Past our end reads as zeroes, as pread
        does.  OSError when the kernel cannot (EXDEV, EOPNOTSUPP, ...): the
        caller then copies through a buffer."""
        while length > 0:
            n = os.copy_file_range(self.fd, dst.fd, length, offset, dst_offset)
            if n == 0:
                # our end of file: the rest reads as zeroes
                dst.pwrite(dst_offset, bytes(length))
                return
            offset += n
            dst_offset += n
            length -= n

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a range: punch a hole if the host allows, else write zeroes."""
        if length <= 0:
            return
        end = offset + length
        size = self.size
        if offset >= size:
            # Past EOF the file already reads as zeroes once it is extended.
            self.truncate(end)
            return
        if self._can_punch and self.punch_hole(offset, min(end, size) - offset):
            if end > size:
                self.truncate(end)
            return
        pos = offset
        zero = bytes(min(_ZERO_CHUNK, length))
        while pos < end:
            n = min(len(zero), end - pos)
            self.pwrite(pos, zero[:n] if n < len(zero) else zero)
            pos += n

    def zero_range(self, offset: int, length: int) -> None:
        """Zero a range keeping it allocated, as QEMU's write_zeroes without
        BDRV_REQ_MAY_UNMAP does (FALLOC_FL_ZERO_RANGE: no hole appears, so
        block status still calls it data); zeroes written where the host
        cannot."""
        if length <= 0:
            return
        if not self.is_block_device and getattr(self, "_can_zero_range", True):
            if File._fallocate is None:
                File._fallocate = _fallocate_fn()
            import ctypes

            if File._fallocate(self.fd, _FALLOC_FL_ZERO_RANGE, offset, length) == 0:
                return
            if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            self._can_zero_range = False
        end = offset + length
        zero = bytes(min(_ZERO_CHUNK, length))
        pos = offset
        while pos < end:
            n = min(len(zero), end - pos)
            self.pwrite(pos, zero[:n] if n < len(zero) else zero)
            pos += n

    def punch_hole(self, offset: int, length: int) -> bool:
        if self.is_block_device:
            return False
        if File._fallocate is None:
            File._fallocate = _fallocate_fn()
        import ctypes

        r = File._fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        if r != 0:
            err = ctypes.get_errno()
            if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self._can_punch = False
                return False
            raise OSError(err, os.strerror(err))
        return True

    def truncate(self, size: int, prealloc: str = "off") -> None:
        """Set the file length; grow with ``prealloc`` off, falloc or full."""
        old = self.size
        if prealloc == "off" or size <= old:
            os.ftruncate(self.fd, size)
            if old == 0 and size > 0:
                self._allocate_first_block(size)
            return
        if prealloc == "falloc":
            os.posix_fallocate(self.fd, old, size - old)
            if old == 0:
                self._allocate_first_block(size)
            return
        if prealloc == "full":
            os.ftruncate(self.fd, old)
            pos = old
            zero = bytes(_ZERO_CHUNK)
            while pos < size:
                n = min(_ZERO_CHUNK, size - pos)
                self.pwrite(pos, zero if n == _ZERO_CHUNK else zero[:n])
                pos += n
            return
        raise QimgError(f"Unsupported preallocation mode '{prealloc}'")

    def _allocate_first_block(self, size: int) -> None:
        """file-posix's allocate_first_block: a file grown from empty gets
        its first block written (zeroes), for later alignment probing; so
        every raw image qemu-img makes maps its first 4 KiB as data."""
        try:
            self.pwrite(0, bytes(512 if size < 4096 else 4096))
        except OSError:
            pass  # qemu ignores failures

    def flush(self) -> None:
        if not self.read_only:
            os.fsync(self.fd)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ---- allocation ---------------------------------------------------------
    def data_extent(self, offset: int, length: int) -> tuple[bool, int]:
        """(is_data, run_length) for the run at ``offset`` within ``length``.

        Uses SEEK_DATA/SEEK_HOLE; where the host cannot tell, all is data.
        A read-only file remembers the last extent found: a copy asks about
        each request in turn, and seeking for the end of a long data run
        again for every request costs as much as reading it on tmpfs.
        """
        end = offset + length
        known = self._extent
        stamp = None
        if self.read_only:
            # a write through another handle to the file drops what we know
            st = os.fstat(self.fd)
            stamp = (st.st_mtime_ns, st.st_size)
            if known is not None and known[3] == stamp and known[0] <= offset < known[1]:
                return known[2], min(known[1], end) - offset
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole up to EOF
                return False, length
            return True, length
        if data > offset:
            if stamp is not None:
                self._extent = (offset, data, False, stamp)
            return False, min(data, end) - offset
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            return True, length
        if stamp is not None and hole > offset:
            self._extent = (offset, hole, True, stamp)
        return True, max(1, min(hole, end) - offset)

    def __enter__(self) -> "File":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
