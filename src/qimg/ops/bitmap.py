"""``qemu-img bitmap``: the block-dirty-bitmap-* operations on one image.

Each action behaves as QEMU's QMP command of the same name does on the
image's node (block/monitor/bitmap-qmp-cmds.c, block/dirty-bitmap.c), with
its messages; the format stores the result when the image is closed.  Also
the bitmap copy of ``convert --bitmaps``.
"""

from __future__ import annotations

from typing import Any

from qimg.block.image import Image
from qimg.errors import QimgError

ACTIONS = ("add", "remove", "clear", "enable", "disable", "merge")
#: what QEMU's error messages call the node (an automatic node name)
NODE_NAME = "#block128"


def _store(img: Image) -> Any | None:
    drv = img.driver
    return drv.dirty_bitmaps() if drv.supports_bitmaps else None


def persistent_supported(img: Image) -> bool:
    """bdrv_supports_persistent_dirty_bitmap (qcow2: version 3 only)."""
    store = _store(img)
    return store is not None and store.supported


def _lookup(img: Image, name: str) -> Any:
    store = _store(img)
    bm = store.find(name) if store is not None else None
    if bm is None:
        raise QimgError(f"Dirty bitmap '{name}' not found")
    return bm


def _check(bm: Any, allow_ro: bool = False, allow_inconsistent: bool = False) -> None:
    """bdrv_dirty_bitmap_check with BDRV_BITMAP_DEFAULT / ALLOW_RO / (BUSY|RO)."""
    from qimg.formats.qcow2.bitmap import inconsistent_error

    if bm.readonly and not allow_ro:
        raise QimgError(f"Bitmap '{bm.name}' is readonly and cannot be modified")
    if bm.inconsistent and not allow_inconsistent:
        raise inconsistent_error(bm.name)


def default_granularity(img: Image) -> int:
    """bdrv_get_default_bitmap_granularity: the cluster size, at least 4 KiB."""
    drv = img.driver
    cs = drv.cluster_size if drv.supports_get_info else None
    return max(4096, cs) if cs else 65536


def add(img: Image, name: str, granularity: int, disabled: bool) -> None:
    if not name:
        raise QimgError("Bitmap name cannot be empty")
    store = _store(img)
    if store is not None and store.find(name) is not None:
        raise QimgError(f"Bitmap already exists: {name}")
    # The QMP argument is a uint32; 0 means "not given".
    g32 = granularity & 0xFFFFFFFF
    if granularity:
        if g32 < 512 or g32 & (g32 - 1):
            raise QimgError("Granularity must be power of 2 and at least 512")
    else:
        g32 = default_granularity(img)
    if store is None:
        raise QimgError(f"Can't store persistent bitmaps to {NODE_NAME}: Operation not supported")
    reason = store.check_new(name, g32)
    if reason:
        raise QimgError(f"Can't make bitmap '{name}' persistent in '{NODE_NAME}': {reason}")
    store.add(name, g32, enabled=not disabled)


def remove(img: Image, name: str) -> None:
    bm = _lookup(img, name)
    _check(bm, allow_ro=False, allow_inconsistent=True)
    _store(img).remove(bm)


def clear(img: Image, name: str) -> None:
    bm = _lookup(img, name)
    _check(bm)
    bm.clear()


def enable(img: Image, name: str, on: bool) -> None:
    bm = _lookup(img, name)
    _check(bm, allow_ro=True)
    bm.enabled = on


def merge(img: Image, name: str, src_img: Image, src_name: str) -> None:
    dst = _lookup(img, name)
    src = _lookup(src_img, src_name)
    _check(src, allow_ro=True)
    if src_img.size != img.size:
        raise QimgError(f"Bitmaps are of different sizes (destination size is {img.size}, "
                        f"source size is {src_img.size}) and can't be merged")
    _check(dst)
    dst.merge_from(src)


def run(img: Image, name: str, actions: list[tuple[str, str | None]], granularity: int = 0,
        src_img: Image | None = None) -> None:
    """Apply ``actions`` ((action, merge source or None), in order) to bitmap
    ``name``; the first failure stops, as qemu-img does."""
    for act, arg in actions:
        try:
            if act == "add":
                add(img, name, granularity, disabled=arg == "disabled")
            elif act == "remove":
                remove(img, name)
            elif act == "clear":
                clear(img, name)
            elif act in ("enable", "disable"):
                enable(img, name, act == "enable")
            elif act == "merge":
                assert arg is not None
                merge(img, name, src_img if src_img is not None else img, arg)
        except QimgError as e:
            raise QimgError(f"Operation {act} on bitmap {name} failed: {e.message}") from None


class BitmapCopyError(QimgError):
    """A convert --bitmaps failure; ``detail`` is a line qemu-img prints
    after the message without the program name (error_printf)."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def check_bitmaps(src: Image, skip_broken: bool) -> None:
    """convert_check_bitmaps: before anything is created, the source must
    have bitmap support and, unless skipped, no inconsistent bitmap."""
    store = _store(src)
    if store is None or not store.supported:
        raise QimgError("Source lacks bitmap support")
    if skip_broken:
        return
    for bm in store.bitmaps:
        if bm.inconsistent:
            raise BitmapCopyError(f"Cannot copy inconsistent bitmap '{bm.name}'",
                                  "Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it\n")


def copy_bitmaps(src: Image, dst: Image, skip_broken: bool = False) -> None:
    """convert_copy_bitmaps: copy the source's persistent bitmaps (name,
    granularity, enabled state, bits) into the target with add and merge."""
    store = _store(src)
    if store is None:
        return
    for bm in list(store.bitmaps):
        if bm.inconsistent:
            if skip_broken:
                from qimg.formats.qcow2.bitmap import _warn

                _warn(f"Skipping inconsistent bitmap '{bm.name}'")
                continue
        try:
            add(dst, bm.name, bm.granularity, disabled=not bm.enabled)
        except QimgError as e:
            raise QimgError(f"Failed to create bitmap {bm.name}: {e.message}") from None
        try:
            merge(dst, bm.name, src, bm.name)
        except QimgError as e:
            dst_bm = _store(dst).find(bm.name)
            if dst_bm is not None:
                _store(dst).remove(dst_bm)
            raise QimgError(f"Failed to populate bitmap {bm.name}: {e.message}") from None
