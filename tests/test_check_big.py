"""check takes other paths on big images (millions of clusters): refcount
lookups go through the on-disk refcounts compare_refcounts read, and
references are counted piece by piece.  Those paths are forced here on small
images by lowering the dense-lookup limit, and the output and repairs must
still be qemu-img's."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import needs_qemu
from test_check_helpers import qemu, twin_copies
from test_check_qcow2 import DAMAGE, _make, _same

pytestmark = needs_qemu

# The damages whose messages come from refcount lookups and comparisons.
_CASES = ["l2_copied_missing", "l1_copied_missing", "refcount_too_high", "refcount_zero_data",
          "two_refs_one_cluster", "leaked_cluster"]


@pytest.fixture
def big_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every lookup takes the path of an image past the dense limit."""
    from qimg.formats.qcow2 import check

    init = check.RefcountView.__init__

    def small_limit(self: check.RefcountView, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)  # type: ignore[arg-type]
        self.dense_limit = 1

    monkeypatch.setattr(check.RefcountView, "__init__", small_limit)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("big")
    return _make(d / "base.qcow2", [], ["write -P 7 0 256k", "write -P 8 4M 64k"])


@pytest.mark.parametrize("damage", _CASES)
@pytest.mark.parametrize("mode", [None, "leaks", "all"])
def test_damaged_big_paths(tmp_path: Path, image: Path, big_paths: None, damage: str, mode: str | None) -> None:
    theirs, mine = twin_copies(image, tmp_path)
    DAMAGE[damage](theirs)
    DAMAGE[damage](mine)
    repair = [] if mode is None else ["-r", mode]
    _same(["check", *repair, "x.qcow2"], theirs.parent, mine.parent)
    if mode is not None:
        assert mine.read_bytes() == theirs.read_bytes() or \
            qemu(["check", "x.qcow2"], mine.parent) == qemu(["check", "x.qcow2"], theirs.parent)


@pytest.mark.parametrize("create", [["-o", "refcount_bits=1"], ["-o", "preallocation=metadata"]])
def test_overflow_and_prealloc_big_paths(tmp_path: Path, big_paths: None, create: list[str]) -> None:
    base = _make(tmp_path / "base.qcow2", create, ["write 0 128k"])
    theirs, mine = twin_copies(base, tmp_path)
    for p in (theirs, mine):
        DAMAGE["two_refs_one_cluster"](p)
    for repair in ([], ["-r", "all"]):
        _same(["check", *repair, "x.qcow2"], theirs.parent, mine.parent)
