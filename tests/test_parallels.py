"""parallels against qemu-img 7.2: create byte for byte, info, map, check
(and its repairs), I/O both ways, hostile headers."""

from __future__ import annotations

import shutil
import struct

import pytest

from conftest import assert_same, needs_qemu, patched_copy, qemu_io_cmds, run_qemu, run_qimg

pytestmark = needs_qemu

QEMU_IO_SCRIPT = [
    "write -P 0x11 1000 5000",
    "write -P 0x22 1500k 700k",
    "write -z 3M 4k",
    "discard 0 1M",
    "write -P 0x33 5M 3",
]


def _raw(tool, path, out) -> bytes:
    p = tool("convert", "-f", "parallels", "-O", "raw", str(path), str(out))
    assert p.returncode == 0, p.stderr
    return out.read_bytes()


@pytest.mark.parametrize("opts", [[], ["-o", "cluster_size=4k"], ["-o", "cluster_size=1000"],
                                  ["-o", "cluster_size=64k,preallocation=falloc"]])
@pytest.mark.parametrize("size", ["0", "1000000", "5M"])
def test_create_byte_identical(tmp_path, opts, size):
    mine = run_qimg("create", "-f", "parallels", *opts, "q.img", size, cwd=tmp_path)
    theirs = run_qemu("create", "-f", "parallels", *opts, "r.img", size, cwd=tmp_path)
    assert mine.stdout.replace(b"q.img", b"r.img") == theirs.stdout
    assert (mine.stderr, mine.returncode) == (theirs.stderr, theirs.returncode)
    assert (tmp_path / "q.img").read_bytes() == (tmp_path / "r.img").read_bytes()
    assert_same(["info", "q.img"], str(tmp_path))
    assert_same(["check", "q.img"], str(tmp_path))


@pytest.mark.parametrize("args", [
    ["create", "-f", "parallels", "-o", "help"],
    ["create", "-f", "parallels", "x.img", "-o", "help"],
    ["create", "-f", "parallels", "-o", "cluster_size=0x40000000000000", "x.img", "1M"],
    ["create", "-f", "parallels", "-o", "cluster_size=512", "x.img", "4T"],
    ["create", "-f", "parallels", "-o", "preallocation=metadata", "x.img", "1M"],
    ["create", "-f", "parallels", "-o", "static=on", "x.img", "1M"],
])
def test_create_messages(tmp_path, args):
    assert_same(args, str(tmp_path))


@pytest.mark.parametrize("cluster", ["4k", "1M"])
def test_qemu_written_image_reads_back(tmp_path, cluster):
    img = tmp_path / "a.img"
    assert run_qemu("create", "-q", "-f", "parallels", "-o", f"cluster_size={cluster}", str(img), "6M").returncode == 0
    qemu_io_cmds(img, "parallels", *QEMU_IO_SCRIPT)
    assert _raw(run_qimg, img, tmp_path / "mine.raw") == _raw(run_qemu, img, tmp_path / "theirs.raw")
    for cmd in (["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"],
                ["check"], ["check", "--output=json"]):
        assert_same(cmd + ["a.img"], str(tmp_path))


def test_qimg_writes_like_qemu_io(tmp_path):
    """The same writes through qimg and qemu-io give the same file."""
    from qimg.block.image import open_image

    for name in ("q.img", "r.img"):
        assert run_qemu("create", "-q", "-f", "parallels", "-o", "cluster_size=64k",
                        str(tmp_path / name), "6M").returncode == 0
    writes = [(1000, b"\x11" * 5000), (1500 * 1024, b"\x22" * 700 * 1024), (1200 * 1024, b"\x44" * 10),
              (3 << 20, bytes(4096))]
    qemu_io_cmds(tmp_path / "r.img", "parallels", *(f"write -P {d[0]} {o} {len(d)}" for o, d in writes))
    img = open_image(str(tmp_path / "q.img"), "parallels", read_only=False)
    for o, d in writes:
        img.driver.write(o, d)
    img.driver.write_zeroes(0, 4096)  # no zero clusters in parallels: written
    img.driver.discard(2 << 20, 64 << 10)  # no discard: ignored
    img.close()
    qemu_io_cmds(tmp_path / "r.img", "parallels", "write -z 0 4k", "discard 2M 64k")
    assert (tmp_path / "q.img").read_bytes() == (tmp_path / "r.img").read_bytes()


@pytest.mark.parametrize("opts", [[], ["-o", "cluster_size=4k"]])
def test_convert_to_parallels_passes_qemu(tmp_path, opts):
    src = tmp_path / "src.raw"
    data = bytearray(5 << 20)
    data[100:5000] = b"\x5a" * 4900
    data[(3 << 20) + 7:(3 << 20) + 9000] = b"\xa5" * 8993
    src.write_bytes(bytes(data))
    p = run_qimg("convert", "-O", "parallels", *opts, str(src), str(tmp_path / "out.img"))
    assert p.returncode == 0, p.stderr
    assert run_qemu("check", str(tmp_path / "out.img")).returncode == 0
    cmp = run_qemu("compare", "-f", "raw", "-F", "parallels", str(src), str(tmp_path / "out.img"))
    assert cmp.returncode == 0, cmp.stdout
    assert run_qemu("convert", "-O", "parallels", *opts, str(src), str(tmp_path / "theirs.img")).returncode == 0
    assert (tmp_path / "out.img").read_bytes() == (tmp_path / "theirs.img").read_bytes()


# (field offset, struct format, value) in a 4 MiB image with clusters 0 and
# 3 allocated (BAT at 64)
HOSTILE = [
    (68, "<I", 40),                 # BAT[1] points past the end of the file
    (44, "<I", 0x746F6E59),         # "in use": not closed cleanly
    (16, "<I", 3),                  # version
    (0, "<I", 0),                   # magic
    (28, "<I", 0),                  # zero sectors per track
    (28, "<I", 0x7FFFFFFF),         # cluster too big
    (32, "<I", 0x7FFFFFFF),         # catalog too large
    (32, "<I", 0x1FFFFFFF),         # BAT read larger than one request: EIO
    (48, "<I", 1),                  # odd data offset
    (48, "<I", 0),                  # no data offset
    (32, "<I", 2),                  # BAT shorter than the disk
    (36, "<Q", 0xFFFFFFFFFFFFFFFF), # disk size past the block layer's limit
    (36, "<Q", 0x3FFFFFFFFFFFFF),
]


@pytest.mark.parametrize("offset,fmt,value", HOSTILE)
def test_hostile_headers(tmp_path, offset, fmt, value):
    img = tmp_path / "p.img"
    assert run_qemu("create", "-q", "-f", "parallels", str(img), "4M").returncode == 0
    qemu_io_cmds(img, "parallels", "write -P 1 0 1M", "write -P 2 3M 4k")
    patched_copy(img, tmp_path / "h.img", offset, fmt, value)
    for cmd in (["info", "h.img"], ["check", "h.img"], ["map", "--output=json", "h.img"],
                ["convert", "-O", "raw", "h.img", "h.raw"]):
        assert_same(cmd, str(tmp_path))


def test_truncated_file(tmp_path):
    img = tmp_path / "p.img"
    assert run_qemu("create", "-q", "-f", "parallels", str(img), "4M").returncode == 0
    (tmp_path / "t.img").write_bytes(img.read_bytes()[:40])
    assert_same(["info", "t.img"], str(tmp_path))
    assert_same(["info", "-f", "parallels", "t.img"], str(tmp_path))


@pytest.mark.parametrize("offset,fmt,value", [(68, "<I", 40), (44, "<I", 0x746F6E59), (0, "<I", 0)])
@pytest.mark.parametrize("repair", ["leaks", "all"])
def test_check_repair_matches_qemu(tmp_path, offset, fmt, value, repair):
    """check -r: same report, same exit code, same file afterwards."""
    img = tmp_path / "p.img"
    assert run_qemu("create", "-q", "-f", "parallels", "-o", "cluster_size=64k", str(img), "4M").returncode == 0
    qemu_io_cmds(img, "parallels", "write -P 1 0 100k", "write -P 2 3M 4k")
    if offset:
        patched_copy(img, tmp_path / "base.img", offset, fmt, value)
    else:  # leaked space at the end
        shutil.copy(img, tmp_path / "base.img")
        with open(tmp_path / "base.img", "ab") as f:
            f.write(b"\xee" * 70000)
    shutil.copy(tmp_path / "base.img", tmp_path / "q.img")
    shutil.copy(tmp_path / "base.img", tmp_path / "r.img")
    mine = run_qimg("check", "-r", repair, "q.img", cwd=tmp_path)
    theirs = run_qemu("check", "-r", repair, "r.img", cwd=tmp_path)
    assert mine.stdout.replace(b"q.img", b"r.img") == theirs.stdout
    assert mine.stderr.replace(b"q.img", b"r.img") == theirs.stderr
    assert mine.returncode == theirs.returncode
    assert (tmp_path / "q.img").read_bytes() == (tmp_path / "r.img").read_bytes()


def test_unclean_image_refuses_write(tmp_path):
    img = tmp_path / "p.img"
    assert run_qemu("create", "-q", "-f", "parallels", str(img), "4M").returncode == 0
    patched_copy(img, tmp_path / "u.img", 44, "<I", 0x746F6E59)
    shutil.copy(tmp_path / "u.img", tmp_path / "u2.img")
    mine = run_qimg("convert", "-n", "-O", "parallels", str(img), "u.img", cwd=tmp_path)
    theirs = run_qemu("convert", "-n", "-O", "parallels", str(img), "u2.img", cwd=tmp_path)
    assert mine.stderr.replace(b"u.img", b"u2.img") == theirs.stderr
    assert mine.returncode == theirs.returncode


def _with_extension(src, dst, features: bytes, *, good_sum: bool = True, cluster: int = 4096) -> None:
    """Append a Format Extension cluster holding ``features`` and point
    ext_off at it."""
    import hashlib

    data = bytearray(src.read_bytes())
    ext_off = len(data)
    body = features.ljust(cluster - 24, b"\0")
    digest = hashlib.md5(body).digest() if good_sum else bytes(16)
    data += struct.pack("<Q", 0xAB234CEF23DCEA87) + digest + body
    struct.pack_into("<Q", data, 56, ext_off // 512)
    dst.write_bytes(bytes(data))


def _feature(magic: int, payload: bytes, flags: int = 0) -> bytes:
    return struct.pack("<QQII", magic, flags, len(payload), 0) + payload


BITMAP = 0x20385FAE252CB34A


def _bitmap(sectors: int = 8192, granularity: int = 128, l1: int = 1, entries: tuple[int, ...] = (1,)) -> bytes:
    return struct.pack("<Q16sII", sectors, b"\1" * 16, granularity, l1) + b"".join(
        struct.pack("<Q", e) for e in entries)


@pytest.mark.parametrize("features,good_sum", [
    (_feature(0, b""), True),                                   # valid, no features
    (_feature(0, b""), False),                                  # bad checksum
    (_feature(0x1234, b"x"), True),                             # unknown feature
    (_feature(0, b"", flags=1), True),                          # flags
    (_feature(BITMAP, b"\0" * 20), True),                       # bitmap feature too small
    (_feature(BITMAP, _bitmap(sectors=5)), True),               # bitmap size differs
    (_feature(BITMAP, _bitmap(l1=9)), True),                    # l1 past the feature
    (_feature(BITMAP, _bitmap(l1=2, entries=(1, 0))), True),    # l1 size wrong
    (_feature(BITMAP, _bitmap()) + _feature(0, b""), True),     # a valid bitmap
    (struct.pack("<QQI", 0, 0, 5000), True),                    # data_size past the cluster
], ids=["empty", "checksum", "unknown", "flags", "small", "sectors", "l1-past", "l1-size", "bitmap", "data-size"])
def test_format_extension(tmp_path, features, good_sum):
    img = tmp_path / "p.img"
    assert run_qemu("create", "-q", "-f", "parallels", "-o", "cluster_size=4k", str(img), "4M").returncode == 0
    qemu_io_cmds(img, "parallels", "write -P 1 0 8k")
    _with_extension(img, tmp_path / "e.img", features, good_sum=good_sum)
    for cmd in (["info", "e.img"], ["check", "e.img"], ["map", "--output=json", "e.img"]):
        assert_same(cmd, str(tmp_path))
    # check -r opens read-write: the extension is ignored, with a warning
    shutil.copy(tmp_path / "e.img", tmp_path / "f.img")
    mine = run_qimg("check", "-r", "all", "e.img", cwd=tmp_path)
    theirs = run_qemu("check", "-r", "all", "f.img", cwd=tmp_path)
    assert (mine.stdout.replace(b"e.img", b"f.img"), mine.stderr, mine.returncode) == \
        (theirs.stdout, theirs.stderr, theirs.returncode)
    assert (tmp_path / "e.img").read_bytes() == (tmp_path / "f.img").read_bytes()


def _old_magic(src, dst) -> None:
    """The same image with the old "WithoutFreeSpace" magic, whose BAT holds
    sector numbers instead of cluster numbers."""
    data = bytearray(src.read_bytes())
    data[:16] = b"WithoutFreeSpace"
    tracks, entries = struct.unpack_from("<II", data, 28)
    for i in range(entries):
        (e,) = struct.unpack_from("<I", data, 64 + 4 * i)
        struct.pack_into("<I", data, 64 + 4 * i, e * tracks)
    dst.write_bytes(bytes(data))


def test_old_magic_image(tmp_path):
    from qimg.block.image import open_image

    img = tmp_path / "p.img"
    assert run_qemu("create", "-q", "-f", "parallels", "-o", "cluster_size=64k", str(img), "4M").returncode == 0
    qemu_io_cmds(img, "parallels", "write -P 1 0 100k", "write -P 2 3M 4k")
    _old_magic(img, tmp_path / "o.img")
    assert _raw(run_qimg, tmp_path / "o.img", tmp_path / "m.raw") == _raw(run_qemu, tmp_path / "o.img",
                                                                           tmp_path / "t.raw")
    for cmd in (["info", "o.img"], ["check", "o.img"], ["map", "o.img"], ["map", "--output=json", "o.img"]):
        assert_same(cmd, str(tmp_path))
    # writes allocate sector-numbered clusters there too
    shutil.copy(tmp_path / "o.img", tmp_path / "w.img")
    qemu_io_cmds(tmp_path / "o.img", "parallels", "write -P 3 2M 70k")
    opened = open_image(str(tmp_path / "w.img"), "parallels", read_only=False)
    opened.driver.write(2 << 20, b"\3" * 70 * 1024)
    opened.close()
    assert (tmp_path / "w.img").read_bytes() == (tmp_path / "o.img").read_bytes()


def test_bat_cut_by_eof(tmp_path):
    """A BAT that ends inside an entry: the missing bytes read as zeroes."""
    img = tmp_path / "p.img"
    assert run_qemu("create", "-q", "-f", "parallels", "-o", "cluster_size=4k", str(img), "1M").returncode == 0
    qemu_io_cmds(img, "parallels", "write -P 1 0 64k")
    (tmp_path / "c.img").write_bytes(img.read_bytes()[:78])
    for cmd in (["map", "--output=json", "c.img"], ["check", "c.img"], ["convert", "-O", "raw", "c.img", "c.raw"]):
        assert_same(cmd, str(tmp_path))
