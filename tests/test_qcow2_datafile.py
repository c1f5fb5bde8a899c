"""qcow2 external data files (data_file=, data_file_raw=): every command is
run by qimg and by qemu-img on identical directories, and what the user sees
(output, exit code) and the files left behind must be the same."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest

from conftest import needs_qemu, run_qemu, run_qemu_io, run_qimg

pytestmark = needs_qemu

Setup = Callable[[Path], None]


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def both(tmp_path: Path, setup: Setup, *args: str, then: tuple[tuple[str, ...], ...] = (),
         files: bool = True, cwd: str = "") -> tuple[bytes, bytes, int]:
    """Run ``args`` (and the command lines ``then`` after it) in two
    directories prepared alike, by qimg and by qemu-img; assert equal
    output, exit codes and (with ``files``) resulting files.  Returns the
    first command's stdout, stderr and exit code."""
    results = []
    for name, run in (("qimg", run_qimg), ("qemu", run_qemu)):
        d = tmp_path / name
        d.mkdir(parents=True)
        setup(d)
        out = []
        for cmd in (args, *then):
            p = run(*cmd, cwd=str(d / cwd))
            out.append((cmd, p.stdout.decode(), p.stderr.decode(), p.returncode))
        results.append((out, _files(d) if files else None))
    mine, theirs = results
    assert mine[0] == theirs[0]
    if files:
        assert sorted(mine[1]) == sorted(theirs[1])
        for key in mine[1]:
            assert mine[1][key] == theirs[1][key], key
    first = mine[0][0]
    return first[1].encode(), first[2].encode(), first[3]


def both_all(tmp_path: Path, setup: Setup, cmds: list[tuple[str, ...]]) -> None:
    both(tmp_path, setup, *cmds[0], then=tuple(cmds[1:]))


def _qemu(d: Path, *args: str) -> None:
    p = run_qemu(*args, cwd=str(d))
    assert p.returncode == 0, p.stderr


def image(raw: str = "off", size: str = "1M", *cmds: str, name: str = "img.qcow2",
          data: str = "data.raw") -> Setup:
    """qemu-img creates an image with a data file; qemu-io writes ``cmds``."""
    def setup(d: Path) -> None:
        _qemu(d, "create", "-q", "-f", "qcow2", "-o", f"data_file={data},data_file_raw={raw}", name, size)
        if cmds:
            # (the data file name is relative to the current directory)
            run_qemu_io("-f", "qcow2", *[a for c in cmds for a in ("-c", c)], name, cwd=str(d))
    return setup


WRITES = ("write -P 3 0 128k", "write -P 4 900k 4k", "write -z 256k 64k", "write -z -u 384k 64k",
          "discard 64k 64k", "write -P 5 200k 1k")


def _nothing(d: Path) -> None:
    pass


# ---- create ------------------------------------------------------------------------
@pytest.mark.parametrize("prealloc,raw,size", [
    ("off", "off", "1M"), ("off", "on", "1000k"), ("metadata", "off", "1000k"), ("metadata", "on", "1M"),
    ("falloc", "off", "1M"), ("falloc", "on", "1000k"), ("full", "off", "1000k"), ("full", "on", "1M"),
])
def test_create_identical(tmp_path: Path, prealloc: str, raw: str, size: str) -> None:
    both(tmp_path, _nothing, "create", "-f", "qcow2",
         "-o", f"data_file=d.raw,data_file_raw={raw},preallocation={prealloc}", "a.qcow2", size)


def test_create_options_and_empties_existing_data_file(tmp_path: Path) -> None:
    def setup(d: Path) -> None:
        (d / "d.raw").write_bytes(b"\x07" * (2 << 20))
    both(tmp_path, setup, "create", "-f", "qcow2",
         "-o", "data_file=d.raw,cluster_size=4k,lazy_refcounts=on,refcount_bits=8,compression_type=zstd",
         "a.qcow2", "3M")


def _base(d: Path) -> None:
    _qemu(d, "create", "-q", "-f", "qcow2", "base.qcow2", "1M")


@pytest.mark.parametrize("opts", [
    "data_file_raw=on",
    "data_file=x.raw,data_file_raw=on,backing_file=base.qcow2,backing_fmt=qcow2",
    "data_file=x.raw,compat=0.10",
    "data_file=/nonexistent/dir/x.raw",
    "data_file=x.raw,backing_file=base.qcow2,backing_fmt=qcow2",
])
def test_create_refusals_and_backing(tmp_path: Path, opts: str) -> None:
    both(tmp_path, _base, "create", "-f", "qcow2", "-o", opts, "c.qcow2", "1M")


# ---- open, info, map, check ----------------------------------------------------------
@pytest.mark.parametrize("raw", ["off", "on"])
def test_reports_of_qemu_written_image(tmp_path: Path, raw: str) -> None:
    # cluster 0 holds data: its L2 entry has host offset 0, told from an
    # unallocated one by OFLAG_COPIED
    both(tmp_path, image(raw, "1M", *WRITES), "info", "img.qcow2",
         then=(("info", "--output=json", "img.qcow2"), ("map", "img.qcow2"), ("map", "--output=json", "img.qcow2"),
               ("check", "img.qcow2"), ("check", "--output=json", "img.qcow2"),
               ("compare", "img.qcow2", "data.raw")))


def test_data_file_name_is_relative_to_the_current_directory(tmp_path: Path) -> None:
    def setup(d: Path) -> None:
        (d / "sub").mkdir()
        image("off", "1M", "write -P 1 64k 64k", name="sub/a.qcow2", data="sub/d.raw")(d)
    both(tmp_path / "1", setup, "map", "sub/a.qcow2")
    # from inside sub/ the stored name "sub/d.raw" does not resolve
    out = both(tmp_path / "2", setup, "map", "a.qcow2", cwd="sub")
    assert b"Could not open 'sub/d.raw': No such file or directory" in out[1]


def test_info_does_not_open_the_data_file(tmp_path: Path) -> None:
    def setup(d: Path) -> None:
        image("on", "1M")(d)
        (d / "data.raw").unlink()
    out = both(tmp_path, setup, "info", "img.qcow2",
               then=(("map", "img.qcow2"), ("check", "img.qcow2"), ("convert", "-O", "raw", "img.qcow2", "o.raw"),
                     ("compare", "img.qcow2", "img.qcow2")))
    assert b"data file: data.raw\n    data file raw: true\n" in out[0]


def _patch_incompat(path: Path, clear: int = 0, autoclear_set: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(72)
        incompat, compat, autoclear = struct.unpack(">QQQ", f.read(24))
        f.seek(72)
        f.write(struct.pack(">QQQ", incompat & ~clear, compat, autoclear | autoclear_set))


def _set_name(path: Path, name: bytes) -> None:
    """Overwrite the data file name extension's bytes in place."""
    buf = bytearray(path.read_bytes())
    off = 112
    while True:
        etype, elen = struct.unpack_from(">II", buf, off)
        if etype == 0x44415441:
            break
        off += 8 + ((elen + 7) & ~7)
    buf[off + 8:off + 8 + elen] = name.ljust(elen, b"\0")[:elen]
    path.write_bytes(bytes(buf))


def _no_name(d: Path) -> None:
    image("off", "1M", "write -P 1 0 64k")(d)
    _qemu(d, "amend", "-o", "data_file=", "img.qcow2")


def _no_incompat_bit(d: Path) -> None:
    image("off", "1M", "write -P 1 0 64k")(d)
    _patch_incompat(d / "img.qcow2", clear=4)


def _raw_bit_alone(d: Path) -> None:
    _qemu(d, "create", "-q", "-f", "qcow2", "img.qcow2", "1M")
    _patch_incompat(d / "img.qcow2", autoclear_set=2)


def _nul_in_name(d: Path) -> None:
    image("off", "1M")(d)
    _set_name(d / "img.qcow2", b"da\0ta.raw")


def _empty_name(d: Path) -> None:
    image("off", "1M")(d)
    _set_name(d / "img.qcow2", b"\0ata.raw")


@pytest.mark.parametrize("setup", [_no_name, _no_incompat_bit, _raw_bit_alone, _nul_in_name, _empty_name])
def test_odd_headers(tmp_path: Path, setup: Setup) -> None:
    both(tmp_path, setup, "info", "--output=json", "img.qcow2", then=(("map", "img.qcow2"),))


def _two(d: Path) -> None:
    image("off", "1M", "write -P 1 0 64k")(d)
    _qemu(d, "create", "-q", "-f", "qcow2", "plain.qcow2", "1M")
    shutil.copy(d / "data.raw", d / "other.raw")
    _qemu(d, "amend", "-o", "data_file=", "img.qcow2")


def test_image_opts_data_file(tmp_path: Path) -> None:
    both_all(tmp_path, _two, [
        ("map", *out, "--image-opts", opts) for out in ((), ("--output=json",)) for opts in (
            "driver=qcow2,file.filename=img.qcow2,data-file.filename=other.raw",
            "driver=qcow2,file.filename=img.qcow2,data-file.filename=other.raw,data-file.driver=file",
            "driver=qcow2,file.filename=img.qcow2,data-file=other.raw",
            "driver=qcow2,file.filename=img.qcow2,data-file.filename=missing.raw",
            "driver=qcow2,file.filename=plain.qcow2,data-file.filename=other.raw",
        )])


# ---- guest I/O -------------------------------------------------------------------------
def _source(d: Path) -> None:
    buf = bytearray(3 << 20)
    buf[0:70000] = b"\x01" * 70000
    buf[200000:300000] = bytes(range(256)) * 390 + bytes(160)
    buf[(2 << 20) + 5:(2 << 20) + 4096] = b"\x07" * 4091
    (d / "src.raw").write_bytes(bytes(buf))


@pytest.mark.parametrize("raw", ["off", "on"])
def test_convert_to_data_file(tmp_path: Path, raw: str) -> None:
    both(tmp_path, _source, "convert", "-O", "qcow2", "-o", f"data_file=t.raw,data_file_raw={raw}",
         "src.raw", "t.qcow2")
    # the raw data file reads as the guest disk
    if raw == "on":
        assert (tmp_path / "qimg" / "t.raw").read_bytes() == (tmp_path / "qimg" / "src.raw").read_bytes()


@pytest.mark.parametrize("raw", ["off", "on"])
@pytest.mark.parametrize("cmds", [
    [["convert", "-O", "raw", "img.qcow2", "out.raw"], ["convert", "-O", "qcow2", "img.qcow2", "out.qcow2"],
     ["convert", "-O", "qcow2", "-o", "data_file=o.raw", "img.qcow2", "out2.qcow2"],
     ["check", "-r", "all", "img.qcow2"], ["snapshot", "-c", "s1", "img.qcow2"],
     ["snapshot", "-a", "s1", "img.qcow2"]],
    [["resize", "img.qcow2", "2M"], ["resize", "--shrink", "img.qcow2", "512k"]],
    [["resize", "--preallocation=falloc", "img.qcow2", "3M"], ["map", "--output=json", "img.qcow2"]],
    [["resize", "--preallocation=metadata", "img.qcow2", "1500k"], ["map", "--output=json", "img.qcow2"]],
    [["amend", "-o", "data_file_raw=on", "img.qcow2"], ["amend", "-o", "compat=0.10", "img.qcow2"],
     ["amend", "-o", "data_file_raw=off", "img.qcow2"], ["amend", "-o", "data_file=z.raw,lazy_refcounts=on", "img.qcow2"],
     ["info", "img.qcow2"], ["amend", "-o", "data_file=", "img.qcow2"], ["info", "img.qcow2"]],
])
def test_commands_on_data_file_image(tmp_path: Path, raw: str, cmds: list[list[str]]) -> None:
    both(tmp_path, image(raw, "1M", *WRITES), *cmds[0], then=tuple(tuple(c) for c in cmds[1:]))


def test_amend_refusals_without_data_file(tmp_path: Path) -> None:
    both(tmp_path, _base, "amend", "-o", "data_file=x.raw", "base.qcow2",
         then=(("amend", "-o", "data_file_raw=on", "base.qcow2"),))


def test_compression_refused(tmp_path: Path) -> None:
    _, err, _ = both(tmp_path, _source, "convert", "-c", "-O", "qcow2", "-o", "data_file=c.raw", "src.raw",
                     "c.qcow2")
    assert b"Operation not supported" in err


@pytest.mark.parametrize("raw", ["off", "on"])
@pytest.mark.parametrize("cmd", [["commit", "top.qcow2"],
                                 ["convert", "-n", "-O", "qcow2", "src.raw", "base.qcow2"]])
def test_writes_into_data_file_image(tmp_path: Path, raw: str, cmd: list[str]) -> None:
    def setup(d: Path) -> None:
        image(raw, "3M", "write -P 3 0 256k", "write -P 4 900k 4k", name="base.qcow2", data="b.raw")(d)
        _qemu(d, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
        run_qemu_io("-c", "write -P 7 100k 200k", "-c", "write -z 512k 128k", "-c", "write -z 64k 4k",
                    "-c", "discard 128k 64k", "top.qcow2", cwd=str(d))
        _source(d)
    both(tmp_path, setup, *cmd)


def test_measure(tmp_path: Path) -> None:
    both_all(tmp_path, _source, [("measure", "-O", "qcow2", "-o", opts, *src)
                                 for opts in ("data_file=x.raw", "data_file=x.raw,data_file_raw=on", "data_file_raw=on")
                                 for src in (["src.raw"], ["--size", "1G"])])


def test_unmap_at_an_unaligned_end(tmp_path: Path) -> None:
    """Zeroing with unmap frees clusters of the data file, the partial last
    one too, without extending the data file."""
    def setup(d: Path) -> None:
        image("off", "1000k", "write -P 3 0 256k", "write -P 4 960k 40k", name="base.qcow2", data="b.raw")(d)
        (d / "zero.raw").write_bytes(bytes(1024000))
    both(tmp_path, setup, "convert", "-n", "-O", "qcow2", "zero.raw", "base.qcow2",
         then=(("map", "--output=json", "base.qcow2"),))


def test_raw_data_file_over_several_l2_tables(tmp_path: Path) -> None:
    """data_file_raw maps every cluster 1:1, also across L2 tables and when
    the image grows (the new clusters are preallocated as well)."""
    both(tmp_path, _nothing, "create", "-f", "qcow2", "-o", "data_file=t.raw,data_file_raw=on,cluster_size=4k",
         "t.qcow2", "3M", then=(("resize", "t.qcow2", "5000k"), ("map", "t.qcow2"), ("check", "t.qcow2")))


def _compressed_entry(d: Path) -> None:
    """A compressed L2 entry, which an image with a data file cannot have."""
    image("off", "1M", "write -P 3 0 128k")(d)
    path = d / "img.qcow2"
    buf = bytearray(path.read_bytes())
    l1 = struct.unpack_from(">Q", buf, 40)[0]
    l2 = struct.unpack_from(">Q", buf, l1)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", buf, l2 + 8, (1 << 62) | 0x30000)
    path.write_bytes(bytes(buf))


@pytest.mark.parametrize("cmd", [["map", "img.qcow2"], ["convert", "-O", "raw", "img.qcow2", "o.raw"],
                                 ["compare", "img.qcow2", "data.raw"], ["check", "img.qcow2"],
                                 ["dd", "if=img.qcow2", "of=o.raw", "bs=64k"]])
def test_compressed_entry_is_corruption(tmp_path: Path, cmd: list[str]) -> None:
    both(tmp_path, _compressed_entry, *cmd)


def test_overlay_with_data_file(tmp_path: Path) -> None:
    """An overlay keeping its data in a data file, over a base that does too.
    (Not commit after the rebase: qemu-img's commit job allocates in
    another order there, with or without data files.)"""
    def setup(d: Path) -> None:
        image("off", "1M", "write -P 3 0 256k", "write -P 4 900k 4k", name="base.qcow2", data="bd.raw")(d)
        _qemu(d, "create", "-q", "-f", "qcow2", "new.qcow2", "1M")
        _qemu(d, "create", "-q", "-f", "qcow2", "-o", "data_file=t.raw", "-b", "base.qcow2", "-F", "qcow2",
              "top.qcow2")
        run_qemu_io("-c", "write -P 7 100k 200k", "-c", "write -z 512k 128k", "-c", "discard 128k 64k",
                    "top.qcow2", cwd=str(d))
    both(tmp_path, setup, "compare", "top.qcow2", "base.qcow2",
         then=(("convert", "-O", "qcow2", "-o", "data_file=x.raw", "-B", "base.qcow2", "-F", "qcow2",
                "top.qcow2", "o.qcow2"),
               ("map", "--output=json", "o.qcow2"),
               ("rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"),
               ("map", "top.qcow2")))
