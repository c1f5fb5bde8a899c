"""qcow2 external data files (docs/interop/qcow2.txt: incompatible bit 2,
autoclear bit 1 "raw external data", header extension 0x44415441).

With a data file, guest data clusters live there at their guest offset
(host offset == guest offset) and hold no refcount in the qcow2 file; the
qcow2 file keeps only metadata.  With data_file_raw the data file must
also read as the guest disk by itself, so every cluster is preallocated
and zero writes reach the data file too.

The name in the header is used as it is: qemu-img 7.2 opens it relative to
the current directory, not to the image's (checked against qemu-img), and
``info`` does not open it at all (BDRV_O_NO_IO: an untrusted image must not
make ``info`` open files it names).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qimg.errors import QimgError, UnsupportedError
from qimg.formats.qcow2 import header as H

if TYPE_CHECKING:
    from qimg.formats.qcow2.driver import Qcow2Driver
    from qimg.protocols.file import File

#: --image-opts keys naming the data file ("data-file.filename=X")
_OPT_FILENAME = ("data-file.filename", "data-file.file.filename")


def has_data_file(h: H.QCowHeader) -> bool:
    """The image keeps its guest data in an external file."""
    return bool(h.incompatible_features & H.INCOMPAT_DATA_FILE)


def is_raw(h: H.QCowHeader) -> bool:
    """The data file must stay a valid raw image (data_file_raw=on)."""
    return bool(h.autoclear_features & H.AUTOCLEAR_DATA_FILE_RAW)


def external(d: "Qcow2Driver") -> bool:
    """Guest data goes to a file other than the image file."""
    return d.data_file is not d.file


def open_data_file(d: "Qcow2Driver", options: dict[str, Any]) -> None:
    """Open the data file as qcow2_do_open does and set ``d.data_file``
    (left as the image file when there is none)."""
    h = d.header
    if options.get("no_io"):
        return  # info: metadata only, the data file stays closed
    bare = options.get("data-file")
    if isinstance(bare, str):
        # a node reference; we have no named nodes to find
        raise QimgError(f"Cannot find device='{bare}' nor node-name='{bare}'")
    given = next((options[k] for k in _OPT_FILENAME if options.get(k)), None)
    if has_data_file(h):
        name = given or h.data_file
        if name is None:  # (an empty name is a name, refused by the file protocol)
            raise QimgError("'data-file' is required for this image")
        from qimg.protocols.file import File

        d.data_file = File(name, read_only=d.read_only)
        return
    if given:
        raise QimgError("'data-file' can only be set for images with an external data file")
    if is_raw(h):
        raise QimgError("data-file-raw requires a data file")


def close_data_file(d: "Qcow2Driver") -> None:
    if external(d):
        d.data_file.close()


def info_fields(h: H.QCowHeader) -> dict[str, Any]:
    """The data-file entries of ``info``'s format-specific data."""
    out: dict[str, Any] = {}
    if h.data_file is not None:
        out["data-file"] = h.data_file
    if has_data_file(h):
        out["data-file-raw"] = is_raw(h)
    return out


def refuse(d: "Qcow2Driver", what: str) -> None:
    """Operations QEMU refuses on images with a data file (-ENOTSUP)."""
    if has_data_file(d.header):
        raise UnsupportedError(what)


# ---- writes ---------------------------------------------------------------------
def zero_data(d: "Qcow2Driver", offset: int, length: int) -> None:
    """A raw data file must read as the guest disk: zero it before the zero
    flags are set (qcow2_subcluster_zeroize), as QEMU does."""
    if external(d) and is_raw(d.header):
        length = min(length, d.size - offset)
        if length > 0:
            d.data_file.write_zeroes(offset, length)


def truncate(d: "Qcow2Driver", size: int, prealloc: str, shrink: bool) -> None:
    """qcow2_co_truncate with a data file: the qcow2 file gets the metadata
    (preallocated L2 tables for anything but ``off``, always for a raw
    data file), the data file the size.  Without a data file it is the
    plain qcow2 resize."""
    from qimg.formats.qcow2 import io

    if not external(d):
        io.truncate(d, size, prealloc, shrink)
        return
    old = d.size
    if size >= old and prealloc == "off" and is_raw(d.header):
        prealloc = "metadata"
    if prealloc not in ("off", "metadata", "falloc", "full") or size < old:
        io.truncate(d, size, prealloc, shrink)
        if size < old:
            d.data_file.truncate(size)
        return
    io.truncate(d, size, "off" if prealloc == "off" else "metadata", shrink)
    f = d.data_file
    if prealloc == "off":
        f.truncate(size)
        return
    cs = d.cluster_size
    if size > old and size % cs:
        # the partial last cluster is allocated whole: QEMU copies on write
        # its tail (zeroes) into the data file, which extends it
        end = -(-size // cs) * cs
        f.pwrite(size, bytes(end - size))
    if size > f.size:
        f.truncate(size, "off" if prealloc == "metadata" else prealloc)


# ---- creation ---------------------------------------------------------------------
def validate_create(o: dict[str, Any], version: int) -> None:
    """qcow2_co_create's checks of data_file/data_file_raw, in its order."""
    if o.get("data_file_raw") and not o.get("data_file"):
        raise QimgError("data-file-raw requires data-file")
    if o.get("data_file_raw") and o.get("backing_file"):
        raise QimgError("Backing file and data-file-raw cannot be used at the same time")
    if o.get("data_file") and version < 3:
        raise QimgError("External data files are only supported with compatibility level 1.1 and above "
                        "(use version=v3 or greater)")


def create_file(name: str) -> "File":
    """Create (or empty) the data file, as the file protocol's create does;
    it gets its size when the new image is resized."""
    from qimg.protocols.file import File

    try:
        return File(name, read_only=False, create=True)
    except QimgError as e:
        opened = f"Could not open '{name}': "
        if e.message.startswith(opened):
            raise QimgError(f"Could not create '{name}': " + e.message[len(opened):], e.code) from None
        raise


def compressed_entry(d: "Qcow2Driver", offset: int) -> None:
    """A compressed cluster cannot live in an external data file: the image
    is corrupt (qcow2_get_host_offset signals it); refuse the request."""
    from qimg.formats.qcow2.cluster import hx

    m = d.map
    ci = offset >> d.cluster_bits
    d.signal_corruption(f"Compressed cluster entry found in image with external data file "
                        f"(L2 offset: {m.l2_offset(ci >> m.l2_bits):#x}, L2 index: {hx(ci & (m.l2_size - 1))})")
