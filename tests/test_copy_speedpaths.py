"""The copy engine's fast paths against qemu-img: source data read several
requests at a time, qcow2 data written from a writer thread (coalesced),
reused read buffers.  Outputs must stay byte-identical to qemu-img's."""

from __future__ import annotations

import os
import random
import shutil

import pytest

from conftest import needs_qemu, run_qemu, run_qemu_io, run_qimg

MiB = 1 << 20


def _source(path: str) -> None:
    """A sparse raw file with a long contiguous data run (several 2 MiB
    requests, more than one 8 MiB read), runs of data and zeroes that end
    off the 64 KiB grid, short zero gaps inside data and a hole-y tail."""
    rnd = random.Random(7)
    size = 24 * MiB
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(4096)
        f.write(rnd.randbytes(11 * MiB - 4096 + 12345))  # crosses the batch limit
        f.seek(13 * MiB + 512 * 3)
        f.write(rnd.randbytes(70000))
        # zero gaps shorter and longer than -S inside one data extent
        block = bytearray(rnd.randbytes(3 * MiB))
        block[5000:5000 + 2048] = bytes(2048)
        block[200000:200000 + 300000] = bytes(300000)
        block[MiB + 7:MiB + 7 + 65536 * 2] = bytes(65536 * 2)
        f.seek(16 * MiB - 4096)
        f.write(block)
        for i in range(40):
            f.seek(20 * MiB + i * 70000)
            f.write(rnd.randbytes(3000 + i * 97))


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("speed") / "src.raw")
    _source(path)
    return path


def _both(tmp_path, args: list[str], out: str) -> tuple[bytes, bytes]:
    mine, theirs = str(tmp_path / f"mine.{out}"), str(tmp_path / f"theirs.{out}")
    p = run_qimg(*args, mine)
    q = run_qemu(*args, theirs)
    assert (p.returncode, p.stdout, p.stderr) == (q.returncode, q.stdout, q.stderr)
    with open(mine, "rb") as a, open(theirs, "rb") as b:
        return a.read(), b.read()


@needs_qemu
@pytest.mark.parametrize("extra", [
    [],
    ["-S", "0"],
    ["-S", "256k"],
    ["-o", "cluster_size=4096"],
    ["-o", "cluster_size=2M"],
    ["-o", "preallocation=metadata"],
])
def test_raw_to_qcow2_identical(tmp_path, src, extra):
    mine, theirs = _both(tmp_path, ["convert", "-f", "raw", "-O", "qcow2", *extra, src], "qcow2")
    assert mine == theirs


@needs_qemu
def test_two_sources_to_qcow2_identical(tmp_path, src):
    mine, theirs = _both(tmp_path, ["convert", "-f", "raw", "-O", "qcow2", src, src], "qcow2")
    assert mine == theirs


@needs_qemu
@pytest.mark.parametrize("extra", [[], ["-S", "0"]])
def test_qcow2_to_raw_identical(tmp_path, src, extra):
    q = str(tmp_path / "src.qcow2")
    assert run_qemu("convert", "-f", "raw", "-O", "qcow2", src, q).returncode == 0
    mine, theirs = _both(tmp_path, ["convert", "-f", "qcow2", "-O", "raw", *extra, q], "raw")
    assert mine == theirs


@needs_qemu
@pytest.mark.parametrize("snapshot", [False, True])
def test_convert_n_into_used_qcow2_identical(tmp_path, src, snapshot):
    """-n into an image with data: in-place writes, zero writes freeing
    clusters, and (with a snapshot sharing the clusters) copy-on-write of
    partial clusters read back from the file, all through the writer
    thread, in qemu-img's order."""
    base = str(tmp_path / "base.qcow2")
    assert run_qemu("create", "-q", "-f", "qcow2", base, str(24 * MiB)).returncode == 0
    run_qemu_io("-c", "write -P 0x5a 0 20M", "-c", "write -z 3M 1M", "-c", "discard 6M 64k", base)
    if snapshot:
        assert run_qemu("snapshot", "-c", "s1", base).returncode == 0
    results = []
    for who, runner in (("mine", run_qimg), ("theirs", run_qemu)):
        out = str(tmp_path / f"{who}.qcow2")
        shutil.copyfile(base, out)
        p = runner("convert", "-n", "-f", "raw", "-O", "qcow2", src, out)
        assert p.returncode == 0, p.stderr
        with open(out, "rb") as f:
            results.append(f.read())
    assert results[0] == results[1]
    assert run_qemu("compare", "-f", "raw", "-F", "qcow2", src, str(tmp_path / "mine.qcow2")).returncode == 0


@needs_qemu
def test_write_failure_reports_request_offset(tmp_path, src):
    """A data write that fails in a worker thread is reported as the
    failing request's error, with qemu-img's wording."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    small = str(tmp_path / "small.raw")
    with open(small, "wb") as f:
        f.write(b"\1" * 65536)
    p = run_qimg("convert", "-n", "-f", "raw", "-O", "raw", small, "/dev/full")
    q = run_qemu("convert", "-n", "-f", "raw", "-O", "raw", small, "/dev/full")
    assert p.returncode == q.returncode == 1
    assert p.stderr == q.stderr


@needs_qemu
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_qcow2_source_identical(tmp_path, src, ctype):
    """Compressed clusters read back in one go per request and inflated in
    the workers; some clusters rewritten uncompressed in between."""
    q = str(tmp_path / "srcc.qcow2")
    assert run_qemu("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type={ctype}",
                    src, q).returncode == 0
    run_qemu_io("-c", "write -P 0x11 5M 200k", "-c", "write -z 9M 64k", q)
    for fmt in ("raw", "qcow2"):
        mine, theirs = _both(tmp_path, ["convert", "-f", "qcow2", "-O", fmt, q], fmt)
        assert mine == theirs


@needs_qemu
@pytest.mark.parametrize("extra", [[], ["-S", "0"], ["-o", "cluster_size=4096"]])
def test_compressed_output_identical(tmp_path, src, extra):
    """-c: several clusters read and compressed per worker task, placed in
    guest order (zero clusters between them left out)."""
    odd = str(tmp_path / "odd.raw")
    with open(src, "rb") as f, open(odd, "wb") as g:
        g.write(f.read(5 * MiB + 4096 + 512))  # ends inside a cluster
    mine, theirs = _both(tmp_path, ["convert", "-c", "-f", "raw", "-O", "qcow2", *extra, odd], "qcow2")
    assert mine == theirs


def test_read_only_file_extent_memory_follows_writes(tmp_path):
    """The remembered SEEK_DATA/SEEK_HOLE extent of a read-only file is
    forgotten once the file changes through another handle."""
    import time

    from qimg.protocols.file import File

    path = str(tmp_path / "f.raw")
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"\1" * MiB)
    ro = File(path)
    assert ro.data_extent(0, 4 * MiB) == (False, MiB)
    assert ro.data_extent(MiB // 2, 4 * MiB) == (False, MiB // 2)
    assert ro.data_extent(MiB, 4 * MiB) == (True, MiB)
    assert ro.data_extent(MiB + 4096, 8192) == (True, 8192)
    time.sleep(0.05)  # let the file's mtime move on
    with open(path, "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"\2" * MiB)
    assert ro.data_extent(MiB + 4096, 4 * MiB) == (True, 2 * MiB - 4096)
    ro.close()
