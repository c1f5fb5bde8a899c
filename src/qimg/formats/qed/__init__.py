"""QED, the QEMU Enhanced Disk format (docs/interop/qed_spec.txt)."""

from qimg.formats.qed.driver import QedDriver

__all__ = ["QedDriver"]
