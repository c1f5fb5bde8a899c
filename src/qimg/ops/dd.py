"""``qemu-img dd``: copy a run of an image's blocks into a new image, as
img_dd does.

qemu-img's dd is a plain read/write loop: it creates the output (format
``-O``, default raw) with the size it is going to copy, then reads ``bs``
bytes at a time and writes them, zero blocks included, so every output
format ends up fully allocated (``qemu-img map`` shows data everywhere).
We keep that result but move the bytes in large requests (a multiple of
``bs`` up to CHUNK, the next one read in a thread while this one is
written).  Sequential writes lay an image out the same whatever their
size, with one exception: a format that allocates a table after the data
it indexes (qed's L2 tables) puts the table after the first write into its
range, so the block holding each multiple of ISOLATE is written alone, as
qemu-img wrote it; the outputs are then byte-identical to qemu-img's.
When a large read fails we retry it ``bs`` at a time, so that the output
holds exactly the blocks qemu-img would have written before its error.

Two quirks of img_dd are kept because the output must match qemu-img's:
``count`` limits the input from its start, not from ``skip`` (the copy
ends at ``min(count*bs, size)``), and a ``skip`` past the end is only a
warning: the output is created empty and the command succeeds.
"""

from __future__ import annotations

import os
from typing import Callable

from qimg.block.image import Image
from qimg.errors import QimgError

#: bytes moved per request (rounded down to a multiple of bs)
CHUNK = 4 << 20
#: bs must fit in a C int (cvtnum_full("bs", arg, 1, INT_MAX))
MAX_BS = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1
#: blocks up to this size are read and written whole
BIG_BLOCK = 256 << 20
#: the block holding each multiple of this output offset is written alone
ISOLATE = 1 << 20

#: protocol prefixes qemu 7.2 knows, and the driver each names; we
#: create and open only plain files
_PROTOCOLS = {
    "file": "file", "host_device": "host_device", "host_cdrom": "host_cdrom", "nbd": "nbd",
    "nbd+unix": "nbd", "nbd+tcp": "nbd", "http": "http", "https": "https", "ftp": "ftp", "ftps": "ftps",
    "ssh": "ssh", "gluster": "gluster", "gluster+tcp": "gluster", "gluster+unix": "gluster",
    "gluster+rdma": "gluster", "iscsi": "iscsi", "iser": "iser", "nfs": "nfs", "rbd": "rbd",
    "null-co": "null-co", "null-aio": "null-aio", "nvme": "nvme", "fat": "vvfat",
    "blkdebug": "blkdebug", "blkverify": "blkverify",
}
#: protocol drivers without create options (refused before creation)
_NO_CREATE_PROTOCOLS = frozenset(("vvfat", "null-co", "null-aio", "blkdebug", "blkverify",
                                  "http", "https", "ftp", "ftps"))

#: formats qemu 7.2 has but cannot create (qimg reads few of them)
_NO_CREATE = frozenset((
    "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write",
    "copy-on-read", "dmg", "ftp", "ftps", "http", "https", "null-aio", "null-co", "preallocate",
    "quorum", "replication", "snapshot-access", "throttle", "vvfat",
))

#: the errors behind qemu-img create's "image size is too large" (-EFBIG)
_CREATE_EFBIG = "The image size is too large for file format '"
_EFBIG = {
    _CREATE_EFBIG + "raw'": "Could not resize file: File too large",
    _CREATE_EFBIG + "qcow2' (try using a larger cluster size)":
        "Could not resize image: Failed to grow the L1 table: File too large",
}

#: opens an image for the command: (name, fmt, read_only=..., ...) -> Image
Opener = Callable[..., Image]


def copy_range(size: int, bs: int, count: int | None, skip: int | None) -> tuple[int, int, bool]:
    """(start, end, skipped_past_end) of the input bytes img_dd copies.

    ``count`` cuts the input at count*bs from its start (not after skip);
    a skip past that end copies nothing (the caller warns).
    """
    end = size
    if count is not None and count <= INT64_MAX // bs and count * bs < end:
        end = count * bs
    if skip is not None and (skip > INT64_MAX // bs or end < skip * bs):
        return end, end, True
    return (skip or 0) * bs, end, False


def _protocol(filename: str) -> str | None:
    """The protocol prefix of a name ("nbd:host"), as path_has_protocol
    finds it: a ':' before any '/' or '\\'."""
    for i, c in enumerate(filename):
        if c in "/\\":
            return None
        if c == ":":
            return filename[:i]
    return None


def _output_target(out_format: str, filename: str) -> tuple[str, str]:
    """(format, plain file name) of the output, with qemu-img's refusals in
    img_dd's order: the format, the protocol, then creation support of
    each."""
    from qimg.formats import get_driver

    # the file protocol used as a format writes the bytes as they are: raw
    fmt = "raw" if out_format == "file" else out_format
    creates = fmt not in _NO_CREATE
    if creates:
        try:
            drv = get_driver(fmt)
        except QimgError:
            raise QimgError("Unknown file format") from None
        creates = drv.supports_create and bool(drv.create_opts)
    path = filename
    protocol = _protocol(filename)
    driver = "file"
    if protocol is not None:
        if protocol not in _PROTOCOLS:
            raise QimgError(f"Unknown protocol '{protocol}'")
        driver = _PROTOCOLS[protocol]
        path = filename[len(protocol) + 1:]
    if not creates:
        raise QimgError(f"Format driver '{out_format}' does not support image creation")
    if driver in _NO_CREATE_PROTOCOLS:
        raise QimgError(f"Protocol driver '{driver}' does not support image creation")
    if driver != "file":
        raise QimgError(f"{filename}: error while creating output image: "
                        f"Protocol driver '{driver}' is not supported by qimg")
    return fmt, path


def _default_open(name: str, fmt: str | None = None, *, read_only: bool = True, **_: object) -> Image:
    from qimg.block.image import open_image

    try:
        return open_image(name, fmt, read_only=read_only)
    except QimgError as e:
        raise QimgError(f"Could not open '{name}': {e.message}", e.code) from None


def dd(
    input: str,
    output: str,
    *,
    fmt: str | None = None,
    out_format: str = "raw",
    bs: int = 512,
    count: int | None = None,
    skip: int | None = None,
    force_share: bool = False,
    opener: Opener | None = None,
    warn: Callable[[str], None] | None = None,
) -> int:
    """Copy ``count`` blocks of ``bs`` bytes of ``input``, after skipping
    ``skip`` blocks, into a new image ``output`` of format ``out_format``
    (an existing file is overwritten, as qemu-img does).  ``warn`` receives
    qemu-img's non-fatal message for a skip past the end.  ``opener`` opens
    the input (the command line passes its own for --image-opts and its
    messages).  Returns the number of bytes copied; raises QimgError with
    qemu-img's message.
    """
    if not 1 <= bs <= MAX_BS:
        raise QimgError(f"Invalid bs specified. Must be between 1 and {MAX_BS}.")
    for name, value in (("count", count), ("skip", skip)):
        if value is not None and not 0 <= value <= INT64_MAX:
            raise QimgError(f"Invalid {name} specified. Must be between 0 and {INT64_MAX}.")
    opener = opener or _default_open
    src = opener(input, fmt, read_only=True, force_share=force_share)
    try:
        out_fmt, path = _output_target(out_format, output)
        start, end, past_end = copy_range(src.size, bs, count, skip)
        if not force_share:
            _check_not_in_use(src, output, path)
        _create(out_fmt, output, path, end - start)
        dst = _open_output(output, path, out_fmt)
        try:
            if past_end and warn is not None:
                warn(f"{input}: cannot skip to specified offset")
            _copy(src, dst, start, end, bs)
            dst.flush()
        finally:
            dst.close()
    finally:
        src.close()
    return end - start


def _check_not_in_use(src: Image, output: str, path: str) -> None:
    """qemu-img holds the input open while it creates the output, and a
    format node (not raw) does not share write access to its file: writing
    over the input or one of its backing files fails on the lock."""
    try:
        st = os.stat(path)
    except OSError:
        return
    for img in src.chain():
        mine = os.fstat(img.file.fd)
        if img.format != "raw" and (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino):
            raise QimgError(f'{output}: error while creating output image: Failed to get "write" lock',
                            detail=f"Is another process using the image [{output}]?\n")


def _create(fmt: str, output: str, path: str, size: int) -> None:
    """The output with the format's defaults, as bdrv_create with only a
    size; an existing file is truncated and overwritten."""
    from qimg.ops.create import create

    try:
        create(path, fmt, size)
    except QimgError as e:
        # qemu-img create words -EFBIG its own way; dd shows the driver's error
        message = _EFBIG.get(e.message, e.message) if e.message.startswith(_CREATE_EFBIG) else e.message
        raise QimgError(f"{output}: error while creating output image: {message}", e.code) from None


def _open_output(output: str, path: str, fmt: str) -> Image:
    from qimg.block.image import open_image

    try:
        return open_image(path, fmt, read_only=False, backing=False)
    except QimgError as e:
        raise QimgError(f"Could not open '{output}': {e.message}", e.code) from None


def _read(src: Image, offset: int, length: int) -> bytes:
    try:
        return src.read(offset, length)
    except OSError as e:
        raise QimgError(f"error while reading from input image file: {os.strerror(e.errno or 5)}") from None
    except QimgError as e:
        raise QimgError(f"error while reading from input image file: {e.message}", e.code) from None


def _write(dst: Image, offset: int, data: bytes) -> None:
    try:
        dst.write(offset, data)
    except OSError as e:
        raise QimgError(f"error while writing to output image file: {os.strerror(e.errno or 5)}") from None
    except QimgError as e:
        raise QimgError(f"error while writing to output image file: {e.message}", e.code) from None


def _segments(out: int, n: int, bs: int) -> list[tuple[int, int]]:
    """(offset, length) writes covering output bytes [out, out+n): one
    write, except that the block holding each multiple of ISOLATE goes
    alone.  A format that allocates its metadata after the data (qed's L2
    tables) places it after the first write into a new table's range, so
    that write must be the block qemu-img wrote there, not our big one."""
    end = out + n
    cuts = {out, end}
    first = -(-out // ISOLATE) * ISOLATE if out % ISOLATE else out
    for mark in range(first, end, ISOLATE):
        block = mark // bs * bs
        cuts.update(c for c in (block, block + bs) if out < c < end)
    points = sorted(cuts)
    return [(a, b - a) for a, b in zip(points, points[1:])]


def _copy(src: Image, dst: Image, start: int, end: int, bs: int) -> None:
    """Input bytes [start, end) to the output from offset 0, in requests
    of whole blocks, the next request read in a thread while this one is
    written; a failed read is retried block by block so that the output
    gets every block before the bad one, as qemu-img's loop does."""
    from qimg.ops.workers import Task, Workers
    from qimg.protocols.file import keep_freed_buffers

    if bs <= CHUNK:
        chunk = CHUNK // bs * bs
    else:
        # qemu-img writes a block at a time; beyond BIG_BLOCK we write it
        # in pieces (same data, but qed may place an L2 table elsewhere)
        chunk = bs if bs <= BIG_BLOCK else CHUNK
    keep_freed_buffers()
    requests = [(pos, min(chunk, end - pos)) for pos in range(start, end, chunk)]
    with Workers(1) as pool:
        ahead: Task | None = None
        for i, (pos, n) in enumerate(requests):
            current = ahead if ahead is not None else pool.submit(_read, src, pos, n)
            ahead = pool.submit(_read, src, *requests[i + 1]) if i + 1 < len(requests) else None
            try:
                data = current.result()
            except QimgError:
                if ahead is not None:
                    # the read-ahead must be done before we read src here
                    if not ahead.cancel():
                        ahead.exception()
                    ahead = None
                if n <= bs:
                    raise
                for off in range(pos, pos + n, bs):
                    m = min(bs, pos + n - off)
                    _write(dst, off - start, _read(src, off, m))
                continue
            view = memoryview(data)
            out = pos - start
            for off, m in _segments(out, n, bs):
                _write(dst, off, view[off - out:off - out + m])


__all__ = ["dd", "copy_range"]
