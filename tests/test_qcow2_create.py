"""qcow2 create writes the very bytes qemu-img create writes."""

from __future__ import annotations

import pytest

from conftest import assert_same, needs_qemu, run_qemu, run_qimg
from qimg.block.options import parse_options
from qimg.formats.qcow2.create import CREATE_OPTS, create_image
from qimg.units import parse_size

pytestmark = needs_qemu

SIZES = ["0", "1000000", "1049088", "10M"]


def _both(tmp_path, opts: str, size: str, extra: list[str] | None = None, cli: bool = True) -> tuple[bytes, bytes]:
    """(qemu-img's file, ours): through our CLI, or (faster) the driver API."""
    extra = extra or []
    a, b = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
    p = run_qemu("create", "-q", "-f", "qcow2", "-o", opts, *extra, str(a), size)
    assert p.returncode == 0, p.stderr
    if cli:
        m = run_qimg("create", "-q", "-f", "qcow2", "-o", opts, *extra, str(b), size)
        assert m.returncode == 0, m.stderr
    else:
        create_image(str(b), parse_size(size), parse_options(opts, CREATE_OPTS))
    return a.read_bytes(), b.read_bytes()


@pytest.mark.parametrize("cs", ["512", "4k", "64k", "2M"])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("prealloc", ["off", "metadata", "falloc", "full"])
def test_create_byte_identical(tmp_path, cs, compat, prealloc):
    for size in SIZES:
        if size == "10M" and (cs != "512" or prealloc == "full"):
            continue  # only small clusters need refcount growth; big data areas only cost time
        # One size through the command line, the rest through the API.
        theirs, mine = _both(tmp_path, f"cluster_size={cs},compat={compat},preallocation={prealloc}", size,
                             cli=size == "1049088")
        assert mine == theirs, (size, len(mine), len(theirs))


@pytest.mark.parametrize("opts", [
    "lazy_refcounts=on", "refcount_bits=1", "refcount_bits=2", "refcount_bits=4", "refcount_bits=8",
    "refcount_bits=32", "refcount_bits=64", "compression_type=zstd",
    "refcount_bits=1,cluster_size=512,preallocation=metadata",
    "refcount_bits=64,cluster_size=512,preallocation=falloc",
    "compat=v2", "compat=v3",
])
def test_create_options_byte_identical(tmp_path, opts):
    theirs, mine = _both(tmp_path, opts, "4M")
    assert mine == theirs


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_create_with_backing_byte_identical(tmp_path, compat):
    assert run_qemu("create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "3M").returncode == 0
    theirs, mine = _both(tmp_path, f"compat={compat}", "3M", ["-b", "base.qcow2", "-F", "qcow2"])
    assert mine == theirs


@pytest.mark.parametrize("opts,size", [
    ("cluster_size=1000", "1M"), ("cluster_size=256", "1M"), ("cluster_size=4M", "1M"),
    ("compat=0.9", "1M"), ("refcount_bits=3", "1M"), ("refcount_bits=128", "1M"),
    ("compat=0.10,lazy_refcounts=on", "1M"), ("compat=0.10,refcount_bits=8", "1M"),
    ("preallocation=foo", "1M"), ("compression_type=lz4", "1M"),
    ("backing_fmt=raw", "1M"), ("cluster_size=512", "2T"), ("encryption=on", "1M"),
])
def test_create_errors_same_as_qemu(tmp_path, opts, size):
    assert_same(["create", "-q", "-f", "qcow2", "-o", opts, "e.qcow2", size], str(tmp_path))


def test_create_opts_help_same_as_qemu(tmp_path):
    assert_same(["create", "-f", "qcow2", "-o", "help"], str(tmp_path))


def test_big_metadata_preallocation_is_fast_and_identical(tmp_path):
    import time

    a, b = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
    assert run_qemu("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(a), "64G").returncode == 0
    t = time.monotonic()
    create_image(str(b), 64 << 30, parse_options("preallocation=metadata", CREATE_OPTS))
    assert time.monotonic() - t < 5
    assert _sparse_contents(a) == _sparse_contents(b)


def _sparse_contents(path) -> tuple[int, list[tuple[int, bytes]]]:
    """(size, [(offset, bytes) of each data segment]): compares two sparse
    files without reading their holes."""
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        segs = []
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            segs.append((start, os.pread(fd, end - start, start).rstrip(b"\0")))
            pos = end
        return size, [s for s in segs if s[1]]
    finally:
        os.close(fd)
