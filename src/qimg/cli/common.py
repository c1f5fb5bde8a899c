"""What every command shares: opening images the qemu-img way, cache modes,
``--object``, ``--image-opts``, the raw-probe warning.

Commands call ``open_image`` here rather than the block layer's so that every
open failure reads ``Could not open 'NAME': REASON`` as in qemu-img's
img_open(), whatever layer the reason came from.
"""

from __future__ import annotations

import sys
from typing import Any

from qimg.block import lock
from qimg.block.image import Image
from qimg.block.image import open_image as _open_image
from qimg.block.options import split_options
from qimg.crypto.secret import SECRETS  # --object secret fills the crypto layer's store
from qimg.errors import QimgError
from qimg.record import dataclass

CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe", "off")

_RAW_PROBE_WARNING = (
    "WARNING: Image format was not specified for '{name}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, "
    "write operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.\n"
)

#: the object types qemu-img 7.2 knows (``--object help``); others are
#: refused as a bad qom-type
_QEMU_OBJECT_TYPES = frozenset((
    "authz-list", "authz-list-file", "authz-simple", "main-loop", "pr-manager-helper", "secret",
    "secret_keyring", "thread-context", "throttle-group", "tls-cipher-suites", "tls-creds-anon",
    "tls-creds-psk", "tls-creds-x509",
))


class HelpRequested(Exception):
    """-h/--help: the command stops there and qemu-img's help is printed
    (cli.main prints it, so that options before it still act in order)."""


@dataclass
class CommonOptions:
    """The options every command reads the same way (when it declares them)."""

    fmt: str | None = None  # -f/--format
    image_opts: bool = False  # --image-opts
    force_share: bool = False  # -U/--force-share
    quiet: bool = False  # -q

    def __post_init__(self) -> None:
        # each command makes its options as it starts: no -U seen yet
        lock.command_force_share = False


def apply_common(opt: str, val: str, into: CommonOptions) -> bool:
    """Act on one of the options every command shares; False for an option
    that is the command's own.  Called in argv order, as qemu-img's getopt
    loop acts: ``--object help -h`` lists objects, ``-h --object help`` helps."""
    if opt in ("-h", "--help"):
        raise HelpRequested
    if opt in ("-f", "--format"):
        into.fmt = val
    elif opt == "--object":
        add_object(val)
    elif opt == "--image-opts":
        into.image_opts = True
    elif opt in ("-U", "--force-share"):
        into.force_share = True
        # for the opens that do not take it as an argument (info, check)
        lock.command_force_share = True
    elif opt == "-q":
        into.quiet = True
    else:
        return False
    return True


def one_image(operands: list[str]) -> str:
    """The one file name most commands take."""
    if len(operands) != 1:
        raise QimgError("Expecting one image file name", hint=True)
    return operands[0]


def check_cache(mode: str, source: bool = False) -> str:
    if mode not in CACHE_MODES:
        raise QimgError(f"Invalid {'source ' if source else ''}cache option: {mode}")
    return mode


def add_object(text: str) -> None:
    """``--object``: only ``secret`` objects mean anything to qemu-img."""
    if text == "help":
        sys.stdout.write("List of user creatable objects:\n  secret\n")
        raise SystemExit(0)
    props = dict((k, v if v is not None else "") for k, v in split_options(text))
    qom_type = text.split(",", 1)[0]
    if "=" in qom_type:
        qom_type = props.pop("qom-type", "")
    else:
        props.pop(qom_type, None)
    if qom_type != "secret":
        if qom_type in ("secret_keyring", "tls-creds-psk", "tls-creds-x509", "tls-creds-anon", "tls-cipher-suites"):
            raise QimgError(f"Object type '{qom_type}' is not supported")
        if not qom_type:
            raise QimgError("Parameter 'qom-type' is missing")
        if qom_type not in _QEMU_OBJECT_TYPES:
            raise QimgError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
        raise QimgError(f"invalid object type: {qom_type}")
    if "id" not in props:
        raise QimgError("Parameter 'id' is missing")
    if "data" in props and "file" in props:
        raise QimgError("'data' and 'file' are mutually exclusive")
    if "data" in props:
        value = props["data"].encode()
    elif "file" in props:
        try:
            with open(props["file"], "rb") as f:
                value = f.read()
        except OSError as e:
            raise QimgError(f"Unable to read {props['file']}: {e.strerror}") from None
    else:
        raise QimgError("Either 'file' or 'data' must be provided")
    if props.get("format", "raw") == "base64":
        import base64
        import binascii

        try:
            value = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise QimgError("Invalid base64 data") from None
    SECRETS[props["id"]] = value


def image_opts(text: str) -> tuple[str, str | None, dict[str, Any]]:
    """``--image-opts`` names an image as ``driver=qcow2,file.filename=x``.

    Returns (filename, format, remaining options).
    """
    opts = dict((k, v if v is not None else "on") for k, v in split_options(text))
    filename = opts.pop("file.filename", None) or opts.pop("filename", None)
    fmt = opts.pop("driver", None)
    protocol = opts.pop("file.driver", None)
    if filename is None:
        # what blk_new_open finds missing first, prefixed as img_open does
        if fmt == "file" or protocol is not None:
            reason = "The 'file' block driver requires a file name"
        elif fmt is None or any(k.startswith("file.") for k in opts):
            reason = "Must specify either driver or file"
        else:
            reason = 'A block device must be specified for "file"'
        raise QimgError(f"Could not open '{text}': {reason}")
    return filename, fmt, opts


def open_image(
    name: str,
    fmt: str | None = None,
    *,
    read_only: bool = True,
    backing: bool = True,
    force_share: bool = False,
    use_image_opts: bool = False,
    open_options: dict[str, Any] | None = None,
) -> Image:
    """Open an image for a command, with qemu-img's messages;
    ``open_options`` are driver options beyond --image-opts (convert's key
    secrets for the new target)."""
    options: dict[str, Any] = dict(open_options or {})
    filename = name
    if use_image_opts:
        if fmt:
            raise QimgError("--image-opts and --format are mutually exclusive")
        filename, fmt, options = image_opts(name)
    if force_share and not read_only:
        # blk_new_open refuses it, so img_open's prefix comes with it
        raise QimgError(f"Could not open '{name}': force-share=on can only be used with read-only images")
    try:
        img = _open_image(filename, fmt, read_only=read_only, backing=backing, options=options or None,
                          force_share=force_share)
    except QimgError as e:
        raise QimgError(f"Could not open '{name}': {e.message}", e.code) from None
    if img.probed and img.format == "raw" and not read_only:
        warn_probed_raw(filename)
    return img


def warn_probed_raw(filename: str) -> None:
    """qemu's warning when a write may go to a raw image it only guessed."""
    sys.stderr.write(_RAW_PROBE_WARNING.format(name=filename))


@dataclass
class SnapshotParam:
    """``-l`` of convert and measure: which internal snapshot to read.
    ``exact``: the id and name were given as ``snapshot.id=``/``snapshot.name=``
    and must match as given; else ``snapshot_id`` is an ID or a name."""

    snapshot_id: str | None
    name: str | None = None
    exact: bool = False


_SNAPSHOT_HELP = (
    "snapshot options:\n"
    "  snapshot.id=<str>      - snapshot id\n"
    "  snapshot.name=<str>    - snapshot name\n"
)


def _opt_value(text: str, pos: int) -> tuple[str, int]:
    """qemu's get_opt_value: up to a lone comma, ``,,`` a literal one."""
    out = []
    while True:
        comma = text.find(",", pos)
        if comma < 0:
            out.append(text[pos:])
            return "".join(out), len(text)
        if text.startswith(",,", comma):
            out.append(text[pos:comma + 1])
            pos = comma + 2
            continue
        out.append(text[pos:comma])
        return "".join(out), comma


def _opt_items(text: str):
    """qemu's get_opt_name_value over the whole list: (name, value, as
    written when it was a bare flag, else None).  A name ends at ``=`` or
    ``,`` (no ``,,`` escape in names); a bare ``noX`` is X=off."""
    pos = 0
    while pos < len(text):
        ends = [i for i in (text.find("=", pos), text.find(",", pos)) if i >= 0]
        stop = min(ends) if ends else len(text)
        name = text[pos:stop]
        if stop < len(text) and text[stop] == "=":
            value, pos = _opt_value(text, stop + 1)
            flag = None
        else:
            pos, flag = stop, name
            if name.startswith("no"):
                name, value = name[2:], "off"
            else:
                value = "on"
        yield name, value, flag
        if pos < len(text):
            pos += 1  # the comma


def _identifier(text: str) -> bool:
    """qemu's id_wellformed."""
    return bool(text) and text[0].isascii() and text[0].isalpha() and all(
        c.isascii() and (c.isalnum() or c in "-._") for c in text)


def parse_snapshot_param(prog: str, text: str, ids: set[str]) -> SnapshotParam:
    """Parse ``-l`` as qemu-img does while reading its options: a value
    starting with ``snapshot.`` is a QemuOpts list of snapshot.id and
    snapshot.name (qemu_opts_parse_noisily: an ``id=`` is checked first,
    then each item in turn, ``help`` printing the list's options), anything
    else an ID or a name.  ``ids``: the ``id=`` values earlier ``-l``
    options of the command gave (QemuOpts refuses one given twice)."""
    if not text.startswith("snapshot."):
        return SnapshotParam(text)
    failed = f"Failed in parsing snapshot param '{text}'"
    opts_id = next((value for name, value, _ in _opt_items(text) if name == "id"), None)
    if opts_id is not None and not _identifier(opts_id):
        # the hint goes between the two errors, so this one is printed here
        sys.stderr.write(f"{prog}: Parameter 'id' expects an identifier\n"
                         "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.\n")
        raise QimgError(failed)
    if opts_id is not None:
        if opts_id in ids:
            raise QimgError(f"Duplicate ID '{opts_id}' for snapshot\n{failed}")
        ids.add(opts_id)
    found = SnapshotParam(None, None, True)
    for name, value, flag in _opt_items(text):
        if flag is not None and flag in ("help", "?"):
            sys.stdout.write(_SNAPSHOT_HELP)
            raise QimgError(failed)
        if flag is not None:
            sys.stderr.write(f"{prog}: warning: short-form boolean option '{flag}' deprecated\n")
            if name == "delay":
                sys.stderr.write(f"Please use nodelay={'on' if value == 'off' else 'off'} instead\n")
            else:
                sys.stderr.write(f"Please use {name}={value} instead\n")
        if name == "id":
            continue
        if name not in ("snapshot.id", "snapshot.name"):
            raise QimgError(f"Invalid parameter '{name}'\n{failed}")
        if name == "snapshot.id":
            found.snapshot_id = value
        else:
            found.name = value
    return found
