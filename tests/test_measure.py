"""qemu-img measure: the same numbers, output and errors as qemu-img 7.2."""

from __future__ import annotations

import pytest

from conftest import assert_same, needs_qemu, run_qemu, run_qemu_io, same

pytestmark = needs_qemu

SIZES = ["0", "1", "512", "1000000", "64M", "1G", "3T"]
OPTS = [
    "",
    "cluster_size=512",
    "cluster_size=4k,refcount_bits=1",
    "cluster_size=2M,refcount_bits=64",
    "refcount_bits=8,preallocation=metadata",
    "preallocation=falloc",
    "preallocation=full,cluster_size=16k",
    "compat=0.10",
    "extended_l2=on",
    "extended_l2=on,cluster_size=2M",
    "backing_file=foo,lazy_refcounts=on",
]


@pytest.mark.parametrize("opts", OPTS)
def test_size_matrix_qcow2(tmp_path, opts):
    # every size with every option set would be slow; a rotating sample
    # still covers each size and each output several times
    i = OPTS.index(opts)
    for k, size in enumerate(SIZES):
        if (k + i) % 2:
            continue
        output = ["human", "json"][(k // 2 + i) % 2]
        args = ["measure", "--size", size, "-O", "qcow2", f"--output={output}"]
        assert_same(args + (["-o", opts] if opts else []), str(tmp_path))


def test_size_raw(tmp_path):
    for size in ["0", "513", "8E"]:
        assert_same(["measure", "--size", size], str(tmp_path))
    assert_same(["measure", "--size", "1G", "-O", "raw", "-o", "preallocation=full", "--output=json"], str(tmp_path))


def _qcow2_source(d, name="src.qcow2", extra=()):
    path = str(d / name)
    assert run_qemu("create", "-q", "-f", "qcow2", *extra, path, "5M").returncode == 0
    run_qemu_io("-c", "write -P 1 0 1M", "-c", "write -z 1M 1M", "-c", "write -P 2 3M 100k",
                "-c", "write -P 3 4194816 512", path)
    return path


def test_from_qcow2_source(tmp_path):
    _qcow2_source(tmp_path)
    for opts in ["", "cluster_size=512,refcount_bits=2", "compat=0.10", "preallocation=full",
                 "backing_file=x", "extended_l2=on"]:
        assert_same(["measure", "-O", "qcow2", "src.qcow2"] + (["-o", opts] if opts else []), str(tmp_path))
    assert_same(["measure", "-O", "qcow2", "--output=json", "src.qcow2"], str(tmp_path))


def test_from_chain_compressed_and_v2(tmp_path):
    base = _qcow2_source(tmp_path, "base.qcow2", ("-o", "compat=0.10"))
    assert run_qemu("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", str(tmp_path / "top.qcow2")).returncode == 0
    run_qemu_io("-c", "write -P 7 2M 64k", "-c", "write -z 0 64k", str(tmp_path / "top.qcow2"))
    assert run_qemu("convert", "-c", "-O", "qcow2", base, str(tmp_path / "comp.qcow2")).returncode == 0
    for name in ["top.qcow2", "base.qcow2", "comp.qcow2"]:
        assert_same(["measure", "-O", "qcow2", name, "-o", "cluster_size=8k"], str(tmp_path))


def test_from_raw_with_holes(tmp_path):
    p = tmp_path / "r.raw"
    with open(p, "wb") as f:
        f.truncate(10 << 20)
        f.seek(100000)
        f.write(b"x" * 5000)
        f.seek(8 << 20)
        f.write(b"y" * 70000)
    for o in [[], ["-o", "cluster_size=4k"], ["-o", "cluster_size=2M"]]:
        assert_same(["measure", "-O", "qcow2", "-f", "raw", "r.raw", *o], str(tmp_path))
    assert_same(["measure", "-f", "raw", "r.raw"], str(tmp_path))


def test_bitmaps_size(tmp_path):
    _qcow2_source(tmp_path)
    for name, gran in [("b0", "65536"), ("a-much-longer-bitmap-name", "512")]:
        assert run_qemu("bitmap", "--add", "-g", gran, "src.qcow2", name, cwd=str(tmp_path)).returncode == 0
    for o in [[], ["-o", "cluster_size=512"], ["-o", "compat=0.10"]]:
        assert_same(["measure", "-O", "qcow2", "src.qcow2", *o], str(tmp_path))
    assert_same(["measure", "-O", "qcow2", "--output=json", "src.qcow2"], str(tmp_path))


ERRORS = [
    [], ["--size", "1G", "x.qcow2"], ["-f", "qcow2", "--size", "1G"], ["-l", "s", "--size", "1G"],
    ["a", "b"], ["--size", "-1"], ["--size", "xyz"], ["--size", "1G", "-O", "vdi"],
    ["--size", "1G", "-O", "nosuch"],
    ["--size", "1G", "-O", "qcow2", "-o", "help"], ["--size", "1G", "-O", "qcow2", "-o", "foo=bar"],
    ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=3k"], ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=x"],
    ["--size", "1E", "-O", "qcow2", "-o", "cluster_size=512"],
    ["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=8,compat=0.10"],
    ["--size", "1G", "-O", "qcow2", "-o", "preallocation=foo"],
    ["--size", "1G", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=4k"],
    ["--size", "1G", "-O", "qcow2", "-o", "compat=foo"], ["--size", "1G", "-O", "qcow2", "-o", "nocow=maybe"],
    ["--size", "1G", "-O", "qcow2", "-o", "encrypt.format=luks"],
    ["--output=xml", "--size", "1G"], ["missing.qcow2"],
]


@pytest.mark.parametrize("args", ERRORS, ids=lambda a: " ".join(a) or "none")
def test_errors(tmp_path, args):
    r = assert_same(["measure", *args], str(tmp_path))
    assert r.returncode == 1


@pytest.mark.parametrize("bad", [["-x"], ["--size"], ["--nosuch"], ["--image-opts=1"], ["-O"]])
def test_getopt_errors(tmp_path, bad):
    """getopt's own message (named "measure"), then the help text, exit 0;
    the help's version line differs, so stdout is compared by its shape."""
    mine, theirs = same(["measure", "--size", "1G", *bad], str(tmp_path))
    assert mine.stderr == theirs.stderr
    assert mine.returncode == theirs.returncode == 0
    assert b"measure [--output=ofmt]" in mine.stdout and b"measure [--output=ofmt]" in theirs.stdout


@pytest.mark.parametrize("param", ["s1", "1", "nosuch", "snapshot.id=1", "snapshot.name=s1",
                                   "snapshot.id=1,snapshot.name=x", "snapshot.foo=1", "snapshot.id"])
def test_snapshot(tmp_path, param):
    """-l measures the snapshot's clusters, not the active layer's."""
    src = _qcow2_source(tmp_path)
    assert run_qemu("snapshot", "-c", "s1", src).returncode == 0
    run_qemu_io("-c", "write -P 8 1M 2M", "-c", "write -z 0 64k", src)
    assert_same(["measure", "-O", "qcow2", "-l", param, "src.qcow2"], str(tmp_path))


def test_snapshot_of_raw(tmp_path):
    (tmp_path / "r").write_bytes(bytes(4096))
    assert_same(["measure", "-l", "s1", "-f", "raw", "r"], str(tmp_path))
