"""The QED format driver (docs/interop/qed_spec.txt, QEMU block/qed*.c).

Opening parses and validates the header only, without numpy (``qimg info``
stays light); the L1 table and L2 tables (tables.py) load on first I/O.

Allocation appends at ``file_size`` (the file length rounded down to a
cluster): data clusters first, then a new L2 table when the L1 entry was
empty, as QEMU orders them.  While an image without a backing file has
allocating writes in flight the header carries QED_F_NEED_CHECK; a clean
close clears it, and a read-write open of an image that still has it runs
the check with repair first (check.py), as QEMU does.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Any

from qimg.block.driver import Driver
from qimg.block.status import ALLOCATED, DATA, EOF, OFFSET_VALID, ZERO, Extent
from qimg.errors import QimgError, UnsupportedError
from qimg.formats.qed import header as H
from qimg.formats.qed.create import CREATE_OPTS

if TYPE_CHECKING:
    from qimg.formats.qed.tables import Tables

#: what a lookup finds (QEMU's QED_CLUSTER_*)
FOUND, ZERO_RUN, L2_HOLE, L1_HOLE = range(4)
#: bytes->backing_file holds at most PATH_MAX - 1 characters
PATH_MAX = 4096
#: largest piece of a zero write done by writing a buffer
ZERO_CHUNK = 1 << 20


class QedDriver(Driver):
    format_name = "qed"
    create_opts = CREATE_OPTS
    supports_backing = True
    supports_check = True
    supports_resize = True

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        if len(header) >= H.HEADER.size and struct.unpack_from("<I", header)[0] == H.QED_MAGIC:
            return 100
        return 0

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        from qimg.formats.qed.create import create_image

        create_image(filename, size, options)

    # ---- open -----------------------------------------------------------------
    def do_open(self, options: dict[str, Any]) -> None:
        self._tables: "Tables | None" = None
        self.header = h = H.QedHeader.parse(self.file.pread(0, H.HEADER.size))
        if h.magic != H.QED_MAGIC:
            raise QimgError("Image not in QED format")
        if h.features & ~H.QED_FEATURE_MASK:
            raise UnsupportedError("Unsupported QED features: %x" % (h.features & ~H.QED_FEATURE_MASK))
        if not H.cluster_size_valid(h.cluster_size):
            raise QimgError("QED cluster size is invalid")
        cs = h.cluster_size
        # the block layer counts whole sectors; allocation starts at a cluster
        self.file_size = (-(-self.file.size // H.SECTOR) * H.SECTOR) & ~(cs - 1)
        if not H.table_size_valid(h.table_size):
            raise QimgError("QED table size is invalid")
        if not H.image_size_valid(h.image_size, cs, h.table_size):
            raise QimgError("QED image size is invalid")
        if not self.check_table_offset(h.l1_table_offset):
            raise QimgError("QED table offset is invalid")
        self.cluster_size = cs
        self.table_nelems = cs * h.table_size // 8
        self.l2_shift = cs.bit_length() - 1
        self.l2_mask = self.table_nelems - 1
        self.l1_shift = self.l2_shift + self.table_nelems.bit_length() - 1
        self.size = h.image_size
        if h.header_size > H.UINT32_MAX // cs:
            raise QimgError("QED header size is too large")
        self._backing_name: str | None = None
        self._backing_fmt: str | None = None
        if h.features & H.QED_F_BACKING_FILE:
            if h.backing_filename_offset + h.backing_filename_size > cs * h.header_size:
                raise QimgError("QED backing filename offset is invalid")
            if h.backing_filename_size >= PATH_MAX:
                raise QimgError("Failed to read backing filename")
            name = self.file.pread(h.backing_filename_offset, h.backing_filename_size)
            self._backing_name = name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if h.features & H.QED_F_BACKING_FORMAT_NO_PROBE:
                self._backing_fmt = "raw"
        if h.autoclear_features & ~H.QED_AUTOCLEAR_FEATURE_MASK and not self.read_only:
            # older programs knock out autoclear bits they do not know
            h.autoclear_features &= H.QED_AUTOCLEAR_FEATURE_MASK
            self.write_header()
            self.file.flush()
        if h.features & H.QED_F_NEED_CHECK and not self.read_only and not options.get("check"):
            # not closed cleanly: repair before writing (read-only opens
            # may still read the possibly inconsistent image)
            from qimg.formats.qed.check import check_image

            if check_image(self, True).check_errors:
                raise QimgError("Image corrupted")

    # ---- geometry helpers (QEMU's qed.h) ------------------------------------------
    def bytes_to_clusters(self, nbytes: int) -> int:
        # QEMU divides by cluster_size - 1 here; allocation sizes and the
        # checker's bitmap follow that, so we do too
        cs = self.cluster_size
        return ((nbytes + cs - 1) & ~(cs - 1)) // (cs - 1)

    def check_cluster_offset(self, offset: int) -> bool:
        cs = self.header.cluster_size
        if offset & (cs - 1):
            return False
        return self.header.header_size * cs <= offset < self.file_size

    def check_table_offset(self, offset: int) -> bool:
        end = (offset + (self.header.table_size - 1) * self.header.cluster_size) & H.UINT64_MAX
        if end <= offset:  # QEMU's overflow test, which one-cluster tables fail too
            return False
        return self.check_cluster_offset(offset) and self.check_cluster_offset(end)

    def write_header(self) -> None:
        self.file.pwrite(0, self.header.pack())

    # ---- attributes -------------------------------------------------------------
    @property
    def backing_filename(self) -> str | None:
        return self._backing_name

    @property
    def backing_format(self) -> str | None:
        return self._backing_fmt

    def dirty_flag(self) -> bool:
        # qemu-img 7.2 does not report NEED_CHECK as the dirty flag
        return False

    def needs_check(self) -> bool:
        return bool(self.header.features & H.QED_F_NEED_CHECK)

    def check(self, repair: str | None = None) -> Any:
        from qimg.formats.qed.check import check_image

        return check_image(self, repair is not None)

    @property
    def tables(self) -> "Tables":
        if self._tables is None:
            from qimg.formats.qed.tables import Tables

            self._tables = Tables(self)
        return self._tables

    def drop_caches(self) -> None:
        self._tables = None

    # ---- lookup -----------------------------------------------------------------------
    def find(self, pos: int, length: int) -> tuple[int, int, int]:
        """(kind, length, host offset) of the run at guest ``pos``: QEMU's
        qed_find_cluster, a run never crossing an L2 table."""
        import numpy as np

        cs = self.cluster_size
        length = min(length, (((pos >> self.l1_shift) + 1) << self.l1_shift) - pos)
        t = self.tables
        l2_offset = int(t.l1[pos >> self.l1_shift])
        if l2_offset == H.UNALLOCATED:
            return L1_HOLE, length, 0
        if not self.check_table_offset(l2_offset):
            raise OSError(errno.EINVAL, "Invalid argument")
        table = t.l2(l2_offset)
        index = (pos >> self.l2_shift) & self.l2_mask
        n = self.bytes_to_clusters((pos & (cs - 1)) + length)
        e = table[index:min(index + n, self.table_nelems)]
        first = int(e[0])
        if first == H.UNALLOCATED or first == H.ZERO_CLUSTER:
            same = e == first
        else:
            same = e == np.uint64(first) + np.arange(len(e), dtype=np.uint64) * np.uint64(cs)
        n = len(e) if same.all() else int(np.argmin(same))
        length = min(length, n * cs - (pos & (cs - 1)))
        if first == H.UNALLOCATED:
            return L2_HOLE, length, 0
        if first == H.ZERO_CLUSTER:
            return ZERO_RUN, length, 0
        if not self.check_cluster_offset(first):
            raise OSError(errno.EINVAL, "Invalid argument")
        return FOUND, length, first

    def block_status(self, offset: int, length: int) -> Extent:
        import numpy as np

        length = min(length, self.size - offset)
        kind, n, host = self.find(offset, length)
        if kind == L1_HOLE:
            # no L2 table: the hole runs on to the next L1 entry in use
            l1 = self.tables.l1
            index = offset >> self.l1_shift
            later = np.flatnonzero(l1[index + 1:])
            stop = index + 1 + int(later[0]) if len(later) else len(l1)
            n = min(length, (stop << self.l1_shift) - offset)
        if kind == FOUND:
            flags = DATA | ALLOCATED | OFFSET_VALID
            host += offset & (self.cluster_size - 1)
        elif kind == ZERO_RUN:
            flags = ZERO | ALLOCATED
        else:
            flags = 0
        if offset + n >= self.size:
            flags |= EOF
        if flags & OFFSET_VALID:
            return Extent(offset, n, flags, host, self.file.filename)
        return Extent(offset, n, flags)

    # ---- reading ----------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        parts: list[bytes] = []
        end = offset + length
        while offset < end:
            kind, n, host = self.find(offset, end - offset)
            if kind == FOUND:
                data = self.file.pread(host + (offset & (self.cluster_size - 1)), n)
                parts.append(data + bytes(n - len(data)))
            else:
                parts.append(bytes(n))
            offset += n
        return b"".join(parts)

    def _read_backing(self, offset: int, length: int) -> bytes:
        """The backing file's bytes (zeroes without one, or past its end)."""
        if self.backing is None or length <= 0:
            return bytes(max(0, length))
        avail = max(0, min(length, self.backing.size - offset))
        data = self.backing.read(offset, avail) if avail else b""
        return data + bytes(length - len(data))

    def _read_chain(self, offset: int, length: int) -> bytes:
        parts = []
        end = offset + length
        while offset < end:
            kind, n, _ = self.find(offset, end - offset)
            n = min(n, end - offset)
            parts.append(self.read(offset, n) if kind in (FOUND, ZERO_RUN) else self._read_backing(offset, n))
            offset += n
        return b"".join(parts)

    # ---- writing ----------------------------------------------------------------------
    def _writable(self) -> None:
        if self.read_only:
            raise QimgError("Image is read-only")

    def write(self, offset: int, data: bytes) -> None:
        self._writable()
        data = bytes(data)
        # requests are whole sectors: complete partial ones from the chain
        start = offset & ~(H.SECTOR - 1)
        end = -(-(offset + len(data)) // H.SECTOR) * H.SECTOR
        if start != offset or end != offset + len(data):
            head = self._read_chain(start, offset - start)
            tail = self._read_chain(offset + len(data), end - offset - len(data))
            data = head + data + tail
        self._request(start, len(data), data)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Whole clusters become zero clusters; the unaligned head and tail
        are written as zeroes, as QEMU's block layer splits the request."""
        self._writable()
        cs = self.cluster_size
        end = offset + length
        head_end = min(end, -(-offset // cs) * cs)
        tail_start = max(head_end, end & ~(cs - 1))
        for a, b in ((offset, head_end), (tail_start, end)):
            for pos in range(a, b, ZERO_CHUNK):
                self.write(pos, bytes(min(ZERO_CHUNK, b - pos)))
        if tail_start > head_end:
            self._request(head_end, tail_start - head_end, None)

    def _request(self, pos: int, length: int, data: bytes | None) -> None:
        """QEMU's qed_aio_next_io for a write (``data`` None: zero write)."""
        end = pos + length
        done = 0
        while pos < end:
            kind, n, host = self.find(pos, end - pos)
            chunk = None if data is None else data[done:done + n]
            if kind == FOUND:
                at = host + (pos & (self.cluster_size - 1))
                if chunk is not None:
                    self.file.pwrite(at, chunk)
                else:
                    # a zero write over data clusters writes zeroes in place
                    for k in range(0, n, ZERO_CHUNK):
                        self.file.pwrite(at + k, bytes(min(ZERO_CHUNK, n - k)))
            else:
                self._write_alloc(kind, pos, n, chunk)
            pos += n
            done += n

    def _write_alloc(self, kind: int, pos: int, length: int, data: bytes | None) -> None:
        cs = self.cluster_size
        nclusters = self.bytes_to_clusters((pos & (cs - 1)) + length)
        if data is None:
            if kind == ZERO_RUN:
                return
            cluster = H.ZERO_CLUSTER
        else:
            cluster = self.file_size
            self.file_size += nclusters * cs
        if self.backing is None and not self.header.features & H.QED_F_NEED_CHECK:
            self.header.features |= H.QED_F_NEED_CHECK
            self.write_header()
        if data is not None:
            # copy-on-write: the untouched head and tail of the clusters
            start = pos & ~(cs - 1)
            if pos > start:
                self.file.pwrite(cluster, self._read_backing(start, pos - start))
            after = pos + length
            tail = ((after + cs - 1) & ~(cs - 1)) - after
            if tail:
                self.file.pwrite(cluster + (pos & (cs - 1)) + length, self._read_backing(after, tail))
            self.file.pwrite(cluster + (pos & (cs - 1)), data)
        self.tables.link(pos, nclusters, cluster, new_table=kind == L1_HOLE)

    def allocate(self, nclusters: int) -> int:
        offset = self.file_size
        self.file_size += nclusters * self.cluster_size
        return offset

    def truncate(self, size: int, prealloc: str = "off", shrink: bool = False) -> None:
        self._writable()
        if prealloc != "off":
            raise UnsupportedError(f"Unsupported preallocation mode '{prealloc}'")
        h = self.header
        if not H.image_size_valid(size, h.cluster_size, h.table_size):
            raise QimgError("Invalid image size specified")
        if size < h.image_size:
            raise UnsupportedError("Shrinking images is currently not supported")
        h.image_size = size
        self.size = size
        self.write_header()

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        if not self.read_only and self.header.features & H.QED_F_NEED_CHECK:
            # clean shutdown: no check needed on the next open
            self.file.flush()
            self.header.features &= ~H.QED_F_NEED_CHECK
            self.write_header()

    # ---- backing chain (formats/qed/backing.py) -----------------------------------
    def change_backing_file(self, backing_file: str | None, backing_format: str | None) -> None:
        from qimg.formats.qed.backing import change_backing_file

        change_backing_file(self, backing_file, backing_format)
