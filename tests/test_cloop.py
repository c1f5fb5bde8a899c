"""cloop (read-only) against qemu-img 7.2: images made by cloop-utils'
create_compressed_fs, read back byte for byte; info, map, check, compare;
writes refused; hostile headers with qemu's messages."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
import zlib

import pytest

from conftest import assert_same, needs_qemu, run_qemu, run_qimg

CCFS = shutil.which("create_compressed_fs")

pytestmark = [needs_qemu, pytest.mark.skipif(CCFS is None, reason="create_compressed_fs (cloop-utils) not installed")]

TABLE = 136  # the offsets table follows the 128-byte preamble and two u32s
MAGIC = (b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")


def _ccfs(src: str, dst: str, block: int, stdin: bool = False) -> None:
    if stdin:
        with open(src, "rb") as f:
            p = subprocess.run([CCFS, "-q", "-B", str(block), "-s", str(os.path.getsize(src)), "-", dst],
                               stdin=f, capture_output=True, timeout=60)
    else:
        p = subprocess.run([CCFS, "-q", "-B", str(block), src, dst], capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """{name: (directory, raw input, cloop image, block size)}"""
    d = tmp_path_factory.mktemp("cloop")
    rnd = random.Random(7)
    text = b"".join(b"line %d: the quick brown fox jumps over the lazy dog\n" % i for i in range(30000))
    parts = []
    for _ in range(12):
        n = rnd.randrange(1, 400000)
        kind = rnd.randrange(3)
        parts.append(bytes(n) if kind == 0 else rnd.randbytes(n) if kind == 1 else text[:n])
    sources = {
        # random data: stored blocks; the size is not a whole number of blocks
        "rand": (rnd.randbytes(300000), 65536, False),
        "text": (text[:1234567], 4096, False),
        # zeroes, random and text runs, written through a pipe
        "mix": (b"".join(parts), 262144, True),
        "zero": (bytes(1 << 20), 65536, False),
    }
    out = {}
    for name, (data, block, stdin) in sources.items():
        raw = d / f"{name}.raw"
        raw.write_bytes(data)
        _ccfs(str(raw), str(d / f"{name}.cloop"), block, stdin)
        out[name] = (d, raw, d / f"{name}.cloop", block)
    return out


def _table(path) -> tuple[bytes, int, int, list[int]]:
    data = path.read_bytes()
    block, n = struct.unpack_from(">II", data, 128)
    return data, block, n, list(struct.unpack_from(f">{n + 1}Q", data, TABLE))


def _with_table(data: bytes, offsets: list[int]) -> bytes:
    buf = bytearray(data)
    struct.pack_into(f">{len(offsets)}Q", buf, TABLE, *offsets)
    return bytes(buf)


# ---- images made by cloop-utils ----------------------------------------------------------

@pytest.mark.parametrize("name", ["rand", "text", "mix", "zero"])
def test_reads_back_like_qemu(images, name):
    d, raw, img, block = images[name]
    cwd = str(d)
    f = img.name
    assert img.read_bytes().startswith(MAGIC)
    for cmd in (["info", f], ["info", "--output=json", f], ["map", "--output=json", f], ["map", f], ["check", f]):
        assert_same(cmd, cwd)
    mine = run_qimg("convert", "-O", "raw", f, f"{name}.mine", cwd=cwd)
    theirs = run_qemu("convert", "-O", "raw", f, f"{name}.theirs", cwd=cwd)
    assert (mine.returncode, mine.stdout, mine.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr) == \
        (0, b"", b"")
    out = (d / f"{name}.mine").read_bytes()
    assert out == (d / f"{name}.theirs").read_bytes()
    # the input, padded with zeroes to a whole number of blocks
    data = raw.read_bytes()
    assert len(out) == -(-len(data) // block) * block
    assert out[:len(data)] == data and not any(out[len(data):])
    # sparseness of the copy as qemu-img's (zero runs are holes in both)
    assert os.stat(d / f"{name}.mine").st_blocks <= os.stat(d / f"{name}.theirs").st_blocks + 8
    assert_same(["compare", raw.name, f], cwd)


def test_info_json_and_map_text(images):
    d, _, img, _ = images["mix"]
    p = run_qimg("info", "--output=json", img.name, cwd=str(d))
    assert b'"format": "cloop"' in p.stdout and b'"virtual-size": ' in p.stdout
    # no host offsets: qemu-img's human map refuses after its heading
    p = run_qimg("map", img.name, cwd=str(d))
    assert p.returncode == 1
    assert p.stdout == b"Offset          Length          Mapped to       File\n"
    assert p.stderr == b"qemu-img: File contains external, encrypted or compressed clusters.\n"
    p = run_qimg("check", img.name, cwd=str(d))
    assert (p.returncode, p.stderr) == (63, b"qemu-img: This image format does not support checks\n")


def test_compare_and_copies(images):
    d, raw, img, _ = images["text"]
    cwd = str(d)
    for cmd in (["compare", "-f", "cloop", "-F", "raw", img.name, raw.name],
                ["compare", "-s", raw.name, img.name],
                ["convert", "-c", "-O", "qcow2", img.name, "t.qcow2"],
                ["compare", "-f", "cloop", "-F", "qcow2", img.name, "t.qcow2"],
                ["dd", f"if={img.name}", "of=t.dd", "bs=1000", "skip=7", "count=333"],
                ["measure", "-O", "qcow2", img.name]):
        assert_same(cmd, cwd)
    # qemu-img dd's count includes the skipped blocks
    dd = (d / "t.dd").read_bytes()
    assert dd[:326000] == raw.read_bytes()[7000:333000] and not any(dd[326000:])


def test_writes_refused(images):
    d, raw, img, _ = images["rand"]
    cwd = str(d)
    before = img.read_bytes()
    for cmd in (["convert", "-n", "-O", "cloop", raw.name, img.name],
                ["create", "-f", "cloop", "new.cloop", "1M"],
                ["convert", "-O", "cloop", raw.name, "new.cloop"],
                ["check", "-r", "all", img.name],
                ["resize", img.name, "1M"],
                ["bench", "-w", img.name],
                ["rebase", "-u", "-b", "", img.name]):
        p = assert_same(cmd, cwd)
        assert p.returncode == 1
    p = run_qimg("convert", "-n", "-O", "cloop", raw.name, img.name, cwd=cwd)
    assert p.stderr == f"qemu-img: Could not open '{img.name}': Image is read-only\n".encode()
    p = run_qimg("create", "-f", "cloop", "new.cloop", "1M", cwd=cwd)
    assert p.stderr == b"qemu-img: new.cloop: Format driver 'cloop' does not support image creation\n"
    assert img.read_bytes() == before
    assert not (d / "new.cloop").exists()


def test_write_open_refused_before_the_lock(images):
    """A read-write open is refused as the format's, even while another
    process holds the image: QEMU's cloop refuses before any lock."""
    d, raw, img, _ = images["rand"]
    holder = subprocess.Popen(["stdbuf", "-oL", "qemu-io", "-r", "-f", "cloop", "-c", "length",
                               "-c", "sleep 600000", str(img)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline()  # 'length' answered: the image is open and locked
        for cmd in (["convert", "-n", "-O", "cloop", raw.name, img.name], ["check", "-r", "all", img.name]):
            p = assert_same(cmd, str(d))
            assert p.returncode == 1 and b"Image is read-only" in p.stderr
    finally:
        holder.kill()
        holder.wait()


def test_info_does_not_import_numpy(images):
    d, _, img, _ = images["rand"]
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "qimg", "info", str(img)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "numpy" not in p.stderr
    assert "file format: cloop" in p.stdout


# ---- hostile headers -----------------------------------------------------------------

def _hostile(name: str, data: bytes, table: list[int]) -> bytes:
    """The ``rand`` image with one thing broken."""
    def field(off, fmt, value):
        buf = bytearray(data)
        struct.pack_into(fmt, buf, off, value)
        return bytes(buf)

    big = 2 * 64 * 1024 * 1024
    return {
        "bs_zero": lambda: field(128, ">I", 0),
        "bs_odd": lambda: field(128, ">I", 257),
        "bs_over_64m": lambda: field(128, ">I", 64 * 1024 * 1024 + 512),
        "bs_max": lambda: field(128, ">I", 0xFFFFFE00),
        # valid header, blocks that inflate to more or less than a block
        "bs_small": lambda: field(128, ">I", 512),
        "bs_large": lambda: field(128, ">I", 131072),
        "nb_zero": lambda: field(132, ">I", 0),
        "nb_fewer": lambda: field(132, ">I", 3),
        "nb_limit": lambda: field(132, ">I", 536870912),
        "nb_all_ones": lambda: field(132, ">I", 0xFFFFFFFF),
        # (n + 1) * 8 wraps to 0 in QEMU's uint32_t: its allocation fails
        "nb_wraps": lambda: field(132, ">I", 536870911),
        "nb_too_many_offsets": lambda: field(132, ">I", 67108864),
        # the largest table QEMU reads: it runs into the data
        "nb_largest_table": lambda: field(132, ">I", 67108863),
        "non_monotonic": lambda: _with_table(data, table[:3] + [table[3] - table[2]] + table[4:]),
        "first_huge": lambda: _with_table(data, [1 << 63] + table[1:]),
        "all_huge": lambda: _with_table(data, [(1 << 63) + i for i in range(len(table))]),
        "block_over_128m": lambda: _with_table(data, table[:2] + [t + big - (table[2] - table[1]) + 1
                                                                  for t in table[2:]]),
        "block_128m": lambda: _with_table(data, table[:2] + [t + big - (table[2] - table[1]) for t in table[2:]]),
        "empty_block": lambda: _with_table(data, table[:2] + [table[1]] + table[3:]),
        "corrupt_data": lambda: data[:table[2] + 100] + bytes([data[table[2] + 100] ^ 0xFF]) + data[table[2] + 101:],
        "cut_in_header": lambda: data[:130],
        "cut_in_table": lambda: data[:TABLE + 20],
        "cut_at_entry": lambda: data[:TABLE + 24],
        "cut_after_table": lambda: data[:TABLE + 8 * len(table) + 10],
        "cut_in_data": lambda: data[:100000],
        "cut_last_block": lambda: data[:-10],
    }[name]()


HOSTILE = ["bs_zero", "bs_odd", "bs_over_64m", "bs_max", "bs_small", "bs_large", "nb_zero", "nb_fewer",
           "nb_limit", "nb_all_ones", "nb_wraps", "nb_too_many_offsets", "nb_largest_table", "non_monotonic",
           "first_huge", "all_huge", "block_over_128m", "block_128m", "empty_block", "corrupt_data",
           "cut_in_header", "cut_in_table", "cut_at_entry", "cut_after_table", "cut_in_data", "cut_last_block"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_headers(images, name):
    d, raw, img, _ = images["rand"]
    data, _, _, table = _table(img)
    h = d / f"h_{name}.cloop"
    h.write_bytes(_hostile(name, data, table))
    cwd = str(d)
    p = assert_same(["info", "-f", "cloop", h.name], cwd)
    assert b"Traceback" not in p.stderr
    if p.returncode:
        assert p.stderr.startswith(f"qemu-img: Could not open '{h.name}': ".encode())
        return
    if name == "block_128m":
        return  # reading its 128 MiB block is slow and fails as "all_huge" does
    cmds = [["convert", "-O", "raw", h.name, f"{h.name}.raw"]]
    if name in ("nb_fewer", "corrupt_data", "cut_last_block"):
        cmds += [["map", "--output=json", h.name], ["compare", "-f", "cloop", h.name, raw.name]]
    for cmd in cmds:
        p = assert_same(cmd, cwd)
        assert b"Traceback" not in p.stderr
    if name == "nb_fewer":
        assert (d / f"{h.name}.raw").read_bytes() == raw.read_bytes()[:3 * 65536]


@pytest.mark.parametrize("name,expect", [
    ("bs_odd", "block_size 257 must be a multiple of 512"),
    ("bs_over_64m", "block_size 67109376 must be 64 MB or less"),
    ("nb_limit", "n_blocks 536870912 must be 536870911 or less"),
    ("nb_too_many_offsets", "image requires too many offsets, try increasing block size"),
    ("non_monotonic", "offsets not monotonically increasing at index 3, image file is corrupt"),
    ("block_over_128m", "invalid compressed block size at index 2, image file is corrupt"),
    # entry 2 is cut by EOF: its missing low bytes read as zeroes
    ("cut_in_table", "offsets not monotonically increasing at index 2, image file is corrupt"),
    # entry 3 lies past EOF: it reads as 0
    ("cut_at_entry", "offsets not monotonically increasing at index 3, image file is corrupt"),
])
def test_hostile_messages(images, name, expect):
    d, _, img, _ = images["rand"]
    data, _, _, table = _table(img)
    h = d / f"m_{name}.cloop"
    h.write_bytes(_hostile(name, data, table))
    p = run_qimg("info", h.name, cwd=str(d))
    assert (p.returncode, p.stdout) == (1, b"")
    assert p.stderr == f"qemu-img: Could not open '{h.name}': {expect}\n".encode()


def test_table_past_eof_allocates_nothing(tmp_path):
    """A header naming QEMU's largest table (64 Mi entries) in a file that
    ends after it: the entries read as zeroes, the image opens with blocks
    that fail to read, and nothing of the table is held."""
    from qimg.block.image import open_image

    (tmp_path / "e.cloop").write_bytes(MAGIC.ljust(128, b"\0") + struct.pack(">II", 512, 67108863))
    # 64 MiB blocks: n_blocks * sectors per block wraps in 32 bits
    (tmp_path / "w.cloop").write_bytes(MAGIC.ljust(128, b"\0") + struct.pack(">II", 64 << 20, 32769))
    # (QEMU allocates and reads 512 MiB for e.cloop: once is enough)
    assert_same(["info", "e.cloop"], str(tmp_path))
    assert_same(["info", "w.cloop"], str(tmp_path))
    assert_same(["map", "--output=json", "w.cloop"], str(tmp_path))
    img = open_image(str(tmp_path / "e.cloop"))
    try:
        assert img.format == "cloop"
        assert img.size == 67108863 * 512
        assert len(img.driver.offsets) == 0
    finally:
        img.close()
    img = open_image(str(tmp_path / "w.cloop"))
    try:
        assert img.size == 64 << 20
    finally:
        img.close()
    p = run_qimg("convert", "-O", "raw", "w.cloop", "w.raw", cwd=str(tmp_path))
    assert (p.returncode, p.stderr) == (1, b"qemu-img: error while reading at byte 0: Input/output error\n")


# ---- the blocks themselves -------------------------------------------------------------

def test_block_decoding_matches_qemu_io(tmp_path):
    """Per block, what inflates to exactly one block reads (trailing bytes
    after the stream are ignored), anything else is EIO, as in QEMU."""
    from qimg.block.image import open_image

    bs = 4096
    good = [b"a" * bs, bytes(bs), os.urandom(bs)]
    blocks = [
        zlib.compress(good[0]),
        zlib.compress(good[1]) + b"trailing junk",
        zlib.compress(good[2], 0),
        zlib.compress(b"b" * (bs - 512)),      # too short
        zlib.compress(b"c" * (bs + 512)),      # too long
        zlib.compress(b"d" * bs)[:-1],         # checksum cut off
        zlib.compress(b"e" * bs)[2:-4],        # raw deflate, no zlib header
        b"",                                   # empty
    ]
    offsets = [TABLE + 8 * (len(blocks) + 1)]
    for b in blocks:
        offsets.append(offsets[-1] + len(b))
    img_path = tmp_path / "b.cloop"
    img_path.write_bytes(MAGIC.ljust(128, b"\0") + struct.pack(">II", bs, len(blocks))
                         + struct.pack(f">{len(offsets)}Q", *offsets) + b"".join(blocks))
    cmds = []
    for i in range(len(blocks)):
        cmds += ["-c", f"read {i * bs} {bs}"]
    # qemu-io exits 1 when a command failed
    out = subprocess.run(["qemu-io", "-r", "-f", "cloop", *cmds, str(img_path)], capture_output=True,
                         timeout=60).stdout.decode()
    qemu_ok = [f"at offset {i * bs}" in out for i in range(len(blocks))]
    assert qemu_ok == [True, True, True, False, False, False, False, False]
    img = open_image(str(img_path))
    try:
        for i in range(len(blocks)):
            try:
                data = img.read(i * bs, bs)
            except Exception as e:  # noqa: BLE001 - the error users see
                assert not qemu_ok[i]
                assert str(e) == "Input/output error"
            else:
                assert qemu_ok[i] and data == good[i]
        # a read within a block, and one across the two first blocks
        assert img.read(100, 50) == b"a" * 50
        assert img.read(bs - 10, 20) == b"a" * 10 + bytes(10)
    finally:
        img.close()


def test_last_block_is_cached(images, monkeypatch):
    from qimg.block.image import open_image

    _, raw, img_path, block = images["text"]
    data = raw.read_bytes()
    img = open_image(str(img_path))
    try:
        calls = []
        real = img.driver.file.pread
        monkeypatch.setattr(img.driver.file, "pread", lambda o, n: calls.append(o) or real(o, n))
        for off in range(0, block, 512):
            assert img.read(3 * block + off, 512) == data[3 * block + off:3 * block + off + 512]
        assert len(calls) == 1
        assert img.read(0, 4 * block) == data[:4 * block]
        assert len(calls) == 5
    finally:
        img.close()
