"""qemu-img info: qimg's output on the same files must equal qemu-img's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import (FORCE_REMOVE_HINT, assert_same, make_bad_snapshot_table, needs_qemu, run_qemu, run_qemu_io,
                      run_qimg)

from qimg.ops import info as ops_info


def _qemu(cwd, *args):
    p = run_qemu(*args, cwd=cwd)
    assert p.returncode == 0, p.stderr


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Images made by qemu-img and qemu-io, shared by the tests here."""
    d = str(tmp_path_factory.mktemp("info"))
    os.mkdir(os.path.join(d, "sub"))
    os.mkdir(os.path.join(d, "adir"))
    open(os.path.join(d, "empty"), "wb").close()
    os.symlink("nowhere", os.path.join(d, "dangling"))
    _qemu(d, "create", "-q", "r.raw", "1000000")
    _qemu(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "base.qcow2", "2M")
    run_qemu_io("-c", "write -P 1 0 64k", "-c", "write -c -P 5 1536k 4k", "base.qcow2", cwd=d)
    _qemu(d, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2", "3M")
    run_qemu_io("-c", "write -z 0 8k", "-c", "write -P 3 32k 64k", "mid.qcow2", cwd=d)
    _qemu(d, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "4M")
    _qemu(d, "create", "-q", "-f", "qcow2", "-b", "../top.qcow2", "-F", "qcow2", "sub/s.qcow2")
    _qemu(d, "create", "-q", "-f", "qcow2", "-b", "r.raw", "-F", "raw", "onraw.qcow2")
    _qemu(d, "create", "-q", "-f", "qcow2", "-u", "-b", "nope.qcow2", "-F", "qcow2", "miss.qcow2", "1M")
    _qemu(d, "create", "-q", "-f", "qcow2", "-u", "-b", "loopb.qcow2", "-F", "qcow2", "loopa.qcow2", "1M")
    _qemu(d, "create", "-q", "-f", "qcow2", "-u", "-b", "loopa.qcow2", "-F", "qcow2", "loopb.qcow2", "1M")
    _qemu(d, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "1M")
    _qemu(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,preallocation=full", "fu.qcow2", "100k")
    _qemu(d, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "lazy.qcow2", "1M")
    # a write, then a crash: lazy refcounts leave the image dirty
    subprocess.run(["qemu-io", "-c", "write 0 4k", "-c", "sigraise 9", "lazy.qcow2"], cwd=d, capture_output=True)
    # header damage: the corrupt bit, an unknown incompatible feature, a stub
    _qemu(d, "create", "-q", "-f", "qcow2", "cor.qcow2", "1M")
    shutil.copy(os.path.join(d, "cor.qcow2"), os.path.join(d, "unk.qcow2"))
    _set_incompatible(os.path.join(d, "cor.qcow2"), 2)
    _set_incompatible(os.path.join(d, "unk.qcow2"), 1 << 40)
    with open(os.path.join(d, "trunc.qcow2"), "wb") as f:
        f.write(b"QFI\xfb")
    return d


def _set_incompatible(path, bits):
    with open(path, "r+b") as f:
        f.seek(72)  # incompatible_features, a big-endian u64
        f.write(bits.to_bytes(8, "big"))


IMAGES = ["cor.qcow2", "unk.qcow2", "trunc.qcow2", "r.raw", "empty", "base.qcow2", "mid.qcow2", "top.qcow2", "sub/s.qcow2", "onraw.qcow2",
          "miss.qcow2", "v2.qcow2", "fu.qcow2", "lazy.qcow2"]


@needs_qemu
@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("extra", [[], ["--output=json"], ["--backing-chain"], ["--backing-chain", "--output", "json"]],
                         ids=["human", "json", "chain", "chain-json"])
def test_info_same_as_qemu(images, name, extra):
    assert_same(["info", *extra, name], images)


ERROR_CASES = [
    ["nonexist"],
    ["adir"],
    ["-f", "qcow2", "r.raw"],
    ["-f", "bogus", "r.raw"],
    ["--output=xml", "r.raw"],
    [],
    ["a", "b"],
    ["--image-opts", "-f", "raw", "r.raw"],
    ["--image-opts", "driver=qcow2,file.filename=top.qcow2"],
    ["--image-opts", "file.filename=r.raw", "--output=json"],
    ["--image-opts", "driver=raw,file.filename=nonexist"],
    ["-U", "-f", "raw", "r.raw"],
    ["--backing-chain", "miss.qcow2"],
    ["--backing-chain", "loopa.qcow2"],
    ["--bogus", "r.raw"],
    ["--f", "raw", "r.raw"],
    ["--back", "r.raw"],
    [""],
    ["/dev/null"],
    ["dangling"],
]


@needs_qemu
@pytest.mark.parametrize("args", ERROR_CASES, ids=lambda a: " ".join(a) or "<none>")
def test_info_options_and_errors_same_as_qemu(images, args):
    assert_same(["info", *args], images)


@needs_qemu
def test_info_dirty_image_says_so(images):
    p = assert_same(["info", "lazy.qcow2"], images)
    assert b"cleanly shut down: no\n" in p.stdout


def test_info_does_not_import_numpy(tmp_path):
    path = tmp_path / "x.raw"
    path.write_bytes(bytes(4096))
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "qimg", "info", str(path)],
                       capture_output=True, text=True)
    assert p.returncode == 0
    assert "numpy" not in p.stderr


# ---- the printers, on data qemu-img printed ----------------------------------------


def test_qdict_order_is_qemus():
    # the order qemu-img info --output=json prints ImageInfo's keys in
    keys = ["filename", "format", "dirty-flag", "actual-size", "virtual-size", "cluster-size",
            "backing-filename", "full-backing-filename", "backing-filename-format", "format-specific"]
    assert ops_info.qdict_order(dict.fromkeys(keys)) == [
        "backing-filename-format", "virtual-size", "filename", "cluster-size", "format",
        "actual-size", "format-specific", "full-backing-filename", "backing-filename", "dirty-flag"]


def test_nested_specific_info_printed_like_qemu():
    spec = {"type": "x", "data": {"a-b": True, "list": [{"name": "n", "granularity": 65536}, 7], "empty": []}}
    text = ops_info.format_specific_text(spec)
    assert "    a b: true\n" in text
    assert "    list:\n        [0]:\n            name: n\n            granularity: 65536\n        [1]: 7\n" in text
    assert "    empty:\n" in text


def test_json_text_escapes_like_qemu():
    assert ops_info.json_text({"filename": 'a"\\\n\x01é'}) == '{\n    "filename": "a\\"\\\\\\n\\u0001\\u00E9"\n}\n'
    assert ops_info.json_text({"x": {}}) == '{\n    "x": {\n    }\n}\n'


def test_library_info(images):
    data = ops_info.info(os.path.join(images, "top.qcow2"), backing_chain=True)
    assert [d["format"] for d in data] == ["qcow2"] * 3
    assert data[0]["backing-filename"] == "mid.qcow2"
    assert data[2]["virtual-size"] == 2 << 20
    assert "backing-filename" not in data[2]


@needs_qemu
def test_library_info_matches_qemu_json(images):
    import json

    theirs = json.loads(run_qemu("info", "--output=json", "fu.qcow2", cwd=images).stdout)
    assert ops_info.info(os.path.join(images, "fu.qcow2")) == {
        **theirs, "filename": os.path.join(images, "fu.qcow2")}
    mine = run_qimg("info", "--output=json", "fu.qcow2", cwd=images)
    assert json.loads(mine.stdout) == theirs


@pytest.fixture(scope="module")
def snap_image(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("snap"))
    _qemu(d, "create", "-q", "-f", "qcow2", "snap.qcow2", "1M")
    _qemu(d, "snapshot", "-c", "s1", "snap.qcow2")
    _qemu(d, "snapshot", "-c", "a longer snapshot name", "snap.qcow2")
    _qemu(d, "bitmap", "--add", "snap.qcow2", "bm0")
    _qemu(d, "bitmap", "--add", "-g", "4k", "--disable", "snap.qcow2", "bm1")
    return d


@needs_qemu
@pytest.mark.parametrize("name", ["snap.qcow2"])
def test_human_printer_on_qemus_json(snap_image, name):
    """qemu's own JSON through our human printer gives qemu's human text:
    snapshots table, nested bitmap lists, key order."""
    import json

    data = json.loads(run_qemu("info", "--output=json", name, cwd=snap_image).stdout)
    human = run_qemu("info", name, cwd=snap_image).stdout.decode()
    assert "Snapshot list:" in human and "bitmaps:" in human
    assert ops_info.human_info(data) == human
    chain = json.loads(run_qemu("info", "--backing-chain", "--output=json", name, cwd=snap_image).stdout)
    assert ops_info.json_text(chain) == run_qemu("info", "--backing-chain", "--output=json", name,
                                                 cwd=snap_image).stdout.decode()


@needs_qemu
def test_human_printer_on_qemus_json_chain(images):
    import json

    data = json.loads(run_qemu("info", "--backing-chain", "--output=json", "sub/s.qcow2", cwd=images).stdout)
    assert ops_info.human_info(data) == run_qemu("info", "--backing-chain", "sub/s.qcow2", cwd=images).stdout.decode()


@needs_qemu
@pytest.mark.parametrize("args", [["info", "s.qcow2"], ["info", "--output=json", "s.qcow2"]])
def test_damaged_snapshot_table_hint_as_qemu(tmp_path, args):
    """qemu's hint after the open error carries no program name."""
    make_bad_snapshot_table(tmp_path)
    mine = assert_same(args, str(tmp_path))
    assert mine.stderr.endswith(FORCE_REMOVE_HINT)
