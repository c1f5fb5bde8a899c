"""Garbage in the metadata: qimg check must print qemu-img's report or a
qemu-style error, never a traceback, and agree with qemu-img on the same
bytes (random entries written into the L1 table, an L2 table, the refcount
table and a refcount block of an image qemu-io wrote)."""

from __future__ import annotations

import random
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import needs_qemu
from test_check_helpers import header, qemu, qimg_inprocess, rd64, twin_copies

pytestmark = needs_qemu

SPECIAL = [0, 1, 0x200, 0x10000, 0x30000, 0x50000, 0xA0000, (1 << 63) | 0x50000, (1 << 62) | 0x50000,
           0x8000000000050001, 1 << 40]


def _scramble(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    h = header(path)
    regions = [h["l1_off"], h["rt_off"], rd64(path, h["rt_off"]) & ~0x1FF,
               rd64(path, h["l1_off"]) & 0x00FFFFFFFFFFFE00]
    start = regions[seed % len(regions)]
    with open(path, "r+b") as f:
        for _ in range(rng.randint(1, 6)):
            pos = start + 8 * rng.randrange(64)
            f.seek(pos)
            kind = rng.random()
            if kind < 0.4:
                value = int.from_bytes(rng.randbytes(8), "big")
            elif kind < 0.7:
                value = struct.unpack(">Q", f.read(8))[0] ^ (1 << rng.randrange(64))
                f.seek(pos)
            else:
                value = rng.choice(SPECIAL)
            f.write(struct.pack(">Q", value))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    p = d / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "16M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 7 0 256k", "-c", "write -P 8 4M 64k", str(p)],
                   check=True, capture_output=True)
    return p


@pytest.mark.parametrize("seed", [1, 3, 7, 14, 20, 26, 33, 51, 85, 114])
def test_scrambled_metadata(tmp_path: Path, base: Path, seed: int) -> None:
    _compare_scrambled(tmp_path, base, seed)


@pytest.mark.parametrize("create", [["-o", "refcount_bits=1"], ["-o", "compat=0.10"], ["compressed"]])
@pytest.mark.parametrize("seed", [17, 27, 39])
def test_scrambled_other_layouts(tmp_path: Path, create: list[str], seed: int) -> None:
    src = tmp_path / "src.qcow2"
    if create == ["compressed"]:
        raw = tmp_path / "src.raw"
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "16M"], check=True)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 7 0 256k", "-c", "write -P 8 4M 64k", str(raw)],
                       check=True, capture_output=True)
        subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(src)], check=True)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *create, str(src), "16M"], check=True)
        subprocess.run(["qemu-io", "-c", "write -P 7 0 256k", "-c", "write -P 8 4M 64k", str(src)],
                       check=True, capture_output=True)
    _compare_scrambled(tmp_path, src, seed)


def _compare_scrambled(tmp_path: Path, base: Path, seed: int) -> None:
    theirs, mine = twin_copies(base, tmp_path)
    _scramble(theirs, seed)
    _scramble(mine, seed)
    for args in (["check", "x.qcow2"], ["check", "--output=json", "x.qcow2"],
                 ["check", "-r", "all", "x.qcow2"]):
        out, err, rc = qimg_inprocess(args, mine.parent)
        assert "internal error" not in err and "Traceback" not in err
        assert rc in (0, 1, 2, 3)
        assert (out, err, rc) == qemu(args, theirs.parent)


@pytest.mark.parametrize("garbage", ["truncated", "random_tail", "zero_tables"])
def test_garbage_images(tmp_path: Path, base: Path, garbage: str) -> None:
    data = bytearray(base.read_bytes())
    rng = random.Random(garbage)
    if garbage == "truncated":
        data = data[:0x30000 + 100]
    elif garbage == "random_tail":
        data[0x10000:] = rng.randbytes(len(data) - 0x10000)
    else:
        data[0x10000:0x50000] = bytes(0x40000)
    theirs, mine = twin_copies(base, tmp_path)
    theirs.write_bytes(bytes(data))
    mine.write_bytes(bytes(data))
    for args in (["check", "x.qcow2"], ["check", "-r", "all", "x.qcow2"], ["check", "x.qcow2"]):
        out, err, rc = qimg_inprocess(args, mine.parent)
        assert "internal error" not in err and "Traceback" not in err
        assert rc in (0, 1, 2, 3)
        assert (out, err, rc) == qemu(args, theirs.parent)
