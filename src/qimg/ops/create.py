"""``qemu-img create``: make a new image, as block.c's bdrv_img_create does.

The option list is the format's ``create_opts`` followed by the file
protocol's; ``-o`` text is split the way qemu's get_opt_name_value splits it
(a bare ``key`` means ``key=on``, ``nokey`` means ``key=off``, ``,,`` is a
comma only inside a value).  The "Formatting ..." line follows
qemu_opts_print: options in schema order, given values as typed, defaults
from ``OptionSpec.default_text``.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

from qimg.block.options import BOOL, NUMBER, SIZE, STRING, OptionSpec, coerce, format_help
from qimg.errors import QimgError

#: the file protocol's create options, in file-posix's order
FILE_CREATE_OPTS = [
    OptionSpec("size", SIZE, "Virtual disk size"),
    OptionSpec("nocow", BOOL, "Turn off copy-on-write (valid only on btrfs)"),
    OptionSpec("preallocation", STRING, "Preallocation mode (allowed values: off, falloc, full)"),
    OptionSpec("extent_size_hint", SIZE, "Extent size hint for the image file, 0 to disable"),
]

#: The order qemu's qcow2_create_opts declares (and "Formatting" prints) its
#: options in; used when a driver lists its options in another order.
_DECLARED_ORDER = {
    "qcow2": [
        "encryption", "encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg",
        "encrypt.cipher-mode", "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg",
        "encrypt.hash-alg", "encrypt.iter-time", "cluster_size", "extended_l2",
        "preallocation", "compression_type", "size", "compat", "backing_file",
        "backing_fmt", "data_file", "data_file_raw", "lazy_refcounts", "refcount_bits",
    ],
}


class CreateError(QimgError):
    """A create failure with qemu's hint text, printed raw after the message
    (error_append_hint: no program prefix, newline only if qemu has one)."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message, 1)
        self.detail = detail


def split_opts(text: str) -> list[tuple[str, str]]:
    """``-o`` text to (name, value) pairs, as qemu's get_opt_name_value."""
    return [(name, value) for name, value, _ in _split(text)]


def _split(text: str) -> list[tuple[str, str, bool]]:
    """(name, value, given as a bare flag) for each item of ``-o`` text."""
    pairs: list[tuple[str, str, bool]] = []
    pos = 0
    n = len(text)
    while pos < n:
        stop = pos
        while stop < n and text[stop] not in "=,":
            stop += 1
        name = text[pos:stop]
        if stop >= n or text[stop] == ",":
            # a flag: "key" is key=on, "nokey" is key=off
            if name.startswith("no"):
                pairs.append((name[2:], "off", True))
            else:
                pairs.append((name, "on", True))
            pos = stop
        else:
            pos = stop + 1
            value: list[str] = []
            while pos < n:
                if text[pos] == ",":
                    if pos + 1 < n and text[pos + 1] == ",":
                        value.append(",")
                        pos += 2
                        continue
                    break
                value.append(text[pos])
                pos += 1
            pairs.append((name, "".join(value), False))
        if pos < n and text[pos] == ",":
            pos += 1
    return pairs


def has_help_option(text: str) -> bool:
    """True when ``-o`` asks for help (a bare ``help`` or ``?``)."""
    return any(flag and value == "on" and name in ("help", "?") for name, value, flag in _split(text))


def valid_option_list(text: str) -> bool:
    """qemu-img's is_valid_option_list(): not empty, no leading comma, no
    unescaped trailing comma."""
    if not text or text[0] == ",":
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


def _driver_class(fmt: str):
    from qimg.formats import get_driver

    try:
        drv = get_driver(fmt)
    except QimgError:
        raise QimgError(f"Unknown file format '{fmt}'") from None
    if not drv.supports_create or not drv.create_opts:
        raise QimgError(f"Format driver '{fmt}' does not support image creation")
    return drv


def format_opts(drv: Any) -> list[OptionSpec]:
    """The format's own options (without those it merely passes through to
    the file protocol; ``size`` is every format's own)."""
    own = [s for s in drv.create_opts if s.name == "size" or s not in FILE_CREATE_OPTS]
    order = _DECLARED_ORDER.get(drv.format_name)
    if order:
        rank = {name: i for i, name in enumerate(order)}
        own.sort(key=lambda s: rank.get(s.name, len(rank)))
    return own


def create_schema(drv: Any) -> list[OptionSpec]:
    """Format options then the file protocol's, as qemu_opts_append merges."""
    own = format_opts(drv)
    names = {s.name for s in own}
    return own + [s for s in FILE_CREATE_OPTS if s.name not in names]


def option_help(fmt: str, filename: str | None) -> str:
    """``create -o help``: with a file name the protocol's options too."""
    drv = _driver_class(fmt)
    if filename is not None:
        return format_help(create_schema(drv))
    return (
        format_help(format_opts(drv), f"Supported {fmt} options:")
        + "\nThe protocol level may support further options.\n"
        "Specify the target filename to include those options.\n"
    )


def _to_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def formatting_line(filename: str, fmt: str, schema: list[OptionSpec], given: dict[str, tuple[str, Any]]) -> str:
    """The "Formatting 'NAME', fmt=FMT ..." line (qemu_opts_print)."""
    parts = [f"Formatting '{filename}', fmt={fmt}"]
    for spec in schema:
        if spec.name in given:
            text, typed = given[spec.name]
            if spec.type in (SIZE, NUMBER):
                text = str(_to_int64(typed))
            elif spec.type == STRING:
                text = text.replace(",", ",,")
        else:
            text = spec.default_text()
            if text is None:
                continue
            if spec.type == STRING:
                text = text.replace(",", ",,")
        parts.append(f"{spec.name}={text}")
    return " ".join(parts)


def _full_backing_name(filename: str, backing: str) -> str:
    """bdrv_get_full_backing_filename_from_filename: relative names are
    relative to the new image's directory."""
    if os.path.isabs(backing) or ":" in backing.split("/", 1)[0]:
        return backing
    return os.path.join(os.path.dirname(filename), backing)


def _backing_size(filename: str, backing_file: str, backing_format: str | None) -> int:
    """Open the backing file as bdrv_img_create does; its virtual size."""
    from qimg.block.image import open_image

    full = _full_backing_name(filename, backing_file)
    try:
        # force-share, as bdrv_img_create: only the size is read
        img = open_image(full, backing_format, read_only=True, force_share=True)
    except QimgError as e:
        raise CreateError(e.message, "Could not open backing image.\n") from None
    try:
        if backing_format is None:
            raise CreateError("Backing file specified without backing format", f"Detected format of {img.format}.")
        return img.size
    finally:
        img.close()


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def create(
    filename: str,
    fmt: str = "raw",
    size: int | None = None,
    options: str | dict[str, Any] | None = None,
    backing_file: str | None = None,
    backing_format: str | None = None,
    unsafe: bool = False,
    quiet: bool = True,
) -> None:
    """Create an image like ``qemu-img create``.

    ``options`` is ``-o`` text (``"cluster_size=4k,lazy_refcounts=on"``) or a
    dict of option values.  ``size`` None takes the backing file's size.
    ``unsafe`` (``-u``) does not open the backing file.  With ``quiet``
    False the "Formatting ..." line is printed to stdout.  Raises QimgError
    (CreateError for messages that carry qemu's hint text).
    """
    drv = _driver_class(fmt)
    schema = create_schema(drv)
    by_name = {s.name: s for s in schema}
    if isinstance(options, dict):
        pairs = [(k, _option_text(v)) for k, v in options.items()]
    else:
        pairs = split_opts(options) if options else []
    given: dict[str, tuple[str, Any]] = {}
    for name, text in pairs:
        spec = by_name.get(name)
        if spec is None:
            raise QimgError(f"Invalid parameter '{name}'")
        given[name] = (text, coerce(spec, text))

    if "size" in given:
        if size is not None:
            raise QimgError("The image size must be specified only once")
        img_size: int = given["size"][1]
    else:
        img_size = -1 if size is None else size
        given["size"] = (str(img_size), img_size % (1 << 64))

    if backing_file is not None:
        if "backing_file" not in by_name:
            raise QimgError(f"Backing file not supported for file format '{fmt}'")
        given["backing_file"] = (backing_file, backing_file)
    if backing_format is not None:
        if "backing_fmt" not in by_name:
            raise QimgError(f"Backing file format not supported for file format '{fmt}'")
        given["backing_fmt"] = (backing_format, backing_format)

    backing = given.get("backing_file", (None, None))[1]
    backing_fmt = given.get("backing_fmt", (None, None))[1]
    if backing is not None:
        if backing == filename:
            raise QimgError("Error: Trying to create an image with the same filename as the backing file")
        if backing == "":
            raise QimgError("Expected backing file name, got empty string")

    if img_size == (1 << 64) - 1:
        img_size = -1  # qemu keeps the size unsigned: all ones means "not given"
    if backing is not None and not unsafe:
        backing_size = _backing_size(filename, backing, backing_fmt)
        if img_size == -1:
            img_size = backing_size
            given["size"] = (str(img_size), img_size)
    elif backing is not None and backing_fmt is None:
        raise QimgError("Backing file specified without backing format")

    if img_size == -1:
        raise QimgError("Image creation needs a size parameter")

    if not quiet:
        sys.stdout.write(formatting_line(filename, fmt, schema, given) + "\n")
        sys.stdout.flush()

    values = {name: typed for name, (_, typed) in given.items() if name != "size"}
    try:
        drv.create(filename, img_size, values)
    except QimgError as e:
        # the file protocol's own create reports "Could not create"
        opened = f"Could not open '{filename}': "
        if e.message.startswith(opened):
            raise QimgError(f"Could not create '{filename}': " + e.message[len(opened):], e.code) from None
        raise
    except OSError as e:
        if e.errno == errno.EFBIG:
            hint = " (try using a larger cluster size)" if _cluster_size(by_name, given) else ""
            raise QimgError(f"The image size is too large for file format '{fmt}'{hint}") from None
        raise QimgError(f"Could not create '{filename}': {e.strerror}") from None


def _cluster_size(by_name: dict[str, OptionSpec], given: dict[str, tuple[str, Any]]) -> int:
    if "cluster_size" in given:
        return int(given["cluster_size"][1])
    spec = by_name.get("cluster_size")
    text = spec.default_text() if spec else None
    return int(text) if text and text.isdigit() else 0
