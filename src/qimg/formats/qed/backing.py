"""Changing a QED image's backing file (bdrv_qed_change_backing_file):
the header and the new name rewritten in one write at offset 0."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from qimg.errors import QimgError, UnsupportedError
from qimg.formats.qed import header as H

if TYPE_CHECKING:
    from qimg.formats.qed.driver import QedDriver


def change_backing_file(d: "QedDriver", backing_file: str | None, backing_format: str | None) -> None:
    h = d.header
    # Unknown compat features may keep data after the header we would
    # overwrite.
    if backing_file and h.compat_features & ~H.QED_COMPAT_FEATURE_MASK:
        raise UnsupportedError("Operation not supported")
    new = copy.copy(h)
    new.features &= ~(H.QED_F_BACKING_FILE | H.QED_F_BACKING_FORMAT_NO_PROBE)
    name = backing_file.encode() if backing_file else b""
    if backing_file:
        new.features |= H.QED_F_BACKING_FILE
        if backing_format == "raw":
            new.features |= H.QED_F_BACKING_FORMAT_NO_PROBE
    # QEMU points the name just after the header even when there is none.
    new.backing_filename_offset = H.HEADER.size
    new.backing_filename_size = len(name)
    if H.HEADER.size + len(name) > new.header_size * new.cluster_size:
        raise QimgError("No space left in the file header")
    d.file.pwrite(0, new.pack() + name)
    d.file.flush()
    d.header = new
    d._backing_name = backing_file or None
    d._backing_fmt = "raw" if new.features & H.QED_F_BACKING_FORMAT_NO_PROBE else None
