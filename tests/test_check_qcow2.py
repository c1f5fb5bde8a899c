"""qemu-img check on qcow2 images, compared with the real qemu-img on the
same bytes: clean images of many kinds, damaged images (each made by editing
an image qemu-img/qemu-io wrote), and their repair with -r leaks / -r all."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from conftest import needs_qemu
from test_check_helpers import (
    header, l1_pos, l2_pos, qemu, qimg_inprocess, rd64, set_refcount, twin_copies, wr64,
)

pytestmark = needs_qemu


def _make(path: Path, create: list[str], io_cmds: list[str] = (), size: str = "16M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *create, str(path), size], check=True)
    if io_cmds:
        args = []
        for c in io_cmds:
            args += ["-c", c]
        subprocess.run(["qemu-io", *args, str(path)], check=True, capture_output=True)
    return path


def _same(args: list[str], cwd_q: Path, cwd_m: Path) -> tuple[str, str, int]:
    theirs = qemu(args, cwd_q)
    mine = qimg_inprocess(args, cwd_m)
    assert mine[1] == theirs[1], f"stderr differs for {args}"
    assert mine[0] == theirs[0], f"stdout differs for {args}"
    assert mine[2] == theirs[2]
    return mine


# ---- clean images ---------------------------------------------------------------

CLEAN = {
    "empty": ([], []),
    "data": ([], ["write -P 1 0 1M", "write -P 2 5M 64k"]),
    "zeroes": ([], ["write -z 0 1M", "write 1M 64k", "write -z -u 2M 128k"]),
    "compat010": (["-o", "compat=0.10"], ["write 0 1M", "write -z 4M 1M"]),
    "cluster512": (["-o", "cluster_size=512"], ["write 0 300k", "write 1M 100k"]),
    "cluster2M": (["-o", "cluster_size=2M"], ["write 0 3M", "write 10M 100k"]),
    "prealloc_metadata": (["-o", "preallocation=metadata"], []),
    "prealloc_falloc": (["-o", "preallocation=falloc"], ["write 0 64k"]),
    "prealloc_full": (["-o", "preallocation=full"], []),
    "refcount1": (["-o", "refcount_bits=1"], ["write 0 1M"]),
    "refcount2": (["-o", "refcount_bits=2"], ["write 0 1M"]),
    "refcount64": (["-o", "refcount_bits=64"], ["write 0 1M"]),
    "fragmented": ([], ["write 1M 64k", "write 0 64k", "write 3M 64k", "write 64k 64k"]),
}


@pytest.mark.parametrize("kind", sorted(CLEAN))
@pytest.mark.parametrize("output", ["human", "json"])
def test_clean_images(tmp_path: Path, kind: str, output: str) -> None:
    create, io_cmds = CLEAN[kind]
    _make(tmp_path / "x.qcow2", create, io_cmds)
    _same(["check", f"--output={output}", "x.qcow2"], tmp_path, tmp_path)


def test_compressed_backing_snapshot_bitmap(tmp_path: Path) -> None:
    base = _make(tmp_path / "base.qcow2", [], ["write -P 1 0 3M"], "8M")
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(base), str(tmp_path / "c.qcow2")], check=True)
    _make(tmp_path / "o.qcow2", ["-b", "base.qcow2", "-F", "qcow2"], ["write 2M 64k"], "8M")
    snap = _make(tmp_path / "s.qcow2", [], ["write 0 1M"])
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(snap)], check=True)
    subprocess.run(["qemu-io", "-c", "write 512k 1M", str(snap)], check=True, capture_output=True)
    bm = _make(tmp_path / "b.qcow2", [], ["write 0 1M"])
    subprocess.run(["qemu-img", "bitmap", "--add", str(bm), "b1"], check=True)
    subprocess.run(["qemu-io", "-c", "write 2M 1M", str(bm)], check=True, capture_output=True)
    for name in ("c.qcow2", "o.qcow2", "s.qcow2", "b.qcow2"):
        for output in ("human", "json"):
            _same(["check", f"--output={output}", name], tmp_path, tmp_path)
        _same(["check", "-q", name], tmp_path, tmp_path)


# ---- damaged images --------------------------------------------------------------
# The base image: 16M, clusters 0 header, 1 refcount table, 2 refcount block,
# 3 L1, 4 L2, 5-8 data at guest 0..256k, 9 data at guest 4M.

def _leak(p: Path) -> None:
    cs = header(p)["cs"]
    n = p.stat().st_size // cs
    os.truncate(p, (n + 1) * cs)
    set_refcount(p, n, 1)


def _or64(pos_fn: Callable[[Path], int], value: int) -> Callable[[Path], None]:
    return lambda p: wr64(p, pos_fn(p), rd64(p, pos_fn(p)) | value)


def _add64(pos_fn: Callable[[Path], int], value: int) -> Callable[[Path], None]:
    return lambda p: wr64(p, pos_fn(p), rd64(p, pos_fn(p)) + value)


def _and64(pos_fn: Callable[[Path], int], value: int) -> Callable[[Path], None]:
    return lambda p: wr64(p, pos_fn(p), rd64(p, pos_fn(p)) & value)


def _set64(pos_fn: Callable[[Path], int], value: int) -> Callable[[Path], None]:
    return lambda p: wr64(p, pos_fn(p), value)


def _rt(index: int) -> Callable[[Path], int]:
    return lambda p: header(p)["rt_off"] + 8 * index


def _double_ref(p: Path) -> None:
    wr64(p, l2_pos(p, 0, 8), rd64(p, l2_pos(p, 0, 0)))


NOT_COPIED = ~(1 << 63) & 0xFFFFFFFFFFFFFFFF
DAMAGE: dict[str, Callable[[Path], None]] = {
    "leaked_cluster": _leak,
    "refcount_too_high": lambda p: set_refcount(p, 5, 2),
    "refcount_zero_data": lambda p: set_refcount(p, 6, 0),
    "refcount_zero_l2": lambda p: set_refcount(p, 4, 0),
    "refcount_zero_refblock": lambda p: set_refcount(p, 2, 0),
    "refcount_zero_header": lambda p: set_refcount(p, 0, 0),
    "l2_unaligned": _add64(lambda p: l2_pos(p, 0, 1), 0x200),
    "l2_past_eof": _set64(lambda p: l2_pos(p, 0, 2), (1 << 63) | (100 << 20)),
    "l2_reserved_bits": _or64(lambda p: l2_pos(p, 0, 3), 2),
    "l2_prealloc_unaligned": _set64(lambda p: l2_pos(p, 0, 10), ((9 << 16) + 0x400) | 1),
    "l2_copied_missing": _and64(lambda p: l2_pos(p, 0, 0), NOT_COPIED),
    "two_refs_one_cluster": _double_ref,
    "l1_unaligned": _add64(lambda p: l1_pos(p, 0), 0x200),
    "l1_past_eof": _set64(lambda p: l1_pos(p, 1), (1 << 63) | (50 << 20)),
    "l1_reserved_bits": _or64(lambda p: l1_pos(p, 0), 1 << 60),
    "l1_copied_missing": _and64(lambda p: l1_pos(p, 0), NOT_COPIED),
    "reftable_unaligned": _add64(_rt(0), 0x200),
    "reftable_past_eof": _set64(_rt(1), 20 << 20),
    "reftable_reserved_bits": _or64(_rt(0), 1),
    "reftable_zero": _set64(_rt(0), 0),
    "corrupt_bit": _or64(lambda p: 72, 2),
    "corrupt_bit_and_leak": lambda p: (_or64(lambda q: 72, 2)(p), _leak(p)),
}


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("base")
    return _make(d / "base.qcow2", [], ["write -P 7 0 256k", "write -P 8 4M 64k"])


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("mode", [None, "leaks", "all"])
def test_damaged(tmp_path: Path, base_image: Path, damage: str, mode: str | None) -> None:
    theirs, mine = twin_copies(base_image, tmp_path)
    DAMAGE[damage](theirs)
    DAMAGE[damage](mine)
    assert theirs.read_bytes() == mine.read_bytes()
    repair = [] if mode is None else ["-r", mode]
    _same(["check", *repair, "x.qcow2"], theirs.parent, mine.parent)
    if mode is not None:
        # qemu-img's verdict on qimg's repair equals its verdict on its own.
        assert qemu(["check", "x.qcow2"], mine.parent) == qemu(["check", "x.qcow2"], theirs.parent)
        assert qemu(["check", "--output=json", "x.qcow2"], mine.parent) == \
            qemu(["check", "--output=json", "x.qcow2"], theirs.parent)


_LAYOUTS = [["-o", "refcount_bits=1"], ["-o", "refcount_bits=64"], ["-o", "cluster_size=512"], ["-o", "compat=0.10"]]
_DAMAGES = ["leaked_cluster", "refcount_zero_data", "two_refs_one_cluster", "l2_copied_missing"]


# two_refs_one_cluster assumes the default layout's L2 placement, which 512-byte clusters do not share.
@pytest.mark.parametrize("create,damage", [
    (c, d) for c in _LAYOUTS for d in _DAMAGES if not (d == "two_refs_one_cluster" and "cluster_size=512" in c)])
def test_damaged_other_layouts(tmp_path: Path, create: list[str], damage: str) -> None:
    src = _make(tmp_path / "src.qcow2", create, ["write -P 7 0 256k", "write -P 8 4M 64k"])
    theirs, mine = twin_copies(src, tmp_path)
    for p in (theirs, mine):
        if damage == "refcount_zero_data":
            cluster = (rd64(p, l2_pos(p, 0, 0)) & 0x00FFFFFFFFFFFE00) >> header(p)["cluster_bits"]
            set_refcount(p, cluster, 0)
        else:
            DAMAGE[damage](p)
    for mode in (None, "all"):
        repair = [] if mode is None else ["-r", mode]
        _same(["check", *repair, "x.qcow2"], theirs.parent, mine.parent)
    assert qemu(["check", "x.qcow2"], mine.parent) == qemu(["check", "x.qcow2"], theirs.parent)


def test_dirty_lazy_refcounts(tmp_path: Path) -> None:
    """An image left dirty by a crash with lazy refcounts: check reports the
    missing refcounts, -r all rebuilds them and clears the dirty bit."""
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(src), "16M"],
                   check=True)
    subprocess.run(["qemu-io", "-c", "write 0 256k", "-c", "write 4M 64k", "-c", "abort", str(src)],
                   capture_output=True)
    assert rd64(src, 72) & 1, "qemu-io abort should leave the dirty bit set"
    for mode in (None, "leaks", "all"):
        theirs, mine = twin_copies(src, tmp_path)
        repair = [] if mode is None else ["-r", mode]
        _same(["check", *repair, "x.qcow2"], theirs.parent, mine.parent)
        if mode == "leaks":
            # The check fails ("need to rebuild"); QEMU then clears the dirty
            # bit when it closes the image, which is the driver's close, not
            # the check: only the check's own output is compared here.
            continue
        assert rd64(mine, 72) == rd64(theirs, 72)
        assert qemu(["check", "x.qcow2"], mine.parent) == qemu(["check", "x.qcow2"], theirs.parent)


def test_corrupt_bit_cleared_by_repair(tmp_path: Path, base_image: Path) -> None:
    theirs, mine = twin_copies(base_image, tmp_path)
    for p in (theirs, mine):
        DAMAGE["corrupt_bit"](p)
    _same(["check", "-r", "all", "x.qcow2"], theirs.parent, mine.parent)
    assert rd64(mine, 72) & 2 == 0
    assert mine.read_bytes() == theirs.read_bytes() or \
        qemu(["info", "x.qcow2"], mine.parent) == qemu(["info", "x.qcow2"], theirs.parent)


@pytest.mark.parametrize("damage", ["shared_refcount_low", "shared_refcount_high", "copied_set_on_shared"])
def test_snapshot_shared_clusters(tmp_path: Path, damage: str) -> None:
    """Clusters shared with an internal snapshot have refcount 2 and no
    OFLAG_COPIED; break either and compare check and repair."""
    src = _make(tmp_path / "src.qcow2", [], ["write -P 1 0 1M"])
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(src)], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 2 512k 128k", str(src)], check=True, capture_output=True)
    theirs, mine = twin_copies(src, tmp_path)
    for p in (theirs, mine):
        entry = rd64(p, l2_pos(p, 0, 0))
        cluster = (entry & 0x00FFFFFFFFFFFE00) >> header(p)["cluster_bits"]
        if damage == "shared_refcount_low":
            set_refcount(p, cluster, 1)
        elif damage == "shared_refcount_high":
            set_refcount(p, cluster, 3)
        else:
            wr64(p, l2_pos(p, 0, 0), entry | (1 << 63))
    for mode in (None, "leaks", "all"):
        repair = [] if mode is None else ["-r", mode]
        _same(["check", *repair, "x.qcow2"], theirs.parent, mine.parent)
    assert qemu(["check", "x.qcow2"], mine.parent) == qemu(["check", "x.qcow2"], theirs.parent)
