"""qemu-img resize: same output, exit code and resulting image as qemu-img 7.2."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import assert_same, needs_qemu, run_qemu, run_qemu_io, run_qimg, set_bitmap_in_use

pytestmark = needs_qemu


def _make(d, fmt, size, data=True, extra=()):
    path = d / "img"
    assert run_qemu("create", "-q", "-f", fmt, *extra, str(path), size).returncode == 0
    if data and fmt == "qcow2":
        run_qemu_io("-c", "write -P 1 0 64k", "-c", "write -z 128k 64k", "-c", "write -P 2 700k 100k", str(path))
    elif data and fmt == "raw":
        run_qemu_io("-f", "raw", "-c", "write -P 1 4096 64k", str(path))
    return path


def _info(path):
    r = run_qemu("info", "--output=json", str(path))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    info.pop("actual-size", None)
    info.pop("filename", None)
    return info


def _compare(tmp_path, fmt, size, args, data=True, extra=()):
    """Run ``resize ARGS`` with both programs on equal copies; compare what
    the user sees and the images left behind."""
    a, b = tmp_path / "qemu", tmp_path / "qimg"
    a.mkdir()
    pa = _make(a, fmt, size, data, extra)
    b.mkdir()
    pb = b / "img"
    shutil.copyfile(pa, pb)
    theirs = run_qemu("resize", *args, cwd=str(a))
    mine = run_qimg("resize", *args, cwd=str(b))
    assert mine.stdout.decode() == theirs.stdout.decode()
    assert mine.stderr.decode() == theirs.stderr.decode()
    assert mine.returncode == theirs.returncode
    assert _info(pb) == _info(pa)
    fo = ["-f", fmt]
    assert run_qemu("compare", *fo, *fo, str(pa), str(pb)).returncode == 0
    if fmt == "qcow2":
        r = run_qemu("check", str(pb))
        assert r.returncode == 0, r.stdout
    return mine


QCOW2_CASES = [
    ["img", "3M"], ["-q", "img", "+512"], ["img", "+0"],
    ["img", "-512K"], ["--shrink", "img", "--", "-512K"], ["--shrink", "img", "100k"],
    ["--shrink", "img", "1000"],
    ["--preallocation=metadata", "img", "+1M"], ["--preallocation=falloc", "img", "+1M"],
    ["--preallocation=full", "img", "+1M"], ["--preallocation=foo", "img", "+1M"],
    ["--preallocation=full", "--shrink", "img", "512K"], ["--preallocation=full", "img", "+0"],
    ["img", "0"], ["img", "--", "-2M"], ["img", "8E"], ["img", "16E"], ["img", "+7E"],
    ["img", "xyz"], ["img", "1", "2"], ["img"], [], ["-x", "img", "1M"], ["-f", "raw", "img", "+1M"],
    ["-f", "nosuch", "img", "+1M"], ["img2", "+1M"],
]


@pytest.mark.parametrize("args", QCOW2_CASES, ids=" ".join)
def test_qcow2(tmp_path, args):
    _compare(tmp_path, "qcow2", "1M", args)


@pytest.mark.parametrize("args", [["--shrink", "img", "64k"], ["img", "+5M"], ["--preallocation=full", "img", "2M"]])
def test_qcow2_v2_small_clusters(tmp_path, args):
    _compare(tmp_path, "qcow2", "1M", args, extra=("-o", "compat=0.10,cluster_size=4k"))


@pytest.mark.parametrize("args", [["img", "+1M"], ["--shrink", "img", "512K"]])
def test_qcow2_with_snapshot(tmp_path, args):
    a = tmp_path / "qemu"
    a.mkdir()
    pa = _make(a, "qcow2", "1M")
    assert run_qemu("snapshot", "-c", "s1", str(pa)).returncode == 0
    b = tmp_path / "qimg"
    b.mkdir()
    shutil.copyfile(pa, b / "img")
    theirs = run_qemu("resize", *args, cwd=str(a))
    mine = run_qimg("resize", *args, cwd=str(b))
    assert (mine.stdout, mine.stderr, mine.returncode) == (theirs.stdout, theirs.stderr, theirs.returncode)
    assert _info(b / "img") == _info(pa)
    assert run_qemu("check", str(b / "img")).returncode == 0


RAW_CASES = [
    ["-f", "raw", "img", "+1M"], ["img", "+1M"], ["-f", "raw", "img", "1000"], ["-f", "raw", "--shrink", "img", "1000"],
    ["-f", "raw", "--preallocation=falloc", "img", "3M"], ["-f", "raw", "--preallocation=full", "img", "3M"],
    ["-f", "raw", "--shrink", "img", "--", "-100k"], ["-f", "raw", "--preallocation=metadata", "img", "+1M"],
]


@pytest.mark.parametrize("args", RAW_CASES, ids=" ".join)
def test_raw(tmp_path, args):
    _compare(tmp_path, "raw", "1M", args)


@pytest.mark.parametrize("fmt", ["qed", "vdi", "qcow", "parallels"])
def test_other_formats(tmp_path, fmt):
    _compare(tmp_path, fmt, "1M", ["img", "+1M"], data=False)


def test_qed_shrink_refused(tmp_path):
    _compare(tmp_path, "qed", "1M", ["--shrink", "img", "512K"], data=False)


@pytest.mark.parametrize("args", [["resize", "u.qcow2", "2M"], ["resize", "--shrink", "u.qcow2", "512k"]])
def test_inconsistent_bitmap_refused_as_qemu(tmp_path, args):
    """qemu's hint after the refusal carries no program name."""
    run_qemu("create", "-q", "-f", "qcow2", "u.qcow2", "1M", cwd=str(tmp_path))
    run_qemu("bitmap", "--add", "u.qcow2", "e", cwd=str(tmp_path))
    set_bitmap_in_use(tmp_path / "u.qcow2", "e")
    before = (tmp_path / "u.qcow2").read_bytes()
    mine = assert_same(args, str(tmp_path))
    assert mine.stderr.endswith(b"\nTry block-dirty-bitmap-remove to delete this bitmap from disk\n")
    assert (tmp_path / "u.qcow2").read_bytes() == before
