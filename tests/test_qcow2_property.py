"""Property: any sequence of writes, zero writes, discards and compressed
writes leaves a qcow2 image reading exactly as a bytearray model, and
qemu-img check finds nothing wrong with it."""

from __future__ import annotations

import subprocess

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import needs_qemu, run_qemu
from qimg.block.image import open_image
from qimg.formats.qcow2.create import create_image

SIZE = 4 << 20
CS = 4096
BASE_FILL = 3 << 20  # the backing file holds data in its first 3 MiB

offsets = st.integers(0, SIZE - 1)
lengths = st.integers(1, 5 * CS + 100)
op = st.one_of(
    st.tuples(st.just("write"), offsets, lengths, st.integers(1, 255)),
    st.tuples(st.just("zero"), offsets, lengths, st.booleans()),
    st.tuples(st.just("discard"), offsets, lengths, st.just(0)),
    st.tuples(st.just("compress"), offsets, st.just(CS), st.integers(0, 3)),
)


def _discard_model(model: bytearray, backing: bytes | None, v3: bool, off: int, n: int) -> None:
    """QEMU's pdiscard: whole clusters only (the image end counts as a
    cluster end); v3 then reads zeroes, v2 without backing deallocates
    (zeroes), v2 with a backing file ignores the request."""
    if not v3 and backing is not None:
        return
    start = -(-off // CS) * CS
    end = off + n
    end = SIZE if end >= SIZE else end // CS * CS
    if end > start:
        model[start:end] = bytes(end - start)


def _run(tmp_path, ops, compat: str, with_backing: bool) -> None:
    path = tmp_path / "p.qcow2"
    path.unlink(missing_ok=True)
    backing = None
    model = bytearray(SIZE)
    opts = {"cluster_size": CS, "compat": compat}
    if with_backing:
        base = tmp_path / "base.raw"
        backing = bytes((i * 7 + 1) & 0xFF for i in range(256)) * (BASE_FILL // 256)
        base.write_bytes(backing)
        model[:BASE_FILL] = backing
        opts.update(backing_file="base.raw", backing_fmt="raw")
    create_image(str(path), SIZE, opts)
    v3 = compat == "1.1"
    with open_image(str(path), "qcow2", read_only=False) as img:
        for kind, off, n, arg in ops:
            n = min(n, SIZE - off)
            if kind == "write":
                img.write(off, bytes([arg]) * n)
                model[off:off + n] = bytes([arg]) * n
            elif kind == "zero":
                img.write_zeroes(off, n, unmap=arg)
                model[off:off + n] = bytes(n)
            elif kind == "discard":
                img.discard(off, n)
                _discard_model(model, backing, v3, off, n)
            else:
                off = off // CS * CS
                if img.block_status(off, CS).flags & 0x44:
                    continue  # compression never overwrites an allocated cluster
                data = bytes([arg]) * 1000 + bytes(range(256)) * 4 + bytes(CS - 2024)
                img.write_compressed(off, data)
                model[off:off + CS] = data
        assert img.read(0, SIZE) == bytes(model)
    with open_image(str(path), "qcow2") as img:
        assert img.read(0, SIZE) == bytes(model)
    check = run_qemu("check", str(path))
    assert check.returncode == 0, check.stdout + check.stderr
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    cmp = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(path), str(raw)])
    assert cmp.returncode == 0


SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@needs_qemu
@SETTINGS
@given(ops=st.lists(op, min_size=1, max_size=12), compat=st.sampled_from(["0.10", "1.1"]))
def test_random_ops_match_model(tmp_path, ops, compat):
    _run(tmp_path, ops, compat, with_backing=False)


@needs_qemu
@SETTINGS
@given(ops=st.lists(op, min_size=1, max_size=12), compat=st.sampled_from(["0.10", "1.1"]))
def test_random_ops_over_backing_match_model(tmp_path, ops, compat):
    _run(tmp_path, ops, compat, with_backing=True)
