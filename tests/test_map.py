"""qemu-img map: qimg's output on the same files must equal qemu-img's."""

from __future__ import annotations

import os

import pytest
from conftest import assert_same, needs_qemu, run_qemu, run_qemu_io

from qimg.ops import map as ops_map


def _qemu(cwd, *args):
    p = run_qemu(*args, cwd=cwd)
    assert p.returncode == 0, p.stderr


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("map"))
    open(os.path.join(d, "empty"), "wb").close()
    _qemu(d, "create", "-q", "r.raw", "4M")
    run_qemu_io("-f", "raw", "-c", "write -P 1 64k 128k", "-c", "write -P 2 1M 4k", "-c", "write -P 3 3M 1M", "r.raw", cwd=d)
    with open(os.path.join(d, "odd.raw"), "wb") as f:
        f.truncate(5000000)
        f.seek(4999000)
        f.write(b"hi")
    # a chain three deep, the base smaller, different cluster sizes
    _qemu(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "base.qcow2", "2M")
    run_qemu_io("-c", "write -P 1 0 64k", "-c", "write -P 2 1M 512k", "-c", "write -c -P 5 1536k 4k", "base.qcow2", cwd=d)
    _qemu(d, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2", "3M")
    run_qemu_io("-c", "write -z 0 8k", "-c", "write -P 3 32k 64k", "-c", "discard 1M 64k",
                "-c", "write -P 7 2500k 100k", "mid.qcow2", cwd=d)
    _qemu(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=16k", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "4M")
    run_qemu_io("-c", "write -z -u 0 128k", "-c", "write -P 9 3M 512k", "-c", "write -z 3600k 64k", "top.qcow2", cwd=d)
    # the same without compressed clusters, for the human table
    _qemu(d, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "plain.qcow2", "4M")
    run_qemu_io("-c", "write -P 9 3M 512k", "-c", "write -z 100k 8k", "plain.qcow2", cwd=d)
    _qemu(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "nocomp-base.qcow2", "2M")
    run_qemu_io("-c", "write -P 1 0 64k", "-c", "write -P 2 1M 512k", "nocomp-base.qcow2", cwd=d)
    _qemu(d, "create", "-q", "-f", "qcow2", "-b", "nocomp-base.qcow2", "-F", "qcow2", "h.qcow2", "3M")
    run_qemu_io("-c", "write -z 0 8k", "-c", "write -P 3 32k 64k", "-c", "write -P 4 2M 64k", "h.qcow2", cwd=d)
    _qemu(d, "create", "-q", "-f", "qcow2", "-b", "r.raw", "-F", "raw", "onraw.qcow2")
    run_qemu_io("-c", "write -P 5 100k 8k", "onraw.qcow2", cwd=d)
    _qemu(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "c2.qcow2", "5M")
    run_qemu_io("-c", "write -P 1 1M 3M", "c2.qcow2", cwd=d)
    _qemu(d, "create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512", "v2.qcow2", "1000000")
    run_qemu_io("-c", "write -P 1 0 3k", "-c", "write -z 1k 1k", "v2.qcow2", cwd=d)
    for mode in ("metadata", "falloc", "full"):
        _qemu(d, "create", "-q", "-f", "qcow2", "-o", f"preallocation={mode}", f"pre-{mode}.qcow2", "1000000")
    return d


IMAGES = ["r.raw", "odd.raw", "empty", "base.qcow2", "mid.qcow2", "top.qcow2", "plain.qcow2", "h.qcow2",
          "onraw.qcow2", "c2.qcow2", "v2.qcow2", "pre-metadata.qcow2", "pre-falloc.qcow2", "pre-full.qcow2"]
RANGES = [["--start-offset=30k", "--max-length=2M"], ["-s", "1M"], ["-l", "1000"], ["-s", "100M"], ["-l", "0"]]


@needs_qemu
@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("output", ["human", "json"])
def test_map_same_as_qemu(images, name, output):
    assert_same(["map", f"--output={output}", name], images)


@needs_qemu
@pytest.mark.parametrize("name", ["odd.raw", "top.qcow2", "h.qcow2", "pre-metadata.qcow2"])
@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize("rng", RANGES, ids=lambda r: " ".join(r))
def test_map_ranges_same_as_qemu(images, name, output, rng):
    assert_same(["map", f"--output={output}", *rng, name], images)


ERROR_CASES = [
    [],
    ["a", "b"],
    ["nonexist"],
    ["-f", "qcow2", "r.raw"],
    ["--output=xml", "r.raw"],
    ["-s", "1Q", "r.raw"],
    ["-s", "-1", "r.raw"],
    ["--max-length=1x", "r.raw"],
    ["-l", "99E", "r.raw"],
    ["--image-opts", "driver=qcow2,file.filename=h.qcow2"],
    ["--image-opts", "-f", "raw", "r.raw"],
    ["-U", "-f", "raw", "r.raw"],
    [""],
    ["/dev/null"],
]


@needs_qemu
@pytest.mark.parametrize("args", ERROR_CASES, ids=lambda a: " ".join(a) or "<none>")
def test_map_options_and_errors_same_as_qemu(images, args):
    assert_same(["map", *args], images)


@needs_qemu
def test_map_big_preallocated_image(tmp_path):
    _qemu(str(tmp_path), "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", "big.qcow2", "64G")
    assert_same(["map", "--output=json", "big.qcow2"], str(tmp_path))


@pytest.fixture(scope="module")
def one_run_images(tmp_path_factory):
    """Tables that are one run in each way (consecutive host clusters with
    and without the zero flag, all plain zero, all unallocated) next to
    tables that are not, in images of few and of many (> LIGHT_TABLES)
    tables."""
    d = str(tmp_path_factory.mktemp("onerun"))
    _qemu(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k,preallocation=metadata", "pre.qcow2", "64M")
    run_qemu_io("-c", "write -P 1 2M 4k", "-c", "write -z 8M 4M", "-c", "write -P 2 20M 2M",
                "-c", "discard 30M 2M", "-c", "write -z 5000k 12k", "-c", "discard 33M 8k", "pre.qcow2", cwd=d)
    _qemu(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "plain.qcow2", "64M")
    run_qemu_io("-c", "write -z 0 8M", "-c", "write -P 1 9M 4M", "-c", "write -z 10M 4k", "-c", "write -c -P 3 40M 8k", "plain.qcow2", cwd=d)
    _qemu(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k,preallocation=metadata", "many.qcow2", "2200M")
    run_qemu_io("-c", "write -P 1 1G 4k", "many.qcow2", cwd=d)
    return d


@needs_qemu
@pytest.mark.parametrize("name", ["pre.qcow2", "plain.qcow2", "many.qcow2"])
def test_map_one_run_tables(one_run_images, name):
    """The command (a fresh process: tables told without numpy unless there
    are many) and the library (numpy loaded: told by arrays) both map as
    qemu-img does."""
    import json

    import numpy  # noqa: F401  (the library call below then uses it)

    assert_same(["map", "--output=json", name], one_run_images)
    assert_same(["map", name], one_run_images)
    theirs = json.loads(run_qemu("map", "--output=json", name, cwd=one_run_images).stdout)
    mine = ops_map.map(os.path.join(one_run_images, name))
    assert [{k: v for k, v in e.items() if k != "filename"} for e in mine] == theirs


def test_mergeable_follows_qemu():
    a = ops_map.MapEntry(0, 4096, present=True, data=True, offset=8192, filename="f")
    assert ops_map.mergeable(a, ops_map.MapEntry(4096, 512, present=True, data=True, offset=12288, filename="f"))
    assert not ops_map.mergeable(a, ops_map.MapEntry(4096, 512, present=True, data=True, offset=12800, filename="f"))
    assert not ops_map.mergeable(a, ops_map.MapEntry(4096, 512, present=True, data=True, offset=12288, filename="g"))
    assert not ops_map.mergeable(ops_map.MapEntry(0, 0), ops_map.MapEntry(0, 0))


@needs_qemu
def test_library_map_matches_qemu_json(images):
    import json

    theirs = json.loads(run_qemu("map", "--output=json", "top.qcow2", cwd=images).stdout)
    mine = ops_map.map(os.path.join(images, "top.qcow2"))
    assert [{k: v for k, v in e.items() if k != "filename"} for e in mine] == theirs
    assert {e.get("filename") for e in mine if "offset" in e} == {
        os.path.join(images, n) for n in ("top.qcow2", "mid.qcow2", "base.qcow2")}


@needs_qemu
def test_sparse_huge_image_maps_like_qemu(tmp_path):
    # Two clusters far apart in a 64 TiB image: the gaps have no L2 tables and
    # are skipped a table-less stretch at a time (qemu-img itself takes a
    # while here, which keeps the size modest).
    path = str(tmp_path / "huge.qcow2")
    assert run_qemu("create", "-q", "-f", "qcow2", path, "64T").returncode == 0
    run_qemu_io("-c", "write -P 1 100G 1M", "-c", "write -P 2 40T 64k", path)
    assert_same(["map", "--output=json", path], str(tmp_path))
    assert_same(["map", path], str(tmp_path))


@needs_qemu
@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32, 64])
def test_map_preallocated_any_refcount_width(tmp_path, bits):
    """Metadata preallocation is told from the refcounts (their width
    matters to the count) as QEMU tells it: the data clusters of a
    preallocated image read as holes of the file."""
    d = str(tmp_path)
    _qemu(d, "create", "-q", "-f", "qcow2", "-o", f"refcount_bits={bits},preallocation=metadata", "p.qcow2", "300M")
    run_qemu_io("-c", "write -P 1 1M 64k", "p.qcow2", cwd=d)
    assert_same(["map", "--output=json", "p.qcow2"], d)


@pytest.mark.parametrize("seed", range(5))
def test_light_entry_runs_equal_vectorized(seed):
    """The numpy-free classification of L2 tables gives the runs the
    vectorized one gives, once neighbours are merged as the scan merges
    them: every entry type, host steps that break runs, tables that
    are neighbours and tables that are not."""
    import random
    import struct

    from qimg.formats.qcow2 import scan

    rng = random.Random(seed)
    cb = 12
    n = (1 << cb) // 8
    host = 1 << 20
    entries = []
    for _ in range(3 * n):
        kind = rng.choice(["unalloc", "zero", "data", "data", "data", "zero_alloc", "compressed", "jump"])
        if kind == "unalloc":
            e = 0
        elif kind == "zero":
            e = 1
        elif kind == "compressed":
            e = (1 << 62) | rng.randrange(1 << 40)
        else:
            if kind == "jump":
                host += rng.randrange(1, 8) << cb
            e = (1 << 63) | host | (1 if kind == "zero_alloc" else 0)
            host += 1 << cb
        entries.append(e)
    buf = memoryview(struct.pack(f">{len(entries)}Q", *entries))
    rows = [4, 5, 9]

    def merged(runs):
        out = []
        for kind, first, count, h in runs:
            if out and out[-1][0] == kind and out[-1][1] + out[-1][2] == first and (
                    not kind & 1 or h == out[-1][3] + (out[-1][2] << cb)):
                out[-1] = (kind, out[-1][1], out[-1][2] + count, out[-1][3])
            else:
                out.append((kind, first, count, h if kind & 1 else 0))
        return out

    light = scan._entry_runs_light(rows, buf, cb)
    vectorized = scan._entry_runs(rows, scan._native(bytearray(buf), 1 << cb).ravel(), cb)
    assert merged(light) == merged(vectorized)
    assert sum(c for _, _, c, _ in light) == len(rows) * n
