"""vpc (VHD) against qemu-img 7.2: create (timestamp, checksum and UUID
masked), info, map, I/O both ways, convert, hostile headers."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys

import pytest

from conftest import assert_same, needs_qemu, qemu_io_cmds, run_qemu, run_qimg

pytestmark = needs_qemu

QEMU_IO_SCRIPT = [
    "write -P 0x11 1000 5000",
    "write -P 0x22 3M 700k",
    "write -z 6M 4k",
    "write -P 0x33 8M 3",
    "write -P 0x44 2000k 200k",
    "write -P 0x55 1500 1",
]


def _masked(data: bytes) -> bytes:
    """The file with the footers' timestamp, checksum and UUID blanked (at
    the start of a dynamic image and at the end of every image)."""
    buf = bytearray(data)
    starts = {len(buf) - 512} if len(buf) >= 512 else set()
    if buf[:8] == b"conectix":
        starts.add(0)
    for s in starts:
        buf[s + 24:s + 28] = bytes(4)
        buf[s + 64:s + 84] = bytes(20)
    return bytes(buf)


def _raw(tool, path, out, fmt="vpc") -> bytes:
    p = tool("convert", "-f", fmt, "-O", "raw", str(path), str(out))
    assert p.returncode == 0, p.stderr
    return out.read_bytes()


def _fix_checksum(path) -> None:
    with open(path, "r+b") as f:
        footer = bytearray(f.read(512))
        footer[64:68] = bytes(4)
        struct.pack_into(">I", footer, 64, ~sum(footer) & 0xFFFFFFFF)
        f.seek(0)
        f.write(footer)


def _patched(src, dst, fields, fix=True) -> None:
    shutil.copy(src, dst)
    with open(dst, "r+b") as f:
        for offset, fmt, value in fields:
            f.seek(offset)
            f.write(struct.pack(fmt, value))
    if fix:
        _fix_checksum(dst)


@pytest.mark.parametrize("opts", [[], ["-o", "subformat=fixed"], ["-o", "force_size=on"],
                                  ["-o", "subformat=dynamic,force_size=on"], ["-o", "subformat=fixed,force_size"]])
@pytest.mark.parametrize("size", ["0", "1000001", "130G"])
def test_create_matches_qemu(tmp_path, opts, size):
    if size == "130G" and "subformat=fixed" in "".join(opts):
        size = "33M"  # keep fixed images small
    mine = run_qimg("create", "-f", "vpc", *opts, "q.vhd", size, cwd=tmp_path)
    theirs = run_qemu("create", "-f", "vpc", *opts, "r.vhd", size, cwd=tmp_path)
    assert mine.stdout.replace(b"q.vhd", b"r.vhd") == theirs.stdout
    assert (mine.stderr, mine.returncode) == (theirs.stderr, theirs.returncode)
    a, b = (tmp_path / "q.vhd").read_bytes(), (tmp_path / "r.vhd").read_bytes()
    assert _masked(a) == _masked(b)
    # the footer's checksum is right, its UUID random
    footer = bytearray(a[-512:])
    checksum = struct.unpack_from(">I", footer, 64)[0]
    footer[64:68] = bytes(4)
    assert ~sum(footer) & 0xFFFFFFFF == checksum
    assert a[-512 + 68:-512 + 84] != b[-512 + 68:-512 + 84]
    fmt = ["-f", "vpc"]
    cmds = [["info", "--output=json"]] + ([["info"], ["map", "--output=json"]] if size == "1000001" else [])
    for cmd in cmds:
        mine, theirs = run_qimg(*cmd, *fmt, "q.vhd", cwd=tmp_path), run_qemu(*cmd, *fmt, "r.vhd", cwd=tmp_path)
        assert mine.stdout.replace(b"q.vhd", b"r.vhd") == theirs.stdout
        assert mine.stderr.replace(b"q.vhd", b"r.vhd") == theirs.stderr
        assert mine.returncode == theirs.returncode


@pytest.mark.parametrize("size", ["511", "5M", "1000000000", "40000000000", "128G",
                                  "2040G", str(2040 * (1 << 30) + 512)])
def test_create_rounding(tmp_path, size):
    """The CHS geometry QEMU picks and the size it rounds to."""
    for opts in ([], ["-o", "force_size=on"]):
        mine = run_qimg("create", "-f", "vpc", *opts, "q.vhd", size, cwd=tmp_path)
        theirs = run_qemu("create", "-f", "vpc", *opts, "r.vhd", size, cwd=tmp_path)
        assert mine.stdout.replace(b"q.vhd", b"r.vhd") == theirs.stdout
        assert mine.stderr.replace(b"q.vhd", b"r.vhd") == theirs.stderr
        assert mine.returncode == theirs.returncode
        a, b = (tmp_path / "q.vhd").read_bytes(), (tmp_path / "r.vhd").read_bytes()
        assert _masked(a) == _masked(b)
        if theirs.returncode == 0 and not opts:
            mine, theirs = run_qimg("info", "q.vhd", cwd=tmp_path), run_qemu("info", "r.vhd", cwd=tmp_path)
            assert mine.stdout.replace(b"q.vhd", b"r.vhd") == theirs.stdout


def test_geometry_matches_qemu(tmp_path):
    """The CHS geometry and rounded size of many sizes, as qemu-img creates
    them (qimg's function called directly: one process per size is slow)."""
    import random

    from qimg.formats.vpc import rounded_image_size

    rng = random.Random(7)
    sizes = [rng.randrange(1 << 38) for _ in range(30)] + [rng.randrange(1 << 28) for _ in range(30)]
    sizes += [65535 * 16 * 63 * 512 + d for d in (-1024, -512, 0, 512)]
    sizes += [65535 * 16 * 255 * 512 + d for d in (-512, 0, 512)] + [1, 512, 17 * 4 * 512 * 1024]
    img = tmp_path / "r.vhd"
    for size in sizes:
        assert run_qemu("create", "-q", "-f", "vpc", str(img), str(size)).returncode == 0
        footer = img.read_bytes()[:512]
        current = struct.unpack_from(">Q", footer, 48)[0]
        chs = struct.unpack_from(">HBB", footer, 56)
        rounded = rounded_image_size(-(-size // 512) * 512, False)
        assert (current, chs) == (rounded[0] * 512, rounded[1:]), size
        assert rounded_image_size(rounded[0] * 512, False) == rounded


@pytest.mark.parametrize("args", [
    ["create", "-f", "vpc", "-o", "help"],
    ["create", "-f", "vpc", "x.vhd", "-o", "help"],
    ["create", "-f", "vpc", "-o", "subformat=foo", "x.vhd", "1M"],
    ["create", "-f", "vpc", "-o", "force_size=maybe", "x.vhd", "1M"],
    ["create", "-f", "vpc", "-o", "cluster_size=4k", "x.vhd", "1M"],
    ["create", "-f", "vpc", "-o", "preallocation=full", "x.vhd", "1M"],
    ["measure", "-O", "vpc", "--size", "1M"],
])
def test_create_messages(tmp_path, args):
    assert_same(args, str(tmp_path))
    if "x.vhd" in args:
        exists = (tmp_path / "x.vhd").exists()
        data = (tmp_path / "x.vhd").read_bytes() if exists else None
        (tmp_path / "x.vhd").unlink(missing_ok=True)
        run_qemu(*args, cwd=str(tmp_path))
        assert (tmp_path / "x.vhd").exists() == exists
        if exists:
            assert _masked((tmp_path / "x.vhd").read_bytes()) == _masked(data)


@pytest.mark.parametrize("opts", [[], ["-o", "subformat=fixed"]])
def test_qemu_written_image_reads_back(tmp_path, opts):
    img = tmp_path / "a.vhd"
    assert run_qemu("create", "-q", "-f", "vpc", *opts, str(img), "9M").returncode == 0
    qemu_io_cmds(img, "vpc", *QEMU_IO_SCRIPT)
    assert _raw(run_qimg, img, tmp_path / "mine.raw") == _raw(run_qemu, img, tmp_path / "theirs.raw")
    for cmd in (["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"], ["check"],
                ["compare", "-f", "vpc", "-F", "raw", "a.vhd", "theirs.raw"]):
        args = cmd if cmd[0] == "compare" else cmd + ["-f", "vpc", "a.vhd"]
        assert_same(args, str(tmp_path))
    # vpc cannot resize: qemu-img's message
    assert_same(["resize", "-f", "vpc", "a.vhd", "12M"], str(tmp_path))


@pytest.mark.parametrize("opts", [[], ["-o", "subformat=fixed"]])
def test_qimg_writes_like_qemu_io(tmp_path, opts):
    """The same writes through qimg and qemu-io give the same file."""
    from qimg.block.image import open_image

    assert run_qemu("create", "-q", "-f", "vpc", *opts, str(tmp_path / "r.vhd"), "9M").returncode == 0
    shutil.copy(tmp_path / "r.vhd", tmp_path / "q.vhd")  # the same UUID
    qemu_io_cmds(tmp_path / "r.vhd", "vpc", "write -P 0x11 1024 5120", "write -P 0x22 1536k 1024k",
                 "write -P 0x44 1200k 512", "write -P 0x66 8M 4096")
    img = open_image(str(tmp_path / "q.vhd"), "vpc", read_only=False)
    img.driver.write(1024, b"\x11" * 5120)
    img.driver.write(1536 * 1024, b"\x22" * 1024 * 1024)
    img.driver.write(1200 * 1024, b"\x44" * 512)
    img.driver.write(8 << 20, b"\x66" * 4096)
    img.close()
    assert (tmp_path / "q.vhd").read_bytes() == (tmp_path / "r.vhd").read_bytes()


def _source(tmp_path):
    src = tmp_path / "src.raw"
    data = bytearray(7 << 20)
    data[100:5000] = b"\x5a" * 4900
    data[(3 << 20) + 7:(3 << 20) + 9000] = b"\xa5" * 8993
    data[(7 << 20) - 10:] = b"\x77" * 10
    src.write_bytes(bytes(data))
    return src


@pytest.mark.parametrize("opts", [[], ["-o", "subformat=fixed"], ["-o", "force_size=on"]])
def test_convert_to_vpc_passes_qemu(tmp_path, opts):
    src = _source(tmp_path)
    p = run_qimg("convert", "-O", "vpc", *opts, str(src), str(tmp_path / "out.vhd"))
    assert p.returncode == 0, p.stderr
    theirs = run_qemu("convert", "-O", "vpc", *opts, str(src), str(tmp_path / "theirs.vhd"))
    assert theirs.returncode == 0
    assert _masked((tmp_path / "out.vhd").read_bytes()) == _masked((tmp_path / "theirs.vhd").read_bytes())
    # CHS rounds 7 MiB up: compare sees the rest as zeroes, as in qemu-img
    for cmd in (["compare", "-f", "raw", "-F", "vpc", "src.raw", "out.vhd"],
                ["compare", "-f", "vpc", "-F", "vpc", "out.vhd", "theirs.vhd"],
                ["info", "-f", "vpc", "out.vhd"], ["map", "--output=json", "-f", "vpc", "out.vhd"]):
        assert_same(cmd, str(tmp_path))
    cmp = run_qemu("compare", "-f", "raw", "-F", "vpc", str(src), str(tmp_path / "out.vhd"))
    assert cmp.returncode == 0, cmp.stdout
    assert _raw(run_qemu, tmp_path / "out.vhd", tmp_path / "back.raw")[:7 << 20] == src.read_bytes()


@pytest.mark.parametrize("opts", [[], ["-o", "subformat=fixed"]])
def test_convert_into_existing(tmp_path, opts):
    """``convert -n`` writes data and zero runs into an existing image."""
    src = _source(tmp_path)
    for name in ("q.vhd", "r.vhd"):
        assert run_qemu("create", "-q", "-f", "vpc", *opts, str(tmp_path / name), "7M").returncode == 0
        qemu_io_cmds(tmp_path / name, "vpc", "write -P 0x99 4M 1M")
    shutil.copy(tmp_path / "r.vhd", tmp_path / "q.vhd")
    for tool, name in ((run_qimg, "q.vhd"), (run_qemu, "r.vhd")):
        p = tool("convert", "-n", "-f", "raw", "-O", "vpc", str(src), str(tmp_path / name))
        assert p.returncode == 0, p.stderr
    assert (tmp_path / "q.vhd").read_bytes() == (tmp_path / "r.vhd").read_bytes()
    assert_same(["compare", "-f", "vpc", "-F", "raw", "q.vhd", "src.raw"], str(tmp_path))


# (fields to patch, fix the footer checksum): each breaks one rule of
# vpc_open and fails to open (every command opens the same way)
REFUSED = [
    ([(64, ">I", 1)], False),                                   # footer checksum
    ([(0, ">I", 0)], False),                                    # no footer at the start; the end one not fixed
    ([(16, ">Q", 0x7FFFFFFFFFFFFFFF)], True),                   # dyn header offset beyond any file
    ([(16, ">Q", 600)], True),                                  # dyn header magic
    ([(544, ">I", 3)], False),                                  # block size not a power of two
    ([(544, ">I", 0)], False),                                  # block size zero
    ([(544, ">I", 256)], False),                                # block size below a sector
    ([(544, ">I", 0x80000000)], False),                         # huge block: past the end of file
    ([(540, ">I", 0x80000000)], False),                         # negative max_table_entries
    ([(540, ">I", 0x20000000)], False),                         # max_table_entries too large
    ([(540, ">I", 0x1FFFFF81)], False),                         # table beyond one request
    ([(540, ">I", 0x1FFFFF)], False),                           # table past EOF
    ([(540, ">I", 2)], False),                                  # page table too small
    ([(528, ">Q", 0x7FFFFFFFFFFFFFF0)], False),                 # table offset beyond any file
    ([(528, ">Q", 0x10000)], False),                            # table past EOF
    ([(1536, ">I", 0x3000)], False),                            # a block past EOF
    ([(28, ">I", 0x77696E20), (48, ">Q", 0x1FE00000200)], True),    # 'win ': beyond 2040 GiB
    ([(28, ">I", 0x77696E20), (48, ">Q", 0x1FE00000000)], True),    # ... 2040 GiB: table too small
    ([(28, ">I", 0x77696E20), (48, ">Q", 0x800000000)], True),     # page table too small
]

# ... and these open: the size and contents must come out as qemu-img's
OPENED = [
    ([(1540, ">I", 0xA00 // 512)], False),                      # two entries share a block
    ([(1536, ">I", 0x1000)], False),                            # block 0 overlaps block 1
    ([(28, ">I", 0x77696E20), (48, ">Q", 0x1001)], True),          # ... odd size
    ([(28, ">I", 0x74617000), (48, ">Q", 0x1000)], True),          # 'tap\0'
    ([(28, ">I", 0x74617020), (48, ">Q", 0x1000)], True),          # 'tap ' uses CHS
    ([(56, ">I", 0xFFFF10FF), (48, ">Q", 0x3000)], True),          # largest CHS: current_size
    ([(60, ">I", 2)], True),                                       # type fixed, footer at the start
    ([(60, ">I", 4)], True),                                       # differencing: read as dynamic
]


def _hostile_base(tmp_path):
    img = tmp_path / "v.vhd"
    assert run_qemu("create", "-q", "-f", "vpc", str(img), "10M").returncode == 0
    qemu_io_cmds(img, "vpc", "write -P 1 0 1M", "write -P 2 3M 4k")
    return img


@pytest.mark.parametrize("fields,fix", REFUSED)
def test_hostile_refused(tmp_path, fields, fix):
    _patched(_hostile_base(tmp_path), tmp_path / "h.vhd", fields, fix)
    p = assert_same(["info", "-f", "vpc", "h.vhd"], str(tmp_path))
    assert p.returncode == 1 and p.stderr.startswith(b"qemu-img: Could not open 'h.vhd': ")


@pytest.mark.parametrize("fields,fix", OPENED)
def test_hostile_opened(tmp_path, fields, fix):
    _patched(_hostile_base(tmp_path), tmp_path / "h.vhd", fields, fix)
    for cmd in (["info", "h.vhd"], ["map", "--output=json", "-f", "vpc", "h.vhd"],
                ["convert", "-f", "vpc", "-O", "raw", "h.vhd", "h.raw"]):
        assert_same(cmd, str(tmp_path))
    assert _raw(run_qimg, tmp_path / "h.vhd", tmp_path / "m.raw") == (tmp_path / "h.raw").read_bytes()


def test_huge_table_past_eof(tmp_path):
    """A 2 GiB table that QEMU reads whole (slowly) to find the file
    truncated: qimg refuses it without reading."""
    _patched(_hostile_base(tmp_path), tmp_path / "h.vhd", [(540, ">I", 0x1FFFFF80)], False)
    p = run_qimg("info", "h.vhd", cwd=str(tmp_path))
    assert p.returncode == 1
    assert p.stderr == (b"qemu-img: Could not open 'h.vhd': block-vpc: free_data_block_offset points after "
                        b"the end of file. The image has been truncated.\n")


def test_hostile_fixed(tmp_path):
    img = tmp_path / "f.vhd"
    assert run_qemu("create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(img), "3M").returncode == 0
    qemu_io_cmds(img, "vpc", "write -P 1 0 1M")
    data = bytearray(img.read_bytes())
    data[-512 + 64] ^= 1
    (tmp_path / "bad.vhd").write_bytes(bytes(data))
    # a footer of 'win ' with a current_size larger than the file: reads zeroes
    data = bytearray(img.read_bytes())
    footer = bytearray(data[-512:])
    footer[28:32] = b"win "
    struct.pack_into(">Q", footer, 48, 8 << 20)
    footer[64:68] = bytes(4)
    struct.pack_into(">I", footer, 64, ~sum(footer) & 0xFFFFFFFF)
    data[-512:] = footer
    (tmp_path / "big.vhd").write_bytes(bytes(data))
    for name in ("bad.vhd", "big.vhd"):
        for cmd in (["info", "-f", "vpc", name], ["map", "--output=json", "-f", "vpc", name],
                    ["convert", "-f", "vpc", "-O", "raw", name, "o.raw"]):
            assert_same(cmd, str(tmp_path))
        if (tmp_path / "o.raw").exists():
            assert _raw(run_qimg, tmp_path / name, tmp_path / "m.raw") == (tmp_path / "o.raw").read_bytes()


def test_truncated_file(tmp_path):
    img = tmp_path / "v.vhd"
    assert run_qemu("create", "-q", "-f", "vpc", str(img), "10M").returncode == 0
    qemu_io_cmds(img, "vpc", "write -P 1 0 1M", "write -P 2 3M 4k")
    data = img.read_bytes()
    (tmp_path / "t.vhd").write_bytes(data[:100])
    assert_same(["info", "t.vhd"], str(tmp_path))  # too short to probe: raw
    for n in (100, 511, 1600, 3 << 20):
        (tmp_path / "t.vhd").write_bytes(data[:n])
        assert_same(["info", "-f", "vpc", "t.vhd"], str(tmp_path))


def test_info_does_not_import_numpy(tmp_path):
    img = tmp_path / "x.vhd"
    assert run_qemu("create", "-q", "-f", "vpc", str(img), "4M").returncode == 0
    qemu_io_cmds(img, "vpc", "write -P 1 0 4k")
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "qimg", "info", str(img)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "numpy" not in p.stderr
    assert "file format: vpc" in p.stdout


def test_large_sparse_image(tmp_path):
    """A 2040 GiB dynamic image (a million BAT entries): map and info stay
    quick and agree with qemu-img."""
    for cmd in (["create", "-q", "-f", "vpc", "big.vhd", "2040G"],):
        assert run_qemu(*cmd, cwd=str(tmp_path)).returncode == 0
    qemu_io_cmds(tmp_path / "big.vhd", "vpc", "write -P 3 1T 4k", "write -P 4 2000G 1M")
    for cmd in (["info", "big.vhd"], ["map", "--output=json", "big.vhd"], ["map", "big.vhd"]):
        assert_same(cmd, str(tmp_path))
