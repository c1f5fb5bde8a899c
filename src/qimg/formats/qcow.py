"""qcow version 1 (QEMU block/qcow.c): the original QEMU copy-on-write format.

Layout: a 48-byte big-endian header, the backing file name right after it,
an L1 table (8-byte entries) at ``l1_table_offset``, L2 tables of
``1 << l2_bits`` entries.  There are no refcounts: new L2 tables and data
clusters are always appended at the end of the file (rounded up to a
cluster), compressed clusters at the very end (unrounded).  An L2 entry with
bit 63 set is a compressed cluster: its low ``63 - cluster_bits`` bits are
the host offset, the bits above them the compressed size.

There is no copy-on-write of the untouched part of a cluster: QEMU creates
images with a backing file with 512-byte clusters, so the 512-byte request
alignment (partial sectors are read through the chain first) is enough.

Encryption (crypt_method 1, qimg.crypto.cipher.legacy_aes): every data
sector is encrypted with the IV of its guest sector number.  The unwritten sectors of a newly allocated cluster hold encrypted
zeroes; compressed clusters are not encrypted.
"""

from __future__ import annotations

import struct
import zlib
from typing import TYPE_CHECKING, Any

from qimg.block.driver import Driver
from qimg.block.options import BOOL, SIZE, STRING, OptionSpec
from qimg.block.status import ALLOCATED, COMPRESSED, DATA, EOF, OFFSET_VALID, Extent
from qimg.errors import QimgError
from qimg.protocols.file import File

if TYPE_CHECKING:
    import numpy as np

QCOW_MAGIC = 0x514649FB  # "QFI\xfb"
QCOW_VERSION = 1
QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_OFLAG_COMPRESSED = 1 << 63

# magic, version, backing_file_offset, backing_file_size, mtime, size,
# cluster_bits, l2_bits, padding, crypt_method, l1_table_offset
HEADER = struct.Struct(">IIQIIQBBHIQ")
SECTOR = 512
INT_MAX = (1 << 31) - 1
UINT64_MAX = (1 << 64) - 1
#: L2 tables kept in memory (QEMU keeps 16)
L2_CACHE_SIZE = 16

CREATE_OPTS = [
    OptionSpec("size", SIZE, "Virtual disk size"),
    OptionSpec("backing_file", STRING, "File name of a base image"),
    OptionSpec("backing_fmt", STRING, "Format of the backing image"),
    OptionSpec("encryption", BOOL, "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
    OptionSpec("encrypt.format", STRING, "Encrypt the image, format choices: 'aes'"),
    OptionSpec("encrypt.key-secret", STRING, "ID of the secret that provides the AES encryption key"),
]



class QcowDriver(Driver):
    format_name = "qcow"
    create_opts = CREATE_OPTS
    supports_backing = True
    supports_compression = True
    aligns_compressed_end = False
    #: options that change what the image reads: info names an image
    #: opened with them by all its options (qcow_strong_runtime_opts)
    strong_runtime_opts = ("encrypt.key-secret",)

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        if len(header) >= HEADER.size and struct.unpack_from(">II", header) == (QCOW_MAGIC, QCOW_VERSION):
            return 100
        return 0

    # ---- creation -----------------------------------------------------------
    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        from qimg.crypto.cipher import legacy_aes
        from qimg.formats import FORMATS
        from qimg.formats.raw import RawDriver

        backing_fmt = options.get("backing_fmt")
        # qcow cannot store a backing format, but it must name a known one
        if backing_fmt is not None and backing_fmt not in FORMATS:
            raise QimgError(f"unrecognized backing format '{backing_fmt}'")
        fmt = options.get("encrypt.format")
        if options.get("encryption") and fmt is not None:
            raise QimgError("'encrypt.format' and its alias 'encryption' can't be used at the same time")
        # the file protocol (with its preallocation option) comes next
        RawDriver.create(filename, 0, {"preallocation": options.get("preallocation")})
        if fmt is not None and fmt not in ("aes", "qcow", "luks"):
            raise QimgError(f"Parameter 'format' does not accept value '{fmt}'")
        size = (size + SECTOR - 1) // SECTOR * SECTOR
        if size == 0:
            raise QimgError("Image size is too small, cannot be zero length")
        if fmt == "luks":
            raise QimgError("Unsupported encryption format")
        encrypt = bool(options.get("encryption") or fmt is not None)
        if encrypt:
            legacy_aes(options.get("encrypt.key-secret"))  # the secret must be there
        backing = options.get("backing_file")
        if backing == "fat:":
            backing = None  # QEMU's special name for vvfat: not stored
        name = backing.encode() if backing is not None else b""
        header_size = HEADER.size + len(name)
        if backing is not None:
            cluster_bits, l2_bits = 9, 12  # small clusters: no copy-on-write needed
        else:
            cluster_bits, l2_bits = 12, 9
        header_size = (header_size + 7) & ~7
        shift = cluster_bits + l2_bits
        l1_size = (size + (1 << shift) - 1) >> shift
        header = HEADER.pack(QCOW_MAGIC, QCOW_VERSION, HEADER.size if backing is not None else 0,
                             len(name), 0, size, cluster_bits, l2_bits, 0,
                             QCOW_CRYPT_AES if encrypt else QCOW_CRYPT_NONE, header_size)
        l1_bytes = -(-(8 * l1_size) // SECTOR) * SECTOR
        with File(filename, read_only=False) as f:
            f.pwrite(0, header + name)
            if l1_bytes:
                f.pwrite(header_size, bytes(l1_bytes))

    # ---- open ---------------------------------------------------------------
    def do_open(self, options: dict[str, Any]) -> None:
        raw = self.file.pread(0, HEADER.size)
        raw += bytes(HEADER.size - len(raw))  # reads past the end are zeroes
        (magic, version, bfo, bfs, _mtime, size, cbits, l2bits, _pad, crypt, l1_off) = HEADER.unpack(raw)
        if magic != QCOW_MAGIC:
            raise QimgError("Image not in qcow format")
        if version != QCOW_VERSION:
            hint = "Try the 'qcow2' driver instead.\n" if version in (2, 3) else ""
            raise QimgError(f"qcow (v1) does not support qcow version {version}", detail=hint)
        if size <= 1:
            raise QimgError("Image size is too small (must be at least 2 bytes)")
        if cbits < 9 or cbits > 16:
            raise QimgError("Cluster size must be between 512 and 64k")
        if l2bits < 9 - 3 or l2bits > 16 - 3:
            raise QimgError("L2 table size must be between 512 and 64k")
        if crypt > QCOW_CRYPT_AES:
            raise QimgError("invalid encryption method in qcow header")
        self.encrypted = crypt == QCOW_CRYPT_AES
        #: the data sectors' cipher (None: not encrypted, or opened for info only)
        self._cipher = None
        if self.encrypted and not options.get("no_io"):
            from qimg.crypto.cipher import legacy_aes

            self._cipher = legacy_aes(options.get("encrypt.key-secret"))
        self.cluster_bits = cbits
        self.cluster_size = 1 << cbits
        self.l2_bits = l2bits
        self.l2_size = 1 << l2bits
        self.size = size // SECTOR * SECTOR
        self.offset_mask = (1 << (63 - cbits)) - 1
        shift = cbits + l2bits
        if size > UINT64_MAX - (1 << shift):
            raise QimgError("Image too large")
        self.l1_size = (size + (1 << shift) - 1) >> shift
        if self.l1_size > INT_MAX // 8:
            raise QimgError("Image too large")
        self.l1_table_offset = l1_off
        self._backing_name: str | None = None
        if bfo != 0:
            if bfs > 1023:
                raise QimgError("Backing file name too long")
            name = self.file.pread(bfo, bfs).split(b"\0", 1)[0]
            self._backing_name = name.decode("utf-8", "surrogateescape")
        self._l1: "np.ndarray | None" = None
        self._l2_cache: dict[int, "np.ndarray"] = {}
        self._zcache: tuple[int, bytes] | None = None

    @property
    def backing_filename(self) -> str | None:
        return self._backing_name

    # ---- tables ---------------------------------------------------------------
    @property
    def l1(self) -> "np.ndarray":
        if self._l1 is None:
            import numpy as np

            # read only what the file holds: a hostile size cannot make us
            # allocate more than the file's own length
            avail = max(0, min(self.l1_size * 8, self.file.size - self.l1_table_offset))
            data = self.file.pread(self.l1_table_offset, avail // 8 * 8) if avail >= 8 else b""
            self._l1 = np.frombuffer(data, dtype=">u8").astype(np.uint64)
        return self._l1

    def _l1_entry(self, index: int) -> int:
        l1 = self.l1
        return int(l1[index]) if index < len(l1) else 0

    def _l2(self, l2_offset: int) -> "np.ndarray":
        table = self._l2_cache.get(l2_offset)
        if table is None:
            import numpy as np

            nbytes = self.l2_size * 8
            data = self.file.pread(l2_offset, nbytes)
            data += bytes(nbytes - len(data))
            table = np.frombuffer(data, dtype=">u8").astype(np.uint64)
            if len(self._l2_cache) >= L2_CACHE_SIZE:
                self._l2_cache.pop(next(iter(self._l2_cache)))
            self._l2_cache[l2_offset] = table
        return table

    def _entries(self, cluster: int, count: int) -> "np.ndarray":
        """L2 entries of ``count`` clusters from ``cluster`` (within one L2)."""
        import numpy as np

        l2_offset = self._l1_entry(cluster >> self.l2_bits)
        if not l2_offset:
            return np.zeros(count, dtype=np.uint64)
        i = cluster & (self.l2_size - 1)
        return self._l2(l2_offset)[i:i + count]

    # ---- block status -----------------------------------------------------------
    def block_status(self, offset: int, length: int) -> Extent:
        ext = self._run(offset, length)
        if self.encrypted and ext.flags & OFFSET_VALID:
            # the data must be decrypted: no offset to read it from
            return Extent(ext.offset, ext.length, ext.flags & ~OFFSET_VALID)
        return ext

    def _run(self, offset: int, length: int) -> Extent:
        """The run at ``offset``, with its host offset where it has one."""
        import numpy as np

        length = min(length, self.size - offset)
        cb = self.cluster_bits
        first = offset >> cb
        in_l2 = self.l2_size - (first & (self.l2_size - 1))
        count = min(in_l2, ((offset + length - 1) >> cb) - first + 1)
        l1_index = first >> self.l2_bits
        if not self._l1_entry(l1_index):
            # no L2 table: the hole runs on to the next L1 entry in use
            later = np.flatnonzero(self.l1[l1_index + 1:])
            stop = (l1_index + 1 + int(later[0])) if len(later) else self.l1_size
            run = min(offset + length, stop << (cb + self.l2_bits)) - offset
            return Extent(offset, run, EOF if offset + run >= self.size else 0)
        e = self._entries(first, count)
        head = int(e[0])
        if head == 0:
            kind = e == 0
        elif head & QCOW_OFLAG_COMPRESSED:
            kind = (e & np.uint64(QCOW_OFLAG_COMPRESSED)) != 0
        else:
            # a run of data clusters contiguous in the file
            expect = np.uint64(head) + np.arange(count, dtype=np.uint64) * np.uint64(self.cluster_size)
            kind = e == expect
        n = int(np.argmin(kind)) if not kind.all() else count
        run = min(offset + length, (first + n) << cb) - offset
        host = None
        if head == 0:
            flags = 0
        elif head & QCOW_OFLAG_COMPRESSED:
            flags = DATA | ALLOCATED | COMPRESSED
        else:
            flags = DATA | ALLOCATED | OFFSET_VALID
            host = head + (offset & (self.cluster_size - 1))
        if offset + run >= self.size:
            flags |= EOF
        return Extent(offset, run, flags, host, self.file.filename if host is not None else None)

    # ---- reading -------------------------------------------------------------------
    def _decompress(self, entry: int) -> bytes:
        coffset = entry & self.offset_mask
        if self._zcache is not None and self._zcache[0] == coffset:
            return self._zcache[1]
        csize = (entry >> (63 - self.cluster_bits)) & (self.cluster_size - 1)
        data = self.file.pread(coffset, csize)
        d = zlib.decompressobj(-12)
        try:
            out = d.decompress(data, self.cluster_size)
        except zlib.error:
            raise QimgError("Input/output error") from None
        if len(out) != self.cluster_size:
            raise QimgError("Input/output error")
        self._zcache = (coffset, out)
        return out

    def read(self, offset: int, length: int) -> bytes:
        parts: list[bytes] = []
        end = offset + length
        cs = self.cluster_size
        while offset < end:
            ext = self._run(offset, end - offset)
            n = ext.length
            if not ext.allocated:
                parts.append(bytes(n))
            elif ext.flags & COMPRESSED:
                pos = offset
                while pos < offset + n:
                    c = pos >> self.cluster_bits
                    k = min(offset + n, (c + 1) * cs) - pos
                    cluster = self._decompress(int(self._entries(c, 1)[0]))
                    parts.append(cluster[pos & (cs - 1):(pos & (cs - 1)) + k])
                    pos += k
            else:
                assert ext.host_offset is not None
                if (ext.host_offset - (offset & (cs - 1))) & 511:
                    raise QimgError("Input/output error")
                parts.append(self._read_data(ext.host_offset, offset, n))
            offset += n
        return b"".join(parts)

    def _read_data(self, host: int, offset: int, n: int) -> bytes:
        """``n`` guest bytes at ``offset`` of data clusters from ``host``."""
        if self._cipher is None:
            data = self.file.pread(host, n)
            return data + bytes(n - len(data))
        # whole sectors are decrypted
        head = offset & (SECTOR - 1)
        size = -(-(head + n) // SECTOR) * SECTOR
        buf = bytearray(self.file.pread(host - head, size))
        buf += bytes(size - len(buf))
        self._cipher.decrypt(buf, (offset - head) // SECTOR)
        return bytes(buf[head:head + n])

    def _write_data(self, host: int, offset: int, data: Any) -> None:
        """Guest sectors at ``offset`` into data clusters at ``host``."""
        if self._cipher is not None:
            data = bytearray(data)
            self._cipher.encrypt(data, offset // SECTOR)
        self.file.pwrite(host, data)

    def _read_chain(self, offset: int, length: int) -> bytes:
        """Guest bytes as the whole chain shows them (for partial sectors)."""
        parts = []
        end = offset + length
        while offset < end:
            ext = self.block_status(offset, end - offset)
            if ext.allocated or self.backing is None:
                parts.append(self.read(offset, ext.length))
            else:
                avail = max(0, min(ext.length, self.backing.size - offset))
                data = self.backing.read(offset, avail) if avail else b""
                parts.append(data + bytes(ext.length - len(data)))
            offset += ext.length
        return b"".join(parts)

    # ---- writing -------------------------------------------------------------------
    def _writable(self) -> None:
        if self.read_only:
            raise QimgError("Image is read-only")

    def _file_end(self) -> int:
        # QEMU's bdrv_getlength counts whole sectors: allocation starts there
        return -(-self.file.size // SECTOR) * SECTOR

    def _set_l1(self, index: int, value: int) -> None:
        import numpy as np

        l1 = self.l1
        if index >= len(l1):
            grown = np.zeros(index + 1, dtype=np.uint64)
            grown[:len(l1)] = l1
            self._l1 = l1 = grown
        l1[index] = value
        self.file.pwrite(self.l1_table_offset + index * 8, struct.pack(">Q", value))

    def _cluster_for_write(self, offset: int, allocate: int, compressed_size: int = 0,
                           n_start: int = 0, n_end: int = 0) -> int:
        """QEMU's get_cluster_offset with allocation (1: a normal cluster
        for bytes n_start..n_end of it, 2: a compressed one)."""
        cs = self.cluster_size
        l1_index = offset >> (self.l2_bits + self.cluster_bits)
        l2_offset = self._l1_entry(l1_index)
        if not l2_offset:
            l2_offset = -(-self._file_end() // cs) * cs
            self._set_l1(l1_index, l2_offset)
            self.file.pwrite(l2_offset, bytes(self.l2_size * 8))
            self._l2_cache.pop(l2_offset, None)
        table = self._l2(l2_offset)
        if not table.flags.writeable:
            table = table.copy()
            self._l2_cache[l2_offset] = table
        index = (offset >> self.cluster_bits) & (self.l2_size - 1)
        entry = int(table[index])
        if entry and not (entry & QCOW_OFLAG_COMPRESSED and allocate == 1):
            return entry
        if entry & QCOW_OFLAG_COMPRESSED and n_end - n_start < cs:
            # keep the rest of the compressed cluster: store it decompressed
            content = self._decompress(entry)
            entry = -(-self._file_end() // cs) * cs
            self.file.pwrite(entry, content)
        else:
            entry = self._file_end()
            if allocate == 1:
                entry = -(-entry // cs) * cs
                self.file.truncate(entry + cs)
                if self._cipher is not None and n_end - n_start < cs:
                    # sectors the write will not cover hold encrypted zeroes
                    self._write_data(entry, offset & ~(cs - 1), bytes(cs))
            else:
                entry |= QCOW_OFLAG_COMPRESSED | (compressed_size << (63 - self.cluster_bits))
        table[index] = entry
        self.file.pwrite(l2_offset + index * 8, struct.pack(">Q", entry))
        return entry

    def write(self, offset: int, data: bytes) -> None:
        self._writable()
        data = bytes(data)
        # requests are whole sectors: complete partial ones from the chain
        start = offset & ~(SECTOR - 1)
        end = -(-(offset + len(data)) // SECTOR) * SECTOR
        if start != offset or end != offset + len(data):
            head = self._read_chain(start, offset - start) if start < offset else b""
            tail_len = end - offset - len(data)
            tail = self._read_chain(offset + len(data), tail_len) if tail_len else b""
            data = head + data + tail
            offset = start
        self._zcache = None
        cs = self.cluster_size
        pos = 0
        while pos < len(data):
            n = self._write_run(offset + pos, memoryview(data)[pos:])
            if n:
                pos += n
                continue
            in_cluster = (offset + pos) & (cs - 1)
            n = min(cs - in_cluster, len(data) - pos)
            host = self._cluster_for_write(offset + pos, 1, 0, in_cluster, in_cluster + n)
            if not host or host & 511:
                raise QimgError("Input/output error")
            self._write_data(host + in_cluster, offset + pos, data[pos:pos + n])
            pos += n

    def _write_run(self, offset: int, data: memoryview) -> int:
        """Write a run of clusters of one existing L2 table in one go: all
        unallocated (given consecutive clusters at the end of the file, as
        QEMU's one-by-one allocation places them) or all data clusters
        contiguous in the file.  Returns the bytes written (0: not such a run)."""
        import numpy as np

        cb, cs = self.cluster_bits, self.cluster_size
        first = offset >> cb
        l2_offset = self._l1_entry(first >> self.l2_bits)
        if not l2_offset:
            return 0
        stop = min(((offset + len(data) - 1) >> cb) + 1, ((first >> self.l2_bits) + 1) << self.l2_bits)
        if stop - first < 2:
            return 0
        table = self._l2(l2_offset)
        if not table.flags.writeable:
            table = table.copy()
            self._l2_cache[l2_offset] = table
        index = first & (self.l2_size - 1)
        e = table[index:index + stop - first]
        head = int(e[0])
        if head & QCOW_OFLAG_COMPRESSED:
            return 0
        if head == 0:
            same = e == 0
        else:
            same = e == np.uint64(head) + np.arange(len(e), dtype=np.uint64) * np.uint64(cs)
        k = len(e) if same.all() else int(np.argmin(same))
        in_cluster = offset & (cs - 1)
        n = min(len(data), k * cs - in_cluster)
        if head == 0:
            head = -(-self._file_end() // cs) * cs
            self.file.truncate(head + k * cs)
            e[:k] = np.uint64(head) + np.arange(k, dtype=np.uint64) * np.uint64(cs)
            self.file.pwrite(l2_offset + index * 8, e[:k].astype(">u8").tobytes())
            if self._cipher is not None and (in_cluster or n < k * cs):
                # sectors the write will not cover hold encrypted zeroes
                self._write_data(head, first << cb, bytes(k * cs))
        elif head & 511:
            raise QimgError("Input/output error")
        self._write_data(head + in_cluster, offset, data[:n])
        return n

    def make_empty(self) -> None:
        """Clear the L1 table and cut the file after it (qcow_make_empty)."""
        self._writable()
        import numpy as np

        length = self.l1_size * 8
        step = 1 << 20
        for pos in range(0, length, step):
            self.file.pwrite(self.l1_table_offset + pos, bytes(min(step, length - pos)))
        self.file.flush()
        self.file.truncate(self.l1_table_offset + length)
        self._l1 = np.zeros(0, dtype=np.uint64)
        self._l2_cache.clear()
        self._zcache = None

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        # qcow has no zero clusters: zeroes are written as data, in pieces
        step = 1 << 20
        for pos in range(offset, offset + length, step):
            self.write(pos, bytes(min(step, offset + length - pos)))

    def write_compressed(self, offset: int, data: bytes) -> None:
        """One cluster (the last one may be short), deflated as QEMU does;
        stored normally when it does not shrink."""
        self._writable()
        cs = self.cluster_size
        if len(data) != cs and (len(data) > cs or offset + len(data) != self.size):
            raise QimgError("Invalid argument")
        buf = bytes(data) + bytes(cs - len(data))
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        out = c.compress(buf) + c.flush(zlib.Z_FINISH)
        if len(out) >= cs:
            self.write(offset, data)
            return
        entry = self._cluster_for_write(offset, 2, len(out))
        self._zcache = None
        self.file.pwrite(entry & self.offset_mask, out)

    # ---- description ------------------------------------------------------------
    def dirty_flag(self) -> bool:
        return False
