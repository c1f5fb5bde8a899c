"""cloop: the Linux compressed loopback image, read-only, as QEMU's block/cloop.c.

Layout (all big endian): a shell-script preamble of 128 bytes (its first
line names the "V2.0 Format"), then ``block_size`` (u32) and ``n_blocks``
(u32), then ``n_blocks + 1`` u64 file offsets.  Block N is the zlib stream
between offsets[N] and offsets[N + 1]; it inflates to exactly
``block_size`` bytes.  The virtual size is ``n_blocks * block_size``
(computed in 32-bit sectors, wrapping as QEMU's does).

QEMU's limits are kept, with its messages, so a hostile header allocates
nothing QEMU would not: the offsets table is read only as far as the file
goes (what lies past EOF reads as zeroes, as QEMU's reads do, so it is
checked without being stored).  The last inflated block is cached, as
QEMU's current_block.  Any failure to read or inflate a block is EIO.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
import zlib
from array import array
from operator import sub
from typing import Any

from qimg.block.driver import Driver
from qimg.block.status import ALLOCATED, DATA, EOF, Extent
from qimg.errors import QimgError

SECTOR = 512
#: the largest block (uncompressed) QEMU accepts
MAX_BLOCK_SIZE = 64 * 1024 * 1024
UINT32_MAX = 0xFFFFFFFF
#: QEMU's n_blocks limit (it guards a 32-bit size computation)
MAX_N_BLOCKS = (UINT32_MAX - 1) // 8
#: the largest offsets table QEMU allocates
MAX_OFFSETS_SIZE = 512 * 1024 * 1024
HEADER_OFFSET = 128
TABLE_OFFSET = HEADER_OFFSET + 8
MAGIC = (b"#!/bin/sh\n"
         b"#V2.0 Format\n"
         b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
#: offsets checked per step (bounds the temporary list of differences)
CHUNK = 1 << 16

EIO_TEXT = os.strerror(errno.EIO)


def _eio() -> QimgError:
    return QimgError(EIO_TEXT)


def _table(raw: bytes) -> array:
    """Big-endian u64s as an array of native integers."""
    table = array("Q")
    table.frombytes(raw)
    if sys.byteorder == "little":
        table.byteswap()
    return table


class CloopDriver(Driver):
    format_name = "cloop"
    supports_create = False
    # QEMU's cloop_open refuses a read-write open itself
    # (bdrv_apply_auto_read_only: "Image is read-only"), and so does
    # open_image, before any lock; write() keeps the Driver's refusal
    supports_write = True
    refuses_write_open = True
    supports_get_info = False

    # ---- probing -------------------------------------------------------------------
    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        n = min(len(MAGIC), len(header))
        # QEMU scores 2: anything that claims a header firmly wins over it
        return 2 if header[:n] == MAGIC[:n] else 0

    # ---- open ------------------------------------------------------------------------
    def do_open(self, options: dict[str, Any]) -> None:
        block_size, n_blocks = struct.unpack(">II", self.file.pread(HEADER_OFFSET, 8))
        if block_size % SECTOR:
            raise QimgError(f"block_size {block_size} must be a multiple of 512")
        if block_size == 0:
            raise QimgError("block_size cannot be zero")
        if block_size > MAX_BLOCK_SIZE:
            raise QimgError(f"block_size {block_size} must be {MAX_BLOCK_SIZE // (1024 * 1024)} MB or less")
        if n_blocks > MAX_N_BLOCKS:
            raise QimgError(f"n_blocks {n_blocks} must be {MAX_N_BLOCKS} or less")
        # offsets_size is a uint32_t in QEMU: (MAX_N_BLOCKS + 1) * 8 wraps
        # to 0, and g_try_malloc(0) returns NULL
        offsets_size = ((n_blocks + 1) * 8) & UINT32_MAX
        if offsets_size > MAX_OFFSETS_SIZE:
            raise QimgError("image requires too many offsets, try increasing block size")
        if offsets_size == 0:
            raise QimgError("Could not allocate offsets table")
        count = n_blocks + 1
        # only the part of the table inside the file; an entry cut by EOF
        # reads with zeroes for its missing bytes
        inside = max(0, min(offsets_size, self.file.size - TABLE_OFFSET))
        stored = -(-inside // 8)
        offsets = _table(self.file.pread(TABLE_OFFSET, stored * 8)) if stored else array("Q")
        self._check_offsets(offsets, count)
        self.block_size = block_size
        self.n_blocks = n_blocks
        self.offsets = offsets
        self.size = ((n_blocks * (block_size // SECTOR)) & UINT32_MAX) * SECTOR
        #: (block number, inflated data) of the last block read
        self._cache: tuple[int, bytes] | None = None

    @staticmethod
    def _check_offsets(offsets: array, count: int) -> None:
        """QEMU's checks on the offsets table, first failing index first:
        entries must not decrease, and no block may be over 128 MiB."""
        limit = 2 * MAX_BLOCK_SIZE
        stored = len(offsets)
        for start in range(0, max(stored - 1, 0), CHUNK):
            stop = min(start + CHUNK, stored - 1)
            diffs = list(map(sub, offsets[start + 1:stop + 1], offsets[start:stop]))
            if min(diffs) < 0 or max(diffs) > limit:
                for k, d in enumerate(diffs):
                    if d < 0:
                        raise QimgError(f"offsets not monotonically increasing at index {start + k + 1}, "
                                        "image file is corrupt")
                    if d > limit:
                        raise QimgError(f"invalid compressed block size at index {start + k + 1}, "
                                        "image file is corrupt")
        if stored < count:
            # entries past EOF read as 0: the first of them (if any came
            # before it) is where the table stops increasing
            last = offsets[-1] if stored else 0
            if last > 0:
                raise QimgError(f"offsets not monotonically increasing at index {stored}, image file is corrupt")

    def _offset(self, index: int) -> int:
        return self.offsets[index] if index < len(self.offsets) else 0

    # ---- I/O ---------------------------------------------------------------------------
    def _block(self, num: int) -> bytes:
        cache = self._cache
        if cache is not None and cache[0] == num:
            return cache[1]
        start = self._offset(num)
        # a uint32_t in QEMU; open bounded it to 128 MiB
        length = (self._offset(num + 1) - start) & UINT32_MAX
        try:
            data = self.file.pread(start, length)
        except OSError:
            raise _eio() from None
        bs = self.block_size
        d = zlib.decompressobj()
        try:
            # one byte of room more: a stream that inflates to more than a
            # block fails, as inflate(Z_FINISH) does without room
            out = d.decompress(data, bs + 1)
        except zlib.error:
            raise _eio() from None
        if not d.eof or len(out) != bs:
            raise _eio()
        self._cache = (num, out)
        return out

    def read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        bs = self.block_size
        end = offset + length
        first = offset // bs
        last = (end - 1) // bs
        if first == last:
            within = offset - first * bs
            block = self._block(first)
            return block if length == bs else block[within:within + length]
        parts = []
        for num in range(first, last + 1):
            block = self._block(num)
            lo = max(offset, num * bs) - num * bs
            hi = min(end, (num + 1) * bs) - num * bs
            parts.append(block if lo == 0 and hi == bs else block[lo:hi])
        return b"".join(parts)

    def block_status(self, offset: int, length: int) -> Extent:
        # QEMU's answer for a format without block status: all data, no
        # host offset
        length = min(length, self.size - offset)
        eof = EOF if offset + length >= self.size else 0
        return Extent(offset, length, DATA | ALLOCATED | eof)
