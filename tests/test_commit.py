"""qemu-img commit: the same command run by qemu-img and qimg on twin
chains; output, exit code and every file of the chain compared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import needs_qemu, run_qemu, run_qimg, same
from test_chains import (assert_same_image, assert_same_output, guest_map, io, make_chain, qemu_ok, run_both,
                         twins)

CHAIN = ("base.raw", "mid.qcow2", "top.qcow2")


def _commit_case(tmp_path: Path, args: list[str], build=make_chain, files=CHAIN, progress=False) -> None:
    q, m = twins(tmp_path, build)
    mine, theirs = run_both(args, q, m)
    assert_same_output(mine, theirs, progress=progress)
    for name in files:
        assert_same_image(name, q, m, fmt="raw" if name.endswith(".raw") else None)


@needs_qemu
@pytest.mark.parametrize("args", [
    ["commit", "top.qcow2"],
    ["commit", "-d", "top.qcow2"],
    ["commit", "-b", "base.raw", "top.qcow2"],
    ["commit", "-q", "-b", "mid.qcow2", "top.qcow2"],
    ["commit", "-f", "qcow2", "-t", "none", "-r", "1M", "top.qcow2"],
    ["commit", "--image-opts", "driver=qcow2,file.filename=top.qcow2"],
])
def test_commit_qcow2_over_qcow2_over_raw(tmp_path: Path, args: list[str]) -> None:
    _commit_case(tmp_path, args)


@needs_qemu
def test_commit_progress(tmp_path: Path) -> None:
    _commit_case(tmp_path, ["commit", "-p", "top.qcow2"], progress=True)


@needs_qemu
def test_commit_into_qcow2_base_grows_it(tmp_path: Path) -> None:
    def build(d: Path) -> None:
        make_chain(d, base_fmt="qcow2")
    _commit_case(tmp_path, ["commit", "-b", "base.qcow2", "top.qcow2"], build,
                 files=("base.qcow2", "mid.qcow2", "top.qcow2"))


@needs_qemu
def test_commit_empties_a_v2_top_by_discarding(tmp_path: Path) -> None:
    def build(d: Path) -> None:
        qemu_ok("create", "-q", "-f", "qcow2", "base.qcow2", "2M", cwd=d)
        io("base.qcow2", "qcow2", "write -P 1 0 2M", cwd=d)
        qemu_ok("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2",
                "top.qcow2", cwd=d)
        io("top.qcow2", "qcow2", "write -P 2 64k 64k", "write -z 1M 128k", cwd=d)
    _commit_case(tmp_path, ["commit", "top.qcow2"], build, files=("base.qcow2", "top.qcow2"))


@needs_qemu
@pytest.mark.parametrize("args", [
    ["commit"],
    ["commit", "a", "b"],
    ["commit", "-x", "top.qcow2"],
    ["commit", "-b", "nothere", "top.qcow2"],
    ["commit", "-b", "", "top.qcow2"],
    ["commit", "-b", "top.qcow2", "top.qcow2"],
    ["commit", "-r", "bad", "top.qcow2"],
    ["commit", "-t", "bad", "top.qcow2"],
    ["commit", "-f", "raw", "top.qcow2"],
    ["commit", "nothere.qcow2"],
    ["commit", "-b", "mid.qcow2", "base.raw"],
])
def test_commit_errors(tmp_path: Path, args: list[str]) -> None:
    _commit_case(tmp_path, args)


@needs_qemu
def test_commit_standalone_image(tmp_path: Path) -> None:
    qemu_ok("create", "-q", "-f", "qcow2", "solo.qcow2", "1M", cwd=tmp_path)
    mine, theirs = same(["commit", "solo.qcow2"], str(tmp_path))
    assert_same_output(mine, theirs)


@needs_qemu
def test_commit_top_reads_as_before_from_the_base(tmp_path: Path) -> None:
    """The whole chain's view survives a commit -b into the bottom, and the
    committed top, emptied, reads all from the chain."""
    make_chain(tmp_path)
    before = (tmp_path / "before.raw")
    qemu_ok("convert", "-O", "raw", "top.qcow2", str(before), cwd=tmp_path)
    p = run_qimg("commit", "-b", "base.raw", "top.qcow2", cwd=str(tmp_path))
    assert p.returncode == 0 and p.stdout == b"Image committed.\n"
    assert run_qemu("compare", "-F", "raw", "top.qcow2", str(before), cwd=str(tmp_path)).returncode == 0
    base_view = tmp_path / "base_view.raw"
    qemu_ok("convert", "-f", "raw", "-O", "raw", "base.raw", str(base_view), cwd=tmp_path)
    assert base_view.read_bytes() == before.read_bytes()


def _interrupted(monkeypatch, target: str, attr: str) -> None:
    """Make ``target.attr`` stop the program as a crash would at that point."""
    import importlib

    module, _, cls = target.rpartition(".")
    owner = getattr(importlib.import_module(module), cls)

    def crash(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, attr, crash)


@needs_qemu
def test_commit_interrupted_before_the_file_is_cut_leaves_a_sound_top(tmp_path: Path, monkeypatch) -> None:
    from qimg.block.image import open_image
    from qimg.ops.commit import commit, find_base, reopen_writable

    # A base as large as the top: the only truncation is make_empty's cut.
    make_chain(tmp_path, base_size="7M")
    before = tmp_path / "before.raw"
    qemu_ok("convert", "-O", "raw", "top.qcow2", str(before), cwd=tmp_path)
    _interrupted(monkeypatch, "qimg.protocols.file.File", "truncate")
    img = open_image(str(tmp_path / "top.qcow2"), read_only=False)
    with pytest.raises(KeyboardInterrupt):
        commit(img, reopen_writable(img, find_base(img, None, "top.qcow2")))
    for layer in img.chain():  # the crash: nothing more is written, and the locks go
        os.close(layer.file.fd)
    p = run_qemu("check", "top.qcow2", cwd=str(tmp_path))
    assert p.returncode in (0, 3), p.stdout  # at worst leaked clusters
    assert b"ERROR" not in p.stdout + p.stderr
    # The crash came after the top was emptied and before the cut.
    assert all(e[0][0] > 0 for e in guest_map("top.qcow2", tmp_path))
    assert (tmp_path / "top.qcow2").stat().st_size > 4 * 65536
    p = run_qemu("compare", "-F", "raw", "top.qcow2", str(before), cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout


@needs_qemu
@pytest.mark.parametrize("args", [["commit", "top.qed"], ["commit", "-d", "top.qed"]])
def test_commit_qed(tmp_path: Path, args: list[str]) -> None:
    def build(d: Path) -> None:
        qemu_ok("create", "-q", "-f", "raw", "base.raw", "1M", cwd=d)
        io("base.raw", "raw", "write -P 1 0 1M", cwd=d)
        qemu_ok("create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", "top.qed", "2M", cwd=d)
        io("top.qed", "qed", "write -P 2 512k 64k", "write -z 0 64k", "write -P 3 1536k 4k", cwd=d)
    _commit_case(tmp_path, args, build, files=("base.raw", "top.qed"))


@needs_qemu
@pytest.mark.parametrize("base", ["base.raw", "sub/base.raw", "mid.qcow2"])
def test_commit_b_names_resolve_against_each_overlay(tmp_path: Path, base: str) -> None:
    """-b is taken relative to each image's directory, as
    bdrv_find_backing_image does ("sub/base.raw" from sub/ is not found)."""
    def build(d: Path) -> None:
        (d / "sub").mkdir()
        make_chain(d / "sub")
    files = tuple(f"sub/{n}" for n in CHAIN)
    _commit_case(tmp_path, ["commit", "-b", base, "sub/top.qcow2"], build, files=files)
