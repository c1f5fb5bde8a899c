"""``qemu-img map``: where an image's data lives, as qemu-img.c img_map.

The image is walked with block-status requests of at most 1 GiB (as
qemu-img asks); each answer becomes a map entry (start, length, depth,
present, zero, data, offset, filename) taken from the first layer of the
backing chain that has data or zeroes there.  Neighbours merge when
qemu-img's entry_mergeable() says so.  The human table merges more: once an
entry is printed, a following entry that is not plain data is treated as
zero (qemu's dump_map_entry does this to coalesce holes).

Work per request is done by the drivers (vectorized); this module only loops
over extents, never over clusters.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from qimg.block.status import DATA, OFFSET_VALID, ZERO
from qimg.errors import QimgError
from qimg.record import dataclass

#: qemu-img map asks for at most 1 GiB per block-status call; neighbours of
#: one state merge into one entry anyway, so larger requests print the same
#: and let a sparse petabyte image be mapped in a few steps
REQUEST_LIMIT = 1 << 40


@dataclass
class MapEntry:
    start: int
    length: int
    depth: int = 0
    present: bool = False
    zero: bool = False
    data: bool = False
    offset: int | None = None
    filename: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The keys of qemu-img's JSON entry (plus the file name, if any)."""
        d: dict[str, Any] = {
            "start": self.start, "length": self.length, "depth": self.depth,
            "present": self.present, "zero": self.zero, "data": self.data,
        }
        if self.offset is not None:
            d["offset"] = self.offset
        if self.filename is not None:
            d["filename"] = self.filename
        return d


def mergeable(curr: MapEntry, nxt: MapEntry) -> bool:
    """qemu-img's entry_mergeable()."""
    if curr.length == 0:
        return False
    if (curr.zero, curr.data, curr.depth, curr.present) != (nxt.zero, nxt.data, nxt.depth, nxt.present):
        return False
    if (curr.filename is None) != (nxt.filename is None) or (curr.offset is None) != (nxt.offset is None):
        return False
    if curr.filename is not None and curr.filename != nxt.filename:
        return False
    if curr.offset is not None and curr.offset + curr.length != nxt.offset:
        return False
    return True


def _status_entries(img: Any, start: int, end: int, depth: int = 0) -> Iterator[MapEntry]:
    """One unmerged entry per extent, as get_block_status finds them down
    the chain: each layer is asked for all of a range at once (in bulk
    where its driver can), and only what it leaves unallocated is asked of
    the layer below."""
    try:
        for ext in _layer(img, start, end):
            if ext.length <= 0:
                raise QimgError("Could not read file metadata: Invalid argument")
            below = img.backing
            if ext.allocated or below is None:
                yield _entry(ext, depth)
                continue
            if ext.offset >= below.size:
                # past the end of a shorter backing file: zeroes, owned by none
                yield _past_backing(ext, ext.offset, depth)
                continue
            mid = min(ext.end, below.size)
            yield from _status_entries(below, ext.offset, mid, depth + 1)
            if mid < ext.end:
                yield _past_backing(ext, mid, depth)
    except OSError as e:
        raise QimgError(f"Could not read file metadata: {e.strerror}") from None


def _past_backing(ext: Any, start: int, depth: int) -> MapEntry:
    """The part of an unallocated extent from ``start`` on, past the end of
    the backing file: zeroes; a host offset the layer reports there (a
    qcow2 subcluster not allocated in its host cluster) is still printed."""
    e = MapEntry(start=start, length=ext.end - start, depth=depth, zero=True)
    if ext.flags & OFFSET_VALID:
        e.offset = ext.host_offset + (start - ext.offset)
        e.filename = ext.file
    return e


def _layer(img: Any, start: int, end: int) -> Iterator[Any]:
    """img's own extents over [start, end), in requests of at most
    REQUEST_LIMIT bytes."""
    layer_status = getattr(img, "layer_status", None)
    offset = start
    while offset < end:
        n = min(REQUEST_LIMIT, end - offset)
        if layer_status is not None:
            yield from layer_status(offset, n)
        else:
            ext = img.block_status(offset, n)
            yield ext
            if ext.length <= 0:
                return
        offset += n


def _entry(ext: Any, depth: int) -> MapEntry:
    has_offset = bool(ext.flags & OFFSET_VALID)
    return MapEntry(
        start=ext.offset,
        length=ext.length,
        depth=depth,
        present=ext.allocated,
        zero=bool(ext.flags & ZERO),
        data=bool(ext.flags & DATA),
        offset=ext.host_offset if has_offset else None,
        filename=ext.file if has_offset else None,
    )


def walk(img: Any, start: int = 0, length: int | None = None, human: bool = False) -> Iterator[MapEntry]:
    """The entries img_map dumps, merged; for ``human`` with its extra
    coalescing of non-data entries.  The last entry may have length 0 (when
    ``start`` is at or past the end), as in qemu-img."""
    end = img.size
    if length is not None:
        end = min(start + length, end)
    curr = MapEntry(start=start, length=0)
    for nxt in _status_entries(img, start, end):
        if mergeable(curr, nxt):
            curr.length += nxt.length
            continue
        if curr.length > 0:
            yield curr
            if human and (not nxt.data or nxt.zero):
                nxt.data, nxt.zero = False, True
        curr = nxt
    yield curr


def map(filename: str, fmt: str | None = None, start: int = 0, length: int | None = None) -> list[dict[str, Any]]:
    """The entries of ``qemu-img map --output=json`` for [start, start+length)
    (to the end when ``length`` is None), as dicts with the JSON keys, plus
    "filename" where the data maps to a file."""
    from qimg.block.image import open_image

    with open_image(filename, fmt, read_only=True) as img:
        return [e.as_dict() for e in walk(img, start, length)]


# ---- printing ------------------------------------------------------------------


def _hex(value: int) -> str:
    """C's %#x: no 0x prefix for zero."""
    return f"{value:#x}" if value else "0"


def human_lines(entries: Iterator[MapEntry]) -> Iterator[str]:
    """The human table, a line at a time (the header first); raises
    QimgError at an entry that has data but no offset, after the lines
    before it, as qemu-img does."""
    yield "%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File")
    for e in entries:
        if e.data and e.offset is None:
            raise QimgError("File contains external, encrypted or compressed clusters.")
        if e.data and not e.zero:
            yield "%-16s%-16s%-16s%s\n" % (_hex(e.start), _hex(e.length), _hex(e.offset or 0), e.filename or "")


def json_lines(entries: Iterator[MapEntry]) -> Iterator[str]:
    """The JSON list, an entry per line, as qemu-img's dump_map_entry."""
    yield "["
    prev: MapEntry | None = None
    try:
        for e in entries:
            if prev is not None:
                yield _json_entry(prev) + ",\n"
            prev = e
    except QimgError:
        # the walk yields an entry once the one after it is known: qemu-img
        # has printed it (with its comma) before a later lookup fails
        if prev is not None:
            yield _json_entry(prev) + ",\n"
        raise
    if prev is not None:
        yield _json_entry(prev)
    yield "]\n"


def _json_entry(e: MapEntry) -> str:
    def b(v: bool) -> str:
        return "true" if v else "false"

    text = (f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
            f'"present": {b(e.present)}, "zero": {b(e.zero)}, "data": {b(e.data)}')
    if e.offset is not None:
        text += f', "offset": {e.offset}'
    return text + "}"


def print_map(img: Any, write: Callable[[str], Any], start: int = 0, length: int | None = None,
              output: str = "human") -> None:
    """Stream qemu-img map's output for an open image through ``write``."""
    human = output == "human"
    entries = walk(img, start, length, human=human)
    for line in (human_lines(entries) if human else json_lines(entries)):
        write(line)
