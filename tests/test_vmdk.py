"""vmdk against qemu-img 7.2: info (human, JSON), map, convert -O raw on
images qemu-img and qemu-io make (monolithicSparse, streamOptimized,
descriptor files with flat and sparse extents, a parent), hostile headers,
and the refusals (create, writes)."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys

import pytest

from conftest import assert_same, make_image, needs_qemu, qemu_io_cmds, run_qemu, run_qimg

pytestmark = needs_qemu

SCRIPT = [
    "write -P 0x11 1000 5000",
    "write -P 0x22 3M 700k",
    "write -z 6M 64k",
    "write -P 0x33 8M 3",
    "write -P 0x44 2000k 200k",
    "write -P 0x55 130k 1",
]


def _same_raw(path, tmp_path) -> None:
    """``path`` converted to raw by both programs: the same bytes (compared
    by qemu-img compare, which skips holes)."""
    mine, theirs = tmp_path / "mine.raw", tmp_path / "theirs.raw"
    for tool, out in ((run_qimg, mine), (run_qemu, theirs)):
        p = tool("convert", "-O", "raw", str(path), str(out))
        assert p.returncode == 0, p.stderr
    assert mine.stat().st_size == theirs.stat().st_size
    p = run_qemu("compare", "-f", "raw", "-F", "raw", str(mine), str(theirs))
    assert p.returncode == 0, p.stdout
    mine.unlink()
    theirs.unlink()


def _compare_all(tmp_path, name):
    for args in (["info", name], ["info", "--output=json", name], ["map", "--output=json", name],
                 ["info", "--backing-chain", name]):
        assert_same(args, str(tmp_path))
    _same_raw(tmp_path / name, tmp_path)


@pytest.mark.parametrize("opts", [[], ["-o", "zeroed_grain=on"], ["-o", "compat6=on"],
                                  ["-o", "subformat=monolithicFlat"],
                                  ["-o", "subformat=twoGbMaxExtentSparse"],
                                  ["-o", "subformat=twoGbMaxExtentFlat"]])
def test_qemu_images_read(tmp_path, opts):
    make_image(tmp_path / "a.vmdk", "10M", *SCRIPT, "write -z 512k 1M", fmt="vmdk", extra=tuple(opts))
    _compare_all(tmp_path, "a.vmdk")


def test_multi_extent_sparse(tmp_path):
    # 2 GiB extents: data on both sides of the first boundary
    make_image(tmp_path / "t.vmdk", "5G", "write -P 0x66 2047M 2M", "write -P 0x77 4G 4k", fmt="vmdk",
               extra=("-o", "subformat=twoGbMaxExtentSparse"))
    _compare_all(tmp_path, "t.vmdk")


def test_stream_optimized(tmp_path):
    src = make_image(tmp_path / "a.vmdk", "10M", *SCRIPT, fmt="vmdk")
    p = run_qemu("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, str(tmp_path / "s.vmdk"))
    assert p.returncode == 0
    _compare_all(tmp_path, "s.vmdk")
    assert_same(["map", "s.vmdk"], str(tmp_path))


def test_parent(tmp_path):
    make_image(tmp_path / "base.vmdk", "10M", *SCRIPT, fmt="vmdk")
    make_image(tmp_path / "ov.vmdk", "10M", "write -P 0x99 3M 64k", "write -P 0x98 9M 4k", fmt="vmdk",
               extra=("-b", "base.vmdk", "-F", "vmdk"))
    _compare_all(tmp_path, "ov.vmdk")


# ---- hostile headers --------------------------------------------------------
def _base(tmp_path):
    return make_image(tmp_path / "b.vmdk", "10M", "write -P 0x11 0 100k", fmt="vmdk")


def _patch(path, fields):
    with open(path, "r+b") as f:
        for offset, fmt, value in fields:
            f.seek(offset)
            f.write(struct.pack(fmt, value) if fmt else value)


HOSTILE = [
    [(4, "<I", 4)],                        # version
    [(4, "<I", 3)],                        # version 3: read-only is fine
    [(44, "<I", 513)],                     # L2 table size too big
    [(44, "<I", 0)],                       # L1 entry size is invalid
    [(20, "<Q", 1 << 23)],                 # 512 * granularity wraps to 0
    [(20, "<Q", 0x200001)],                # Invalid granularity
    [(12, "<Q", 1 << 40), (20, "<Q", 1)],  # L1 size too big
    [(64, "<Q", 1 << 40)],                 # File truncated
    [(56, "<Q", (1 << 64) - 1)],           # GD at end, no footer
    [(56, "<Q", 1 << 30)],                 # GD past the end: nothing allocated
    [(8, "<I", 2), (48, "<Q", 1 << 30)],   # redundant GD past the end
    [(12, "<Q", 1 << 25)],                 # capacity beyond the GD's tables
    [(0x200, "", b"# no cids here\0")],    # descriptor without CID
    [(0x200, "", b"CID=zz\nparentCID=ffffffff\n\0")],
    [(12, "<Q", 0), (28, "<Q", 1)],        # capacity 0: descriptor at sector 1
]


@pytest.mark.parametrize("fields", HOSTILE)
def test_hostile(tmp_path, fields):
    _patch(_base(tmp_path), fields)
    for args in (["info", "--output=json", "b.vmdk"], ["map", "--output=json", "b.vmdk"]):
        assert_same(args, str(tmp_path))
    mine = run_qimg("convert", "-O", "raw", "b.vmdk", "m.raw", cwd=str(tmp_path))
    theirs = run_qemu("convert", "-O", "raw", "b.vmdk", "t.raw", cwd=str(tmp_path))
    assert (mine.returncode, mine.stderr) == (theirs.returncode, theirs.stderr)
    if theirs.returncode == 0:
        _same_raw(tmp_path / "b.vmdk", tmp_path)


@pytest.mark.parametrize("text", [
    b"",
    b"ab",
    b"version=1\n# nothing\n",
    b"version=1\ncreateType=\"foo\"\n",
    b"version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"x.raw\"\n",
    b"version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"missing.raw\" 0\n",
    b"version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"x.raw\" 0\n"
    b"RW 50 FLAT \"x.raw\" 80\nRDONLY 7 FLAT \"x.raw\" 0\nRW 0 FLAT \"x.raw\" 0\n",
    b"version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 100 VMFS \"x.raw\" 3\n",
    b"version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\nRW 100 SPARSE \"x.raw\"\n",
])
def test_hostile_descriptor(tmp_path, text):
    (tmp_path / "x.raw").write_bytes(bytes(range(256)) * 200)
    (tmp_path / "d.vmdk").write_bytes(text)
    for args in (["info", "-f", "vmdk", "d.vmdk"], ["info", "-f", "vmdk", "--output=json", "d.vmdk"],
                 ["map", "-f", "vmdk", "--output=json", "d.vmdk"]):
        assert_same(args, str(tmp_path))


def test_bad_compressed_grain(tmp_path):
    src = make_image(tmp_path / "a.vmdk", "1M", "write -P 0x11 0 1M", fmt="vmdk")
    assert run_qemu("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src,
                    str(tmp_path / "s.vmdk")).returncode == 0
    data = bytearray((tmp_path / "s.vmdk").read_bytes())
    at = data.index(b"\x78", 0x10000)  # the first zlib stream
    data[at:at + 8] = b"\xff" * 8
    (tmp_path / "s.vmdk").write_bytes(bytes(data))
    mine = run_qimg("convert", "-O", "raw", "s.vmdk", "m.raw", cwd=str(tmp_path))
    theirs = run_qemu("convert", "-O", "raw", "s.vmdk", "t.raw", cwd=str(tmp_path))
    assert mine.returncode == theirs.returncode != 0
    assert b"Traceback" not in mine.stderr


# ---- create and write (monolithicSparse) ------------------------------------
def _masked(data: bytes) -> tuple[bytes, bytes, bytes]:
    """The image with its random CID (in the descriptor at 0x200) blanked:
    header, descriptor text (the rest of its area must be zeroes), the rest."""
    area = data[0x200:0x200 + DESC_SIZE]
    text = area.split(b"\0", 1)[0]
    assert area[len(text):] == bytes(len(area) - len(text))
    text = re.sub(rb"\nCID=[0-9a-f]+\n", b"\nCID=X\n", text, count=1)
    return data[:0x200], text, data[0x200 + DESC_SIZE:]


DESC_SIZE = 20 * 512


@pytest.mark.parametrize("opts", [[], ["-o", "zeroed_grain=on"], ["-o", "adapter_type=lsilogic,compat6=on"],
                                  ["-o", "hwversion=7,toolsversion=5,adapter_type=buslogic"]])
@pytest.mark.parametrize("size", ["1000001", "3G"])
def test_create_matches_qemu(tmp_path, opts, size):
    mine = run_qimg("create", "-f", "vmdk", *opts, "i.vmdk", size, cwd=str(tmp_path / ".."))
    (tmp_path / ".." / "i.vmdk").replace(tmp_path / "q.vmdk")
    theirs = run_qemu("create", "-f", "vmdk", *opts, "i.vmdk", size, cwd=str(tmp_path / ".."))
    (tmp_path / ".." / "i.vmdk").replace(tmp_path / "r.vmdk")
    assert (mine.stdout, mine.stderr, mine.returncode) == (theirs.stdout, theirs.stderr, theirs.returncode)
    assert _masked((tmp_path / "q.vmdk").read_bytes()) == _masked((tmp_path / "r.vmdk").read_bytes())


@pytest.mark.parametrize("args", [["-o", "subformat=monolithicFlat"], ["-o", "subformat=streamOptimized"],
                                  ["-o", "subformat=nope"], ["-o", "adapter_type=scsi"],
                                  ["-o", "compat6=on,hwversion=7"], ["-b", "b.vmdk", "-F", "vmdk"]])
def test_create_refusals_clean(tmp_path, args):
    _base(tmp_path)
    p = run_qimg("create", "-f", "vmdk", *args, "n.vmdk", "1M", cwd=str(tmp_path))
    assert p.returncode == 1
    assert b"Traceback" not in p.stderr


@pytest.mark.parametrize("opts", [[], ["-o", "zeroed_grain=on"]])
def test_convert_to_vmdk_passes_qemu(tmp_path, opts):
    src = make_image(tmp_path / "a.raw", "10M", *SCRIPT)
    for tool, name in ((run_qimg, "q.vmdk"), (run_qemu, "r.vmdk")):
        p = tool("convert", "-O", "vmdk", *opts, src, str(tmp_path / name))
        assert p.returncode == 0, p.stderr
    p = run_qemu("check", str(tmp_path / "q.vmdk"))
    assert p.returncode == 0, p.stdout
    assert run_qemu("compare", "-f", "raw", "-F", "vmdk", src, str(tmp_path / "q.vmdk")).returncode == 0
    # the same file as qemu-img makes, but for the random CID
    mine, theirs = _masked((tmp_path / "q.vmdk").read_bytes()), _masked((tmp_path / "r.vmdk").read_bytes())
    assert (mine[0], mine[1].replace(b"q.vmdk", b"r.vmdk"), mine[2]) == theirs


@pytest.mark.parametrize("opts", [[], ["-o", "zeroed_grain=on"]])
def test_convert_into_existing(tmp_path, opts):
    # partial grains over allocated, unallocated and zeroed grains
    make_image(tmp_path / "t.vmdk", "10M", "write -P 0x77 0 256k", "write -z 1M 128k", fmt="vmdk",
               extra=tuple(opts))
    src = make_image(tmp_path / "s.raw", "10M", "write -P 0x11 1000 5000", "write -P 0x22 1040k 3000",
                     "write -P 0x33 9M 100k")
    cid = json.loads(run_qemu("info", "--output=json", str(tmp_path / "t.vmdk")).stdout)["format-specific"]
    p = run_qimg("convert", "-n", "-O", "vmdk", src, str(tmp_path / "t.vmdk"))
    assert p.returncode == 0, p.stderr
    # the first write gives the image a new CID (vmdk_write_cid)
    assert json.loads(run_qemu("info", "--output=json", str(tmp_path / "t.vmdk")).stdout)["format-specific"] != cid
    assert run_qemu("check", str(tmp_path / "t.vmdk")).returncode == 0
    assert run_qemu("compare", "-f", "raw", "-F", "vmdk", src, str(tmp_path / "t.vmdk")).returncode == 0
    _compare_all(tmp_path, "t.vmdk")


@pytest.mark.parametrize("sub", ["streamOptimized", "monolithicFlat"])
def test_write_refused_clean(tmp_path, sub):
    src = make_image(tmp_path / "a.raw", "1M", "write -P 0x11 0 64k")
    assert run_qemu("convert", "-O", "vmdk", "-o", f"subformat={sub}", src, str(tmp_path / "t.vmdk")).returncode == 0
    before = (tmp_path / "t.vmdk").read_bytes()
    p = run_qimg("convert", "-n", "-O", "vmdk", src, str(tmp_path / "t.vmdk"))
    assert p.returncode == 1
    assert b"Traceback" not in p.stderr
    assert (tmp_path / "t.vmdk").read_bytes() == before


def test_info_does_not_import_numpy(tmp_path):
    _base(tmp_path)
    code = ("import sys; sys.argv = ['qemu-img', 'info', 'b.vmdk']; from qimg.cli.main import main; main(); "
            "assert 'numpy' not in sys.modules")
    p = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True)
    assert p.returncode == 0, p.stderr


def test_large_sparse_image(tmp_path):
    make_image(tmp_path / "big.vmdk", "100G", "write -P 0x5a 70G 64k", "write -P 0x5b 5M 128k", fmt="vmdk")
    assert_same(["map", "--output=json", "big.vmdk"], str(tmp_path))
    qemu_io_cmds(tmp_path / "big.vmdk", "vmdk", "read -P 0x5a 70G 64k")
