"""Shared fixtures: run qimg and the real qemu-img side by side."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

needs_qemu = pytest.mark.skipif(
    QEMU_IMG is None or QEMU_IO is None,
    reason="INTEROP SKIPPED: qemu-img/qemu-io not installed (apt-get install qemu-utils)",
)


# A hung command must fail its test, not stall the whole run.
TIMEOUT = 120


def run_qimg(*args: str, cwd: str | None = None, input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run ``qemu-img``-named qimg so that messages match qemu-img's byte for byte."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    code = "import sys; sys.argv[0] = 'qemu-img'; from qimg.cli.main import main; raise SystemExit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, cwd=cwd, env=env, input=input,
                          timeout=TIMEOUT)


def run_qemu(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, cwd=cwd, timeout=TIMEOUT)


def run_qemu_io(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(["qemu-io", *args], capture_output=True, cwd=cwd, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    return p


def same(args: list[str], cwd: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """Run one command line through both programs; the caller asserts."""
    return run_qimg(*args, cwd=cwd), run_qemu(*args, cwd=cwd)


def assert_same(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    mine, theirs = same(args, cwd)
    assert mine.stdout.decode() == theirs.stdout.decode()
    assert mine.stderr.decode() == theirs.stderr.decode()
    assert mine.returncode == theirs.returncode
    return mine


def set_bitmap_in_use(path: "os.PathLike[str] | str", name: str) -> None:
    """Flag one qcow2 bitmap IN_USE in the directory (what a crashed QEMU
    leaves): QEMU then calls it inconsistent."""
    import struct

    with open(path, "r+b") as f:
        head = f.read(65536)
        off = 104 + 8  # qemu-img's v3 header is 112 bytes; extensions follow
        while True:
            etype, elen = struct.unpack_from(">II", head, off)
            if etype == 0x23852875:
                nb, _, dsize, doff = struct.unpack_from(">IIQQ", head, off + 8)
                break
            off += 8 + ((elen + 7) & ~7)
        f.seek(doff)
        dirbuf = bytearray(f.read(dsize))
        pos = 0
        while pos < dsize:
            nsize = struct.unpack_from(">H", dirbuf, pos + 18)[0]
            if dirbuf[pos + 24:pos + 24 + nsize] == name.encode():
                flags = struct.unpack_from(">I", dirbuf, pos + 12)[0]
                struct.pack_into(">I", dirbuf, pos + 12, flags | 1)
            pos += (24 + nsize + 7) & ~7
        f.seek(doff)
        f.write(dirbuf)


def qemu_io_cmds(path: "os.PathLike[str] | str", fmt: str, *cmds: str) -> None:
    """Run each of ``cmds`` through qemu-io on ``path`` (as format ``fmt``)."""
    args: list[str] = []
    for c in cmds:
        args += ["-c", c]
    run_qemu_io("-f", fmt, *args, str(path))


def make_image(path: "os.PathLike[str] | str", size: str, *cmds: str, fmt: str = "raw",
               extra: tuple[str, ...] = ()) -> str:
    """qemu-img create an image, then write to it with qemu-io ``cmds``."""
    assert run_qemu("create", "-f", fmt, *extra, str(path), size).returncode == 0
    if cmds:
        qemu_io_cmds(path, fmt, *cmds)
    return str(path)


def patched_copy(src: "os.PathLike[str] | str", dst: "os.PathLike[str] | str", offset: int, fmt: str,
                 value: int) -> None:
    """Copy ``src`` to ``dst`` with one struct-packed field overwritten."""
    import struct

    shutil.copy(src, dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


#: qemu's hint after the error for a snapshot table entry with too much extra data
FORCE_REMOVE_HINT = b"\nYou can force-remove this extra metadata with qemu-img check -r all\n"


def make_bad_snapshot_table(directory: "os.PathLike[str]", name: str = "s.qcow2") -> None:
    """A qcow2 image whose one snapshot claims more extra data than QEMU
    accepts (1 MiB): every open fails with FORCE_REMOVE_HINT after it."""
    import struct

    assert run_qemu("create", "-q", "-f", "qcow2", name, "1M", cwd=str(directory)).returncode == 0
    assert run_qemu("snapshot", "-c", "sn", name, cwd=str(directory)).returncode == 0
    with open(os.path.join(directory, name), "r+b") as f:
        nb, table = struct.unpack(">IQ", f.read(72)[60:72])
        assert nb == 1
        # extra_data_size is at byte 36 of the entry (docs/interop/qcow2.txt)
        f.seek(table + 36)
        f.write(struct.pack(">I", (1 << 20) + 8))
