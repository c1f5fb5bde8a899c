"""The result of a consistency check, format-neutral.

Field names follow qemu-img's ImageCheck (QAPI) so that the JSON output is a
plain rename of ``-`` for ``_``.  Counters a format does not know stay None
and are left out of the output, as qemu-img leaves out zero counters.
"""

from __future__ import annotations

from qimg.record import dataclass


@dataclass
class CheckResult:
    filename: str = ""
    format: str = ""
    check_errors: int = 0
    image_end_offset: int | None = None
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    fragmented_clusters: int | None = None
    compressed_clusters: int | None = None

    def add(self, other: "CheckResult", with_allocation: bool) -> None:
        """Sum two partial results (qcow2_add_check_result): error counters
        add up; allocation figures come from one part only."""
        self.corruptions += other.corruptions
        self.leaks += other.leaks
        self.check_errors += other.check_errors
        self.corruptions_fixed += other.corruptions_fixed
        self.leaks_fixed += other.leaks_fixed
        if with_allocation:
            self.image_end_offset = other.image_end_offset
            self.total_clusters = other.total_clusters
            self.allocated_clusters = other.allocated_clusters
            self.fragmented_clusters = other.fragmented_clusters
            self.compressed_clusters = other.compressed_clusters

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit status for a completed check."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0
