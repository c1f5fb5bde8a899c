"""``commit``: write an overlay's data down into a backing file (qemu-img.c
img_commit, which runs QEMU's active commit, a mirror job onto the base).

What is copied is what the mirror job copies: every chunk of the base's
granularity that holds anything allocated above the base (in the top image
or an image between), read through the whole chain.  Runs the chain reads
as zeroes become zero writes that may unmap; a smaller base is grown first.
Then, unless told to keep it, the top image is emptied (bdrv_make_empty).

Order for crashes: the base receives the data while the top still holds it
all, so until the top is emptied a crash leaves the top reading as before;
the emptying is the format's own crash-safe operation.
"""

from __future__ import annotations

from typing import Callable

from qimg.block.image import Image, open_image
from qimg.block.status import DATA, ZERO
from qimg.errors import QimgError, UnsupportedError
from qimg.ops.copy import block_status_above
from qimg.ops.rebase import _allocated_above, find_backing_image

#: the mirror job's default granularity when the base has no cluster size
DEFAULT_GRANULARITY = 64 << 10
#: largest single read and write
CHUNK = 8 << 20


def find_base(top: Image, base: str | None, filename: str) -> Image:
    """The image to commit into: ``base`` in the chain, or the backing file."""
    if base is not None:
        found = find_backing_image(top, base)
        if found is None:
            raise QimgError(f"Did not find '{base}' in the backing chain of '{filename}'")
        return found
    if top.backing is None:
        raise QimgError("Image does not have a backing file")
    return top.backing


def reopen_writable(top: Image, base: Image) -> Image:
    """Replace ``base`` in ``top``'s chain by a read-write open of it."""
    parent = top
    while parent.backing is not base:
        assert parent.backing is not None
        parent = parent.backing
    new = open_image(base.filename, base.format, read_only=False)
    parent.backing = new
    parent.driver.backing = new
    base.close()
    return new


def _granularity(base: Image) -> int:
    cs = base.driver.cluster_size
    return max(4096, cs) if cs else DEFAULT_GRANULARITY


def dirty_ranges(top: Image, base: Image, granularity: int) -> list[tuple[int, int]]:
    """[start, end) runs of granularity chunks holding anything allocated
    above ``base`` (the mirror job's initial dirty bitmap)."""
    size = top.size
    runs: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        allocated, n = _allocated_above(top, base, offset, min(1 << 30, size - offset))
        n = max(n, 1)
        if allocated:
            start = offset // granularity * granularity
            end = min(size, -(-(offset + n) // granularity) * granularity)
            if runs and runs[-1][1] >= start:
                runs[-1] = (runs[-1][0], max(runs[-1][1], end))
            else:
                runs.append((start, end))
        offset += n
    return runs


def commit(
    top: Image,
    base: Image,
    drop: bool = False,
    progress: Callable[[float], None] | None = None,
) -> None:
    """Commit ``top`` (opened read-write) into ``base`` (a writable image of
    its chain, see reopen_writable) and empty ``top`` unless ``drop``."""
    if top.size > base.size:
        try:
            base.truncate(top.size)
        except QimgError as e:
            raise QimgError(f"Top image {top.filename} is larger than base image {base.filename}, "
                            f"and resize of base image failed: {e.message}") from None
    granularity = _granularity(base)
    runs = dirty_ranges(top, base, granularity)
    total = sum(e - s for s, e in runs)
    done = 0
    for start, end in runs:
        pos = start
        while pos < end:
            flags, n = block_status_above(top, pos, min(CHUNK, end - pos))
            n = max(1, min(n, end - pos))
            # mirror_iteration: whole chunks of the granularity; a status
            # run shorter than one chunk (a qcow2 subcluster run) is copied
            n -= n % granularity
            if n < granularity:
                n = min(granularity, end - pos)
                flags = DATA
            if flags & DATA or not flags & ZERO:
                base.write(pos, top.read(pos, n))
            else:
                base.write_zeroes(pos, n, unmap=True)
            pos += n
            done += n
            if progress is not None and total:
                progress(done * 100 / total)
    base.flush()
    if not drop:
        try:
            top.driver.make_empty()
        except UnsupportedError:
            pass  # qemu-img ignores ENOTSUP: the top just keeps its data
        top.flush()
