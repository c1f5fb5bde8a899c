"""The copy engine's pieces: zero detection against a plain re-statement of
qemu-img's is_allocated_sectors_min(), the progress printer's float
rounding, and the engine's chunking on raw images."""

from __future__ import annotations

import io
import random

import pytest

from qimg.ops.progress import FloatAccumulator, Progress, f32
import qimg.ops.zeroes as zeroes
from qimg.ops.zeroes import ZeroScan, classify, is_zero

SECTOR = 512


def _reference(zero: list[bool], sector_num: int, min_sparse: int, alignment: int) -> list[tuple[int, int, bool]]:
    """qemu-img's algorithm, sector by sector, as its comments describe it."""

    def allocated(pos: int, n: int) -> tuple[int, bool]:
        first_zero = zero[pos]
        i = 1
        while i < n and zero[pos + i] == first_zero:
            i += 1
        if i == n:
            return i, not first_zero
        is_zero_run = first_zero
        tail = (sector_num + pos + i) & (alignment - 1)
        if tail:
            if is_zero_run and i <= tail:
                is_zero_run = False
            if not is_zero_run:
                i = min(i + alignment - tail, n)
            else:
                i -= tail
        return i, not is_zero_run

    def allocated_min(pos: int, n: int) -> tuple[int, bool]:
        minimum = min(min_sparse, n)
        i, data = allocated(pos, n)
        if not data:
            return i, False
        used = checked = i
        while checked < n:
            j, data = allocated(pos + checked, n - checked)
            checked += j
            if data:
                used = checked
            elif j >= minimum:
                break
        return used, True

    runs: list[tuple[int, int, bool]] = []
    pos, n = 0, len(zero)
    while pos < n:
        count, data = allocated_min(pos, n - pos)
        if runs and runs[-1][2] == data:
            runs[-1] = (runs[-1][0], runs[-1][1] + count, data)
        else:
            runs.append((pos, count, data))
        pos += count
    return runs


@pytest.mark.parametrize("seed", range(40))
def test_classify_matches_qemu_algorithm(seed: int) -> None:
    rng = random.Random(seed)
    nsec = rng.choice([1, 7, 8, 64, 200, 4096])
    zero = []
    while len(zero) < nsec:
        zero.extend([rng.random() < 0.6] * rng.choice([1, 2, 3, 8, 16, 40]))
    zero = zero[:nsec]
    buf = bytearray(nsec * SECTOR)
    for i, z in enumerate(zero):
        if not z:
            buf[i * SECTOR + rng.randrange(SECTOR)] = rng.randrange(1, 256)
    min_sparse = rng.choice([1, 8, 24, 128])
    alignment = 1 << (min_sparse.bit_length() - 1)
    sector_num = rng.choice([0, 3, 8, 1000])
    assert classify(buf, sector_num, min_sparse, alignment) == _reference(zero, sector_num, min_sparse, alignment)


def _sectors(rng: random.Random, nsec: int, where: str) -> tuple[list[bool], bytearray]:
    """Runs of zero and data sectors; ``where`` puts each data sector's
    non-zero byte anywhere, only inside (first and last 8 bytes zero, which
    the scan's first look at each sector cannot tell from zeroes), or at
    its edges."""
    zero: list[bool] = []
    while len(zero) < nsec:
        zero.extend([rng.random() < 0.6] * rng.choice([1, 2, 3, 8, 16, 40, 300]))
    zero = zero[:nsec]
    buf = bytearray(nsec * SECTOR)
    for i, z in enumerate(zero):
        if not z:
            if where == "any":
                pos = rng.randrange(SECTOR)
            elif where == "inside":
                pos = rng.randrange(8, SECTOR - 8)
            else:
                pos = rng.choice([0, 7, SECTOR - 8, SECTOR - 1])
            buf[i * SECTOR + pos] = rng.randrange(1, 256)
    return zero, buf


@pytest.mark.parametrize("budget", [0, 3, zeroes.COMPARE_BUDGET])
@pytest.mark.parametrize("seed", range(60))
def test_scan_of_several_requests_matches_qemu_algorithm(seed: int, budget: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """One scan of a buffer, split into requests as the engine splits a
    batch read; a small budget hands the buffer to numpy part way."""
    monkeypatch.setattr(zeroes, "COMPARE_BUDGET", budget)
    rng = random.Random(seed)
    nsec = rng.choice([1, 9, 64, 999, 4096])
    zero, buf = _sectors(rng, nsec, rng.choice(["any", "inside", "edges"]))
    min_sparse = rng.choice([1, 2, 8, 24, 128, 4096])
    alignment = 1 << (min_sparse.bit_length() - 1)
    sector_num = rng.choice([0, 3, 8, 1000, 12345])
    scan = ZeroScan(buf, sector_num, alignment)
    pos = 0
    while pos < nsec:
        n = rng.randint(1, nsec - pos)
        want = _reference(zero[pos:pos + n], sector_num + pos, min_sparse, alignment)
        assert scan.runs(pos, n, min_sparse) == want
        pos += n


def test_is_zero() -> None:
    assert is_zero(bytes(4099))
    buf = bytearray(4099)
    buf[4098] = 1
    assert not is_zero(buf)
    buf = bytearray(4096)
    buf[5] = 1
    assert not is_zero(buf)


def _printed(values: list[float], min_skip: float) -> str:
    out = io.StringIO()
    p = Progress(True, min_skip, out)
    for v in values:
        p.update(v)
    p.end()
    return out.getvalue()


def test_progress_prints_only_moves_over_min_skip() -> None:
    text = _printed([0, 0.5, 1.5, 2.0, 100, 100], 1.0)
    assert text == "    (0.00/100%)\r    (1.50/100%)\r    (100.00/100%)\r    (100.00/100%)\r\n"


def test_progress_disabled_prints_nothing() -> None:
    out = io.StringIO()
    p = Progress(False, 1.0, out)
    p.update(0)
    p.update(100)
    p.end()
    assert out.getvalue() == ""


def test_float_rounding_is_single_precision() -> None:
    # 1/3 as a C float prints 33.33, but accumulates differently from a double
    assert f32(1 / 3) != 1 / 3
    acc = FloatAccumulator()
    for _ in range(3):
        value = acc.add(f32(1.0 / 3.0) * 100)
    assert value == min(f32(f32(f32(33.333332) + f32(33.333332)) + f32(33.333332)), 100.0)
    assert acc.add(50) == 100.0
