"""QED against qemu-img 7.2: create byte for byte, images qemu-io writes read,
map, info and check identically, images qimg writes are byte-identical to
qemu-io's and pass qemu-img check/compare, the need-check flag and repair,
hostile headers."""

from __future__ import annotations

import shutil
import struct

import pytest

from conftest import assert_same, needs_qemu, run_qemu, run_qemu_io, run_qimg
from qimg.block.image import open_image

pytestmark = needs_qemu

HEADER_FMT = "<IIIIQQQQQII"
QEMU_IO_SCRIPT = [
    "write -P 0x22 4096 8192",
    "write -P 0x33 100000 3000",
    "write -z 200000 300000",
    "write -z 1M 1M",
    "write -P 0x44 5M 2M",
    "write -P 0x45 7M 1",
]


def _create(tmp_path, name: str, *args: str) -> str:
    p = run_qemu("create", "-q", "-f", "qed", *args[:-1], name, args[-1], cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    return name


def _bases(tmp_path) -> None:
    run_qemu("create", "-q", "-f", "qcow2", "base.qcow2", "10M", cwd=str(tmp_path))
    run_qemu_io("-c", "write -P 0x11 0 10M", "-c", "write -z 2M 1M", str(tmp_path / "base.qcow2"))
    run_qemu("create", "-q", "-f", "raw", "base.raw", "3M", cwd=str(tmp_path))
    run_qemu_io("-f", "raw", "-c", "write -P 0x12 0 3M", str(tmp_path / "base.raw"))


def _raw(tmp_path, name: str, runner) -> bytes:
    out = f"{name}.{runner.__name__}.raw"
    p = runner("convert", "-O", "raw", name, out, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    return (tmp_path / out).read_bytes()


def _all_views_same(tmp_path, name: str) -> None:
    for cmd in (["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"],
                ["check"], ["check", "--output=json"]):
        assert_same([*cmd, name], str(tmp_path))
    assert _raw(tmp_path, name, run_qimg) == _raw(tmp_path, name, run_qemu)


@pytest.mark.parametrize("args", [
    ["10M"],
    ["-o", "cluster_size=4k,table_size=2", "10M"],
    ["-o", "table_size=16,cluster_size=1M", "10G"],
    ["-b", "base.qcow2", "-F", "qcow2", ""],
    ["-b", "base.raw", "-F", "raw", "10M"],
    ["1000"],
    ["0"],
    ["-o", "cluster_size=1k", "1G"],
    ["-o", "cluster_size=3M", "1G"],
    ["-o", "table_size=32", "1G"],
    ["-o", "cluster_size=4k,table_size=1", "2G"],
    ["-u", "-b", "base.raw", "-F", "xyz", "1M"],
])
def test_create_byte_identical(tmp_path, args):
    if any(a.startswith("base") for a in args):
        _bases(tmp_path)
    args = [a for a in args if a != ""]
    mine = run_qimg("create", "-f", "qed", *args[:-1], "m.qed", *args[-1:], cwd=str(tmp_path))
    theirs = run_qemu("create", "-f", "qed", *args[:-1], "q.qed", *args[-1:], cwd=str(tmp_path))
    assert mine.stdout.decode().replace("m.qed", "q.qed") == theirs.stdout.decode()
    assert mine.stderr.decode().replace("m.qed", "q.qed") == theirs.stderr.decode()
    assert mine.returncode == theirs.returncode
    if theirs.returncode == 0 or (tmp_path / "q.qed").exists():
        assert (tmp_path / "m.qed").read_bytes() == (tmp_path / "q.qed").read_bytes()


def test_option_help(tmp_path):
    assert_same(["create", "-f", "qed", "-o", "help"], str(tmp_path))
    assert_same(["create", "-f", "qed", "-o", "help", "x.qed"], str(tmp_path))


@pytest.mark.parametrize("backing", [None, "qcow2", "raw"])
def test_qemu_io_written_reads_the_same(tmp_path, backing):
    _bases(tmp_path)
    if backing is None:
        name = _create(tmp_path, "t.qed", "10M")
    elif backing == "raw":
        name = _create(tmp_path, "t.qed", "-b", "base.raw", "-F", "raw", "10M")
    else:
        name = _create(tmp_path, "t.qed", "-b", "base.qcow2", "-F", "qcow2", "10M")
    args = [a for cmd in QEMU_IO_SCRIPT for a in ("-c", cmd)]
    run_qemu_io(*args, str(tmp_path / name))
    _all_views_same(tmp_path, name)
    assert_same(["info", "--backing-chain", name], str(tmp_path))


@pytest.mark.parametrize("backing", [False, True])
def test_writes_byte_identical_to_qemu_io(tmp_path, backing):
    """The same writes through qimg and qemu-io give the same file: data
    clusters, copy-on-write from the backing file, zero clusters, L2 tables
    allocated after their data, the need-check flag cleared on close."""
    _bases(tmp_path)
    extra = ["-b", "base.qcow2", "-F", "qcow2"] if backing else []
    _create(tmp_path, "a.qed", *extra, "10M")
    shutil.copy(tmp_path / "a.qed", tmp_path / "b.qed")
    run_qemu_io(*[a for cmd in QEMU_IO_SCRIPT for a in ("-c", cmd)], str(tmp_path / "a.qed"))
    img = open_image(str(tmp_path / "b.qed"), "qed", read_only=False)
    img.write(4096, b"\x22" * 8192)
    img.write(100000, b"\x33" * 3000)
    img.write_zeroes(200000, 300000)
    img.write_zeroes(1 << 20, 1 << 20)
    img.write(5 << 20, b"\x44" * (2 << 20))
    img.write(7 << 20, b"\x45")
    img.close()
    assert (tmp_path / "a.qed").read_bytes() == (tmp_path / "b.qed").read_bytes()
    assert run_qemu("check", "b.qed", cwd=str(tmp_path)).returncode == 0
    assert run_qemu("compare", "a.qed", "b.qed", cwd=str(tmp_path)).returncode == 0


@pytest.mark.parametrize("src", ["t.qed", "base.qcow2", "base.raw"])
def test_convert_to_qed(tmp_path, src):
    _bases(tmp_path)
    _create(tmp_path, "t.qed", "-b", "base.qcow2", "-F", "qcow2", "10M")
    run_qemu_io(*[a for cmd in QEMU_IO_SCRIPT for a in ("-c", cmd)], str(tmp_path / "t.qed"))
    assert run_qimg("convert", "-O", "qed", src, "m.qed", cwd=str(tmp_path)).returncode == 0
    assert run_qemu("convert", "-O", "qed", src, "q.qed", cwd=str(tmp_path)).returncode == 0
    assert (tmp_path / "m.qed").read_bytes() == (tmp_path / "q.qed").read_bytes()
    check = run_qemu("check", "m.qed", cwd=str(tmp_path))
    assert check.returncode == 0, check.stdout
    assert run_qemu("compare", src, "m.qed", cwd=str(tmp_path)).returncode == 0


def _patched(tmp_path, src: str, name: str, patches: list[tuple[int, str, int]]) -> str:
    data = bytearray((tmp_path / src).read_bytes())
    for off, fmt, val in patches:
        struct.pack_into(fmt, data, off, val)
    (tmp_path / name).write_bytes(bytes(data))
    return name


def _damaged(tmp_path) -> tuple[str, dict[str, list]]:
    name = _create(tmp_path, "w.qed", "4M")
    run_qemu_io("-c", "write -P 0x11 0 1M", "-c", "write -P 0x12 2M 64k", str(tmp_path / name))
    data = (tmp_path / name).read_bytes()
    l2 = struct.unpack_from("<Q", data, 65536)[0]
    first = struct.unpack_from("<Q", data, l2)[0]
    return name, {
        "bad_l2_offset": [(65536 + 8, "<Q", 123456)],
        "unaligned_data": [(l2 + 8 * 3, "<Q", 7 * 65536 + 100)],
        "duplicate": [(l2 + 8 * 20, "<Q", first)],
        "past_eof": [(l2 + 8 * 21, "<Q", 1 << 40)],
        "need_check": [(16, "<Q", 2)],
        "need_check_and_past_eof": [(16, "<Q", 2), (l2 + 8 * 21, "<Q", 1 << 40)],
        "unknown_autoclear": [(32, "<Q", 0x10)],
    }


@pytest.mark.parametrize("case", ["bad_l2_offset", "unaligned_data", "duplicate", "past_eof",
                                  "need_check", "need_check_and_past_eof", "unknown_autoclear", "leaks"])
def test_check_and_repair(tmp_path, case):
    src, cases = _damaged(tmp_path)
    if case == "leaks":
        (tmp_path / "x.qed").write_bytes((tmp_path / src).read_bytes() + bytes(3 * 65536))
    else:
        _patched(tmp_path, src, "x.qed", cases[case])
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(tmp_path / "x.qed", tmp_path / d / "x.qed")
    assert_same(["check", "x.qed"], str(tmp_path / "a"))
    assert_same(["check", "--output=json", "x.qed"], str(tmp_path / "a"))
    assert_same(["map", "x.qed"], str(tmp_path / "a"))
    assert_same(["map", "--output=json", "x.qed"], str(tmp_path / "a"))
    assert_same(["compare", "x.qed", "x.qed"], str(tmp_path / "a"))
    mine = run_qimg("check", "-r", "all", "x.qed", cwd=str(tmp_path / "a"))
    theirs = run_qemu("check", "-r", "all", "x.qed", cwd=str(tmp_path / "b"))
    assert (mine.stdout, mine.stderr, mine.returncode) == (theirs.stdout, theirs.stderr, theirs.returncode)
    assert (tmp_path / "a" / "x.qed").read_bytes() == (tmp_path / "b" / "x.qed").read_bytes()


@pytest.mark.parametrize("case", ["need_check", "need_check_and_past_eof", "duplicate"])
def test_read_write_open_repairs_as_qemu(tmp_path, case):
    """A read-write open of an image not closed cleanly checks and repairs
    it first, then writes; the file ends as qemu-io leaves it."""
    src, cases = _damaged(tmp_path)
    _patched(tmp_path, src, "a.qed", cases[case])
    shutil.copy(tmp_path / "a.qed", tmp_path / "b.qed")
    run_qemu_io("-c", "write -P 0x77 3M 4k", str(tmp_path / "a.qed"))
    img = open_image(str(tmp_path / "b.qed"), "qed", read_only=False)
    img.write(3 << 20, b"\x77" * 4096)
    img.close()
    assert (tmp_path / "a.qed").read_bytes() == (tmp_path / "b.qed").read_bytes()


def test_need_check_set_while_writing(tmp_path):
    _create(tmp_path, "a.qed", "1M")
    img = open_image(str(tmp_path / "a.qed"), "qed", read_only=False)
    img.write(0, b"x" * 512)
    features = struct.unpack_from("<Q", (tmp_path / "a.qed").read_bytes(), 16)[0]
    assert features & 2  # QED_F_NEED_CHECK while allocations are in flight
    img.close()
    features = struct.unpack_from("<Q", (tmp_path / "a.qed").read_bytes(), 16)[0]
    assert not features & 2


def _header_cases(data: bytes) -> dict[str, bytes]:
    def patch(off: int, fmt: str, val: int, src: bytes = data) -> bytes:
        d = bytearray(src)
        struct.pack_into(fmt, d, off, val)
        return bytes(d)

    return {
        "magic": patch(0, "<I", 0x12345678),
        "features": patch(16, "<Q", 0x100),
        "cluster_size": patch(4, "<I", 1000),
        "table_size": patch(8, "<I", 3),
        "huge_table_size": patch(8, "<I", 1 << 30),
        "image_size": patch(48, "<Q", 1000),
        "huge_image_size": patch(48, "<Q", 1 << 62),
        "l1_offset": patch(40, "<Q", 5),
        "l1_past_eof": patch(40, "<Q", 1 << 40),
        "header_size": patch(12, "<I", 1 << 31),
        "backing_offset": patch(56, "<I", 60000, patch(16, "<Q", 1)),
        "backing_size": patch(60, "<I", 5000, patch(56, "<I", 64, patch(16, "<Q", 1))),
        "truncated": data[:40],
        "table_size_1": patch(8, "<I", 1),
    }


@pytest.mark.parametrize("case", ["magic", "features", "cluster_size", "table_size", "huge_table_size",
                                  "image_size", "huge_image_size", "l1_offset", "l1_past_eof",
                                  "header_size", "backing_offset", "backing_size", "truncated",
                                  "table_size_1"])
def test_hostile_headers(tmp_path, case):
    name = _create(tmp_path, "w.qed", "4M")
    run_qemu_io("-c", "write -P 0x11 0 1M", str(tmp_path / name))
    (tmp_path / "h.qed").write_bytes(_header_cases((tmp_path / name).read_bytes())[case])
    for cmd in (["info", "-f", "qed"], ["map", "-f", "qed"], ["check", "-f", "qed"], ["info"]):
        mine = assert_same([*cmd, "h.qed"], str(tmp_path))
        assert b"Traceback" not in mine.stderr


def test_probe_and_chain_through_overlay(tmp_path):
    """A qed overlay over qcow2 over raw reads through the whole chain."""
    _bases(tmp_path)
    run_qemu("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2", "6M", cwd=str(tmp_path))
    run_qemu_io("-c", "write -P 0x21 1M 100k", str(tmp_path / "mid.qcow2"))
    _create(tmp_path, "top.qed", "-b", "mid.qcow2", "-F", "qcow2", "10M")
    run_qemu_io("-c", "write -P 0x31 1050k 10k", "-c", "write -z 4M 64k", str(tmp_path / "top.qed"))
    _all_views_same(tmp_path, "top.qed")
    assert_same(["info", "--backing-chain", "--output=json", "top.qed"], str(tmp_path))
    assert_same(["compare", "top.qed", "base.raw"], str(tmp_path))


def test_convert_with_backing_byte_identical(tmp_path):
    """convert -B: only what differs from the backing file is written, and
    the target's copy-on-write reads the backing file as qemu-img does."""
    _bases(tmp_path)
    run_qemu("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", cwd=str(tmp_path))
    run_qemu_io("-c", "write -P 0x61 1000 70000", "-c", "write -z 3M 100k", str(tmp_path / "top.qcow2"))
    args = ["-O", "qed", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2"]
    assert run_qimg("convert", *args, "m.qed", cwd=str(tmp_path)).returncode == 0
    assert run_qemu("convert", *args, "q.qed", cwd=str(tmp_path)).returncode == 0
    assert (tmp_path / "m.qed").read_bytes() == (tmp_path / "q.qed").read_bytes()
    assert run_qemu("compare", "top.qcow2", "m.qed", cwd=str(tmp_path)).returncode == 0


def test_zero_write_over_data_clusters(tmp_path):
    """Zero writes over allocated clusters write zeroes in place; unaligned
    edges are written as data, as QEMU's block layer splits them."""
    _create(tmp_path, "a.qed", "8M")
    run_qemu_io("-c", "write -P 1 0 4M", str(tmp_path / "a.qed"))
    shutil.copy(tmp_path / "a.qed", tmp_path / "b.qed")
    run_qemu_io("-c", "write -z 64k 3M", "-c", "write -z 100 5000", "-c", "write -z 5M 1M",
                str(tmp_path / "a.qed"))
    img = open_image(str(tmp_path / "b.qed"), "qed", read_only=False)
    img.write_zeroes(65536, 3 << 20)
    img.write_zeroes(100, 5000)
    img.write_zeroes(5 << 20, 1 << 20)
    img.close()
    assert (tmp_path / "a.qed").read_bytes() == (tmp_path / "b.qed").read_bytes()
    assert_same(["map", "--output=json", "b.qed"], str(tmp_path))


@pytest.mark.parametrize("args", [["20M"], ["+1M"], ["5M"], ["--shrink", "5M"], ["1000"],
                                  ["--preallocation=full", "30M"], ["100T"]])
def test_resize(tmp_path, args):
    """QED grows by rewriting image_size; it cannot shrink or preallocate."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        _create(tmp_path / d, "x.qed", "10M")
    mine = run_qimg("resize", "x.qed", *args, cwd=str(tmp_path / "a"))
    theirs = run_qemu("resize", "x.qed", *args, cwd=str(tmp_path / "b"))
    assert (mine.stdout, mine.stderr, mine.returncode) == (theirs.stdout, theirs.stderr, theirs.returncode)
    assert (tmp_path / "a" / "x.qed").read_bytes() == (tmp_path / "b" / "x.qed").read_bytes()


@pytest.mark.parametrize("rebase", [None, ["-u", "-b", "base.raw", "-F", "raw"], ["-b", "base.raw", "-F", "raw"],
                                    ["-u", "-b", ""]])
def test_commit_and_rebase(tmp_path, rebase):
    """commit empties the overlay as QEMU's make_empty does; rebase rewrites
    the backing file name (where the format can), byte for byte as qemu-img."""
    for d in ("a", "b"):
        w = tmp_path / d
        w.mkdir()
        run_qemu("create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=str(w))
        run_qemu_io("-c", "write -P 1 0 4M", str(w / "base.qcow2"))
        run_qemu("create", "-q", "-f", "raw", "base.raw", "4M", cwd=str(w))
        run_qemu("create", "-q", "-f", "qed", "-b", "base.qcow2", "-F", "qcow2", "top.qed", cwd=str(w))
        run_qemu_io("-c", "write -P 2 4096 8192", "-c", "write -P 3 1M 64k", str(w / "top.qed"))
    cmd = ["commit", "top.qed"] if rebase is None else ["rebase", *rebase, "top.qed"]
    mine = run_qimg(*cmd, cwd=str(tmp_path / "a"))
    theirs = run_qemu(*cmd, cwd=str(tmp_path / "b"))
    assert (mine.stdout, mine.stderr, mine.returncode) == (theirs.stdout, theirs.stderr, theirs.returncode)
    for name in ("top.qed", "base.qcow2"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
