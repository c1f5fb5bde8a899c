"""qcow (v1) with AES encryption (encrypt.format=aes): qemu-img 7.2 still
creates and reads such images.  Images qimg writes are byte-identical to
qemu-img's; images qemu-io writes read back identically; without the key
the image opens for info only, with qemu-img's messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import needs_qemu, run_qemu, run_qemu_io, run_qimg

pytestmark = [needs_qemu, pytest.mark.interop]

SECRET = ["--object", "secret,id=s,data=a passphrase longer than sixteen bytes"]


def _opts(path: Path, secret: str = "s") -> str:
    return f"driver=qcow,file.filename={path},encrypt.key-secret={secret}"


def _same(args: list[str], cwd: Path) -> None:
    q, m = run_qemu(*args, cwd=str(cwd)), run_qimg(*args, cwd=str(cwd))
    assert (m.stdout.decode(), m.stderr.decode(), m.returncode) == \
        (q.stdout.decode(), q.stderr.decode(), q.returncode)


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    path = tmp_path / "src.raw"
    assert run_qemu("create", "-f", "raw", str(path), "1M").returncode == 0
    run_qemu_io("-f", "raw", "-c", "write -P 7 0 5k", "-c", "write -P 8 100k 1k", "-c", "write -P 9 512k 64k",
                str(path))
    return path


@pytest.mark.parametrize("opts", ["encrypt.format=aes,encrypt.key-secret=s", "encryption=on,encrypt.key-secret=s"])
def test_create_same_bytes(tmp_path: Path, opts: str) -> None:
    mine, theirs = tmp_path / "m.qcow", tmp_path / "q.qcow"
    assert run_qimg("create", *SECRET, "-f", "qcow", "-o", opts, str(mine), "1M").returncode == 0
    assert run_qemu("create", *SECRET, "-f", "qcow", "-o", opts, str(theirs), "1M").returncode == 0
    assert mine.read_bytes() == theirs.read_bytes()


def test_create_with_unknown_secret(tmp_path: Path) -> None:
    for d in ("q", "m"):
        (tmp_path / d).mkdir()
    args = ["create", *SECRET, "-f", "qcow", "-o", "encrypt.format=aes,encrypt.key-secret=nope", "x.qcow", "1M"]
    q, m = run_qemu(*args, cwd=str(tmp_path / "q")), run_qimg(*args, cwd=str(tmp_path / "m"))
    assert m.stderr.decode() == q.stderr.decode() and m.returncode == q.returncode == 1
    assert b"No secret with id 'nope'" in m.stderr


def test_convert_writes_same_bytes(tmp_path: Path, raw: Path) -> None:
    # whole and partial clusters: the sectors a write leaves hold encrypted zeroes
    outs = {}
    for name, run in (("m", run_qimg), ("q", run_qemu)):
        out = tmp_path / f"{name}.qcow"
        p = run("convert", *SECRET, "-f", "raw", "-O", "qcow", "-o", "encrypt.format=aes,encrypt.key-secret=s",
                str(raw), str(out))
        assert p.returncode == 0, p.stderr
        outs[name] = out.read_bytes()
    assert outs["m"] == outs["q"]


def test_reads_what_qemu_io_wrote(tmp_path: Path, raw: Path) -> None:
    img = tmp_path / "e.qcow"
    assert run_qemu("create", *SECRET, "-f", "qcow", "-o", "encrypt.format=aes,encrypt.key-secret=s",
                    str(img), "1M").returncode == 0
    run_qemu_io(*SECRET, "--image-opts", "-c", "write -P 5 1k 3k", "-c", "write -P 6 8k 4k",
                "-c", "write -P 4 1000 100", _opts(img))
    for name, run in (("m", run_qimg), ("q", run_qemu)):
        assert run("convert", *SECRET, "--image-opts", _opts(img), "-O", "raw",
                   str(tmp_path / f"{name}.raw")).returncode == 0
    assert (tmp_path / "m.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()
    assert (tmp_path / "m.raw").read_bytes()[1100:4096] == b"\x05" * 2996


def test_unaligned_write_through_the_library(tmp_path: Path) -> None:
    from qimg.block.image import open_image
    from qimg.crypto import secret

    mine, theirs = tmp_path / "m.qcow", tmp_path / "q.qcow"
    assert run_qemu("create", *SECRET, "-f", "qcow", "-o", "encrypt.format=aes,encrypt.key-secret=s",
                    str(theirs), "1M").returncode == 0
    run_qemu_io(*SECRET, "--image-opts", "-c", "write -P 5 0 8k", _opts(theirs))
    shutil.copy(theirs, mine)
    run_qemu_io(*SECRET, "--image-opts", "-c", "write -P 3 1031 700", "-c", "write -P 2 20000 10", _opts(theirs))
    secret.add("s", SECRET[1].split("data=", 1)[1].encode())
    img = open_image(str(mine), "qcow", read_only=False, options={"encrypt.key-secret": "s"})
    try:
        img.write(1031, b"\x03" * 700)
        img.write(20000, b"\x02" * 10)
    finally:
        img.close()
    assert mine.read_bytes() == theirs.read_bytes()


KEYED = "driver=qcow,file.filename=e.qcow,encrypt.key-secret="


@pytest.mark.parametrize("args", [
    ["info", "e.qcow"],
    ["info", "--output=json", "e.qcow"],
    ["map", "e.qcow"],
    ["check", "e.qcow"],
    ["convert", "-O", "raw", "e.qcow", "o.raw"],
    ["map", *SECRET, "--image-opts", "--output=json", KEYED + "s"],
    ["info", *SECRET, "--image-opts", KEYED + "s"],
    ["info", "--image-opts", KEYED + "nope"],
    ["convert", *SECRET, "--image-opts", "-O", "raw", KEYED + "nope", "o.raw"],
], ids=lambda a: " ".join(a)[:60])
def test_commands_as_qemu(tmp_path: Path, args: list[str]) -> None:
    img = tmp_path / "e.qcow"
    assert run_qemu("create", *SECRET, "-f", "qcow", "-o", "encrypt.format=aes,encrypt.key-secret=s",
                    str(img), "1M").returncode == 0
    run_qemu_io(*SECRET, "--image-opts", "-c", "write -P 5 0 8k", _opts(img))
    _same(args, tmp_path)


@pytest.mark.parametrize("args", [
    ["info", "e.qcow2"],
    ["info", "--output=json", "e.qcow2"],
    ["map", "e.qcow2"],
    ["check", "e.qcow2"],
    ["compare", "e.qcow2", "e.qcow2"],
    ["convert", "-O", "raw", "e.qcow2", "o.raw"],
    ["convert", *SECRET, "--image-opts", "-O", "raw", "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=x",
     "o.raw"],
], ids=lambda a: " ".join(a)[:60])
def test_aes_qcow2_without_its_key_as_qemu(tmp_path: Path, args: list[str]) -> None:
    # qcow2's crypt_method 1: described without the key, opened for data
    # only with it
    img = tmp_path / "e.qcow2"
    assert run_qemu("create", *SECRET, "-f", "qcow2", "-o", "encrypt.format=aes,encrypt.key-secret=s",
                    str(img), "1M").returncode == 0
    _same(args, tmp_path)


Q2_AES = "encrypt.format=aes,encrypt.key-secret=s"


def _q2opts(path: Path) -> str:
    return f"driver=qcow2,file.filename={path},encrypt.key-secret=s"


@pytest.mark.parametrize("extra", ["", ",compat=0.10", ",preallocation=metadata", ",cluster_size=16k,extended_l2=on"])
def test_aes_qcow2_create_same_bytes(tmp_path: Path, extra: str) -> None:
    mine, theirs = tmp_path / "m.qcow2", tmp_path / "q.qcow2"
    assert run_qimg("create", *SECRET, "-f", "qcow2", "-o", Q2_AES + extra, str(mine), "4M").returncode == 0
    assert run_qemu("create", *SECRET, "-f", "qcow2", "-o", Q2_AES + extra, str(theirs), "4M").returncode == 0
    assert mine.read_bytes() == theirs.read_bytes()


def test_aes_qcow2_convert_writes_same_bytes(tmp_path: Path, raw: Path) -> None:
    outs = {}
    for name, run in (("m", run_qimg), ("q", run_qemu)):
        out = tmp_path / f"{name}.qcow2"
        p = run("convert", *SECRET, "-f", "raw", "-O", "qcow2", "-o", Q2_AES, str(raw), str(out))
        assert p.returncode == 0, p.stderr
        outs[name] = out.read_bytes()
    assert outs["m"] == outs["q"]


@pytest.mark.parametrize("extra", ["", ",cluster_size=16k,extended_l2=on"])
def test_aes_qcow2_writes_as_qemu_io(tmp_path: Path, raw: Path, extra: str) -> None:
    # the IVs are guest sectors; copy-on-write from the backing file is
    # encrypted with them too; partial sectors are read, changed, written
    from qimg.block.image import open_image
    from qimg.crypto import secret

    mine, theirs = tmp_path / "m.qcow2", tmp_path / "q.qcow2"
    assert run_qemu("create", *SECRET, "-f", "qcow2", "-b", str(raw), "-F", "raw", "-o", Q2_AES + extra,
                    str(theirs), "1M").returncode == 0
    shutil.copy(theirs, mine)
    writes = [(1031, 700, 3), (70000, 100000, 4), (600000, 10, 5), (1031, 10, 6)]
    run_qemu_io(*SECRET, "--image-opts", *[a for off, n, p in writes for a in ("-c", f"write -P {p} {off} {n}")],
                _q2opts(theirs))
    secret.add("s", SECRET[1].split("data=", 1)[1].encode())
    img = open_image(str(mine), "qcow2", read_only=False, options={"encrypt.key-secret": "s"})
    try:
        for off, n, p in writes:
            img.write(off, bytes([p]) * n)
    finally:
        img.close()
    assert mine.read_bytes() == theirs.read_bytes()
    for name, run in (("m", run_qimg), ("q", run_qemu)):
        assert run("convert", *SECRET, "--image-opts", _q2opts(theirs), "-O", "raw",
                   str(tmp_path / f"{name}.raw")).returncode == 0
    assert (tmp_path / "m.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()
