"""qcow2 feature combinations found by auditing qimg against qemu-img: each
test runs one command line through both programs on twin copies of an image
and compares what they print and the images they leave."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct

import pytest

from conftest import make_image, needs_qemu, run_qemu, run_qimg

pytestmark = needs_qemu


def _twins(tmp_path):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    shutil.copytree(tmp_path / "src", theirs)
    shutil.copytree(tmp_path / "src", mine)
    return str(mine), str(theirs)


def _both(tmp_path, *cmds):
    """Run each command in ``cmds`` with qimg in one twin directory and with
    qemu-img in the other; assert the same output and status."""
    mine, theirs = _twins(tmp_path)
    for cmd in cmds:
        a, b = run_qimg(*cmd, cwd=mine), run_qemu(*cmd, cwd=theirs)
        assert (_steady(a.stdout), a.stderr, a.returncode) == (_steady(b.stdout), b.stderr, b.returncode), cmd
    return mine, theirs


def _steady(out: bytes) -> bytes:
    """Human output without snapshot dates and disk usage, which two runs
    a moment apart do not share."""
    out = re.sub(rb"disk size: [^\n]*", b"disk size: -", out)
    return re.sub(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", b"DATE", out)


def _info(d, name="a.qcow2"):
    """qemu-img's view of an image, without what depends on the clock or the
    host file system (snapshot dates, disk usage)."""
    p = run_qemu("info", "--output=json", "-U", name, cwd=d)
    out = json.loads(p.stdout)
    out.pop("actual-size", None)
    for sn in out.get("snapshots", []):
        sn.pop("date-sec")
        sn.pop("date-nsec")
    return out, p.stderr


def _src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    return d


def _patch(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def test_failed_check_repair_of_dirty_image_marks_it_clean(tmp_path):
    """check -r leaks cannot fix a dirty image's refcounts, but closing the
    image read-write clears the dirty bit (qcow2_inactivate's mark_clean)."""
    src = _src(tmp_path)
    make_image(src / "a.qcow2", "4M", fmt="qcow2", extra=("-o", "lazy_refcounts=on"))
    # qemu-io's abort leaves the image dirty with refcounts not yet written
    import subprocess

    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 5 0 128k", "-c", "abort", str(src / "a.qcow2")],
                   capture_output=True)
    assert _info(str(src))[0]["dirty-flag"] is True
    mine, theirs = _both(tmp_path, ["check", "-r", "leaks", "a.qcow2"], ["check", "a.qcow2"])
    assert _info(mine) == _info(theirs)
    assert _info(mine)[0]["dirty-flag"] is False
    with open(os.path.join(mine, "a.qcow2"), "rb") as f, open(os.path.join(theirs, "a.qcow2"), "rb") as g:
        assert f.read() == g.read()


def test_downgrade_keeps_allocated_zero_clusters_allocated(tmp_path):
    """compat=0.10 turns a preallocated zero cluster into data zeroed in
    place (no hole punched): map still calls it data, as after qemu-img."""
    src = _src(tmp_path)
    make_image(src / "a.qcow2", "4M", "write -P 1 0 128k", "write -z 64k 64k", "write -z 1M 1M", fmt="qcow2")
    mine, theirs = _both(tmp_path, ["amend", "-o", "compat=0.10", "a.qcow2"], ["map", "--output=json", "a.qcow2"],
                         ["map", "a.qcow2"])
    assert _info(mine) == _info(theirs)


@pytest.mark.parametrize("opts", ["", ",", "a=1,,,", "backing_file=", "backing_fmt=", "backing_file=x.raw"])
def test_amend_refusals(tmp_path, opts):
    src = _src(tmp_path)
    make_image(src / "a.qcow2", "4M", fmt="qcow2")
    mine, theirs = _both(tmp_path, ["amend", "-o", opts, "a.qcow2"], ["info", "a.qcow2"])


def test_downgrade_with_bitmaps_stores_them_as_qemu_does(tmp_path):
    """After compat=0.10 the loaded bitmaps are still stored on close into
    the extension a v2 header keeps (and then ignored by every reader)."""
    src = _src(tmp_path)
    make_image(src / "a.qcow2", "4M", "write -P 1 0 300k", "write -P 2 1M 64k", fmt="qcow2")
    assert run_qemu("bitmap", "--add", "a.qcow2", "b", cwd=str(src)).returncode == 0
    assert run_qemu("bitmap", "--add", "-g", "1M", "a.qcow2", "c", cwd=str(src)).returncode == 0
    mine, theirs = _both(tmp_path, ["amend", "-o", "compat=0.10", "a.qcow2"], ["info", "a.qcow2"],
                         ["check", "a.qcow2"])
    with open(os.path.join(mine, "a.qcow2"), "rb") as f, open(os.path.join(theirs, "a.qcow2"), "rb") as g:
        assert f.read() == g.read()


@pytest.mark.parametrize("cmd", [["amend", "-o", "compat=1.1", "a.qcow2"], ["resize", "a.qcow2", "8M"],
                                 ["check", "-r", "all", "a.qcow2"], ["snapshot", "-c", "x", "a.qcow2"]])
@pytest.mark.parametrize("damage", ["v2", "v3", "unknown-autoclear"])
def test_read_write_open_drops_ignored_header_parts(tmp_path, cmd, damage):
    """A bitmaps extension without its autoclear bit (a v2 image, or a v3
    one that an old program wrote) and unknown autoclear bits are dropped by
    the header rewrite of any read-write open."""
    src = _src(tmp_path)
    make_image(src / "a.qcow2", "4M", "write -P 1 0 300k", fmt="qcow2")
    assert run_qemu("bitmap", "--add", "a.qcow2", "b", cwd=str(src)).returncode == 0
    if damage == "v2":
        assert run_qemu("amend", "-o", "compat=0.10", "a.qcow2", cwd=str(src)).returncode == 0
    elif damage == "v3":
        _patch(src / "a.qcow2", 88, ">Q", 0)
    else:
        _patch(src / "a.qcow2", 88, ">Q", 0x11)
    mine, theirs = _both(tmp_path, cmd, ["info", "a.qcow2"], ["check", "a.qcow2"])
    assert _info(mine) == _info(theirs)
    with open(os.path.join(mine, "a.qcow2"), "rb") as f, open(os.path.join(theirs, "a.qcow2"), "rb") as g:
        a, b = f.read(), g.read()
    if cmd[0] != "snapshot":  # the snapshot's date differs
        assert a == b
    else:
        assert a[:4096] == b[:4096]


@pytest.mark.parametrize("arg", ["--output=json", "--outp=json", "--bogus=1", "--bogus", "--o"])
@pytest.mark.parametrize("command", ["snapshot", "info"])
def test_unrecognized_long_option_named_whole(tmp_path, command, arg):
    src = _src(tmp_path)
    make_image(src / "a.qcow2", "1M", fmt="qcow2")
    _both(tmp_path, [command, "-l", arg, "a.qcow2"] if command == "snapshot" else [command, arg, "a.qcow2"])


CREATE_REFUSALS = [
    "preallocation=", "compression_type=", "backing_fmt=", "encrypt.format=", "data_file=",
    "data_file=,compat=x", "data_file=x.d,compression_type=,compat=0.10",
    "compat=0.10,extended_l2=on,lazy_refcounts=on", "cluster_size=3k,extended_l2=on,compat=0.10",
    "lazy_refcounts=on,compat=0.10,refcount_bits=8", "compat=0.10,compression_type=zstd,data_file=x.d",
    "data_file_raw=on,compression_type=zstd,compat=0.10",
    "backing_file=b.raw,backing_fmt=raw,preallocation=metadata",
    "backing_file=b.raw,backing_fmt=raw,data_file=x.d,data_file_raw=on,preallocation=full",
    "compat=0.10,data_file=x.d,backing_file=b.raw,backing_fmt=raw,preallocation=full",
]


@pytest.mark.parametrize("opts", CREATE_REFUSALS)
def test_create_refusals_in_qemu_order_delete_the_files(tmp_path, opts):
    """qcow2_co_create_opts creates the image (and data) file before checking
    the options: a refusal deletes them, also files that were there."""
    src = _src(tmp_path)
    make_image(src / "b.raw", "1M")
    for name in ("c.qcow2", "x.d"):
        (src / name).write_bytes(b"old")
    mine, theirs = _both(tmp_path, ["create", "-q", "-f", "qcow2", "-o", opts, "c.qcow2", "1M"])
    assert sorted(os.listdir(mine)) == sorted(os.listdir(theirs))
