"""raw over the file protocol: sizes, holes, preallocation, zero writes."""

import os

import pytest

from qimg.block.image import open_image
from qimg.block.status import DATA, ZERO
from qimg.formats.raw import RawDriver


def test_create_sparse_and_read_zeroes(tmp_path):
    path = str(tmp_path / "a.raw")
    RawDriver.create(path, 5 << 30, {})
    assert os.path.getsize(path) == 5 << 30
    # only the first block is allocated (zeroes), as file-posix's
    # allocate_first_block does for every file it grows from empty
    assert os.stat(path).st_blocks * 512 <= 4096
    with open_image(path, "raw") as img:
        assert img.size == 5 << 30
        assert img.read((4 << 30) + 7, 100) == bytes(100)  # past 4 GiB
        assert img.read(0, 4096) == bytes(4096)
        ext = img.block_status(4096, img.size - 4096)
        assert ext.flags & ZERO and ext.length == img.size - 4096


@pytest.mark.parametrize("mode", ["falloc", "full"])
def test_create_preallocated(tmp_path, mode):
    path = str(tmp_path / "p.raw")
    RawDriver.create(path, 3 << 20, {"preallocation": mode})
    assert os.path.getsize(path) == 3 << 20
    assert os.stat(path).st_blocks * 512 >= 3 << 20


def test_write_zeroes_punches_hole(tmp_path):
    path = str(tmp_path / "w.raw")
    RawDriver.create(path, 4 << 20, {})
    with open_image(path, "raw", read_only=False) as img:
        img.write(0, b"\xab" * (4 << 20))
        img.write_zeroes(1 << 20, 1 << 20)
        img.flush()
        assert img.read((1 << 20) - 1, 3) == b"\xab\x00\x00"
        exts = [(e.offset, e.length, bool(e.flags & DATA)) for e in img.extents()]
    assert (1 << 20, 1 << 20, False) in exts
    assert os.stat(path).st_blocks * 512 == 3 << 20


def test_read_past_end_is_short(tmp_path):
    # qemu sees a 1000-byte raw file as 1024 bytes (whole sectors, zero tail):
    # qemu-io -c 'read -v 990 34' reads ten x and 24 zeroes
    path = str(tmp_path / "s.raw")
    with open(path, "wb") as f:
        f.write(b"x" * 1000)
    with open_image(path, "raw") as img:
        assert img.size == 1024
        assert img.read(990, 100) == b"x" * 10 + bytes(24)
