"""Corruption that only shows when a command reaches it: an L2 table or a
data cluster at an unaligned host offset.  qemu-img's commands fail the
request with EIO and say "qcow2: Image is corrupt: ..." (read-only), or mark
the image corrupt ("Marking image as corrupt: ...") when it is open for
writing; qimg must say and do the same, on twin copies of the same bytes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import needs_qemu, run_qemu, run_qemu_io, run_qimg
from test_check_helpers import header, l1_pos, l2_pos, rd64, twin_copies, wr64

pytestmark = [needs_qemu, pytest.mark.interop]

DAMAGE = {
    # L1[0] points 512 bytes into its L2 table
    "l2": lambda p: wr64(p, l1_pos(p, 0), rd64(p, l1_pos(p, 0)) + 0x200),
    # the first data cluster 512 bytes off its cluster
    "data0": lambda p: wr64(p, l2_pos(p, 0, 0), rd64(p, l2_pos(p, 0, 0)) + 0x200),
    # the second one: map prints the first cluster before it fails
    "data1": lambda p: wr64(p, l2_pos(p, 0, 1), rd64(p, l2_pos(p, 0, 1)) + 0x200),
    # the first refcount block unaligned: block status looks at refcounts
    # (is the metadata preallocated?), says so, and goes on
    "refblock": lambda p: wr64(p, header(p)["rt_off"], rd64(p, header(p)["rt_off"]) + 0x200),
}

COMMANDS = [
    ["map", "x.qcow2"],
    ["map", "--output=json", "x.qcow2"],
    ["convert", "-O", "raw", "x.qcow2", "out.raw"],
    ["dd", "if=x.qcow2", "of=out.raw", "bs=64k"],
    ["compare", "x.qcow2", "clean.qcow2"],
    ["check", "x.qcow2"],
]


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("corrupt")
    img = d / "clean.qcow2"
    run_qemu("create", "-f", "qcow2", str(img), "4M")
    run_qemu_io("-c", "write -P 0x11 0 128k", str(img))
    raw = d / "src.raw"
    raw.write_bytes(b"\x09" * (64 << 10) + bytes((4 << 20) - (64 << 10)))
    return d


def _twins(clean: Path, tmp: Path, damage: str) -> tuple[Path, Path]:
    theirs, mine = twin_copies(clean / "clean.qcow2", tmp)
    for p in (theirs, mine):
        DAMAGE[damage](p)
        shutil.copy(clean / "clean.qcow2", p.parent / "clean.qcow2")
        shutil.copy(clean / "src.raw", p.parent / "src.raw")
    return theirs, mine


def _info_corrupt(path: Path) -> bool:
    out = subprocess.run(["qemu-img", "info", str(path)], capture_output=True, text=True).stdout
    return "corrupt: true" in out


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: "-".join(a[:2]))
def test_read_only_commands_report_corruption(clean: Path, tmp_path: Path, damage: str, args: list[str]) -> None:
    theirs, mine = _twins(clean, tmp_path, damage)
    q = run_qemu(*args, cwd=str(theirs.parent))
    m = run_qimg(*args, cwd=str(mine.parent))
    assert (m.stdout.decode(), m.stderr.decode(), m.returncode) == \
        (q.stdout.decode(), q.stderr.decode(), q.returncode)
    if args[0] != "check" and not (args[0] == "dd" and damage == "refblock"):
        # (dd reads without asking for block status: it never meets a refcount)
        assert b"qcow2: Image is corrupt: " in m.stderr
    # read-only: nothing is marked
    assert not _info_corrupt(mine) and mine.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("damage", ["l2", "data0"])
def test_write_marks_image_corrupt(clean: Path, tmp_path: Path, damage: str) -> None:
    theirs, mine = _twins(clean, tmp_path, damage)
    args = ["convert", "-n", "-f", "raw", "-O", "qcow2", "src.raw", "x.qcow2"]
    q = run_qemu(*args, cwd=str(theirs.parent))
    m = run_qimg(*args, cwd=str(mine.parent))
    assert m.stderr.decode() == q.stderr.decode()
    assert b"Marking image as corrupt" in m.stderr
    assert m.returncode == q.returncode == 1
    assert _info_corrupt(mine) and _info_corrupt(theirs)
    # a corrupt image opens read-only only
    refused = run_qimg("resize", "x.qcow2", "+1M", cwd=str(mine.parent))
    assert refused.returncode == 1 and b"cannot be opened read/write" in refused.stderr


def test_freeing_a_cluster_without_refcount_block(clean: Path, tmp_path: Path) -> None:
    # a compressed cluster far past the end of the file: zeroing it frees a
    # cluster no refcount block covers; QEMU makes one and then fails the
    # free with EAGAIN, says so, and the write goes on
    theirs, mine = _twins(clean, tmp_path, "data0")
    for p in (theirs, mine):
        wr64(p, l2_pos(p, 0, 0), (1 << 62) | (1 << 39))
    args = ["convert", "-n", "-f", "raw", "-O", "qcow2", "src.raw", "x.qcow2"]
    q = run_qemu(*args, cwd=str(theirs.parent))
    m = run_qimg(*args, cwd=str(mine.parent))
    assert m.stderr.decode() == q.stderr.decode() == "qcow2_free_clusters failed: Resource temporarily unavailable\n"
    assert m.returncode == q.returncode == 0
    assert mine.read_bytes() == theirs.read_bytes()
