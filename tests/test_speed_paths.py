"""The fast paths of qcow2 check and map (bulk L2 scans, references kept as
runs, the OFLAG_COPIED shortcut) give what qemu-img gives on the same
files, also where they must hand over to the general paths.  Batch sizes
are shrunk so that small images cross many batch boundaries."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import needs_qemu
from test_check_helpers import l1_pos, l2_pos, qemu, qimg_inprocess, rd64, twin_copies, wr64

from qimg.formats.qcow2 import check as qcheck
from qimg.formats.qcow2 import scan
from qimg.formats.qcow2.driver import Qcow2Driver

pytestmark = needs_qemu


def _make(path: Path, create: list[str], io_cmds: list[str] = (), size: str = "8M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *create, str(path), size], check=True)
    args: list[str] = []
    for c in io_cmds:
        args += ["-c", c]
    if args:
        subprocess.run(["qemu-io", *args, str(path)], check=True, capture_output=True)
    return path


def _same(args: list[str], cwd_q: Path, cwd_m: Path | None = None) -> tuple[str, str, int]:
    theirs = qemu(args, cwd_q)
    mine = qimg_inprocess(args, cwd_m or cwd_q)
    assert mine[1] == theirs[1], f"stderr differs for {args}"
    assert mine[0] == theirs[0], f"stdout differs for {args}"
    assert mine[2] == theirs[2]
    return mine


# Scattered writes in an order that puts host clusters out of guest order.
_SCATTER = [f"write -P {i % 250 + 1} {(37 * i) % 120 * 64}k 64k" for i in range(60)][::-1]

IMAGES = {
    # many tiny L2 tables; host order not guest order
    "cluster512": (["-o", "cluster_size=512"], ["write 0 200k", "write -z 300k 20k", "write 1M 3k",
                                                "discard 50k 10k", "write 7M 100k"]),
    "scattered": ([], _SCATTER),
    "zero_compressed": ([], ["write -c 0 64k", "write -c 64k 64k", "write -z 1M 192k", "write -z -u 2M 64k",
                             "write 3M 64k", "write -c 5M 128k"]),
    "prealloc_metadata": (["-o", "preallocation=metadata,cluster_size=4k"], ["write 1M 8k", "write -z 2M 8k"]),
    "compat010": (["-o", "compat=0.10"], ["write 0 100k", "write -z 1M 64k"]),
    "empty": ([], []),
}


@pytest.fixture(params=[1, 1 << 22], ids=["batch1", "batch4M"])
def batches(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of one table (so every table boundary is a batch boundary) or
    the default size."""
    monkeypatch.setattr(scan, "BATCH_BYTES", request.param)
    monkeypatch.setattr(qcheck, "_BATCH_BYTES", request.param)


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_map_and_check(tmp_path: Path, kind: str, batches: None) -> None:
    create, cmds = IMAGES[kind]
    _make(tmp_path / "x.qcow2", create, cmds)
    for output in ("json", "human"):
        if kind == "zero_compressed" and output == "human":
            continue  # compressed clusters: qemu-img refuses the human table
        _same(["map", f"--output={output}", "x.qcow2"], tmp_path)
    for opts in (["-s", "70k", "-l", "1000k"], ["-s", "1k", "-l", "1"], ["-s", "8M"]):
        _same(["map", "--output=json", *opts, "x.qcow2"], tmp_path)
    _same(["check", "x.qcow2"], tmp_path)
    _same(["check", "--output=json", "x.qcow2"], tmp_path)


def test_map_uses_the_bulk_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A preallocated image maps without one per-run block_status call
    (and still as qemu-img maps it)."""
    _make(tmp_path / "x.qcow2", ["-o", "preallocation=metadata,cluster_size=4k"], ["write 64k 4k"], "64M")

    def refuse(*args: object) -> None:
        raise AssertionError("block_status called")

    monkeypatch.setattr(Qcow2Driver, "block_status", refuse)
    _same(["map", "--output=json", "x.qcow2"], tmp_path)


def test_map_backing_chain(tmp_path: Path) -> None:
    """Bulk answers for each layer of a chain whose base is shorter."""
    _make(tmp_path / "base.qcow2", ["-o", "cluster_size=4k"], ["write -P 1 0 64k", "write -c 1M 64k"], "2M")
    _make(tmp_path / "top.qcow2", ["-b", "base.qcow2", "-F", "qcow2"],
          ["write -z 32k 64k", "write -P 2 1536k 1M", "discard 1M 4k"], "6M")
    _same(["map", "--output=json", "top.qcow2"], tmp_path)
    _same(["map", "--output=json", "-s", "1M", "top.qcow2"], tmp_path)


def test_map_l2_table_past_end_of_file(tmp_path: Path) -> None:
    """A file cut short: its last L2 table reads as zeroes, as in QEMU."""
    img = _make(tmp_path / "x.qcow2", ["-o", "cluster_size=4k"], ["write 0 4k", "write 4M 4k"])
    l2 = rd64(img, l1_pos(img, 2)) & 0x00FFFFFFFFFFFE00
    with open(img, "r+b") as f:
        f.truncate(l2)
    _same(["map", "--output=json", "x.qcow2"], tmp_path)


def test_map_unaligned_l2_table(tmp_path: Path) -> None:
    """An unaligned L2 offset in the middle: the entries before it are
    printed, then the error, as qemu-img does."""
    img = _make(tmp_path / "x.qcow2", ["-o", "cluster_size=4k"], ["write 0 4k", "write 2M 4k", "write 5M 4k"])
    wr64(img, l1_pos(img, 4), rd64(img, l1_pos(img, 4)) + 512)
    _same(["map", "--output=json", "x.qcow2"], tmp_path)


# ---- check: the first pass's runs and the OFLAG_COPIED shortcut ----------------

NOT_COPIED = ~(1 << 63) & 0xFFFFFFFFFFFFFFFF

DAMAGES = {
    "data_not_copied": lambda p: wr64(p, l2_pos(p, 0, 3), rd64(p, l2_pos(p, 0, 3)) & NOT_COPIED),
    "l1_not_copied": lambda p: wr64(p, l1_pos(p, 0), rd64(p, l1_pos(p, 0)) & NOT_COPIED),
    # two L2 entries of one table point at one cluster: refcount 1, two references
    "shared_cluster": lambda p: wr64(p, l2_pos(p, 0, 5), rd64(p, l2_pos(p, 0, 4))),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("repair", [None, "leaks", "all"])
def test_check_damage_in_runs(tmp_path: Path, damage: str, repair: str | None, batches: None) -> None:
    src = _make(tmp_path / "src.qcow2", ["-o", "cluster_size=4k"], ["write 0 64k", "write 1M 16k"])
    DAMAGES[damage](src)
    q, m = twin_copies(src, tmp_path)
    args = ["check", *(["-r", repair] if repair else []), "x.qcow2"]
    _same(args, q.parent, m.parent)
    assert m.read_bytes() == q.read_bytes()


@pytest.mark.parametrize("bits", [1, 2, 16])
def test_check_snapshot_refcounts(tmp_path: Path, bits: int, batches: None) -> None:
    """Clusters shared with a snapshot (refcount 2: no shortcut), and with
    1-bit refcounts overflows reported per reference."""
    img = _make(tmp_path / "x.qcow2", ["-o", f"refcount_bits={bits},cluster_size=4k"], ["write 0 32k"])
    if bits == 1:
        # qemu-img refuses the snapshot itself: share a cluster by hand
        wr64(img, l2_pos(img, 0, 1), rd64(img, l2_pos(img, 0, 0)))
    else:
        subprocess.run(["qemu-img", "snapshot", "-c", "s", str(img)], check=True)
        subprocess.run(["qemu-io", "-c", "write 8k 4k", str(img)], check=True, capture_output=True)
    _same(["check", "x.qcow2"], tmp_path)
    _same(["check", "--output=json", "x.qcow2"], tmp_path)



@pytest.mark.parametrize("repair", [None, "all"])
def test_check_uniform_table_not_copied(tmp_path: Path, repair: str | None, batches: None) -> None:
    """A preallocated table whose entries all lack OFLAG_COPIED is still one
    run of clusters: each entry is reported (and repaired) as qemu-img does."""
    src = _make(tmp_path / "src.qcow2", ["-o", "preallocation=metadata,cluster_size=4k"], [], "4M")
    for i in range(512):
        wr64(src, l2_pos(src, 1, i), rd64(src, l2_pos(src, 1, i)) & NOT_COPIED)
    q, m = twin_copies(src, tmp_path)
    _same(["check", *(["-r", repair] if repair else []), "x.qcow2"], q.parent, m.parent)
    assert m.read_bytes() == q.read_bytes()
