"""Creating QED images, byte-identical to qemu-img create (bdrv_qed_co_create):
the header, the backing file name right after it, a zeroed L1 table in
the clusters after the one-cluster header."""

from __future__ import annotations

from typing import Any

from qimg.block.options import SIZE, STRING, OptionSpec
from qimg.errors import QimgError
from qimg.formats.qed import header as H
from qimg.formats.raw import RawDriver
from qimg.protocols.file import File

CREATE_OPTS = [
    OptionSpec("size", SIZE, "Virtual disk size"),
    OptionSpec("backing_file", STRING, "File name of a base image"),
    OptionSpec("backing_fmt", STRING, "Image format of the base image"),
    OptionSpec("cluster_size", SIZE, "Cluster size (in bytes)", def_value_str=str(H.QED_DEFAULT_CLUSTER_SIZE)),
    OptionSpec("table_size", SIZE, "L1/L2 table size (in clusters)"),
]

#: QEMU 7.2's block drivers (the BlockdevDriver enum a backing format must
#: name; qcow checks the same names with bdrv_find_format)
BLOCK_DRIVERS = frozenset(
    "blkdebug blklogwrites blkreplay blkverify bochs cloop compress copy-before-write "
    "copy-on-read dmg file ftp ftps gluster host_cdrom host_device http https io_uring "
    "iscsi iser luks nbd nfs null-aio null-co nvme nvme-io_uring parallels preallocate "
    "qcow qcow2 qed quorum raw rbd replication snapshot-access ssh throttle vdi vhdx "
    "vmdk vpc vvfat".split()
)


def create_image(filename: str, size: int, options: dict[str, Any]) -> None:
    # the file protocol creates (and empties) the file, with its own
    # preallocation option, before QED validates
    RawDriver.create(filename, 0, {"preallocation": options.get("preallocation")})
    backing_fmt = options.get("backing_fmt")
    if backing_fmt is not None and backing_fmt not in BLOCK_DRIVERS:
        raise QimgError(f"Parameter 'backing-fmt' does not accept value '{backing_fmt}'")
    cluster_size = options.get("cluster_size", H.QED_DEFAULT_CLUSTER_SIZE)
    table_size = options.get("table_size", H.QED_DEFAULT_TABLE_SIZE)
    size = (size + H.SECTOR - 1) // H.SECTOR * H.SECTOR
    if not H.cluster_size_valid(cluster_size):
        raise QimgError("QED cluster size must be within range [%u, %u] and power of 2"
                        % (H.QED_MIN_CLUSTER_SIZE, H.QED_MAX_CLUSTER_SIZE))
    if not H.table_size_valid(table_size):
        raise QimgError("QED table size must be within range [%u, %u] and power of 2"
                        % (H.QED_MIN_TABLE_SIZE, H.QED_MAX_TABLE_SIZE))
    if not H.image_size_valid(size, cluster_size, table_size):
        raise QimgError("QED image size must be a non-zero multiple of cluster size and less than %u bytes"
                        % H.max_image_size(cluster_size, table_size))
    backing = options.get("backing_file")
    name = backing.encode() if backing is not None else b""
    features = 0
    if backing is not None:
        features |= H.QED_F_BACKING_FILE
        if backing_fmt == "raw":
            features |= H.QED_F_BACKING_FORMAT_NO_PROBE
    header = H.QedHeader(H.QED_MAGIC, cluster_size, table_size, 1, features, 0, 0,
                         cluster_size, size, H.HEADER.size if backing is not None else 0, len(name))
    with File(filename, read_only=False) as f:
        f.truncate(0)
        f.pwrite(0, header.pack() + name)
        f.pwrite(cluster_size, bytes(cluster_size * table_size))
