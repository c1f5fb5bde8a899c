"""The Python API, as the README shows it, held to what qemu-img says of the
same files."""

import json

import pytest

import qimg
from conftest import needs_qemu, run_qemu, run_qemu_io


@pytest.fixture
def chain(tmp_path):
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    qimg.create(base, "qcow2", 8 << 20, options="cluster_size=65536")
    qimg.create(top, "qcow2", backing_file=base, backing_format="qcow2")
    return base, top


def test_open_write_read_extents(chain):
    base, top = chain
    with qimg.open(base, read_only=False) as img:
        img.write(0, b"B" * 200_000)
    with qimg.open(top, read_only=False) as img:
        img.write(100, b"hello")
        img.write_zeroes(1 << 20, 1 << 20)
        assert img.size == 8 << 20
        assert img.read(98, 9) == b"BBhelloBB"
        assert img.read(1 << 20, 16) == bytes(16)
        exts = list(img.extents())
    assert sum(e.length for e in exts) == 8 << 20
    assert [(e.offset, e.length, e.allocated) for e in exts][:2] == [(0, 65536, True), (65536, 983040, False)]


def test_read_only_image_refuses_writes(chain):
    with qimg.open(chain[0]) as img:
        with pytest.raises(qimg.QimgError):
            img.write(0, b"x")


def test_missing_file_raises_qimg_error(tmp_path):
    with pytest.raises(qimg.QimgError) as e:
        qimg.info(str(tmp_path / "nope"))
    assert "No such file or directory" in e.value.message


@needs_qemu
def test_info_and_map_are_qemu_img_json(chain):
    base, top = chain
    run_qemu_io("-c", "write -P 7 64k 128k", "-c", "write -z 1M 64k", top)
    theirs = json.loads(run_qemu("info", "--output=json", "--backing-chain", top).stdout)
    assert qimg.info(top, backing_chain=True) == theirs
    theirs_map = json.loads(run_qemu("map", "--output=json", top).stdout)
    mine = [{k: v for k, v in e.items() if k != "filename"} for e in qimg.map(top)]
    assert mine == theirs_map


@needs_qemu
def test_convert_compare_check(chain, tmp_path):
    base, top = chain
    run_qemu_io("-c", "write -P 9 0 3M", base)
    run_qemu_io("-c", "write -P 5 1M 64k", top)
    flat = str(tmp_path / "flat.raw")
    seen = []
    qimg.convert([top], flat, out_format="raw", progress=seen.append)
    assert seen and seen[-1] == 100
    assert run_qemu("compare", top, flat).returncode == 0
    assert qimg.compare(top, flat).identical
    with qimg.open(flat, "raw", read_only=False) as img:
        img.write(5 << 20, b"x")
    result = qimg.compare(top, flat)
    assert (result.identical, result.offset, result.code) == (False, 5 << 20, 1)
    assert result.message == "Content mismatch at offset 5242880!"
    checked = qimg.check(top)
    theirs = json.loads(run_qemu("check", "--output=json", top).stdout)
    assert (checked.exit_code, checked.image_end_offset) == (0, theirs["image-end-offset"])
