"""qemu-img rebase: the same command run by qemu-img and qimg on twin
chains; output, exit code and the rebased file compared (byte for byte where
qemu-img's own result is deterministic)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import needs_qemu, run_qemu
from test_chains import (assert_same_image, assert_same_output, info_json, io, make_chain, qemu_ok, run_both,
                         twins)


def _build(d: Path) -> None:
    make_chain(d)
    # new backing files: a copy of the base, a shorter and a longer variant
    qemu_ok("convert", "-f", "raw", "-O", "raw", "base.raw", "copy.raw", cwd=d)
    io("copy.raw", "raw", "write -P 8 2M 64k", "write -P 1 3200k 1k", cwd=d)
    qemu_ok("create", "-q", "-f", "qcow2", "short.qcow2", "2M", cwd=d)
    io("short.qcow2", "qcow2", "write -P 1 0 1M", "write -z 1M 64k", cwd=d)
    qemu_ok("create", "-q", "-f", "qcow2", "long.qcow2", "9M", cwd=d)
    io("long.qcow2", "qcow2", "write -P 6 6M 2M", cwd=d)


def _rebase_case(tmp_path: Path, args: list[str], byte_identical: bool = True, build=_build) -> None:
    q, m = twins(tmp_path, build)
    mine, theirs = run_both(args, q, m)
    assert_same_output(mine, theirs)
    name = args[-1]
    if not (q / name).exists():
        return
    if run_qemu("map", name, cwd=str(q)).returncode == 0:
        assert_same_image(name, q, m)
    else:  # a backing file that does not exist (unsafe rebase)
        assert info_json(name, m) == info_json(name, q)
    if byte_identical:
        assert (m / name).read_bytes() == (q / name).read_bytes()
    if (q / "base.raw").exists():
        assert (m / "base.raw").read_bytes() == (q / "base.raw").read_bytes()


@needs_qemu
@pytest.mark.parametrize("args", [
    ["rebase", "-b", "copy.raw", "-F", "raw", "top.qcow2"],
    ["rebase", "-p", "-b", "copy.raw", "-F", "raw", "top.qcow2"],
    ["rebase", "-b", "base.raw", "-F", "raw", "top.qcow2"],
    ["rebase", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
    ["rebase", "-b", "base.raw", "-F", "raw", "mid.qcow2"],
    ["rebase", "-b", "short.qcow2", "-F", "qcow2", "top.qcow2"],
    ["rebase", "-b", "long.qcow2", "-F", "qcow2", "top.qcow2"],
    ["rebase", "-p", "-b", "", "top.qcow2"],
    ["rebase", "-b", "", "-F", "raw", "top.qcow2"],
    ["rebase", "-q", "-p", "-U", "-t", "none", "-T", "writeback", "-f", "qcow2", "-b", "copy.raw", "-F",
     "raw", "top.qcow2"],
    ["rebase", "--image-opts", "-b", "copy.raw", "-F", "raw", "driver=qcow2,file.filename=top.qcow2"],
])
def test_safe_rebase(tmp_path: Path, args: list[str]) -> None:
    _rebase_case(tmp_path, args)


@needs_qemu
def test_safe_rebase_without_F_copies_then_fails_as_qemu(tmp_path: Path) -> None:
    _rebase_case(tmp_path, ["rebase", "-b", "copy.raw", "top.qcow2"])


@needs_qemu
@pytest.mark.parametrize("args", [
    ["rebase", "-u", "-b", "copy.raw", "-F", "raw", "top.qcow2"],
    ["rebase", "-u", "-b", "sub/renamed.raw", "-F", "raw", "top.qcow2"],
    ["rebase", "-u", "-b", "copy.raw", "top.qcow2"],
    ["rebase", "-u", "top.qcow2"],
    ["rebase", "-p", "-u", "-F", "raw", "top.qcow2"],
])
def test_unsafe_rebase_only_rewrites_names(tmp_path: Path, args: list[str]) -> None:
    _rebase_case(tmp_path, args)


@needs_qemu
def test_unsafe_rebase_fixes_a_moved_backing_file(tmp_path: Path) -> None:
    def build(d: Path) -> None:
        make_chain(d)
        (d / "sub").mkdir()
        (d / "mid.qcow2").rename(d / "sub" / "mid.qcow2")
        (d / "base.raw").rename(d / "sub" / "base.raw")
    _rebase_case(tmp_path, ["rebase", "-u", "-b", "sub/mid.qcow2", "-F", "qcow2", "top.qcow2"], build=build)
    # The chain opens again and reads as it did.
    orig = tmp_path / "orig"
    orig.mkdir()
    make_chain(orig)
    p = run_qemu("compare", str(orig / "top.qcow2"), str(tmp_path / "m" / "top.qcow2"))
    assert p.returncode == 0, p.stdout


@needs_qemu
def test_rebase_a_standalone_v2_image_onto_a_backing_file(tmp_path: Path) -> None:
    def build(d: Path) -> None:
        _build(d)
        qemu_ok("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "solo.qcow2", "4M", cwd=d)
        io("solo.qcow2", "qcow2", "write -P 4 64k 64k", cwd=d)
    _rebase_case(tmp_path, ["rebase", "-b", "copy.raw", "-F", "raw", "solo.qcow2"], build=build)


@needs_qemu
@pytest.mark.parametrize("args", [
    ["rebase"],
    ["rebase", "top.qcow2"],
    ["rebase", "-b"],
    ["rebase", "-b", "x", "a", "b"],
    ["rebase", "-b", "nothere", "-F", "raw", "top.qcow2"],
    ["rebase", "-b", "base.raw", "-F", "foo", "top.qcow2"],
    ["rebase", "-t", "bad", "-b", "x", "top.qcow2"],
    ["rebase", "-T", "bad", "-b", "x", "top.qcow2"],
    ["rebase", "-b", "x", "-F", "raw", "nothere.qcow2"],
    ["rebase", "-f", "raw", "-b", "base.raw", "top.qcow2"],
    ["rebase", "-U", "-b", "copy.raw", "-F", "raw", "top.qcow2"],
])
def test_rebase_errors(tmp_path: Path, args: list[str]) -> None:
    _rebase_case(tmp_path, args)


@needs_qemu
def test_rebase_interrupted_before_the_header_write_changes_nothing_visible(tmp_path: Path, monkeypatch) -> None:
    from qimg.block.image import open_image
    from qimg.formats.qcow2 import backing
    from qimg.ops.rebase import rebase

    _build(tmp_path)
    before = tmp_path / "before.raw"
    qemu_ok("convert", "-O", "raw", "top.qcow2", str(before), cwd=tmp_path)

    def crash(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(backing, "change_backing_file", crash)
    img = open_image(str(tmp_path / "top.qcow2"), read_only=False)
    with pytest.raises(KeyboardInterrupt):
        rebase(img, "copy.raw", "raw")
    img.flush()
    os.close(img.file.fd)  # the crash: the process and its image locks are gone
    p = run_qemu("check", "top.qcow2", cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout
    assert info_json("top.qcow2", tmp_path)["backing-filename"] == "mid.qcow2"
    p = run_qemu("compare", "-F", "raw", "top.qcow2", str(before), cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout
    # The differing data is in place already: the new backing file reads
    # the same under it.
    qemu_ok("rebase", "-u", "-b", "copy.raw", "-F", "raw", "top.qcow2", cwd=tmp_path)
    p = run_qemu("compare", "-F", "raw", "top.qcow2", str(before), cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout


def _qed_chain(d: Path) -> None:
    qemu_ok("create", "-q", "-f", "raw", "base.raw", "2M", cwd=d)
    io("base.raw", "raw", "write -P 1 0 1M", cwd=d)
    qemu_ok("convert", "-f", "raw", "-O", "raw", "base.raw", "copy.raw", cwd=d)
    io("copy.raw", "raw", "write -P 5 0 64k", "write -P 6 1500k 1k", cwd=d)
    qemu_ok("create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", "top.qed", cwd=d)
    io("top.qed", "qed", "write -P 2 512k 64k", cwd=d)


@needs_qemu
@pytest.mark.parametrize("args", [
    ["rebase", "-p", "-b", "copy.raw", "-F", "raw", "top.qed"],
    ["rebase", "-b", "", "top.qed"],
    ["rebase", "-u", "-b", "longer-name.qcow2", "-F", "qcow2", "top.qed"],
    ["rebase", "-u", "top.qed"],
])
def test_rebase_qed(tmp_path: Path, args: list[str]) -> None:
    _rebase_case(tmp_path, args, build=_qed_chain)


def test_differing_runs_split_as_compare_buffers() -> None:
    """The runs written are qemu-img's: compare_buffers() walks 512-byte
    sectors (the last may be short) and cuts where differing turns equal."""
    import os
    import random

    from qimg.ops.rebase import _differing_runs

    def reference(a: bytes, b: bytes) -> list[tuple[int, int]]:
        out, i, n = [], 0, len(a)
        while i < n:
            j = min(n, i + 512)
            differs = a[i:j] != b[i:j]
            k = j
            while k < n and (a[k:min(n, k + 512)] != b[k:min(n, k + 512)]) == differs:
                k = min(n, k + 512)
            if differs:
                out.append((i, k))
            i = k
        return out

    rng = random.Random(7)
    for _ in range(200):
        n = rng.choice([512 * rng.randint(1, 64), rng.randint(1, 40000)])
        a = bytearray(os.urandom(n)) if rng.random() < 0.5 else bytearray(n)
        b = bytearray(a)
        for _ in range(rng.randint(0, 6)):
            p, length = rng.randrange(n), rng.randint(1, 3000)
            for q in range(p, min(n, p + length)):
                b[q] ^= rng.randint(1, 255)
        assert _differing_runs(bytes(a), bytes(b)) == reference(bytes(a), bytes(b))
