"""Sector encryption as QEMU's crypto/block.c does it: every 512-byte sector
is encrypted on its own, with an IV made from its sector number by the IV
generator (crypto/ivgen-*.c), in the cipher's mode.

What qimg can do (with the ``cryptography`` package's AES in ECB mode as the
only primitive, and numpy for everything around it):

- algorithms aes-128, aes-192, aes-256;
- modes xts, cbc, ecb and ctr;
- IV generators plain (sector number, low 32 bits, little endian), plain64
  (64 bits) and essiv (the plain64 IV encrypted with the hash of the key,
  in ECB mode).

Not supported: cast5-128, serpent-* and twofish-* (QEMU's nettle backend
has them, ``cryptography`` does not); a LUKS volume that uses one opens
for ``info`` but not for I/O, with "Unsupported cipher algorithm NAME".
des and 3des cannot appear in LUKS at all.

No Python loop runs per sector.  XTS works on a whole buffer at once: one
ECB call makes every sector's tweak T = E_K2(IV); the 32 tweaks of each
sector, T * alpha^j in GF(2^128) (little endian, reduced with 0x87 as XTS
defines), are shifts and XORs over arrays; then one XOR, one ECB call with
K1 over the whole buffer and another XOR.  CBC decryption is one ECB call
and a shifted XOR; CBC encryption chains the 32 blocks of a sector, so it
takes 32 ECB calls, each over that block of every sector.  CTR is one ECB
call over all the counter blocks.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from qimg.crypto.pbkdf import digest
from qimg.errors import QimgError

if TYPE_CHECKING:
    import numpy as np

SECTOR_SIZE = 512

#: QCryptoCipherAlgorithm names (QAPI order) -> (key length, block length)
CIPHER_ALGS: dict[str, tuple[int, int]] = {
    "aes-128": (16, 16), "aes-192": (24, 16), "aes-256": (32, 16),
    "des": (8, 8), "3des": (24, 8), "cast5-128": (16, 8),
    "serpent-128": (16, 16), "serpent-192": (24, 16), "serpent-256": (32, 16),
    "twofish-128": (16, 16), "twofish-192": (24, 16), "twofish-256": (32, 16),
}
CIPHER_MODES = ("ecb", "cbc", "xts", "ctr")
IVGEN_ALGS = ("plain", "plain64", "essiv")
SUPPORTED_ALGS = ("aes-128", "aes-192", "aes-256")

#: bytes encrypted per pass: bounds the scratch arrays of a large request
_CHUNK = 2 << 20


def key_len(alg: str) -> int:
    return CIPHER_ALGS[alg][0]


def block_len(alg: str) -> int:
    return CIPHER_ALGS[alg][1]


def iv_len(alg: str, mode: str) -> int:
    """qcrypto_cipher_get_iv_len: ECB has no IV."""
    return 0 if mode == "ecb" else block_len(alg)


def check_key(alg: str, mode: str, nkey: int) -> None:
    """qcrypto_cipher_validate_key_length, then what the backend supports."""
    if mode == "xts":
        if alg in ("des", "3des"):
            raise QimgError("XTS mode not compatible with DES/3DES")
        if nkey % 2:
            raise QimgError("XTS cipher key length should be a multiple of 2")
        if key_len(alg) != nkey // 2:
            raise QimgError(f"Cipher key length {nkey} should be {key_len(alg) * 2}")
    elif key_len(alg) != nkey:
        raise QimgError(f"Cipher key length {nkey} should be {key_len(alg)}")
    if mode == "xts" and block_len(alg) != 16:
        raise QimgError(f"Unsupported cipher mode {mode}")
    if alg not in SUPPORTED_ALGS:
        raise QimgError(f"Unsupported cipher algorithm {alg}")


class _Aes:
    """AES in ECB mode over whole buffers (the one primitive used)."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self._cipher = Cipher(algorithms.AES(key), modes.ECB())

    def encrypt(self, data: Any) -> bytes:
        return self._cipher.encryptor().update(_bytes_view(data))

    def decrypt(self, data: Any) -> bytes:
        return self._cipher.decryptor().update(_bytes_view(data))

    def crypt(self, data: "np.ndarray", encrypt: bool) -> "np.ndarray":
        """``data`` through the cipher, into this thread's scratch buffer
        (valid until its next use): update_into spares the allocation of a
        fresh output, which costs more than AES itself."""
        out = _scratch("ecb", data.nbytes + 16, "u1")
        ctx = self._cipher.encryptor() if encrypt else self._cipher.decryptor()
        n = ctx.update_into(_bytes_view(data), out)
        return out[:n].view("<u8").reshape(data.shape)


def _bytes_view(data: Any) -> Any:
    """cryptography takes buffers of bytes, not numpy arrays."""
    return data if isinstance(data, (bytes, bytearray)) else memoryview(data).cast("B")


_local = threading.local()


def _scratch(name: str, count: int, dtype: str) -> "np.ndarray":
    """A per-thread array of at least ``count`` elements, kept for reuse:
    fresh large arrays cost a page fault per 4 KiB."""
    import numpy as np

    pool = _local.__dict__
    arr = pool.get(name)
    if arr is None or len(arr) < count:
        arr = pool[name] = np.empty(max(count, _CHUNK // np.dtype(dtype).itemsize + 16), dtype=dtype)
    return arr[:count]


class SectorCipher:
    """A LUKS volume's (or key slot's) cipher: ``encrypt``/``decrypt``
    change a writable buffer of whole sectors in place; ``sector`` is the
    number of its first sector (the IV generator's input)."""

    @staticmethod
    def check(alg: str, mode: str, nkey: int, essiv_alg: str | None = None) -> None:
        """The refusals of making the cipher (and its ESSIV cipher), without
        making it."""
        check_key(alg, mode, nkey)
        if essiv_alg is not None and essiv_alg not in SUPPORTED_ALGS:
            raise QimgError(f"Unsupported cipher algorithm {essiv_alg}")

    def __init__(self, alg: str, mode: str, key: bytes, ivgen_alg: str,
                 ivgen_cipher_alg: str | None = None, ivgen_hash: str | None = None) -> None:
        check_key(alg, mode, len(key))
        self.mode = mode
        self.ivgen = ivgen_alg
        self._essiv: _Aes | None = None
        if mode == "ecb":
            pass
        elif ivgen_alg == "essiv":
            essiv_alg = ivgen_cipher_alg or alg
            if essiv_alg not in SUPPORTED_ALGS:
                raise QimgError(f"Unsupported cipher algorithm {essiv_alg}")
            assert ivgen_hash is not None
            self._essiv = _Aes(digest(ivgen_hash, key)[:key_len(essiv_alg)])
        if mode == "xts":
            half = len(key) // 2
            self._aes, self._tweak_aes = _Aes(key[:half]), _Aes(key[half:])
        else:
            self._aes = _Aes(key)

    # ---- the IV generator ------------------------------------------------
    def _ivs(self, first: int, count: int) -> "np.ndarray":
        """The IVs of ``count`` sectors from ``first``: (count, 16) bytes."""
        import numpy as np

        sectors = np.arange(count, dtype=np.uint64) + np.uint64(first & ((1 << 64) - 1))
        if self.ivgen == "plain":
            sectors &= np.uint64(0xFFFFFFFF)
        ivs = np.zeros((count, 2), dtype="<u8")
        ivs[:, 0] = sectors
        if self._essiv is not None:
            ivs = np.frombuffer(self._essiv.encrypt(ivs.tobytes()), dtype="<u8").reshape(count, 2)
        return ivs

    # ---- the modes ---------------------------------------------------------
    def encrypt(self, buf: Any, sector: int) -> None:
        self._run(buf, sector, True)

    def decrypt(self, buf: Any, sector: int) -> None:
        self._run(buf, sector, False)

    def _run(self, buf: Any, sector: int, encrypt: bool) -> None:
        import numpy as np

        view = memoryview(buf).cast("B")
        if len(view) % SECTOR_SIZE:
            raise ValueError("sector cipher needs whole sectors")
        for start in range(0, len(view), _CHUNK):
            part = view[start:start + _CHUNK]
            n = len(part) // SECTOR_SIZE
            # (sectors, blocks per sector, two little-endian 64-bit halves)
            data = np.frombuffer(part, dtype="<u8").reshape(n, SECTOR_SIZE // 16, 2)
            first = sector + start // SECTOR_SIZE
            if self.mode == "xts":
                self._xts(data, first, encrypt)
            elif self.mode == "cbc":
                (self._cbc_encrypt if encrypt else self._cbc_decrypt)(data, first)
            elif self.mode == "ctr":
                self._ctr(data, first)
            else:
                data[:] = self._aes.crypt(data, encrypt)

    def _xts(self, data: "np.ndarray", first: int, encrypt: bool) -> None:
        import numpy as np

        n, blocks = data.shape[0], data.shape[1]
        t = np.frombuffer(self._tweak_aes.encrypt(self._ivs(first, n)), dtype="<u8").reshape(n, 2)
        # T * alpha^j for every sector at once, block after block: a shift
        # left by one bit of the 128-bit little-endian tweak, the bit
        # shifted out at the top folded back in as 0x87
        lo, hi = t[:, 0].copy(), t[:, 1].copy()
        lows = _scratch("lows", blocks * n, "u8").reshape(blocks, n)
        highs = _scratch("highs", blocks * n, "u8").reshape(blocks, n)
        one, top, poly = np.uint64(1), np.uint64(63), np.uint64(0x87)
        for j in range(blocks):
            lows[j], highs[j] = lo, hi
            carry = (hi >> top) * poly
            hi = (hi << one) | (lo >> top)
            lo = (lo << one) ^ carry
        tweaks = _scratch("tweaks", data.size, "<u8").reshape(data.shape)
        tweaks[:, :, 0] = lows.T
        tweaks[:, :, 1] = highs.T
        data ^= tweaks
        np.bitwise_xor(self._aes.crypt(data, encrypt), tweaks, out=data)

    def _cbc_decrypt(self, data: "np.ndarray", first: int) -> None:
        plain = self._aes.crypt(data, False)
        plain[:, 1:] ^= data[:, :-1]
        plain[:, 0] ^= self._ivs(first, data.shape[0])
        data[:] = plain

    def _cbc_encrypt(self, data: "np.ndarray", first: int) -> None:
        import numpy as np

        prev = self._ivs(first, data.shape[0])
        for j in range(data.shape[1]):
            block = np.ascontiguousarray(data[:, j]) ^ prev
            prev = np.frombuffer(self._aes.encrypt(block), dtype="<u8").reshape(prev.shape)
            data[:, j] = prev

    def _ctr(self, data: "np.ndarray", first: int) -> None:
        import numpy as np

        # the IV is a 128-bit big-endian counter, counted up per block
        ivs = self._ivs(first, data.shape[0]).view(np.uint8).reshape(-1, 16)
        hi = ivs[:, :8].copy().view(">u8").astype(np.uint64)
        lo = ivs[:, 8:].copy().view(">u8").astype(np.uint64)
        j = np.arange(data.shape[1], dtype=np.uint64)
        lo_j = lo + j
        hi_j = hi + (lo_j < lo).astype(np.uint64)
        counters = np.empty(data.shape, dtype=">u8")
        counters[:, :, 0] = hi_j
        counters[:, :, 1] = lo_j
        data ^= self._aes.crypt(counters, True)


def legacy_aes(secret_id: str | None) -> SectorCipher:
    """QEMU's "qcow" crypto format (qcow's and qcow2's encrypt.format=aes):
    AES-128-CBC with plain64 IVs, the key the passphrase's first 16 bytes,
    zero padded (qcrypto_block_qcow_init).  Nothing about the key is stored:
    a wrong passphrase reads as noise, as in QEMU."""
    from qimg.crypto.secret import lookup_utf8

    if not secret_id:
        raise QimgError("Parameter 'encrypt.key-secret' is required for cipher")
    return SectorCipher("aes-128", "cbc", lookup_utf8(secret_id)[:16].ljust(16, b"\0"), "plain64")
