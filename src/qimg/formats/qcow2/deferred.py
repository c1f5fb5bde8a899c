"""Guest-data pwrites a copy engine's writer thread may take over (kept
apart from io.py so that the fill of a new image, fill.py, and the engine
reach them without numpy)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from qimg.formats.qcow2.driver import Qcow2Driver


def defer_data_writes(d: "Qcow2Driver", pwrite: "Callable[[int, object], None] | None",
                      drain: "Callable[[], None] | None" = None) -> None:
    """Hand the guest-data pwrites of ``write`` to ``pwrite(host, buffer)``
    (a copy engine's writer thread, which must keep their order) while this
    thread goes on with the next request's metadata; ``drain()`` must
    return only once every handed-over write is in the file, and is called
    before anything reads data clusters back or changes the file
    otherwise.  ``pwrite=None`` restores direct writes."""
    d._deferred = None if pwrite is None else (pwrite, drain)


def pwrite_data(d: "Qcow2Driver", host: int, buf) -> None:
    """Bytes (encrypted already, where the image is) into the data file."""
    deferred = getattr(d, "_deferred", None)
    if deferred is None:
        d.data_file.pwrite(host, buf)
    else:
        deferred[0](host, buf)


def drain(d: "Qcow2Driver") -> None:
    deferred = getattr(d, "_deferred", None)
    if deferred is not None and deferred[1] is not None:
        deferred[1]()
