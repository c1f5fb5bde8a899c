"""qimg: qemu-img in Python.

The library comes first: ``qimg.open`` gives an Image with read/write/extents;
``qimg.api`` holds create, info, convert, compare, check and map as functions
returning data.  Names are imported lazily so that ``import qimg`` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"
#: the qemu-img release whose behaviour qimg follows
QEMU_VERSION = "7.2.22"

_API = ("open", "create", "info", "convert", "compare", "check", "map")


def __getattr__(name: str):
    if name in _API:
        from qimg import api

        return getattr(api, name)
    if name == "QimgError":
        from qimg.errors import QimgError

        return QimgError
    raise AttributeError(name)
