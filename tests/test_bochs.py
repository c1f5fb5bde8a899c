"""bochs (read-only, growing redolog images) against qemu-img 7.2: info,
map, convert, compare, check, refused writes, hostile headers.

Images come from bximage (empty, and converted from a flat image with
data) and from ``craft`` below, which writes the layout QEMU's
block/bochs.c reads: header, catalog, then per allocated extent its bitmap
and its sectors, with stale bytes in sectors whose bitmap bit is clear.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import sys

import pytest

from conftest import assert_same, needs_qemu, run_qemu, run_qimg

pytestmark = needs_qemu

needs_bximage = pytest.mark.skipif(shutil.which("bximage") is None,
                                   reason="bximage not installed (apt-get install bochs)")

SECTOR = 512
MAGIC = b"Bochs Virtual HD Image"


def craft(path, disk: int, extent: int = 4096, writes=(), *, catalog: int | None = None, bitmap: int = 512,
          version: int = 0x20000, header: int = 512, entries: dict[int, int] | None = None,
          magic: bytes = MAGIC, kind: bytes = b"Redolog", subtype: bytes = b"Growing") -> bytes:
    """Write a bochs image of ``disk`` bytes; ``writes`` are (sector, data)
    of whole sectors, allocated in order as bochs does (a new extent at the
    end of the file, its bitmap bits set for the sectors written).  Every
    sector of an allocated extent holds stale bytes first, so a clear bit
    must read as zeroes.  Returns the guest bytes QEMU should read."""
    sectors_per_extent = extent // SECTOR
    if catalog is None:
        catalog = -(-disk // extent)
    # as bochs.c computes it, in 32 bits: a bitmap size 0 is 0x800000 sectors
    bitmap_blocks = 1 + ((bitmap - 1) & 0xFFFFFFFF) // SECTOR
    extent_blocks = 1 + (extent - 1) // SECTOR
    cat = [0xFFFFFFFF] * catalog
    # each allocated extent: its bitmap sectors, then its data sectors
    # (bits past the bitmap sectors land in the data, as QEMU reads them)
    files: list[bytearray] = []
    data_at = bitmap_blocks * SECTOR
    # the guest bytes are kept for small disks only (b"" otherwise)
    guest = bytearray(disk // SECTOR * SECTOR if disk <= 64 << 20 else 0)
    for sector, data in writes:
        assert len(data) % SECTOR == 0
        for i in range(len(data) // SECTOR):
            s = sector + i
            idx, within = divmod(s, sectors_per_extent)
            if cat[idx] == 0xFFFFFFFF:
                cat[idx] = len(files)
                assert data_at <= 1 << 20, "no extent is written with a bitmap that large"
                files.append(bytearray(data_at) + b"\xee" * (extent_blocks * SECTOR))
            area = files[cat[idx]]
            area[data_at + within * SECTOR:data_at + (within + 1) * SECTOR] = data[i * SECTOR:(i + 1) * SECTOR]
            area[within // 8] |= 1 << (within % 8)
            if guest:
                guest[s * SECTOR:(s + 1) * SECTOR] = data[i * SECTOR:(i + 1) * SECTOR]
    for k, v in (entries or {}).items():
        cat[k] = v
    head = bytearray(max(header, 512))
    head[0:len(magic)] = magic
    head[32:32 + len(kind)] = kind
    head[48:48 + len(subtype)] = subtype
    struct.pack_into("<IIIII", head, 64, version, header, catalog, bitmap, extent)
    if version == 0x10000:
        struct.pack_into("<Q", head, 84, disk)
    else:
        struct.pack_into("<IQ", head, 84, 0, disk)
    with open(path, "wb") as f:
        f.write(head[:512])
        f.seek(header)
        f.write(struct.pack(f"<{catalog}I", *cat))
        for area in files:
            f.write(area)
    return bytes(guest)


def _sectors(seed: int, count: int) -> bytes:
    r = random.Random(seed)
    return r.randbytes(count * SECTOR)


#: data in some extents: whole ones, partial ones (clear bits between set
#: ones), the very last sector, written out of guest order
WRITES = [
    (100, _sectors(1, 3)),          # extent 12, sectors 4..6 of 8
    (0, _sectors(2, 8)),            # extent 0, whole
    (17, _sectors(3, 1)),           # extent 2, one sector
    (19, _sectors(4, 4)),           # extent 2 again, and into extent 2's end
    (2000, _sectors(5, 40)),        # 5 whole extents
    (20479, _sectors(6, 1)),        # the last sector of the disk
]


def _raw(tool, path, out, *opts: str) -> bytes:
    p = tool("convert", *opts, "-O", "raw", str(path), str(out))
    assert p.returncode == 0, p.stderr
    assert p.stderr == b""
    return out.read_bytes()


def _info_map(name: str, cwd, check: bool = False) -> None:
    cmds = [["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"]]
    if check:
        cmds += [["check"], ["check", "--output=json"]]
    for cmd in cmds:
        assert_same(cmd + [name], str(cwd))


@needs_bximage
def test_bximage_images(tmp_path):
    """An empty image and one converted from a flat image with data, both
    made by bximage itself."""
    run = lambda *a: subprocess.run(["bximage", *a], cwd=tmp_path, capture_output=True, check=True)
    run("-func=create", "-hd=10M", "-imgmode=growing", "-q", "empty.img")
    flat = bytearray(20 * 16 * 63 * SECTOR)
    flat[0:5000] = random.Random(7).randbytes(5000)
    flat[3 << 20:(3 << 20) + 70000] = b"\x5a" * 70000
    flat[-512:] = b"\x77" * 512
    (tmp_path / "flat.img").write_bytes(bytes(flat))
    run("-func=convert", "-imgmode=growing", "-q", "flat.img", "data.img")
    _info_map("empty.img", tmp_path, check=True)
    out = assert_same(["info", "data.img"], str(tmp_path)).stdout.decode()
    assert "file format: bochs\nvirtual size: 9.84 MiB (10321920 bytes)\n" in out
    assert_same(["map", "--output=json", "data.img"], str(tmp_path))
    assert _raw(run_qimg, tmp_path / "data.img", tmp_path / "mine.raw") == bytes(flat)
    assert _raw(run_qimg, tmp_path / "empty.img", tmp_path / "e.raw") == bytes(len(flat))
    assert assert_same(["compare", "data.img", "flat.img"], str(tmp_path)).stdout == b"Images are identical.\n"
    assert_same(["compare", "empty.img", "flat.img"], str(tmp_path))


def test_crafted_image_reads_back(tmp_path):
    img = tmp_path / "c.img"
    expected = craft(img, 10 << 20, 4096, WRITES)
    _info_map("c.img", tmp_path, check=True)
    mine = _raw(run_qimg, img, tmp_path / "mine.raw")
    assert mine == expected
    assert mine == _raw(run_qemu, img, tmp_path / "theirs.raw")
    # a stale byte of a sector whose bit is clear must not show
    assert mine[101 * SECTOR - 1] != 0xEE and mine[18 * SECTOR:19 * SECTOR] == bytes(SECTOR)
    assert _raw(run_qimg, img, tmp_path / "m.qcow2", "-O", "qcow2") and \
        run_qemu("compare", "m.qcow2", "mine.raw", cwd=tmp_path).returncode == 0
    assert assert_same(["compare", "c.img", "theirs.raw"], str(tmp_path)).returncode == 0
    assert_same(["compare", "-s", "c.img", "theirs.raw"], str(tmp_path))
    # one changed byte: both find it at the same offset
    bad = bytearray(expected)
    bad[19 * SECTOR + 7] ^= 1
    (tmp_path / "bad.raw").write_bytes(bytes(bad))
    p = assert_same(["compare", "c.img", "bad.raw"], str(tmp_path))
    assert p.returncode == 1 and p.stdout == f"Content mismatch at offset {19 * SECTOR}!\n".encode()
    assert_same(["map", "--output=json", "--start-offset=1M", "--max-length=3M", "c.img"], str(tmp_path))
    assert_same(["dd", "if=c.img", "of=dd.raw", "bs=1000", "skip=3", "count=90"], str(tmp_path))
    mine_dd = (tmp_path / "dd.raw").read_bytes()
    assert run_qemu("dd", "if=c.img", "of=dd2.raw", "bs=1000", "skip=3", "count=90", cwd=tmp_path).returncode == 0
    # qemu-img dd leaves out the zeroes at the end of its output
    assert mine_dd == (tmp_path / "dd2.raw").read_bytes() == expected[3000:3000 + len(mine_dd)]
    assert len(mine_dd) > 80000


def test_version_1_header(tmp_path):
    """v1 headers have no reserved field: the disk size is 4 bytes earlier."""
    img = tmp_path / "v1.img"
    expected = craft(img, 3 << 20, 8192, WRITES[:4], version=0x10000)
    out = assert_same(["info", "v1.img"], str(tmp_path)).stdout
    assert b"virtual size: 3 MiB (3145728 bytes)\n" in out
    assert _raw(run_qimg, img, tmp_path / "mine.raw") == expected


@pytest.mark.parametrize("extent", [512, 8 << 20])
def test_extent_sizes(tmp_path, extent):
    """One extent of 512 bytes (a bitmap of one bit), and the largest QEMU
    takes, whose bitmap (2 KiB) is longer than the 512 bytes the header
    gives it: QEMU reads the missing bits from the data area."""
    img = tmp_path / "e.img"
    spe = extent // SECTOR
    # (qemu-img reads 8 MiB extents slowly: two bitmap-byte and data reads
    # a sector, so these disks stay small)
    if extent == 512:
        writes, disk = [(0, _sectors(1, 2)), (5, _sectors(2, 1))], 7 * SECTOR
    else:
        writes, disk = [(0, _sectors(1, 2)), (spe - 9, _sectors(2, 1)), (spe - 1, _sectors(3, 1))], extent + 1536
    expected = craft(img, disk, extent, writes)
    assert _raw(run_qimg, img, tmp_path / "mine.raw") == _raw(run_qemu, img, tmp_path / "theirs.raw")
    if extent == 512:
        assert (tmp_path / "mine.raw").read_bytes() == expected
    else:
        # the bits QEMU finds in the data area make stale sectors appear
        assert b"\xee" * SECTOR in (tmp_path / "mine.raw").read_bytes()
    assert_same(["map", "--output=json", "e.img"], str(tmp_path))


def test_odd_disk_size_and_wrapped_offsets(tmp_path):
    """A disk size that is no whole number of sectors is cut down; a
    catalog offset near 4 GiB makes the 32-bit data offset wrap into the
    file, where QEMU then finds the extents; the catalog itself reads as
    zeroes past EOF (every entry is file extent 0)."""
    img = tmp_path / "w.img"
    craft(img, 1000000 + 300, 4096, [(0, _sectors(1, 4))])
    buf = bytearray(img.read_bytes())
    catalog = struct.unpack_from("<I", buf, 72)[0]
    # a catalog of 4096 entries at nearly 4 GiB: read past EOF it is all
    # zeroes (every guest extent is file extent 0), and the data offset
    # wraps to where the extents really are
    struct.pack_into("<II", buf, 68, (1 << 32) + 512 + catalog * 4 - 0x4000, 0x1000)
    (tmp_path / "wrap.img").write_bytes(bytes(buf))
    assert b"(999936 bytes)" in assert_same(["info", "w.img"], str(tmp_path)).stdout
    assert_same(["map", "--output=json", "wrap.img"], str(tmp_path))
    data = _raw(run_qimg, tmp_path / "wrap.img", tmp_path / "m.raw")
    assert data == _raw(run_qemu, tmp_path / "wrap.img", tmp_path / "t.raw")
    assert len(data) == 1000300 // SECTOR * SECTOR
    assert data[:2048] == data[8192:8192 + 2048] == _sectors(1, 4) and not any(data[2048:4096])


def test_writes_refused(tmp_path):
    craft(tmp_path / "c.img", 1 << 20, 4096, WRITES[:2])
    (tmp_path / "src.raw").write_bytes(b"\x01" * (1 << 20))
    read_only = b"qemu-img: Could not open 'c.img': Image is read-only\n"
    for args, stderr in (
            (["convert", "-n", "-O", "bochs", "src.raw", "c.img"], read_only),
            (["convert", "-n", "--target-image-opts", "src.raw", "driver=bochs,file.filename=c.img"], None),
            (["convert", "-O", "bochs", "src.raw", "new.img"],
             b"qemu-img: Format driver 'bochs' does not support image creation\n"),
            (["create", "-f", "bochs", "new.img", "1M"],
             b"qemu-img: new.img: Format driver 'bochs' does not support image creation\n"),
            (["measure", "-O", "bochs", "--size", "1M"], None),
            (["resize", "c.img", "2M"], read_only),
            (["amend", "-o", "size=2M", "c.img"], read_only),
            (["snapshot", "-c", "s", "c.img"], read_only),
            (["commit", "c.img"], read_only),
            (["rebase", "-u", "-b", "src.raw", "c.img"], read_only),
            (["bitmap", "--add", "c.img", "b"], read_only),
            (["check", "-r", "all", "c.img"], read_only),
            (["check", "-r", "leaks", "-f", "bochs", "c.img"], read_only),
            (["check", "c.img"], b"qemu-img: This image format does not support checks\n"),
            (["measure", "-O", "raw", "c.img"], b"")):
        mine = assert_same(args, str(tmp_path))
        if stderr is not None:
            assert mine.stderr == stderr, args
            assert mine.returncode == (0 if not stderr else 63 if args[0] == "check" and "-r" not in args else 1)
    assert not (tmp_path / "new.img").exists()


def test_backing_file(tmp_path):
    craft(tmp_path / "c.img", 1 << 20, 4096, WRITES[:3])
    assert run_qemu("create", "-q", "-f", "qcow2", "-b", "c.img", "-F", "bochs", str(tmp_path / "o.qcow2")
                    ).returncode == 0
    for cmd in (["info", "--backing-chain", "o.qcow2"], ["map", "--output=json", "o.qcow2"],
                ["compare", "o.qcow2", "c.img"]):
        assert_same(cmd, str(tmp_path))
    assert _raw(run_qimg, tmp_path / "o.qcow2", tmp_path / "m.raw") == _raw(run_qemu, tmp_path / "c.img",
                                                                            tmp_path / "t.raw")


def _patched(src, dst, offset: int, fmt: str, value) -> None:
    buf = bytearray(src.read_bytes())
    struct.pack_into(fmt, buf, offset, value)
    dst.write_bytes(bytes(buf))


NOT_BOCHS = "Image not in Bochs format"

# (field offset, struct format, value, the open error or None) of each
# broken header
HOSTILE = [
    (0, "<B", ord("b"), NOT_BOCHS),                 # magic
    (22, "<B", ord("!"), NOT_BOCHS),                # magic without its NUL
    (32, "<8s", b"Redolo\0\0", NOT_BOCHS),          # type
    (48, "<8s", b"Undoable", NOT_BOCHS),            # subtype
    (64, "<I", 0x30000, NOT_BOCHS),                 # version
    (72, "<I", 0x100001, "Catalog size is too large"),
    (88, "<Q", 0xFFFFFFFFFFFFFFFF, "Catalog size is too small for this disk size"),
    (80, "<I", 0, "Extent size must be at least 512"),
    (80, "<I", 513, "Extent size 513 is not a power of two"),
    (80, "<I", 0xFFFFFFFF, "Extent size 4294967295 is not a power of two"),
    (80, "<I", 16 << 20, "Extent size 16777216 is too large"),
    (72, "<I", 0x100000, None),                     # largest catalog, mostly past EOF
    (80, "<I", 8192, None),                         # every extent moves
    (76, "<I", 0, None),                            # bitmap size 0: 8M sectors of bitmap (wraps)
    (76, "<I", 100000, None),                       # bitmap larger than the file
    (68, "<I", 0xFFFFFFF0, None),                   # catalog offset far past EOF
    (88, "<Q", 511, None),                          # less than a sector: empty
    (516, "<I", 0xFFFFFFF0, None),                  # catalog entry 1 far past EOF
    (520, "<I", 0x7FFFFFFF, None),
]


@pytest.mark.parametrize("offset,fmt,value,error", HOSTILE)
def test_hostile_headers(tmp_path, offset, fmt, value, error):
    img = tmp_path / "c.img"
    craft(img, 1 << 20, 4096, WRITES[:4])
    _patched(img, tmp_path / "h.img", offset, fmt, value)
    if error is not None:
        mine = assert_same(["convert", "-f", "bochs", "-O", "raw", "h.img", "h.raw"], str(tmp_path))
        assert mine.stderr.decode() == f"qemu-img: Could not open 'h.img': {error}\n"
        assert mine.returncode == 1 and mine.stdout == b""
        # probed: the broken magics are raw, the others still bochs
        assert_same(["info", "h.img"], str(tmp_path))
        return
    for cmd in (["info", "h.img"], ["map", "--output=json", "h.img"], ["compare", "h.img", "c.img"]):
        assert_same(cmd, str(tmp_path))
    mine = _raw(run_qimg, tmp_path / "h.img", tmp_path / "h.raw")
    assert mine == _raw(run_qemu, tmp_path / "h.img", tmp_path / "t.raw")


def test_unreadable_extent(tmp_path):
    """A catalog entry whose bitmap lies beyond what the block layer
    reads (the 64-bit offset wraps past 2^63): reads fail with EIO, at the
    same byte as qemu-img's; --salvage reads the rest (zeroes: with a
    bitmap size of 0 the other extents' data lies 4 GiB apart, past EOF)."""
    stride = SECTOR * (0x800000 + 8)  # bitmap size 0: 0x800000 bitmap sectors
    entry = next(e for e in range(0xFFFFFFFE, 0, -1) if (0x400 + e * stride) % (1 << 64) > 1 << 63)
    img = tmp_path / "u.img"
    craft(img, 1 << 20, 4096, bitmap=0, entries={0: 0, 40: entry})
    for cmd in (["convert", "-O", "raw", "u.img", "u.raw"], ["compare", "u.img", "u.img"],
                ["map", "--output=json", "u.img"]):
        assert_same(cmd, str(tmp_path))
    p = run_qimg("convert", "-O", "raw", "u.img", "u.raw", cwd=tmp_path)
    assert p.returncode == 1 and p.stderr == b"qemu-img: error while reading at byte 0: Input/output error\n"
    p = assert_same(["convert", "--salvage", "-O", "raw", "u.img", "s.raw"], str(tmp_path))
    assert p.returncode == 0 and b"warning: error while reading offset 163840: Input/output error" in p.stderr
    salvaged = (tmp_path / "s.raw").read_bytes()
    assert run_qemu("convert", "--salvage", "-O", "raw", "u.img", "t.raw", cwd=tmp_path).returncode == 0
    assert salvaged == (tmp_path / "t.raw").read_bytes()
    assert len(salvaged) == 1 << 20


def test_offset_past_block_layer_limit(tmp_path):
    """A bitmap offset just below 2^63, past BDRV_MAX_LENGTH (2^63 - 1 GiB):
    the block layer refuses it (EIO) where a plain pread would read zeroes."""
    bitmap_blocks, entry = 4194297, 4294966272
    data_offset = 512 + 256 * 4
    offset = data_offset + entry * SECTOR * (8 + bitmap_blocks)
    assert ((1 << 63) - 1) & ~((1 << 30) - 1) < offset < 1 << 63
    craft(tmp_path / "l.img", 1 << 20, 4096, bitmap=bitmap_blocks * SECTOR, entries={3: entry})
    for cmd in (["convert", "-O", "raw", "l.img", "l.raw"], ["compare", "l.img", "l.img"]):
        assert_same(cmd, str(tmp_path))
    p = run_qimg("convert", "-O", "raw", "l.img", "l.raw", cwd=tmp_path)
    assert p.returncode == 1 and p.stderr == b"qemu-img: error while reading at byte 0: Input/output error\n"


def test_truncated_files(tmp_path):
    """Cut inside the header (too short to probe, and read as zeroes past
    EOF with -f), the catalog and the data."""
    img = tmp_path / "c.img"
    craft(img, 1 << 20, 4096, WRITES[:4])
    data = img.read_bytes()
    for cut in (0, 300, 1100, len(data) - 700):
        (tmp_path / "t.img").write_bytes(data[:cut])
        for cmd in (["info", "t.img"], ["convert", "-f", "bochs", "-O", "raw", "t.img", "t.raw"]):
            assert_same(cmd, str(tmp_path))


def test_info_does_not_import_numpy(tmp_path):
    img = tmp_path / "c.img"
    craft(img, 1 << 20, 4096, WRITES[:2])
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "qimg", "info", str(img)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "numpy" not in p.stderr
    assert "file format: bochs" in p.stdout


def test_large_catalog_reads_fast(tmp_path):
    """The largest catalog (1M entries of 8 MiB extents: an 8 TiB disk),
    nearly all unallocated: map and a read near the end stay cheap."""
    img = tmp_path / "big.img"
    last = (0x100000 * (8 << 20)) // SECTOR - 1
    craft(img, 0x100000 * (8 << 20), 8 << 20, [(last, _sectors(9, 1))], bitmap=2048)
    for cmd in (["info", "big.img"], ["map", "--output=json", "big.img"]):
        assert_same(cmd, str(tmp_path))
    from qimg.block.image import open_image

    with open_image(str(img), "bochs") as opened:
        assert opened.read(last * SECTOR, SECTOR) == _sectors(9, 1)
        assert opened.read(last * SECTOR - 4096, 4096) == bytes(4096)
        assert opened.read(last * SECTOR + 10, 100) == _sectors(9, 1)[10:110]
        assert opened.read(0, 1 << 20) == bytes(1 << 20)
