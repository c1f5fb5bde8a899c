"""Backing chains end to end: chains built by qemu-img, the same operation
run by qemu-img in one directory and by qimg in a twin, and the results
compared (messages, exit codes, content, allocation, qemu-img check).

The helpers here are shared with test_commit.py and test_rebase.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from conftest import needs_qemu, run_qemu, run_qemu_io, run_qimg, same

MiB = 1 << 20


# ---- helpers -------------------------------------------------------------------
def qemu_ok(*args: str, cwd: Path) -> str:
    p = run_qemu(*args, cwd=str(cwd))
    assert p.returncode == 0, p.stderr
    return p.stdout.decode()


def io(img: str, fmt: str, *cmds: str, cwd: Path) -> None:
    args = ["-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run_qemu_io(*args, img, cwd=str(cwd))


def make_chain(d: Path, base_fmt: str = "raw", base_size: str = "4M", mid_size: str = "6M",
               top_size: str | None = "7M") -> None:
    """base (raw or qcow2) <- mid.qcow2 <- top.qcow2, with data, zero
    clusters hiding backing data, unaligned writes and a smaller base."""
    base = f"base.{base_fmt}"
    qemu_ok("create", "-q", "-f", base_fmt, base, base_size, cwd=d)
    io(base, base_fmt, "write -P 1 0 1M", "write -P 7 3M 512k", cwd=d)
    qemu_ok("create", "-q", "-f", "qcow2", "-b", base, "-F", base_fmt, "mid.qcow2", mid_size, cwd=d)
    io("mid.qcow2", "qcow2", "write -P 3 256k 256k", "write -z 3M 64k", "write -P 4 1M 512k", cwd=d)
    size = [top_size] if top_size else []
    qemu_ok("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", *size, cwd=d)
    io("top.qcow2", "qcow2", "write -P 2 512k 100k", "write -P 9 5M 100k", "write -z 0 64k",
       "write -z -u 1M 128k", "write -P 5 3100k 3k", cwd=d)


def twins(tmp_path: Path, build) -> tuple[Path, Path]:
    """Two identical directories: 'q' for qemu-img, 'm' for qimg."""
    q, m = tmp_path / "q", tmp_path / "m"
    # Built twice rather than copied: a copy may fill the holes of sparse
    # raw files, and holes are part of what map shows.
    for d in (q, m):
        d.mkdir()
        build(d)
    return q, m


def guest_map(img: str, cwd: Path, fmt: str | None = None) -> list[tuple]:
    """map --output=json without host offsets, neighbours merged: what is
    allocated where and at which depth, not where the data lies in the file."""
    args = ["map", "--output=json"] + (["-f", fmt] if fmt else []) + [img]
    out: list[tuple] = []
    for e in json.loads(qemu_ok(*args, cwd=cwd)):
        key = (e["depth"], e["present"], e["zero"], e["data"])
        if out and out[-1][0] == key and out[-1][1] + out[-1][2] == e["start"]:
            out[-1] = (key, out[-1][1], out[-1][2] + e["length"])
        else:
            out.append((key, e["start"], e["length"]))
    return out


def info_json(img: str, cwd: Path) -> dict:
    info = json.loads(qemu_ok("info", "--output=json", img, cwd=cwd))
    info.pop("actual-size", None)
    return info


def assert_same_image(name: str, q: Path, m: Path, fmt: str | None = None) -> None:
    """The file qimg left equals the one qemu-img left: info (but for the
    disk size), allocation, content; and qemu-img check finds it clean."""
    assert info_json(name, m) == info_json(name, q)
    assert guest_map(name, m, fmt) == guest_map(name, q, fmt)
    fargs = ["-f", fmt, "-F", fmt] if fmt else []
    p = run_qemu("compare", *fargs, str(q / name), str(m / name))
    assert p.returncode == 0, p.stdout + p.stderr
    if name.endswith(".qcow2"):
        p = run_qemu("check", name, cwd=str(m))
        assert p.returncode == 0, p.stdout + p.stderr


def run_both(args: list[str], q: Path, m: Path):
    """Run ``args`` by qemu-img in q and by qimg in m; return both."""
    return run_qimg(*args, cwd=str(m)), run_qemu(*args, cwd=str(q))


def assert_same_output(mine, theirs, progress: bool = False) -> None:
    out_m, out_q = mine.stdout.decode(), theirs.stdout.decode()
    if progress:
        # Between 0% and 100% the lines a job prints depend on timing.
        def ends(text: str) -> str:
            return re.sub(r"(    \(\d+\.\d\d/100%\)\r)+", lambda mo: _first_last(mo.group(0)), text)
        out_m, out_q = ends(out_m), ends(out_q)
    assert out_m == out_q
    assert mine.stderr.decode() == theirs.stderr.decode()
    assert mine.returncode == theirs.returncode


def _first_last(block: str) -> str:
    lines = block.split("\r")[:-1]
    return lines[0] + "\r" + lines[-1] + "\r"


# ---- chain semantics ---------------------------------------------------------------
@needs_qemu
def test_info_backing_chain_and_map_three_deep(tmp_path: Path) -> None:
    make_chain(tmp_path)
    for args in (["info", "--backing-chain", "top.qcow2"], ["map", "top.qcow2"],
                 ["map", "--output=json", "top.qcow2"], ["compare", "top.qcow2", "mid.qcow2"]):
        mine, theirs = same(args, str(tmp_path))
        assert_same_output(mine, theirs)


@needs_qemu
def test_relative_names_resolve_against_the_overlay_directory(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    make_chain(sub)
    for args in (["info", "--backing-chain", "sub/top.qcow2"], ["map", "sub/top.qcow2"],
                 ["compare", "sub/top.qcow2", "sub/mid.qcow2"]):
        mine, theirs = same(args, str(tmp_path))
        assert_same_output(mine, theirs)


@needs_qemu
def test_missing_backing_file_message(tmp_path: Path) -> None:
    make_chain(tmp_path)
    (tmp_path / "base.raw").unlink()
    for args in (["info", "top.qcow2"], ["map", "top.qcow2"], ["commit", "top.qcow2"],
                 ["rebase", "-b", "x", "top.qcow2"]):
        mine, theirs = same(args, str(tmp_path))
        assert_same_output(mine, theirs)


@needs_qemu
def test_backing_loop_is_refused(tmp_path: Path) -> None:
    qemu_ok("create", "-q", "-f", "qcow2", "a.qcow2", "1M", cwd=tmp_path)
    qemu_ok("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", cwd=tmp_path)
    qemu_ok("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2", cwd=tmp_path)
    # Read-write, qemu-img meets its own lock on the looping file.
    mine, theirs = same(["commit", "b.qcow2"], str(tmp_path))
    assert_same_output(mine, theirs)
    # Read-only, qemu-img 7.2 recurses for ever; we stop with an error.
    mine = run_qimg("map", "b.qcow2", cwd=str(tmp_path))
    assert mine.returncode == 1
    assert mine.stderr == (b"qemu-img: Could not open 'b.qcow2': Could not open backing file: Could not open "
                           b"backing file: Backing file 'b.qcow2' creates an infinite loop.\n")


@needs_qemu
def test_create_b_takes_the_backing_size_and_u_skips_opening(tmp_path: Path) -> None:
    q, m = twins(tmp_path, lambda d: qemu_ok("create", "-q", "-f", "raw", "base.raw", "3M", cwd=d))
    cases = [
        (["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "o1.qcow2"], "o1.qcow2"),
        (["create", "-f", "qcow2", "-b", "nothere", "-F", "raw", "o2.qcow2"], None),
        (["create", "-f", "qcow2", "-u", "-b", "nothere", "-F", "raw", "o3.qcow2", "1M"], "o3.qcow2"),
        (["create", "-f", "qcow2", "-u", "-b", "nothere", "-F", "raw", "o4.qcow2"], None),
    ]
    for args, made in cases:
        mine, theirs = run_both(args, q, m)
        assert_same_output(mine, theirs)
        if made:
            assert info_json(made, m) == info_json(made, q)


@needs_qemu
def test_convert_B_keeps_only_the_differences(tmp_path: Path) -> None:
    def build(d: Path) -> None:
        make_chain(d)
    q, m = twins(tmp_path, build)
    args = ["convert", "-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", "top.qcow2", "out.qcow2"]
    mine, theirs = run_both(args, q, m)
    assert_same_output(mine, theirs)
    assert_same_image("out.qcow2", q, m)
    p = run_qemu("compare", "top.qcow2", "out.qcow2", cwd=str(m))
    assert p.returncode == 0


# ---- the recipes users rely on -----------------------------------------------------
@needs_qemu
def test_diff_recipe_gives_a_thin_image_of_the_differences(tmp_path: Path) -> None:
    """qemu-img's documentation: an overlay over a modified copy, rebased
    onto the original, holds only what the copy changed."""
    d = tmp_path
    qemu_ok("create", "-q", "-f", "qcow2", "orig.qcow2", "8M", cwd=d)
    io("orig.qcow2", "qcow2", "write -P 1 0 8M", cwd=d)
    qemu_ok("convert", "-O", "qcow2", "orig.qcow2", "modified.qcow2", cwd=d)
    io("modified.qcow2", "qcow2", "write -P 2 1M 64k", "write -z 5M 128k", "write -P 3 7M 512", cwd=d)
    qemu_ok("create", "-q", "-f", "qcow2", "-b", "modified.qcow2", "-F", "qcow2", "diff.qcow2", cwd=d)
    shutil.copy(d / "diff.qcow2", d / "qdiff.qcow2")
    mine = run_qimg("rebase", "-b", "orig.qcow2", "-F", "qcow2", "diff.qcow2", cwd=str(d))
    theirs = run_qemu("rebase", "-b", "orig.qcow2", "-F", "qcow2", "qdiff.qcow2", cwd=str(d))
    assert_same_output(mine, theirs)
    # The thin image over the original reads as the modified copy...
    assert run_qemu("compare", "diff.qcow2", "modified.qcow2", cwd=str(d)).returncode == 0
    assert run_qemu("check", "diff.qcow2", cwd=str(d)).returncode == 0
    # ...and allocates exactly what qemu-img's rebase allocates.
    assert guest_map("diff.qcow2", d) == guest_map("qdiff.qcow2", d)
    allocated = [e for e in guest_map("diff.qcow2", d) if e[0][0] == 0]
    assert sum(e[2] for e in allocated) == 64 * 1024 + 128 * 1024 + 65536


@needs_qemu
def test_merge_a_chain_into_a_copy_of_its_base(tmp_path: Path) -> None:
    """Copy the base, rebase the top onto the copy, commit: the copy then
    holds the whole chain's content; the original chain is untouched."""
    q, m = twins(tmp_path, make_chain)
    for d, runner in ((q, run_qemu), (m, run_qimg)):
        shutil.copy(d / "base.raw", d / "merged.raw")
        p = runner("rebase", "-b", "merged.raw", "-F", "raw", "top.qcow2", cwd=str(d))
        assert p.returncode == 0, p.stderr
        p = runner("commit", "top.qcow2", cwd=str(d))
        assert p.returncode == 0, p.stderr
        assert p.stdout == b"Image committed.\n"
    for name in ("merged.raw", "top.qcow2"):
        assert_same_image(name, q, m)
    # The merged copy reads as the original chain did.
    orig = tmp_path / "orig"
    orig.mkdir()
    make_chain(orig)
    p = run_qemu("compare", "-F", "raw", str(orig / "top.qcow2"), str(m / "merged.raw"))
    assert p.returncode == 0, p.stdout
    assert (m / "base.raw").read_bytes() == (orig / "base.raw").read_bytes()


@needs_qemu
def test_no_traceback_on_hostile_backing_names(tmp_path: Path) -> None:
    qemu_ok("create", "-q", "-f", "qcow2", "a.qcow2", "1M", cwd=tmp_path)
    long_name = "x" * 1100
    for args in (["rebase", "-u", "-b", long_name, "-F", "raw", "a.qcow2"],
                 ["rebase", "-u", "-b", "nbd:localhost:1", "-F", "raw", "a.qcow2"]):
        mine, theirs = same(args, str(tmp_path))
        assert_same_output(mine, theirs)
    assert info_json("a.qcow2", tmp_path)["backing-filename"] == "nbd:localhost:1"


@needs_qemu
def test_json_backing_name(tmp_path: Path) -> None:
    qemu_ok("create", "-q", "-f", "raw", "b.raw", "2M", cwd=tmp_path)
    io("b.raw", "raw", "write -P 4 0 64k", cwd=tmp_path)
    name = 'json:{"driver":"raw","file":{"driver":"file","filename":"b.raw"}}'
    qemu_ok("create", "-q", "-f", "qcow2", "-b", name, "-F", "raw", "o.qcow2", cwd=tmp_path)
    for args in (["info", "o.qcow2"], ["map", "o.qcow2"], ["info", name], ["compare", "o.qcow2", "b.raw"],
                 ["info", 'json:{"driver":"raw",'], ["info", "json:[1]"]):
        mine, theirs = same(args, str(tmp_path))
        assert_same_output(mine, theirs)
