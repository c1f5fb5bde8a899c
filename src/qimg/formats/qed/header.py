"""The QED header (docs/interop/qed_spec.txt): 64 little-endian bytes at
offset 0, the backing file name after it, in the first ``header_size``
clusters.  Limits and their checks as QEMU's block/qed.c."""

from __future__ import annotations

import struct

from qimg.record import dataclass

QED_MAGIC = 0x00444551  # "QED\0"
HEADER = struct.Struct("<IIIIQQQQQII")

QED_F_BACKING_FILE = 0x01
QED_F_NEED_CHECK = 0x02
QED_F_BACKING_FORMAT_NO_PROBE = 0x04
QED_FEATURE_MASK = QED_F_BACKING_FILE | QED_F_NEED_CHECK | QED_F_BACKING_FORMAT_NO_PROBE
QED_COMPAT_FEATURE_MASK = 0
QED_AUTOCLEAR_FEATURE_MASK = 0

QED_MIN_CLUSTER_SIZE = 4 * 1024
QED_MAX_CLUSTER_SIZE = 64 * 1024 * 1024
QED_DEFAULT_CLUSTER_SIZE = 64 * 1024
QED_MIN_TABLE_SIZE = 1
QED_MAX_TABLE_SIZE = 16
QED_DEFAULT_TABLE_SIZE = 4

#: L2 entry values that are not cluster offsets
UNALLOCATED = 0
ZERO_CLUSTER = 1

SECTOR = 512
UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1


@dataclass
class QedHeader:
    magic: int
    cluster_size: int
    table_size: int
    header_size: int
    features: int
    compat_features: int
    autoclear_features: int
    l1_table_offset: int
    image_size: int
    backing_filename_offset: int
    backing_filename_size: int

    @classmethod
    def parse(cls, buf: bytes) -> "QedHeader":
        buf = bytes(buf[:HEADER.size]) + bytes(max(0, HEADER.size - len(buf)))
        return cls(*HEADER.unpack(buf))

    def pack(self) -> bytes:
        return HEADER.pack(self.magic, self.cluster_size, self.table_size, self.header_size,
                           self.features, self.compat_features, self.autoclear_features,
                           self.l1_table_offset, self.image_size,
                           self.backing_filename_offset, self.backing_filename_size)


def _power_of_2(n: int) -> bool:
    return n & (n - 1) == 0


def cluster_size_valid(cluster_size: int) -> bool:
    return QED_MIN_CLUSTER_SIZE <= cluster_size <= QED_MAX_CLUSTER_SIZE and _power_of_2(cluster_size)


def table_size_valid(table_size: int) -> bool:
    return QED_MIN_TABLE_SIZE <= table_size <= QED_MAX_TABLE_SIZE and _power_of_2(table_size)


def max_image_size(cluster_size: int, table_size: int) -> int:
    # uint64 arithmetic as QEMU's: the largest geometry wraps to 0
    entries = table_size * cluster_size // 8
    return (entries * cluster_size * entries) & UINT64_MAX


def image_size_valid(image_size: int, cluster_size: int, table_size: int) -> bool:
    return image_size % SECTOR == 0 and image_size <= max_image_size(cluster_size, table_size)
