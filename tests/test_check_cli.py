"""The check command line: options, messages and exit codes as qemu-img's,
JSON and quiet output on damaged and repaired images, formats without
checks (exit 63)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import needs_qemu, run_qemu, run_qimg
from test_check_helpers import l2_pos, qemu, qimg_inprocess, set_refcount, twin_copies, wr64

pytestmark = needs_qemu


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "c.qcow2"), "16M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 7 0 256k", "-c", "write -P 8 4M 64k", str(d / "c.qcow2")],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(d / "r.raw"), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2",
                    str(d / "orphan.qcow2"), "1M"], check=True)
    return d


ARGS = [
    [],
    ["c.qcow2", "c.qcow2"],
    ["-r", "foo", "c.qcow2"],
    ["-r"],
    ["--output=xml", "c.qcow2"],
    ["-T", "bad", "c.qcow2"],
    ["-U", "-r", "all", "c.qcow2"],
    ["nonexist.qcow2"],
    ["-f", "qcow2", "r.raw"],
    ["-f", "raw", "r.raw"],
    ["--output=json", "-f", "raw", "r.raw"],
    ["-x", "c.qcow2"],
    ["--image-opts", "driver=qcow2,file.filename=c.qcow2"],
    ["--image-opts", "-f", "qcow2", "driver=qcow2,file.filename=c.qcow2"],
    ["--object", "secret,id=s0,data=x", "c.qcow2"],
    ["-U", "c.qcow2"],
    ["-T", "none", "c.qcow2"],
    ["--force-share", "--output", "json", "c.qcow2"],
    ["--out=json", "c.qcow2"],
    ["-q", "c.qcow2"],
    ["orphan.qcow2"],
]


@pytest.mark.parametrize("args", ARGS, ids=lambda a: " ".join(a) or "no-args")
def test_options_and_errors(images: Path, args: list[str]) -> None:
    assert qimg_inprocess(["check", *args], images) == qemu(["check", *args], images)


def test_end_to_end_subprocess(images: Path) -> None:
    """The installed entry point, as a user runs it."""
    for args in (["check", "c.qcow2"], ["check", "--output=json", "c.qcow2"], ["check", "-f", "raw", "r.raw"]):
        mine, theirs = run_qimg(*args, cwd=str(images)), run_qemu(*args, cwd=str(images))
        assert (mine.stdout, mine.stderr, mine.returncode) == (theirs.stdout, theirs.stderr, theirs.returncode)


def test_probed_raw_repair_warns_then_refuses(images: Path, tmp_path: Path) -> None:
    shutil.copy(images / "r.raw", tmp_path / "r.raw")
    mine = qimg_inprocess(["check", "-r", "all", "r.raw"], tmp_path)
    assert mine == qemu(["check", "-r", "all", "r.raw"], tmp_path)
    assert mine[2] == 63


def _damaged(images: Path, tmp_path: Path) -> tuple[Path, Path]:
    theirs, mine = twin_copies(images / "c.qcow2", tmp_path)
    for p in (theirs, mine):
        set_refcount(p, 5, 2)                       # a leak (and an OFLAG_COPIED error)
        wr64(p, l2_pos(p, 0, 1), ((6 << 16) + 0x200) | (1 << 63))  # an unaligned data cluster
    return theirs, mine


@pytest.mark.parametrize("args", [[], ["--output=json"], ["-q"], ["-q", "--output=json"],
                                  ["-r", "leaks"], ["-r", "leaks", "--output=json"], ["-r", "all", "-q"],
                                  ["-r", "all", "--output=json"]])
def test_damaged_outputs(images: Path, tmp_path: Path, args: list[str]) -> None:
    theirs, mine = _damaged(images, tmp_path)
    result = qimg_inprocess(["check", *args, "x.qcow2"], mine.parent)
    assert result == qemu(["check", *args, "x.qcow2"], theirs.parent)
    assert result[2] in (0, 2, 3)


def test_leaks_only_exit_3_and_json_keys(images: Path, tmp_path: Path) -> None:
    theirs, mine = twin_copies(images / "c.qcow2", tmp_path)
    for p in (theirs, mine):
        cs = 65536
        n = p.stat().st_size // cs
        with open(p, "r+b") as f:
            f.truncate((n + 2) * cs)
        set_refcount(p, n, 1)
        set_refcount(p, n + 1, 3)
    for args in ([], ["--output=json"]):
        out, err, rc = qimg_inprocess(["check", *args, "x.qcow2"], mine.parent)
        assert (out, err, rc) == qemu(["check", *args, "x.qcow2"], theirs.parent)
        assert rc == 3
    assert '"leaks": 2' in out
    out, err, rc = qimg_inprocess(["check", "--output=json", "-r", "leaks", "x.qcow2"], mine.parent)
    assert (out, err, rc) == qemu(["check", "--output=json", "-r", "leaks", "x.qcow2"], theirs.parent)
    assert '"leaks-fixed": 2' in out and rc == 0


def test_library_api(images: Path, tmp_path: Path) -> None:
    """qimg.check returns the same counters qemu-img prints as JSON."""
    import json

    import qimg

    result = qimg.check(str(images / "c.qcow2"))
    theirs = json.loads(qemu(["check", "--output=json", "c.qcow2"], images)[0])
    assert result.image_end_offset == theirs["image-end-offset"]
    assert result.allocated_clusters == theirs["allocated-clusters"]
    assert result.total_clusters == theirs["total-clusters"]
    assert result.exit_code == 0
    from qimg.errors import QimgError

    with pytest.raises(QimgError) as e:
        qimg.check(str(images / "r.raw"), "raw")
    assert e.value.code == 63
