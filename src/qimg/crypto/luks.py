"""LUKS1 volumes, as QEMU's crypto/block-luks.c reads, checks, unlocks and
writes them (the LUKS on-disk format 1.2.1, with cryptsetup's layout).

A volume is reached through two callbacks, so the same code serves the
standalone ``luks`` format (the header at the start of the file) and qcow2
(the header in clusters named by a header extension):
``read(offset, length) -> bytes`` and ``write(offset, data)``, offsets
relative to the start of the LUKS header.

Layout as QEMU creates it: the 592-byte header in the first 4 KiB, then
eight key material areas of ``master key length * 4000`` bytes each,
rounded up to whole 4 KiB, then the payload.  Only key slot 0 is filled.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Callable

from qimg.crypto import afsplit, pbkdf, secret
from qimg.crypto.cipher import CIPHER_ALGS, CIPHER_MODES, IVGEN_ALGS, SectorCipher, key_len
from qimg.errors import QimgError
from qimg.record import dataclass, field

MAGIC = b"LUKS\xba\xbe"
VERSION = 1
NUM_KEY_SLOTS = 8
STRIPES = 4000
SALT_LEN = 32
DIGEST_LEN = 20
UUID_LEN = 40
SECTOR_SIZE = 512
KEY_SLOT_OFFSET = 4096
HEADER_SECTORS = KEY_SLOT_OFFSET // SECTOR_SIZE
SLOT_ENABLED = 0x00AC71F3
SLOT_DISABLED = 0x0000DEAD
MIN_SLOT_KEY_ITERS = 1000
MIN_MASTER_KEY_ITERS = 1000
DEFAULT_ITER_TIME_MS = 2000
ERASE_ITERATIONS = 40
U32 = 0xFFFFFFFF

# magic, version, cipher name, cipher mode, hash spec, payload offset (sectors),
# master key length, master key digest, its salt and iterations, uuid
_HEADER = struct.Struct(">6sH32s32s32sII20s32sI40s")
# active, iterations, salt, key material offset (sectors), stripes
_SLOT = struct.Struct(">II32sII")
HEADER_SIZE = _HEADER.size + NUM_KEY_SLOTS * _SLOT.size  # 592

#: the cipher names LUKS stores -> {key bytes: QEMU's algorithm}
_CIPHER_NAMES = {
    "aes": {16: "aes-128", 24: "aes-192", 32: "aes-256"},
    "cast5": {16: "cast5-128"},
    "serpent": {16: "serpent-128", 24: "serpent-192", 32: "serpent-256"},
    "twofish": {16: "twofish-128", 24: "twofish-192", 32: "twofish-256"},
}
_ESSIV_FAMILY_NAMES = {"aes": "AES", "serpent": "Serpent", "twofish": "Twofish"}

Read = Callable[[int, int], bytes]
Write = Callable[[int, bytes], None]


def _cint(value: int) -> int:
    """A uint32 printed with %d."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


@dataclass
class KeySlot:
    active: int = SLOT_DISABLED
    iterations: int = 0
    salt: bytes = bytes(SALT_LEN)
    key_offset_sector: int = 0
    stripes: int = STRIPES


@dataclass
class Header:
    cipher_name: bytes = b""
    cipher_mode: bytes = b""
    hash_spec: bytes = b""
    payload_offset_sector: int = 0
    master_key_len: int = 0
    master_key_digest: bytes = bytes(DIGEST_LEN)
    master_key_salt: bytes = bytes(SALT_LEN)
    master_key_iterations: int = 0
    uuid: bytes = b""
    slots: list[KeySlot] = field(default_factory=list)
    magic: bytes = MAGIC
    version: int = VERSION

    @classmethod
    def parse(cls, buf: bytes) -> "Header":
        buf = bytes(buf[:HEADER_SIZE]).ljust(HEADER_SIZE, b"\0")
        f = _HEADER.unpack_from(buf, 0)
        slots = [KeySlot(*_SLOT.unpack_from(buf, _HEADER.size + i * _SLOT.size)) for i in range(NUM_KEY_SLOTS)]
        return cls(magic=f[0], version=f[1], cipher_name=f[2], cipher_mode=f[3], hash_spec=f[4],
                   payload_offset_sector=f[5], master_key_len=f[6], master_key_digest=f[7],
                   master_key_salt=f[8], master_key_iterations=f[9], uuid=f[10], slots=slots)

    def pack(self) -> bytes:
        head = _HEADER.pack(self.magic, self.version, self.cipher_name, self.cipher_mode, self.hash_spec,
                            self.payload_offset_sector, self.master_key_len, self.master_key_digest,
                            self.master_key_salt, self.master_key_iterations, self.uuid)
        return head + b"".join(_SLOT.pack(s.active, s.iterations, s.salt, s.key_offset_sector, s.stripes)
                               for s in self.slots)


def has_format(buf: bytes) -> bool:
    """qcrypto_block_luks_has_format: the magic and version 1."""
    return len(buf) >= 8 and buf[:6] == MAGIC and struct.unpack_from(">H", buf, 6)[0] == VERSION


def splitkey_sectors(master_key_len: int, stripes: int) -> int:
    """Sectors of one key material area: cryptsetup rounds up to whole
    header-sized (4 KiB) units.  The byte count is a uint32 product in
    QEMU, so a hostile key length wraps as it does there."""
    length = (master_key_len * stripes) & U32
    sectors = -(-length // SECTOR_SIZE)
    return (-(-sectors // HEADER_SECTORS) * HEADER_SECTORS) & U32


def check_header(h: Header) -> None:
    """qcrypto_block_luks_check_header: QEMU's limits against hostile headers."""
    if h.magic != MAGIC:
        raise QimgError("Volume is not in LUKS format")
    if h.version != VERSION:
        raise QimgError(f"LUKS version {h.version} is not supported")
    for raw, what in ((h.cipher_name, "cipher name"), (h.cipher_mode, "cipher mode"), (h.hash_spec, "hash spec")):
        if b"\0" not in raw:
            raise QimgError(f"LUKS header {what} is not NUL terminated")
    if h.payload_offset_sector < HEADER_SECTORS:
        raise QimgError("LUKS payload is overlapping with the header")
    if h.master_key_iterations == 0:
        raise QimgError("LUKS key iteration count is zero")
    spans = [(s.key_offset_sector, splitkey_sectors(h.master_key_len, s.stripes)) for s in h.slots]
    for i, s in enumerate(h.slots):
        start1, len1 = spans[i]
        if s.stripes != STRIPES:
            raise QimgError(f"Keyslot {i} is corrupted (stripes {_cint(s.stripes)} != {STRIPES})")
        if s.active not in (SLOT_ENABLED, SLOT_DISABLED):
            raise QimgError(f"Keyslot {i} state (active/disable) is corrupted")
        if s.active == SLOT_ENABLED and s.iterations == 0:
            raise QimgError(f"Keyslot {i} iteration count is zero")
        if start1 < HEADER_SECTORS:
            raise QimgError(f"Keyslot {i} is overlapping with the LUKS header")
        # unsigned int arithmetic, as QEMU's
        if (start1 + len1) & U32 > h.payload_offset_sector:
            raise QimgError(f"Keyslot {i} is overlapping with the encrypted payload")
        for j in range(i + 1, NUM_KEY_SLOTS):
            start2, len2 = spans[j]
            if (start1 + len1) & U32 > start2 and (start2 + len2) & U32 > start1:
                raise QimgError(f"Keyslots {i} and {j} are overlapping in the header")


@dataclass
class Params:
    """What the header's strings name, as QEMU's enums."""

    cipher_alg: str
    cipher_mode: str
    ivgen_alg: str
    ivgen_hash_alg: str | None
    ivgen_cipher_alg: str
    hash_alg: str


def _hash(name: str) -> str:
    if name not in pbkdf.HASHES:
        raise QimgError(f"Hash algorithm '{name}' not supported")
    return name


def essiv_cipher(cipher_alg: str, hash_alg: str) -> str:
    """The cipher ESSIV uses: dm-crypt keys it with the whole digest, so its
    key size follows the hash, not the data cipher."""
    digestlen = pbkdf.digest_len(hash_alg)
    if digestlen == key_len(cipher_alg):
        return cipher_alg
    family = cipher_alg.split("-")[0]
    if family in _ESSIV_FAMILY_NAMES:
        for bits in (128, 192, 256):
            if key_len(f"{family}-{bits}") == digestlen:
                return f"{family}-{bits}"
        raise QimgError(f"No {_ESSIV_FAMILY_NAMES[family]} cipher with key size {digestlen} available")
    raise QimgError(f"Cipher {cipher_alg} not supported with essiv")


def parse_params(h: Header) -> Params:
    """qcrypto_block_luks_parse_header, in its order."""
    spec = _cstr(h.cipher_mode)
    mode, dash, ivgen = spec.partition("-")
    if not dash:
        raise QimgError(f"Unexpected cipher mode string format '{spec}'")
    ivgen, colon, ivhash_name = ivgen.partition(":")
    ivhash = _hash(ivhash_name) if colon else None
    if mode not in CIPHER_MODES:
        raise QimgError(f"Cipher mode '{mode}' not supported")
    name = _cstr(h.cipher_name)
    key_bytes = h.master_key_len // 2 if mode == "xts" else h.master_key_len
    alg = _CIPHER_NAMES.get(name, {}).get(key_bytes)
    if alg is None:
        raise QimgError(f"Algorithm '{name}' with key size {_cint(key_bytes)} bytes not supported")
    hash_alg = _hash(_cstr(h.hash_spec))
    if ivgen not in IVGEN_ALGS:
        raise QimgError(f"IV generator '{ivgen}' not supported")
    if ivgen == "essiv":
        if ivhash is None:
            raise QimgError("Missing IV generator hash specification")
        ivgen_cipher = essiv_cipher(alg, ivhash)
    else:
        # dm-crypt ignores a hash given with plain/plain64; so does QEMU
        ivgen_cipher = alg
    return Params(alg, mode, ivgen, ivhash, ivgen_cipher, hash_alg)


def _crypt_material(cipher: SectorCipher, material: bytes, encrypt: bool) -> bytes:
    """Key material through the sector cipher from sector 0; its last
    sector may be partial (a whole number of cipher blocks), which every
    mode handles as the start of a whole sector."""
    buf = bytearray(material) + bytearray(-len(material) % SECTOR_SIZE)
    (cipher.encrypt if encrypt else cipher.decrypt)(buf, 0)
    return bytes(buf[:len(material)])


class Volume:
    """An open LUKS header; ``cipher`` (None when opened without I/O)
    encrypts and decrypts the payload, sector 0 being its first sector."""

    def __init__(self, header: Header, params: Params, key_secret: str | None) -> None:
        self.header = header
        self.params = params
        self.key_secret = key_secret
        self.cipher: SectorCipher | None = None
        self.master_key: bytes | None = None

    @property
    def payload_offset(self) -> int:
        return self.header.payload_offset_sector * SECTOR_SIZE

    def _cipher(self, key: bytes) -> SectorCipher:
        p = self.params
        return SectorCipher(p.cipher_alg, p.cipher_mode, key, p.ivgen_alg, p.ivgen_cipher_alg, p.ivgen_hash_alg)

    def unlock(self, password: bytes, read: Read) -> None:
        key = self.find_key(password, read)
        if key is None:
            raise QimgError("Invalid password, cannot unlock any keyslot")
        self.master_key = key
        self.cipher = self._cipher(key)

    def find_key(self, password: bytes, read: Read) -> bytes | None:
        for i in range(NUM_KEY_SLOTS):
            key = self.load_key(i, password, read)
            if key is not None:
                return key
        return None

    def load_key(self, index: int, password: bytes, read: Read) -> bytes | None:
        """The master key if ``password`` opens slot ``index`` (None if the
        slot is inactive or the password is not its own)."""
        h, p = self.header, self.params
        slot = h.slots[index]
        if slot.active != SLOT_ENABLED:
            return None
        mkl = h.master_key_len
        possible = pbkdf.pbkdf2(p.hash_alg, password, slot.salt, slot.iterations, mkl)
        material = read(slot.key_offset_sector * SECTOR_SIZE, (mkl * slot.stripes) & U32)
        material = _crypt_material(self._cipher(possible), material, encrypt=False)
        key = afsplit.decode(p.hash_alg, mkl, slot.stripes, material)
        digest = pbkdf.pbkdf2(p.hash_alg, key, h.master_key_salt, h.master_key_iterations, DIGEST_LEN)
        return key if digest == h.master_key_digest else None

    def store_key(self, index: int, password: bytes, master_key: bytes, iter_time: int, write: Write) -> None:
        """Fill slot ``index`` with the master key under ``password``, then
        write the header (qcrypto_block_luks_store_key)."""
        h, p = self.header, self.params
        slot = h.slots[index]
        mkl = h.master_key_len
        salt = os.urandom(SALT_LEN)
        rate = pbkdf.count_iters(p.hash_alg, password, salt, mkl)
        iterations = max(pbkdf.scale_iters(rate, iter_time), MIN_SLOT_KEY_ITERS)
        slot_key = pbkdf.pbkdf2(p.hash_alg, password, salt, iterations, mkl)
        cipher = self._cipher(slot_key)
        material = _crypt_material(cipher, afsplit.encode(p.hash_alg, master_key, slot.stripes), encrypt=True)
        slot.salt, slot.iterations = salt, iterations
        write(slot.key_offset_sector * SECTOR_SIZE, material)
        slot.active = SLOT_ENABLED
        write(0, h.pack())

    def erase_key(self, index: int, write: Write) -> None:
        """qcrypto_block_luks_erase_key: the slot header first, then its key
        material overwritten with random data, as many times as QEMU."""
        h = self.header
        slot = h.slots[index]
        slot.salt, slot.iterations, slot.active = bytes(SALT_LEN), 0, SLOT_DISABLED
        write(0, h.pack())
        length = (h.master_key_len * slot.stripes) & U32
        for _ in range(ERASE_ITERATIONS):
            write(slot.key_offset_sector * SECTOR_SIZE, os.urandom(length))

    def info(self) -> dict[str, Any]:
        """QCryptoBlockInfoLUKS, keys in the QAPI schema's order."""
        h, p = self.header, self.params
        data: dict[str, Any] = {"cipher-alg": p.cipher_alg, "cipher-mode": p.cipher_mode, "ivgen-alg": p.ivgen_alg}
        if p.ivgen_alg == "essiv":
            data["ivgen-hash-alg"] = p.ivgen_hash_alg
        data["hash-alg"] = p.hash_alg
        data["payload-offset"] = self.payload_offset
        data["master-key-iters"] = h.master_key_iterations
        data["uuid"] = h.uuid.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        slots = []
        for s in h.slots:
            entry: dict[str, Any] = {"active": s.active == SLOT_ENABLED}
            if s.active == SLOT_ENABLED:
                entry["iters"] = s.iterations
                entry["stripes"] = s.stripes
            entry["key-offset"] = s.key_offset_sector * SECTOR_SIZE
            slots.append(entry)
        data["slots"] = slots
        return data


def key_required(prefix: str) -> QimgError:
    return QimgError(f"Parameter '{prefix}key-secret' is required for cipher")


def open_volume(read: Read, key_secret: str | None, no_io: bool, prefix: str = "") -> Volume:
    """qcrypto_block_luks_open: the secret first (unless only metadata is
    wanted), then the header's checks, then the key slots."""
    password = b""
    if not no_io:
        if not key_secret:
            raise key_required(prefix)
        password = secret.lookup_utf8(key_secret)
    header = Header.parse(read(0, HEADER_SIZE))
    check_header(header)
    volume = Volume(header, parse_params(header), key_secret)
    if not no_io:
        volume.unlock(password, read)
    return volume


# ---- creation ------------------------------------------------------------------


@dataclass
class CreateOptions:
    """QCryptoBlockCreateOptionsLUKS (None: not given)."""

    key_secret: str | None = None
    cipher_alg: str | None = None
    cipher_mode: str | None = None
    ivgen_alg: str | None = None
    ivgen_hash_alg: str | None = None
    hash_alg: str | None = None
    iter_time: int | None = None


#: the -o names of the options, and the QAPI enum each must be from
_ENUM_OPTIONS = (
    ("cipher-alg", tuple(CIPHER_ALGS)), ("cipher-mode", CIPHER_MODES), ("ivgen-alg", IVGEN_ALGS),
    ("ivgen-hash-alg", tuple(pbkdf.HASHES)), ("hash-alg", tuple(pbkdf.HASHES)),
)


def create_options(values: dict[str, Any], prefix: str = "") -> CreateOptions:
    """The QAPI visit of the create options (``prefix`` + name, typed -o
    values), refusing values outside the enums as QEMU does (its message
    names the member without the prefix)."""
    for name, allowed in _ENUM_OPTIONS:
        value = values.get(prefix + name)
        if value is not None and value not in allowed:
            raise QimgError(f"Parameter '{name}' does not accept value '{value}'")
    def get(name: str) -> Any:
        return values.get(prefix + name)

    return CreateOptions(get("key-secret"), get("cipher-alg"), get("cipher-mode"), get("ivgen-alg"),
                         get("ivgen-hash-alg"), get("hash-alg"), get("iter-time"))


def _settle(o: CreateOptions, prefix: str) -> tuple[Params, int, bytes]:
    """Defaults, the secret and the algorithm checks of
    qcrypto_block_luks_create, in its order: (params, iter_time, password)."""
    iter_time = DEFAULT_ITER_TIME_MS if o.iter_time is None else o.iter_time
    alg = o.cipher_alg or "aes-256"
    mode = o.cipher_mode or "xts"
    ivgen = o.ivgen_alg or "plain64"
    hash_alg = o.hash_alg or "sha256"
    ivhash = o.ivgen_hash_alg
    if ivgen == "essiv" and ivhash is None:
        ivhash = "sha256"
    if not o.key_secret:
        raise key_required(prefix)
    password = secret.lookup_utf8(o.key_secret)
    if not any(alg in sizes.values() for sizes in _CIPHER_NAMES.values()):
        raise QimgError(f"Algorithm '{alg}' not supported")
    ivgen_cipher = essiv_cipher(alg, ivhash) if ivgen == "essiv" else alg  # type: ignore[arg-type]
    return Params(alg, mode, ivgen, ivhash, ivgen_cipher, hash_alg), iter_time, password


def _check_material(master_key_len: int) -> None:
    """QEMU 7.2 encrypts key material in whole sectors and aborts on a
    partial last one (aes-192 outside XTS: 24 * 4000 bytes); we refuse to
    make what QEMU could not open."""
    length = master_key_len * STRIPES
    if length % SECTOR_SIZE:
        raise QimgError(f"LUKS key material of {length} bytes is not a whole number of "
                        f"{SECTOR_SIZE}-byte sectors, which QEMU cannot handle")


def _layout(header: Header) -> None:
    """Key slot areas after the header, the payload after them."""
    sectors = splitkey_sectors(header.master_key_len, STRIPES)
    header.slots = [KeySlot(key_offset_sector=HEADER_SECTORS + i * sectors) for i in range(NUM_KEY_SLOTS)]
    header.payload_offset_sector = HEADER_SECTORS + NUM_KEY_SLOTS * sectors


def payload_size(o: CreateOptions, prefix: str = "") -> int:
    """The header size a new volume would have (what measure adds), with
    create's refusals but without deriving any key."""
    params, iter_time, password = _settle(o, prefix)
    mkl = key_len(params.cipher_alg) * (2 if params.cipher_mode == "xts" else 1)
    _check_material(mkl)
    SectorCipher.check(params.cipher_alg, params.cipher_mode, mkl, params.ivgen_cipher_alg
                       if params.ivgen_alg == "essiv" and params.cipher_mode != "ecb" else None)
    rate = pbkdf.count_iters(params.hash_alg, bytes(mkl), bytes(SALT_LEN), DIGEST_LEN)
    pbkdf.scale_iters(rate, iter_time, 8)
    header = Header(master_key_len=mkl)
    _layout(header)
    return header.payload_offset_sector * SECTOR_SIZE


def create_volume(o: CreateOptions, init: Callable[[int], None], write: Write, prefix: str = "") -> Volume:
    """qcrypto_block_luks_create: settle the options, make a master key and
    its digest, lay the slots out, let ``init(header_length)`` make room,
    then fill slot 0 (which writes the header)."""
    import uuid

    params, iter_time, password = _settle(o, prefix)
    mode_spec = f"{params.cipher_mode}-{params.ivgen_alg}"
    if params.ivgen_hash_alg is not None:
        mode_spec += f":{params.ivgen_hash_alg}"
    name = params.cipher_alg.split("-")[0]
    mkl = key_len(params.cipher_alg) * (2 if params.cipher_mode == "xts" else 1)
    _check_material(mkl)
    header = Header(cipher_name=name.encode(), cipher_mode=mode_spec.encode(), hash_spec=params.hash_alg.encode(),
                    master_key_len=mkl, uuid=str(uuid.uuid4()).encode())
    header.master_key_salt = os.urandom(SALT_LEN)
    master_key = os.urandom(mkl)
    volume = Volume(header, params, o.key_secret)
    volume.cipher = volume._cipher(master_key)
    rate = pbkdf.count_iters(params.hash_alg, master_key, header.master_key_salt, DIGEST_LEN)
    # /8, as cryptsetup: eight slots tried in turn still take the time asked
    header.master_key_iterations = max(pbkdf.scale_iters(rate, iter_time, 8), MIN_MASTER_KEY_ITERS)
    header.master_key_digest = pbkdf.pbkdf2(params.hash_alg, master_key, header.master_key_salt,
                                            header.master_key_iterations, DIGEST_LEN)
    _layout(header)
    init(volume.payload_offset)
    volume.store_key(0, password, master_key, iter_time, write)
    volume.master_key = master_key
    return volume
