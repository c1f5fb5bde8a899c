"""Zero detection with numpy, for the buffers zeroes.ZeroScan gives up on
(sectors that begin with 8 zero bytes but hold data): flags per sector,
then qemu-img's runs of them (see zeroes.py for the rules)."""

from __future__ import annotations

SECTOR = 512


def _numpy():
    """numpy, imported on first use (``info`` never needs it); OpenBLAS is
    told not to start a thread per core, which we would never use."""
    import os

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import numpy

    return numpy


def nonzero_sectors(buf: memoryview | bytes | bytearray):  # -> np.ndarray[bool]
    """Which 512-byte sectors of ``buf`` hold a non-zero byte."""
    np = _numpy()

    words = np.frombuffer(buf, dtype=np.uint64).reshape(-1, SECTOR // 8)
    # Real data almost always has a non-zero first or last word: look at
    # those (cheap, strided) and scan whole sectors only where both are 0.
    nz = (words[:, 0] | words[:, -1]) != 0
    unsure = np.flatnonzero(~nz)
    if len(unsure):
        nz[unsure] = np.bitwise_or.reduce(words[unsure], axis=1) != 0
    return nz


def runs_of(nz, sector_num: int, min_sparse: int, alignment: int) -> list[tuple[int, int, bool]]:
    """zeroes.ZeroScan.runs for the sectors whose non-zero flags are ``nz``."""
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
