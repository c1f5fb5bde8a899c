"""PBKDF2 and the hashes LUKS names, as QEMU's crypto/pbkdf.c and
crypto/hash.c offer them (hashlib does the work, in C).

``count_iters`` answers qcrypto_pbkdf2_count_iters' question (how many
iterations make a second of CPU time) with a shorter measurement than
QEMU's half second, remembered for the rest of the process: creating an
image should not cost seconds before the real work starts.
"""

from __future__ import annotations

import time

from qimg.errors import QimgError

#: QCryptoHashAlgorithm names (in QAPI order) -> digest length
HASHES: dict[str, int] = {
    "md5": 16, "sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64, "ripemd160": 20,
}

UINT32_MAX = (1 << 32) - 1
ULLONG_MAX = (1 << 64) - 1
#: CPU time one calibration run should take
_CALIBRATE_SECONDS = 0.08
_rates: dict[tuple[str, int], int] = {}


def digest_len(hash_alg: str) -> int:
    return HASHES[hash_alg]


def digest(hash_alg: str, *parts: bytes) -> bytes:
    import hashlib  # here: opening a volume for its metadata needs no hash

    h = hashlib.new(hash_alg)
    for part in parts:
        h.update(part)
    return h.digest()


def pbkdf2(hash_alg: str, password: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    import hashlib

    return hashlib.pbkdf2_hmac(hash_alg, password, salt, iterations, length)


def count_iters(hash_alg: str, password: bytes, salt: bytes, length: int) -> int:
    """PBKDF2 iterations per second of CPU time for a ``length``-byte key."""
    key = (hash_alg, length)
    rate = _rates.get(key)
    if rate is not None:
        return rate
    iterations = 1 << 12
    while True:
        start = time.thread_time()
        pbkdf2(hash_alg, password, salt, iterations, length)
        spent = time.thread_time() - start
        if spent >= _CALIBRATE_SECONDS:
            break
        # aim a little past the target, so one more run is enough
        iterations = iterations * 10 if spent < _CALIBRATE_SECONDS / 10 else \
            int(iterations * 1.25 * _CALIBRATE_SECONDS / spent) + 1
    rate = max(1, int(iterations / spent))
    _rates[key] = rate
    return rate


def _range_error(text: str) -> QimgError:
    # error_setg_errno(errp, ERANGE, ...)
    return QimgError(f"{text}: Numerical result out of range")


def scale_iters(per_second: int, iter_time_ms: int, divisor: int = 1) -> int:
    """Iterations for ``iter_time_ms`` (QEMU's arithmetic and limits, in
    uint64): ``per_second * iter_time / 1000 / divisor``."""
    if iter_time_ms and per_second > ULLONG_MAX // iter_time_ms:
        raise _range_error(f"PBKDF iterations {per_second} too large to scale")
    iters = per_second * iter_time_ms // 1000 // divisor
    if iters > UINT32_MAX:
        raise _range_error(f"PBKDF iterations {iters} larger than {UINT32_MAX}")
    return iters
