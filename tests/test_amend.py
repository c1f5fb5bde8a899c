"""qemu-img amend: same output, exit code and resulting image (byte for
byte where qemu-img's allocation order is followed) as qemu-img 7.2."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import assert_same, needs_qemu, run_qemu, run_qemu_io, run_qimg

pytestmark = needs_qemu


def _image(d, kind):
    """A small qcow2 image with data; ``kind`` adds v2, zero clusters, a
    backing file, lazy refcounts, a snapshot or compressed clusters."""
    img = str(d / "img")
    opts = "cluster_size=4k" + (",compat=0.10" if "v2" in kind else "")
    if "zstd" in kind:
        opts += ",compression_type=zstd"
    assert run_qemu("create", "-q", "-f", "qcow2", "-o", opts, img, "1M").returncode == 0
    run_qemu_io("-c", "write -P 1 0 64k", "-c", "write -P 2 200k 8k", img)
    if "zero" in kind:
        run_qemu_io("-c", "write -z 8k 8k", "-c", "write -z 500k 12k", "-c", "write -z -u 0 4k", img)
    if "lazy" in kind:
        assert run_qemu("amend", "-o", "lazy_refcounts=on", img).returncode == 0
    if "snap" in kind:
        assert run_qemu("snapshot", "-c", "s1", img).returncode == 0
    if "comp" in kind:
        run_qemu_io("-c", "write -c -P 5 320k 4k", img)
    if "back" in kind:
        base = str(d / "base")
        assert run_qemu("create", "-q", "-f", "raw", base, "1M").returncode == 0
        run_qemu_io("-f", "raw", "-c", "write -P 9 0 1M", base)
        assert run_qemu("rebase", "-u", "-b", "base", "-F", "raw", img).returncode == 0


def _info(path):
    r = run_qemu("info", "--output=json", str(path))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    for key in ("actual-size", "filename", "full-backing-filename"):
        info.pop(key, None)
    return info


def _both(tmp_path, kind, args):
    a, b = tmp_path / "qemu", tmp_path / "qimg"
    a.mkdir()
    _image(a, kind)
    shutil.copytree(a, b, dirs_exist_ok=True)
    theirs = run_qemu("amend", *args, "img", cwd=str(a))
    mine = run_qimg("amend", *args, "img", cwd=str(b))
    assert mine.stdout.decode() == theirs.stdout.decode()
    assert mine.stderr.decode() == theirs.stderr.decode()
    assert mine.returncode == theirs.returncode
    assert _info(b / "img") == _info(a / "img")
    assert run_qemu("compare", str(a / "img"), str(b / "img")).returncode == 0
    check = run_qemu("check", str(b / "img"))
    assert check.returncode == 0, check.stdout
    return a / "img", b / "img"


CASES = [
    ("v3zero", "compat=0.10"), ("v3zeroback", "compat=0.10"), ("v3lazy", "compat=0.10"),
    ("v3comp", "compat=0.10"), ("v3snap", "compat=0.10"), ("v2", "compat=1.1"), ("v2snap", "compat=1.1"),
    ("v3", "refcount_bits=1"), ("v3zero", "refcount_bits=64"), ("v3snap", "refcount_bits=2"),
    ("v2snap", "refcount_bits=8,compat=1.1"), ("v3zero", "refcount_bits=8,compat=0.10"),
    ("v3lazy", "lazy_refcounts=off"), ("v3", "lazy_refcounts=on"), ("v3", "size=3M"), ("v3zero", "size=512k"),
    ("v3back", "backing_file=base,backing_fmt=raw"),
]


@pytest.mark.parametrize("kind,opts", CASES, ids=lambda x: x)
def test_amend_byte_identical(tmp_path, kind, opts):
    """With -p: the progress lines match too.  The files come out byte for
    byte as qemu-img's (zero expansion and the new refcount structures
    are allocated in QEMU's order)."""
    a, b = _both(tmp_path, kind, ["-p", "-o", opts])
    assert a.read_bytes() == b.read_bytes()


REFUSED = [
    ("v3snap", "refcount_bits=1"), ("v2", "lazy_refcounts=on"), ("v2snap", "size=2M"),
    ("v3zstdcomp", "compat=0.10"), ("v3back", "backing_fmt=qcow2"),
    ("v3", "refcount_bits=16,compat=0.10,lazy_refcounts=on"),
]


@pytest.mark.parametrize("kind,opts", REFUSED, ids=lambda x: x)
def test_refused(tmp_path, kind, opts):
    _both(tmp_path, kind, ["-p", "-o", opts])


def test_option_errors(tmp_path):
    """Options refused before the image changes: the image stays as it was."""
    _image(tmp_path, "v3")
    before = (tmp_path / "img").read_bytes()
    for opts in ["compat=0.9", "refcount_bits=3", "refcount_bits=128", "backing_file=other", "data_file=x",
                 "data_file_raw=on", "encrypt.new-secret=x", "cluster_size=4k", "preallocation=full",
                 "nosuch=1", "lazy_refcounts=maybe", "size=xyz", "refcount_bits=8,compat=0.10"]:
        r = assert_same(["amend", "-o", opts, "img"], str(tmp_path))
        assert r.returncode == 1
    assert (tmp_path / "img").read_bytes() == before


def test_zstd_without_compressed_clusters_downgrades(tmp_path):
    a, b = _both(tmp_path, "v3zstd", ["-o", "compat=0.10"])
    assert a.read_bytes() == b.read_bytes()


def test_more_refcount_blocks(tmp_path):
    """Enough clusters that the new structures need several refcount blocks
    and a reftable growing while they are allocated."""
    a, b = tmp_path / "qemu", tmp_path / "qimg"
    a.mkdir()
    img = str(a / "img")
    assert run_qemu("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "2M").returncode == 0
    run_qemu_io("-c", "write -P 3 0 1536k", img)
    shutil.copytree(a, b, dirs_exist_ok=True)
    for opts in ["refcount_bits=1", "refcount_bits=64", "refcount_bits=4"]:
        theirs = run_qemu("amend", "-o", opts, "img", cwd=str(a))
        mine = run_qimg("amend", "-o", opts, "img", cwd=str(b))
        assert (mine.stdout, mine.stderr, mine.returncode) == (theirs.stdout, theirs.stderr, theirs.returncode)
        assert _info(b / "img") == _info(a / "img")
        assert run_qemu("check", str(b / "img")).returncode == 0
        assert (a / "img").read_bytes() == (b / "img").read_bytes()


@pytest.mark.parametrize("args", [
    ["-o", "help", "img"], ["-f", "qcow2", "-o", "help"], ["-f", "raw", "-o", "help"], ["-f", "vdi", "-o", "?"],
    ["-f", "nosuch", "-o", "help"], ["img"], [], ["-o", "compat=1.1"], ["-o", "compat=1.1", "img", "img"],
    ["-t", "bogus", "-o", "compat=1.1", "img"], ["-t", "off", "-o", "compat=1.1", "img"],
    ["--image-opts", "-o", "compat=0.10", "driver=qcow2,file.filename=img"], ["-q", "-p", "-o", "compat=1.1", "img"],
    ["-f", "raw", "-o", "size=2M", "img"], ["-o", "size=2M", "missing"], ["-x", "-o", "compat=1.1", "img"],
    ["-o", "compat=1.1", "-o", "lazy_refcounts=on", "img"],
])
def test_command_line(tmp_path, args):
    _image(tmp_path, "v3")
    assert_same(["amend", *args], str(tmp_path))


def test_raw_not_amendable(tmp_path):
    assert run_qemu("create", "-q", "-f", "raw", str(tmp_path / "r"), "1M").returncode == 0
    assert_same(["amend", "-f", "raw", "-o", "size=2M", "r"], str(tmp_path))
    assert_same(["amend", "-o", "help", "r"], str(tmp_path))


def test_resize_after_upgrade_keeps_snapshot(tmp_path):
    """v2 with a snapshot cannot be resized; after amend to v3 it can."""
    a, b = _both(tmp_path, "v2snap", ["-o", "compat=1.1"])
    mine = run_qimg("resize", str(b), "2M")
    theirs = run_qemu("resize", str(a), "2M")
    assert (mine.stdout, mine.returncode) == (theirs.stdout, theirs.returncode) == (b"Image resized.\n", 0)
    assert _info(b) == _info(a)


@pytest.mark.parametrize("backing", [False, True])
@pytest.mark.parametrize("later_writes", [False, True])
def test_downgrade_expands_zero_clusters_in_snapshots(tmp_path, backing, later_writes):
    """Zero clusters reachable from snapshot L1 tables (and L2 tables shared
    with them) are expanded as QEMU does it.  When the active layer was
    written after the snapshot, qemu-img 7.2 itself leaves OFLAG_COPIED
    errors behind; the result must be the same bytes, errors included."""
    a, b = tmp_path / "qemu", tmp_path / "qimg"
    a.mkdir()
    img = str(a / "img")
    assert run_qemu("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "1M").returncode == 0
    run_qemu_io("-c", "write -P 1 0 64k", "-c", "write -z 8k 8k", "-c", "write -z -u 0 4k", "-c", "write -z 600k 4k", img)
    assert run_qemu("snapshot", "-c", "s1", img).returncode == 0
    if later_writes:
        run_qemu_io("-c", "write -z 16k 8k", "-c", "write -z 700k 4k", "-c", "write -P 3 800k 4k", img)
    if backing:
        assert run_qemu("create", "-q", "-f", "raw", str(a / "base"), "1M").returncode == 0
        run_qemu_io("-f", "raw", "-c", "write -P 9 0 1M", str(a / "base"))
        assert run_qemu("rebase", "-u", "-b", "base", "-F", "raw", img).returncode == 0
    shutil.copytree(a, b, dirs_exist_ok=True)
    theirs = run_qemu("amend", "-p", "-o", "compat=0.10", "img", cwd=str(a))
    mine = run_qimg("amend", "-p", "-o", "compat=0.10", "img", cwd=str(b))
    assert (mine.stdout, mine.stderr, mine.returncode) == (theirs.stdout, theirs.stderr, theirs.returncode)
    assert (a / "img").read_bytes() == (b / "img").read_bytes()
    assert _info(b / "img") == _info(a / "img")
    assert run_qemu("check", str(b / "img")).returncode == (2 if later_writes else 0)


@pytest.mark.parametrize("opts", ["compat=0.10", "refcount_bits=1", "lazy_refcounts=on"])
def test_image_with_bitmap(tmp_path, opts):
    """A persistent bitmap survives amend on v3; a downgrade keeps its
    extension (now ignored) and leaks its clusters, as qemu-img does."""
    a, b = tmp_path / "qemu", tmp_path / "qimg"
    a.mkdir()
    img = str(a / "img")
    assert run_qemu("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "1M").returncode == 0
    run_qemu_io("-c", "write -P 1 0 64k", img)
    assert run_qemu("bitmap", "--add", img, "b0").returncode == 0
    run_qemu_io("-c", "write -P 2 100k 8k", img)
    shutil.copytree(a, b, dirs_exist_ok=True)
    theirs = run_qemu("amend", "-o", opts, "img", cwd=str(a))
    mine = run_qimg("amend", "-o", opts, "img", cwd=str(b))
    assert (mine.stdout, mine.stderr, mine.returncode) == (theirs.stdout, theirs.stderr, theirs.returncode)
    assert _info(b / "img") == _info(a / "img")
    ca, cb = run_qemu("check", str(a / "img")), run_qemu("check", str(b / "img"))
    assert cb.returncode == ca.returncode
    assert cb.stdout.splitlines()[:2] == ca.stdout.splitlines()[:2]
