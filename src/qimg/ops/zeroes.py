"""Zero detection for convert's sparse output, at C speed with numpy.

qemu-img decides what to leave sparse with is_allocated_sectors_min(): in
one buffer, sectors are grouped into cells of ``alignment`` sectors on the
absolute sector grid (cells cut by the buffer's ends are partial); a cell is
zero when all of it is zero.  A run of zero cells shorter than ``min_sparse``
sectors between two data runs is written as data; zero runs touching either
end of the buffer are always kept sparse.  This module reproduces exactly
that, so our sparse layout is qemu-img's.
"""

from __future__ import annotations

SECTOR = 512


def _numpy():
    """numpy, imported on first use (``info`` never needs it); OpenBLAS is
    told not to start a thread per core, which we would never use."""
    import os

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import numpy

    return numpy


def _nonzero_sectors(buf: memoryview | bytes | bytearray):  # -> np.ndarray[bool]
    np = _numpy()

    words = np.frombuffer(buf, dtype=np.uint64).reshape(-1, SECTOR // 8)
    # Real data almost always has a non-zero first or last word: look at
    # those (cheap, strided) and scan whole sectors only where both are 0.
    nz = (words[:, 0] | words[:, -1]) != 0
    unsure = np.flatnonzero(~nz)
    if len(unsure):
        nz[unsure] = np.bitwise_or.reduce(words[unsure], axis=1) != 0
    return nz


def is_zero(buf: memoryview | bytes | bytearray) -> bool:
    """True when every byte of ``buf`` is zero (qemu's buffer_is_zero)."""
    np = _numpy()

    view = memoryview(buf).cast("B")
    n8 = len(view) // 8 * 8
    if n8 and np.frombuffer(view[:n8], dtype=np.uint64).any():
        return False
    return not any(view[n8:])


def classify(
    buf: memoryview | bytes | bytearray, sector_num: int, min_sparse: int, alignment: int
) -> list[tuple[int, int, bool]]:
    """Split ``buf`` (whole sectors, starting at absolute ``sector_num``) into
    runs ``(first_sector, count, is_data)`` relative to the buffer, the way
    qemu-img convert writes them.  ``min_sparse`` and ``alignment`` are in
    sectors (alignment a power of two)."""
    return runs_of(_nonzero_sectors(buf), sector_num, min_sparse, alignment)


def nonzero_sectors(buf: memoryview | bytes | bytearray):  # -> np.ndarray[bool]
    """Which 512-byte sectors of ``buf`` hold a non-zero byte: found once
    for a buffer holding several requests, each then split by ``runs_of``."""
    return _nonzero_sectors(buf)


def runs_of(nz, sector_num: int, min_sparse: int, alignment: int) -> list[tuple[int, int, bool]]:
    """``classify`` for the sectors whose non-zero flags are ``nz``."""
    np = _numpy()

    n = len(nz)
    if n == 0:
        return []
    if not nz.any():
        return [(0, n, False)]
    if nz.all():
        return [(0, n, True)]
    first = (-sector_num) % alignment
    starts = np.arange(first, n, alignment, dtype=np.int64)
    if first:
        starts = np.concatenate(([0], starts))
    cells = np.logical_or.reduceat(nz, starts)
    # Run-length encode the cells, then in sectors.
    change = np.flatnonzero(cells[1:] != cells[:-1]) + 1
    run_first_cell = np.concatenate(([0], change))
    run_start = starts[run_first_cell]
    run_len = np.diff(np.concatenate((run_start, [n])))
    run_data = cells[run_first_cell].copy()
    if min_sparse > 1 and len(run_data) > 2:
        # Interior zero runs too short to be worth a hole become data.
        interior = np.zeros(len(run_data), dtype=bool)
        interior[1:-1] = True
        run_data |= interior & (run_len < min_sparse)
        keep = np.concatenate(([True], run_data[1:] != run_data[:-1]))
        run_start = run_start[keep]
        run_data = run_data[keep]
        run_len = np.diff(np.concatenate((run_start, [n])))
    return [(int(s), int(c), bool(d)) for s, c, d in zip(run_start, run_len, run_data)]
