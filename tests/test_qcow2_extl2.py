"""qcow2 extended L2 entries (extended_l2=on, 32 subclusters per cluster),
compared with qemu-img and qemu-io: creation, reads of images qemu-io wrote,
and the same guest requests through qimg leaving the same file."""

from __future__ import annotations

import random
import subprocess

import pytest

from conftest import needs_qemu, run_qemu, run_qemu_io, run_qimg
from qimg.block.image import open_image
from qimg.errors import QimgError

pytestmark = needs_qemu

EXTL2 = "extended_l2=on"


def _qemu_ok(*args: str) -> None:
    r = run_qemu(*args)
    assert r.returncode == 0, r.stderr


def _apply(img, ops) -> list[str]:
    """Run ``ops`` through qimg's API; return the same requests as qemu-io commands."""
    cmds = []
    for kind, off, n, pat in ops:
        if kind == "w":
            cmds.append(f"write -P {pat} {off} {n}")
            img.write(off, bytes([pat]) * n)
        elif kind in "zZ":
            cmds.append(f"write -z {'-u ' if kind == 'Z' else ''}{off} {n}")
            img.write_zeroes(off, n, kind == "Z")
        elif kind == "d":
            cmds.append(f"discard {off} {n}")
            img.discard(off, n)
        else:
            cmds.append(f"write -c -P {pat} {off} {n}")
            img.write_compressed(off, bytes([pat]) * n)
    return cmds


def _same_map_and_check(path) -> None:
    for args in (["map", "--output=json"], ["map"], ["info"], ["check"]):
        mine, theirs = run_qimg(*args, str(path)), run_qemu(*args, str(path))
        assert (mine.returncode, mine.stdout, mine.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr), args


def _content_same(path) -> None:
    raw = path.parent / (path.name + ".raw")
    _qemu_ok("convert", "-O", "raw", str(path), str(raw))
    with open_image(str(path)) as img:
        assert img.read(0, img.size) == raw.read_bytes()


# ---- create ------------------------------------------------------------------------------
@pytest.mark.parametrize("cs", ["16k", "64k", "2M"])
@pytest.mark.parametrize("prealloc", ["off", "metadata"])
def test_create_identical(tmp_path, cs, prealloc):
    opts = f"{EXTL2},cluster_size={cs},preallocation={prealloc}"
    for size in ("5M", "1048064"):
        q, m = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
        _qemu_ok("create", "-q", "-f", "qcow2", "-o", opts, str(q), size)
        assert run_qimg("create", "-q", "-f", "qcow2", "-o", opts, str(m), size).returncode == 0
        assert m.read_bytes() == q.read_bytes()
        _same_map_and_check(m)


@pytest.mark.parametrize("opts", [f"{EXTL2},cluster_size=8k", f"{EXTL2},cluster_size=512",
                                  f"{EXTL2},compat=0.10", f"{EXTL2},cluster_size=4M"])
def test_create_refused(tmp_path, opts):
    args = ["create", "-f", "qcow2", "-o", opts, str(tmp_path / "x.qcow2"), "1M"]
    mine, theirs = run_qimg(*args), run_qemu(*args)
    assert (mine.returncode, mine.stdout, mine.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)


def test_open_refuses_tiny_subclusters(tmp_path):
    """An extended L2 image with 8 KiB clusters has 256-byte subclusters."""
    p = tmp_path / "x.qcow2"
    _qemu_ok("create", "-q", "-f", "qcow2", "-o", f"{EXTL2},cluster_size=16k", str(p), "1M")
    data = bytearray(p.read_bytes())
    data[20:24] = (13).to_bytes(4, "big")
    p.write_bytes(bytes(data))
    mine, theirs = run_qimg("info", str(p)), run_qemu("info", str(p))
    assert (mine.returncode, mine.stderr) == (theirs.returncode, theirs.stderr)


# ---- requests ------------------------------------------------------------------------------
# Partial subcluster writes, zero writes of whole and partial subclusters and
# clusters, discards, overwrites of zeroed subclusters, compressed clusters
# partly overwritten and zeroed (64 KiB clusters: 2 KiB subclusters).
OPS = [("w", 4096, 4096, 0x22), ("z", 65536, 2048, 0), ("z", 131072, 65536, 0), ("w", 204800, 1024, 3),
       ("d", 262144, 65536, 0), ("w", 300 << 10, 100 << 10, 5), ("z", 310 << 10, 1024, 0),
       ("w", 0, 1024, 7), ("Z", 300 << 10, 64 << 10, 0), ("w", 66000, 100, 9), ("z", 140000, 700, 0),
       ("w", 131072 + 5000, 3000, 11), ("c", 512 << 10, 65536, 12), ("c", 640 << 10, 65536, 14),
       ("w", (512 << 10) + 3000, 10, 13), ("z", (640 << 10) + 2048, 4096, 0), ("z", 700 << 10, 200 << 10, 0),
       ("w", 1000 << 10, 24 << 10, 15)]


@pytest.mark.parametrize("backing", [False, True])
def test_same_requests_same_file_as_qemu_io(tmp_path, backing):
    """The same guest requests through qemu-io and through qimg's API leave
    byte-identical files; map, info and check print the same."""
    opts = EXTL2
    if backing:
        base = tmp_path / "base.raw"
        base.write_bytes(bytes(range(1, 256)) * 4112)  # ~1 MiB, nowhere zero
        opts += ",backing_file=base.raw,backing_fmt=raw"
    theirs, mine = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
    for p in (theirs, mine):
        _qemu_ok("create", "-q", "-f", "qcow2", "-o", opts, str(p), "1M")
    with open_image(str(mine), "qcow2", read_only=False) as img:
        cmds = _apply(img, OPS)
    r = run_qemu_io(*[x for c in cmds for x in ("-c", c)], str(theirs))
    assert r.returncode == 0, r.stderr
    assert mine.read_bytes() == theirs.read_bytes()
    _same_map_and_check(theirs)
    _content_same(theirs)


@pytest.mark.parametrize("seed", [1, 2])
def test_random_requests_match_qemu_io(tmp_path, seed):
    """Random requests of every kind: same file as qemu-io's, same content."""
    rnd = random.Random(seed)
    cs = 16384
    size = 24 * cs + 1536
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(rnd.randrange(1, 256) for _ in range(20 * cs)))
    opts = f"{EXTL2},cluster_size=16k,backing_file=base.raw,backing_fmt=raw"
    theirs, mine = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
    for p in (theirs, mine):
        _qemu_ok("create", "-q", "-f", "qcow2", "-o", opts, str(p), str(size))
    ops = []
    for _ in range(60):
        kind = rnd.choice("wwwzZdc")
        off = rnd.randrange(size) // 512 * 512
        n = min(rnd.randrange(1, 3 * cs) // 512 * 512 + 512, size - off)
        if kind == "c":
            off = off // cs * cs
            n = min(cs, size - off)
        ops.append((kind, off, n, rnd.randrange(1, 256)))
    # One qemu-io run and one qimg session for all requests; compressed
    # writes onto allocated clusters fail in both and the rest goes on.
    r = subprocess.run(["qemu-io", *[x for op in ops for x in ("-c", _qemu_io_cmd(op))], str(theirs)],
                       capture_output=True, timeout=60)
    failed = r.stdout.count(b"write failed: Input/output error")
    assert r.stdout.count(b"failed") == failed, r.stdout
    refused = 0
    with open_image(str(mine), "qcow2", read_only=False) as img:
        for op in ops:
            try:
                _apply(img, [op])
            except QimgError as e:
                assert op[0] == "c" and e.message == "Input/output error"
                refused += 1
    assert refused == failed
    assert mine.read_bytes() == theirs.read_bytes()
    _same_map_and_check(mine)
    _content_same(mine)


def _qemu_io_cmd(op) -> str:
    kind, off, n, pat = op
    if kind == "w":
        return f"write -P {pat} {off} {n}"
    if kind in "zZ":
        return f"write -z {'-u ' if kind == 'Z' else ''}{off} {n}"
    if kind == "d":
        return f"discard {off} {n}"
    return f"write -c -P {pat} {off} {n}"


# ---- commands on extended-L2 images ------------------------------------------------------
def _commit_rebase_setup(d) -> None:
    _qemu_ok("create", "-q", "-f", "qcow2", "-o", EXTL2, str(d / "base.qcow2"), "2M")
    run_qemu_io("-c", "write -P 1 0 2M", "-c", "write -z 100k 50k", "-c", "discard 1M 64k", str(d / "base.qcow2"))
    _qemu_ok("create", "-q", "-f", "qcow2", "-o", EXTL2, "-b", "base.qcow2", "-F", "qcow2", str(d / "top.qcow2"))
    run_qemu_io("-c", "write -P 2 4k 3k", "-c", "write -z 200k 70k", "-c", "write -P 3 1000k 100k",
                "-c", "discard 512k 128k", str(d / "top.qcow2"))
    _qemu_ok("create", "-q", "-f", "qcow2", "-o", EXTL2, str(d / "other.qcow2"), "2M")
    run_qemu_io("-c", "write -P 9 0 300k", str(d / "other.qcow2"))


@pytest.mark.parametrize("cmd", [["commit", "-q", "top.qcow2"],
                                 ["rebase", "-q", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"]])
def test_commit_rebase_like_qemu_img(tmp_path, cmd):
    """commit into and rebase of extended-L2 images leave the files qemu-img leaves."""
    q, m = tmp_path / "q", tmp_path / "m"
    for d in (q, m):
        d.mkdir()
        _commit_rebase_setup(d)
    _qemu_ok(*cmd[:-1], str(q / cmd[-1]))
    assert run_qimg(*cmd[:-1], str(m / cmd[-1])).returncode == 0
    for name in ("base.qcow2", "top.qcow2", "other.qcow2"):
        assert (m / name).read_bytes() == (q / name).read_bytes(), name
        assert run_qemu("check", str(m / name)).returncode == 0


def test_convert_like_qemu_img(tmp_path):
    """convert -O qcow2 -o extended_l2=on leaves unwritten subclusters
    unallocated just as qemu-img does; the copy reads back the same."""
    rnd = random.Random(5)
    src = bytearray(3 << 20)
    for _ in range(40):
        o, n = rnd.randrange(len(src) - 20000), rnd.randrange(1, 20000)
        src[o:o + n] = bytes([rnd.randrange(1, 256)]) * n
    (tmp_path / "s.raw").write_bytes(bytes(src))
    q, m = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
    _qemu_ok("convert", "-O", "qcow2", "-o", EXTL2, str(tmp_path / "s.raw"), str(q))
    assert run_qimg("convert", "-O", "qcow2", "-o", EXTL2, str(tmp_path / "s.raw"), str(m)).returncode == 0
    assert m.read_bytes() == q.read_bytes()
    _same_map_and_check(m)
    assert run_qemu("compare", str(tmp_path / "s.raw"), str(m)).returncode == 0
    # and back: an extended-L2 source converts to the same raw image
    assert run_qimg("convert", "-O", "raw", str(q), str(tmp_path / "back.raw")).returncode == 0
    assert (tmp_path / "back.raw").read_bytes() == bytes(src)


# ---- corrupt bitmaps ----------------------------------------------------------------------
@pytest.mark.parametrize("index,bitmap", [(0, 0x1_00000003),  # allocated and zero at once
                                          (1, 0x3),           # allocated in an unallocated cluster
                                          (2, 0x5)])          # a compressed cluster with a bitmap
def test_corrupt_bitmaps_like_qemu_img(tmp_path, index, bitmap):
    p = tmp_path / "i.qcow2"
    _qemu_ok("create", "-q", "-f", "qcow2", "-o", EXTL2, str(p), "1M")
    run_qemu_io("-c", "write -P 1 0 64k", "-c", "write -c -P 2 128k 64k", str(p))
    data = bytearray(p.read_bytes())
    l1 = int.from_bytes(data[40:48], "big")
    l2 = int.from_bytes(data[l1:l1 + 8], "big") & 0x00FFFFFFFFFFFE00
    data[l2 + 16 * index + 8:l2 + 16 * index + 16] = bitmap.to_bytes(8, "big")
    p.write_bytes(bytes(data))
    for args in (["check"], ["map", "--output=json"], ["convert", "-O", "raw", str(p), str(tmp_path / "o.raw")],
                 ["compare", str(p), str(p)]):
        if args[0] in ("check", "map"):
            args = args + [str(p)]
        mine, theirs = run_qimg(*args), run_qemu(*args)
        assert (mine.returncode, mine.stdout, mine.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr), args


def test_writes_to_clusters_shared_with_a_snapshot(tmp_path):
    """Writes into clusters a snapshot shares (new host clusters, copy-on-write
    from the first allocated subcluster on, compressed ones copied whole)
    leave the file qemu-io leaves."""
    q, m = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
    _qemu_ok("create", "-q", "-f", "qcow2", "-o", EXTL2, str(q), "1M")
    run_qemu_io("-c", "write -P 1 4k 8k", "-c", "write -P 2 64k 64k", "-c", "write -z 130k 4k",
                "-c", "write -P 3 200k 6k", "-c", "write -c -P 4 320k 64k", str(q))
    _qemu_ok("snapshot", "-c", "s1", str(q))
    m.write_bytes(q.read_bytes())
    ops = [("w", 20000, 3000, 5), ("w", 70000, 100, 6), ("w", 131072 + 10000, 2000, 7),
           ("w", (200 << 10) + 1000, 100, 8), ("z", (200 << 10) + 4096, 1024, 0), ("w", (320 << 10) + 5000, 10, 9),
           ("Z", 64 << 10, 64 << 10, 0), ("d", 128 << 10, 64 << 10, 0)]
    with open_image(str(m), "qcow2", read_only=False) as img:
        cmds = _apply(img, ops)
    run_qemu_io(*[x for c in cmds for x in ("-c", c)], str(q))
    assert m.read_bytes() == q.read_bytes()
    _same_map_and_check(m)


@pytest.mark.parametrize("args", [["2M"], ["--shrink", "512k"], ["--preallocation=metadata", "3M"],
                                  ["--preallocation=full", "3M"], ["--preallocation=falloc", "2304k"]])
@pytest.mark.parametrize("backing", [False, True])
def test_resize_like_qemu_img(tmp_path, args, backing):
    """Growing (a backing file reaching past the old end makes QEMU allocate
    every new subcluster) and shrinking leave the file qemu-img leaves."""
    q, m = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
    opts = EXTL2
    if backing:
        (tmp_path / "b.raw").write_bytes(b"\x07" * (3 << 20))
        opts += ",backing_file=b.raw,backing_fmt=raw"
    _qemu_ok("create", "-q", "-f", "qcow2", "-o", opts, str(q), "1000k")
    run_qemu_io("-c", "write -P 1 0 100k", "-c", "write -z 200k 5k", "-c", "write -P 2 990k 2k",
                "-c", "write -z 970k 2k", str(q))
    m.write_bytes(q.read_bytes())
    _qemu_ok("resize", "-q", str(q), *args)
    assert run_qimg("resize", "-q", str(m), *args).returncode == 0
    assert m.read_bytes() == q.read_bytes()


@pytest.mark.parametrize("opts", ["compat=0.10", "refcount_bits=4", "lazy_refcounts=on", "extended_l2=off"])
def test_amend_like_qemu_img(tmp_path, opts):
    q, m = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
    _qemu_ok("create", "-q", "-f", "qcow2", "-o", EXTL2, str(q), "1M")
    run_qemu_io("-c", "write -P 1 0 100k", "-c", "write -z 200k 5k", str(q))
    m.write_bytes(q.read_bytes())
    mine, theirs = run_qimg("amend", "-o", opts, str(m)), run_qemu("amend", "-o", opts, str(q))
    assert (mine.returncode, mine.stdout, mine.stderr) == \
        (theirs.returncode, theirs.stdout, theirs.stderr)
    assert m.read_bytes() == q.read_bytes()


def test_measure_like_qemu_img(tmp_path):
    src = tmp_path / "s.qcow2"
    _qemu_ok("create", "-q", "-f", "qcow2", "-o", EXTL2, str(src), "3M")
    run_qemu_io("-c", "write -P 1 0 100k", "-c", "write -P 2 1M 3k", str(src))
    for args in (["--size", "10G"], [str(src)]):
        for opts in (EXTL2, f"{EXTL2},cluster_size=16k", f"{EXTL2},preallocation=full"):
            cmd = ["measure", "-O", "qcow2", "-o", opts, *args]
            mine, theirs = run_qimg(*cmd), run_qemu(*cmd)
            assert (mine.returncode, mine.stdout) == (theirs.returncode, theirs.stdout)
