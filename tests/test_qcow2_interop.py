"""qcow2 both ways with QEMU: images qemu-io writes read back and map
identically in qimg; images qimg writes pass qemu-img check and compare
equal to a raw model."""

from __future__ import annotations

import random

import pytest

from conftest import needs_qemu, run_qemu, run_qemu_io, run_qimg
from qimg.block.image import open_image
from qimg.formats.qcow2.create import create_image

pytestmark = needs_qemu

MATRIX = [(cs, compat) for cs in ("512", "4k", "64k", "2M") for compat in ("0.10", "1.1")]

# A mix of every kind of cluster: data, zero with and without host
# clusters, discarded, compressed, partial cluster writes.
QEMU_IO_SCRIPT = [
    "write -P 0x11 0 100k",
    "write -z 200k 64k",
    "write -c -P 0x22 1M 64k",
    "write -c -P 0x33 2M 2M",
    "write -P 0x44 5M 10k",
    "write -z -u 5M 4k",
    "write -P 0x55 6M 1M",
    "write -z 6M 512k",
    "discard 8k 8k",
    "write -P 0x66 7M 3",
]


def _qemu_io_image(path, cs: str, compat: str, backing: str | None = None) -> None:
    opts = f"cluster_size={cs},compat={compat}"
    args = ["create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    p = run_qemu(*args, str(path), "8M")
    assert p.returncode == 0, p.stderr
    cmds = []
    for c in QEMU_IO_SCRIPT:
        if c.startswith("write -c") and cs == "2M" and "2M 2M" not in c:
            continue  # compressed writes must be whole clusters
        if c.startswith("write -c") and cs != "2M" and "2M 2M" in c:
            c = f"write -c -P 0x33 2M {cs}"
        cmds += ["-c", c]
    run_qemu_io(*cmds, str(path))


@pytest.mark.parametrize("cs,compat", MATRIX)
def test_qemu_io_image_reads_back(tmp_path, cs, compat):
    img_path = tmp_path / "a.qcow2"
    _qemu_io_image(img_path, cs, compat)
    raw = tmp_path / "a.raw"
    assert run_qemu("convert", "-O", "raw", str(img_path), str(raw)).returncode == 0
    with open_image(str(img_path)) as img:
        assert img.read(0, img.size) == raw.read_bytes()
        # Odd-sized reads across cluster boundaries too.
        expect = raw.read_bytes()
        for off, n in ((511, 70000), (2 * 1048576 - 3, 9000), (7 * 1048576 - 1, 5)):
            assert img.read(off, n) == expect[off:off + n]
    mine = run_qimg("map", "--output=json", str(img_path))
    theirs = run_qemu("map", "--output=json", str(img_path))
    assert mine.stdout.decode() == theirs.stdout.decode()
    assert mine.returncode == theirs.returncode == 0


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_qemu_io_overlay_reads_back(tmp_path, compat):
    base = tmp_path / "base.qcow2"
    assert run_qemu("create", "-q", "-f", "qcow2", str(base), "8M").returncode == 0
    run_qemu_io("-c", "write -P 0x77 0 8M", str(base))
    top = tmp_path / "top.qcow2"
    _qemu_io_image(top, "64k", compat, backing="base.qcow2")
    raw = tmp_path / "top.raw"
    assert run_qemu("convert", "-O", "raw", str(top), str(raw)).returncode == 0
    with open_image(str(top)) as img:
        assert img.read(0, img.size) == raw.read_bytes()
    mine = run_qimg("map", "--output=json", str(top))
    theirs = run_qemu("map", "--output=json", str(top))
    assert mine.stdout.decode() == theirs.stdout.decode()


def _random_ops(img, model: bytearray, cs: int, rnd: random.Random, count: int) -> None:
    size = len(model)
    for _ in range(count):
        op = rnd.choice("wwwzZdc")
        off = rnd.randrange(size)
        n = min(rnd.randrange(1, 3 * cs + 5000), size - off)
        if op == "w":
            data = bytes([rnd.randrange(1, 256)]) * n
            img.write(off, data)
            model[off:off + n] = data
        elif op in "zZ":
            img.write_zeroes(off, n, unmap=op == "Z")
            model[off:off + n] = bytes(n)
        elif op == "d":
            img.discard(off, n)
            # What a discard leaves is QEMU's business (zeroes on v3, kept
            # data on v2 with a backing file): only whole clusters may change,
            # to zeroes or to the backing file's data.
            model[:] = img.read(0, size)
        else:
            off = off // cs * cs
            n = min(cs, size - off)
            if img.driver.block_status(off, n).flags & 0x04:
                continue  # compressed writes cannot overwrite allocated clusters
            data = bytes([rnd.randrange(3)]) * (n // 2) + bytes(rnd.randrange(256) for _ in range(n - n // 2))
            img.write_compressed(off, data)
            model[off:off + n] = data


@pytest.mark.parametrize("cs,compat,backing", [
    (4096, "1.1", False), (4096, "0.10", False), (512, "1.1", False),
    (65536, "1.1", True), (65536, "0.10", True), (2 << 20, "1.1", False),
])
def test_qimg_writes_pass_qemu_check_and_compare(tmp_path, cs, compat, backing):
    size = 4 << 20
    model = bytearray(size)
    path = tmp_path / "w.qcow2"
    opts = {"cluster_size": cs, "compat": compat}
    if backing:
        base = tmp_path / "base.qcow2"
        assert run_qemu("create", "-q", "-f", "qcow2", str(base), "3M").returncode == 0
        run_qemu_io("-c", "write -P 0x5a 0 3M", str(base))
        model[:3 << 20] = b"\x5a" * (3 << 20)
        opts.update(backing_file="base.qcow2", backing_fmt="qcow2")
    create_image(str(path), size, opts)
    rnd = random.Random(cs)
    with open_image(str(path), "qcow2", read_only=False) as img:
        _random_ops(img, model, cs, rnd, 60)
        assert img.read(0, size) == model
    check = run_qemu("check", str(path))
    assert check.returncode == 0, check.stdout + check.stderr
    assert b"No errors were found on the image." in check.stdout
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    cmp = run_qemu("compare", "-f", "qcow2", "-F", "raw", str(path), str(raw))
    assert cmp.returncode == 0, cmp.stdout


def test_open_and_close_without_writes_changes_nothing(tmp_path):
    path = tmp_path / "a.qcow2"
    _qemu_io_image(path, "64k", "1.1")
    before = path.read_bytes()
    img = open_image(str(path), "qcow2", read_only=False)
    img.read(0, img.size)
    img.block_status(0, img.size)
    img.close()
    assert path.read_bytes() == before


def test_lazy_refcounts_image_is_clean_after_close(tmp_path):
    path = tmp_path / "l.qcow2"
    assert run_qemu("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(path), "1M").returncode == 0
    with open_image(str(path), "qcow2", read_only=False) as img:
        img.write(4096, b"x" * 70000)
        assert img.driver.dirty_flag()
    check = run_qemu("check", str(path))
    assert check.returncode == 0 and b"No errors" in check.stdout
    info = run_qemu("info", "--output=json", str(path))
    assert b'"dirty-flag": false' in info.stdout


def test_compressed_clusters_qemu_reads(tmp_path):
    """Clusters qimg compresses decompress in QEMU, and an incompressible
    cluster is stored as a normal one."""
    path = tmp_path / "c.qcow2"
    create_image(str(path), 1 << 20, {"cluster_size": 65536})
    rnd = random.Random(7)
    noise = bytes(rnd.randrange(256) for _ in range(65536))
    text = (b"hello qcow2 " * 6000)[:65536]
    with open_image(str(path), "qcow2", read_only=False) as img:
        img.write_compressed(0, text)
        img.write_compressed(65536, noise)
        img.write_compressed(3 * 65536, text[::-1])
        assert img.block_status(0, 65536).flags & 0x40
        assert not img.block_status(65536, 65536).flags & 0x40
    raw = tmp_path / "c.raw"
    assert run_qemu("convert", "-O", "raw", str(path), str(raw)).returncode == 0
    data = raw.read_bytes()
    assert data[:65536] == text and data[65536:131072] == noise
    assert data[3 * 65536:4 * 65536] == text[::-1]
    check = run_qemu("check", str(path))
    assert check.returncode == 0 and b"No errors" in check.stdout


def test_zstd_compressed_clusters_both_ways(tmp_path):
    path = tmp_path / "z.qcow2"
    assert run_qemu("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", str(path), "1M").returncode == 0
    run_qemu_io("-c", "write -c -P 0x12 0 64k", "-c", "write -c -P 0x13 64k 64k", str(path))
    text = (b"zstd cluster " * 6000)[:65536]
    with open_image(str(path), "qcow2", read_only=False) as img:
        assert img.read(0, 131072) == b"\x12" * 65536 + b"\x13" * 65536
        img.write_compressed(3 * 65536, text)
        assert img.block_status(3 * 65536, 65536).flags & 0x40
    raw = tmp_path / "z.raw"
    assert run_qemu("convert", "-O", "raw", str(path), str(raw)).returncode == 0
    assert raw.read_bytes()[3 * 65536:4 * 65536] == text
    assert b"No errors" in run_qemu("check", str(path)).stdout


@pytest.mark.parametrize("prealloc", ["off", "metadata", "falloc", "full"])
def test_map_of_preallocated_images(tmp_path, prealloc):
    """Metadata-preallocated images have data clusters that are holes in
    the file: QEMU detects them and reports zeroes there; falloc/full ones
    are plain data."""
    path = tmp_path / "p.qcow2"
    assert run_qemu("create", "-q", "-f", "qcow2", "-o", f"preallocation={prealloc}", str(path), "8M").returncode == 0
    run_qemu_io("-c", "write -P 1 1M 100k", str(path))
    mine = run_qimg("map", "--output=json", str(path))
    theirs = run_qemu("map", "--output=json", str(path))
    assert mine.stdout.decode() == theirs.stdout.decode()


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_same_requests_same_file_as_qemu_io(tmp_path, compat):
    """The same guest requests through qemu-io and through qimg's API leave
    byte-identical files (allocation order, zero flags, in-place writes,
    packed compressed data, discarded clusters)."""
    ops = [("w", 0, 1 << 20, 1), ("z", 0, 512 << 10, 0), ("w", 100 << 10, 50 << 10, 2),
           ("w", 300 << 10, 64 << 10, 3), ("Z", 600 << 10, 128 << 10, 0), ("d", 2 << 20, 1 << 20, 0),
           ("w", 2 << 20, 4096, 5), ("c", 3 << 20, 65536, 7), ("c", (3 << 20) + 65536, 65536, 8),
           ("w", (3 << 20) + 3 * 65536, 1000, 9), ("z", 1000, 100, 0)]
    theirs, mine = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
    for p in (theirs, mine):
        assert run_qemu("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", str(p), "4M").returncode == 0
    cmds = []
    with open_image(str(mine), "qcow2", read_only=False) as img:
        for kind, off, n, pat in ops:
            if kind == "w":
                cmds.append(f"write -P {pat} {off} {n}")
                img.write(off, bytes([pat]) * n)
            elif kind in "zZ":
                cmds.append(f"write -z {'-u ' if kind == 'Z' else ''}{off} {n}")
                img.write_zeroes(off, n, kind == "Z")
            elif kind == "d":
                cmds.append(f"discard {off} {n}")
                img.discard(off, n)
            else:
                cmds.append(f"write -c -P {pat} {off} {n}")
                img.write_compressed(off, bytes([pat]) * n)
    run_qemu_io(*[x for c in cmds for x in ("-c", c)], str(theirs))
    assert mine.read_bytes() == theirs.read_bytes()
