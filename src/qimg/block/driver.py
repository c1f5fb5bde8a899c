"""The format driver interface.

A driver opens over a protocol node (a ``File``) and knows one image format's
layout; it knows nothing of the command line.  The generic layer
(``qimg.block.image.Image``) owns the backing chain: a driver reports which
ranges it does not allocate and the Image reads those from the backing node.

Capabilities are declared as class attributes, never found by try/except: the
commands print qemu-img's refusal when a capability is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from qimg.block.options import OptionSpec
from qimg.block.status import ALLOCATED, DATA, OFFSET_VALID, Extent
from qimg.errors import UnsupportedError

if TYPE_CHECKING:
    from qimg.block.image import Image
    from qimg.protocols.file import File

#: the most zeroes the fallback write_zeroes writes at once
ZERO_CHUNK = 4 << 20


class Driver:
    #: the name ``-f``/``-O`` use and ``info`` prints as "file format"
    format_name: ClassVar[str] = ""
    #: ``-o`` options for create, in the order qemu-img lists them
    create_opts: ClassVar[list[OptionSpec]] = []
    #: ``-o`` options ``amend`` accepts (None: the format cannot amend)
    amend_opts: ClassVar[list[OptionSpec] | None] = None
    #: what the format can do
    supports_backing: ClassVar[bool] = False
    supports_create: ClassVar[bool] = True
    supports_write: ClassVar[bool] = True
    #: a read-only format whose QEMU driver refuses a read-write open itself
    #: (bdrv_apply_auto_read_only): "Image is read-only", before any lock
    refuses_write_open: ClassVar[bool] = False
    supports_resize: ClassVar[bool] = False
    supports_compression: ClassVar[bool] = False
    supports_check: ClassVar[bool] = False
    supports_snapshots: ClassVar[bool] = False
    #: the format stores persistent dirty bitmaps (``dirty_bitmaps()``)
    supports_bitmaps: ClassVar[bool] = False
    #: compressed output ends with qemu-img's empty compressed write, on
    #: which the format rounds its file up to whole sectors (qcow2 does;
    #: qcow refuses that write and leaves the file as it is)
    aligns_compressed_end: ClassVar[bool] = True
    #: the format answers QEMU's bdrv_get_info: without it ``info`` shows
    #: neither dirty-flag nor cluster-size
    supports_get_info: ClassVar[bool] = True
    #: granularity of allocation reported by ``info`` as cluster-size, if any
    cluster_size: int | None = None

    def __init__(self, file: "File", read_only: bool) -> None:
        self.file = file
        self.read_only = read_only
        #: the backing node, attached by Image after open (None: no backing)
        self.backing: "Image | None" = None
        #: virtual size in bytes
        self.size = 0

    # ---- probing and creation (class level) ----------------------------
    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        """Score 0..100 that ``header`` (the first 2 KiB or less) is ours."""
        return 0

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        """Create an image; ``options`` hold typed values from create_opts."""
        raise UnsupportedError(f"Format driver '{cls.format_name}' does not support image creation")

    @classmethod
    def measure(cls, size: int | None, options: dict[str, Any], source: "Image | None") -> dict[str, int]:
        """What a new image of this format needs (``qemu-img measure``):
        {"required": N, "fully-allocated": N} and "bitmaps" where qemu-img
        prints it; for ``size`` bytes, or for a copy of ``source``.
        ``options`` hold typed values from create_opts (and the file
        protocol's: size, preallocation, nocow, extent_size_hint)."""
        raise UnsupportedError(f"Block driver '{cls.format_name}' does not support size measurement")

    @classmethod
    def open(cls, file: "File", read_only: bool = True, options: dict[str, Any] | None = None) -> "Driver":
        drv = cls(file, read_only)
        drv.do_open(options or {})
        return drv

    def do_open(self, options: dict[str, Any]) -> None:
        """Parse the on-disk metadata; raise QimgError for bad images."""

    @property
    def data_node(self) -> "File":
        """The file that host offsets in extents refer to (qcow2's external
        data file overrides this)."""
        return self.file

    # ---- backing file fields -------------------------------------------
    @property
    def backing_filename(self) -> str | None:
        """The backing file name as stored in the image (not resolved)."""
        return None

    @property
    def backing_format(self) -> str | None:
        return None

    def change_backing_file(self, backing_file: str | None, backing_format: str | None) -> None:
        """Rewrite the backing file name and format in the image's metadata
        (None: no backing file), as rebase needs; in one metadata write where
        the format allows, so a crash leaves the old or the new name."""
        raise UnsupportedError("Operation not supported")

    def make_empty(self) -> None:
        """Drop every allocation of this layer so that it reads all from its
        backing file (qemu's bdrv_make_empty, used by commit).  Formats that
        cannot do it raise UnsupportedError, which commit ignores as qemu-img
        ignores ENOTSUP."""
        raise UnsupportedError("Operation not supported")

    # ---- I/O -------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> Extent:
        """State of the run starting at ``offset``, at most ``length`` long.

        Must return one extent, as long as possible (merging neighbours of
        the same state), never crossing ``self.size``.  Ranges not ALLOCATED
        read from the backing node.
        """
        return Extent(offset, length, DATA | ALLOCATED | OFFSET_VALID, offset, self.file.filename)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of this layer; unallocated ranges read as zeroes here (the
        Image overlays the backing node on them)."""
        raise NotImplementedError

    def write(self, offset: int, data: bytes) -> None:
        raise UnsupportedError("Image is read-only")

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Make the range read as zeroes (a format may keep it sparse).
        Here, for a format without zero blocks, as QEMU's fallback does:
        zeroes written (allocating), a bounded buffer at a time."""
        zero = bytes(min(length, ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(zero), end - offset)
            self.write(offset, zero if n == len(zero) else zero[:n])
            offset += n

    def write_compressed(self, offset: int, data: bytes) -> None:
        """Write one whole cluster compressed (``convert -c``)."""
        raise UnsupportedError("Compression is not supported for this drive")

    def discard(self, offset: int, length: int) -> None:
        """Drop the range; it then reads from backing (or as zeroes)."""

    def flush(self) -> None:
        self.file.flush()

    def truncate(self, size: int, prealloc: str = "off", shrink: bool = False) -> None:
        raise UnsupportedError("Image format driver does not support resize")

    def close(self) -> None:
        """Write back caches and mark clean; the Image closes the file."""

    # ---- description -----------------------------------------------------
    def allocated_file_size(self) -> int:
        """Bytes the image takes on disk (``info``'s disk size): its file's,
        unless the format keeps data in files of its own too."""
        return self.file.allocated_size()

    def info_specific(self) -> dict[str, Any] | None:
        """The "format-specific" part of ``info``, as qemu-img's JSON has it
        ({"type": ..., "data": {...}}), or None."""
        return None

    def dirty_flag(self) -> bool:
        return False

    def snapshot_list(self) -> list[dict[str, Any]]:
        """Internal snapshots as qemu's SnapshotInfo dicts, keys in schema
        order: id, name, vm-state-size, date-sec, date-nsec, vm-clock-sec,
        vm-clock-nsec, icount (when known).  ``info`` lists them."""
        return []

    def dirty_bitmaps(self) -> Any:
        """The image's persistent dirty bitmaps (an object with ``bitmaps``,
        ``find``, ``add``, ``remove``; see formats/qcow2/bitmap.py), for
        formats with ``supports_bitmaps``."""
        raise UnsupportedError("Operation not supported")

    def check(self, repair: str | None = None) -> Any:
        raise UnsupportedError("This image format does not support checks")

    def amend(self, options: dict[str, Any], progress: Any = None, force: bool = False) -> None:
        """Change the image's options in place (``qemu-img amend``);
        ``options`` hold typed values from amend_opts (only those given);
        ``progress(done, total)`` reports work as amend_status_cb."""
        raise UnsupportedError(f"Block driver '{self.format_name}' does not support option amendment")

    def persistent_bitmaps_size(self, cluster_size: int) -> int | None:
        """Bytes the persistent dirty bitmaps would need in a new qcow2 image
        of ``cluster_size`` (measure's "bitmaps size"); None when this
        image cannot hold persistent bitmaps at all."""
        return None
