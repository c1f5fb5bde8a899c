"""compare -p against qemu-img: the progress steps follow qemu's chunks,
which end where QEMU's qcow2 block status stops answering: at the end of an
L2 table's clusters, and after each compressed cluster."""

from __future__ import annotations

import pytest

from conftest import make_image, needs_qemu, run_qemu, run_qimg

pytestmark = needs_qemu


def _same_compare(*args: str) -> None:
    a, b = run_qimg("compare", "-p", *args), run_qemu("compare", "-p", *args)
    assert (a.stdout, a.stderr, a.returncode) == (b.stdout, b.stderr, b.returncode)


@pytest.mark.parametrize("compressed", [False, True])
def test_progress_steps_per_l2_table_and_compressed_cluster(tmp_path, compressed):
    # 2 GiB: four L2 tables' worth of 64 KiB clusters, mostly unallocated
    raw = make_image(tmp_path / "a.raw", "2G", "write -P 1 0 3M", "write -P 2 1500M 1M")
    qcow2 = str(tmp_path / "a.qcow2")
    assert run_qemu("convert", *(["-c"] if compressed else []), "-f", "raw", "-O", "qcow2", raw,
                    qcow2).returncode == 0
    _same_compare("-f", "raw", "-F", "qcow2", raw, qcow2)
    _same_compare("-f", "qcow2", "-F", "raw", qcow2, raw)


def test_progress_strict_and_mismatch(tmp_path):
    raw = make_image(tmp_path / "a.raw", "1G", "write -P 1 0 3M", "write -P 2 700M 1M")
    qcow2 = str(tmp_path / "a.qcow2")
    assert run_qemu("convert", "-f", "raw", "-O", "qcow2", raw, qcow2).returncode == 0
    _same_compare("-s", "-f", "raw", "-F", "qcow2", raw, qcow2)
    other = make_image(tmp_path / "b.raw", "1G", "write -P 1 0 3M", "write -P 3 700M 1M")
    _same_compare("-f", "raw", "-F", "qcow2", other, qcow2)
