"""qcow2 layouts the driver does not open yet (extended L2 entries, an
external data file): the checker runs over a minimal stand-in driver and its
report must equal qemu-img check's."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import needs_qemu
from test_check_helpers import l2_pos, qemu, rd64, wr64

pytestmark = needs_qemu


@dataclass
class StandIn:
    file: object
    header: object
    read_only: bool = True

    def drop_caches(self) -> None:
        pass


def _check_standin(path: Path) -> tuple[str, str, int]:
    from qimg.errors import QimgError
    from qimg.formats.qcow2.check import check_image
    from qimg.formats.qcow2.header import QCowHeader
    from qimg.ops.check import human_text
    from qimg.protocols.file import File

    lines: list[str] = []
    with File(str(path)) as f:
        h = QCowHeader.parse(f.pread(0, 1 << 21))
        try:
            result = check_image(StandIn(f, h), None, report=lines.append,
                                 error_report=lambda t: lines.append("qemu-img: " + t))
        except QimgError as e:
            return "", "".join(x + "\n" for x in lines) + f"qemu-img: {e.message}\n", e.code
    err = "".join(x + "\n" for x in lines)
    result.filename, result.format = path.name, "qcow2"
    out = human_text(result)
    if result.check_errors:
        err += "qemu-img: Check failed\n"
    return out, err, result.exit_code


@pytest.mark.parametrize("create,io_cmds", [
    (["-o", "extended_l2=on"], ["write 0 100k", "write -z 1M 64k", "write 3M 64k"]),
    (["-o", "data_file=x.data"], ["write 0 1M", "write 4M 64k"]),
    (["-o", "data_file=x.data,data_file_raw=on"], ["write 0 1M"]),
])
@pytest.mark.parametrize("damage", [None, "copied", "leak"])
def test_layouts_the_driver_does_not_open(tmp_path: Path, create: list[str], io_cmds: list[str],
                                          damage: str | None) -> None:
    img = tmp_path / "x.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *create, str(img), "16M"], check=True, cwd=tmp_path)
    args = []
    for c in io_cmds:
        args += ["-c", c]
    subprocess.run(["qemu-io", *args, str(img)], check=True, capture_output=True, cwd=tmp_path)
    if damage == "copied":
        # The first L2 entry (16 bytes wide with extended L2, entry first).
        pos = l2_pos(img, 0, 0)
        wr64(img, pos, rd64(img, pos) ^ (1 << 63))
    elif damage == "leak":
        size = img.stat().st_size
        cs = 1 << 16
        with open(img, "r+b") as f:
            f.truncate(-(-size // cs) * cs + cs)
        rt = rd64(img, 48)
        block = rd64(img, rt) & ~0x1FF
        cluster = -(-size // cs)
        with open(img, "r+b") as f:
            f.seek(block + 2 * cluster)
            f.write((1).to_bytes(2, "big"))
    mine = _check_standin(img)
    assert mine == qemu(["check", "x.qcow2"], tmp_path)
    # With a data file, entry 0 at host offset 0 is told from a hole only by
    # OFLAG_COPIED: clearing it makes a hole, which is consistent.
    hole_only = damage == "copied" and "data_file" in create[1]
    assert (mine[2] != 0) == (damage is not None and not hole_only)
