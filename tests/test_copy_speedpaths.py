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


@needs_qemu
@pytest.mark.parametrize("cluster", ["512", "4k", "64k"])
@pytest.mark.parametrize("mode", ["plain", "backing", "compressed"])
def test_plan_from_bulk_walk_is_the_block_status_plan(tmp_path, cluster, mode, monkeypatch):
    """convert plans a qcow2 source from one bulk walk of its L2 tables
    (without the cluster map): the chunks are those asking block_status
    at every step gives, over data, zero, compressed and discarded
    clusters, tables left unallocated and a short last cluster."""
    from qimg.block.image import open_image
    from qimg.ops import bulk, copy

    q = str(tmp_path / "src.qcow2")
    assert run_qemu("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", q,
                    str(20 * MiB + 1536)).returncode == 0
    run_qemu_io("-c", "write -P 0x5a 0 3M", "-c", "write -z 1M 300k", "-c", "write -c -P 7 4M 256k",
                "-c", "discard 2M 64k", "-c", "write -P 1 9M 4k", "-c", "write -P 2 20M 1536",
                "-c", "write -z 12M 2M", q)
    img = open_image(q, "qcow2")
    tgt = open_image(q, "qcow2")
    try:
        def chunks():
            job = copy.CopyJob([img], tgt, compressed=mode == "compressed")
            job.target_has_backing = mode == "backing"
            job.cluster_sectors = 128
            return [(c.sector, c.sectors, c.status, c.host, c.zsrc) for c in copy.plan(job)]

        answered = []
        walk_at = bulk.BulkRuns.at
        monkeypatch.setattr(bulk.BulkRuns, "at", lambda self, offset: answered.append(walk_at(self, offset))
                            or answered[-1])
        fast = chunks()
        assert len(fast) > 10 and all(ext is not None for ext in answered)
        monkeypatch.setattr(bulk.BulkRuns, "at", lambda self, offset: None)
        assert fast == chunks()
    finally:
        img.close()
        tgt.close()


@needs_qemu
def test_qcow2_to_raw_does_not_import_numpy(tmp_path, src):
    """Importing numpy costs a sizeable part of converting a few GiB: a
    qcow2 of a few L2 tables converts to raw (and compares) without it,
    and raw converts into a new qcow2 without it."""
    import subprocess
    import sys

    q = str(tmp_path / "src.qcow2")
    assert run_qemu("convert", "-f", "raw", "-O", "qcow2", src, q).returncode == 0
    code = ("import sys; from qimg.cli.main import main; "
            "rc = main(sys.argv[1:]); print(rc, 'numpy' in sys.modules)")
    for args in (["convert", "-f", "qcow2", "-O", "raw", q, str(tmp_path / "out.raw")],
                 ["compare", "-f", "raw", "-F", "qcow2", src, q],
                 ["convert", "-f", "raw", "-O", "qcow2", src, str(tmp_path / "out.qcow2")]):
        p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        assert p.stdout.split()[-2:] == ["0", "False"], p.stdout + p.stderr
    with open(src, "rb") as a, open(tmp_path / "out.raw", "rb") as b:
        assert a.read() == b.read()
    assert run_qemu("check", str(tmp_path / "out.qcow2")).returncode == 0
    assert run_qemu("compare", "-f", "raw", "-F", "qcow2", src, str(tmp_path / "out.qcow2")).returncode == 0


@needs_qemu
@pytest.mark.parametrize("cluster", ["512", "64k"])
def test_fill_of_new_qcow2_hands_over(tmp_path, cluster):
    """Writes into a new image fill it without its cluster map until one
    goes behind the last (or, with small clusters, outgrows the first
    refcount block): the image's own metadata then takes over.  The result
    reads back as written and is the image qemu-io's same writes make."""
    from qimg.block.image import open_image

    mine, theirs = str(tmp_path / "mine.qcow2"), str(tmp_path / "theirs.qcow2")
    for path in (mine, theirs):
        assert run_qemu("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", path, "8M").returncode == 0
    writes = [(0, 70000, 1), (70000, 5000, 2), (300000, 200000, 3), (7 * MiB + 100, 4096, 4), (65536, 512, 5)]
    img = open_image(mine, "qcow2", read_only=False)
    try:
        assert img.driver.begin_fill()
        for off, n, pat in writes:
            img.write(off, bytes([pat]) * n)
    finally:
        img.close()
    run_qemu_io(*[a for off, n, pat in writes for a in ("-c", f"write -q -P {pat} {off} {n}")], theirs)
    assert run_qemu("check", mine).returncode == 0
    with open(mine, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()
