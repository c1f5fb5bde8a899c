"""The secret store: what ``--object secret,id=ID,data=...|file=...`` gives,
looked up by ID as QEMU's qcrypto_secret_lookup does.

The command line fills ``SECRETS``; the crypto layer only reads it.
"""

from __future__ import annotations

from qimg.errors import QimgError

#: secret ID -> its bytes (already base64-decoded where asked)
SECRETS: dict[str, bytes] = {}


def add(secret_id: str, value: bytes) -> None:
    SECRETS[secret_id] = value


def lookup(secret_id: str) -> bytes:
    """The secret's bytes, or qemu's error for an unknown ID."""
    try:
        return SECRETS[secret_id]
    except KeyError:
        raise QimgError(f"No secret with id '{secret_id}'") from None


def lookup_utf8(secret_id: str) -> bytes:
    """A passphrase (qcrypto_secret_lookup_as_utf8): valid UTF-8 without a
    NUL byte, since QEMU passes it on as a C string."""
    data = lookup(secret_id)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        ok = False
    else:
        ok = b"\0" not in data
    if not ok:
        raise QimgError(f"Data from secret {secret_id} is not valid UTF-8")
    return data
