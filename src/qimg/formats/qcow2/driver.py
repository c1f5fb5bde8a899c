"""The qcow2 format driver (docs/interop/qcow2.txt).

Opening parses and validates the header only (as QEMU's qcow2_do_open does),
without numpy: ``qimg info`` must stay light.  The cluster map
(cluster.py) and the refcounts (refcount.py) are loaded on first I/O.

Metadata is written back lazily, in QEMU's order: data first, then refcount
blocks, then L2 tables, then L1 entries.  References are only dropped after
the L2 tables no longer pointing at the clusters are on disk, so a crash
leaves a consistent image or, at worst, leaked clusters.

What other modules may rely on (an open Qcow2Driver ``d``):
  d.file, d.header (QCowHeader), d.cluster_size, d.cluster_bits, d.size;
  d.map (cluster.ClusterMap: L1 array, cached L2 tables), d.refs
  (refcount.Refcounts); d.flush_metadata(); d.drop_caches() after
  metadata was rewritten behind the driver's back (check --repair);
  d.write_compressed_raw(offset, data) with data from
  compress.compress_cluster(data, cluster_size, d.header.compression_type).
Create errors carry no "FILENAME: " prefix (the create command adds it).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, NoReturn

from qimg.block.driver import Driver
from qimg.block.status import ALLOCATED, COMPRESSED as S_COMPRESSED, DATA, EOF, OFFSET_VALID, RECURSE, ZERO, Extent
from qimg.errors import QimgError, UnsupportedError
from qimg.formats.qcow2 import header as H
from qimg.formats.qcow2.amend import AMEND_OPTS
from qimg.formats.qcow2.create import CREATE_OPTS

if TYPE_CHECKING:
    from qimg.formats.qcow2.bitmap import BitmapStore
    from qimg.formats.qcow2.cluster import ClusterMap
    from qimg.formats.qcow2.fill import Fill
    from qimg.formats.qcow2.refcount import Refcounts
    from qimg.formats.qcow2.snapshot import QCowSnapshot
    from qimg.protocols.file import File

#: QEMU's limits against hostile headers
QCOW_MAX_L1_SIZE = 32 << 20
QCOW_MAX_REFTABLE_SIZE = 8 << 20
QCOW_MAX_SNAPSHOTS = 65536
SNAPSHOT_HEADER_SIZE = 40
INT64_MAX = (1 << 63) - 1


def _validate_table_offset(offset: int, entries: int, entry_len: int, cluster_size: int) -> bool:
    if entries > INT64_MAX // entry_len:
        return False
    if INT64_MAX - entries * entry_len < offset:
        return False
    return offset % cluster_size == 0


def size_to_l1(size: int, cluster_bits: int, extl2: bool = False) -> int:
    """L1 entries needed for ``size`` bytes (an extended L2 entry is 16 bytes)."""
    shift = cluster_bits + cluster_bits - (4 if extl2 else 3)
    return (size + (1 << shift) - 1) >> shift


class Qcow2Driver(Driver):
    format_name = "qcow2"
    create_opts = CREATE_OPTS
    amend_opts = AMEND_OPTS
    supports_backing = True
    supports_resize = True
    supports_compression = True
    supports_check = True
    supports_snapshots = True
    supports_bitmaps = True

    # ---- probing, creation ------------------------------------------------------
    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        if len(header) >= 8 and struct.unpack(">II", header[:8]) in ((H.QCOW_MAGIC, 2), (H.QCOW_MAGIC, 3)):
            return 100
        return 0

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        from qimg.formats.qcow2.create import create_image

        create_image(filename, size, options)

    @classmethod
    def measure(cls, size: int | None, options: dict[str, Any], source: Any) -> dict[str, int]:
        from qimg.formats.qcow2.measure import measure

        return measure(size, options, source)

    def amend(self, options: dict[str, Any], progress: Any = None, force: bool = False) -> None:
        from qimg.formats.qcow2.amend import amend

        if self.read_only:
            raise QimgError("Image is read-only")
        amend(self, options, progress, force)

    # ---- open ---------------------------------------------------------------------
    def do_open(self, options: dict[str, Any]) -> None:
        #: opened for check (BDRV_O_CHECK): the snapshot table is the
        #: check's to validate, read and repair
        self._check_mode = bool(options.get("check"))
        self._map: "ClusterMap | None" = None
        #: qcow2_signal_corruption has spoken (it speaks once)
        self._corruption_signaled = False
        self._refs: "Refcounts | None" = None
        #: a new image being filled front to back (fill.py), else None
        self._fill: "Fill | None" = None
        self._modified = False
        self._set_dirty = False
        self._free_byte_offset = 0
        self._zcache: tuple[int, bytes] | None = None
        self._meta_prealloc: bool | None = None
        self._snapshots: "list[QCowSnapshot] | None" = None
        self._snapshots_size = 0
        self.header = self._read_header()
        h = self.header
        #: where guest data clusters live: the image file itself, or the
        #: external data file (host offset == guest offset there)
        self.data_file = self.file
        self.cluster_bits = h.cluster_bits
        self.cluster_size = h.cluster_size
        self.size = h.size
        #: AES (crypt_method 1) images open for info; their data needs a key
        self.encrypted = bool(h.crypt_method)
        if h.incompatible_features & H.INCOMPAT_CORRUPT and not self.read_only:
            raise QimgError("qcow2: Image is corrupt; cannot be opened read/write")
        self._open_crypto(options)
        from qimg.formats.qcow2.datafile import open_data_file

        # before the dirty repair, snapshots and bitmaps, as in qcow2_do_open
        open_data_file(self, options)
        if h.incompatible_features & H.INCOMPAT_DIRTY and not self.read_only:
            self._repair_dirty()
        # QEMU reads the snapshot table on open, except in check mode,
        # where the check itself reports a damaged table.
        if not options.get("check"):
            _ = self.snapshots
        self._open_bitmaps()

    def _read_header(self) -> H.QCowHeader:
        buf = self.file.pread(0, 4096)
        if len(buf) >= 24 and struct.unpack_from(">I", buf, 0)[0] == H.QCOW_MAGIC:
            bits = struct.unpack_from(">I", buf, 20)[0]
            if 12 < bits <= H.MAX_CLUSTER_BITS:
                buf = self.file.pread(0, 1 << bits)
        if len(buf) < 72 or struct.unpack_from(">I", buf, 0)[0] != H.QCOW_MAGIC:
            raise QimgError("Image is not in qcow2 format")
        version, bfo = struct.unpack_from(">IQ", buf, 4)
        if version in (2, 3):
            bits = struct.unpack_from(">I", buf, 20)[0]
            if H.MIN_CLUSTER_BITS <= bits <= H.MAX_CLUSTER_BITS and bfo > (1 << bits):
                if version == 2 or struct.unpack_from(">I", buf, 100)[0] >= 104:
                    raise QimgError("Invalid backing file offset")
        h = H.QCowHeader.parse(buf)
        self._validate(h)
        return h

    def _validate(self, h: H.QCowHeader) -> None:
        cs = h.cluster_size
        unknown = h.incompatible_features & ~H.INCOMPAT_MASK
        if unknown:
            names = []
            for ftype, bit, name in h.feature_table:
                if ftype == 0 and unknown & (1 << bit):
                    names.append(name)
                    unknown &= ~(1 << bit)
            if unknown:
                names.append("Unknown incompatible feature: %x" % unknown)
            raise UnsupportedError("Unsupported qcow2 feature(s): " + ", ".join(names))
        if h.refcount_order > 6:
            raise QimgError("Reference count entry width too large; may not exceed 64 bits")
        if h.incompatible_features & H.INCOMPAT_COMPRESSION and h.compression_type != H.COMPRESSION_ZSTD:
            raise QimgError("Invalid compression type: %d" % h.compression_type)
        if h.compression_type not in (H.COMPRESSION_ZLIB, H.COMPRESSION_ZSTD):
            raise QimgError("Unknown compression type: %d" % h.compression_type)
        if h.refcount_table_clusters > QCOW_MAX_REFTABLE_SIZE // cs:
            raise QimgError("Reference count table too large")
        if h.refcount_table_clusters == 0:
            raise QimgError("Image does not contain a reference count table")
        if not _validate_table_offset(h.refcount_table_offset, h.refcount_table_clusters, cs, cs):
            raise QimgError("Reference count table offset invalid")
        if h.crypt_method > 2:
            raise QimgError(f"Unsupported encryption method {h.crypt_method}")
        if getattr(self, "_check_mode", False):
            pass
        elif h.nb_snapshots > QCOW_MAX_SNAPSHOTS:
            raise QimgError("Snapshot table too large")
        elif not _validate_table_offset(h.snapshots_offset, h.nb_snapshots, SNAPSHOT_HEADER_SIZE, cs):
            raise QimgError("Snapshot table offset invalid")
        if h.l1_size > QCOW_MAX_L1_SIZE // 8:
            raise QimgError("Active L1 table too large")
        if h.size > INT64_MAX:
            raise QimgError("Could not refresh total sector count: File too large")
        if h.extended_l2 and cs // 32 < 1 << H.MIN_CLUSTER_BITS:
            raise QimgError("Unsupported subcluster size: %d" % (cs // 32))
        l1_vm_state_index = size_to_l1(h.size, h.cluster_bits, h.extended_l2)
        if l1_vm_state_index > 0x7FFFFFFF:
            raise QimgError("Image is too big")
        if h.l1_size < l1_vm_state_index:
            raise QimgError("L1 table is too small")
        if not _validate_table_offset(h.l1_table_offset, h.l1_size, 8, cs):
            raise QimgError("Active L1 table offset invalid")

    # ---- LUKS encryption (crypt_method 2) -------------------------------------------
    #: the open options that make QEMU name the image as json:{...}
    strong_runtime_opts = ("encrypt.key-secret",)

    def _open_crypto(self, options: dict[str, Any]) -> None:
        """The encrypt.format option against the header (qcow2_update_options),
        then the LUKS header the crypto header extension names, unlocked with
        encrypt.key-secret unless only metadata is wanted
        (qcow2_read_extensions, qcow2_do_open)."""
        h = self.header
        #: the LUKS volume (qimg.crypto.luks.Volume), None without LUKS
        self.crypto: Any = None
        #: the legacy AES cipher (crypt_method 1), None without it
        self._aes: Any = None
        #: its sectors' IVs are guest sector numbers (LUKS: host ones)
        self.crypt_guest_iv = h.crypt_method == 1
        fmt = options.get("encrypt.format")
        if fmt is not None:
            if not h.crypt_method:
                raise QimgError(f"No encryption in image header, but options specified format '{fmt}'")
            header_fmt = "aes" if h.crypt_method == 1 else "luks"
            if fmt != header_fmt:
                raise QimgError(f"Header reported '{header_fmt}' encryption format but options specify '{fmt}'")
        no_io = bool(options.get("no_io"))
        if h.crypto_error:
            raise QimgError(h.crypto_error)
        if h.crypto_header is not None:
            from qimg.crypto import luks

            read, _ = self.crypto_header_io()
            self.crypto = luks.open_volume(read, options.get("encrypt.key-secret"), no_io, "encrypt.")
        elif h.crypt_method == 2 and not no_io:
            raise QimgError("Missing CRYPTO header for crypt method 2")
        elif h.crypt_method == 1 and not no_io:
            # the legacy AES scheme: its key is needed at open
            from qimg.crypto.cipher import legacy_aes

            self._aes = legacy_aes(options.get("encrypt.key-secret"))

    @property
    def cipher(self) -> Any:
        """The data sectors' cipher (see crypt_guest_iv), or None."""
        if self._aes is not None:
            return self._aes
        return self.crypto.cipher if self.crypto is not None else None

    def crypto_header_io(self) -> tuple[Any, Any]:
        """(read, write) of the LUKS header region, as QEMU's
        qcow2_crypto_hdr_read_func/write_func: only inside its length."""
        def place(pos: int, n: int) -> int:
            # looked up at each call: creation names the region late
            offset, length = self.header.crypto_header or (0, 0)
            if pos + n > length:
                raise QimgError("Request for data outside of extension header")
            return offset + pos

        def read(pos: int, n: int) -> bytes:
            return self.file.pread(place(pos, n), n)

        def write(pos: int, data: bytes) -> None:
            self.file.pwrite(place(pos, len(data)), data)

        return read, write

    @property
    def has_zero_init(self) -> bool:
        """qcow2_has_zero_init: a preallocated encrypted image holds noise."""
        if not self.encrypted:
            return True
        m = self.map
        return not (len(m.l1) and int(m.l1[0]))

    def _repair_dirty(self) -> None:
        """A dirty image (lazy refcounts) has refcounts to rebuild before
        writing, as QEMU repairs it on a read-write open."""
        try:
            from qimg.formats.qcow2.check import check_image
        except ImportError:
            raise UnsupportedError("Repairing a dirty qcow2 image is not supported yet") from None
        check_image(self, "all")
        self.drop_caches()
        self._write_incompat(self.header.incompatible_features & ~H.INCOMPAT_DIRTY)

    # ---- persistent dirty bitmaps (bitmap.py) -------------------------------------
    def _open_bitmaps(self, validated: bool = False) -> None:
        h = self.header
        bitmap = None
        if h.bitmaps_ext is not None:
            # (an image without bitmaps opens without the module)
            from qimg.formats.qcow2 import bitmap

            if not validated:
                bitmap.validate_ext(h)
        update_header = False
        if not self.read_only:
            # a read-write open drops what it ignores: unknown autoclear
            # bits, and a bitmaps extension without its autoclear bit
            if h.bitmaps_ext is not None and not h.autoclear_features & H.AUTOCLEAR_BITMAPS:
                h.bitmaps_ext = None
                update_header = True
            if h.autoclear_features & ~(H.AUTOCLEAR_BITMAPS | H.AUTOCLEAR_DATA_FILE_RAW):
                h.autoclear_features &= H.AUTOCLEAR_BITMAPS | H.AUTOCLEAR_DATA_FILE_RAW
                update_header = True
        # QEMU checks the bitmaps on every open, loads them on a read-write
        # open and flags them in use before any write; read-only users load
        # them on demand.
        self._bitmaps: "BitmapStore | None" = bitmap.open_store(self) if bitmap is not None else None
        store = self._bitmaps
        # flagging bitmaps in use has rewritten the header already
        # (qcow2_load_autoloading_dirty_bitmaps returns true)
        if update_header and not (store is not None and any(not b.inconsistent for b in store.bitmaps)):
            from qimg.formats.qcow2.amend import write_header

            if self._check_mode:
                # as in reopen_for_repair: check mode has read no snapshot table
                h.nb_snapshots = h.snapshots_offset = 0
            write_header(self)

    def dirty_bitmaps(self) -> Any:
        if self._bitmaps is None:
            from qimg.formats.qcow2.bitmap import BitmapStore

            self._bitmaps = BitmapStore(self)
        return self._bitmaps

    def _mark_dirty(self, offset: int, length: int) -> None:
        if self._bitmaps is not None:
            self._bitmaps.mark(offset, length)

    # ---- attributes ------------------------------------------------------------
    @property
    def backing_filename(self) -> str | None:
        return self.header.backing_file

    @property
    def backing_format(self) -> str | None:
        return self.header.backing_format

    def info_specific(self) -> dict[str, Any] | None:
        h = self.header
        from qimg.formats.qcow2.datafile import info_fields

        data: dict[str, Any] = {"compat": "0.10" if h.version == 2 else "1.1", **info_fields(h),
                                "compression-type": H.COMPRESSION_NAMES.get(h.compression_type, "zlib")}
        if h.version >= 3:
            data["lazy-refcounts"] = bool(h.compatible_features & H.COMPAT_LAZY_REFCOUNTS)
        data["refcount-bits"] = h.refcount_bits
        if h.crypt_method == 1:
            data["encrypt"] = {"format": "aes"}
        elif self.crypto is not None:
            data["encrypt"] = {"format": "luks", **self.crypto.info()}
        if h.version >= 3:
            data["corrupt"] = bool(h.incompatible_features & H.INCOMPAT_CORRUPT)
            data["extended-l2"] = h.extended_l2
            if h.bitmaps_ext is not None:
                from qimg.formats.qcow2.bitmap import info_list

                bitmaps = info_list(self)
                if bitmaps:
                    data["bitmaps"] = bitmaps
        return {"type": "qcow2", "data": data}

    def dirty_flag(self) -> bool:
        return bool(self.header.incompatible_features & H.INCOMPAT_DIRTY)

    def check(self, repair: str | None = None) -> Any:
        from qimg.formats.qcow2.check import check_image

        return check_image(self, repair)

    def reopen_for_repair(self) -> None:
        """What QEMU's read-write open for ``check -r`` does beyond the
        read-only one: load the persistent bitmaps for writing, flagging
        them in use.  QEMU does that by rewriting the header from its state,
        in which check mode has no snapshot table yet, so qemu-img 7.2
        leaves the table's count and offset zero (the snapshots are lost and
        their clusters repaired as leaks); we do the same, byte for byte."""
        self._open_bitmaps(validated=True)
        store = self._bitmaps
        if store is not None and any(not b.inconsistent for b in store.bitmaps):
            self.file.pwrite(60, struct.pack(">IQ", 0, 0))
            self.header.nb_snapshots = 0
            self.header.snapshots_offset = 0

    def block_status_bulk(self, offset: int, length: int) -> Any:
        """Many block_status answers at once (formats/qcow2/scan.py): an
        iterator of Extents, and an int (the guest offset up to which to
        use block_status instead) where the scan stops early; None for
        images only block_status handles."""
        from qimg.formats.qcow2 import scan

        self.end_fill()
        if not scan.scannable(self):
            return None
        return scan.block_status_runs(self, offset, length)

    def persistent_bitmaps_size(self, cluster_size: int) -> int | None:
        from qimg.formats.qcow2.measure import persistent_bitmaps_size

        if self.header.version < 3:
            return None
        return persistent_bitmaps_size(self.header, self.file, self.size, cluster_size)

    # ---- metadata access ---------------------------------------------------------
    def begin_fill(self) -> bool:
        """Writes in guest order into this new image follow (a convert's):
        make them without loading the cluster map (fill.py) until
        ``end_fill`` or anything else that needs the metadata."""
        from qimg.formats.qcow2.fill import Fill

        if self._fill is None:
            self._fill = Fill.start(self)
        return self._fill is not None

    def end_fill(self) -> None:
        fill, self._fill = self._fill, None
        if fill is not None:
            fill.end()

    @property
    def map(self) -> "ClusterMap":
        self.end_fill()
        if self._map is None:
            if self.encrypted and self.cipher is None:
                raise QimgError("Parameter 'encrypt.key-secret' is required for cipher")
            from qimg.formats.qcow2.cluster import ClusterMap

            h = self.header
            self._map = ClusterMap(self.file, h.cluster_bits, h.l1_table_offset, h.l1_size, h.extended_l2)
            self._map.before_l2_flush = self._flush_refs
            self._map.on_corruption = self.signal_corruption
            self._map.data_file = self.data_file is not self.file
        return self._map

    @property
    def refs(self) -> "Refcounts":
        self.end_fill()
        if self._refs is None:
            from qimg.formats.qcow2.refcount import Refcounts

            h = self.header
            self._refs = Refcounts(self.file, h.cluster_bits, h.refcount_order,
                                   h.refcount_table_offset, h.refcount_table_clusters)
            self._refs.on_corruption = self.signal_corruption
        return self._refs

    def _flush_refs(self) -> None:
        if self._refs is not None:
            self._refs.flush()

    def drop_caches(self) -> None:
        """Forget cached metadata (the checker rewrote it in the file)."""
        self.end_fill()
        self._map = None
        self._refs = None
        self._zcache = None
        self._free_byte_offset = 0
        self._meta_prealloc = None
        self._snapshots = None
        self.header = self._read_header_unchecked()

    def _read_header_unchecked(self) -> H.QCowHeader:
        return H.QCowHeader.parse(self.file.pread(0, self.cluster_size))

    # ---- reading -------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        from qimg.formats.qcow2 import io

        return io.read(self, offset, length)

    def block_status(self, offset: int, length: int) -> Extent:
        from qimg.formats.qcow2 import cluster as C

        length = min(length, self.size - offset)
        m = self.map
        # In subclusters with extended L2 entries (sc_bits == cluster_bits otherwise).
        cb = m.sc_bits
        ci = offset >> cb
        last = (offset + length - 1) >> cb
        if m.extl2:
            kind, n, first = m.subrun(ci, last - ci + 1)
            if kind == C.INVALID:
                from qimg.formats.qcow2.io import invalid_entry

                invalid_entry(self, first << self.cluster_bits)
        else:
            kind, n, first = m.run(ci, last - ci + 1)
        run = min(offset + length, (ci + n) << cb) - offset
        host = None
        if kind == C.NORMAL:
            flags = DATA | ALLOCATED | OFFSET_VALID
            if self._metadata_preallocated():
                flags |= RECURSE
        elif kind == C.ZERO_ALLOC:
            flags = ZERO | ALLOCATED | OFFSET_VALID
        elif kind == C.ZERO_PLAIN:
            flags = ZERO | ALLOCATED
        elif kind == C.COMPRESSED:
            if self.data_file is not self.file:
                from qimg.formats.qcow2.datafile import compressed_entry

                compressed_entry(self, offset)
            flags = DATA | ALLOCATED | S_COMPRESSED
        elif kind == C.UNALLOCATED_ALLOC:
            # a host cluster whose subcluster is not allocated: the backing
            # file shows through, but qemu-img map still prints the offset
            flags = OFFSET_VALID
        else:
            flags = 0
        if self.encrypted:
            # the file holds cipher text: no offset to read the data at
            flags &= ~(OFFSET_VALID | RECURSE)
        if flags & OFFSET_VALID:
            host = (first & C.L2E_OFFSET_MASK) + (offset & (self.cluster_size - 1))
        if offset + run >= self.size:
            flags |= EOF
        return Extent(offset, run, flags, host, self.data_file.filename if host is not None else None)

    @property
    def data_node(self) -> "File":
        return self.data_file

    @property
    def subcluster_size(self) -> int:
        """The unit of allocation: with extended L2 entries a cluster has 32
        subclusters, each allocated on its own."""
        return self.cluster_size >> 5 if self.header.extended_l2 else self.cluster_size

    def _metadata_preallocated(self) -> bool:
        """Whether data clusters may be holes in the file (prealloc.py)."""
        if self._meta_prealloc is None:
            from qimg.formats.qcow2.prealloc import metadata_preallocated

            try:
                self._meta_prealloc = metadata_preallocated(self)
            except OSError:
                # a refcount block it could not read was reported as
                # corruption; block status goes on without the answer
                self._meta_prealloc = False
        return self._meta_prealloc

    # ---- writing -----------------------------------------------------------------------
    def _writable(self) -> None:
        if self.read_only:
            raise QimgError("Image is read-only")
        if not self._modified:
            self._modified = True
            h = self.header
            if h.compatible_features & H.COMPAT_LAZY_REFCOUNTS and not h.incompatible_features & H.INCOMPAT_DIRTY:
                self._write_incompat(h.incompatible_features | H.INCOMPAT_DIRTY)
                self._set_dirty = True

    def report_corruption(self, what: str) -> None:
        """qcow2_signal_corruption, for the fatal events QEMU signals: a
        writable image is marked corrupt, a read-only one only told about
        (a non-fatal event there); either is said once."""
        import sys

        h = self.header
        if self._corruption_signaled and (self.read_only or h.incompatible_features & H.INCOMPAT_CORRUPT):
            return
        self._corruption_signaled = True
        if self.read_only:
            sys.stderr.write(f"qcow2: Image is corrupt: {what}; further non-fatal corruption events "
                             f"will be suppressed\n")
            return
        self._write_incompat(h.incompatible_features | H.INCOMPAT_CORRUPT)
        # a version 2 header has no field for it: QEMU keeps it in memory
        h.incompatible_features |= H.INCOMPAT_CORRUPT
        sys.stderr.write(f"qcow2: Marking image as corrupt: {what}; further corruption events "
                         f"will be suppressed\n")

    def signal_corruption(self, what: str) -> NoReturn:
        """Report the corruption; the request fails with EIO, so that each
        command words it as qemu-img does ("Could not read file metadata:
        ...", "error while reading ...")."""
        import errno
        import os

        self.report_corruption(what)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def _write_incompat(self, value: int) -> None:
        if self.header.version < 3:
            return
        self.file.pwrite(72, struct.pack(">Q", value))
        self.header.incompatible_features = value

    def write(self, offset: int, data: bytes) -> None:
        self._writable()
        self._mark_dirty(offset, len(data))
        view = memoryview(data).cast("B")
        if self._fill is not None and self._fill.write(offset, view):
            return
        from qimg.formats.qcow2 import io

        io.write(self, offset, view)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        from qimg.formats.qcow2 import io

        from qimg.formats.qcow2.datafile import zero_data

        self._writable()
        self._mark_dirty(offset, length)
        zero_data(self, offset, length)
        io.write_zeroes(self, offset, length, unmap)

    def discard(self, offset: int, length: int) -> None:
        from qimg.formats.qcow2 import io

        self._writable()
        self._mark_dirty(offset, length)
        io.discard(self, offset, length)

    def write_compressed(self, offset: int, data: bytes) -> None:
        """Store one cluster (the last may be short) compressed; when it does
        not compress it is written as a normal cluster, as QEMU does."""
        from qimg.formats.qcow2.compress import compress_cluster

        comp = compress_cluster(data, self.cluster_size, self.header.compression_type)
        if comp is None and self.data_file is self.file:
            self.write(offset, data)
        else:
            self.write_compressed_raw(offset, comp)

    def write_compressed_raw(self, offset: int, compressed: bytes) -> None:
        """Place an already compressed cluster (from compress_cluster, which
        a copy engine may run in threads, passing
        ``self.header.compression_type``) at cluster-aligned guest
        ``offset``.  Calls must be made in order from one thread."""
        from qimg.formats.qcow2 import io
        from qimg.formats.qcow2.datafile import refuse

        refuse(self, f"error while writing at byte {offset}: Operation not supported")
        self._writable()
        self._mark_dirty(offset, self.cluster_size)
        io.write_compressed_raw(self, offset, compressed)

    def truncate(self, size: int, prealloc: str = "off", shrink: bool = False) -> None:
        from qimg.formats.qcow2 import datafile

        if size % 512 == 0 and self.header.version < 3 and self.header.nb_snapshots:
            raise UnsupportedError("Can't resize a v2 image which has snapshots")
        if size_to_l1(size, self.cluster_bits, self.header.extended_l2) > QCOW_MAX_L1_SIZE // 8:
            # qcow2_grow_l1_table's -EFBIG, before anything is written
            raise QimgError("Failed to grow the L1 table: File too large")
        if self._bitmaps is not None:
            self._bitmaps.prepare_resize()
        self._writable()
        datafile.truncate(self, size, prealloc, shrink)
        if self._bitmaps is not None:
            self._bitmaps.finish_resize()

    def flush_metadata(self) -> None:
        """Write cached refcounts, L2 tables and L1 entries, in that order."""
        self.end_fill()
        if self._refs is not None:
            self._refs.flush()
        if self._map is not None:
            self._map.flush()
        if self._refs is not None:
            self._refs.flush()

    def flush(self) -> None:
        self.flush_metadata()
        if self.data_file is not self.file:
            self.data_file.flush()
        self.file.flush()

    def close(self) -> None:
        if self._bitmaps is not None and not self.read_only:
            store, self._bitmaps = self._bitmaps, None
            store.store()
        if self._modified and not self.read_only:
            self.flush_metadata()
            self._modified = False
        # qcow2_inactivate ends every read-write open with qcow2_mark_clean:
        # also a dirty image that a failed check -r left unrepaired is
        # called clean afterwards, as qemu-img leaves it
        if not self.read_only and self.header.incompatible_features & H.INCOMPAT_DIRTY:
            self.flush()
            self._write_incompat(self.header.incompatible_features & ~H.INCOMPAT_DIRTY)
        self._set_dirty = False
        from qimg.formats.qcow2.datafile import close_data_file

        close_data_file(self)

    # ---- internal snapshots (formats/qcow2/snapshot.py) ------------------------------
    @property
    def snapshots(self) -> "list[QCowSnapshot]":
        """The snapshot table, read on first use (qcow2_read_snapshots)."""
        if self._snapshots is None and not self.header.nb_snapshots:
            self._snapshots, self._snapshots_size = [], 0
        if self._snapshots is None:
            from qimg.formats.qcow2.snapshot import read_table

            h = self.header
            self._snapshots, self._snapshots_size = read_table(self.file, h.snapshots_offset,
                                                               h.nb_snapshots, self.size)
        return self._snapshots

    def snapshot_list(self) -> list[dict[str, Any]]:
        return [sn.info() for sn in self.snapshots]

    def snapshot_create(self, name: str, date_sec: int, date_nsec: int) -> None:
        from qimg.formats.qcow2 import snapshot

        if self.read_only:
            raise QimgError("Image is read-only")
        if self.data_file is not self.file:
            e = QimgError("Operation not supported")
            e.errno = 95  # type: ignore[attr-defined]
            raise e
        snapshot.create(self, name, date_sec, date_nsec)

    def snapshot_goto(self, id_or_name: str) -> None:
        from qimg.formats.qcow2 import snapshot

        if self.read_only:
            raise QimgError("Image is read-only")
        if self.data_file is not self.file:
            raise UnsupportedError("Operation not supported")
        snapshot.goto(self, id_or_name)

    def snapshot_delete(self, snapshot_id: str | None, name: str | None) -> None:
        from qimg.formats.qcow2 import snapshot

        if self.read_only:
            raise QimgError("Image is read-only")
        snapshot.delete(self, snapshot_id, name)

    def load_snapshot_tmp(self, snapshot_id: str | None, name: str | None = None, *,
                          exact: bool = False) -> None:
        """Read the snapshot's content instead of the active image's
        (``convert -l``).  With one argument and not ``exact``, it is an ID
        or else a name (bdrv_snapshot_load_tmp_by_id_or_name); errors read
        "Failed to load snapshot: ..." as qemu-img prints them."""
        from qimg.formats.qcow2 import snapshot

        try:
            if snapshot_id is None and name is None:
                raise QimgError("snapshot_id and name are both NULL")
            if name is None and not exact:
                try:
                    snapshot.load_tmp(self, snapshot_id, None)
                except snapshot.SnapshotErrno as e:
                    if e.errno not in (2, 22):
                        raise
                    snapshot.load_tmp(self, None, snapshot_id)
            else:
                snapshot.load_tmp(self, snapshot_id, name)
        except QimgError as e:
            raise QimgError("Failed to load snapshot: " + e.message, e.code) from None

    # ---- backing chain (formats/qcow2/backing.py) ------------------------------------
    def change_backing_file(self, backing_file: str | None, backing_format: str | None) -> None:
        from qimg.formats.qcow2.backing import change_backing_file

        change_backing_file(self, backing_file, backing_format)

    def make_empty(self) -> None:
        from qimg.formats.qcow2.backing import make_empty

        make_empty(self)
