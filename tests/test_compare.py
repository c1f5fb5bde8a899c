"""compare against the real qemu-img: messages, progress and exit codes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import (FORCE_REMOVE_HINT, assert_same, make_bad_snapshot_table, make_image, needs_qemu, run_qemu,
                      run_qemu_io)
from test_check_helpers import l2_pos


@pytest.fixture
def images(tmp_path):
    a = make_image(tmp_path / "a.raw", "3M", "write -P 0x11 0 64k", "write -P 0x22 1M 4k",
             "write -P 0 1032k 4k", "write -P 0x33 2M 1k")
    shutil.copy(a, tmp_path / "b.raw")
    run_qemu_io("-f", "raw", "-c", "write -P 0x5 1500k 1k", str(tmp_path / "b.raw"))
    shutil.copy(a, tmp_path / "c.raw")
    run_qemu_io("-f", "raw", "-c", "write -P 0x11 1001k 1k", str(tmp_path / "c.raw"))
    big = make_image(tmp_path / "big.raw", "4M")
    with open(a, "rb") as f, open(big, "r+b") as g:
        g.write(f.read())
    shutil.copy(big, tmp_path / "bigdata.raw")
    run_qemu_io("-f", "raw", "-c", "write -P 1 3700k 1k", str(tmp_path / "bigdata.raw"))
    assert run_qemu("convert", "-f", "raw", "-O", "raw", a, str(tmp_path / "sparse.raw")).returncode == 0
    assert run_qemu("convert", "-f", "raw", "-O", "qcow2", a, str(tmp_path / "a.qcow2")).returncode == 0
    assert run_qemu("convert", "-S", "0", "-f", "raw", "-O", "qcow2", a, str(tmp_path / "s0.qcow2")).returncode == 0
    return str(tmp_path)


CASES = [
    ["a.raw", "a.raw"],
    ["a.raw", "b.raw"],
    ["-p", "a.raw", "b.raw"],
    ["b.raw", "a.raw"],
    ["a.raw", "c.raw"],
    ["-q", "a.raw", "b.raw"],
    ["-p", "-q", "a.raw", "a.raw"],
    ["a.raw", "big.raw"],
    ["-p", "big.raw", "a.raw"],
    ["a.raw", "bigdata.raw"],
    ["-p", "bigdata.raw", "a.raw"],
    ["-s", "a.raw", "big.raw"],
    ["-s", "a.raw", "sparse.raw"],
    ["-s", "a.raw", "a.raw"],
    ["-f", "raw", "-F", "qcow2", "a.raw", "a.qcow2"],
    ["-p", "a.raw", "a.qcow2"],
    ["-s", "a.raw", "a.qcow2"],
    ["-s", "a.qcow2", "s0.qcow2"],
    ["-s", "-p", "a.qcow2", "a.qcow2"],
    ["a.raw", "nope"],
    ["nope", "a.raw"],
    ["a.raw"],
    ["a.raw", "b.raw", "c.raw"],
    ["-f", "qcow2", "a.raw", "a.raw"],
    ["-T", "foo", "a.raw", "a.raw"],
    ["-U", "a.raw", "a.raw"],
    ["-x", "a.raw", "a.raw"],
]


@needs_qemu
@pytest.mark.parametrize("argv", CASES, ids=[" ".join(c) for c in CASES])
def test_compare_like_qemu(images, argv) -> None:
    assert_same(["compare", *argv], images)


@needs_qemu
def test_library_result(images) -> None:
    from qimg.ops.compare import compare

    r = compare(f"{images}/a.raw", f"{images}/b.raw", fmt_a="raw", fmt_b="raw")
    assert not r.identical and r.offset == 1500 * 1024 and r.code == 1
    r = compare(f"{images}/big.raw", f"{images}/a.raw", fmt_a="raw", fmt_b="raw")
    assert r.identical and r.warning == "Warning: Image size mismatch!"
    seen = []
    r = compare(f"{images}/a.raw", f"{images}/a.qcow2", fmt_a="raw", progress=seen.append)
    assert r.identical and 99.9 < seen[-1] <= 100.0


@pytest.fixture
def chain(tmp_path):
    run_qemu("create", "-f", "qcow2", str(tmp_path / "base.qcow2"), "4M")
    run_qemu_io("-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -c -P 3 3M 64k", str(tmp_path / "base.qcow2"))
    for name, size in (("top.qcow2", "5M"), ("short.qcow2", "6M")):
        assert run_qemu("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                        str(tmp_path / name), size).returncode == 0
    run_qemu_io("-f", "qcow2", "-c", "write -P 9 64k 64k", "-c", "write -z 256k 128k", "-c", "discard 3M 64k",
                "-c", "write -P 7 4200k 5k", str(tmp_path / "top.qcow2"))
    assert run_qemu("convert", "-O", "raw", str(tmp_path / "top.qcow2"), str(tmp_path / "flat.raw")).returncode == 0
    return str(tmp_path)


CHAIN_CASES = [
    ["top.qcow2", "flat.raw"],
    ["-p", "top.qcow2", "flat.raw"],
    ["-s", "top.qcow2", "flat.raw"],
    ["-s", "top.qcow2", "top.qcow2"],
    ["base.qcow2", "top.qcow2"],
    ["-s", "short.qcow2", "base.qcow2"],
    ["-p", "short.qcow2", "base.qcow2"],
    ["-p", "nope", "flat.raw"],
    ["-p", "-T", "foo", "flat.raw", "flat.raw"],
]


@needs_qemu
@pytest.mark.parametrize("argv", CHAIN_CASES, ids=[" ".join(c) for c in CHAIN_CASES])
def test_compare_chains_like_qemu(chain, argv) -> None:
    assert_same(["compare", *argv], chain)


@needs_qemu
def test_damaged_snapshot_table_hint_as_qemu(tmp_path):
    """qemu's hint after the open error carries no program name."""
    make_bad_snapshot_table(tmp_path)
    mine = assert_same(["compare", "s.qcow2", "s.qcow2"], str(tmp_path))
    assert mine.stderr.endswith(FORCE_REMOVE_HINT)


@pytest.fixture
def long_images(tmp_path):
    """24 MiB images: several 2 MiB chunks in a row of each kind, a
    mismatch and a read error (a compressed cluster whose data is not
    deflate) past the first chunk of a run."""
    raw = make_image(tmp_path / "p.raw", "24M", "write -P 0x21 0 24M")
    shutil.copy(raw, tmp_path / "m.raw")
    run_qemu_io("-f", "raw", "-c", "write -P 0x22 13631493 3", str(tmp_path / "m.raw"))
    shutil.copy(raw, tmp_path / "e.raw")
    run_qemu_io("-f", "raw", "-c", "write -z 4M 6M", str(tmp_path / "e.raw"))
    q = make_image(tmp_path / "bad.qcow2", "24M", "write -P 0x21 0 11M", "write -c -P 0x21 11M 64k",
                   "write -P 0x21 11328k 13248k", fmt="qcow2")
    with open(q, "r+b") as f:
        f.seek(l2_pos(Path(q), 0, 11 << 4))
        f.write((1 << 62).to_bytes(8, "big"))  # compressed, one sector at offset 0: the header
    return str(tmp_path)


@needs_qemu
@pytest.mark.parametrize("args", [["p.raw", "m.raw"], ["-p", "p.raw", "m.raw"], ["-p", "m.raw", "p.raw"],
                                  ["-p", "p.raw", "e.raw"], ["-p", "e.raw", "p.raw"],
                                  ["p.raw", "bad.qcow2"], ["-p", "p.raw", "bad.qcow2"],
                                  ["-p", "bad.qcow2", "m.raw"]])
def test_long_images_like_qemu(long_images, args):
    assert_same(["compare", *args], long_images)
