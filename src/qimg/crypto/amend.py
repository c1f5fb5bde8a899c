"""Key slot changes on an open LUKS volume (``qemu-img amend``), as
qcrypto_block_luks_amend_options does them: ``state=active`` puts a new
password in a free (or the given) slot, ``state=inactive`` erases the
given slot or every slot the old password opens.
"""

from __future__ import annotations

from typing import Any

from qimg.crypto import luks, secret
from qimg.crypto.luks import NUM_KEY_SLOTS, SLOT_ENABLED, Read, Volume, Write
from qimg.errors import QimgError

_STATES = ("active", "inactive")


def _int32(value: int) -> int:
    """An int64 QAPI value stored in a C int."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _failed(e: QimgError, hint: str) -> QimgError:
    # error_append_hint: printed after the message, with no newline of its own
    return QimgError(e.message, e.code, detail=e.full_detail() + hint)


def amend_volume(volume: Volume, options: dict[str, Any], read: Read, write: Write, force: bool,
                 prefix: str = "") -> None:
    """Apply ``prefix``-named amend options (typed -o values) to ``volume``."""
    state = options.get(prefix + "state")
    # the QAPI visit of the options: its messages name them without prefix
    if state is None:
        raise QimgError("Parameter 'state' is missing")
    if state not in _STATES:
        raise QimgError(f"Parameter 'state' does not accept value '{state}'")
    keyslot = options.get(prefix + "keyslot")
    opts = {
        "new-secret": options.get(prefix + "new-secret"),
        "old-secret": options.get(prefix + "old-secret"),
        "keyslot": None if keyslot is None else _int64(keyslot),
        "iter-time": options.get(prefix + "iter-time"),
    }
    if state == "active":
        _add_keyslot(volume, opts, read, write, force)
    else:
        _erase_keyslots(volume, opts, read, write, force)


def _active(volume: Volume, index: int) -> bool:
    return volume.header.slots[index].active == SLOT_ENABLED


def _add_keyslot(volume: Volume, o: dict[str, Any], read: Read, write: Write, force: bool) -> None:
    iter_time = luks.DEFAULT_ITER_TIME_MS if o["iter-time"] is None else o["iter-time"]
    if o["new-secret"] is None:
        raise QimgError("'new-secret' is required to activate a keyslot")
    if o["old-secret"] is not None:
        raise QimgError("'old-secret' must not be given when activating keyslots")
    if o["keyslot"] is not None:
        keyslot = _int32(o["keyslot"])
        if not 0 <= keyslot < NUM_KEY_SLOTS:
            raise QimgError(f"Invalid keyslot {keyslot & 0xFFFFFFFF} specified, must be between 0 and "
                            f"{NUM_KEY_SLOTS - 1}")
    else:
        free = [i for i in range(NUM_KEY_SLOTS) if not _active(volume, i)]
        if not free:
            raise QimgError("Can't add a keyslot - all keyslots are in use")
        keyslot = free[0]
    if not force and _active(volume, keyslot):
        raise QimgError(f"Refusing to overwrite active keyslot {keyslot} - please erase it first")
    old_password = secret.lookup_utf8(volume.key_secret or "")
    master_key = volume.find_key(old_password, read)
    if master_key is None:
        raise _failed(QimgError("Invalid password, cannot unlock any keyslot"), "Failed to retrieve the master key")
    new_password = secret.lookup_utf8(o["new-secret"])
    try:
        volume.store_key(keyslot, new_password, master_key, iter_time, write)
    except QimgError as e:
        raise _failed(e, f"Failed to write to keyslot {keyslot}") from None


def _erase_keyslots(volume: Volume, o: dict[str, Any], read: Read, write: Write, force: bool) -> None:
    if o["new-secret"] is not None:
        raise QimgError("'new-secret' must not be given when erasing keyslots")
    if o["iter-time"] is not None:
        raise QimgError("'iter-time' must not be given when erasing keyslots")
    old_password = secret.lookup_utf8(o["old-secret"]) if o["old-secret"] is not None else None
    active = sum(_active(volume, i) for i in range(NUM_KEY_SLOTS))
    if o["keyslot"] is not None:
        keyslot = _int32(o["keyslot"])
        if not 0 <= keyslot < NUM_KEY_SLOTS:
            raise QimgError(f"Invalid keyslot {keyslot} specified, must be between 0 and {NUM_KEY_SLOTS - 1}")
        if old_password is not None and volume.load_key(keyslot, old_password, read) is None:
            raise QimgError(f"Given keyslot {keyslot} doesn't contain the given old password for erase operation")
        if not force and not _active(volume, keyslot):
            raise QimgError(f"Given keyslot {keyslot} is already erased (inactive) ")
        if not force and active == 1:
            raise QimgError(f"Attempt to erase the only active keyslot {keyslot} which will erase all the data "
                            "in the image irreversibly - refusing operation")
        _erase(volume, keyslot, write, f"Failed to erase keyslot {keyslot}")
    elif old_password is not None:
        matching = [i for i in range(NUM_KEY_SLOTS) if volume.load_key(i, old_password, read) is not None]
        if not matching:
            raise QimgError("No keyslots match given (old) password for erase operation")
        if not force and len(matching) == active:
            raise QimgError("All the active keyslots match the (old) password that was given and erasing them "
                            "will erase all the data in the image irreversibly - refusing operation")
        for i in matching:
            _erase(volume, i, write, f"Failed to erase keyslot {i}")
    else:
        raise QimgError("To erase keyslot(s), either explicit keyslot index or the password currently "
                        "contained in them must be given")


def _erase(volume: Volume, index: int, write: Write, hint: str) -> None:
    try:
        volume.erase_key(index, write)
    except QimgError as e:
        raise _failed(e, hint) from None
