"""qemu-img create: qimg and qemu-img run on the same arguments in twin
directories must print the same and leave byte-identical files."""

from __future__ import annotations

import filecmp
import os
import shutil

import pytest
from conftest import needs_qemu, run_qemu, run_qimg

import qimg.ops.create as ops_create
from qimg.errors import QimgError


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    """Backing files both sides share: a 3M qcow2 base, a raw of odd size."""
    d = tmp_path_factory.mktemp("seed")
    (d / "sub").mkdir()
    assert run_qemu("create", "-q", "-f", "qcow2", "sub/base.qcow2", "3M", cwd=str(d)).returncode == 0
    assert run_qemu("create", "-q", "-f", "raw", "base.raw", "1000000", cwd=str(d)).returncode == 0
    return d


def _twin_dirs(tmp_path, seed):
    dirs = []
    for name in ("qemu", "qimg"):
        d = tmp_path / name
        shutil.copytree(seed, d)
        dirs.append(d)
    return dirs


def _files(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


def assert_create_same(tmp_path, seed, *args: str) -> None:
    qd, md = _twin_dirs(tmp_path, seed)
    theirs = run_qemu("create", *args, cwd=str(qd))
    mine = run_qimg("create", *args, cwd=str(md))
    assert mine.stderr.decode() == theirs.stderr.decode()
    assert mine.stdout.decode() == theirs.stdout.decode()
    assert mine.returncode == theirs.returncode
    assert _files(md) == _files(qd)
    for f in _files(qd):
        assert filecmp.cmp(qd / f, md / f, shallow=False), f


RAW_CASES = [
    ["x.raw", "1M"],
    ["-f", "raw", "x.raw", "1.5k"],
    ["x.raw", "1000001"],
    ["x.raw", "0"],
    ["x.raw", "0x10"],
    ["-q", "x.raw", "1M"],
    ["-o", "preallocation=full,nocow,extent_size_hint=0", "x.raw", "1M"],
    ["-o", "preallocation=falloc", "-o", "extent_size_hint=1M", "x.raw", "100k"],
    ["-o", "size=2M", "x.raw"],
    ["-o", "size=2M,size=3M", "x.raw"],
    ["-o", "size=1M", "x.raw", "1M"],
    ["-o", "size=0x10", "x"],
    ["-o", "size=16E", "x"],
    ["-o", "size=-1", "x"],
    ["-o", "size=1.5", "x"],
    ["-o", "nocow=maybe", "x", "1M"],
    ["-o", "nocow", "x", "1M"],
    ["-o", "nonocow", "x", "1M"],
    ["-o", "foo=bar", "x", "1M"],
    ["-o", "preallocation=bogus", "x", "1M"],
    ["-o", "preallocation=metadata", "x", "1M"],
    ["-o", ",", "x", "1M"],
    ["-o", "", "x", "1M"],
    ["-o", "size=1M,", "x"],
    ["-o", "size=1M,,", "x"],
    ["-o", "size=1M,,,", "x"],
    ["x", "1Q"],
    ["x", "1.5"],
    ["x", "99E"],
    ["x", "7E"],
    ["x"],
    [],
    ["x", "1", "2"],
    ["-x"],
    ["-f"],
    ["-f", "foo", "x", "1"],
    ["-b", "base.raw", "-F", "raw", "x.raw"],
    ["-F", "raw", "x.raw", "1M"],
    ["/nonexistent-dir/x", "1M"],
    ["sub", "1M"],
    ["", "1M"],
    ["-f", "qcow2", "", "1M"],
    ["--object", "secret,id=s0,data=x", "x", "1M"],
]


@needs_qemu
@pytest.mark.parametrize("args", RAW_CASES, ids=lambda a: " ".join(a) or "<none>")
def test_create_raw_same_as_qemu(tmp_path, seed, args):
    assert_create_same(tmp_path, seed, *args)


HELP_CASES = [
    ["-o", "help"],
    ["-o", "?"],
    ["-o", "help", "x.raw"],
    ["-o", "size=1M,help", "x", "1M"],
    ["-o", "help,,x"],
    ["-o", "help=1", "x"],
    ["-o", "help=on", "x"],
    ["-o", "nohelp", "x"],
    ["-f", "foo", "-o", "help"],
    ["-f", "qcow2", "-o", "help"],
    ["-f", "qcow2", "-o", "help", "x.qcow2"],
    ["-f", "qcow2", "-o", "help", "-o", "size=1"],
]


@needs_qemu
@pytest.mark.parametrize("args", HELP_CASES, ids=lambda a: " ".join(a))
def test_create_help_same_as_qemu(tmp_path, seed, args):
    assert_create_same(tmp_path, seed, *args)


QCOW2_CASES = [
    ["-f", "qcow2", "x.qcow2", "1M"],
    ["-f", "qcow2", "x.qcow2", "1000000"],
    ["-f", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on", "x.qcow2", "10M"],
    ["-f", "qcow2", "-o", "cluster_size=512", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "cluster_size=2M", "x.qcow2", "64M"],
    ["-f", "qcow2", "-o", "compat=0.10", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "compat=v3,refcount_bits=0x10", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "preallocation=metadata", "x.qcow2", "5M"],
    ["-f", "qcow2", "-o", "preallocation=falloc,extent_size_hint=2M,nocow=off", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "preallocation=full", "x.qcow2", "3M"],
    ["-f", "qcow2", "-o", "nolazy_refcounts", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "lazy_refcounts=yes,refcount_bits=010,cluster_size=0x1000", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "refcount_bits=-1", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "compat=1.1,compat=0.10", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "lazy_refcounts=maybe", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "refcount_bits=abc", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "cluster_size", "x.qcow2", "1M"],
    ["-f", "qcow2", "x.qcow2"],
    ["-f", "qcow2", "-b", "sub/base.qcow2", "-F", "qcow2", "x.qcow2"],
    ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "sub/x.qcow2"],
    ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "sub/x.qcow2", "1M"],
    ["-f", "qcow2", "-b", "base.raw", "-F", "raw", "x.qcow2"],
    ["-f", "qcow2", "-b", "base.raw", "x.qcow2"],
    ["-f", "qcow2", "-o", "backing_file=nonexist", "-b", "sub/base.qcow2", "-F", "qcow2", "x.qcow2"],
    ["-f", "qcow2", "-b", "sub/base.qcow2", "x.qcow2"],
    ["-f", "qcow2", "-b", "nonexist", "-F", "qcow2", "sub/x.qcow2"],
    ["-f", "qcow2", "-b", "base.qcow2", "-F", "bogus", "sub/x.qcow2"],
    ["-f", "qcow2", "-u", "-b", "base.qcow2", "sub/x.qcow2", "1M"],
    ["-f", "qcow2", "-u", "-b", "nonexist", "-F", "qcow2", "x.qcow2", "1M"],
    ["-f", "qcow2", "-u", "-b", "nonexist", "-F", "qcow2", "x.qcow2"],
    ["-f", "qcow2", "-b", "x.qcow2", "-F", "qcow2", "x.qcow2"],
    ["-f", "qcow2", "-b", "", "-F", "qcow2", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "backing_file=sub/base.qcow2,backing_fmt=qcow2", "x.qcow2"],
    ["-f", "qcow2", "-o", "backing_file=sub/base.qcow2", "x.qcow2"],
    ["-f", "qcow2", "-u", "-F", "qcow2", "-b", "a,b c", "x.qcow2", "1M"],
    ["-f", "qcow2", "-u", "-F", "qcow2", "-o", "backing_file=a,,b", "x.qcow2", "1M"],
    ["-q", "-f", "qcow2", "-b", "sub/base.qcow2", "-F", "qcow2", "x.qcow2"],
    ["-f", "raw", "-b", "x", "-F", "raw", "r.raw", "1M"],
    ["-f", "raw", "-F", "raw", "r.raw", "1M"],
]


@needs_qemu
@pytest.mark.parametrize("args", QCOW2_CASES, ids=lambda a: " ".join(a))
def test_create_qcow2_same_as_qemu(tmp_path, seed, args):
    assert_create_same(tmp_path, seed, *args)


# Formats that take the file protocol's preallocation option through, and
# qcow's encryption options, each refused at its point in qemu's order.
PASSTHROUGH_CASES = [
    ["-f", fmt, "-o", opts, "x." + fmt, size]
    for fmt in ("qed", "qcow")
    for opts in ("preallocation=bogus", "preallocation=metadata", "preallocation=full",
                 "preallocation=bogus,backing_fmt=foo", "preallocation=bogus,cluster_size=3")
    for size in ("1M", "0")
] + [
    ["-f", "qcow", "-o", opts, "x.qcow", size]
    for opts in ("encrypt.format=foo", "encrypt.format=luks", "encrypt.format=qcow", "encrypt.format=aes",
                 "encryption=on,encrypt.format=aes", "encryption=on,encrypt.format=luks,preallocation=bogus",
                 "encryption=off,encrypt.format=aes", "encrypt.format=foo,preallocation=bogus")
    for size in ("1M", "0")
]


@needs_qemu
@pytest.mark.parametrize("args", PASSTHROUGH_CASES, ids=lambda a: " ".join(a))
def test_create_option_order_same_as_qemu(tmp_path, seed, args):
    assert_create_same(tmp_path, seed, *args)


# ---- the library ------------------------------------------------------------------


def test_split_opts_follows_qemu():
    assert ops_create.split_opts("a=1,b=x,,y,nocow,help") == [("a", "1"), ("b", "x,y"), ("cow", "off"), ("help", "on")]
    assert ops_create.split_opts("help,,x") == [("help", "on"), ("", "on"), ("x", "on")]
    assert ops_create.has_help_option("size=1,?")
    assert not ops_create.has_help_option("help=1")
    assert not ops_create.has_help_option("help=on")


def test_library_create_raw(tmp_path):
    path = str(tmp_path / "lib.raw")
    ops_create.create(path, "raw", 1000, options={"preallocation": "full"})
    assert os.path.getsize(path) == 1024
    with pytest.raises(QimgError) as e:
        ops_create.create(path, "raw", 1, options="size=2")
    assert e.value.message == "The image size must be specified only once"


def test_library_unknown_format(tmp_path):
    with pytest.raises(QimgError) as e:
        ops_create.create(str(tmp_path / "x"), "nosuchfmt", 1)
    assert e.value.message == "Unknown file format 'nosuchfmt'"
