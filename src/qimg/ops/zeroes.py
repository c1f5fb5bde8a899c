"""Zero detection for convert's sparse output, at C speed without numpy.

qemu-img decides what to leave sparse with is_allocated_sectors_min(): in
one request, sectors are grouped into cells of ``alignment`` sectors on the
absolute sector grid (cells cut by the request's ends are partial); a cell
is zero when all of it is zero.  A run of zero cells shorter than
``min_sparse`` sectors between two data runs is written as data; zero runs
touching either end of the request are always kept sparse.  This module
reproduces exactly that, so our sparse layout is qemu-img's.

Only whole zero cells matter, and they are rare in data: a cell can be zero
only where the first 8 bytes of each of its sectors are.  Those first words
are gathered with one strided copy and searched with bytes.find for a run a
cell long; only such candidate runs are compared with zeroes (memcmp).
Importing numpy would cost more than that whole search over a few GiB.  A
buffer whose candidates keep turning out to hold data (sectors that begin
with 8 zero bytes) is handed to numpy instead, so the Python work per
buffer stays bounded whatever the data.
"""

from __future__ import annotations

import bisect

SECTOR = 512
#: cells one buffer may have compared one by one before numpy takes it over
COMPARE_BUDGET = 256

_zeroes = bytes(4 << 20)


def _zeroes_of(nbytes: int) -> bytes:
    """A zero bytes object at least ``nbytes`` long (calloc'd: its pages
    are the kernel's zero page until written, and they never are)."""
    global _zeroes
    if len(_zeroes) < nbytes:
        _zeroes = bytes(nbytes)
    return _zeroes


def is_zero(buf: memoryview | bytes | bytearray) -> bool:
    """True when every byte of ``buf`` is zero (qemu's buffer_is_zero)."""
    view = memoryview(buf).cast("B")
    return _zeroes_of(len(view)).startswith(view)


class _Hard(Exception):
    """The buffer's candidates cost more comparisons than allowed."""


class ZeroScan:
    """The zero cells of one buffer of whole sectors starting at absolute
    sector ``sector_num``, found once; ``runs`` then splits any request
    within the buffer (a buffer may hold several)."""

    def __init__(self, buf: memoryview | bytes | bytearray, sector_num: int, alignment: int) -> None:
        self.view = memoryview(buf).cast("B")
        self.sectors = len(self.view) // SECTOR
        self.base = sector_num
        self.alignment = alignment
        #: numpy's per-sector flags, for a buffer the search gave up on
        self.nz = None
        #: [start, end) buffer sectors of runs of whole zero cells, in order
        self.cells: list[tuple[int, int]] = []
        self._budget = COMPARE_BUDGET
        try:
            self._find_cells()
        except _Hard:
            from qimg.ops import zeroes_np

            self.cells = []
            self.nz = zeroes_np.nonzero_sectors(self.view)

    def _zero(self, first: int, end: int) -> bool:
        return _zeroes_of((end - first) * SECTOR).startswith(self.view[first * SECTOR:end * SECTOR])

    def _find_cells(self) -> None:
        a = self.alignment
        n = self.sectors
        grid = (-self.base) % a  # the first cell boundary, in buffer sectors
        heads = self.view[:n * SECTOR].cast("Q")[::SECTOR // 8].tobytes()
        needle = _zeroes_of(8 * a)[:8 * a]
        pos = 0
        while pos < n:
            i = heads.find(needle, pos * 8)
            if i < 0:
                return
            start = -(-i // 8)
            end = _zero_words_end(heads, start, n)
            # the whole cells inside the run of zero first words
            c0 = start + (grid - start) % a
            c1 = end - (end - grid) % a
            if c1 - c0 >= a:
                self._verify(c0, c1)
            pos = end + 1

    def _verify(self, c0: int, c1: int) -> None:
        """Record the zero cells of [c0, c1) (whole cells): all of them in
        one comparison, or else cell by cell."""
        if self._zero(c0, c1):
            self._record(c0, c1)
            return
        a = self.alignment
        self._budget -= (c1 - c0) // a
        if self._budget < 0:
            raise _Hard
        for lo in range(c0, c1, a):
            if self._zero(lo, lo + a):
                self._record(lo, lo + a)

    def _record(self, lo: int, hi: int) -> None:
        if self.cells and self.cells[-1][1] == lo:
            self.cells[-1] = (self.cells[-1][0], hi)
        else:
            self.cells.append((lo, hi))

    def runs(self, pos: int, n: int, min_sparse: int) -> list[tuple[int, int, bool]]:
        """Runs ``(first_sector, count, is_data)`` of the request of ``n``
        sectors at buffer sector ``pos``, relative to it, as qemu-img
        convert writes them."""
        if n == 0:
            return []
        if self.nz is not None:
            from qimg.ops import zeroes_np

            return zeroes_np.runs_of(self.nz[pos:pos + n], self.base + pos, min_sparse, self.alignment)
        a = self.alignment
        end = pos + n
        head = min(end, pos + (-(self.base + pos)) % a)  # the partial first cell ends here
        tail = max(head, end - (self.base + end) % a)  # the partial last cell starts here
        zero: list[list[int]] = []
        if head > pos and self._zero(pos, head):
            zero.append([pos, head])
        cells = self.cells
        k = bisect.bisect_right(cells, (head, head)) - 1
        for s, e in cells[max(k, 0):]:
            s, e = max(s, head), min(e, tail)
            if s >= tail:
                break
            if s < e:
                _add(zero, s, e)
        if tail < end and tail >= head and self._zero(tail, end):
            _add(zero, tail, end)
        out: list[tuple[int, int, bool]] = []
        at = pos
        for s, e in zero:
            if s > pos and e < end and e - s < min_sparse:
                continue  # an interior hole too short: written as data
            if s > at:
                out.append((at - pos, s - at, True))
            out.append((s - pos, e - s, False))
            at = e
        if at < end:
            out.append((at - pos, end - at, True))
        return out


def _add(zero: list[list[int]], s: int, e: int) -> None:
    if zero and zero[-1][1] == s:
        zero[-1][1] = e
    else:
        zero.append([s, e])


def _zero_words_end(heads: bytes, start: int, n: int) -> int:
    """The first of words ``start``.. of ``heads`` that is not zero (``n``
    when none is), looking in growing steps: the work is the run's length."""
    k, step = start, 64
    view = memoryview(heads)
    while k < n:
        m = min(step, n - k)
        if _zeroes_of(8 * m).startswith(view[8 * k:8 * (k + m)]):
            k += m
            step *= 2
            continue
        part = heads[8 * k:8 * (k + m)]
        return k + (len(part) - len(part.lstrip(b"\0"))) // 8
    return n


def classify(
    buf: memoryview | bytes | bytearray, sector_num: int, min_sparse: int, alignment: int
) -> list[tuple[int, int, bool]]:
    """Split ``buf`` (whole sectors, starting at absolute ``sector_num``) into
    runs ``(first_sector, count, is_data)`` relative to the buffer, the way
    qemu-img convert writes them.  ``min_sparse`` and ``alignment`` are in
    sectors (alignment a power of two)."""
    scan = ZeroScan(buf, sector_num, alignment)
    return scan.runs(0, scan.sectors, min_sparse)
