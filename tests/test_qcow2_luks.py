"""qcow2 with encrypt.format=luks, against qemu-img and qemu-io: the LUKS
header in clusters named by the crypto header extension, data clusters
encrypted with their host sector numbers as IVs.

PBKDF2 runs with iter-time=10: QEMU's 2 s default would make each image
cost seconds.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_qemu, run_qemu, run_qemu_io
from test_luks import SECRET, pattern, qemu_retry, run_qimg

ENC = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
CRYPTO_EXT = 0x0537BE77


def opts(path: Path | str, secret: str = "sec0") -> list[str]:
    return ["--image-opts", f"driver=qcow2,file.filename={path},encrypt.key-secret={secret}"]


def same(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    where = str(cwd) if cwd else None
    mine, theirs = run_qimg(*args, cwd=where), run_qemu(*args, cwd=where)
    assert mine.stderr == theirs.stderr, args
    assert (mine.returncode, mine.stdout) == (theirs.returncode, theirs.stdout), args
    return mine


def create(path: Path, size: str = "4M", extra: str = "") -> None:
    p = run_qimg("create", "-q", *SECRET, "-f", "qcow2", "-o", ENC + (f",{extra}" if extra else ""), str(path), size)
    assert p.returncode == 0, p.stderr


def crypto_ext(path: Path) -> tuple[int, int]:
    """(offset, length) the crypto header extension names."""
    data = path.read_bytes()
    version = struct.unpack_from(">I", data, 4)[0]
    off = 72 if version == 2 else struct.unpack_from(">I", data, 100)[0]
    while True:
        etype, elen = struct.unpack_from(">II", data, off)
        if etype == CRYPTO_EXT:
            return struct.unpack_from(">QQ", data, off + 8)
        assert etype != 0, "no crypto header extension"
        off += 8 + (elen + 7 & ~7)


@pytest.fixture(scope="module")
def qemu_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LUKS qcow2 qemu-img made, with data qemu-io wrote (a partial
    sector at the end too)."""
    path = tmp_path_factory.mktemp("qemuq2luks") / "q.qcow2"
    p = qemu_retry("create", "-q", *SECRET, "-f", "qcow2", "-o", ENC, str(path), "4M")
    assert p.returncode == 0, p.stderr
    run_qemu_io(*SECRET, *opts(path), "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x33 1500k 3k",
                "-c", "write -P 0x44 3000001 777")
    return path


@needs_qemu
def test_qemu_image_info_map_and_data(qemu_image: Path, tmp_path: Path) -> None:
    for args in (["info", str(qemu_image)], ["info", "--output=json", str(qemu_image)],
                 ["info", *SECRET, *opts(qemu_image)], ["info", "--output=json", *SECRET, *opts(qemu_image)],
                 ["map", "--output=json", *SECRET, *opts(qemu_image)], ["check", *SECRET, *opts(qemu_image)],
                 ["check", str(qemu_image)], ["map", str(qemu_image)],
                 ["convert", "--object", "secret,id=sec0,data=no", *opts(qemu_image), "-O", "raw", "/dev/null"]):
        same(args)
    mine = run_qimg("map", *SECRET, *opts(qemu_image))
    assert mine.returncode == 1
    assert mine.stderr == b"qemu-img: File contains external, encrypted or compressed clusters.\n"
    p = run_qimg("convert", *SECRET, *opts(qemu_image), "-O", "raw", str(tmp_path / "mine.raw"))
    assert p.returncode == 0, p.stderr
    p = run_qemu("convert", *SECRET, *opts(qemu_image), "-O", "raw", str(tmp_path / "theirs.raw"))
    assert p.returncode == 0, p.stderr
    data = (tmp_path / "mine.raw").read_bytes()
    assert data == (tmp_path / "theirs.raw").read_bytes()
    assert data[:1 << 20] == b"\x5a" * (1 << 20) and data[3000001:3000778] == b"\x44" * 777


@needs_qemu
@pytest.mark.parametrize("extra, ext_offset, file_size", [
    ("", 0x40000, 2359296),
    ("cluster_size=512", 0x800, 2078208),
    ("cluster_size=4096", 0x4000, 2084864),
    ("compat=0.10", 0x40000, 2359296),
    ("preallocation=metadata", 0x150000, 3473408),
])
def test_layout_as_qemu_lays_it_out(tmp_path: Path, extra: str, ext_offset: int, file_size: int) -> None:
    """The header clusters follow the L1 table (and what preallocation
    allocated), as qcow2_set_up_encryption puts them after the resize;
    the numbers are what qemu-img 7.2 writes for a 1 MiB image."""
    img = tmp_path / "x.qcow2"
    create(img, "1M", extra)
    assert crypto_ext(img) == (ext_offset, 2068480)
    assert img.stat().st_size == file_size
    assert struct.unpack_from(">I", img.read_bytes(), 32)[0] == 2  # crypt_method LUKS
    same(["info", "x.qcow2"], tmp_path)
    same(["check", *SECRET, *opts("x.qcow2")], tmp_path)


COMBOS = [
    "",
    ",encrypt.cipher-alg=aes-128,encrypt.ivgen-alg=plain,cluster_size=4096",
    ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha1,extended_l2=on",
    ",encrypt.cipher-mode=ctr,compat=0.10",
]


@needs_qemu
@pytest.mark.parametrize("combo", COMBOS)
def test_data_interop(tmp_path: Path, combo: str) -> None:
    raw = tmp_path / "in.raw"
    raw.write_bytes(pattern(1 << 20) + bytes(1 << 20) + pattern(300 << 10, 2))
    img = tmp_path / "x.qcow2"
    p = run_qimg("convert", *SECRET, "-f", "raw", "-O", "qcow2", "-o", ENC + combo, str(raw), str(img))
    assert p.returncode == 0, p.stderr
    p = run_qemu("compare", *SECRET, *opts(img), f"driver=raw,file.filename={raw}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert run_qemu("check", *SECRET, *opts(img)).returncode == 0
    run_qemu_io(*SECRET, *opts(img), "-c", "write -P 0x77 1000k 100k", "-c", "write -P 0x78 1500k 1k")
    p = run_qimg("convert", *SECRET, *opts(img), "-O", "raw", str(tmp_path / "out.raw"))
    assert p.returncode == 0, p.stderr
    want = bytearray(raw.read_bytes())
    want[1000 << 10:1100 << 10] = b"\x77" * (100 << 10)
    want[1500 << 10:1501 << 10] = b"\x78" * 1024
    assert (tmp_path / "out.raw").read_bytes() == bytes(want)
    same(["info", "--output=json", "x.qcow2"], tmp_path)


@needs_qemu
@pytest.mark.parametrize("extra", ["", "extended_l2=on,cluster_size=16k"])
def test_unaligned_writes_and_copy_on_write(tmp_path: Path, extra: str) -> None:
    """Partial sectors, partial clusters in place and newly allocated, over a
    plain backing file: qemu reads what qimg wrote."""
    from qimg.block.image import open_image
    from qimg.cli.common import add_object

    add_object("secret,id=sec0,data=abc")
    base = tmp_path / "base.qcow2"
    assert run_qemu("create", "-q", "-f", "qcow2", str(base), "1M").returncode == 0
    run_qemu_io("-c", "write -P 0x11 0 1M", str(base))
    img = tmp_path / "top.qcow2"
    create(img, "1M", ",".join(x for x in (f"backing_file={base},backing_fmt=qcow2", extra) if x))
    run_qemu_io(*SECRET, "--image-opts", f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0",
                "-c", "write -P 0x22 64k 64k")
    with open_image(str(img), None, read_only=False, options={"encrypt.key-secret": "sec0"}) as im:
        im.write(70000, b"\x33" * 1000)      # inside an allocated cluster
        im.write(300001, b"\x44" * 5000)     # copy-on-write from the backing file
        im.write_zeroes(500000, 3000)
        assert im.read(69999, 3) == b"\x22\x33\x33"
    p = run_qemu_io(*SECRET, *opts(img), "-c", "read -P 0x22 64k 4464", "-c", "read -P 0x33 70000 1000",
                    "-c", "read -P 0x22 71000 60072", "-c", "read -P 0x11 0 64k", "-c", "read -P 0x11 300000 1",
                    "-c", "read -P 0x44 300001 5000", "-c", "read -P 0x11 305001 100000",
                    "-c", "read -P 0 500000 3000", "-c", "read -P 0x11 503000 1000")
    assert b"Pattern verification failed" not in p.stdout, p.stdout
    assert run_qemu("check", *SECRET, *opts(img)).returncode == 0


@needs_qemu
def test_resize_with_preallocation_moves_the_partial_cluster(tmp_path: Path) -> None:
    img = tmp_path / "x.qcow2"
    create(img, "1000k")
    run_qemu_io(*SECRET, *opts(img), "-c", "write -P 0x66 960k 40k")
    twin = tmp_path / "y.qcow2"
    twin.write_bytes(img.read_bytes())
    assert run_qimg("resize", *SECRET, "--preallocation=full", *opts(img), "+1M").returncode == 0
    assert run_qemu("resize", *SECRET, "--preallocation=full", *opts(twin), "+1M").returncode == 0
    assert img.read_bytes() == twin.read_bytes()


@needs_qemu
def test_measure(tmp_path: Path) -> None:
    args = ["measure", *SECRET, "-O", "qcow2", "-o", ENC, "--size", "1G"]
    p, q = run_qimg(*args), qemu_retry(*args)
    assert (p.returncode, p.stdout, p.stderr) == (q.returncode, q.stdout, q.stderr)
    # qcow2_measure adds the LUKS header, in whole clusters, to both sizes
    for extra, header in ((",cluster_size=512,preallocation=full", 2068480),
                          (",encrypt.cipher-alg=aes-128", 17 * 65536)):
        plain = run_qimg("measure", "-O", "qcow2", "-o", extra[1:].replace("encrypt.cipher-alg=aes-128", "compat=1.1"),
                         "--size", "1G").stdout.split()
        enc = run_qimg("measure", *SECRET, "-O", "qcow2", "-o", ENC + extra, "--size", "1G").stdout.split()
        assert int(enc[2]) - int(plain[2]) == header and int(enc[6]) - int(plain[6]) == header
    same(["measure", "-O", "qcow2", "-o", "encrypt.format=luks", "--size", "1G"])
    same(["measure", *SECRET, "-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,"
          "encrypt.cipher-alg=bogus", "--size", "1G"])


@needs_qemu
@pytest.mark.parametrize("options", [
    "encrypt.format=luks",
    "encrypt.format=luks,encrypt.key-secret=sec1",
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=bogus",
    "encrypt.format=aes,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128",
    "encrypt.key-secret=sec0",
    "encrypt.format=luks,encrypt.key-secret=sec0,encryption=on",
    "encrypt.format=bogus",
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.hash-alg=bogus,compat=0.9",
])
def test_create_refusals(tmp_path: Path, options: str) -> None:
    args = ["create", *SECRET, "-f", "qcow2", "-o", options, "e.qcow2", "1M"]
    mine = run_qimg(*args, cwd=str(tmp_path))
    assert not (tmp_path / "e.qcow2").exists()
    theirs = qemu_retry(*args, cwd=str(tmp_path))
    assert (mine.returncode, mine.stdout, mine.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)


def _ext_at(data: bytes) -> int:
    off = struct.unpack_from(">I", data, 100)[0]
    while struct.unpack_from(">I", data, off)[0] not in (CRYPTO_EXT, 0):
        off += 8 + (struct.unpack_from(">I", data, off + 4)[0] + 7 & ~7)
    return off


HOSTILE = {
    "crypt method 0": lambda b: struct.pack_into(">I", b, 32, 0),
    "crypt method 1": lambda b: struct.pack_into(">I", b, 32, 1),
    "crypt method 3": lambda b: struct.pack_into(">I", b, 32, 3),
    "extension size": lambda b: struct.pack_into(">I", b, _ext_at(b) + 4, 24),
    "unaligned header": lambda b: struct.pack_into(">Q", b, _ext_at(b) + 8, 0x40200),
    "short header": lambda b: struct.pack_into(">Q", b, _ext_at(b) + 16, 100),
    "short key material": lambda b: struct.pack_into(">Q", b, _ext_at(b) + 16, 600),
    "header past the end": lambda b: struct.pack_into(">Q", b, _ext_at(b) + 8, 0x40000 * 1000),
    "luks magic": lambda b: b.__setitem__(0x40000, 0),
}


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("q2lukshdr") / "b.qcow2"
    create(path, "1M")
    return path.read_bytes()


@needs_qemu
@pytest.mark.parametrize("damage", sorted(HOSTILE))
def test_hostile_crypto_header(tmp_path: Path, base_image: bytes, damage: str) -> None:
    buf = bytearray(base_image)
    HOSTILE[damage](buf)
    (tmp_path / "h.qcow2").write_bytes(bytes(buf))
    for args in (["info", "h.qcow2"], ["convert", *SECRET, *opts("h.qcow2"), "-O", "raw", "o.raw"]):
        same(args, tmp_path)


@needs_qemu
def test_amend_key_slots(tmp_path: Path) -> None:
    create(tmp_path / "a.qcow2", "1M")
    (tmp_path / "b.qcow2").write_bytes((tmp_path / "a.qcow2").read_bytes())
    both = [*SECRET, "--object", "secret,id=sec1,data=xyz"]
    for key, o in (("sec0", "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10"),
                   ("sec0", "encrypt.new-secret=sec1"), ("sec0", "encrypt.state=bogus"),
                   ("sec1", "encrypt.state=inactive,encrypt.keyslot=0,compat=0.10"),
                   ("sec1", "encrypt.state=inactive,encrypt.keyslot=1")):
        mine = run_qimg("amend", *both, "-o", o, *opts("a.qcow2", key), cwd=str(tmp_path))
        theirs = run_qemu("amend", *both, "-o", o, *opts("b.qcow2", key), cwd=str(tmp_path))
        assert (mine.returncode, mine.stderr.replace(b"a.qcow2", b"b.qcow2")) == (theirs.returncode, theirs.stderr)
    same(["amend", *SECRET, "-o", "encrypt.state=inactive,encrypt.keyslot=0", "a.qcow2"], tmp_path)
    info = run_qemu("info", "a.qcow2", cwd=str(tmp_path)).stdout
    assert b"compat: 0.10" in info and info.count(b"active: true") == 1
    assert run_qemu("check", *both, *opts(tmp_path / "a.qcow2", "sec1")).returncode == 0


def test_info_imports_no_crypto(tmp_path: Path) -> None:
    create(tmp_path / "x.qcow2", "1M")
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "qimg", "info", str(tmp_path / "x.qcow2")],
                       capture_output=True, text=True, env=dict(os.environ))
    assert p.returncode == 0, p.stderr
    assert "numpy" not in p.stderr and "cryptography" not in p.stderr
