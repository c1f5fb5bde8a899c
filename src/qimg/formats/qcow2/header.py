"""The qcow2 header and its extensions, named as docs/interop/qcow2.txt names them.

Parsing is pure (bytes in, dataclass out) so that the driver, check and amend
share it.  Unknown header extensions are kept verbatim and written back.
"""

from __future__ import annotations

import struct

from qimg.errors import QimgError
from qimg.record import dataclass, field

QCOW_MAGIC = 0x514649FB  # "QFI\xfb"

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_MASK = 0x1F
# Compatible and autoclear feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# Feature name table entries QEMU writes, in its order: (type, bit, name).
FEATURE_NAMES = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
]

V2_HEADER = struct.Struct(">IIQIIQIIQQIIQ")  # 72 bytes
V3_EXTRA = struct.Struct(">QQQII")  # 32 bytes, to offset 104
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104  # without the compression type field
V3_HEADER_LENGTH_COMPRESSION = 112  # with it, padded to 8

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
#: QEMU refuses headers bigger than one cluster, and extensions past it
MAX_BACKING_FILE_NAME = 1023


def hx(v: int) -> str:
    """C's %#x, as QEMU's messages print numbers: no 0x before a zero."""
    return f"{v:#x}" if v else "0"


@dataclass
class Extension:
    type: int
    data: bytes


@dataclass
class QCowHeader:
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH_COMPRESSION
    compression_type: int = COMPRESSION_ZLIB
    # From the header extensions and the backing file name area.
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_table: list[tuple[int, int, str]] = field(default_factory=list)
    crypto_header: tuple[int, int] | None = None  # (offset, length)
    #: why QEMU would refuse the crypto header extension (the driver says
    #: it after the header checks QEMU makes before reading extensions)
    crypto_error: str | None = None
    bitmaps_ext: bytes | None = None
    unknown_extensions: list[Extension] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    # ---- parsing -------------------------------------------------------------
    @classmethod
    def parse(cls, buf: bytes) -> "QCowHeader":
        """Parse the first cluster (or more) of an image.

        Raises QimgError with qemu's message for anything QEMU refuses.
        """
        if len(buf) < V2_HEADER_LENGTH:
            raise QimgError("Image is not in qcow2 format")
        f = V2_HEADER.unpack_from(buf, 0)
        if f[0] != QCOW_MAGIC:
            raise QimgError("Image is not in qcow2 format")
        h = cls(
            version=f[1], backing_file_offset=f[2], backing_file_size=f[3], cluster_bits=f[4],
            size=f[5], crypt_method=f[6], l1_size=f[7], l1_table_offset=f[8],
            refcount_table_offset=f[9], refcount_table_clusters=f[10], nb_snapshots=f[11],
            snapshots_offset=f[12],
        )
        if h.version not in (2, 3):
            raise QimgError(f"Unsupported qcow2 version {h.version}", code=1)
        if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
            raise QimgError(f"Unsupported cluster size: 2^{h.cluster_bits}")
        if h.version == 2:
            h.incompatible_features = h.compatible_features = h.autoclear_features = 0
            h.refcount_order = 4
            h.header_length = V2_HEADER_LENGTH
        else:
            if len(buf) < V3_HEADER_LENGTH:
                raise QimgError("qcow2 header too short")
            (h.incompatible_features, h.compatible_features, h.autoclear_features,
             h.refcount_order, h.header_length) = V3_EXTRA.unpack_from(buf, V2_HEADER_LENGTH)
            if h.header_length < V3_HEADER_LENGTH:
                raise QimgError("qcow2 header too short")
            if h.header_length > h.cluster_size:
                raise QimgError("qcow2 header exceeds cluster size")
            if h.header_length > V3_HEADER_LENGTH and len(buf) > V3_HEADER_LENGTH:
                h.compression_type = buf[V3_HEADER_LENGTH]
        if h.refcount_order > 6:
            raise QimgError("Reference count entry width too large; may not exceed 64 bits")
        h._parse_extensions(buf)
        if h.backing_file_offset:
            if h.backing_file_size > MAX_BACKING_FILE_NAME or \
                    h.backing_file_offset + h.backing_file_size > min(len(buf), h.cluster_size):
                raise QimgError("Backing file name too long")
            raw = buf[h.backing_file_offset:h.backing_file_offset + h.backing_file_size]
            h.backing_file = raw.decode("utf-8", "replace")
        return h

    def _parse_extensions(self, buf: bytes) -> None:
        # v2 images have extensions too (QEMU writes the backing format one).
        offset = self.header_length
        # Extensions end at the backing file name, or at the end of the cluster.
        end = self.backing_file_offset if self.backing_file_offset else self.cluster_size
        while offset < end:
            head = bytes(buf[offset:offset + 8]).ljust(8, b"\0")
            etype, elen = struct.unpack(">II", head)
            offset += 8
            if offset > end or elen > end - offset:
                raise QimgError(self.crypto_error or "Header extension too large")
            if etype == EXT_END:
                return
            data = bytes(buf[offset:offset + elen]).ljust(elen, b"\0")
            if etype == EXT_BACKING_FORMAT:
                if elen >= 16:
                    raise QimgError(f"ERROR: ext_backing_format: len={elen} too large (>=16)")
                self.backing_format = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif etype == EXT_FEATURE_TABLE:
                self.feature_table = [
                    (data[i], data[i + 1], data[i + 2:i + 48].split(b"\0", 1)[0].decode("utf-8", "replace"))
                    for i in range(0, len(data) - 47, 48)
                ]
            elif etype == EXT_CRYPTO:
                self.crypto_header = struct.unpack(">QQ", data[:16].ljust(16, b"\0"))
                if self.crypt_method != 2:
                    self.crypto_error = "CRYPTO header extension only expected with LUKS encryption method"
                elif elen != 16:
                    self.crypto_error = f"CRYPTO header extension size {elen}, but expected size 16"
                elif self.crypto_header[0] % self.cluster_size:
                    self.crypto_error = (f"Encryption header offset '{self.crypto_header[0]}' is not a multiple "
                                         f"of cluster size '{self.cluster_size}'")
                if self.crypto_error:
                    return  # QEMU's qcow2_read_extensions stops here
            elif etype == EXT_BITMAPS:
                self.bitmaps_ext = data
            elif etype == EXT_DATA_FILE:
                # QEMU keeps the name as a C string: it ends at the first NUL
                self.data_file = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            else:
                self.unknown_extensions.append(Extension(etype, data))
            offset += (elen + 7) & ~7

    # ---- writing -------------------------------------------------------------
    def pack(self, include_feature_table: bool = True) -> bytes:
        """The header cluster prefix: header, extensions, backing file name.

        Sets backing_file_offset/size to where the name lands.  The result
        must fit in one cluster (checked).
        """
        header_length = V2_HEADER_LENGTH if self.version == 2 else self.header_length
        exts = bytearray()

        def ext(etype: int, data: bytes) -> None:
            exts.extend(struct.pack(">II", etype, len(data)))
            exts.extend(data)
            exts.extend(bytes(-len(data) % 8))

        if self.backing_format:
            ext(EXT_BACKING_FORMAT, self.backing_format.encode())
        if self.version >= 3 and self.data_file:
            ext(EXT_DATA_FILE, self.data_file.encode())
        # a LUKS header is named in version 2 images too
        if self.crypto_header:
            ext(EXT_CRYPTO, struct.pack(">QQ", *self.crypto_header))
        if self.version >= 3:
            if include_feature_table:
                table = self.feature_table or FEATURE_NAMES
                ext(EXT_FEATURE_TABLE, b"".join(
                    struct.pack(">BB46s", t, b, n.encode()) for t, b, n in table))
            if self.bitmaps_ext is not None:
                ext(EXT_BITMAPS, self.bitmaps_ext)
            for e in self.unknown_extensions:
                ext(e.type, e.data)
        exts.extend(bytes(8))  # end of extensions
        name = self.backing_file.encode() if self.backing_file else b""
        if name:
            self.backing_file_offset = header_length + len(exts)
            self.backing_file_size = len(name)
        else:
            self.backing_file_offset = self.backing_file_size = 0
        out = bytearray(V2_HEADER.pack(
            QCOW_MAGIC, self.version, self.backing_file_offset, self.backing_file_size,
            self.cluster_bits, self.size, self.crypt_method, self.l1_size, self.l1_table_offset,
            self.refcount_table_offset, self.refcount_table_clusters, self.nb_snapshots,
            self.snapshots_offset,
        ))
        if self.version >= 3:
            out += V3_EXTRA.pack(self.incompatible_features, self.compatible_features,
                                 self.autoclear_features, self.refcount_order, header_length)
            if header_length > V3_HEADER_LENGTH:
                out.append(self.compression_type)
            out += bytes(header_length - len(out))
        out += exts + name
        if len(out) > self.cluster_size:
            raise QimgError("Header and extensions do not fit in one cluster")
        return bytes(out)
