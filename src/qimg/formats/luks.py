"""luks: a LUKS1 volume in a file (QEMU's block/crypto.c): the header and
key material first, the encrypted guest data (the payload) after them.

The guest sees the file minus the payload offset, in whole sectors; sector
N of the guest is encrypted with IV N.  Requests that do not cover whole
sectors are read-modify-write, as QEMU's 512-byte request alignment makes
them.  The header is read on open; without a key (``info``) only metadata
is available, as with QEMU's BDRV_O_NO_IO.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from qimg.block.driver import Driver
from qimg.block.options import NUMBER, SIZE, STRING, OptionSpec
from qimg.block.status import ALLOCATED, DATA, EOF, Extent
from qimg.errors import QimgError, UnsupportedError

if TYPE_CHECKING:
    from qimg.crypto.luks import Volume

SECTOR = 512
INT64_MAX = (1 << 63) - 1
#: guest bytes encrypted per request (block/crypto.c's bounce buffer is 1 MiB)
IO_CHUNK = 4 << 20

#: block_crypto_create_opts_luks, in QEMU's order
CREATE_OPTS = [
    OptionSpec("size", SIZE, "Virtual disk size"),
    OptionSpec("key-secret", STRING, "ID of the secret that provides the keyslot passphrase"),
    OptionSpec("cipher-alg", STRING, "Name of encryption cipher algorithm"),
    OptionSpec("cipher-mode", STRING, "Name of encryption cipher mode"),
    OptionSpec("ivgen-alg", STRING, "Name of IV generator algorithm"),
    OptionSpec("ivgen-hash-alg", STRING, "Name of IV generator hash algorithm"),
    OptionSpec("hash-alg", STRING, "Name of encryption hash algorithm"),
    OptionSpec("iter-time", NUMBER, "Time to spend in PBKDF in milliseconds"),
]

#: block_crypto_amend_opts_luks
AMEND_OPTS = [
    OptionSpec("state", STRING, "Select new state of affected keyslots (active/inactive)"),
    OptionSpec("keyslot", NUMBER, "Select a single keyslot to modify explicitly"),
    OptionSpec("old-secret", STRING, "Select all keyslots that match this password"),
    OptionSpec("new-secret", STRING, "New secret to set in the matching keyslots. Empty string to erase"),
    OptionSpec("iter-time", NUMBER, "Time to spend in PBKDF in milliseconds"),
]

_PREALLOC = ("off", "metadata", "falloc", "full")


def _prealloc(options: dict[str, Any]) -> str:
    mode = options.get("preallocation")
    mode = "off" if mode is None else mode
    if mode not in _PREALLOC:
        raise QimgError(f"invalid parameter value: {mode}")
    # block_crypto_co_create_generic: no metadata to preallocate
    return "off" if mode == "metadata" else mode


class LuksDriver(Driver):
    format_name = "luks"
    create_opts = CREATE_OPTS
    amend_opts = AMEND_OPTS
    supports_resize = True
    #: a new volume's unwritten sectors decrypt to noise, not zeroes
    has_zero_init = False
    #: the open options that make QEMU name the image as json:{...}
    strong_runtime_opts = ("key-secret",)

    # ---- probing, creation --------------------------------------------------
    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        # the magic and version 1 (qcrypto_block_luks_has_format), checked
        # here: probing every image must not import the crypto layer
        return 100 if header[:8] == b"LUKS\xba\xbe\x00\x01" else 0

    @classmethod
    def create(cls, filename: str, size: int, options: dict[str, Any]) -> None:
        """block_crypto_co_create_opts_luks: the options are checked, the
        file made empty, and the volume written; any failure after the file
        was made deletes it."""
        from qimg.crypto import luks
        from qimg.formats.raw import RawDriver
        from qimg.protocols.file import File

        prealloc = _prealloc(options)
        opts = luks.create_options(options)
        file_opts = {k: v for k, v in options.items() if k in ("nocow", "extent_size_hint")}
        RawDriver.create(filename, 0, file_opts)
        try:
            with File(filename, read_only=False) as f:
                def init(header_len: int) -> None:
                    if size > INT64_MAX or header_len > INT64_MAX - size:
                        raise QimgError("The requested file size is too large")
                    f.truncate(size + header_len, prealloc)

                luks.create_volume(opts, init, f.pwrite)
        except BaseException:
            try:
                os.unlink(filename)
            except OSError:
                pass
            raise

    @classmethod
    def measure(cls, size: int | None, options: dict[str, Any], source: Any) -> dict[str, int]:
        """block_crypto_measure: unallocated data is encrypted too, so only
        the size counts, plus the header."""
        from qimg.crypto import luks

        _prealloc(options)
        total = source.size if source is not None else (size or 0)
        header = luks.payload_size(luks.create_options(options))
        return {"required": header + total, "fully-allocated": header + total}

    # ---- open ---------------------------------------------------------------
    def do_open(self, options: dict[str, Any]) -> None:
        from qimg.crypto import luks

        self.encrypted = True
        self.volume: "Volume" = luks.open_volume(self.file.pread, options.get("key-secret"),
                                                 bool(options.get("no_io")))
        self._refresh_size()

    def _refresh_size(self) -> None:
        length = self.file.size - self.volume.payload_offset
        if length < 0:
            raise QimgError("Could not refresh total sector count: Input/output error")
        self.size = -(-length // SECTOR) * SECTOR

    def info_specific(self) -> dict[str, Any] | None:
        return {"type": "luks", "data": self.volume.info()}

    # ---- I/O ------------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> Extent:
        # no block status of its own: all data, at no offset a reader could use
        length = min(length, self.size - offset)
        flags = DATA | ALLOCATED | (EOF if offset + length >= self.size else 0)
        return Extent(offset, length, flags)

    def _sectors(self, start: int, end: int) -> bytearray:
        """Plain text of the sectors covering [start, end)."""
        buf = bytearray(end - start)
        self.file.preadinto(self.volume.payload_offset + start, memoryview(buf))
        self._cipher.decrypt(buf, start // SECTOR)
        return buf

    @property
    def _cipher(self) -> Any:
        if self.volume.cipher is None:
            raise QimgError("Parameter 'key-secret' is required for cipher")
        return self.volume.cipher

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            stop = min(end, pos + IO_CHUNK)
            lo, hi = pos // SECTOR * SECTOR, -(-stop // SECTOR) * SECTOR
            buf = self._sectors(lo, hi)
            out += memoryview(buf)[pos - lo:stop - lo]
            pos = stop
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        if self.read_only:
            raise QimgError("Image is read-only")
        view = memoryview(data).cast("B")
        end = offset + len(view)
        if end > self.size:
            raise QimgError("Invalid argument")
        pos = offset
        while pos < end:
            stop = min(end, pos + IO_CHUNK)
            lo, hi = pos // SECTOR * SECTOR, -(-stop // SECTOR) * SECTOR
            if lo == pos and hi == stop:
                buf = bytearray(view[pos - offset:stop - offset])
            else:
                # partial sectors: the rest of them keeps its plain text
                buf = bytearray(hi - lo)
                if lo < pos:
                    buf[:SECTOR] = self._sectors(lo, lo + SECTOR)
                if hi > stop:
                    buf[-SECTOR:] = self._sectors(hi - SECTOR, hi)
                buf[pos - lo:stop - lo] = view[pos - offset:stop - offset]
            self._cipher.encrypt(buf, lo // SECTOR)
            self.file.pwrite(self.volume.payload_offset + lo, buf)
            pos = stop

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        # the block layer writes zero buffers: encrypted zeroes are data
        end = min(offset + length, self.size)
        while offset < end:
            n = min(IO_CHUNK, end - offset)
            self.write(offset, bytes(n))
            offset += n

    def discard(self, offset: int, length: int) -> None:
        """block/crypto.c has no discard: nothing happens."""

    def truncate(self, size: int, prealloc: str = "off", shrink: bool = False) -> None:
        """block_crypto_co_truncate: the file follows, the header stays."""
        if prealloc not in ("off", "falloc", "full"):
            raise UnsupportedError(f"Unsupported preallocation mode: {prealloc}")
        payload = self.volume.payload_offset
        if payload > INT64_MAX - size:
            raise QimgError("The requested file size is too large")
        self.file.truncate(payload + size, prealloc)
        self._refresh_size()

    # ---- amend -------------------------------------------------------------------
    def amend(self, options: dict[str, Any], progress: Any = None, force: bool = False) -> None:
        from qimg.crypto.amend import amend_volume

        if self.read_only:
            raise QimgError("Image is read-only")
        amend_volume(self.volume, options, self.file.pread, self.file.pwrite, force)
