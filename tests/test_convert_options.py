"""convert's copy options against the real qemu-img: -m, -W, -r, -C,
--salvage, --target-is-zero, -n into every writable format, -S, -p and -l.
Same stdout, stderr and exit code, same content and the same allocation
(qemu-img map) as qemu-img's on twin inputs."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from conftest import make_image, needs_qemu, run_qemu, run_qimg
from test_check_helpers import l2_pos

pytestmark = needs_qemu


def _map(path: str, fmt: str) -> list:
    p = run_qemu("map", "--output=json", "-f", fmt, path)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _same_result(a, b) -> None:
    assert (a.stdout.decode(), a.stderr.decode(), a.returncode) == (b.stdout.decode(), b.stderr.decode(),
                                                                      b.returncode)


def _twins(tmp_path, args: list[str], out_fmt: str, src: str, prepare=None) -> tuple[str, str]:
    """convert ``src`` with both programs (same output text and exit code);
    ``prepare(path)`` makes the target first (for -n)."""
    mine, theirs = str(tmp_path / f"mine.{out_fmt}"), str(tmp_path / f"theirs.{out_fmt}")
    for p in (mine, theirs):
        if os.path.exists(p):
            os.unlink(p)
        if prepare is not None:
            prepare(p)
    a = run_qimg("convert", *args, "-O", out_fmt, src, mine)
    b = run_qemu("convert", *args, "-O", out_fmt, src, theirs)
    _same_result(a, b)
    return mine, theirs


def _same_image(mine: str, theirs: str, fmt: str) -> None:
    assert _map(mine, fmt) == _map(theirs, fmt)
    p = run_qemu("compare", "-f", fmt, "-F", fmt, mine, theirs)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.fixture
def src(tmp_path) -> str:
    """4 MiB raw: data with zeroes written inside it (allocated zeroes), a
    hole, more data."""
    return make_image(tmp_path / "src.raw", "4M", "write -P 0x11 0 1M", "write -P 0 128k 256k",
                      "write -P 0x22 3M 64k")


@pytest.mark.parametrize("flag", ["--salvage=1", "--sal=1", "--bitmaps=x", "--target-is-zero=", "--tar=x"])
def test_flag_given_a_value(tmp_path, src, flag):
    # getopt stays silent (qemu-img's optstring starts with ':'): qemu-img
    # calls the whole argument unrecognized
    _twins(tmp_path, [flag], "raw", src)


# ---- -m / -W ---------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "17", "3x", "-5", "08", "0x", ""])
def test_bad_coroutines(tmp_path, src, value):
    mine, theirs = _twins(tmp_path, ["-m", value], "raw", src)
    assert not os.path.exists(mine) and not os.path.exists(theirs)


@pytest.mark.parametrize("value", ["1", "+5", "010", " 0x10"])
def test_coroutines(tmp_path, src, value):
    # without -W the target is written in guest order: the same layout
    mine, theirs = _twins(tmp_path, ["-f", "raw", "-m", value], "qcow2", src)
    _same_image(mine, theirs, "qcow2")
    with open(mine, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("value", ["1", "8"])
def test_out_of_order_writes(tmp_path, src, value):
    # qemu-img's -W layout depends on timing: same content, a clean image
    mine, theirs = _twins(tmp_path, ["-f", "raw", "-W", "-m", value], "qcow2", src)
    assert run_qemu("compare", "-f", "qcow2", "-F", "qcow2", mine, theirs).returncode == 0
    assert run_qemu("check", mine).returncode == 0


# ---- -r --------------------------------------------------------------------

@pytest.mark.parametrize("value", ["-1", "1x"])
def test_bad_rate_limit(tmp_path, src, value):
    _twins(tmp_path, ["-r", value], "raw", src)


def test_rate_limit_slows_the_copy(tmp_path):
    # 3 MiB of data are two writes (2 MiB, 1 MiB): the second waits until
    # the first one's 2 MiB have leaked down to 0.2 MiB at 2 MiB/s (0.9 s),
    # as qemu-img's throttle does
    src = make_image(tmp_path / "r.raw", "8M", "write -P 1 0 3M")
    out = str(tmp_path / "out.raw")
    start = time.monotonic()
    p = run_qimg("convert", "-r", "2M", "-f", "raw", "-O", "raw", src, out)
    took = time.monotonic() - start
    assert p.returncode == 0, p.stderr
    assert took >= 0.9
    assert run_qemu("compare", "-f", "raw", "-F", "raw", src, out).returncode == 0


def test_rate_limit_counts_written_bytes(tmp_path):
    # -r throttles the target's writes: 16 MiB that read as zeroes write
    # nothing to a new qcow2, so at 1 MiB/s the copy still takes no time
    # (a limit on reads would hold it for 15 s)
    src = make_image(tmp_path / "z.raw", "16M", "write -P 0 0 16M")
    out = str(tmp_path / "out.qcow2")
    start = time.monotonic()
    p = run_qimg("convert", "-r", "1M", "-f", "raw", "-O", "qcow2", src, out)
    assert time.monotonic() - start < 8
    assert p.returncode == 0, p.stderr
    assert run_qemu("compare", "-f", "raw", "-F", "qcow2", src, out).returncode == 0


# ---- -C --------------------------------------------------------------------

@pytest.mark.parametrize("args", [["-C", "-c"], ["-C", "-S", "4k"], ["-C", "--salvage"], ["-c", "-C"]])
def test_copy_offloading_refusals(tmp_path, src, args):
    _twins(tmp_path, ["-f", "raw", *args], "qcow2", src)


@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_copy_offloading_copies_data_without_zero_detection(tmp_path, src, out_fmt):
    mine, theirs = _twins(tmp_path, ["-C", "-f", "raw"], out_fmt, src)
    _same_image(mine, theirs, out_fmt)
    # the zeroes inside the data extent were copied, not left out
    assert _map(mine, out_fmt)[0]["length"] == 1 << 20


@pytest.mark.parametrize("out_fmt", ["raw", "qed"])
def test_copy_offloading_falls_back_for_compressed_sources(tmp_path, src, out_fmt):
    comp = str(tmp_path / "c.qcow2")
    assert run_qemu("convert", "-c", "-f", "raw", "-O", "qcow2", src, comp).returncode == 0
    mine, theirs = _twins(tmp_path, ["-C", "-f", "qcow2"], out_fmt, comp)
    _same_image(mine, theirs, out_fmt)


def test_copy_offloading_into_existing_target(tmp_path, src):
    def prepare(path: str) -> None:
        make_image(path, "4M", "write -P 0x55 0 4M")

    mine, theirs = _twins(tmp_path, ["-C", "-n", "-f", "raw"], "raw", src, prepare)
    with open(mine, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()


# ---- --salvage and read errors -------------------------------------------------

def _damaged_compressed(tmp_path) -> str:
    """A compressed qcow2 whose second cluster's compressed stream is
    garbage: reading it fails with EIO."""
    raw = make_image(tmp_path / "d.raw", "4M", "write -P 0x11 0 1M", "write -P 0x33 2M 64k")
    path = str(tmp_path / "d.qcow2")
    assert run_qemu("convert", "-c", "-f", "raw", "-O", "qcow2", raw, path).returncode == 0
    with open(path, "r+b") as f:
        f.seek(l2_pos(Path(path), 0, 1))
        entry = struct.unpack(">Q", f.read(8))[0]
        assert entry >> 62 == 1  # compressed
        f.seek(entry & ((1 << 54) - 1))  # host offset bits for 64k clusters
        f.write(b"\xff" * 200)
    return path


def _bad_block_status(tmp_path) -> str:
    """A qcow2 image with an external data file whose second cluster's L2
    entry says compressed, which such an image cannot have: QEMU calls the
    image corrupt and its block status there fails with EIO."""
    path = str(tmp_path / "bs.qcow2")
    make_image(path, "1M", "write -P 3 0 128k", "write -P 4 512k 64k", fmt="qcow2",
               extra=("-o", f"data_file={tmp_path / 'bs.data'}"))
    with open(path, "r+b") as f:
        f.seek(l2_pos(Path(path), 0, 1))
        f.write(struct.pack(">Q", (1 << 62) | 0x30000))
    return path


@pytest.mark.parametrize("args", [[], ["--salvage"], ["--salvage", "-q"], ["--salvage", "-p", "-m", "1"]])
@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_block_status_error(tmp_path, src, args, out_fmt):
    # named at its offset in its own source (the second one here); without
    # --salvage nothing is written (qemu-img counts the data first); with it
    # each failing sector is warned about twice and read as data
    bad = _bad_block_status(tmp_path)
    mine, theirs = _twins(tmp_path, [*args, src], out_fmt, bad)
    _same_image(mine, theirs, out_fmt)


def test_read_error_message(tmp_path):
    bad = _damaged_compressed(tmp_path)
    _twins(tmp_path, ["-m", "1", "-f", "qcow2"], "raw", bad)


@pytest.mark.parametrize("out_fmt, extra", [("raw", []), ("qcow2", []), ("qcow2", ["-c"]), ("qed", [])])
def test_read_error_keeps_what_came_before(tmp_path, out_fmt, extra):
    # one request at a time (-m 1): the clusters before the damaged one are
    # written and -p counts up to the failing request, as in qemu-img
    bad = _damaged_compressed(tmp_path)
    mine, theirs = _twins(tmp_path, ["-p", "-m", "1", *extra, "-f", "qcow2"], out_fmt, bad)
    _same_image(mine, theirs, out_fmt)


@pytest.mark.parametrize("coroutines", ["1", "2", "8"])
def test_compressed_write_over_allocated_clusters(tmp_path, src, coroutines):
    # qcow2 refuses a compressed write onto an allocated cluster (EIO): the
    # first request fails, and -p shows one request taken per coroutine
    def prepare(path: str) -> None:
        make_image(path, "4M", "write -P 0x55 0 4M", fmt="qcow2")

    mine, theirs = _twins(tmp_path, ["-p", "-m", coroutines, "-n", "-c", "-f", "raw"], "qcow2", src, prepare)
    _same_image(mine, theirs, "qcow2")


@pytest.mark.parametrize("extra", [[], ["-q"]])
def test_salvage_zeroes_what_cannot_be_read(tmp_path, extra):
    bad = _damaged_compressed(tmp_path)
    mine, theirs = _twins(tmp_path, ["-m", "1", "--salvage", *extra, "-f", "qcow2"], "raw", bad)
    with open(mine, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()


def test_salvage_warnings(tmp_path):
    bad = _damaged_compressed(tmp_path)
    p = run_qimg("convert", "-m", "1", "--salvage", "-f", "qcow2", "-O", "raw", bad, str(tmp_path / "o.raw"))
    assert p.returncode == 0
    lines = p.stderr.decode().splitlines()
    assert lines and lines[0] == "qemu-img: warning: error while reading offset 65536: Input/output error"


# ---- --target-is-zero ----------------------------------------------------------

@pytest.mark.parametrize("args", [["--target-is-zero"], ["--target-is-zero", "-B", "x.raw", "-F", "raw"]])
def test_target_is_zero_requires_n(tmp_path, src, args):
    _twins(tmp_path, ["-f", "raw", *args], "qcow2", src)


@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_new_target_over_leading_zeroes(tmp_path, out_fmt):
    # a raw file qemu-img creates has its first block written (file-posix)
    src = make_image(tmp_path / "z.raw", "4M", "write -P 1 1M 64k")
    mine, theirs = _twins(tmp_path, ["-f", "raw"], out_fmt, src)
    _same_image(mine, theirs, out_fmt)


@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
def test_target_is_zero_skips_zero_writes(tmp_path, src, out_fmt):
    def prepare(path: str) -> None:
        make_image(path, "4M", "write -P 0x55 0 4M", fmt=out_fmt)

    mine, theirs = _twins(tmp_path, ["-n", "--target-is-zero", "-f", "raw"], out_fmt, src, prepare)
    _same_image(mine, theirs, out_fmt)


@pytest.mark.parametrize("out_fmt", ["qcow2", "vdi", "qed"])
def test_target_is_zero_leaves_the_rest_of_written_clusters(tmp_path, out_fmt):
    # data that covers part of a target cluster: qemu-img writes just the
    # data, the stale bytes around it stay (the user said they were zeroes)
    src = make_image(tmp_path / "part.raw", "4M", "write -P 0x11 4k 4k", "write -P 0x22 1M 512")

    def prepare(path: str) -> None:
        make_image(path, "4M", "write -P 0x55 0 4M", fmt=out_fmt)

    mine, theirs = _twins(tmp_path, ["-n", "--target-is-zero", "-f", "raw"], out_fmt, src, prepare)
    _same_image(mine, theirs, out_fmt)


# ---- -n into every format --------------------------------------------------------

@pytest.mark.parametrize("out_fmt", ["raw", "qcow2", "qed", "vdi", "qcow", "parallels"])
@pytest.mark.parametrize("size", ["2M", "8M"])
def test_existing_target(tmp_path, src, out_fmt, size):
    def prepare(path: str) -> None:
        make_image(path, size, fmt=out_fmt)

    mine, theirs = _twins(tmp_path, ["-n", "-f", "raw"], out_fmt, src, prepare)
    _same_image(mine, theirs, out_fmt)


@pytest.fixture
def overlay(tmp_path, src) -> str:
    base = str(tmp_path / "base.qcow2")
    assert run_qemu("convert", "-f", "raw", "-O", "qcow2", src, base).returncode == 0
    return make_image(tmp_path / "ov.qcow2", "4M", "write -P 9 2M 100k", fmt="qcow2",
                      extra=("-b", base, "-F", "qcow2"))


@pytest.mark.parametrize("out_fmt", ["raw", "qcow2", "qed", "vdi", "qcow", "parallels"])
@pytest.mark.parametrize("args", [["-B", "base.qcow2"], ["-B", "base.qcow2", "-F", "qcow2"]])
def test_existing_target_with_backing_option(tmp_path, overlay, out_fmt, args):
    # -n has no create options, so -B needs no -F: only the overlay's own
    # clusters are copied, the rest of the target stays as it was
    def prepare(path: str) -> None:
        make_image(path, "4M", "write -P 0x55 0 4M", fmt=out_fmt)

    mine, theirs = _twins(tmp_path, ["-n", *args, "-f", "qcow2"], out_fmt, overlay, prepare)
    _same_image(mine, theirs, out_fmt)


@pytest.mark.parametrize("progress", [[], ["-p"]])
def test_target_is_zero_with_backing_option(tmp_path, overlay, progress):
    # qemu-img reports the conflict but exits 0 (and -p still shows 100%)
    def prepare(path: str) -> None:
        make_image(path, "4M", "write -P 0x55 0 4M", fmt="qcow2")

    mine, theirs = _twins(tmp_path, ["-n", "--target-is-zero", "-B", "base.qcow2", *progress, "-f", "qcow2"],
                          "qcow2", overlay, prepare)
    _same_image(mine, theirs, "qcow2")


@pytest.mark.parametrize("out_fmt, opts", [("qed", "cluster_size=x"), ("qcow2", "cluster_size="),
                                           ("qcow2", "cluster_size=99E"), ("qcow2", "lazy_refcounts=x")])
def test_bad_create_option_value(tmp_path, src, out_fmt, opts):
    # the size parser's hint lines carry no program name
    _twins(tmp_path, ["-f", "raw", "-o", opts], out_fmt, src)


@pytest.mark.parametrize("out_fmt, opts", [("qcow2", "cluster_size=4M"), ("qcow2", "refcount_bits=3"),
                                           ("qed", "cluster_size=3k"), ("vdi", "subformat=x")])
def test_refused_create_option_leaves_no_file(tmp_path, src, out_fmt, opts):
    # the format checks its options before the file protocol creates the file
    (tmp_path / "m").mkdir()
    (tmp_path / "q").mkdir()
    args = ["convert", "-f", "raw", "-o", opts, "-O", out_fmt, src, "out"]
    _same_result(run_qimg(*args, cwd=str(tmp_path / "m")), run_qemu(*args, cwd=str(tmp_path / "q")))
    assert os.listdir(tmp_path / "m") == os.listdir(tmp_path / "q")


@pytest.mark.parametrize("args", [["-p"], ["-q"], ["-n"]])
def test_compressed_qcow_fails_silently(tmp_path, src, args):
    # the empty compressed write that ends the copy is refused by qcow:
    # qemu-img exits 1 without a message, and -p stops short of its last 100%
    def prepare(path: str) -> None:
        if "-n" in args:
            make_image(path, "4M", fmt="qcow")

    mine, theirs = _twins(tmp_path, ["-c", *args, "-f", "raw"], "qcow", src, prepare)
    with open(mine, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("args", [["-O", "qcow2"], ["-O", "raw", "-p"], []])
def test_target_image_opts_with_output_format(tmp_path, src, args):
    target = str(tmp_path / "t.qcow2")
    make_image(target, "4M", fmt="qcow2")
    argv = ["convert", "-n", "--target-image-opts", *args, "-f", "raw", src, f"driver=qcow2,file.filename={target}"]
    _same_result(run_qimg(*argv), run_qemu(*argv))


@pytest.mark.parametrize("args", [
    ["-n", "-O", "raw", "src.raw", "src.raw"],
    ["-n", "-O", "qcow2", "src.raw", "src.raw"],
    ["-O", "qcow2", "src.raw", "./src.raw"],
    ["-n", "-O", "raw", "ov.qcow2", "base.qcow2"],  # the source's backing file
    ["-O", "raw", "ov.qcow2", "base.qcow2"],
    ["-p", "-O", "qcow2", "base.qcow2", "base.qcow2"],
    ["-U", "-n", "-O", "raw", "src.raw", "src.raw"],  # shared: written over
    ["-U", "-O", "qcow2", "ov.qcow2", "base.qcow2"],
])
def test_target_held_by_a_source(tmp_path, overlay, args):
    # the sources are opened unsharing write: the target cannot be one of
    # their files (qemu-img's lock error), unless -U
    q, m = tmp_path / "q", tmp_path / "m"
    for d in (q, m):
        d.mkdir()
        for name in ("src.raw", "base.qcow2", "ov.qcow2"):
            shutil.copy(tmp_path / name, d / name)
        assert run_qemu("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2", cwd=str(d)).returncode == 0
    _same_result(run_qimg("convert", *args, cwd=str(m)), run_qemu("convert", *args, cwd=str(q)))
    for name in ("src.raw", "base.qcow2"):
        assert (m / name).read_bytes() == (q / name).read_bytes()


# ---- -S ----------------------------------------------------------------------------

@pytest.fixture
def holes(tmp_path) -> str:
    """Data with zero runs of many lengths between, at many alignments."""
    import random

    path = tmp_path / "holes.raw"
    rnd = random.Random(5)
    out = bytearray()
    while len(out) < 4 << 20:
        n = rnd.choice([512, 1024, 3072, 4096, 8192, 65536, 200192])
        out += bytes([rnd.randint(1, 255)]) * n if rnd.random() < 0.5 else bytes(n)
    path.write_bytes(bytes(out[:4 << 20]))
    return str(path)


@pytest.mark.parametrize("value, out_fmt", [("0", "raw"), ("512", "qcow2"), ("3584", "raw"), ("8k", "raw"),
                                            ("8k", "qcow2"), ("1M", "raw"), ("16M", "qcow2")])
def test_sparse_sizes(tmp_path, holes, value, out_fmt):
    mine, theirs = _twins(tmp_path, ["-S", value, "-f", "raw"], out_fmt, holes)
    _same_image(mine, theirs, out_fmt)


@pytest.mark.parametrize("value", ["513", "17M", "-1", "1000"])
def test_bad_sparse_sizes(tmp_path, src, value):
    _twins(tmp_path, ["-S", value, "-f", "raw"], "raw", src)


# ---- -p ------------------------------------------------------------------------------

@pytest.fixture
def big(tmp_path) -> str:
    return make_image(tmp_path / "big.raw", "32M", "write -P 1 0 5M", "write -P 2 10M 7M", "write -P 3 24M 3M")


@pytest.mark.parametrize("args", [
    ["-f", "raw"],
    ["-m", "1", "-f", "raw"],
    ["-S", "0", "-f", "raw"],
])
def test_progress(tmp_path, big, args):
    _twins(tmp_path, ["-p", *args], "qcow2", big)


def test_progress_compressed_source(tmp_path, big):
    comp = str(tmp_path / "c.qcow2")
    assert run_qemu("convert", "-c", "-f", "raw", "-O", "qcow2", big, comp).returncode == 0
    mine, theirs = _twins(tmp_path, ["-p", "-f", "qcow2"], "raw", comp)
    _same_image(mine, theirs, "raw")


@pytest.mark.parametrize("base_fmt", ["vdi", "qcow"])
def test_progress_over_block_at_a_time_backing(tmp_path, base_fmt):
    # QEMU's vdi and qcow drivers answer block status one block/cluster at
    # a time, in a backing layer too: -p steps there follow those answers
    base = make_image(tmp_path / f"base.{base_fmt}", "8M", "write -P 1 0 3M", "write -P 2 5M 1M", fmt=base_fmt)
    top = str(tmp_path / "top.qcow2")
    assert run_qemu("create", "-f", "qcow2", "-b", base, "-F", base_fmt, top).returncode == 0
    from conftest import qemu_io_cmds

    qemu_io_cmds(top, "qcow2", "write -P 3 1M 64k")
    mine, theirs = _twins(tmp_path, ["-p", "-f", "qcow2"], "raw", top)
    _same_image(mine, theirs, "raw")


# ---- -l ------------------------------------------------------------------------------

@pytest.fixture
def snapshots(tmp_path) -> str:
    """Snapshot 1 'snap' holds 0x01, snapshot 2 (named '7') 0x02, the active layer 0x03."""
    from conftest import qemu_io_cmds

    path = make_image(tmp_path / "sn.qcow2", "1M", "write -P 1 0 64k", fmt="qcow2")
    assert run_qemu("snapshot", "-c", "snap", path).returncode == 0
    qemu_io_cmds(path, "qcow2", "write -P 2 0 64k")
    assert run_qemu("snapshot", "-c", "7", path).returncode == 0
    qemu_io_cmds(path, "qcow2", "write -P 3 0 64k")
    return path


SNAPSHOT_PARAMS = ["snap", "7", "snapshot.id=1", "snapshot.name=7", "snapshot.id=1,snapshot.name=snap",
                   "snapshot.id=1,snapshot.name=x", "snapshot.id", "snapshot.id=1,foo=2", "nosuch",
                   # QemuOpts' corners: help, bare and no- flags, id=, a trailing comma, ,, in names
                   "snapshot.id=1,help", "snapshot.id=1,?,foo=2", "snapshot.id=1,foo=2,help", "snapshot.id=1,nofoo",
                   "snapshot.id=1,nosnapshot.name", "snapshot.id=1,id=7", "snapshot.id=1,id=a7", "snapshot.id=1,",
                   "snapshot.x,,y=1", "snapshot.id=1,nodelay"]


@pytest.mark.parametrize("param", SNAPSHOT_PARAMS)
def test_convert_snapshot_param(tmp_path, snapshots, param):
    mine, theirs = _twins(tmp_path, ["-l", param, "-f", "qcow2"], "raw", snapshots)
    if os.path.exists(theirs):
        with open(mine, "rb") as a, open(theirs, "rb") as b:
            assert a.read() == b.read()


@pytest.mark.parametrize("param", SNAPSHOT_PARAMS)
def test_measure_snapshot_param(snapshots, param):
    _same_result(run_qimg("measure", "-l", param, "-O", "qcow2", snapshots),
                 run_qemu("measure", "-l", param, "-O", "qcow2", snapshots))


@pytest.mark.parametrize("params", [
    ["snapshot.id=1,id=x", "snapshot.id=2,id=x"],  # refused: one QemuOpts id, twice
    ["snapshot.id=1,id=x", "snapshot.id=2,id=y"],
    ["snapshot.id=1,id=x", "snap"],
    ["id=x", "id=x"],  # not snapshot.*: a name, twice
])
@pytest.mark.parametrize("command", ["convert", "measure"])
def test_snapshot_param_ids_across_options(tmp_path, snapshots, command, params):
    args = [a for p in params for a in ("-l", p)]
    if command == "convert":
        mine, theirs = _twins(tmp_path, [*args, "-f", "qcow2"], "raw", snapshots)
        assert os.path.exists(mine) == os.path.exists(theirs)
    else:
        _same_result(run_qimg("measure", *args, "-O", "qcow2", snapshots),
                     run_qemu("measure", *args, "-O", "qcow2", snapshots))
