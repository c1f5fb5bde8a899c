"""Guess an image's format from its first bytes, as bdrv_find_format does."""

from __future__ import annotations

from qimg.formats import FORMATS, get_driver

PROBE_BYTES = 2048


def probe_format(header: bytes, filename: str) -> str:
    """The best-scoring format for ``header``; raw when nothing claims it."""
    best, best_score = "raw", 0
    for name in FORMATS:
        if name == "raw":
            continue
        try:
            drv = get_driver(name)
        except Exception:  # a format whose module is missing cannot claim it
            continue
        score = drv.probe(header, filename)
        if score > best_score:
            best, best_score = name, score
    return best
