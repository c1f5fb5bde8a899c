"""qemu-img check on damaged snapshot tables, and check -r on images with
persistent bitmaps: qimg must report, repair (or refuse to) exactly as
qemu-img 7.2 does on a twin copy of the same bytes, and leave the same
file behind (compared byte for byte, and through qemu-img check and info).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from conftest import needs_qemu, set_bitmap_in_use
from test_check_helpers import qemu, qimg_inprocess, set_refcount

pytestmark = needs_qemu

SNAPSHOT_COUNT = 60  # header fields (docs/interop/qcow2.txt)
SNAPSHOT_OFFSET = 64
ENTRY = struct.Struct(">QIHHIIQII")  # a table entry's fixed part


def _make(path: Path, compat: str = "1.1", snapshots: int = 2, bitmaps: bool = False) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compat={compat}", str(path), "4M"],
                   check=True)
    subprocess.run(["qemu-io", "-c", "write 0 64k", str(path)], check=True, capture_output=True)
    for i in range(snapshots):
        subprocess.run(["qemu-img", "snapshot", "-c", f"sn{i}", str(path)], check=True)
        subprocess.run(["qemu-io", "-c", f"write {64 * (i + 1)}k 64k", str(path)], check=True, capture_output=True)
    if bitmaps:
        subprocess.run(["qemu-img", "bitmap", "--add", str(path), "b0"], check=True)
        subprocess.run(["qemu-img", "bitmap", "--add", "-g", "128k", str(path), "b1"], check=True)
        subprocess.run(["qemu-io", "-c", "write 1M 64k", str(path)], check=True, capture_output=True)
    return path


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _write(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _table(path: Path) -> tuple[int, int]:
    return struct.unpack(">IQ", _read(path, SNAPSHOT_COUNT, 12))


def _entries(path: Path) -> list[int]:
    """Where each entry of the table starts."""
    nb, pos = _table(path)
    out = []
    for _ in range(nb):
        pos = -(-pos // 8) * 8
        out.append(pos)
        fields = ENTRY.unpack(_read(path, pos, ENTRY.size))
        pos += ENTRY.size + fields[8] + fields[2] + fields[3]
    return out


def _set_u32(where: Callable[[Path], int], value: int) -> Callable[[Path], None]:
    return lambda p: _write(p, where(p), struct.pack(">I", value))


DAMAGES: dict[str, Callable[[Path], None]] = {
    "count_too_large": lambda p: _write(p, SNAPSHOT_COUNT, struct.pack(">I", 65537)),
    "count_far_too_large": lambda p: _write(p, SNAPSHOT_COUNT, struct.pack(">I", 0xFFFFFFFF)),
    "count_one_more": lambda p: _write(p, SNAPSHOT_COUNT, struct.pack(">I", _table(p)[0] + 1)),
    "offset_unaligned": lambda p: _write(p, SNAPSHOT_OFFSET, struct.pack(">Q", _table(p)[1] + 8)),
    "offset_past_end": lambda p: _write(p, SNAPSHOT_OFFSET, struct.pack(">Q", 1 << 30)),
    "no_snapshots_offset_unaligned": lambda p: _write(p, SNAPSHOT_COUNT, struct.pack(">IQ", 0, _table(p)[1] + 8)),
    "no_snapshots_offset_huge": lambda p: _write(p, SNAPSHOT_COUNT, struct.pack(">IQ", 0, 0xFFFFFFFFFFFF0000)),
    "offset_huge": lambda p: _write(p, SNAPSHOT_OFFSET, struct.pack(">Q", 0x7FFFFFFFFFFF0000)),
    "l1_unaligned": lambda p: _write(p, _entries(p)[1], struct.pack(">Q", int.from_bytes(
        _read(p, _entries(p)[1], 8), "big") + 8)),
    "l1_too_large": _set_u32(lambda p: _entries(p)[0] + 8, (32 << 20) // 8 + 1),
    "extra_too_big": _set_u32(lambda p: _entries(p)[0] + 36, 1025),
    "extra_far_too_big": _set_u32(lambda p: _entries(p)[1] + 36, 1 << 20),
    "extra_incomplete": _set_u32(lambda p: _entries(p)[1] + 36, 8),
    "id_too_long": lambda p: _write(p, _entries(p)[1] + 12, struct.pack(">H", 65535)),
    "table_truncated": lambda p: os.truncate(p, _entries(p)[1] + 20),
}


def _twins(src: Path, tmp: Path) -> tuple[Path, Path]:
    out = []
    for d in ("qemu", "qimg"):
        (tmp / d).mkdir(exist_ok=True)
        shutil.copy(src, tmp / d / "x.qcow2")
        out.append(tmp / d / "x.qcow2")
    return out[0], out[1]


def _compare(src: Path, tmp: Path, args: list[str]) -> None:
    q, m = _twins(src, tmp)
    theirs = qemu([*args, "x.qcow2"], q.parent)
    mine = qimg_inprocess([*args, "x.qcow2"], m.parent)
    assert mine[1] == theirs[1], "stderr differs"
    assert mine[0] == theirs[0], "stdout differs"
    assert mine[2] == theirs[2], "exit code differs"
    assert m.read_bytes() == q.read_bytes(), "the files differ"
    for after in (["check"], ["info", "--output=json"]):
        assert qemu([*after, "x.qcow2"], m.parent) == qemu([*after, "x.qcow2"], q.parent), after
    # the same blocks allocated (qemu-img info's disk size): holes where QEMU discards
    assert os.stat(m).st_blocks == os.stat(q).st_blocks


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("repair", [None, "leaks", "all"])
def test_damaged_snapshot_table(tmp_path: Path, damage: str, repair: str | None) -> None:
    src = _make(tmp_path / "src.qcow2")
    DAMAGES[damage](src)
    _compare(src, tmp_path, ["check", *(["-r", repair] if repair else [])])


@pytest.mark.parametrize("damage", ["extra_incomplete", "extra_too_big", "count_one_more", "table_truncated"])
def test_damaged_snapshot_table_v2(tmp_path: Path, damage: str) -> None:
    """Version 2 entries need no extra data; repairs still rewrite the table."""
    src = _make(tmp_path / "src.qcow2", compat="0.10")
    DAMAGES[damage](src)
    _compare(src, tmp_path, ["check", "-r", "all"])
    _compare(src, tmp_path, ["check", "--output=json"])


@pytest.mark.parametrize("damage", ["none", "leak", "in_use", "snapshot", "snapshot_extra"])
@pytest.mark.parametrize("repair", ["leaks", "all"])
def test_repair_keeps_bitmaps_as_qemu(tmp_path: Path, damage: str, repair: str) -> None:
    """A repairing check opens the image read-write, so its bitmaps are
    flagged in use, then stored again on close: the file is qemu-img's.
    (Flagging them rewrites the header from a state without the snapshot
    table: qemu-img 7.2 loses the snapshots of such an image, and so do we.)"""
    src = _make(tmp_path / "src.qcow2", snapshots=1 if damage.startswith("snapshot") else 0, bitmaps=True)
    if damage == "leak":
        set_refcount(src, 30, 1)
    elif damage == "in_use":
        set_bitmap_in_use(src, "b1")
    elif damage == "snapshot_extra":
        DAMAGES["extra_too_big"](src)
    _compare(src, tmp_path, ["check", "-r", repair])
