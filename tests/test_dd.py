"""qemu-img dd: operands, messages and exit codes, and output images,
compared with the real qemu-img on twin inputs."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from conftest import make_image, needs_qemu, run_qemu, run_qimg

pytestmark = needs_qemu


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of small input images of several formats, made once."""
    d = tmp_path_factory.mktemp("dd") / "src"
    d.mkdir()
    make_image(d / "in.raw", "1M", "write -P 0x11 0 4k", "write -P 0x22 600k 3k")
    (d / "odd.raw").write_bytes(bytes(range(256)) * 3 + b"\x7f" * 232)  # 1000 bytes
    make_image(d / "base.qcow2", "1M", "write -P 0x5a 0 768k", fmt="qcow2")
    make_image(d / "top.qcow2", "2M", "write -P 0x6b 64k 64k", "write -z 128k 64k", "write -P 0x7c 1500k 10k",
               fmt="qcow2", extra=("-b", "base.qcow2", "-F", "qcow2"))
    for fmt in ("qed", "vdi", "parallels", "qcow"):
        assert run_qemu("convert", "-O", fmt, "top.qcow2", f"conv.{fmt}", cwd=str(d)).returncode == 0
    assert run_qemu("convert", "-c", "-O", "qcow2", "top.qcow2", "comp.qcow2", cwd=str(d)).returncode == 0
    return d


@pytest.fixture
def inputs(sources: Path, tmp_path: Path) -> Path:
    """This test's own copy of the sources."""
    d = tmp_path / "src"
    shutil.copytree(sources, d)
    return d


def twins(inputs: Path) -> tuple[Path, Path]:
    """Two copies of the inputs: one for qemu-img, one for qimg."""
    q, m = inputs.parent / "q", inputs.parent / "m"
    for d in (q, m):
        if d.exists():
            shutil.rmtree(d)
    shutil.copytree(inputs, q)
    shutil.copytree(inputs, m)
    return q, m


def run_both(inputs: Path, *args: str) -> tuple[Path, Path]:
    """Run one dd command line in each twin; stdout, stderr and exit code
    must be the same."""
    q, m = twins(inputs)
    theirs = run_qemu(*args, cwd=str(q))
    mine = run_qimg(*args, cwd=str(m))
    assert mine.stderr.decode() == theirs.stderr.decode()
    assert mine.stdout.decode() == theirs.stdout.decode()
    assert mine.returncode == theirs.returncode
    return q, m


def qemu_json(*args: str) -> object:
    p = run_qemu(*args, "--output=json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def assert_same_image(theirs: Path, mine: Path, fmt: str) -> None:
    """qemu-img sees the same image: equal contents, the same info apart from
    disk size, the same map (dd writes zero blocks as data), a clean check."""
    assert run_qemu("compare", "-f", fmt, "-F", fmt, str(theirs), str(mine)).returncode == 0
    info_q, info_m = qemu_json("info", "-f", fmt, str(theirs)), qemu_json("info", "-f", fmt, str(mine))
    for info in (info_q, info_m):
        assert isinstance(info, dict)
        for key in ("actual-size", "filename", "format-specific"):
            info.pop(key, None)
    assert info_m == info_q
    assert qemu_json("map", "-f", fmt, str(mine)) == qemu_json("map", "-f", fmt, str(theirs))
    if fmt in ("qcow2", "qed", "vdi", "parallels"):
        assert run_qemu("check", "-f", fmt, str(mine)).returncode == 0
    if fmt != "vdi":  # vdi images carry a random UUID
        assert mine.read_bytes() == theirs.read_bytes()


# ---- operands, options and their messages ----------------------------------

@pytest.mark.parametrize("args", [
    [],
    ["if=in.raw"],
    ["of=o.raw"],
    ["bs=0", "if=in.raw", "of=o.raw"],
    ["bs=-1", "if=in.raw", "of=o.raw"],
    ["bs=abc", "if=in.raw", "of=o.raw"],
    ["bs=2G", "if=in.raw", "of=o.raw"],
    ["bs=1k=2", "if=in.raw", "of=o.raw"],
    ["bs=1e3", "if=in.raw", "of=o.raw"],
    ["bs=1.5", "if=in.raw", "of=o.raw"],
    ["count=-1", "if=in.raw", "of=o.raw"],
    ["count=9223372036854775808", "if=in.raw", "of=o.raw"],
    ["skip=x", "if=in.raw", "of=o.raw"],
    ["foo=1", "if=in.raw", "of=o.raw"],
    ["foo", "if=in.raw", "of=o.raw"],
    ["=x", "if=in.raw", "of=o.raw"],
    ["BS=1k", "if=in.raw", "of=o.raw"],
    ["bs=1k", "bs=x", "if=in.raw", "of=o.raw"],
    ["if=in.raw", "of=o.raw", "--", "-x"],
    ["-x", "if=in.raw", "of=o.raw"],
    ["-q", "if=in.raw", "of=o.raw"],
    ["-o", "cluster_size=4k", "if=in.raw", "of=o.raw"],
    ["-O"],
    ["-O", "foo", "if=in.raw", "of=o.raw"],
    ["-O", "bochs", "if=in.raw", "of=o.raw"],
    ["-O", "foo", "if=missing", "of=o.raw"],
    ["if=missing", "of=o.raw"],
    ["if=", "of=o.raw"],
    ["if=in.raw", "of="],
    ["if=in.raw", "of=nodir/o.raw"],
    ["-O", "qcow2", "if=in.raw", "of=nodir/o.qcow2"],
    ["if=in.raw", "of=foo:bar"],
    ["if=in.raw", "of=fat:x"],
    ["if=in.raw", "of=null-co:x"],
    ["-O", "bochs", "if=in.raw", "of=https:x"],
    ["-O", "bochs", "if=in.raw", "of=qcow2:x"],
    ["-O", "qcow", "count=0", "if=in.raw", "of=o.qcow"],
    ["-f", "qcow2", "if=in.raw", "of=o.raw"],
    ["--image-opts", "-f", "raw", "if=in.raw", "of=o.raw"],
    ["if=in.raw", "of=o.raw", "if=missing"],
    ["--object", "foo", "if=in.raw", "of=o.raw"],
    ["--object", "id=x", "if=in.raw", "of=o.raw"],
    ["--force-share=on", "if=in.raw", "of=o.raw"],
    ["--image=1", "if=in.raw", "of=o.raw"],
])
def test_refusals(inputs: Path, args: list[str]) -> None:
    q, m = run_both(inputs, "dd", *args)
    assert sorted(p.name for p in m.iterdir()) == sorted(p.name for p in q.iterdir())


def test_help(inputs: Path) -> None:
    """-h prints qemu-img's help (dd's lines as qemu-img's; the version
    and format list are qimg's own)."""
    mine, theirs = run_qimg("dd", "-h", "if=x"), run_qemu("dd", "-h", "if=x")
    assert mine.returncode == theirs.returncode == 0

    def dd_lines(text: bytes) -> list[str]:
        lines = text.decode().splitlines()
        start = lines.index("Parameters to dd subcommand:")
        return [ln for ln in lines if ln.startswith("  dd ")] + lines[start:start + 7]

    assert dd_lines(mine.stdout) == dd_lines(theirs.stdout)


# ---- what gets copied -----------------------------------------------------

@pytest.mark.parametrize("operands", [
    [],
    ["bs=4k"],
    ["bs=1.5k"],
    ["bs=1000"],
    ["bs=64k", "count=2", "skip=1"],  # count counts from the start, not after skip
    ["bs=64k", "count=20", "skip=3"],
    ["bs=1000", "skip=1"],
    ["bs=1000", "count=1k"],
    ["bs=64K", "count=100"],
    ["bs=1k", "count=1k", "skip=1k"],  # skip to exactly the end: empty, no warning
    ["bs=1k", "skip=1025"],  # past the end: a warning, an empty output, success
    ["bs=1k", "skip=9223372036854775807"],
    ["bs=1k", "count=9223372036854775807"],
    ["count=0"],
    ["bs=3M"],
    ["bs=0x200", "skip=0x10"],
    ["bs=0.5k", "count=1.5k"],
    ["bs=+512b", "count=100"],
])
def test_raw_copies(inputs: Path, operands: list[str]) -> None:
    q, m = run_both(inputs, "dd", *operands, "if=in.raw", "of=o.raw")
    assert_same_image(q / "o.raw", m / "o.raw", "raw")


@pytest.mark.parametrize("fmt, operands", [
    (fmt, ops) for fmt in ("raw", "qcow2", "qed", "vdi", "parallels", "qcow")
    for ops in (["bs=100", "count=1"], [])
] + [("qcow", ["count=0"]), ("qcow2", ["count=0"]), ("raw", ["bs=1000", "count=1"])])
def test_odd_sizes(inputs: Path, fmt: str, operands: list[str]) -> None:
    """A 1000-byte raw input reads as 1024 bytes; output sizes that are not
    whole sectors are rounded by the format (or refused, by qcow, for 0)."""
    q, m = run_both(inputs, "dd", "-O", fmt, *operands, "if=odd.raw", f"of=o.{fmt}")
    assert (m / f"o.{fmt}").exists() == (q / f"o.{fmt}").exists()
    if fmt == "qcow" and operands == ["count=0"]:
        assert (m / "o.qcow").stat().st_size == (q / "o.qcow").stat().st_size == 0  # created, then refused
    else:
        assert_same_image(q / f"o.{fmt}", m / f"o.{fmt}", fmt)


@pytest.mark.parametrize("source, fmt", [
    (src, "raw") for src in ("top.qcow2", "comp.qcow2", "conv.qed", "conv.vdi", "conv.parallels", "conv.qcow")
] + [
    ("top.qcow2", fmt) for fmt in ("qcow2", "qed", "vdi", "parallels", "qcow", "file")
] + [("comp.qcow2", "qed"), ("conv.qed", "qcow2"), ("conv.vdi", "parallels"), ("in.raw", "qcow")])
def test_formats(inputs: Path, source: str, fmt: str) -> None:
    """Every input format qimg reads (qcow2 over a shorter backing file,
    compressed, zero clusters) into every output format qimg creates."""
    q, m = run_both(inputs, "dd", "-O", fmt, "bs=5k", "skip=3", "count=350", f"if={source}", "of=out")
    assert_same_image(q / "out", m / "out", "raw" if fmt == "file" else fmt)


def test_default_block_size_whole_image(inputs: Path) -> None:
    q, m = run_both(inputs, "dd", "-O", "qed", "if=top.qcow2", "of=o.qed")
    assert_same_image(q / "o.qed", m / "o.qed", "qed")


def test_options(inputs: Path) -> None:
    """-f, -U, --image-opts, --object, the last -O wins, file: prefix."""
    for args, out, fmt in [
        (["-f", "qcow2", "-U", "if=top.qcow2", "of=o1"], "o1", "raw"),
        (["--image-opts", "if=driver=qcow2,file.filename=top.qcow2", "of=o2"], "o2", "raw"),
        (["--object", "secret,id=s0,data=x", "if=in.raw", "of=o3"], "o3", "raw"),
        (["-O", "raw", "-O", "qcow2", "if=in.raw", "of=o4"], "o4", "qcow2"),
        (["if=in.raw", "of=file:o5", "bs=8k"], "o5", "raw"),
        (["if=in.raw", "--force-share", "of=o6", "-O", "qed"], "o6", "qed"),
    ]:
        q, m = run_both(inputs, "dd", *args)
        assert_same_image(q / out, m / out, fmt)


def test_existing_output_is_replaced(inputs: Path) -> None:
    (inputs / "o.raw").write_bytes(b"\xee" * (3 << 20))
    make_image(inputs / "o.qcow2", "4M", "write -P 0x99 0 4M", fmt="qcow2")
    q, m = run_both(inputs, "dd", "bs=64k", "count=3", "if=in.raw", "of=o.raw")
    assert_same_image(q / "o.raw", m / "o.raw", "raw")
    assert (m / "o.raw").stat().st_size == 3 << 16
    q, m = run_both(inputs, "dd", "-O", "qcow2", "if=top.qcow2", "of=o.qcow2")
    assert_same_image(q / "o.qcow2", m / "o.qcow2", "qcow2")


def test_output_is_input(inputs: Path) -> None:
    """qemu-img creates the output first: dd onto its own input zeroes it."""
    q, m = run_both(inputs, "dd", "if=in.raw", "of=in.raw")
    assert (m / "in.raw").read_bytes() == (q / "in.raw").read_bytes()


def _damage_compressed(path: Path, index: int) -> None:
    """Overwrite the data of the ``index``-th L2 entry's compressed cluster."""
    with open(path, "r+b") as f:
        header = f.read(104)
        l1 = struct.unpack_from(">Q", header, 40)[0]
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2 + 8 * index)
        entry = struct.unpack(">Q", f.read(8))[0]
        assert entry >> 62 & 1, "not a compressed cluster"
        f.seek(entry & ((1 << 54) - 1))
        f.write(b"\xff" * 300)


@pytest.mark.parametrize("bs", ["4k", "1000", "512k"])
def test_read_error_keeps_blocks_before_it(inputs: Path, bs: str) -> None:
    """A read error stops the copy with qemu-img's message; the blocks read
    before it are in the output, as qemu-img leaves them."""
    make_image(inputs / "data.qcow2", "1M", "write -P 0x31 0 1M", fmt="qcow2")
    assert run_qemu("convert", "-c", "-O", "qcow2", "data.qcow2", "bad.qcow2", cwd=str(inputs)).returncode == 0
    _damage_compressed(inputs / "bad.qcow2", 9)
    q, m = run_both(inputs, "dd", f"bs={bs}", "if=bad.qcow2", "of=o.raw")
    assert b"error while reading from input image file" in run_qimg("dd", "if=bad.qcow2", "of=x",
                                                                    cwd=str(m)).stderr
    assert (m / "o.raw").read_bytes() == (q / "o.raw").read_bytes()


# ---- the library ------------------------------------------------------------

def test_api(inputs: Path) -> None:
    from qimg import api
    from qimg.errors import QimgError

    warnings: list[str] = []
    out = inputs / "api.qcow2"
    assert api.dd(str(inputs / "in.raw"), str(out), out_format="qcow2", bs=4096, count=100, skip=10,
                   warn=warnings.append) == 90 * 4096
    assert warnings == []
    assert run_qemu("dd", "-O", "qcow2", "bs=4k", "count=100", "skip=10", "if=in.raw", "of=ref.qcow2",
                    cwd=str(inputs)).returncode == 0
    assert_same_image(inputs / "ref.qcow2", out, "qcow2")
    assert api.dd(str(inputs / "in.raw"), str(inputs / "e.raw"), skip=1 << 40, warn=warnings.append) == 0
    assert warnings == [f"{inputs / 'in.raw'}: cannot skip to specified offset"]
    with pytest.raises(QimgError, match="Invalid count specified"):
        api.dd(str(inputs / "in.raw"), str(inputs / "e.raw"), count=-1)


@pytest.mark.parametrize("bs", ["1000", "48k", "100k", "300k"])
@pytest.mark.parametrize("fmt", ["qed", "qcow2", "vdi"])
def test_request_sizes(inputs: Path, monkeypatch: pytest.MonkeyPatch, bs: str, fmt: str) -> None:
    """With small request limits, every way of cutting requests (many blocks
    per request, a block alone at each isolated offset, blocks larger than a
    request, blocks larger than BIG_BLOCK in pieces) gives qemu-img's image
    (shrunk from MiB to KiB; qed tables still follow the data they index)."""
    from qimg.ops import dd as dd_mod
    from qimg.units import parse_size

    monkeypatch.setattr(dd_mod, "CHUNK", 64 << 10)
    monkeypatch.setattr(dd_mod, "ISOLATE", 16 << 10)
    monkeypatch.setattr(dd_mod, "BIG_BLOCK", 128 << 10)
    size = parse_size(bs)
    mine = inputs / "mine"
    dd_mod.dd(str(inputs / "top.qcow2"), str(mine), out_format=fmt, bs=size, skip=1)
    assert run_qemu("dd", "-O", fmt, f"bs={bs}", "skip=1", "if=top.qcow2", "of=ref", cwd=str(inputs)).returncode == 0
    if size > 128 << 10 and fmt == "qed":
        # pieces of an over-large block: same contents, tables may sit elsewhere
        assert run_qemu("compare", str(inputs / "ref"), str(mine)).returncode == 0
    else:
        assert_same_image(inputs / "ref", mine, fmt)


def test_segments() -> None:
    """Requests are cut around the block holding each multiple of ISOLATE
    (1 MiB): 1048576 lies in the 1000-byte block [1048000, 1049000)."""
    from qimg.ops.dd import _segments

    assert _segments(1049000, 4096, 512) == [(1049000, 4096)]
    assert _segments(1045576, 10000, 1000) == [(1045576, 2424), (1048000, 1000), (1049000, 6576)]
    assert _segments(0, 8192, 4096) == [(0, 4096), (4096, 4096)]


@pytest.mark.parametrize("args", [
    ["if=top.qcow2", "of=base.qcow2"],  # a backing file in use
    ["if=conv.qed", "of=conv.qed"],
    ["-O", "qcow2", "if=in.raw", "of=in.raw"],  # raw nodes share write access
    ["-U", "if=top.qcow2", "of=base.qcow2"],
    ["-U", "-O", "qcow2", "if=top.qcow2", "of=top.qcow2"],
    ["-f", "raw", "if=conv.vdi", "of=conv.vdi"],
])
def test_output_in_use_by_input(inputs: Path, args: list[str]) -> None:
    """qemu-img holds its input open while creating the output: a format
    node's file (not a raw node's, nor with -U) cannot be written over."""
    q, m = run_both(inputs, "dd", *args)
    out = args[-1][3:]
    if "in.raw" not in args[-1]:
        # (qcow2 written over its own raw input copies its growing self: the
        # bytes depend on qemu-img's request sizes; only the outcome is checked)
        assert (m / out).read_bytes() == (q / out).read_bytes()


@pytest.mark.parametrize("fmt", ["qcow2", "parallels", "vdi", "qed"])
def test_output_too_large(inputs: Path, fmt: str) -> None:
    """An 8 PiB input: the output format refuses the size with the driver's
    own error (not qemu-img create's rewording of -EFBIG)."""
    assert run_qemu("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "huge.qcow2", "8P",
                    cwd=str(inputs)).returncode == 0
    q, m = run_both(inputs, "dd", "-O", fmt, "bs=1G", "count=8M", "if=huge.qcow2", f"of=o.{fmt}")
    assert sorted(p.name for p in m.iterdir()) == sorted(p.name for p in q.iterdir())
