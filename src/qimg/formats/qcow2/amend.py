"""qcow2 amend (qcow2_amend_options): change compat, refcount width, lazy
refcounts and size of an existing image in place.

The steps run in QEMU's order: upgrade first (later steps may need v3),
then the refcount width, a header rewrite, the backing-file check, lazy
refcounts, the size, and the downgrade last (after the other steps removed
what v2 cannot hold).

Changing the refcount width (qcow2_change_refcount_order) is crash safe:
new refcount blocks and the new table are allocated in the old structures
and written first; one header write switches to them; only then are the old
blocks and table freed, in the new structures.  A crash before the switch
leaves the old structures valid (with leaked clusters), after it the new.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from qimg.block.options import BOOL, NUMBER, SIZE, STRING, OptionSpec
from qimg.errors import QimgError, UnsupportedError
from qimg.formats.qcow2 import header as H

if TYPE_CHECKING:
    import numpy as np

    from qimg.formats.qcow2.driver import Qcow2Driver

#: qcow2_amend_opts, in QEMU's order (the order errors are found in)
AMEND_OPTS: list[OptionSpec] = [
    OptionSpec("encrypt.state", STRING, "Select new state of affected keyslots (active/inactive)"),
    OptionSpec("encrypt.keyslot", NUMBER, "Select a single keyslot to modify explicitly"),
    OptionSpec("encrypt.old-secret", STRING, "Select all keyslots that match this password"),
    OptionSpec("encrypt.new-secret", STRING, "New secret to set in the matching keyslots. Empty string to erase"),
    OptionSpec("encrypt.iter-time", NUMBER, "Time to spend in PBKDF in milliseconds"),
    OptionSpec("size", SIZE, "Virtual disk size"),
    OptionSpec("compat", STRING, "Compatibility level (v2 [0.10] or v3 [1.1])"),
    OptionSpec("backing_file", STRING, "File name of a base image"),
    OptionSpec("backing_fmt", STRING, "Image format of the base image"),
    OptionSpec("data_file", STRING, "File name of an external data file"),
    OptionSpec("data_file_raw", BOOL, "The external data file must stay valid as a raw image"),
    OptionSpec("lazy_refcounts", BOOL, "Postpone refcount updates"),
    OptionSpec("refcount_bits", NUMBER, "Width of a reference count entry in bits"),
]

QCOW_MAX_REFTABLE_SIZE = 8 << 20
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_ZERO = 1
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

StatusFn = Callable[[int, int], None]


class _Helper:
    """qcow2_amend_helper_cb: one overall progress over several operations,
    projecting the work of operations not started from those done."""

    UPGRADING, UPDATING_ENCRYPTION, CHANGING_REFCOUNT_ORDER, DOWNGRADING = 1, 2, 3, 4

    def __init__(self, status: StatusFn | None, total_operations: int) -> None:
        self.status = status
        self.total = total_operations
        self.current = 0
        self.last = 0
        self.completed = 0
        self.offset_completed = 0
        self.last_work_size = 0

    def __call__(self, offset: int, work_size: int) -> None:
        if self.status is None:
            return
        if self.current != self.last:
            if self.last:
                self.offset_completed += self.last_work_size
                self.completed += 1
            self.last = self.current
        self.last_work_size = work_size
        current_work = self.offset_completed + work_size
        projected = current_work * (self.total - self.completed - 1) // (self.completed + 1)
        self.status(self.offset_completed + offset, current_work + projected)


# ---- header ------------------------------------------------------------------------
def write_header(d: "Qcow2Driver") -> None:
    """Rewrite the header cluster from d.header (qcow2_update_header)."""
    h = d.header
    cs = d.cluster_size
    buf = _pack_v2_keeping_bitmaps(h) if h.version == 2 and h.bitmaps_ext else \
        h.pack(include_feature_table=cs > 4096)
    d.file.pwrite(0, buf + bytes(cs - len(buf)))
    d.file.flush()


def _pack_v2_keeping_bitmaps(h: H.QCowHeader) -> bytes:
    """A v2 header that keeps the bitmaps extension, as QEMU writes it after
    a downgrade (the cleared autoclear bit makes readers ignore it)."""
    import struct

    def ext(etype: int, data: bytes) -> bytes:
        return struct.pack(">II", etype, len(data)) + data + bytes(-len(data) % 8)

    exts = ext(H.EXT_BACKING_FORMAT, h.backing_format.encode()) if h.backing_format else b""
    if h.crypto_header:
        exts += ext(H.EXT_CRYPTO, struct.pack(">QQ", *h.crypto_header))
    exts += ext(H.EXT_BITMAPS, h.bitmaps_ext or b"") + bytes(8)
    name = h.backing_file.encode() if h.backing_file else b""
    h.backing_file_offset = H.V2_HEADER_LENGTH + len(exts) if name else 0
    h.backing_file_size = len(name)
    head = H.V2_HEADER.pack(H.QCOW_MAGIC, 2, h.backing_file_offset, h.backing_file_size, h.cluster_bits,
                            h.size, h.crypt_method, h.l1_size, h.l1_table_offset, h.refcount_table_offset,
                            h.refcount_table_clusters, h.nb_snapshots, h.snapshots_offset)
    return head + exts + name


# ---- option parsing ------------------------------------------------------------------
def _settle(d: "Qcow2Driver", o: dict[str, Any]) -> dict[str, Any]:
    """Check the given options in amend_opts order, with QEMU's messages."""
    h = d.header
    new_version = h.version
    refcount_bits = h.refcount_bits
    lazy = bool(h.compatible_features & H.COMPAT_LAZY_REFCOUNTS)
    encryption_update = False
    for spec in AMEND_OPTS:
        name = spec.name
        if name not in o:
            continue
        value = o[name]
        if name.startswith("encrypt."):
            if not h.crypt_method:
                raise QimgError("Can't amend encryption options - encryption not present")
            if h.crypt_method != 2 or d.crypto is None:
                raise UnsupportedError("Only LUKS encryption options can be amended")
            encryption_update = True
            continue
        if name == "compat":
            if value in ("0.10", "v2"):
                new_version = 2
            elif value in ("1.1", "v3"):
                new_version = 3
            else:
                raise QimgError(f"Unknown compatibility level {value}")
        elif name == "lazy_refcounts":
            lazy = value
        elif name == "refcount_bits":
            if value <= 0 or value > 64 or value & (value - 1):
                raise QimgError("Refcount width must be a power of two and may not exceed 64 bits")
            refcount_bits = value
        elif name == "data_file":
            if value and not h.incompatible_features & H.INCOMPAT_DATA_FILE:
                raise QimgError("data-file can only be set for images that use an external data file")
        elif name == "data_file_raw":
            if value and not h.autoclear_features & H.AUTOCLEAR_DATA_FILE_RAW:
                raise QimgError("data-file-raw cannot be set on existing images")
    return {"version": new_version, "refcount_bits": refcount_bits, "lazy": lazy, "encryption": encryption_update,
            "data_file_raw": o.get("data_file_raw", bool(h.autoclear_features & H.AUTOCLEAR_DATA_FILE_RAW))}


def amend(d: "Qcow2Driver", o: dict[str, Any], status: StatusFn | None = None, force: bool = False) -> None:
    """Apply amend options ``o`` (typed values, only those given)."""
    h = d.header
    s = _settle(d, o)
    old_version, new_version = h.version, s["version"]
    refcount_bits = s["refcount_bits"]
    helper = _Helper(status, (new_version != old_version) + (h.refcount_bits != refcount_bits) + s["encryption"])
    d.flush_metadata()
    if new_version > old_version:
        helper.current = _Helper.UPGRADING
        _upgrade(d, helper)
    if s["encryption"]:
        from qimg.crypto.amend import amend_volume

        # key slots change in the LUKS header's clusters (qcrypto_block_amend_options)
        helper.current = _Helper.UPDATING_ENCRYPTION
        read, write = d.crypto_header_io()
        amend_volume(d.crypto, o, read, write, force, "encrypt.")
    if h.refcount_bits != refcount_bits:
        if new_version < 3 and refcount_bits != 16:
            raise QimgError("Refcount widths other than 16 bits require compatibility level 1.1 or above "
                            "(use compat=1.1 or greater)")
        helper.current = _Helper.CHANGING_REFCOUNT_ORDER
        change_refcount_order(d, refcount_bits.bit_length() - 1, helper)
    if "data_file" in o:
        # only the name changes (an empty one drops it): the data file
        # itself stays open and untouched
        h.data_file = o["data_file"] or None
    if s["data_file_raw"]:
        h.autoclear_features |= H.AUTOCLEAR_DATA_FILE_RAW
    else:
        h.autoclear_features &= ~H.AUTOCLEAR_DATA_FILE_RAW
    write_header(d)
    backing_file, backing_fmt = o.get("backing_file"), o.get("backing_fmt")
    # qemu_opt_get gives "" for an empty value: that is a change too
    if backing_file is not None or backing_fmt is not None:
        if backing_file != h.backing_file or backing_fmt != h.backing_format:
            raise QimgError("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.")
    lazy_now = bool(h.compatible_features & H.COMPAT_LAZY_REFCOUNTS)
    if s["lazy"] != lazy_now:
        if s["lazy"]:
            if new_version < 3:
                raise QimgError("Lazy refcounts only supported with compatibility level 1.1 and above "
                                "(use compat=1.1 or greater)")
            h.compatible_features |= H.COMPAT_LAZY_REFCOUNTS
        else:
            # the image is clean here: a dirty one was repaired on open
            h.compatible_features &= ~H.COMPAT_LAZY_REFCOUNTS
        write_header(d)
    if o.get("size"):
        d.truncate(o["size"], "off", shrink=True)
        d.flush_metadata()
    if new_version < old_version:
        helper.current = _Helper.DOWNGRADING
        _downgrade(d, helper)


# ---- compat ------------------------------------------------------------------------
def _upgrade(d: "Qcow2Driver", helper: _Helper) -> None:
    from qimg.formats.qcow2 import snapshot

    h = d.header
    helper(0, 2)
    # v3 needs the 64-bit VM state size and the disk size in every entry
    snaps = d.snapshots
    if any(sn.extra_data_size < 16 for sn in snaps):
        snapshot.write_table(d, snaps)
    helper(1, 2)
    h.version = 3
    h.header_length = H.V3_HEADER_LENGTH_COMPRESSION
    write_header(d)
    helper(2, 2)


def _downgrade(d: "Qcow2Driver", helper: _Helper) -> None:
    h = d.header
    if h.refcount_order != 4:
        raise UnsupportedError("compat=0.10 requires refcount_bits=16")
    if h.data_file or h.incompatible_features & H.INCOMPAT_DATA_FILE:
        raise UnsupportedError("Cannot downgrade an image with a data file")
    snaps = d.snapshots
    for sn in snaps:
        if sn.vm_state_size > 0xFFFFFFFF or sn.disk_size != d.size:
            raise UnsupportedError("Internal snapshots prevent downgrade of image")
    incompat = h.incompatible_features & ~H.INCOMPAT_DIRTY & ~H.INCOMPAT_COMPRESSION
    if incompat:
        raise UnsupportedError("Cannot downgrade an image with incompatible features 0x%x set" % incompat)
    h.compatible_features = 0
    h.autoclear_features = 0
    expand_zero_clusters(d, helper)
    if h.incompatible_features & H.INCOMPAT_COMPRESSION:
        if _has_compressed_clusters(d):
            raise UnsupportedError("Cannot downgrade an image with zstd compression type and existing "
                                   "compressed clusters")
        h.incompatible_features &= ~H.INCOMPAT_COMPRESSION
        h.compression_type = H.COMPRESSION_ZLIB
    h.incompatible_features = 0
    h.version = 2
    h.header_length = H.V2_HEADER_LENGTH
    write_header(d)
    # the bitmaps loaded for writing are still stored on close (a new
    # directory in the extension a v2 header keeps), as QEMU does; readers
    # then ignore them, as v2 has no autoclear bit to vouch for them


def _has_compressed_clusters(d: "Qcow2Driver") -> bool:
    import numpy as np

    from qimg.formats.qcow2.cluster import COMPRESSED, classify

    m = d.map
    for i in np.flatnonzero(m.l1 & np.uint64(L2E_OFFSET_MASK)):
        if (classify(m.l2_table(m.l2_offset(int(i)))) == COMPRESSED).any():
            return True
    return False


def expand_zero_clusters(d: "Qcow2Driver", helper: _Helper) -> None:
    """Turn zero clusters into what v2 can express (qcow2_expand_zero_clusters),
    in the active L1 table and then every snapshot's: preallocated ones
    become data clusters filled with zeroes; plain ones are dropped without
    a backing file, else allocated and zeroed.  A cluster allocated into an
    L2 table shared with snapshots gets the table's refcount."""
    import numpy as np

    from qimg.formats.qcow2.cluster import L1E_OFFSET_MASK

    m = d.map
    snaps = d.snapshots
    tables = [m.l1] + [np.frombuffer(d.file.pread(sn.l1_table_offset, sn.l1_size * 8), dtype=">u8")
                       .astype(np.uint64) for sn in snaps]
    total = sum(len(t) for t in tables)
    visited = 0
    for l1 in tables:
        for i, entry in enumerate(l1.tolist()):
            l2_off = entry & L1E_OFFSET_MASK
            if l2_off:
                _expand_l2(d, l2_off)
            visited += 1
            helper(visited, total)


def _expand_l2(d: "Qcow2Driver", l2_off: int) -> None:
    import numpy as np

    from qimg.formats.qcow2.cluster import ZERO_ALLOC, ZERO_PLAIN, classify

    m, refs = d.map, d.refs
    cs = d.cluster_size
    tab = m.l2_table(l2_off)
    kinds = classify(tab)
    zero = np.flatnonzero((kinds == ZERO_PLAIN) | (kinds == ZERO_ALLOC))
    if not len(zero):
        return
    l2_refcount = refs.get(l2_off // cs)
    for j in zero.tolist():
        if kinds[j] == ZERO_PLAIN:
            if d.backing is None:
                tab[j] = 0
                continue
            host = refs.alloc(cs)
            if l2_refcount > 1:
                refs.update(host, cs, l2_refcount - 1)
        else:
            host = int(tab[j]) & L2E_OFFSET_MASK
        refs.flush()
        # bdrv_pwrite_zeroes without BDRV_REQ_MAY_UNMAP: the cluster stays
        # allocated in the file (no hole), so map calls it data afterwards
        zero_range = getattr(d.data_file, "zero_range", None)
        if zero_range is not None:
            zero_range(host, cs)
        else:
            d.data_file.write_zeroes(host, cs)
        tab[j] = np.uint64(host | (QCOW_OFLAG_COPIED if l2_refcount == 1 else 0))
    m.mark_dirty(l2_off)
    d.flush_metadata()


# ---- refcount width ------------------------------------------------------------------
def _nonzero_new_blocks(d: "Qcow2Driver", new_block_size: int,
                        new_bits: int) -> tuple["np.ndarray | None", tuple[int, str] | None]:
    """Indices of the new refcount blocks that will hold any nonzero
    refcount; or, when a refcount does not fit the new width, the reftable
    index where the walk meets it and QEMU's message."""
    import numpy as np

    refs = d.refs
    obs = refs.block_size
    found = []
    for ti in np.flatnonzero(refs.table & np.uint64(REFT_OFFSET_MASK)).tolist():
        rc = refs.get_range(ti * obs, obs)
        nz = np.flatnonzero(rc)
        if not len(nz):
            continue
        if new_bits < 64:
            big = np.flatnonzero(rc >> np.uint64(new_bits))
            if len(big):
                k = int(big[0])
                offset = (ti * obs + k) << d.cluster_bits
                return None, (ti, "Cannot decrease refcount entry width to %d bits: Cluster at offset %#x has a "
                              "refcount of %d" % (new_bits, offset, int(rc[k])))
        found.append(np.unique((nz + ti * obs) // new_block_size))
    if not found:
        return np.zeros(0, dtype=np.int64), None
    return np.unique(np.concatenate(found)), None


def _encode(values: np.ndarray, order: int) -> bytes:
    import numpy as np

    if order >= 3:
        return values.astype({3: ">u1", 4: ">u2", 5: ">u4", 6: ">u8"}[order]).tobytes()
    width = 1 << order
    per = 8 // width
    shifts = (np.arange(per, dtype=np.uint8) * width)[None, :]
    packed = np.bitwise_or.reduce(values.astype(np.uint8).reshape(-1, per) << shifts, axis=1)
    return packed.astype(np.uint8).tobytes()


def _walk_progress(helper: _Helper, index: int, total: int, rts: int, upto: int | None = None) -> None:
    """The status calls walk_over_reftable makes, one per reftable entry
    (up to entry ``upto``, where a walk stops early)."""
    if helper.status is not None:
        for i in range(rts if upto is None else upto):
            helper(index * rts + i, total * rts)


def change_refcount_order(d: "Qcow2Driver", order: int, helper: _Helper) -> None:
    """Rewrite the refcount structures with 2^order-bit entries (see the
    module doc for the crash-safe order of writes)."""
    import numpy as np

    h = d.header
    refs = d.refs
    cs = d.cluster_size
    new_bits = 1 << order
    new_block_size = 1 << (d.cluster_bits + 3 - order)
    table = np.zeros(0, dtype=np.uint64)
    table_offset = allocated_size = 0
    walk = 0
    while True:
        total_walks = max(walk + 2, 3)
        rts = len(refs.table)
        blocks, error = _nonzero_new_blocks(d, new_block_size, new_bits)
        if error is not None:
            _walk_progress(helper, walk, total_walks, rts, error[0] + 1)
            raise QimgError(error[1])
        _walk_progress(helper, walk, total_walks, rts)
        allocated = False
        for k in blocks.tolist():
            if k >= len(table):
                size = -(-(k + 1) // (cs // 8)) * (cs // 8)
                if size > QCOW_MAX_REFTABLE_SIZE // 8:
                    raise UnsupportedError("This operation would make the refcount table grow beyond the "
                                           "maximum size supported by QEMU, aborting")
                table = np.concatenate([table, np.zeros(size - len(table), dtype=np.uint64)])
            if not table[k]:
                table[k] = refs.alloc(cs)
                allocated = True
        walk += 1
        helper(walk * len(refs.table), total_walks * len(refs.table))
        if not allocated:
            break
        if table_offset:
            refs.free(table_offset, allocated_size * 8)
        table_offset = refs.alloc(len(table) * 8)
        allocated_size = len(table)
    # Every refcount is final now: write the new blocks and table.
    refs.flush()
    rts = len(refs.table)
    _walk_progress(helper, walk, walk + 1, rts)
    for k in np.flatnonzero(table).tolist():
        values = refs.get_range(k * new_block_size, new_block_size)
        d.file.pwrite(int(table[k]), _encode(values, order))
    d.file.pwrite(table_offset, table.astype(">u8").tobytes())
    d.file.flush()
    old_table, old_offset = refs.table.copy(), refs.table_offset
    h.refcount_order = order
    h.refcount_table_offset = table_offset
    h.refcount_table_clusters = len(table) * 8 // cs
    write_header(d)
    # Switched: free the old structures in the new ones.
    d._refs = None
    new_refs = d.refs
    for off in (old_table & np.uint64(REFT_OFFSET_MASK))[old_table != 0].tolist():
        new_refs.free(int(off), cs)
    new_refs.free(old_offset, len(old_table) * 8)
    new_refs.flush()
    helper((walk + 1) * rts, (walk + 1) * rts)
