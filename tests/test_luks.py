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
    call), with run_qemu's result shape."""
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
