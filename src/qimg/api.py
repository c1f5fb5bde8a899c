"""The public Python API: one function per qemu-img command, returning data.

    import qimg
    qimg.create("disk.qcow2", "qcow2", 10 << 30)
    with qimg.open("disk.qcow2", read_only=False) as img:
        img.write(0, b"hello")
    print(qimg.info("disk.qcow2")["virtual-size"])
    qimg.convert(["disk.qcow2"], "disk.raw", out_format="raw")

Each function lives in its command's module under ``qimg.ops`` and is looked
up on first use, so importing the API costs nothing until it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from qimg.block.image import Image, open_image

#: API name -> the module under qimg.ops that defines it
_OPS = {
    "create": "create",
    "info": "info",
    "map": "map",
    "check": "check",
    "convert": "convert",
    "compare": "compare",
    "dd": "dd",
}

__all__ = ["open", "Image", *_OPS]


def open(filename: str, fmt: str | None = None, read_only: bool = True, backing: bool = True) -> Image:
    """Open an image (its format probed when ``fmt`` is None) with its backing
    chain.  The Image reads, writes and reports ``extents()``; close it, or use
    it as a context manager."""
    return open_image(filename, fmt, read_only=read_only, backing=backing)


def __getattr__(name: str) -> Any:
    module = _OPS.get(name)
    if module is None:
        raise AttributeError(name)
    return getattr(importlib.import_module(f"qimg.ops.{module}"), name)
