"""The node graph: an Image is a format driver over a file, plus its backing chain.

The chain is generic: a read of a range the top driver does not allocate falls
through to the backing Image, and a backing file shorter than its overlay reads
as zeroes past its end.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from qimg.block import lock
from qimg.block.driver import Driver
from qimg.block.probe import PROBE_BYTES, probe_format
from qimg.block.status import DATA, EOF, OFFSET_VALID, RECURSE, ZERO, Extent
from qimg.errors import QimgError
from qimg.formats import get_driver
from qimg.protocols.file import File

#: a chain deeper than this is taken for a loop, as QEMU's limit on nesting
MAX_CHAIN_DEPTH = 64


def resolve_backing(overlay: str, backing: str) -> str:
    """A relative backing name is relative to the overlay's directory; an
    absolute one, or one with a protocol prefix ("nbd:", "json:"), is kept."""
    has_protocol = ":" in backing.split("/", 1)[0]
    if os.path.isabs(backing) or has_protocol:
        return backing
    return os.path.join(os.path.dirname(overlay), backing)


class Image:
    """An open image: ``driver`` over ``file``, with ``backing`` below it."""

    def __init__(self, driver: Driver, filename: str, format_name: str, probed: bool = False) -> None:
        self.driver = driver
        self.filename = filename
        self.format = format_name
        self.probed = probed
        self.backing: Image | None = None
        self.read_only = driver.read_only

    # ---- attributes ---------------------------------------------------------
    @property
    def size(self) -> int:
        return self.driver.size

    @property
    def file(self) -> File:
        return self.driver.file

    def chain(self) -> Iterator["Image"]:
        img: Image | None = self
        while img is not None:
            yield img
            img = img.backing

    # ---- block status -------------------------------------------------------
    def block_status(self, offset: int, length: int) -> Extent:
        """This layer's status of the run at ``offset`` (see Driver)."""
        length = min(length, self.size - offset)
        if length <= 0:
            return Extent(offset, 0, EOF)
        ext = self.driver.block_status(offset, length)
        if ext.flags & RECURSE and ext.flags & (DATA | OFFSET_VALID | ZERO) == DATA | OFFSET_VALID:
            ext = self._refine_from_file(ext)
        if not ext.allocated and self.backing is None:
            # Nothing below: the range reads as zeroes.
            ext = Extent(ext.offset, ext.length, ext.flags | ZERO, ext.host_offset, ext.file)
        return ext

    def _refine_from_file(self, ext: Extent) -> Extent:
        """A data extent whose host range is a hole in the file reads as
        zeroes: report ZERO there, as bdrv_co_block_status does with
        want_zero, and cut the extent where the file's state changes."""
        node = self.driver.data_node
        assert ext.host_offset is not None
        flags = ext.flags & ~RECURSE
        if ext.host_offset >= node.size:
            return Extent(ext.offset, ext.length, flags | ZERO, ext.host_offset, ext.file)
        is_data, run = node.data_extent(ext.host_offset, ext.length)
        if not is_data:
            flags |= ZERO
        if run < ext.length:
            flags &= ~EOF
        return Extent(ext.offset, min(run, ext.length), flags, ext.host_offset, ext.file)

    def chain_status(self, offset: int, length: int) -> tuple[Extent, int]:
        """(extent, depth): the first layer from the top that defines the run.

        A run no layer allocates has depth = the chain length - 1 and reads as
        zeroes (ZERO set, ALLOCATED not set).
        """
        depth = 0
        img: Image = self
        while True:
            ext = img.block_status(offset, length)
            if ext.allocated or img.backing is None:
                return ext, depth
            length = ext.length
            below = img.backing
            if offset >= below.size:
                # Past the end of a shorter backing file: zeroes, owned by
                # none; a host offset the layer reports (a qcow2 subcluster
                # not allocated in its host cluster) stays, as qemu-img map shows.
                return Extent(offset, length, ZERO | (ext.flags & (EOF | OFFSET_VALID)),
                              ext.host_offset, ext.file), depth
            length = min(length, below.size - offset)
            img = below
            depth += 1

    def layer_status(self, offset: int, length: int) -> Iterator[Extent]:
        """This layer's extents over [offset, offset+length), as successive
        block_status calls give them (up to where equal neighbours are
        split), asked of the driver in bulk where it offers
        ``block_status_bulk`` (an iterator of Extents, or of an int: the
        offset up to which block_status must answer instead).  An extent of
        length 0 ends the walk (the caller reports it)."""
        end = min(self.size, offset + length)
        bulk = getattr(self.driver, "block_status_bulk", None)
        generic_until = offset if bulk is not None else end
        while offset < end:
            if offset >= generic_until:
                items = bulk(offset, end - offset)  # type: ignore[misc]
                generic_until = end
                for item in items if items is not None else ():
                    if isinstance(item, int):
                        generic_until = item
                        break
                    yield from self._finish(item)
                    offset = item.end
                continue
            ext = self.block_status(offset, end - offset)
            yield ext
            if ext.length <= 0:
                return
            offset += ext.length

    def _finish(self, ext: Extent) -> Iterator[Extent]:
        """What block_status adds to the driver's answer, for all of it."""
        if ext.flags & RECURSE and ext.flags & (DATA | OFFSET_VALID | ZERO) == DATA | OFFSET_VALID:
            while ext.length > 0:
                piece = self._refine_from_file(ext)
                if piece.length <= 0:  # the file gave no answer: keep it all as data
                    yield Extent(ext.offset, ext.length, ext.flags & ~RECURSE, ext.host_offset, ext.file)
                    return
                yield piece
                assert ext.host_offset is not None
                ext = Extent(piece.end, ext.length - piece.length, ext.flags, ext.host_offset + piece.length,
                             ext.file)
        elif not ext.allocated and self.backing is None:
            yield Extent(ext.offset, ext.length, ext.flags | ZERO, ext.host_offset, ext.file)
        else:
            yield ext

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """This layer's extents covering [offset, offset+length)."""
        end = self.size if length is None else min(self.size, offset + length)
        while offset < end:
            ext = self.block_status(offset, end - offset)
            if ext.length <= 0:
                break
            yield ext
            offset += ext.length

    # ---- I/O ----------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes; past the virtual size reads are cut short."""
        length = max(0, min(length, self.size - offset))
        if self.backing is None:
            return self.driver.read(offset, length)
        parts = []
        end = offset + length
        while offset < end:
            ext = self.driver.block_status(offset, end - offset)
            n = ext.length
            if ext.allocated:
                parts.append(bytes(n) if ext.zero and not ext.data else self.driver.read(offset, n))
            else:
                parts.append(self._read_backing(offset, n))
            offset += n
        return b"".join(parts)

    def _read_backing(self, offset: int, length: int) -> bytes:
        below = self.backing
        assert below is not None
        avail = max(0, min(length, below.size - offset))
        data = below.read(offset, avail) if avail else b""
        return data + bytes(length - avail) if avail < length else data

    def write(self, offset: int, data: bytes) -> None:
        self._check_writable()
        self.driver.write(offset, data)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._check_writable()
        self.driver.write_zeroes(offset, length, unmap)

    def write_compressed(self, offset: int, data: bytes) -> None:
        self._check_writable()
        self.driver.write_compressed(offset, data)

    def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        self.driver.discard(offset, length)

    def truncate(self, size: int, prealloc: str = "off", shrink: bool = False) -> None:
        self._check_writable()
        self.driver.truncate(size, prealloc, shrink)

    def flush(self) -> None:
        if not self.read_only:
            self.driver.flush()

    def _check_writable(self) -> None:
        if self.read_only:
            raise QimgError("Image is read-only")

    def close(self) -> None:
        for img in list(self.chain()):
            try:
                img.driver.close()
            finally:
                img.driver.file.close()

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_json_filename(name: str) -> tuple[str, str | None]:
    """A ``json:{...}`` image name (as backing file fields may hold):
    (file name, format driver or None).  Nested objects and dotted keys
    are the same thing, as in QEMU's option flattening."""
    import json

    text = name[len("json:"):]
    try:
        obj = json.loads(text)
    except ValueError as e:
        at_end = isinstance(e, json.JSONDecodeError) and e.pos >= len(text.rstrip())
        reason = "premature EOI" if at_end else "invalid keyword"
        raise QimgError(f"Could not parse the JSON options: JSON parse error, {reason}") from None
    if not isinstance(obj, dict):
        raise QimgError("Invalid JSON object given")
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value

    walk("", obj)
    driver = flat.get("driver")
    filename = flat.get("file.filename")
    if driver == "file" or (driver is None and filename is None):
        filename, driver = flat.get("filename"), None
    if not isinstance(filename, str):
        raise QimgError("The 'file' block driver requires a file name")
    return filename, driver if isinstance(driver, str) else None


def _file_id(file: File) -> tuple[int, int]:
    st = os.fstat(file.fd)
    return st.st_dev, st.st_ino


def _check_loop(file: File, filename: str, read_only: bool, seen: dict[tuple[int, int], bool] | None) -> None:
    """A backing file that is already open above it in the chain is a
    loop.  qemu-img reports it as a lock conflict when that image is open
    read-write; read-only, qemu-img would recurse for ever and we stop."""
    if not seen:
        return
    opened_read_only = seen.get(_file_id(file))
    if opened_read_only is None:
        return
    if not opened_read_only:
        raise QimgError('Failed to get shared "write" lock',
                        detail=f"Is another process using the image [{filename}]?\n")
    raise QimgError(f"Backing file '{filename}' creates an infinite loop.")


def open_image(
    filename: str,
    fmt: str | None = None,
    read_only: bool = True,
    backing: bool = True,
    options: dict[str, Any] | None = None,
    _depth: int = 0,
    _seen: dict[tuple[int, int], bool] | None = None,
    force_share: bool | None = None,
) -> Image:
    """Open ``filename`` as ``fmt`` (probed when None), with its backing chain.

    ``backing=False`` opens the top image alone (qemu's BDRV_O_NO_BACKING).
    The files are locked as QEMU locks them (qimg.block.lock) until close;
    ``force_share`` (-U; None: the running command's -U) shares everything
    with other users, read-only opens only.
    """
    if filename.startswith("json:"):
        filename, json_fmt = parse_json_filename(filename)
        fmt = json_fmt or fmt
    if force_share is None:
        force_share = lock.command_force_share
    force_share = force_share and read_only
    # ops.info's NO_IO_OPTION: BDRV_O_NO_IO, nothing read consistently
    no_io = bool(options and options.get("no_io"))
    # file-posix's locking option (--image-opts file.locking=on|off|auto)
    locking = str(options.get("file.locking", "auto")) if options else "auto"
    if locking not in ("on", "off", "auto"):
        raise QimgError(f"invalid parameter value: {locking}")
    file = File(filename, read_only=read_only, lock=False)
    try:
        _check_loop(file, filename, read_only, _seen)
        probed = fmt is None
        if fmt is None:
            fmt = probe_format(file.pread(0, PROBE_BYTES), filename)
        drv_cls = get_driver(fmt)
        if drv_cls.refuses_write_open and (not read_only or (options and options.get("check-repair"))):
            raise QimgError("Image is read-only")
        if not read_only and not drv_cls.supports_write:
            raise QimgError(f"Could not open '{filename}': Driver '{fmt}' does not support write access")
        # the format decides the locks, and they are held before it reads;
        # check -r opens read-only and writes through a second open later
        # (ops.check's CHECK_REPAIR_OPTION), qemu-img read-write at once
        if locking != "off":
            writes = not read_only or bool(options and options.get("check-repair") and drv_cls.supports_write)
            file.set_perm(*lock.image_perms(fmt, not writes, force_share, no_io))
        with lock.ChildOpen(force_share, no_io):
            driver = drv_cls.open(file, read_only=read_only, options=options)
    except OSError as e:
        # a header read that fails (bdrv_open's -errno, as qemu words it)
        file.close()
        raise QimgError(f"Could not open '{filename}': {e.strerror}") from None
    except BaseException:
        file.close()
        raise
    img = Image(driver, filename, fmt, probed=probed)
    if backing and driver.backing_filename:
        if _depth >= MAX_CHAIN_DEPTH:
            img.close()
            raise QimgError(f"Could not open '{filename}': Backing chain too deep (possible loop)")
        path = resolve_backing(filename, driver.backing_filename)
        try:
            seen = {} if _seen is None else _seen
            seen[_file_id(file)] = read_only
            img.backing = open_image(path, driver.backing_format, read_only=True, _depth=_depth + 1,
                                     _seen=seen, force_share=force_share)
        except QimgError as e:
            img.close()
            raise QimgError(f"Could not open backing file: {e.message}", e.code) from None
        driver.backing = img.backing
    return img
