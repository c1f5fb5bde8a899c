"""The LUKS anti-forensic splitter (crypto/afsplit.c, the LUKS1 spec's AF):
a key of ``blocklen`` bytes becomes ``stripes`` blocks, all of which are
needed to get it back.  Only key material goes through here (4000 blocks
of at most 64 bytes), never guest data, so a plain loop is fine.
"""

from __future__ import annotations

import os
import struct

from qimg.crypto.pbkdf import digest, digest_len


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _diffuse(hash_alg: str, block: bytes) -> bytes:
    """Hash the block in digest-sized pieces, each prefixed with its
    big-endian index; the last piece keeps only its own length."""
    size = digest_len(hash_alg)
    out = []
    for i in range(0, -(-len(block) // size)):
        piece = block[i * size:(i + 1) * size]
        out.append(digest(hash_alg, struct.pack(">I", i), piece)[:len(piece)])
    return b"".join(out)


def encode(hash_alg: str, key: bytes, stripes: int) -> bytes:
    blocklen = len(key)
    random = os.urandom(blocklen * (stripes - 1))
    block = bytes(blocklen)
    for i in range(stripes - 1):
        block = _diffuse(hash_alg, _xor(random[i * blocklen:(i + 1) * blocklen], block))
    return random + _xor(key, block)


def decode(hash_alg: str, blocklen: int, stripes: int, material: bytes) -> bytes:
    block = bytes(blocklen)
    for i in range(stripes - 1):
        block = _diffuse(hash_alg, _xor(material[i * blocklen:(i + 1) * blocklen], block))
    last = stripes - 1
    return _xor(material[last * blocklen:(last + 1) * blocklen], block)
