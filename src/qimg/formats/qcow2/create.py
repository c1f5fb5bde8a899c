"""qcow2 image creation, laid out byte for byte as qemu-img 7.2 lays it out
(qcow2_co_create): header cluster, refcount table at cluster 1, its first
refcount block at cluster 2, then the L1 table grown to the image size, then
whatever the preallocation mode allocates, with QEMU's allocator.

Errors are raised without the "FILENAME: " prefix qemu-img puts before
every create error; the create command adds it.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from qimg.block.options import BOOL, NUMBER, SIZE, STRING, OptionSpec
from qimg.errors import QimgError
from qimg.formats.qcow2 import datafile, header as H

_CLUSTER_SIZE_HELP = "qcow2 cluster size"

#: as qcow2_create_opts in block/qcow2.c (type names and help as ``-o help`` prints them)
CREATE_OPTS: list[OptionSpec] = [
    OptionSpec("size", SIZE, "Virtual disk size"),
    OptionSpec("compat", STRING, "Compatibility level (v2 [0.10] or v3 [1.1])"),
    OptionSpec("backing_file", STRING, "File name of a base image"),
    OptionSpec("backing_fmt", STRING, "Image format of the base image"),
    OptionSpec("data_file", STRING, "File name of an external data file"),
    OptionSpec("data_file_raw", BOOL, "The external data file must stay valid as a raw image"),
    OptionSpec("encryption", BOOL, "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
    OptionSpec("encrypt.format", STRING, "Encrypt the image, format choices: 'aes', 'luks'"),
    OptionSpec("encrypt.key-secret", STRING, "ID of secret providing qcow AES key or LUKS passphrase"),
    OptionSpec("encrypt.cipher-alg", STRING, "Name of encryption cipher algorithm"),
    OptionSpec("encrypt.cipher-mode", STRING, "Name of encryption cipher mode"),
    OptionSpec("encrypt.ivgen-alg", STRING, "Name of IV generator algorithm"),
    OptionSpec("encrypt.ivgen-hash-alg", STRING, "Name of IV generator hash algorithm"),
    OptionSpec("encrypt.hash-alg", STRING, "Name of encryption hash algorithm"),
    OptionSpec("encrypt.iter-time", NUMBER, "Time to spend in PBKDF in milliseconds"),
    OptionSpec("cluster_size", SIZE, _CLUSTER_SIZE_HELP, 65536),
    OptionSpec("extended_l2", BOOL, "Extended L2 tables", False),
    OptionSpec("preallocation", STRING, "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    OptionSpec("lazy_refcounts", BOOL, "Postpone refcount updates", False),
    OptionSpec("refcount_bits", NUMBER, "Width of a reference count entry in bits", 16),
    OptionSpec("compression_type", STRING, "Compression method used for image cluster compression", "zlib"),
]

_COMPAT = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_PREALLOC = ("off", "metadata", "falloc", "full")
QCOW_MAX_L1_SIZE = 32 << 20


def _validate(size: int, o: dict[str, Any]) -> dict[str, Any]:
    """Check options as qcow2_co_create_opts/qcow2_co_create do, in their
    order (the QAPI visitor's enum refusals first); returns the settled
    values."""
    if o.get("encryption") and o.get("encrypt.format") is not None:
        # qdict_rename_keys, before the QAPI visit
        raise QimgError("'encrypt.format' and its alias 'encryption' can't be used at the same time")
    compat = o.get("compat")
    if compat is None:
        version = 3
    elif compat in _COMPAT:
        version = _COMPAT[compat]
    else:
        raise QimgError(f"Parameter 'version' does not accept value '{compat}'")
    # an empty value is one the QAPI enums do not accept either
    prealloc = o.get("preallocation")
    prealloc = "off" if prealloc is None else prealloc
    if prealloc not in _PREALLOC:
        raise QimgError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
    ctype = o.get("compression_type")
    ctype = "zlib" if ctype is None else ctype
    if ctype not in ("zlib", "zstd"):
        raise QimgError(f"Parameter 'compression-type' does not accept value '{ctype}'")
    if o.get("backing_fmt") == "":
        raise QimgError("Parameter 'backing-fmt' does not accept value ''")
    luks = _encrypt_options(o)
    extl2 = bool(o.get("extended_l2"))
    if extl2 and version < 3:
        raise QimgError("Extended L2 entries are only supported with compatibility level 1.1 "
                        "and above (use version=v3 or greater)")
    cluster_size = o.get("cluster_size", 65536)
    if cluster_size is None:
        cluster_size = 65536
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 << 20:
        raise QimgError("Cluster size must be a power of two between 512 and 2048k")
    if extl2 and cluster_size < 1 << 14:
        raise QimgError("Extended L2 entries are only supported with cluster sizes of at least "
                        "16384 bytes")
    if o.get("backing_file") and prealloc != "off" and not extl2:
        raise QimgError("Backing file and preallocation can only be used at the same time if extended_l2 is on")
    if o.get("backing_fmt") and not o.get("backing_file"):
        raise QimgError("Backing format cannot be used without backing file")
    lazy = bool(o.get("lazy_refcounts"))
    if version < 3 and lazy:
        raise QimgError("Lazy refcounts only supported with compatibility level 1.1 and above "
                        "(use version=v3 or greater)")
    refcount_bits = o.get("refcount_bits")
    if refcount_bits is None:
        refcount_bits = 16
    if refcount_bits > 64 or refcount_bits <= 0 or refcount_bits & (refcount_bits - 1):
        raise QimgError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise QimgError("Different refcount widths than 16 bits require compatibility level 1.1 "
                        "or above (use version=v3 or greater)")
    datafile.validate_create(o, version)
    if version < 3 and ctype != "zlib":
        raise QimgError("Non-zlib compression type is only supported with compatibility level 1.1 "
                        "and above (use version=v3 or greater)")
    aes = luks is None and bool(o.get("encryption") or o.get("encrypt.format"))
    if aes:
        # the legacy AES scheme stores nothing but crypt_method 1; its key
        # must still be there (qcrypto_block_qcow_init)
        from qimg.crypto.cipher import legacy_aes

        legacy_aes(o.get("encrypt.key-secret"))
    if o.get("data_file_raw") and prealloc == "off":
        # the raw data file must match the metadata: map every cluster
        prealloc = "metadata"
    cluster_bits = cluster_size.bit_length() - 1
    size = (size + 511) // 512 * 512
    # an extended L2 entry takes 16 bytes, a plain one 8
    l2_shift = cluster_bits + cluster_bits - (4 if extl2 else 3)
    if ((size + (1 << l2_shift) - 1) >> l2_shift) * 8 > QCOW_MAX_L1_SIZE:
        raise QimgError("The image size is too large for file format 'qcow2' (try using a larger cluster size)")
    return dict(size=size, version=version, prealloc=prealloc, ctype=ctype, cluster_bits=cluster_bits,
                refcount_order=refcount_bits.bit_length() - 1, lazy=lazy, extl2=extl2,
                data_file=o.get("data_file") or None, data_file_raw=bool(o.get("data_file_raw")),
                backing_file=o.get("backing_file") or None, backing_fmt=o.get("backing_fmt") or None,
                luks=luks, aes=aes)


#: the encrypt.* members of each QCryptoBlockCreateOptions branch
_LUKS_MEMBERS = ("key-secret", "cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg", "iter-time")
_QCOW_MEMBERS = ("key-secret",)


def _encrypt_options(o: dict[str, Any]) -> Any:
    """The QAPI visit of the encrypt.* options: the LUKS create options
    (qimg.crypto.luks.CreateOptions), or None for no encryption or AES."""
    given = [s.name for s in CREATE_OPTS if s.name.startswith("encrypt.") and o.get(s.name) is not None]
    fmt = o.get("encrypt.format")
    if o.get("encryption"):
        fmt = "qcow"
    if fmt is None:
        if given:
            raise QimgError("Parameter 'encrypt.format' is missing")
        return None
    fmt = "qcow" if fmt == "aes" else fmt
    if fmt not in ("qcow", "luks"):
        raise QimgError(f"Parameter 'format' does not accept value '{fmt}'")
    members = _LUKS_MEMBERS if fmt == "luks" else _QCOW_MEMBERS
    opts = None
    if fmt == "luks":
        from qimg.crypto import luks

        opts = luks.create_options(o, "encrypt.")
    for name in given:
        if name != "encrypt.format" and name[len("encrypt."):] not in members:
            raise QimgError(f"Parameter '{name}' is unexpected")
    return opts


def create_image(filename: str, size: int, options: dict[str, Any]) -> None:
    """Create a qcow2 image as qemu-img create does (see module doc).

    As qcow2_co_create_opts, the image file and then the data file are
    created (emptied) before the options are checked, and any failure
    deletes both again, even files that were there before."""
    f = datafile.create_file(filename)
    data_name = options.get("data_file")
    data = None
    try:
        if data_name is not None:
            data = datafile.create_file(data_name)
            data.close()
        v = _validate(size, options)
        _write_image(f, filename, v)
    except BaseException:
        f.close()
        for name in (filename, data_name if data is not None else None):
            if name is not None:
                try:
                    os.unlink(name)
                except OSError:
                    pass
        raise
    f.close()


def _write_image(f: "Any", filename: str, v: dict[str, Any]) -> None:
    cb = v["cluster_bits"]
    cs = 1 << cb
    h = H.QCowHeader(version=v["version"], cluster_bits=cb, refcount_table_offset=cs,
                     refcount_table_clusters=1, refcount_order=v["refcount_order"])
    if v["version"] >= 3:
        h.header_length = H.V3_HEADER_LENGTH_COMPRESSION
    if v["lazy"]:
        h.compatible_features |= H.COMPAT_LAZY_REFCOUNTS
    if v["extl2"]:
        h.incompatible_features |= H.INCOMPAT_EXTL2
    if v["ctype"] == "zstd":
        h.compression_type = H.COMPRESSION_ZSTD
        h.incompatible_features |= H.INCOMPAT_COMPRESSION
    if v["data_file"]:
        h.incompatible_features |= H.INCOMPAT_DATA_FILE
        h.data_file = v["data_file"]
    if v["data_file_raw"]:
        h.autoclear_features |= H.AUTOCLEAR_DATA_FILE_RAW
    h.backing_file = v["backing_file"]
    h.backing_format = v["backing_fmt"] if v["backing_file"] else None
    # QEMU leaves the feature name table out of clusters of 4 KiB and less.
    first = h.pack(include_feature_table=cs > 4096)
    f.pwrite(0, first + bytes(cs - len(first)))
    # Refcount table with one block at cluster 2, which counts clusters 0..2.
    table = struct.pack(">Q", 2 * cs) + bytes(cs - 8)
    block = bytearray(cs)
    width = 1 << v["refcount_order"]
    for i in range(3):
        _set_refcount(block, i, 1, width)
    f.pwrite(cs, table + bytes(block))
    f.flush()
    if v["size"] and v["prealloc"] == "off" and not v["data_file"] and width == 16:
        _grow_l1(f, v, block)
    elif v["size"] or v["prealloc"] != "off":
        _grow(filename, v["size"], v["prealloc"])
    if v["luks"] is not None:
        _set_up_luks(filename, v["luks"])
    elif v["aes"]:
        f.pwrite(32, struct.pack(">I", 1))  # crypt_method


def _set_refcount(block: bytearray, index: int, value: int, width: int) -> None:
    if width >= 8:
        n = width // 8
        block[index * n:(index + 1) * n] = value.to_bytes(n, "big")
    else:
        per = 8 // width
        byte, slot = divmod(index, per)
        shift = slot * width
        block[byte] = (block[byte] & ~(((1 << width) - 1) << shift)) | (value << shift)


def _set_up_luks(filename: str, opts: Any) -> None:
    """qcow2_set_up_encryption, after the image got its size (so its LUKS
    header follows the L1 table and any preallocated clusters): clusters
    for the header, zeroed whole, the LUKS volume written into them, then
    the qcow2 header with crypt_method 2 and the extension naming them."""
    from qimg.crypto import luks
    from qimg.formats.qcow2.amend import write_header
    from qimg.formats.qcow2.driver import Qcow2Driver
    from qimg.protocols.file import File

    f = File(filename, read_only=False)
    d = None
    try:
        d = Qcow2Driver.open(f, read_only=False)
        d._modified = True
        d.header.crypt_method = 2

        def init(header_len: int) -> None:
            offset = d.refs.alloc(header_len)
            d.flush_metadata()
            d.header.crypto_header = (offset, header_len)
            # predictable content where no key slot is written
            f.zero_range(offset, -(-header_len // d.cluster_size) * d.cluster_size)

        _, write = d.crypto_header_io()
        luks.create_volume(opts, init, write, "encrypt.")
        d.flush_metadata()
        write_header(d)
        d._modified = False
    finally:
        if d is not None:
            datafile.close_data_file(d)
        f.close()


def _grow_l1(f: "Any", v: dict[str, Any], block: bytearray) -> None:
    """The image's size without preallocation: what qcow2_co_truncate does
    to the new image (an empty L1 table in the clusters after the refcount
    block, referenced in it), written straight from here, as _grow's driver
    writes it, without loading the image's metadata (and numpy with it)."""
    from qimg.formats.qcow2.driver import size_to_l1

    cs = 1 << v["cluster_bits"]
    l1_size = size_to_l1(v["size"], v["cluster_bits"], v["extl2"])
    n = -(-l1_size * 8 // cs)
    if 3 + n > cs // 2:  # the refcount block counts 16-bit refcounts
        _grow(f.filename, v["size"], v["prealloc"])
        return
    block[6:6 + 2 * n] = b"\x00\x01" * n
    f.pwrite(2 * cs, block)
    f.pwrite(3 * cs, bytes(l1_size * 8))
    f.pwrite(36, struct.pack(">IQ", l1_size, 3 * cs))
    f.pwrite(24, struct.pack(">Q", v["size"]))


def _grow(filename: str, size: int, prealloc: str) -> None:
    """Open the fresh image and give it its size (qcow2_co_truncate)."""
    from qimg.formats.qcow2.driver import Qcow2Driver
    from qimg.protocols.file import File

    f = File(filename, read_only=False)
    d = None
    try:
        d = Qcow2Driver.open(f, read_only=False)
        d._modified = True
        datafile.truncate(d, size, prealloc, False)
        d.flush_metadata()
        d._modified = False
    finally:
        if d is not None:
            datafile.close_data_file(d)
        f.close()
