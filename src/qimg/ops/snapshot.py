"""``qemu-img snapshot``: list, create, apply and delete internal snapshots,
format-neutral (the driver does the work; formats without snapshots get
qemu-img's refusals).

Errors carry qemu-img's wording for each action: create reports QEMU's raw
errno (``-95 (Operation not supported)``), apply goes through
bdrv_snapshot_goto ("Failed to load snapshot: ..."), delete first looks the
name up in the list (bdrv_snapshot_find matches names only).
"""

from __future__ import annotations

import time
from typing import Any

from qimg.errors import QimgError


def _errno_of(e: QimgError, default: int) -> int:
    return getattr(e, "errno", default)


def list_text(img: Any) -> str:
    """``snapshot -l``: nothing at all when there are none (or the format
    has no snapshots), else the table as ``info`` prints it."""
    from qimg.ops.info import snapshot_table

    snaps = img.driver.snapshot_list() if img.driver.supports_snapshots else []
    if not snaps:
        return ""
    return "Snapshot list:\n" + snapshot_table(snaps)


def create(img: Any, name: str, now_us: int | None = None) -> None:
    """A disk-only snapshot dated now (vm clock 0, icount 0, as qemu-img)."""
    import os

    drv = img.driver
    if now_us is None:
        now_us = time.time_ns() // 1000
    try:
        if not drv.supports_snapshots:
            raise QimgError(os.strerror(95))
        drv.snapshot_create(name, now_us // 1_000_000, now_us % 1_000_000 * 1000)
    except QimgError as e:
        err = _errno_of(e, 95 if not drv.supports_snapshots else 5)
        raise QimgError(f"Could not create snapshot '{name}': -{err} ({os.strerror(err)})") from None


def apply(img: Any, name: str) -> None:
    """Revert the image to the snapshot with ID or else name ``name``."""
    drv = img.driver
    if getattr(drv, "supports_bitmaps", False):
        # bdrv_snapshot_goto refuses before looking at the snapshots
        try:
            bitmaps = drv.dirty_bitmaps().bitmaps
        except QimgError:
            bitmaps = []
        if bitmaps:
            raise QimgError(f"Could not apply snapshot '{name}': Device has active dirty bitmaps")
    if not drv.supports_snapshots:
        raise QimgError(f"Could not apply snapshot '{name}': Block driver does not support snapshots")
    try:
        drv.snapshot_goto(name)
    except QimgError as e:
        # a driver message of several lines: QEMU's error_report lines,
        # then the errno that bdrv_snapshot_goto turns into its message
        *reports, last = e.message.split("\n")
        lines = reports + [f"Could not apply snapshot '{name}': Failed to load snapshot: {last}"]
        raise QimgError("\n".join(lines)) from None


def delete(img: Any, name: str) -> None:
    """Delete the first snapshot named ``name`` (IDs are not matched)."""
    drv = img.driver
    snaps = drv.snapshot_list() if drv.supports_snapshots else []
    found = next((s for s in snaps if s["name"] == name), None)
    if found is None:
        raise QimgError(f"Could not delete snapshot '{name}': snapshot not found")
    try:
        drv.snapshot_delete(found["id"], found["name"])
    except QimgError as e:
        raise QimgError(f"Could not delete snapshot '{name}': {e.message}") from None
