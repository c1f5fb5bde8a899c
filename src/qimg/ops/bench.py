"""The I/O loop of ``qemu-img bench``: ``count`` requests of ``bufsize``
bytes, the first at ``offset`` and each next one ``step`` bytes further,
wrapping around at the end of the image.

What the requests do is qemu's (img_bench/bench_cb): the offset after a
request is ``(offset + step) % image_size``, so only the first request can
start past the end; a request that does not fit in the image fails with EIO
and stops the run.  Writes fill their range with the pattern byte.  With a
flush interval, a flush follows every request after which the number of
requests still to send is a multiple of the interval (the last one too),
except in the first burst: qemu first checks once ``depth`` requests are
out, so a multiple passed by then is not flushed at.

How they are sent is ours: one after another, but back-to-back requests
(step == bufsize, no wrap, no flush between, no write-through) are merged
into big I/Os, so a sequential run costs a few Python calls per megabyte,
not one per request.  The bytes moved, the flushes sent, and a write's
result are the same as qemu's; the queue
depth only shapes the header (and, in qemu, how many requests after a failed
one may still have been sent: here none, as qemu with depth 1).  Memory is
bounded by MAX_IO, whatever the buffer size and depth (qemu allocates
depth * bufsize up front and aborts when that fails).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from qimg.errors import QimgError
from qimg.record import dataclass

if TYPE_CHECKING:
    import numpy as np

    from qimg.block.image import Image

#: largest single I/O we send (a request or a merged run is cut into these)
MAX_IO = 4 << 20
#: requests whose offsets are computed at once
BATCH = 1 << 16

EIO = "Input/output error"


@dataclass(frozen=True)
class BenchSpec:
    """What ``qemu-img bench`` was asked to do, with qemu's defaults."""

    count: int = 75000
    depth: int = 64
    offset: int = 0
    bufsize: int = 4096
    #: 0 means bufsize, as in qemu
    step: int = 0
    write: bool = False
    pattern: int = 0
    flush_interval: int = 0
    #: --no-drain: in qemu a flush then overlaps the requests in flight;
    #: sent one after another, ours flush at the same points either way
    drain_on_flush: bool = True
    #: cache=writethrough/directsync: every write is followed by a flush
    writethrough: bool = False
    #: cache=unsafe: flushes do nothing
    no_flush: bool = False

    @property
    def step_size(self) -> int:
        return self.step or self.bufsize


def request_offsets(spec: BenchSpec, size: int, first: int, n: int) -> "np.ndarray":
    """Offsets (uint64) of requests ``first`` .. ``first + n - 1``."""
    import numpy as np

    step = spec.step_size
    if size == 0:
        # qemu 7.2 divides by zero here; later qemu keeps offset 0
        offs = np.zeros(n, dtype=np.uint64)
    else:
        # after the first request every offset is below size, so
        # base + i*step stays far below 2**64 (size < 2**63, step < 2**31)
        base = (spec.offset + first * step) % size
        offs = (np.uint64(base) + np.arange(n, dtype=np.uint64) * np.uint64(step)) % np.uint64(size)
    if first == 0 and n:
        offs[0] = spec.offset  # the first request is sent before any wrap
    return offs


def run_bench(img: "Image", spec: BenchSpec) -> float:
    """Send the requests and return the seconds they took (numpy's import
    not counted); QimgError("Failed request: ...") on the first that
    fails, after all those before it are done."""
    import numpy as np

    size = img.size
    bufsize = spec.bufsize
    if bufsize == 0:
        # empty requests: only the first can start past the end, and none
        # moves a byte, so there is nothing to send (or to flush)
        if spec.count and spec.offset > size:
            raise QimgError(f"Failed request: {EIO}")
        return 0.0
    # write-through flushes after every request, so those are not merged
    merge = bufsize > 0 and spec.step_size == bufsize and not (spec.write and spec.writethrough)
    pattern = bytes([spec.pattern]) * min(MAX_IO, bufsize * min(spec.count, BATCH)) if spec.write else b""
    done = 0
    start = time.monotonic()
    while done < spec.count:
        n = min(BATCH, spec.count - done)
        offs = request_offsets(spec, size, done, n)
        # offset < 2**63 and bufsize < 2**31: no uint64 overflow
        bad = np.flatnonzero(offs + np.uint64(bufsize) > np.uint64(size))
        good = int(bad[0]) if bad.size else n
        if bufsize and good:
            _send(img, spec, offs[:good], done, merge, pattern)
        if good < n:
            raise QimgError(f"Failed request: {EIO}")
        done += n
    return time.monotonic() - start


def _send(img: "Image", spec: BenchSpec, offs: "np.ndarray", first: int, merge: bool, pattern: bytes) -> None:
    """Send requests ``first`` .. ``first + len(offs) - 1``, all of which fit."""
    import numpy as np

    k = len(offs)
    bufsize = spec.bufsize
    ends = np.ones(k, dtype=bool)
    if merge:
        ends[:-1] = offs[1:] != offs[:-1] + np.uint64(bufsize)
    flush_after = None
    if spec.flush_interval:
        index = first + np.arange(k, dtype=np.int64)
        left = spec.count - 1 - index
        flush_after = (left % spec.flush_interval == 0) & (index >= min(spec.depth, spec.count) - 1)
        ends |= flush_after
    start = 0
    for end in np.flatnonzero(ends).tolist():
        lo = int(offs[start])
        _io(img, spec, lo, int(offs[end]) + bufsize - lo, pattern)
        if spec.write and not spec.no_flush and (spec.writethrough or (flush_after is not None and flush_after[end])):
            img.flush()
        start = end + 1


def _io(img: "Image", spec: BenchSpec, offset: int, length: int, pattern: bytes) -> None:
    """One run of requests: [offset, offset + length), in pieces of MAX_IO."""
    end = offset + length
    try:
        while offset < end:
            n = min(MAX_IO, end - offset)
            if spec.write:
                img.write(offset, pattern if n == len(pattern) else _piece(pattern, n))
            else:
                img.read(offset, n)
            offset += n
    except QimgError as e:
        raise QimgError(f"Failed request: {e.message}", e.code) from None
    except OSError as e:
        raise QimgError(f"Failed request: {e.strerror or EIO}") from None


_pieces: dict[tuple[int, int], bytes] = {}


def _piece(pattern: bytes, n: int) -> bytes:
    """The first ``n`` bytes of ``pattern``, kept: most requests have the
    same size, and slicing would copy them each time."""
    key = (pattern[0], n)
    piece = _pieces.get(key)
    if piece is None:
        if len(_pieces) > 4:
            _pieces.clear()
        piece = _pieces[key] = pattern[:n]
    return piece
