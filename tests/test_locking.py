"""Image locking: qimg and QEMU processes see each other's OFD locks.

An image is held open in the background (by qemu-io, or by a Python process
through qimg's API) and commands are run against it by qemu-img and by
qimg: the refusals (text and exit code) must be the same, and a qimg holder
must take the very bytes a qemu-io holder takes, so that qemu-img refuses it
as it refuses qemu.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from conftest import needs_qemu, run_qemu, run_qimg

pytestmark = [
    needs_qemu,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OFD locks are Linux's"),
    pytest.mark.skipif(shutil.which("stdbuf") is None, reason="needs stdbuf (coreutils)"),
]

HELD = '''
import sys, time
sys.path[:0] = [{src!r}]
from qimg.block.image import open_image
mode, name = sys.argv[1], sys.argv[2]
fmt = sys.argv[3] if len(sys.argv) > 3 else None
img = open_image(name, fmt, read_only=mode != "rw", force_share=mode == "U")
print("READY", flush=True)
time.sleep(600)
'''

SRC = str(Path(__file__).resolve().parent.parent / "src")


def lock_bytes(path: Path) -> list[int]:
    """The bytes of ``path`` anyone has an OFD lock on, from /proc/locks."""
    st = os.stat(path)
    key = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    found: set[int] = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields or len(fields) < 8 or fields[1] != "OFDLCK":
                continue
            major, minor, ino = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(ino)) != key:
                continue
            found.update(range(int(fields[6]), int(fields[7]) + 1))
    return sorted(found)


class Holders:
    """Background processes holding images open; all killed at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def qemu_io(self, path: Path, *args: str) -> subprocess.Popen:
        # the first command's output says the whole chain is open and
        # locked (line-buffered: qemu-io's stdout is a pipe here)
        p = subprocess.Popen(["stdbuf", "-oL", "qemu-io", *args, "-c", "length", "-c", "sleep 600000", str(path)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=path.parent)
        self.procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line and lock_bytes(path), p.stderr.read() if p.stderr else b""
        return p

    def qimg(self, path: Path, mode: str, fmt: str | None = None) -> subprocess.Popen:
        """``mode``: ro, rw, or U (read-only, force-share)."""
        args = [sys.executable, "-c", HELD.format(src=SRC), mode, str(path)] + ([fmt] if fmt else [])
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=path.parent)
        self.procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line == b"READY\n", p.stderr.read() if p.stderr else b""
        return p

    def stop(self, p: subprocess.Popen) -> None:
        p.kill()
        p.wait()
        self.procs.remove(p)

    def stop_all(self) -> None:
        for p in list(self.procs):
            self.stop(p)


@pytest.fixture
def holders() -> Iterator[Holders]:
    h = Holders()
    try:
        yield h
    finally:
        h.stop_all()


def qemu_ok(*args: str, cwd: Path) -> None:
    p = run_qemu(*args, cwd=str(cwd))
    assert p.returncode == 0, p.stderr


@pytest.fixture
def images(tmp_path: Path) -> Path:
    qemu_ok("create", "-f", "qcow2", "-q", "a.qcow2", "1M", cwd=tmp_path)
    qemu_ok("create", "-f", "qcow2", "-q", "-b", "a.qcow2", "-F", "qcow2", "t.qcow2", cwd=tmp_path)
    qemu_ok("create", "-f", "qcow2", "-q", "b2.qcow2", "1M", cwd=tmp_path)
    qemu_ok("create", "-f", "raw", "-q", "r.raw", "1M", cwd=tmp_path)
    return tmp_path


def assert_same_result(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """qemu-img first, then qimg on what it left (only commands that change
    nothing are run here); the same output, messages and exit code."""
    theirs = run_qemu(*args, cwd=str(cwd))
    mine = run_qimg(*args, cwd=str(cwd))
    assert (mine.stdout.decode(), mine.stderr.decode(), mine.returncode) == (
        theirs.stdout.decode(), theirs.stderr.decode(), theirs.returncode), args
    return mine


def all_same_results(commands: list[list[str]], cwd: Path) -> None:
    """assert_same_result for each, one after the other (run side by side
    they would lock each other out)."""
    for args in commands:
        assert_same_result(args, cwd)
        (cwd / "o.qcow2").unlink(missing_ok=True)


# Everything here is refused while another process has a.qcow2 open
# read-write, by qemu-img and by qimg alike (the -U ones go through).
WHILE_WRITTEN = [
    ["info", "a.qcow2"],
    ["info", "--backing-chain", "t.qcow2"],
    ["check", "a.qcow2"],
    ["map", "t.qcow2"],
    ["compare", "a.qcow2", "b2.qcow2"],
    ["convert", "-O", "raw", "a.qcow2", "out.raw"],
    ["measure", "-O", "qcow2", "a.qcow2"],
    ["snapshot", "-l", "a.qcow2"],
    ["dd", "if=a.qcow2", "of=out.raw"],
    ["commit", "t.qcow2"],
    ["commit", "a.qcow2"],
    ["resize", "a.qcow2", "2M"],
    ["snapshot", "-c", "s1", "a.qcow2"],
    ["amend", "-o", "lazy_refcounts=on", "a.qcow2"],
    ["rebase", "-u", "-b", "", "a.qcow2"],
    ["rebase", "-b", "a.qcow2", "-F", "qcow2", "b2.qcow2"],
    ["bitmap", "--add", "a.qcow2", "bm0"],
    ["check", "-r", "all", "a.qcow2"],
    ["create", "-f", "qcow2", "a.qcow2", "1M"],
    ["convert", "-O", "qcow2", "r.raw", "a.qcow2"],
    ["convert", "-n", "-O", "qcow2", "r.raw", "a.qcow2"],
    ["dd", "-O", "qcow2", "if=r.raw", "of=a.qcow2"],
    ["info", "-U", "a.qcow2"],
    ["map", "-U", "--output=json", "t.qcow2"],
    ["compare", "-U", "t.qcow2", "a.qcow2"],
    ["check", "-U", "a.qcow2"],
    ["snapshot", "-U", "-l", "a.qcow2"],
    ["create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "o.qcow2"],
]


@pytest.mark.parametrize("holder", ["qemu-io", "qimg"])
def test_an_image_written_by_another_process_is_refused_as_qemu_img_refuses_it(
        images: Path, holders: Holders, holder: str) -> None:
    a = images / "a.qcow2"
    before = a.read_bytes()
    if holder == "qemu-io":
        holders.qemu_io(a)
    else:
        holders.qimg(a, "rw")
    all_same_results(WHILE_WRITTEN, images)
    # a refused create or convert lost nothing of the image
    assert a.read_bytes() == before


def test_the_refusal_text(images: Path, holders: Holders) -> None:
    holders.qemu_io(images / "a.qcow2")
    p = run_qimg("info", "a.qcow2", cwd=str(images))
    assert p.returncode == 1
    assert p.stderr == (b"qemu-img: Could not open 'a.qcow2': Failed to get shared \"write\" lock\n"
                        b"Is another process using the image [a.qcow2]?\n")
    p = run_qimg("commit", "a.qcow2", cwd=str(images))
    assert p.returncode == 1
    assert p.stderr == (b"qemu-img: Could not open 'a.qcow2': Failed to get \"write\" lock\n"
                        b"Is another process using the image [a.qcow2]?\n")
    p = run_qimg("compare", "a.qcow2", "b2.qcow2", cwd=str(images))
    assert p.returncode == 2
    p = run_qimg("info", "-U", "a.qcow2", cwd=str(images))
    assert p.returncode == 0 and p.stdout.startswith(b"image: a.qcow2\n")


# A reader lets others read, not write.
WHILE_READ = [
    ["info", "a.qcow2"],
    ["map", "--output=json", "t.qcow2"],
    ["compare", "a.qcow2", "b2.qcow2"],
    ["convert", "-O", "raw", "t.qcow2", "out.raw"],
    ["commit", "t.qcow2"],
    ["commit", "a.qcow2"],
    ["resize", "a.qcow2", "2M"],
    ["check", "-r", "leaks", "a.qcow2"],
    ["create", "-f", "qcow2", "a.qcow2", "1M"],
    ["convert", "-O", "qcow2", "r.raw", "a.qcow2"],
    ["bench", "-w", "-c", "1", "a.qcow2"],
]


@pytest.mark.parametrize("holder", ["qemu-io", "qimg"])
def test_an_image_read_by_another_process_is_refused_only_to_writers(
        images: Path, holders: Holders, holder: str) -> None:
    a = images / "a.qcow2"
    if holder == "qemu-io":
        holders.qemu_io(a, "-r")
    else:
        holders.qimg(a, "ro")
    all_same_results(WHILE_READ, images)


@pytest.mark.parametrize("mode, qemu_args, name, fmt", [
    ("rw", [], "t.qcow2", None),
    ("ro", ["-r"], "t.qcow2", None),
    ("U", ["-r", "-U"], "t.qcow2", None),
    ("rw", ["-f", "raw"], "r.raw", "raw"),
    ("ro", ["-r", "-f", "raw"], "r.raw", "raw"),
    ("rw", [], "x.qcow2", None),
    ("ro", ["-r"], "x.qcow2", None),
])
def test_qimg_holds_the_bytes_qemu_holds(images: Path, holders: Holders, mode: str, qemu_args: list[str],
                                         name: str, fmt: str | None) -> None:
    """The protocol (file) nodes lock: an image, its backing files (a
    reader of a raw base holds byte 100 only) and a qcow2 data file."""
    qemu_ok("create", "-f", "qcow2", "-q", "-o", "data_file=d.raw", "x.qcow2", "1M", cwd=images)
    files = [images / n for n in ("a.qcow2", "t.qcow2", "r.raw", "x.qcow2", "d.raw")]
    p = holders.qemu_io(images / name, *qemu_args)
    theirs = [lock_bytes(f) for f in files]
    holders.stop(p)
    assert all(not lock_bytes(f) for f in files)
    p = holders.qimg(images / name, mode, fmt)
    assert [lock_bytes(f) for f in files] == theirs
    holders.stop(p)


def test_qemu_img_refuses_what_qimg_holds_and_u_reads_it(images: Path, holders: Holders) -> None:
    holders.qimg(images / "t.qcow2", "rw")
    for args in (["info", "t.qcow2"], ["map", "t.qcow2"], ["commit", "t.qcow2"]):
        p = run_qemu(*args, cwd=str(images))
        assert p.returncode == 1
        assert p.stderr.endswith(b"Is another process using the image [t.qcow2]?\n")
    # the backing file is only read: others may read it, not write it
    assert run_qemu("info", "a.qcow2", cwd=str(images)).returncode == 0
    p = run_qemu("resize", "a.qcow2", "2M", cwd=str(images))
    assert p.stderr == (b"qemu-img: Could not open 'a.qcow2': Failed to get \"write\" lock\n"
                        b"Is another process using the image [a.qcow2]?\n")
    assert run_qemu("map", "-U", "t.qcow2", cwd=str(images)).returncode == 0


def test_two_qimg_processes_exclude_each_other(images: Path, holders: Holders) -> None:
    holders.qimg(images / "a.qcow2", "ro")
    assert run_qimg("info", "a.qcow2", cwd=str(images)).returncode == 0
    p = run_qimg("resize", "a.qcow2", "2M", cwd=str(images))
    assert p.returncode == 1 and b'Failed to get "write" lock' in p.stderr
    holders.stop_all()
    p = holders.qimg(images / "a.qcow2", "rw")
    assert run_qimg("info", "a.qcow2", cwd=str(images)).returncode == 1
    assert run_qimg("info", "-U", "a.qcow2", cwd=str(images)).returncode == 0
    holders.stop(p)
    # the holder is gone: so are its locks
    assert run_qimg("resize", "a.qcow2", "2M", cwd=str(images)).returncode == 0


def test_locking_off_takes_and_checks_nothing(images: Path, holders: Holders) -> None:
    holders.qemu_io(images / "a.qcow2")
    for opts in ("driver=qcow2,file.filename=a.qcow2,file.locking=off",
                 "driver=qcow2,file.filename=a.qcow2,file.locking=bogus"):
        assert_same_result(["info", "--image-opts", opts], images)


# ---- one process, the same file twice ------------------------------------------
def test_the_locks_live_as_long_as_the_image(images: Path) -> None:
    from qimg.block.image import open_image

    a = images / "a.qcow2"
    img = open_image(str(a), read_only=False)
    assert lock_bytes(a) == [100, 101, 103, 201, 203]
    img.close()
    assert lock_bytes(a) == []


def test_one_process_opening_a_file_twice_holds_both_opens_needs(images: Path) -> None:
    """qimg reopens by opening again (commit's base, check -r): the second
    open adds to the first one's locks, and the locks are what the opens
    still open need, whichever closes first."""
    from qimg.block.image import open_image

    a = images / "a.qcow2"
    ro = open_image(str(a))
    assert lock_bytes(a) == [100, 201, 203]
    rw = open_image(str(a), read_only=False)
    assert lock_bytes(a) == [100, 101, 103, 201, 203]
    ro.close()
    assert lock_bytes(a) == [100, 101, 103, 201, 203]
    p = run_qemu("info", "a.qcow2", cwd=str(images))
    assert p.returncode == 1 and b'shared "write"' in p.stderr
    ro = open_image(str(a), force_share=True)
    rw.close()
    assert lock_bytes(a) == [100]
    assert run_qemu("resize", "a.qcow2", "2M", cwd=str(images)).returncode == 0
    ro.close()
    assert lock_bytes(a) == []


def test_commit_holds_its_base_writable_and_lets_go(images: Path) -> None:
    from qimg.block.image import open_image
    from qimg.ops.commit import find_base, reopen_writable

    img = open_image(str(images / "t.qcow2"), read_only=False)
    base = reopen_writable(img, find_base(img, None, "t.qcow2"))
    assert lock_bytes(images / "a.qcow2") == [100, 101, 103, 201, 203]
    p = run_qemu("info", "a.qcow2", cwd=str(images))
    assert p.returncode == 1
    assert base is img.backing
    img.close()
    assert lock_bytes(images / "a.qcow2") == lock_bytes(images / "t.qcow2") == []
