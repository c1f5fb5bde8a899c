"""``qemu-img info``: what an image is, as bdrv_query_image_info reports it.

``info()`` returns the ImageInfo structure as plain data (keys as in
qemu-img's JSON); ``human_info()`` and ``json_text()`` print it as qemu-img
does.  qemu prints QDicts in hash-bucket order, not insertion order, so the
printers sort keys the way QEMU's qdict iterates (see ``qdict_order``).

This module must stay cheap: no numpy (``qemu-img info`` starts fast).
"""

from __future__ import annotations

from typing import Any

from qimg.errors import QimgError
from qimg.units import size_to_str

# ---- QEMU's QDict iteration order ------------------------------------------

_QDICT_BUCKETS = 512


def _tdb_hash(key: str) -> int:
    """qobject/qdict.c tdb_hash(), in 32-bit unsigned arithmetic."""
    data = key.encode("utf-8", "surrogateescape")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, ch in enumerate(data):
        value = (value + (ch << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(d: dict[str, Any]) -> list[str]:
    """Keys in the order qdict_first/qdict_next visit them: by bucket, and
    within a bucket the latest inserted first (entries go to the list head).
    ``d``'s insertion order must be the QAPI schema's field order."""
    keys = list(d)
    index = {k: i for i, k in enumerate(keys)}
    return sorted(keys, key=lambda k: (_tdb_hash(k) % _QDICT_BUCKETS, -index[k]))


# ---- JSON as qobject_to_json_pretty writes it ------------------------------


def _json_str(text: str) -> str:
    out = ['"']
    for ch in text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"):
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\b":
            out.append("\\b")
        elif ch == "\f":
            out.append("\\f")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append("\\u%04X\\u%04X" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF)))
        elif cp < 0x20 or cp >= 0x7F:
            out.append("\\u%04X" % cp)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _json_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if value is None:
        return "null"
    return _json_str(str(value))


def _json_value(value: Any, depth: int, out: list[str]) -> None:
    pad = "    " * depth
    if isinstance(value, dict):
        out.append("{")
        first = True
        for key in qdict_order(value):
            out.append(("" if first else ",") + "\n" + pad + "    " + _json_str(key) + ": ")
            _json_value(value[key], depth + 1, out)
            first = False
        out.append("\n" + pad + "}")
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            out.append(("," if i else "") + "\n" + pad + "    ")
            _json_value(item, depth + 1, out)
        out.append("\n" + pad + "]")
    else:
        out.append(_json_scalar(value))


def json_text(value: Any) -> str:
    """``value`` as qemu-img's --output=json prints a QObject (with the final
    newline)."""
    out: list[str] = []
    _json_value(value, 0, out)
    return "".join(out) + "\n"


# ---- human output (block/qapi.c) -------------------------------------------


def _dump_value(value: Any, indent: int, out: list[str]) -> None:
    if isinstance(value, dict):
        for key in qdict_order(value):
            _dump_item(key.replace("-", " "), value[key], indent, out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _dump_item(f"[{i}]", item, indent, out)
    elif isinstance(value, bool):
        out.append("true" if value else "false")
    else:
        out.append(str(value))


def _dump_item(label: str, value: Any, indent: int, out: list[str]) -> None:
    composite = isinstance(value, (dict, list))
    out.append(" " * (indent * 4) + label + (":\n" if composite else ": "))
    _dump_value(value, indent + 1, out)
    if not composite:
        out.append("\n")


def format_specific_text(spec: dict[str, Any]) -> str:
    """The lines under "Format specific information:" for a
    {"type": ..., "data": {...}} dict (qemu's dump_qobject of "data")."""
    out: list[str] = []
    _dump_value(spec.get("data", {}), 1, out)
    return "".join(out)


def _human_one(info: dict[str, Any]) -> str:
    actual = info.get("actual-size")
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {'unavailable' if actual is None else size_to_str(actual)}",
    ]
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    text = "\n".join(lines) + "\n"
    if info.get("snapshots"):
        text += "Snapshot list:\n" + snapshot_table(info["snapshots"])
    if "format-specific" in info:
        text += "Format specific information:\n" + format_specific_text(info["format-specific"])
    return text


def snapshot_table(snapshots: list[dict[str, Any]]) -> str:
    """The header and one line per snapshot, as bdrv_snapshot_dump prints
    them (dates in local time), each followed by a newline."""
    import time

    lines = ["%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")]
    for sn in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn.get("date-sec", 0)))
        secs = sn.get("vm-clock-sec", 0)
        msec = sn.get("vm-clock-nsec", 0) // 1_000_000 % 1000
        clock = "%02d:%02d:%02d.%03d" % (secs // 3600, secs // 60 % 60, secs % 60, msec)
        icount = str(sn["icount"]) if "icount" in sn else ""
        lines.append("%s %s %8s%20s%13s%11s" % (
            _ljust_bytes(sn.get("id", ""), 9), _ljust_bytes(sn.get("name", ""), 16),
            size_to_str(sn.get("vm-state-size", 0)), date, clock, icount))
    return "".join(line + "\n" for line in lines)


def _ljust_bytes(text: str, width: int) -> str:
    """printf's %-Ns pads by bytes, not characters: a UTF-8 name takes
    the width of its encoding."""
    return text + " " * max(0, width - len(text.encode("utf-8", "surrogateescape")))


def human_info(data: dict[str, Any] | list[dict[str, Any]]) -> str:
    """qemu-img info's human text; a list (``--backing-chain``) prints each
    image, separated by a blank line."""
    if isinstance(data, list):
        return "\n".join(_human_one(d) for d in data)
    return _human_one(data)


# ---- collecting --------------------------------------------------------------


def _full_backing_filename(filename: str, backing: str) -> str:
    """bdrv_get_full_backing_filename: relative to the image's directory."""
    from qimg.block.image import resolve_backing

    return resolve_backing(filename, backing)


def image_info(img: Any) -> dict[str, Any]:
    """The ImageInfo dict of one open image (its own layer only), keys in
    the QAPI schema's order."""
    drv = img.driver
    info: dict[str, Any] = {"filename": img.filename, "format": img.format}
    if drv.supports_get_info:
        info["dirty-flag"] = bool(drv.dirty_flag())
    try:
        info["actual-size"] = drv.allocated_file_size()
    except OSError:
        pass
    info["virtual-size"] = img.size
    if drv.cluster_size:
        info["cluster-size"] = drv.cluster_size
    if getattr(drv, "encrypted", False):
        info["encrypted"] = True
    backing = drv.backing_filename
    if backing:
        info["backing-filename"] = backing
        info["full-backing-filename"] = _full_backing_filename(img.filename, backing)
        if drv.backing_format:
            info["backing-filename-format"] = drv.backing_format
    snapshots = drv.snapshot_list()
    if snapshots:
        info["snapshots"] = snapshots
    specific = drv.info_specific()
    if specific is not None:
        info["format-specific"] = specific
    # actual-size sits before virtual-size in the schema; keep that order
    return {k: info[k] for k in _SCHEMA_ORDER if k in info}


_SCHEMA_ORDER = (
    "filename", "format", "dirty-flag", "actual-size", "virtual-size", "cluster-size",
    "encrypted", "compressed", "backing-filename", "full-backing-filename",
    "backing-filename-format", "snapshots", "backing-image", "format-specific",
)


#: the open option telling a driver no guest data will be read (BDRV_O_NO_IO)
NO_IO_OPTION = "no_io"


def _open_one(name: str, filename: str, fmt: str | None, options: dict[str, Any] | None) -> Any:
    from qimg.block.image import open_image

    try:
        # info reads metadata only (QEMU's BDRV_O_NO_IO): an encrypted
        # image opens without its key
        return open_image(filename, fmt, read_only=True, backing=False,
                          options={**(options or {}), NO_IO_OPTION: True})
    except QimgError as e:
        raise QimgError(f"Could not open '{name}': {e.message}", e.code) from None


def _compact_json(value: dict[str, Any]) -> str:
    """qobject_to_json: one line, keys in QDict order."""
    items = (_json_str(k) + ": " + (_compact_json(value[k]) if isinstance(value[k], dict) else _json_scalar(value[k]))
             for k in qdict_order(value))
    return "{" + ", ".join(items) + "}"


def _options_filename(img: Any, filename: str, options: dict[str, Any]) -> str:
    """bdrv_refresh_filename: an image opened with options that change what
    it reads (a key secret) is named by all of them, as json:{...}."""
    given = {k: options[k] for k in getattr(img.driver, "strong_runtime_opts", ()) if k in options}
    if not given:
        return img.filename
    return "json:" + _compact_json({"driver": img.format, **given,
                                    "file": {"driver": "file", "filename": filename}})


def info(
    filename: str,
    fmt: str | None = None,
    backing_chain: bool = False,
    *,
    open_options: dict[str, Any] | None = None,
    display_name: str | None = None,
) -> dict[str, Any] | list[dict[str, Any]]:
    """ImageInfo of ``filename`` (its format probed when ``fmt`` is None).

    With ``backing_chain`` a list: the image, then each backing file (opened
    by its full name and recorded format) down to the base.  The backing
    files are not opened otherwise.  ``open_options``/``display_name`` come
    from ``--image-opts`` (the name used in "Could not open" messages).
    """
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    name = display_name or filename
    current: str | None = filename
    while current is not None:
        if current in seen:
            raise QimgError(f"Backing file '{current}' creates an infinite loop.")
        seen.add(current)
        img = _open_one(name, current, fmt, open_options)
        try:
            data = image_info(img)
            if open_options:
                data["filename"] = _options_filename(img, current, open_options)
        finally:
            img.close()
        chain.append(data)
        if not backing_chain:
            return data
        current = data.get("full-backing-filename")
        fmt = data.get("backing-filename-format")
        name = current or ""
        open_options = None
    return chain

