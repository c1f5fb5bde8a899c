"""The qcow2 driver against hostile and unusual images: every refusal is a
QimgError with qemu-img's own message, never a traceback."""

from __future__ import annotations

import random
import struct

import pytest

from conftest import needs_qemu, run_qemu, run_qemu_io, run_qimg
from qimg.block.image import open_image
from qimg.errors import QimgError
from qimg.formats.qcow2.create import create_image


def _fresh(path, size: int = 1 << 20, **opts) -> None:
    create_image(str(path), size, opts)


def _poke(path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


# (header offset, struct format, value): each makes QEMU refuse or accept the image.
HOSTILE = [
    (72, ">Q", 0x20),                  # unknown incompatible feature
    (72, ">Q", 0x1 | 0x80),            # dirty + unknown
    (36, ">I", 0x10000000),            # huge l1_size
    (36, ">I", 0),                     # L1 too small for the size
    (40, ">Q", 0x30001),               # unaligned L1
    (48, ">Q", 0x123),                 # unaligned refcount table
    (56, ">I", 0x1000),                # refcount table too large
    (56, ">I", 0),                     # no refcount table
    (20, ">I", 30),                    # cluster_bits too big
    (20, ">I", 8),                     # cluster_bits too small
    (4, ">I", 4),                      # version
    (4, ">I", 1),
    (60, ">I", 70000),                 # too many snapshots
    (64, ">Q", 0x123),                 # unaligned snapshot table
    (24, ">Q", 0xFFFFFFFFFFFFFFFF),    # size
    (24, ">Q", 0x7FFFFFFFFFFFFFFF),
    (8, ">Q", 0x20000),                # backing file offset past the cluster
    (96, ">I", 7),                     # refcount order
    (32, ">I", 0xB),                   # encryption method
    (100, ">I", 50),                   # header_length too short
    (100, ">I", 0x20000),              # header_length past the cluster
    (0, ">I", 0),                      # magic
]


@needs_qemu
@pytest.mark.parametrize("offset,fmt,value", HOSTILE)
def test_hostile_header_same_as_qemu(tmp_path, offset, fmt, value):
    path = tmp_path / "t.qcow2"
    _fresh(path)
    _poke(path, offset, fmt, value)
    mine = run_qimg("info", "-f", "qcow2", str(path))
    theirs = run_qemu("info", "-f", "qcow2", str(path))
    assert mine.stderr.decode() == theirs.stderr.decode()
    assert mine.returncode == theirs.returncode
    assert b"Traceback" not in mine.stderr


@needs_qemu
@pytest.mark.parametrize("offset,fmt,value", [
    (116, ">I", 0xFFFF), (116, ">I", 16), (116, ">I", 15), (112, ">I", 0x12345678), (100, ">I", 0xFFF8),
])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_hostile_extensions_same_as_qemu(tmp_path, offset, fmt, value, compat):
    """The backing format extension right after the header: bad lengths,
    unknown magic, header_length pointing into nowhere."""
    assert run_qemu("create", "-q", "-f", "raw", str(tmp_path / "base.img"), "1M").returncode == 0
    path = tmp_path / "t.qcow2"
    assert run_qemu("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", "-b", "base.img", "-F", "raw",
                    str(path), "1M").returncode == 0
    if compat == "0.10":
        offset -= 40  # v2 extensions start at 72, not 112
        if offset < 72:
            return
    _poke(path, offset, fmt, value)
    mine = run_qimg("info", str(path))
    theirs = run_qemu("info", str(path))
    assert mine.stderr.decode() == theirs.stderr.decode()
    assert mine.stdout.decode() == theirs.stdout.decode()
    assert mine.returncode == theirs.returncode


@needs_qemu
@pytest.mark.parametrize("length", [0, 50, 100, 4096, 70000, 196608 + 4])
def test_truncated_file(tmp_path, length):
    path = tmp_path / "t.qcow2"
    _fresh(path, 16 << 20)
    with open_image(str(path), "qcow2", read_only=False) as img:
        img.write(0, b"\x01" * (1 << 20))
    with open(path, "r+b") as f:
        f.truncate(length)
    for args in (["info", "-f", "qcow2", str(path)], ["map", "-f", "qcow2", str(path)]):
        mine = run_qimg(*args)
        theirs = run_qemu(*args)
        assert mine.stderr.decode() == theirs.stderr.decode()
        assert mine.stdout.decode() == theirs.stdout.decode()
        assert mine.returncode == theirs.returncode


def test_garbage_headers_never_escape_as_tracebacks(tmp_path):
    rnd = random.Random(1)
    path = tmp_path / "g.qcow2"
    _fresh(path, 16 << 20)
    good = path.read_bytes()
    for _ in range(300):
        buf = bytearray(good)
        for _ in range(rnd.randrange(1, 6)):
            pos = rnd.randrange(8, 128)
            buf[pos] = rnd.randrange(256)
        path.write_bytes(bytes(buf))
        try:
            with open_image(str(path), "qcow2") as img:
                img.read(0, min(img.size, 1 << 20))
                img.block_status(0, img.size)
        except QimgError:
            pass


@needs_qemu
def test_corrupt_image_opens_read_only_only(tmp_path):
    path = tmp_path / "c.qcow2"
    _fresh(path)
    _poke(path, 79, ">B", 2)
    with open_image(str(path), "qcow2") as img:
        assert img.driver.info_specific()["data"]["corrupt"] is True
    with pytest.raises(QimgError) as e:
        open_image(str(path), "qcow2", read_only=False)
    p = run_qemu_io_unchecked("-c", "write 0 512", str(path))
    assert e.value.message in p.stderr.decode()
    mine = run_qimg("info", str(path))
    theirs = run_qemu("info", str(path))
    assert mine.stdout == theirs.stdout


def run_qemu_io_unchecked(*args: str):
    import subprocess

    return subprocess.run(["qemu-io", *args], capture_output=True)


@needs_qemu
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_info_format_specific_matches(tmp_path, compat):
    import json

    path = tmp_path / "i.qcow2"
    extra = ",lazy_refcounts=on,refcount_bits=8" if compat == "1.1" else ""
    assert run_qemu("create", "-q", "-f", "qcow2", "-o", f"compat={compat}{extra}", str(path), "1M").returncode == 0
    theirs = json.loads(run_qemu("info", "--output=json", str(path)).stdout)["format-specific"]
    with open_image(str(path)) as img:
        mine = img.driver.info_specific()
    assert json.dumps(mine) == json.dumps(theirs)


def test_info_does_not_import_numpy(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "n.qcow2"
    _fresh(path)
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "qimg", "info", str(path)],
                       capture_output=True)
    assert p.returncode == 0
    assert b"numpy" not in p.stderr


@needs_qemu
def test_partial_zero_write_and_discard_at_odd_image_end(tmp_path):
    """An image whose size is not cluster aligned: zeroes and discards that
    reach its end treat the last partial cluster as whole, as QEMU does."""
    path = tmp_path / "o.qcow2"
    size = (1 << 20) + 512
    _fresh(path, size, cluster_size=65536)
    ref = tmp_path / "ref.qcow2"
    assert run_qemu("create", "-q", "-f", "qcow2", str(ref), str(size)).returncode == 0
    with open_image(str(path), "qcow2", read_only=False) as img:
        img.write(size - 70000, b"\x07" * 70000)
        img.write_zeroes(size - 512, 512)
        img.discard(size - 65536 - 512, 65536 + 512)
    run_qemu_io("-c", f"write -P 7 {size - 70000} 70000", "-c", f"write -z {size - 512} 512",
                "-c", f"discard {size - 65536 - 512} {65536 + 512}", str(ref))
    mine = run_qemu("map", "--output=json", str(path)).stdout.decode()
    theirs = run_qemu("map", "--output=json", str(ref)).stdout.decode()
    strip = lambda s: "\n".join(line.split(', "offset"')[0] for line in s.splitlines())  # noqa: E731
    assert strip(mine) == strip(theirs)
    assert run_qemu("compare", str(path), str(ref)).returncode == 0
    assert b"No errors" in run_qemu("check", str(path)).stdout


@needs_qemu
def test_write_through_backing_copies_partial_clusters(tmp_path):
    base = tmp_path / "b.qcow2"
    assert run_qemu("create", "-q", "-f", "qcow2", str(base), "2M").returncode == 0
    run_qemu_io("-c", "write -P 0x42 0 2M", str(base))
    top = tmp_path / "t.qcow2"
    _fresh(top, 2 << 20, backing_file="b.qcow2", backing_fmt="qcow2")
    with open_image(str(top), "qcow2", read_only=False) as img:
        img.write(1000, b"\x01" * 100)
        data = img.read(0, 65536)
    assert data == b"\x42" * 1000 + b"\x01" * 100 + b"\x42" * (65536 - 1100)
    raw = tmp_path / "t.raw"
    assert run_qemu("convert", "-O", "raw", str(top), str(raw)).returncode == 0
    assert raw.read_bytes()[:65536] == data


@needs_qemu
def test_grow_virtual_size(tmp_path):
    path = tmp_path / "g.qcow2"
    _fresh(path, 1 << 20, cluster_size=512)
    with open_image(str(path), "qcow2", read_only=False) as img:
        img.write(0, b"\x09" * 4096)
        img.truncate(64 << 20)
        img.write((64 << 20) - 4096, b"\x08" * 4096)
    info = run_qemu("info", str(path)).stdout.decode()
    assert "virtual size: 64 MiB (67108864 bytes)" in info
    assert b"No errors" in run_qemu("check", str(path)).stdout
    raw = tmp_path / "g.raw"
    assert run_qemu("convert", "-O", "raw", str(path), str(raw)).returncode == 0
    d = raw.read_bytes()
    assert d[:4096] == b"\x09" * 4096 and d[-4096:] == b"\x08" * 4096


@needs_qemu
def test_writes_after_internal_snapshot_keep_snapshot_intact(tmp_path):
    path = tmp_path / "s.qcow2"
    assert run_qemu("create", "-q", "-f", "qcow2", str(path), "4M").returncode == 0
    run_qemu_io("-c", "write -P 1 0 2M", str(path))
    assert run_qemu("snapshot", "-c", "s1", str(path)).returncode == 0
    expect = bytearray(b"\x01" * (2 << 20) + bytes(2 << 20))
    with open_image(str(path), "qcow2", read_only=False) as img:
        img.write(100000, b"\x02" * 300000)
        img.write_zeroes(1 << 20, 65536)
        img.discard(3 << 20, 1 << 20)
    expect[100000:400000] = b"\x02" * 300000
    expect[1 << 20:(1 << 20) + 65536] = bytes(65536)
    assert b"No errors" in run_qemu("check", str(path)).stdout
    active, snap = tmp_path / "a.raw", tmp_path / "s1.raw"
    assert run_qemu("convert", "-O", "raw", str(path), str(active)).returncode == 0
    assert run_qemu("convert", "-l", "snapshot.name=s1", "-O", "raw", str(path), str(snap)).returncode == 0
    assert active.read_bytes() == expect
    assert snap.read_bytes() == b"\x01" * (2 << 20) + bytes(2 << 20)


@needs_qemu
@pytest.mark.parametrize("old,new,cs,prealloc", [
    ("1M", "12M", "512", "off"), ("1M", "3G", "65536", "off"), ("1M", "12M", "512", "falloc"),
    ("1000000", "5M", "4096", "full"), ("1M", "2M", "4096", "metadata"), ("1000000", "7M", "512", "metadata"),
    ("1000000", "7M", "65536", "full"),
])
def test_grow_byte_identical_to_qemu_resize(tmp_path, old, new, cs, prealloc):
    from qimg.units import parse_size

    theirs, mine = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
    for p in (theirs, mine):
        assert run_qemu("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", str(p), old).returncode == 0
        run_qemu_io("-c", "write -P 3 0 100k", "-c", "write -P 4 900000 100000", str(p))
    assert run_qemu("resize", "-q", f"--preallocation={prealloc}", str(theirs), new).returncode == 0
    with open_image(str(mine), "qcow2", read_only=False) as img:
        img.truncate(parse_size(new), prealloc)
    assert mine.read_bytes() == theirs.read_bytes()


@needs_qemu
@pytest.mark.parametrize("old,new,cs", [
    ("4M", "2M", "65536"), ("4M", "1000448", "4096"), ("16M", "1M", "512"), ("4M", "512", "65536"),
])
def test_shrink_byte_identical_to_qemu_resize(tmp_path, old, new, cs):
    from qimg.units import parse_size

    theirs, mine = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
    assert run_qemu("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", str(theirs), old).returncode == 0
    run_qemu_io("-c", "write -c -P 2 0 64k", "-c", "write -P 1 64k 3M", "-c", "write -z 512k 64k", str(theirs))
    mine.write_bytes(theirs.read_bytes())
    assert run_qemu("resize", "-q", "--shrink", str(theirs), new).returncode == 0
    with open_image(str(mine), "qcow2", read_only=False) as img:
        img.truncate(parse_size(new), "off", True)
    assert mine.read_bytes() == theirs.read_bytes()


def test_resize_refusals(tmp_path):
    path = tmp_path / "r.qcow2"
    _fresh(path, 4 << 20)
    with open_image(str(path), "qcow2", read_only=False) as img:
        with pytest.raises(QimgError, match="^The new size must be a multiple of 512$"):
            img.truncate(1000001)
        with pytest.raises(QimgError, match="^Preallocation can't be used for shrinking an image$"):
            img.truncate(1 << 20, "falloc", True)


@needs_qemu
def test_write_onto_metadata_marks_corrupt_and_fails(tmp_path):
    """A damaged L2 entry pointing at the refcount table: the write fails
    with EIO, the image is marked corrupt, the metadata survives."""
    path = tmp_path / "o.qcow2"
    assert run_qemu("create", "-q", "-f", "qcow2", str(path), "1M").returncode == 0
    run_qemu_io("-c", "write -P 1 0 64k", str(path))
    _poke(path, 0x40000, ">Q", (1 << 63) | 0x10000)
    before = path.read_bytes()[0x10000:0x20000]
    img = open_image(str(path), "qcow2", read_only=False)
    with pytest.raises(QimgError, match="^Input/output error$"):
        img.write(0, b"x" * 512)
    img.close()
    assert path.read_bytes()[0x10000:0x20000] == before
    assert "corrupt: true" in run_qemu("info", str(path)).stdout.decode()
