"""vdi against qemu-img 7.2: create (UUIDs masked), info, map, check, I/O
both ways, hostile headers."""

from __future__ import annotations

import shutil
import uuid

import pytest

from conftest import assert_same, needs_qemu, patched_copy, qemu_io_cmds, run_qemu, run_qemu_io, run_qimg

pytestmark = needs_qemu

UUID_IMAGE, UUID_SNAP = 0x188, 0x198

QEMU_IO_SCRIPT = [
    "write -P 0x11 1000 5000",
    "write -P 0x22 1500k 700k",
    "write -z 3M 4k",
    "discard 0 1M",
    "write -P 0x33 5M 3",
]


def _masked(data: bytes) -> bytes:
    """The file with its two random UUIDs blanked."""
    buf = bytearray(data)
    buf[UUID_IMAGE:UUID_SNAP + 16] = bytes(32)
    return bytes(buf)


def _raw(tool, path, out) -> bytes:
    p = tool("convert", "-f", "vdi", "-O", "raw", str(path), str(out))
    assert p.returncode == 0, p.stderr
    return out.read_bytes()


@pytest.mark.parametrize("opts", [[], ["-o", "static=on"], ["-o", "preallocation=falloc"]])
@pytest.mark.parametrize("size", ["0", "1000000", "130M"])
def test_create_matches_qemu(tmp_path, opts, size):
    mine = run_qimg("create", "-f", "vdi", *opts, "q.vdi", size, cwd=tmp_path)
    theirs = run_qemu("create", "-f", "vdi", *opts, "r.vdi", size, cwd=tmp_path)
    assert mine.stdout.replace(b"q.vdi", b"r.vdi") == theirs.stdout
    assert (mine.stderr, mine.returncode) == (theirs.stderr, theirs.returncode)
    a, b = (tmp_path / "q.vdi").read_bytes(), (tmp_path / "r.vdi").read_bytes()
    assert _masked(a) == _masked(b)
    # the UUIDs are random version 4 UUIDs, stored as VirtualBox does
    ids = [uuid.UUID(bytes_le=a[o:o + 16]) for o in (UUID_IMAGE, UUID_SNAP)]
    assert all(u.version == 4 for u in ids) and ids[0] != ids[1]
    other = run_qimg("create", "-q", "-f", "vdi", "q2.vdi", "1M", cwd=tmp_path)
    assert other.returncode == 0
    assert (tmp_path / "q2.vdi").read_bytes()[UUID_IMAGE:UUID_IMAGE + 16] != a[UUID_IMAGE:UUID_IMAGE + 16]
    assert_same(["check", "q.vdi"], str(tmp_path))


@pytest.mark.parametrize("args", [
    ["create", "-f", "vdi", "-o", "help"],
    ["create", "-f", "vdi", "x.vdi", "-o", "help"],
    ["create", "-f", "vdi", "-o", "preallocation=metadata", "x.vdi", "1M"],
    ["create", "-f", "vdi", "-o", "preallocation=bogus", "x.vdi", "1M"],
    ["create", "-f", "vdi", "-o", "static=maybe", "x.vdi", "1M"],
    ["create", "-f", "vdi", "-o", "cluster_size=4k", "x.vdi", "1M"],
    ["create", "-f", "vdi", "x.vdi", str(0x1FFFFF8000001)],
])
def test_create_messages(tmp_path, args):
    assert_same(args, str(tmp_path))


@pytest.mark.parametrize("static", ["off", "on"])
def test_qemu_written_image_reads_back(tmp_path, static):
    img = tmp_path / "a.vdi"
    assert run_qemu("create", "-q", "-f", "vdi", "-o", f"static={static}", str(img), "6M").returncode == 0
    qemu_io_cmds(img, "vdi", *QEMU_IO_SCRIPT)
    assert _raw(run_qimg, img, tmp_path / "mine.raw") == _raw(run_qemu, img, tmp_path / "theirs.raw")
    for cmd in (["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"],
                ["check"], ["check", "--output=json"], ["check", "-r", "all"], ["check", "-r", "leaks"]):
        assert_same(cmd + ["a.vdi"], str(tmp_path))
    # vdi cannot resize (no bdrv_co_truncate): the driver refuses as qemu-img
    from qimg.block.image import open_image
    from qimg.errors import QimgError

    theirs = run_qemu("resize", str(img), "8M")
    opened = open_image(str(img), "vdi", read_only=False)
    try:
        with pytest.raises(QimgError) as e:
            opened.driver.truncate(8 << 20)
    finally:
        opened.close()
    assert theirs.stderr.decode() == f"qemu-img: {e.value.message}\n"


def test_qimg_writes_like_qemu_io(tmp_path):
    """The same writes through qimg and qemu-io give the same file."""
    from qimg.block.image import open_image

    for name in ("q.vdi", "r.vdi"):
        assert run_qemu("create", "-q", "-f", "vdi", str(tmp_path / name), "6M").returncode == 0
    # both start from the same UUIDs
    shutil.copy(tmp_path / "r.vdi", tmp_path / "q.vdi")
    qemu_io_cmds(tmp_path / "r.vdi", "vdi", "write -P 0x11 1000 5000", "write -P 0x22 1500k 700k", "write -P 0x44 1200k 10")
    img = open_image(str(tmp_path / "q.vdi"), "vdi", read_only=False)
    img.driver.write(1000, b"\x11" * 5000)
    img.driver.write(1500 * 1024, b"\x22" * 700 * 1024)
    img.driver.write(1200 * 1024, b"\x44" * 10)
    img.close()
    assert (tmp_path / "q.vdi").read_bytes() == (tmp_path / "r.vdi").read_bytes()


@pytest.mark.parametrize("opts", [[], ["-o", "static=on"]])
def test_convert_to_vdi_passes_qemu(tmp_path, opts):
    src = tmp_path / "src.raw"
    data = bytearray(5 << 20)
    data[100:5000] = b"\x5a" * 4900
    data[(3 << 20) + 7:(3 << 20) + 9000] = b"\xa5" * 8993
    src.write_bytes(bytes(data))
    p = run_qimg("convert", "-O", "vdi", *opts, str(src), str(tmp_path / "out.vdi"))
    assert p.returncode == 0, p.stderr
    assert run_qemu("check", str(tmp_path / "out.vdi")).returncode == 0
    cmp = run_qemu("compare", "-f", "raw", "-F", "vdi", str(src), str(tmp_path / "out.vdi"))
    assert cmp.returncode == 0, cmp.stdout
    theirs = run_qemu("convert", "-O", "vdi", *opts, str(src), str(tmp_path / "theirs.vdi"))
    assert theirs.returncode == 0
    assert _masked((tmp_path / "out.vdi").read_bytes()) == _masked((tmp_path / "theirs.vdi").read_bytes())
    assert_same(["map", "--output=json", "out.vdi"], str(tmp_path))


# (field offset, struct format, value): each breaks one rule of vdi_open or
# of the block map that vdi_co_check verifies
HOSTILE = [
    (0x170, "<Q", 0xFFFFFFFFFFFF),        # disk larger than the map has room for
    (0x170, "<Q", 0x1FFFFF8000001),       # beyond VDI_DISK_SIZE_MAX
    (0x170, "<Q", 4000000),               # odd size: rounded up
    (0x40, "<I", 1),                      # signature
    (0x44, "<I", 0x20003),                # version
    (0x154, "<I", 0x201),                 # unaligned block map
    (0x158, "<I", 0x801),                 # unaligned data
    (0x168, "<I", 4096),                  # sector size
    (0x178, "<I", 4096),                  # block size
    (0x180, "<I", 0x40000000),            # too many blocks
    (0x180, "<I", 0x1FFFFF80),            # huge map far past EOF: reads as zeroes
    (0x1A8, "<I", 1),                     # link UUID
    (0x1B8, "<I", 1),                     # parent UUID
    (0x184, "<I", 7),                     # blocks_allocated mismatch
    (0x20C, "<I", 0),                     # map entry 3 reuses block 0
    (0x204, "<I", 9),                     # map entry 1 too large
]


@pytest.mark.parametrize("offset,fmt,value", HOSTILE)
def test_hostile_headers(tmp_path, offset, fmt, value):
    img = tmp_path / "v.vdi"
    assert run_qemu("create", "-q", "-f", "vdi", str(img), "4M").returncode == 0
    qemu_io_cmds(img, "vdi", "write -P 1 0 1M", "write -P 2 3M 4k")
    patched_copy(img, tmp_path / "h.vdi", offset, fmt, value)
    if value == 0x1FFFFF80:
        # checking every entry of a 2 GiB map would print 500 million lines
        cmds = [["info", "h.vdi"], ["map", "h.vdi"]]
    else:
        cmds = [["info", "h.vdi"], ["check", "h.vdi"], ["map", "--output=json", "h.vdi"],
                ["convert", "-O", "raw", "h.vdi", "h.raw"]]
    for cmd in cmds:
        assert_same(cmd, str(tmp_path))


def test_truncated_file(tmp_path):
    img = tmp_path / "v.vdi"
    assert run_qemu("create", "-q", "-f", "vdi", str(img), "4M").returncode == 0
    (tmp_path / "t.vdi").write_bytes(img.read_bytes()[:300])
    assert_same(["info", "t.vdi"], str(tmp_path))  # too short to probe: raw
    assert_same(["info", "-f", "vdi", "t.vdi"], str(tmp_path))


@pytest.mark.parametrize("fmt", ["vdi", "parallels"])
def test_info_does_not_import_numpy(tmp_path, fmt):
    import subprocess
    import sys

    img = tmp_path / "x.img"
    assert run_qemu("create", "-q", "-f", fmt, str(img), "4M").returncode == 0
    run_qemu_io("-f", fmt, "-c", "write -P 1 0 4k", str(img))
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "qimg", "info", str(img)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "numpy" not in p.stderr
    assert f"file format: {fmt}" in p.stdout


def test_map_cut_by_eof(tmp_path):
    """A block map that ends inside an entry: the missing bytes read as zeroes."""
    img = tmp_path / "v.vdi"
    assert run_qemu("create", "-q", "-f", "vdi", str(img), "8M").returncode == 0
    qemu_io_cmds(img, "vdi", "write -P 1 0 8M")
    (tmp_path / "c.vdi").write_bytes(img.read_bytes()[:518])
    for cmd in (["map", "--output=json", "c.vdi"], ["check", "c.vdi"], ["convert", "-O", "raw", "c.vdi", "c.raw"]):
        assert_same(cmd, str(tmp_path))
