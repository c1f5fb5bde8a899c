"""qcow2 persistent dirty bitmaps and ``qemu-img bitmap``, against qemu-img 7.2.

Each scenario runs the same command lines through qemu-img on one copy of a
set of images and through qimg on another, then compares what a user sees:
stdout, stderr (with QEMU's automatic node names made neutral), exit codes,
``qemu-img info --output=json`` and ``qemu-img check`` of the results, and
the dirty bits themselves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_qemu, run_qemu, run_qemu_io, run_qimg, set_bitmap_in_use

pytestmark = needs_qemu

SIZE = "4M"
NODE = re.compile(rb"#block\d+")


_TEMPLATE: list[Path] = []


def _setup(d: Path) -> None:
    """The images every scenario starts from, made once per session."""
    if not _TEMPLATE:
        import tempfile

        t = Path(tempfile.mkdtemp(prefix="qimg-bitmap-")) / "t"
        _make_images(t)
        _TEMPLATE.append(t)
    shutil.copytree(_TEMPLATE[0], d)


def _make_images(d: Path) -> None:
    """Made by qemu-img and qemu-io."""
    d.mkdir()
    q = lambda *a: run_qemu(*a, cwd=str(d))  # noqa: E731
    q("create", "-f", "qcow2", "c.qcow2", SIZE)
    q("bitmap", "--add", "c.qcow2", "e")
    q("bitmap", "--add", "--disable", "-g", "1M", "c.qcow2", "dis")
    q("create", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", SIZE)
    q("create", "-f", "raw", "r.raw", SIZE)
    q("create", "-f", "qcow2", "big.qcow2", "8M")
    q("bitmap", "--add", "big.qcow2", "e")
    # a source with dirty bits at a fine granularity
    q("create", "-f", "qcow2", "o.qcow2", SIZE)
    q("bitmap", "--add", "-g", "4k", "o.qcow2", "src")
    run_qemu_io("-c", "write 64k 8k", "-c", "write 3M 1k", str(d / "o.qcow2"))
    # "u": bitmap "e" left IN_USE (inconsistent), as after a crash
    q("create", "-f", "qcow2", "u.qcow2", SIZE)
    q("bitmap", "--add", "u.qcow2", "e")
    set_bitmap_in_use(d / "u.qcow2", "e")


def _bits(path: Path) -> dict[str, tuple[int, bool, list[int]]]:
    """name -> (granularity, enabled, dirty granule indexes), read by qimg."""
    from qimg.block.image import open_image

    img = open_image(str(path))
    try:
        store = img.driver.dirty_bitmaps()
        return {b.name: (b.granularity, b.enabled, [] if b.inconsistent else np.flatnonzero(b.granules()).tolist())
                for b in store.bitmaps}
    finally:
        img.close()


def _view(d: Path, names: list[str]) -> list:
    out = []
    for n in names:
        p = d / n
        if not p.exists():
            out.append(None)
            continue
        info = run_qemu("info", "--output=json", n, cwd=str(d))
        data = json.loads(info.stdout) if info.returncode == 0 else info.stderr
        if isinstance(data, dict):
            data.pop("actual-size", None)
        check = run_qemu("check", n, cwd=str(d))
        out.append((data, check.returncode, check.stdout, check.stderr))
    return out


def compare(tmp_path: Path, *args: str, files: tuple[str, ...] = ("c.qcow2",)) -> subprocess.CompletedProcess:
    a, b = tmp_path / "qemu", tmp_path / "qimg"
    _setup(a)
    _setup(b)
    theirs = run_qemu(*args, cwd=str(a))
    mine = run_qimg(*args, cwd=str(b))
    assert NODE.sub(b"#blockN", mine.stderr).decode() == NODE.sub(b"#blockN", theirs.stderr).decode()
    assert mine.stdout.decode() == theirs.stdout.decode()
    assert mine.returncode == theirs.returncode
    assert _view(b, list(files)) == _view(a, list(files))
    for f in files:
        if (a / f).exists() and f.endswith(".qcow2") and theirs.returncode == 0:
            assert _bits(b / f) == _bits(a / f)
    return mine


ERRORS = [
    ["bitmap", "c.qcow2", "b"],
    ["bitmap", "--add", "c.qcow2"],
    ["bitmap", "--add", "c.qcow2", "b", "x"],
    ["bitmap", "--remove", "-g", "64k", "c.qcow2", "e"],
    ["bitmap", "--add", "-g", "1x", "c.qcow2", "b"],
    ["bitmap", "--add", "-g", "3k", "c.qcow2", "b"],
    ["bitmap", "--add", "-g", "256", "c.qcow2", "b"],
    ["bitmap", "--add", "-g", "4G", "c.qcow2", "b"],
    ["bitmap", "--merge", "x", "-F", "qcow2", "c.qcow2", "b"],
    ["bitmap", "--add", "-b", "x", "c.qcow2", "b"],
    ["bitmap", "--add", "c.qcow2", "e"],
    ["bitmap", "--add", "--add", "c.qcow2", "n"],
    ["bitmap", "--add", "c.qcow2", ""],
    ["bitmap", "--add", "c.qcow2", "x" * 1024],
    ["bitmap", "--add", "v2.qcow2", "b"],
    ["bitmap", "--add", "-f", "raw", "r.raw", "b"],
    ["bitmap", "--add", "r.raw", "b"],
    ["bitmap", "--remove", "-f", "raw", "r.raw", "b"],
    ["bitmap", "--clear", "c.qcow2", "nob"],
    ["bitmap", "--enable", "c.qcow2", "nob"],
    ["bitmap", "--disable", "c.qcow2", "nob"],
    ["bitmap", "--remove", "c.qcow2", "nob"],
    ["bitmap", "--merge", "nob", "c.qcow2", "e"],
    ["bitmap", "--merge", "e", "c.qcow2", "nob"],
    ["bitmap", "--merge", "e", "-b", "big.qcow2", "c.qcow2", "e"],
    ["bitmap", "--merge", "e", "-b", "r.raw", "-F", "raw", "c.qcow2", "e"],
    ["bitmap", "--add", "nonexist.qcow2", "b"],
    ["bitmap", "--add", "--disabled", "c.qcow2", "b"],
    ["bitmap", "--disable", "--add", "c.qcow2", "b"],
    ["bitmap", "--remove", "--remove", "c.qcow2", "e"],
]


@pytest.mark.parametrize("args", ERRORS, ids=lambda a: " ".join(a)[:60])
def test_errors(tmp_path: Path, args: list[str]) -> None:
    p = compare(tmp_path, *args)
    assert p.returncode == 1


ACTIONS = [
    ["bitmap", "--add", "c.qcow2", "b"],
    ["bitmap", "--add", "-g", "512", "c.qcow2", "b"],
    ["bitmap", "--add", "--granularity", "2G", "c.qcow2", "b"],
    ["bitmap", "--add", "-g", "0", "c.qcow2", "b"],
    ["bitmap", "--add", "--disable", "-g", "128k", "c.qcow2", "b"],
    ["bitmap", "--add", "--remove", "--add", "c.qcow2", "b"],
    ["bitmap", "--remove", "c.qcow2", "e"],
    ["bitmap", "--remove", "c.qcow2", "dis"],
    ["bitmap", "--disable", "c.qcow2", "e"],
    ["bitmap", "--enable", "c.qcow2", "dis"],
    ["bitmap", "--clear", "c.qcow2", "e"],
    ["bitmap", "--add", "--merge", "e", "c.qcow2", "n"],
    ["bitmap", "--merge", "src", "-b", "o.qcow2", "c.qcow2", "e"],
    ["bitmap", "--merge", "src", "--source-file", "o.qcow2", "--source-format", "qcow2", "c.qcow2", "dis"],
    ["bitmap", "--merge", "src", "-b", "o.qcow2", "--clear", "c.qcow2", "e"],
    ["bitmap", "--add", "--image-opts", "driver=qcow2,file.filename=c.qcow2", "b"],
    ["bitmap", "--object", "secret,id=s0,data=x", "-f", "qcow2", "--add", "c.qcow2", "b"],
]


@pytest.mark.parametrize("args", ACTIONS, ids=lambda a: " ".join(a)[:60])
def test_actions(tmp_path: Path, args: list[str]) -> None:
    p = compare(tmp_path, *args)
    assert p.returncode == 0


def test_merge_keeps_dirty_bits(tmp_path: Path) -> None:
    """The merged bits are the source's, regranulated (4k -> 64k and 1M)."""
    compare(tmp_path, "bitmap", "--merge", "src", "-b", "o.qcow2", "c.qcow2", "dis",
            files=("c.qcow2", "o.qcow2"))
    bits = _bits(tmp_path / "qimg" / "c.qcow2")
    assert bits["dis"] == (1 << 20, False, [0, 3])
    assert bits["e"] == (65536, True, [])


@pytest.mark.parametrize("args", [
    ["bitmap", "--clear", "u.qcow2", "e"],
    ["bitmap", "--enable", "u.qcow2", "e"],
    ["bitmap", "--merge", "e", "u.qcow2", "e"],
    ["bitmap", "--merge", "e", "-b", "u.qcow2", "c.qcow2", "e"],
    ["bitmap", "--remove", "u.qcow2", "e"],
    ["bitmap", "--add", "u.qcow2", "f"],
    ["info", "u.qcow2"],
    ["info", "--output=json", "u.qcow2"],
    ["convert", "--bitmaps", "-O", "qcow2", "u.qcow2", "t.qcow2"],
    ["convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", "u.qcow2", "t.qcow2"],
], ids=lambda a: " ".join(a)[:60])
def test_inconsistent(tmp_path: Path, args: list[str]) -> None:
    compare(tmp_path, *args, files=("u.qcow2", "c.qcow2", "t.qcow2"))


@pytest.mark.parametrize("args", [
    ["info", "c.qcow2"],
    ["info", "--output=json", "c.qcow2"],
    ["convert", "--bitmaps", "-O", "qcow2", "o.qcow2", "t.qcow2"],
    ["convert", "--bitmaps", "-O", "qcow2", "c.qcow2", "t.qcow2"],
    ["convert", "--bitmaps", "-O", "qcow2", "-o", "compat=0.10", "o.qcow2", "t.qcow2"],
    ["convert", "--bitmaps", "-O", "raw", "o.qcow2", "t.raw"],
    ["convert", "--bitmaps", "-O", "qcow2", "v2.qcow2", "t.qcow2"],
    ["convert", "--bitmaps", "-O", "qcow2", "o.qcow2", "c.qcow2", "t.qcow2"],
    ["convert", "-n", "--bitmaps", "-O", "qcow2", "o.qcow2", "c.qcow2"],
], ids=lambda a: " ".join(a)[:60])
def test_info_and_convert(tmp_path: Path, args: list[str]) -> None:
    compare(tmp_path, *args, files=("c.qcow2", "t.qcow2", "t.raw"))


def test_writes_mark_enabled_bitmaps_as_qemu(tmp_path: Path) -> None:
    """Writes, zero writes and discards through qimg dirty the enabled
    bitmaps exactly as the same requests through qemu-io do; the result
    is clean for qemu-img check and qemu-img converts its bitmaps."""
    d = tmp_path
    run_qemu("create", "-f", "qcow2", str(d / "a.qcow2"), SIZE)
    run_qemu("bitmap", "--add", "-g", "4k", str(d / "a.qcow2"), "fine")
    run_qemu("bitmap", "--add", "-g", "128k", str(d / "a.qcow2"), "coarse")
    run_qemu("bitmap", "--add", "--disable", str(d / "a.qcow2"), "off")
    (d / "b.qcow2").write_bytes((d / "a.qcow2").read_bytes())
    run_qemu_io("-c", "write 5000 3000", "-c", "write -z 1M 70k", "-c", "discard 2M 64k", str(d / "a.qcow2"))

    from qimg.block.image import open_image

    img = open_image(str(d / "b.qcow2"), read_only=False)
    img.write(5000, b"x" * 3000)
    img.write_zeroes(1 << 20, 70 << 10)
    img.discard(2 << 20, 64 << 10)
    img.close()

    assert _bits(d / "b.qcow2") == _bits(d / "a.qcow2")
    assert _bits(d / "b.qcow2")["coarse"] == (131072, True, [0, 8, 16])
    assert run_qemu("check", str(d / "b.qcow2")).returncode == 0
    ours = json.loads(run_qemu("info", "--output=json", str(d / "b.qcow2")).stdout)
    theirs = json.loads(run_qemu("info", "--output=json", str(d / "a.qcow2")).stdout)
    assert ours["format-specific"] == theirs["format-specific"]
    # qemu-img reads the bitmaps qimg stored
    p = run_qemu("convert", "--bitmaps", "-O", "qcow2", str(d / "b.qcow2"), str(d / "c.qcow2"))
    assert p.returncode == 0, p.stderr
    assert _bits(d / "c.qcow2") == _bits(d / "a.qcow2")


def test_crash_leaves_bitmaps_in_use(tmp_path: Path) -> None:
    """A read-write open flags the bitmaps IN_USE before any write, as QEMU:
    a process that dies without closing leaves them inconsistent."""
    d = tmp_path
    run_qemu("create", "-f", "qcow2", str(d / "a.qcow2"), SIZE)
    run_qemu("bitmap", "--add", str(d / "a.qcow2"), "b")
    code = ("import os; from qimg.block.image import open_image; "
            f"img = open_image({str(d / 'a.qcow2')!r}, read_only=False); img.write(0, b'x' * 512); os._exit(0)")
    subprocess.run(["python3", "-c", code], check=True, env=dict(os.environ))
    info = json.loads(run_qemu("info", "--output=json", str(d / "a.qcow2")).stdout)
    assert info["format-specific"]["data"]["bitmaps"] == [
        {"flags": ["in-use", "auto"], "name": "b", "granularity": 65536}]
    mine = run_qimg("info", "--output=json", str(d / "a.qcow2"))
    assert mine.stdout == run_qemu("info", "--output=json", str(d / "a.qcow2")).stdout


def test_info_does_not_import_numpy(tmp_path: Path) -> None:
    run_qemu("create", "-f", "qcow2", str(tmp_path / "a.qcow2"), SIZE)
    run_qemu("bitmap", "--add", str(tmp_path / "a.qcow2"), "b")
    p = subprocess.run(["python3", "-X", "importtime", "-m", "qimg", "info", str(tmp_path / "a.qcow2")],
                       capture_output=True)
    assert p.returncode == 0
    assert b"bitmaps:" in p.stdout
    assert b"numpy" not in p.stderr


@pytest.mark.parametrize("patch,message", [
    # (offset in the directory entry, struct format, value)
    ((17, ">B", 40), "Bitmap 'b' doesn't satisfy the constraints"),
    ((16, ">B", 2), "Bitmap 'b' doesn't satisfy the constraints"),
    ((20, ">I", 8), "Broken bitmap directory"),
    ((8, ">I", 0), "Bitmap 'b' doesn't satisfy the constraints"),
])
def test_hostile_directory(tmp_path: Path, patch: tuple, message: str) -> None:
    """A damaged bitmap directory gets qemu-img's refusal, never a traceback."""
    import struct

    path = tmp_path / "a.qcow2"
    run_qemu("create", "-f", "qcow2", str(path), SIZE)
    run_qemu("bitmap", "--add", str(path), "b")
    with open(path, "r+b") as f:
        head = f.read(4096)
        off = 112
        while struct.unpack_from(">I", head, off)[0] != 0x23852875:
            off += 8 + ((struct.unpack_from(">I", head, off + 4)[0] + 7) & ~7)
        doff = struct.unpack_from(">Q", head, off + 8 + 16)[0]
        where, fmt, value = patch
        f.seek(doff + where)
        f.write(struct.pack(fmt, value))
    for args in (["info", str(path)], ["bitmap", "--clear", str(path), "b"]):
        mine, theirs = run_qimg(*args), run_qemu(*args)
        assert mine.returncode == theirs.returncode
        assert mine.stdout == theirs.stdout
        assert NODE.sub(b"#blockN", mine.stderr) == NODE.sub(b"#blockN", theirs.stderr)
        assert message.encode() in theirs.stderr


def _patch_ext(path: Path, field: int, fmt: str, value: int) -> None:
    """Overwrite a field of the bitmaps header extension (offset ``field``
    in its data)."""
    import struct

    with open(path, "r+b") as f:
        head = f.read(4096)
        off = 112
        while struct.unpack_from(">I", head, off)[0] != 0x23852875:
            off += 8 + ((struct.unpack_from(">I", head, off + 4)[0] + 7) & ~7)
        f.seek(off + 8 + field)
        f.write(struct.pack(fmt, value))


@pytest.mark.parametrize("field,fmt,value", [
    (4, ">I", 1),            # reserved field not zero
    (0, ">I", 0),            # zero bitmaps
    (0, ">I", 70000),        # more than QEMU's maximum
    (0, ">I", 2),            # fewer found than announced
    (16, ">Q", 12345),       # unaligned directory
    (8, ">Q", 1 << 40),      # directory too large
], ids=["reserved", "zero", "too-many", "less-found", "unaligned", "big-dir"])
def test_hostile_extension(tmp_path: Path, field: int, fmt: str, value: int) -> None:
    path = tmp_path / "a.qcow2"
    run_qemu("create", "-f", "qcow2", str(path), SIZE)
    run_qemu("bitmap", "--add", str(path), "b")
    _patch_ext(path, field, fmt, value)
    for args in (["info", str(path)], ["check", str(path)], ["bitmap", "--remove", str(path), "b"]):
        mine, theirs = run_qimg(*args), run_qemu(*args)
        assert (mine.returncode, mine.stdout, mine.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)
        assert theirs.returncode != 0


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_bitmaps_without_autoclear_bit(tmp_path: Path, compat: str) -> None:
    """An image written by a program without bitmap support (autoclear bit
    dropped) warns on every open, lists no bitmaps and leaks their clusters."""
    import struct

    path = tmp_path / "a.qcow2"
    run_qemu("create", "-f", "qcow2", str(path), SIZE)
    run_qemu("bitmap", "--add", str(path), "b")
    with open(path, "r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", 0))
        if compat == "0.10":
            f.seek(4)
            f.write(struct.pack(">I", 2))
    copy = tmp_path / "b.qcow2"
    copy.write_bytes(path.read_bytes())
    for args in (["info", "a.qcow2"], ["check", "a.qcow2"], ["info", "--output=json", "a.qcow2"]):
        mine, theirs = run_qimg(*args, cwd=str(tmp_path)), run_qemu(*args, cwd=str(tmp_path))
        assert (mine.returncode, mine.stdout, mine.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)
    if compat == "1.1":
        run_qemu("bitmap", "--add", "a.qcow2", "c", cwd=str(tmp_path))
        run_qimg("bitmap", "--add", "b.qcow2", "c", cwd=str(tmp_path))
        assert _view(tmp_path, ["b.qcow2"]) == [
            (dict(v[0], filename="b.qcow2"), *v[1:]) for v in _view(tmp_path, ["a.qcow2"])]


def _chain(d: Path) -> None:
    """base (bitmap "bb", dirty) under top (bitmap "tb" at 4k, dirty), by QEMU."""
    d.mkdir()
    q = lambda *a: run_qemu(*a, cwd=str(d))  # noqa: E731
    q("create", "-f", "qcow2", "base.qcow2", SIZE)
    q("bitmap", "--add", "base.qcow2", "bb")
    run_qemu_io("-c", "write 0 64k", str(d / "base.qcow2"))
    q("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    q("bitmap", "--add", "-g", "4k", "top.qcow2", "tb")
    q("bitmap", "--add", "--disable", "top.qcow2", "off")
    run_qemu_io("-c", "write 1M 8k", "-c", "write -z 2M 64k", str(d / "top.qcow2"))


@pytest.mark.parametrize("args", [
    ["commit", "top.qcow2"],
    ["resize", "top.qcow2", "8M"],
    ["resize", "--shrink", "top.qcow2", "2M"],
    ["rebase", "-b", "", "top.qcow2"],
    ["convert", "-n", "-O", "qcow2", "base.qcow2", "top.qcow2"],
    ["convert", "--bitmaps", "-O", "qcow2", "top.qcow2", "new.qcow2"],
    ["bitmap", "--add", "--merge", "tb", "--clear", "-g", "1k", "top.qcow2", "x"],
    ["bitmap", "--merge", "bb", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "off"],
], ids=lambda a: " ".join(a)[:60])
def test_writers_keep_bitmaps_byte_identical(tmp_path: Path, args: list[str]) -> None:
    """Commands that write into images with bitmaps leave the very bytes
    qemu-img leaves: same bits, same clusters, same directory."""
    a, b = tmp_path / "qemu", tmp_path / "qimg"
    _chain(a)
    shutil.copytree(a, b)
    theirs, mine = run_qemu(*args, cwd=str(a)), run_qimg(*args, cwd=str(b))
    assert (mine.returncode, mine.stdout, mine.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)
    for f in sorted(os.listdir(a)):
        assert (b / f).read_bytes() == (a / f).read_bytes(), f
        assert run_qemu("check", f, cwd=str(b)).returncode == 0


def test_marks_are_exact_at_every_alignment(tmp_path: Path) -> None:
    """Dirty ranges at odd offsets and lengths set exactly the granules they
    touch, survive storing, and qemu-img copies them unchanged."""
    import random

    path = tmp_path / "a.qcow2"
    run_qemu("create", "-f", "qcow2", str(path), "3000k")  # not a whole number of bytes of bits
    run_qemu("bitmap", "--add", "-g", "512", str(path), "fine")
    run_qemu("bitmap", "--add", "-g", "8k", str(path), "mid")
    from qimg.block.image import open_image

    size = 3000 << 10
    want = {"fine": np.zeros(-(-size // 512), bool), "mid": np.zeros(-(-size // 8192), bool)}
    rng = random.Random(7)
    img = open_image(str(path), read_only=False)
    for _ in range(60):
        off = rng.randrange(size)
        n = min(rng.choice([1, 511, 512, 513, 4095, 8192, 70000]), size - off)
        img.driver.dirty_bitmaps().mark(off, n)
        for name, g in (("fine", 512), ("mid", 8192)):
            want[name][off // g:-(-(off + n) // g)] = True
    for b in img.driver.dirty_bitmaps().bitmaps:
        assert np.array_equal(b.granules(), want[b.name])
    img.close()
    assert run_qemu("check", str(path)).returncode == 0
    run_qemu("convert", "--bitmaps", "-O", "qcow2", str(path), str(tmp_path / "b.qcow2"))
    got = _bits(tmp_path / "b.qcow2")
    for name, g in (("fine", 512), ("mid", 8192)):
        assert got[name] == (g, True, np.flatnonzero(want[name]).tolist())
