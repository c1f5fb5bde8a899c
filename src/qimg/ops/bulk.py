"""A layer's runs from one bulk block status walk, for the commands that
walk an image from start to end (convert, compare).

qcow2 answers in bulk (formats/qcow2/scan.py): its L2 tables are read in
large batches and, for an image of a few tables, classified without the
cluster map, so without importing numpy.  The walk is asked in increasing
offset order; where it cannot answer (it failed, or was asked behind
itself) the caller asks Image.block_status, which gives the same answer
or the error as QEMU reports it.
"""

from __future__ import annotations

from typing import Iterator

from qimg.block.image import Image
from qimg.block.status import Extent
from qimg.errors import QimgError


class BulkRuns:
    def __init__(self, img: Image) -> None:
        #: only a qcow2 image without backing file: its runs are the layer's
        self._walk: Iterator[Extent] | None = (
            img.layer_status(0, img.size) if img.backing is None and img.format == "qcow2" else None
        )
        self._ext: Extent | None = None

    def at(self, offset: int) -> Extent | None:
        """The run holding ``offset``, or None: ask block_status."""
        ext = self._ext
        if ext is not None and offset < ext.end:
            return ext if offset >= ext.offset else None
        if self._walk is None:
            return None
        try:
            ext = next(self._walk, None)
            while ext is not None and ext.length > 0 and ext.end <= offset:
                ext = next(self._walk, None)
        except (OSError, QimgError):
            ext = None
        if ext is None or ext.length <= 0 or ext.offset > offset:
            self._walk = None
            return None
        self._ext = ext
        return ext
