"""Helpers for the check tests: damage qcow2 images byte by byte, and run
qimg's check in-process (the scenarios are many; a subprocess each would be
slow) or qemu-img's as a subprocess, on copies of the same bytes."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

L2_MASK = 0x00FFFFFFFFFFFE00


def header(path: Path) -> dict[str, int]:
    b = path.read_bytes()[:104]
    f = struct.unpack(">IIQIIQIIQQIIQ", b[:72])
    version = f[1]
    return {
        "version": version, "cluster_bits": f[4], "cs": 1 << f[4], "l1_size": f[7], "l1_off": f[8],
        "rt_off": f[9], "rt_clusters": f[10],
        "refcount_order": struct.unpack(">I", b[96:100])[0] if version >= 3 else 4,
    }


def rd64(path: Path, off: int) -> int:
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(">Q", f.read(8))[0]


def wr(path: Path, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def wr64(path: Path, off: int, value: int) -> None:
    wr(path, off, struct.pack(">Q", value))


def l1_pos(path: Path, index: int) -> int:
    return header(path)["l1_off"] + 8 * index


def l2_pos(path: Path, l1_index: int, l2_index: int) -> int:
    """File offset of an L2 entry (standard 8-byte entries)."""
    return (rd64(path, l1_pos(path, l1_index)) & L2_MASK) + 8 * l2_index


def set_refcount(path: Path, cluster: int, value: int) -> None:
    """Write one on-disk refcount, whatever the refcount width."""
    h = header(path)
    bits = 1 << h["refcount_order"]
    per = h["cs"] * 8 // bits
    block = rd64(path, h["rt_off"] + 8 * (cluster // per)) & ~0x1FF
    index = cluster % per
    if bits >= 8:
        wr(path, block + index * bits // 8, value.to_bytes(bits // 8, "big"))
        return
    pos = block + index * bits // 8
    with open(path, "rb") as f:
        f.seek(pos)
        byte = f.read(1)[0]
    shift = index * bits % 8
    byte = (byte & ~(((1 << bits) - 1) << shift)) | (value << shift)
    wr(path, pos, bytes([byte]))


def qimg_inprocess(args: list[str], cwd: Path) -> tuple[str, str, int]:
    """qimg's CLI as ``qemu-img``, in this process: (stdout, stderr, rc)."""
    from qimg.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    old_argv0, old_cwd = sys.argv[0], os.getcwd()
    sys.argv[0] = "qemu-img"
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(args)
            except SystemExit as e:
                rc = int(e.code or 0)
    finally:
        sys.argv[0] = old_argv0
        os.chdir(old_cwd)
    return out.getvalue(), err.getvalue(), rc


def qemu(args: list[str], cwd: Path) -> tuple[str, str, int]:
    p = subprocess.run(["qemu-img", *args], cwd=cwd, capture_output=True)
    return p.stdout.decode(), p.stderr.decode(), p.returncode


def twin_copies(src: Path, tmp: Path, name: str = "x.qcow2") -> tuple[Path, Path]:
    """Identical copies under the same name in two directories, so that the
    file names both programs print are equal."""
    out = []
    for d in ("qemu", "qimg"):
        (tmp / d).mkdir(exist_ok=True)
        shutil.copy(src, tmp / d / name)
        out.append(tmp / d / name)
    return out[0], out[1]
