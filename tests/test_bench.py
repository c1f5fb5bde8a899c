"""qemu-img bench: the same lines, messages and exit codes as qemu-img 7.2
(all but the time a run took), and -w leaves what qemu-img's -w leaves."""

from __future__ import annotations

import re
import shutil

import pytest

from conftest import make_image, needs_qemu, qemu_io_cmds, run_qemu, run_qimg

RUN_LINE = re.compile(rb"^Run completed in \d+\.\d{3} seconds\.$", re.M)


def _masked(out: bytes) -> bytes:
    return RUN_LINE.sub(b"Run completed in T seconds.", out)


def _assert_same_run(args: list[str], cwd: str) -> None:
    """Both programs print the same, but for the time, whose format is
    qemu's "%3.3f"."""
    mine, theirs = run_qimg("bench", *args, cwd=cwd), run_qemu("bench", *args, cwd=cwd)
    assert _masked(mine.stdout) == _masked(theirs.stdout)
    assert mine.stderr == theirs.stderr
    assert mine.returncode == theirs.returncode
    assert len(RUN_LINE.findall(mine.stdout)) == len(RUN_LINE.findall(theirs.stdout))
    assert len(RUN_LINE.findall(mine.stdout)) == (theirs.returncode == 0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Images only read from (or opened and refused) by the option tests."""
    d = tmp_path_factory.mktemp("bench")
    make_image(d / "r.img", "1M", "write -P 0x11 0 64k")
    make_image(d / "q.qcow2", "1M", "write -P 0x22 64k 64k", fmt="qcow2")
    (d / "small.img").write_bytes(b"hello\n")
    return d


OPTION_CASES = [
    # counts, depths and pattern/flush interval: qemu_strtoul, then a range
    ["-c", "10", "r.img"], ["-c", "0", "r.img"], ["-c", "-1", "r.img"], ["-c", "1k", "r.img"],
    ["-c", "0x10", "r.img"], ["-c", " +010", "r.img"], ["-c", "5 ", "r.img"], ["-c", "2147483648", "r.img"],
    ["-c", "-18446744073709551615", "r.img"], ["-d", "x", "r.img"], ["-d", "2147483648", "r.img"],
    ["-d", "0", "-c", "0", "r.img"], ["--pattern=256", "r.img"], ["--pattern=", "r.img"],
    ["--flush-interval=2147483648", "-w", "r.img"], ["--flush-interval=2", "-c", "10", "r.img"],
    ["-w", "--flush-interval=4", "-d", "5", "-c", "1", "-f", "raw", "r.img"],
    ["-w", "--flush-interval=4", "-d", "4", "-c", "100", "-f", "raw", "r.img"],
    ["--no", "-c", "1", "r.img"], ["--pat=0xff", "-c", "1", "r.img"],
    # sizes: cvtnum with suffixes
    ["-o", "x", "r.img"], ["-o", "9223372036854775808", "r.img"], ["-s", "2147483648", "r.img"],
    ["-s", "1.5k", "-o", "1k", "-c", "3", "r.img"], ["-S", "-1", "r.img"], ["-S", "512", "-c", "2000", "r.img"],
    ["-s", "0", "-S", "0", "-c", "2", "r.img"],
    # requests that do not fit: EIO, no "Run completed" line
    ["-o", "1M", "-c", "1", "r.img"], ["-o", "9223372036854775807", "-c", "1", "r.img"],
    ["-s", "2M", "-c", "1", "r.img"], ["-s", "1000", "-c", "3000", "r.img"], ["-o", "1020k", "-c", "2", "r.img"],
    ["-c", "3", "-s", "2", "-S", "2", "small.img"], ["-c", "4", "-s", "2", "-S", "2", "small.img"],
    # cache and aio modes
    ["-t", "bogus", "-c", "1", "r.img"], ["-t", "off", "-c", "1", "r.img"], ["-i", "io_uring", "-c", "1", "r.img"],
    ["-i", "", "r.img"], ["-i", "native", "-c", "1", "r.img"], ["-n", "-t", "none", "-c", "1", "r.img"],
    ["-n", "-i", "threads", "-t", "directsync", "-t", "writeback", "r.img"], ["-n", "nonexist.img"],
    ["-f", "qcow2", "-n", "r.img"], ["-n", "-c", "1", "--image-opts", "driver=qcow2,file.filename=q.qcow2"],
    ["-n", "-c", "1", "--image-opts", "driver=qcow2,file.filename=q.qcow2,cache.direct=on"],
    # argv order decides which error comes first
    ["-c", "x", "-t", "bogus", "r.img"], ["-i", "bogus", "-c", "x", "r.img"],
    # the rest of the command line
    ["-c", "1", "a", "b"], [], ["-c", "1", "nonexist.img"], ["-x", "r.img"], ["-c"], ["--flush", "r.img"],
    ["--object", "secret,id=s,data=x", "r.img"], ["-q", "-c", "10", "r.img"], ["--force-share", "-c", "1", "q.qcow2"],
    ["-U", "-w", "-c", "1", "nonexist.img"], ["-f", "foo", "r.img"], ["-c", "1", "--", "r.img"],
    ["--image-opts", "-f", "raw", "driver=raw,file.filename=r.img"], ["--image-opts", "driver=qcow2"],
    ["--image-opts", "foo=bar"], ["--no-drain=1", "r.img"], ["-c", "1", "--pattern", "1", "--no-d=", "r.img"], ["--image-opts", "-c", "1", "file.driver=file"], ["-c", "100", "-S", "8k", "q.qcow2"],
]


@needs_qemu
@pytest.mark.parametrize("args", OPTION_CASES, ids=lambda a: " ".join(a) or "no-args")
def test_options_as_qemu(images, args):
    _assert_same_run(args, str(images))


@needs_qemu
def test_default_run(images):
    """75000 requests of 4 KiB, 64 in parallel, from offset 0: the header
    and a time; sequential requests go in big I/Os, so this is quick."""
    _assert_same_run(["q.qcow2"], str(images))


def _twins(tmp_path, fmt: str, size: str = "1M"):
    a, b = tmp_path / f"qemu.{fmt}", tmp_path / f"qimg.{fmt}"
    make_image(a, size, "write -P 0x11 0 64k", "write -P 0x22 200k 100k", fmt=fmt)
    shutil.copyfile(a, b)
    return a, b


WRITE_CASES = [
    ["-c", "10", "--pattern=0xab"],
    ["-c", "1000", "--pattern=0x5a"],  # wraps around four times
    ["-c", "700", "--pattern=0x33", "-s", "512", "-S", "1536", "--flush-interval=64", "-d", "8"],
    ["-c", "40", "--pattern=0x44", "-s", "100k", "-S", "1k", "-o", "3", "-d", "1"],  # overlapping
    ["-c", "140", "--pattern=7", "-s", "5000", "-S", "7000", "-o", "1001"],  # gaps, unaligned
    ["-c", "30", "-s", "64k", "-t", "writethrough", "--flush-interval=8", "-d", "8", "--no-drain"],
]


WRITE_PARAMS = [(fmt, args) for fmt in ("raw", "qcow2") for args in WRITE_CASES] + [
    (fmt, args) for fmt in ("qed", "vdi", "parallels") for args in WRITE_CASES[1:5:2]]


@needs_qemu
@pytest.mark.parametrize(("fmt", "args"), WRITE_PARAMS, ids=lambda a: a if isinstance(a, str) else " ".join(a))
def test_write_like_qemu(tmp_path, fmt, args):
    a, b = _twins(tmp_path, fmt)
    theirs = run_qemu("bench", "-w", "-f", fmt, *args, str(a))
    mine = run_qimg("bench", "-w", "-f", fmt, *args, str(b))
    assert _masked(mine.stdout) == _masked(theirs.stdout)
    assert (mine.stderr, mine.returncode) == (theirs.stderr, theirs.returncode)
    assert run_qemu("compare", "-f", fmt, "-F", fmt, str(a), str(b)).returncode == 0
    if fmt != "raw":
        r = run_qemu("check", "-f", fmt, str(b))
        assert r.returncode == 0, r.stdout


@needs_qemu
@pytest.mark.parametrize("args", [
    ["-c", "1000", "--pattern=7", "-S", "3k"],
    ["-c", "300", "--pattern=9", "-o", "1000k", "-s", "5000", "-S", "3000"],
    ["-c", "500", "--pattern=1", "-o", "100k", "-s", "64k", "-S", "96k"],
])
def test_failed_write_like_qemu_depth_1(tmp_path, args):
    """With one request in flight, qemu has done exactly the requests before
    the one that does not fit when it stops; so have we (raw: qemu's exit
    does not lose cached metadata there)."""
    a, b = _twins(tmp_path, "raw")
    theirs = run_qemu("bench", "-w", "-d", "1", "-f", "raw", *args, str(a))
    mine = run_qimg("bench", "-w", "-d", "1", "-f", "raw", *args, str(b))
    assert theirs.returncode == 1
    assert (mine.stdout, mine.stderr, mine.returncode) == (theirs.stdout, theirs.stderr, theirs.returncode)
    assert a.read_bytes() == b.read_bytes()


@needs_qemu
def test_failed_write_keeps_done_requests_qcow2(tmp_path):
    """Requests k*3k (4 KiB each) on 1 MiB: number 341 (at 1023k) does not
    fit, so [0, 340*3k + 4k) holds the pattern and nothing after it changed.
    (qemu-img exits without writing back its qcow2 metadata cache here and
    loses some of those writes; we keep them all, and the image is clean.)"""
    path = make_image(tmp_path / "q.qcow2", "1M", "write -P 0x22 1000k 24k", fmt="qcow2")
    r = run_qimg("bench", "-w", "-d", "1", "-c", "1000", "-S", "3k", "--pattern=7", path)
    assert r.returncode == 1
    assert r.stderr == b"qemu-img: Failed request: Input/output error\n"
    assert RUN_LINE.search(r.stdout) is None
    end = 340 * 3072 + 4096
    qemu_io_cmds(path, "qcow2", f"read -P 7 0 {end}", f"read -P 0x22 {end} {1024 * 1024 - end}")
    assert run_qemu("check", path).returncode == 0


@needs_qemu
def test_write_to_overlay_leaves_backing(tmp_path):
    base = make_image(tmp_path / "base.qcow2", "1M", "write -P 0x11 0 1M", fmt="qcow2")
    for name in ("a.qcow2", "b.qcow2"):
        assert run_qemu("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", str(tmp_path / name)).returncode == 0
    run_qemu("bench", "-w", "-c", "20", "-s", "1k", "-S", "40k", "--pattern=3", str(tmp_path / "a.qcow2"))
    r = run_qimg("bench", "-w", "-c", "20", "-s", "1k", "-S", "40k", "--pattern=3", str(tmp_path / "b.qcow2"))
    assert r.returncode == 0
    assert run_qemu("compare", str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")).returncode == 0
    qemu_io_cmds(base, "qcow2", "read -P 0x11 0 1M")


@needs_qemu
def test_probed_raw_write_warns(tmp_path):
    a = tmp_path / "a.img"
    make_image(a, "1M")
    b = tmp_path / "b.img"
    shutil.copyfile(a, b)
    theirs = run_qemu("bench", "-q", "-w", "-c", "5", "--pattern=0x61", "a.img", cwd=str(tmp_path))
    mine = run_qimg("bench", "-q", "-w", "-c", "5", "--pattern=0x61", "b.img", cwd=str(tmp_path))
    assert mine.stderr == theirs.stderr.replace(b"a.img", b"b.img")
    assert b"probing guessed raw" in mine.stderr
    assert _masked(mine.stdout) == _masked(theirs.stdout)
    assert a.read_bytes() == b.read_bytes()


# Where qemu-img 7.2 hangs or crashes, we stop cleanly.

def test_depth_zero_refused(tmp_path):
    """qemu-img 7.2 sends nothing and waits for ever with -d 0."""
    path = tmp_path / "r.img"
    path.write_bytes(bytes(65536))
    r = run_qimg("bench", "-d", "0", "-c", "1", str(path))
    assert (r.stdout, r.stderr, r.returncode) == (b"", b"qemu-img: Invalid queue depth specified\n", 1)


def test_empty_image(tmp_path):
    """qemu-img 7.2 divides by zero on an empty image (later qemu keeps
    offset 0): a 4 KiB request does not fit, an empty one does."""
    path = tmp_path / "z.img"
    path.write_bytes(b"")
    r = run_qimg("bench", "-c", "2", str(path))
    assert r.returncode == 1
    assert r.stderr == b"qemu-img: Failed request: Input/output error\n"
    r = run_qimg("bench", "-c", "2", "-s", "0", str(path))
    assert r.returncode == 0 and RUN_LINE.search(r.stdout)


@needs_qemu
def test_empty_requests_cost_nothing(images):
    """Two billion empty requests move no byte: done at once (qemu-img
    sends them one by one), but the first still may not start past the end."""
    r = run_qimg("bench", "-s", "0", "-c", "2147483647", "-S", "4k", "r.img", cwd=str(images))
    assert r.returncode == 0 and RUN_LINE.search(r.stdout)
    _assert_same_run(["-s", "0", "-c", "3", "-o", "1M", "r.img"], str(images))
    _assert_same_run(["-s", "0", "-c", "3", "-o", "1025k", "r.img"], str(images))


# The loop itself, on an image that records what it is asked to do.

class _Recorder:
    def __init__(self, size: int) -> None:
        self.size = size
        self.log: list[tuple] = []

    def read(self, offset: int, length: int) -> bytes:
        self.log.append(("r", offset, length))
        return bytes(length)

    def write(self, offset: int, data: bytes) -> None:
        self.log.append(("w", offset, bytes(data)))

    def flush(self) -> None:
        self.log.append(("f",))


def _flush_points(spec) -> list[int]:
    """Bytes written before each flush (all requests are sequential 4 KiB)."""
    from qimg.ops.bench import run_bench

    img = _Recorder(1 << 20)
    run_bench(img, spec)
    done, points = 0, []
    for entry in img.log:
        if entry[0] == "w":
            done += len(entry[2])
        else:
            points.append(done // 4096)
    return points


def test_flush_points_follow_qemus_queue():
    """qemu flushes when the requests not yet sent are a multiple of the
    interval, first looking once the first `depth` requests are out:
    10 requests, interval 4: after 2, 6 and 10 with depth 1, after 6 and
    10 with depth 4 (8 left to send was passed in the first burst)."""
    from qimg.ops.bench import BenchSpec

    assert _flush_points(BenchSpec(count=10, depth=1, write=True, flush_interval=4)) == [2, 6, 10]
    assert _flush_points(BenchSpec(count=10, depth=4, write=True, flush_interval=4)) == [6, 10]
    assert _flush_points(BenchSpec(count=10, depth=4, write=True, flush_interval=4, no_flush=True)) == []


def test_sequential_requests_merge_into_big_writes():
    """1000 requests of 4 KiB over a 1 MiB image wrap around 3 times: four
    writes of the pattern, not 1000."""
    from qimg.ops.bench import BenchSpec, run_bench

    img = _Recorder(1 << 20)
    run_bench(img, BenchSpec(count=1000, write=True, pattern=0x5A))
    sizes = [(e[1], len(e[2])) for e in img.log]
    assert sizes == [(0, 1 << 20)] * 3 + [(0, (1000 - 768) * 4096)]
    assert all(set(e[2]) == {0x5A} for e in img.log)


def test_writethrough_flushes_every_write():
    """-t writethrough/directsync: each write is followed by a flush (qemu's
    BlockBackend flushes after every write in write-through mode)."""
    from qimg.ops.bench import BenchSpec, run_bench

    for step in (8192, 4096):  # back-to-back requests too
        img = _Recorder(1 << 20)
        run_bench(img, BenchSpec(count=3, write=True, step=step, writethrough=True))
        assert [e[0] for e in img.log] == ["w", "f", "w", "f", "w", "f"]
        assert [(e[1], len(e[2])) for e in img.log if e[0] == "w"] == [(0, 4096), (step, 4096), (2 * step, 4096)]
