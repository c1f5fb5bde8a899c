"""LUKS: the crypto layer (secrets, sector ciphers, the LUKS1 header) and the
standalone ``luks`` format, against qemu-img, qemu-io and ``cryptography``.

PBKDF2 runs with iter-time=10 everywhere: the default 2 s would make every
image cost seconds to create and open.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_qemu, run_qemu, run_qemu_io
from test_check_helpers import qimg_inprocess

SECRET = ["--object", "secret,id=sec0,data=abc"]
FAST = "iter-time=10"


def run_qimg(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    """qimg's command line in this process (no interpreter start-up per
    call), with run_qemu's result shape; the secrets start empty, as in a
    new process."""
    from qimg.crypto import secret

    secret.SECRETS.clear()
    out, err, rc = qimg_inprocess(list(args), Path(cwd or os.getcwd()))
    return subprocess.CompletedProcess(list(args), rc, out.encode(), err.encode())


def qemu_retry(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    """qemu-img, again when its PBKDF calibration fails for no reason
    ("Unable to get accurate CPU usage" when a run takes under a tick)."""
    for _ in range(8):
        p = run_qemu(*args, cwd=cwd)
        if b"Unable to get accurate CPU usage" not in p.stderr:
            return p
    return p


def opts(path: Path | str, secret: str = "sec0", driver: str = "luks") -> list[str]:
    return ["--image-opts", f"driver={driver},file.filename={path},key-secret={secret}"]


def qimg_create(path: Path, size: str = "1M", extra: str = "") -> None:
    o = f"key-secret=sec0,{FAST}" + (f",{extra}" if extra else "")
    p = run_qimg("create", "-q", *SECRET, "-f", "luks", "-o", o, str(path), size)
    assert p.returncode == 0, p.stderr


def pattern(size: int, seed: int = 1) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="module")
def qemu_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LUKS image qemu-img made (its defaults), with data qemu-io wrote."""
    d = tmp_path_factory.mktemp("qemuluks")
    path = d / "q.luks"
    p = qemu_retry("create", "-q", *SECRET, "-f", "luks", "-o", f"key-secret=sec0,{FAST}", str(path), "2M")
    assert p.returncode == 0, p.stderr
    run_qemu_io(*SECRET, *opts(path), "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x33 1500k 3k")
    return path


# ---- the crypto layer on its own ---------------------------------------------------


@pytest.mark.parametrize("ivgen", ["plain", "plain64", "essiv"])
@pytest.mark.parametrize("mode", ["xts", "cbc", "ctr", "ecb"])
def test_sector_cipher_matches_cryptography_per_sector(mode: str, ivgen: str) -> None:
    """The vectorized modes give what cryptography's own mode gives when run
    sector by sector with each sector's IV."""
    import hashlib

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from qimg.crypto.cipher import SectorCipher

    key = os.urandom(64 if mode == "xts" else 32)
    first = (1 << 32) - 3  # plain's IV wraps at 2^32, plain64's does not
    data = os.urandom(512 * 40)

    def iv(sector: int) -> bytes:
        raw = (sector & 0xFFFFFFFF if ivgen == "plain" else sector).to_bytes(16, "little")
        if ivgen == "essiv":
            salt = hashlib.sha256(key).digest()
            raw = Cipher(algorithms.AES(salt), modes.ECB()).encryptor().update(raw)
        return raw

    def reference(i: int) -> bytes:
        m = {"xts": modes.XTS, "cbc": modes.CBC, "ctr": modes.CTR}.get(mode)
        c = Cipher(algorithms.AES(key), m(iv(first + i)) if m else modes.ECB())
        return c.encryptor().update(data[i * 512:(i + 1) * 512])

    cipher = SectorCipher("aes-256", mode, key, ivgen, "aes-256", "sha256")
    buf = bytearray(data)
    cipher.encrypt(buf, first)
    assert bytes(buf) == b"".join(reference(i) for i in range(40))
    cipher.decrypt(buf, first)
    assert bytes(buf) == data


def test_afsplit_round_trip() -> None:
    from qimg.crypto import afsplit

    key = os.urandom(48)
    material = afsplit.encode("sha1", key, 4000)
    assert len(material) == 48 * 4000
    assert afsplit.decode("sha1", 48, 4000, material) == key


def test_secrets_live_in_the_crypto_layer() -> None:
    from qimg.cli.common import add_object
    from qimg.crypto import secret
    from qimg.errors import QimgError

    add_object("secret,id=t_b64,data=YWJj,format=base64")
    assert secret.lookup("t_b64") == b"abc"
    add_object("secret,id=t_nul,data=YQBi,format=base64")
    with pytest.raises(QimgError, match="Data from secret t_nul is not valid UTF-8"):
        secret.lookup_utf8("t_nul")
    with pytest.raises(QimgError, match="No secret with id 'nosuch'"):
        secret.lookup("nosuch")


def test_info_imports_no_crypto(tmp_path: Path) -> None:
    qimg_create(tmp_path / "x.luks")
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "qimg", "info", str(tmp_path / "x.luks")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "numpy" not in p.stderr and "cryptography" not in p.stderr


# ---- images qemu made ---------------------------------------------------------------


@needs_qemu
def test_qemu_image_info_and_data(qemu_image: Path, tmp_path: Path) -> None:
    for args in (["info", str(qemu_image)], ["info", "--output=json", str(qemu_image)],
                 ["info", *SECRET, *opts(qemu_image)], ["info", "--output=json", *SECRET, *opts(qemu_image)]):
        mine, theirs = run_qimg(*args), run_qemu(*args)
        assert (mine.returncode, mine.stdout, mine.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)
    out = tmp_path / "out.raw"
    p = run_qimg("convert", *SECRET, *opts(qemu_image), "-O", "raw", str(out))
    assert p.returncode == 0, p.stderr
    data = out.read_bytes()
    assert data[:1 << 20] == b"\x5a" * (1 << 20)
    assert data[1500 << 10:1503 << 10] == b"\x33" * 3072
    # never written: the file's zeroes, decrypted, as qemu reads them
    p = run_qemu("convert", *SECRET, *opts(qemu_image), "-O", "raw", str(tmp_path / "theirs.raw"))
    assert p.returncode == 0 and (tmp_path / "theirs.raw").read_bytes() == data


@needs_qemu
def test_wrong_or_missing_secret(qemu_image: Path) -> None:
    cases = [
        ["convert", "-O", "raw", str(qemu_image), "/dev/null"],
        ["convert", "--object", "secret,id=sec0,data=abd", *opts(qemu_image), "-O", "raw", "/dev/null"],
        ["convert", *SECRET, *opts(qemu_image, "nosuch"), "-O", "raw", "/dev/null"],
        ["check", str(qemu_image)],
        ["check", *SECRET, *opts(qemu_image)],
        ["map", *SECRET, *opts(qemu_image)],
        ["map", "--output=json", *SECRET, *opts(qemu_image)],
        ["measure", "-O", "qcow2", *SECRET, *opts(qemu_image)],
    ]
    for args in cases:
        mine, theirs = run_qimg(*args), run_qemu(*args)
        assert (mine.returncode, mine.stdout, mine.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr), args


# ---- images qimg makes, with every cipher combination qimg can do ---------------------------

COMBOS = [
    "",  # QEMU's defaults: aes-256-xts-plain64, sha256
    "cipher-alg=aes-128,ivgen-alg=plain,hash-alg=sha1",
    "cipher-alg=aes-192,hash-alg=sha512",
    "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=md5",
    "cipher-mode=ecb,hash-alg=ripemd160",
    "cipher-mode=ctr,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha224",
]


@needs_qemu
@pytest.mark.parametrize("combo", COMBOS)
def test_qimg_image_interop(tmp_path: Path, combo: str) -> None:
    raw = tmp_path / "in.raw"
    raw.write_bytes(pattern(1 << 20) + bytes(512 << 10))
    img = tmp_path / "x.luks"
    o = ",".join(x for x in (f"key-secret=sec0,{FAST}", combo) if x)
    p = run_qimg("convert", *SECRET, "-f", "raw", "-O", "luks", "-o", o, str(raw), str(img))
    assert p.returncode == 0, p.stderr
    # qemu reads what qimg encrypted, and writes what qimg then decrypts
    p = run_qemu("compare", *SECRET, "--image-opts", f"driver=luks,file.filename={img},key-secret=sec0",
                 f"driver=raw,file.filename={raw}")
    assert p.returncode == 0, p.stdout + p.stderr
    run_qemu_io(*SECRET, *opts(img), "-c", "write -P 0x77 1000k 100k")
    out = tmp_path / "out.raw"
    p = run_qimg("convert", *SECRET, *opts(img), "-O", "raw", str(out))
    assert p.returncode == 0, p.stderr
    want = bytearray(raw.read_bytes())
    want[1000 << 10:1100 << 10] = b"\x77" * (100 << 10)
    assert out.read_bytes() == bytes(want)
    info = run_qimg("info", "--output=json", str(img)), run_qemu("info", "--output=json", str(img))
    assert info[0].stdout == info[1].stdout


@needs_qemu
def test_unaligned_writes_read_modify_write(tmp_path: Path) -> None:
    from qimg.block.image import open_image
    from qimg.cli.common import add_object

    add_object("secret,id=sec0,data=abc")
    img = tmp_path / "x.luks"
    qimg_create(img, "64k")
    run_qemu_io(*SECRET, *opts(img), "-c", "write -P 0x11 0 64k")
    with open_image(str(img), "luks", read_only=False, options={"key-secret": "sec0"}) as im:
        im.write(100, b"\x22" * 1000)
        im.write(4095, b"\x33")
        im.write_zeroes(8000, 900)
        assert im.read(99, 3) == b"\x11\x22\x22"
    p = run_qemu_io(*SECRET, *opts(img), "-c", "read -P 0x22 100 1000", "-c", "read -P 0x33 4095 1",
                    "-c", "read -P 0 8000 900", "-c", "read -P 0x11 8900 1000", "-c", "read -P 0x11 0 100")
    assert b"Pattern verification failed" not in p.stdout


# ---- hostile headers: qemu's messages -------------------------------------------------------

SLOTS = 208


def _slot(i: int, field: int) -> int:
    return SLOTS + 48 * i + field


HOSTILE = {
    "magic": lambda b: b.__setitem__(slice(0, 1), b"X"),
    "version": lambda b: struct.pack_into(">H", b, 6, 2),
    "cipher name": lambda b: b.__setitem__(slice(8, 40), b"a" * 32),
    "hash spec": lambda b: b.__setitem__(slice(72, 104), b"h" * 32),
    "payload in header": lambda b: struct.pack_into(">I", b, 104, 7),
    "payload past end": lambda b: struct.pack_into(">I", b, 104, 0xFFFFFFFF),
    "master key iters": lambda b: struct.pack_into(">I", b, 164, 0),
    "key length": lambda b: struct.pack_into(">I", b, 108, 0x80000002),
    "odd key length": lambda b: struct.pack_into(">I", b, 108, 3),
    "stripes": lambda b: struct.pack_into(">I", b, _slot(2, 44), 0),
    "slot state": lambda b: struct.pack_into(">I", b, _slot(3, 0), 5),
    "slot iters": lambda b: struct.pack_into(">I", b, _slot(0, 4), 0),
    "slot in header": lambda b: struct.pack_into(">I", b, _slot(0, 40), 7),
    "slots overlap": lambda b: struct.pack_into(">I", b, _slot(5, 40), 1300),
    "slot past payload": lambda b: struct.pack_into(">I", b, _slot(7, 40), 4000),
    "mode format": lambda b: b.__setitem__(slice(40, 72), b"xts".ljust(32, b"\0")),
    "mode": lambda b: b.__setitem__(slice(40, 72), b"foo-plain64".ljust(32, b"\0")),
    "iv hash": lambda b: b.__setitem__(slice(40, 72), b"xts-plain64:foo".ljust(32, b"\0")),
    "essiv no hash": lambda b: b.__setitem__(slice(40, 72), b"xts-essiv".ljust(32, b"\0")),
    "essiv sha1": lambda b: b.__setitem__(slice(40, 72), b"xts-essiv:sha1".ljust(32, b"\0")),
    "ivgen": lambda b: b.__setitem__(slice(40, 72), b"xts-foo".ljust(32, b"\0")),
    "cipher cast5": lambda b: b.__setitem__(slice(8, 40), b"cast5".ljust(32, b"\0")),
    "truncated header": lambda b: b.__delitem__(slice(100, None)),
    "truncated payload": lambda b: b.__delitem__(slice(4096, None)),
}


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("lukshdr") / "b.luks"
    qimg_create(path, "64k")
    return path.read_bytes()


@needs_qemu
@pytest.mark.parametrize("damage", sorted(HOSTILE))
def test_hostile_header(tmp_path: Path, base_image: bytes, damage: str) -> None:
    buf = bytearray(base_image)
    HOSTILE[damage](buf)
    path = tmp_path / "h.luks"
    path.write_bytes(bytes(buf))
    for args in (["info", "-f", "luks", "h.luks"], ["convert", *SECRET, *opts("h.luks"), "-O", "raw", "o.raw"]):
        mine, theirs = run_qimg(*args, cwd=str(tmp_path)), run_qemu(*args, cwd=str(tmp_path))
        assert mine.stderr == theirs.stderr, args
        assert (mine.returncode, mine.stdout) == (theirs.returncode, theirs.stdout), args
        if mine.returncode:
            break  # opening with the key checks the same header first


# ---- create, resize, measure, amend ------------------------------------------------------


@needs_qemu
@pytest.mark.parametrize("options", [
    "iter-time=10",  # no key secret
    "key-secret=sec1",
    "key-secret=sec0,cipher-alg=sm4",
    "key-secret=sec0,cipher-alg=des",
    "key-secret=sec0,cipher-alg=cast5-128",
    "key-secret=sec0,cipher-mode=foo",
    "key-secret=sec0,ivgen-alg=essiv,ivgen-hash-alg=sha1",
    "key-secret=sec0,hash-alg=sha3",
    "key-secret=sec0,iter-time=abc",
    "key-secret=sec0,preallocation=bogus",
])
def test_create_refusals(tmp_path: Path, options: str) -> None:
    args = ["create", *SECRET, "-f", "luks", "-o", options, "c.luks", "1M"]
    mine = run_qimg(*args, cwd=str(tmp_path))
    assert not (tmp_path / "c.luks").exists()
    theirs = qemu_retry(*args, cwd=str(tmp_path))
    assert (mine.returncode, mine.stdout, mine.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)
    assert not (tmp_path / "c.luks").exists()


@needs_qemu
def test_create_layout_and_sizes(tmp_path: Path) -> None:
    for name, size, extra in (("a.luks", "1000", ""), ("b.luks", "1M", "cipher-alg=aes-128"),
                              ("c.luks", "64k", "preallocation=full")):
        p = run_qimg("create", *SECRET, "-f", "luks", "-o", f"key-secret=sec0,{FAST}" + (f",{extra}" if extra else ""),
                     name, size, cwd=str(tmp_path))
        assert p.stdout.startswith(f"Formatting '{name}', fmt=luks size=".encode()), p.stderr
    # qemu's sizes: 2 MiB of header for a 64-byte key, 1 MiB for 32 bytes
    assert (tmp_path / "a.luks").stat().st_size == 2068480 + 1000
    assert (tmp_path / "b.luks").stat().st_size == 1052672 + (1 << 20)
    assert (tmp_path / "c.luks").stat().st_blocks * 512 >= 2068480 + (64 << 10)
    for name in ("a.luks", "b.luks", "c.luks"):
        mine, theirs = run_qimg("info", name, cwd=str(tmp_path)), run_qemu("info", name, cwd=str(tmp_path))
        assert mine.stdout == theirs.stdout
    p = run_qimg("measure", "-O", "luks", "-o", "key-secret=sec0,cipher-alg=aes-128", *SECRET, "--size", "1G")
    assert p.stdout == b"required size: 1074794496\nfully allocated size: 1074794496\n"
    mine = run_qimg("measure", "-O", "luks", "--size", "1G")
    assert mine.stderr == run_qemu("measure", "-O", "luks", "--size", "1G").stderr


@needs_qemu
def test_resize_like_qemu(tmp_path: Path) -> None:
    qimg_create(tmp_path / "a.luks")
    (tmp_path / "b.luks").write_bytes((tmp_path / "a.luks").read_bytes())
    for args in (["2M"], ["1M"], ["--shrink", "1M"], ["--preallocation=full", "3M"],
                 ["--preallocation=metadata", "4M"], ["4000001"]):
        mine = run_qimg("resize", *SECRET, *opts("a.luks"), *args, cwd=str(tmp_path))
        theirs = run_qemu("resize", *SECRET, *opts("b.luks"), *args, cwd=str(tmp_path))
        assert (mine.returncode, mine.stdout, mine.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr)
        assert (tmp_path / "a.luks").stat().st_size == (tmp_path / "b.luks").stat().st_size
    assert run_qimg("info", "a.luks", cwd=str(tmp_path)).stdout.splitlines()[2] == b"virtual size: 3.81 MiB (4000256 bytes)"


@needs_qemu
def test_amend_key_slots_like_qemu(tmp_path: Path) -> None:
    qimg_create(tmp_path / "a.luks", "64k")
    (tmp_path / "b.luks").write_bytes((tmp_path / "a.luks").read_bytes())
    both = [*SECRET, "--object", "secret,id=sec1,data=xyz"]
    steps = [
        ("sec0", "state=active,new-secret=sec1,iter-time=10"),
        ("sec0", "state=active,new-secret=sec1,keyslot=1"),
        ("sec0", "state=active,new-secret=sec1,keyslot=-1"),
        ("sec0", "state=inactive,keyslot=9"),
        ("sec0", "new-secret=sec1"),
        ("sec0", "state=bogus"),
        ("sec0", "state=inactive"),
        ("sec0", "state=inactive,keyslot=3"),
        ("sec1", "state=inactive,old-secret=sec0,iter-time=5"),
        ("sec1", "state=inactive,old-secret=sec0"),
        ("sec1", "state=inactive,keyslot=1"),
        ("sec1", "state=inactive,old-secret=sec1"),
    ]
    for key, o in steps:
        mine = run_qimg("amend", *both, "-o", o, *opts("a.luks", key), cwd=str(tmp_path))
        theirs = run_qemu("amend", *both, "-o", o, *opts("b.luks", key), cwd=str(tmp_path))
        assert (mine.returncode, mine.stderr.replace(b"a.luks", b"b.luks")) == (theirs.returncode, theirs.stderr), o
    # slot 0 erased, slot 1 holds sec1: qemu opens qimg's image with it
    p = run_qemu("convert", *both, *opts(tmp_path / "a.luks", "sec1"), "-O", "raw", str(tmp_path / "o.raw"))
    assert p.returncode == 0, p.stderr
    slots = [line for line in run_qemu("info", str(tmp_path / "a.luks")).stdout.splitlines() if b"active" in line]
    assert slots[:2] == [b"            active: false", b"            active: true"]
