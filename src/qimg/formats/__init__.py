"""The format registry.

Format modules must be cheap to import (no numpy at module level): probing
imports every one of them, and ``qimg info`` must start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from qimg.errors import QimgError

if TYPE_CHECKING:
    from qimg.block.driver import Driver

# name -> "module:Class", in qemu-img's probe order where it matters.
FORMATS: dict[str, str] = {
    "raw": "qimg.formats.raw:RawDriver",
    "qcow2": "qimg.formats.qcow2.driver:Qcow2Driver",
    "vdi": "qimg.formats.vdi:VdiDriver",
    "parallels": "qimg.formats.parallels:ParallelsDriver",
    "qcow": "qimg.formats.qcow:QcowDriver",
    "qed": "qimg.formats.qed:QedDriver",
    "luks": "qimg.formats.luks:LuksDriver",
    "bochs": "qimg.formats.bochs:BochsDriver",
    "cloop": "qimg.formats.cloop:CloopDriver",
    "vpc": "qimg.formats.vpc:VpcDriver",
    "vmdk": "qimg.formats.vmdk:VmdkDriver",
}


def get_driver(name: str) -> type["Driver"]:
    path = FORMATS.get(name)
    if path is None:
        raise QimgError(f"Unknown driver '{name}'")
    module, _, cls = path.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(module):
            raise QimgError(f"Unknown driver '{name}'") from None
        raise
    return getattr(mod, cls)


def format_names() -> list[str]:
    return list(FORMATS)
