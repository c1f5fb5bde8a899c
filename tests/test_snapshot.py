"""qcow2 internal snapshots and ``qemu-img snapshot``, against qemu-img 7.2.

The same snapshot operations run through qemu-img on one copy of an image
and through qimg on another: the files must be the same byte for byte
except the snapshots' dates, ``check`` clean, each snapshot's content and
the map equal.  Snapshots made by either program are read by the other.
"""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import pytest

from conftest import (FORCE_REMOVE_HINT, assert_same, make_bad_snapshot_table, needs_qemu, run_qemu, run_qemu_io,
                      run_qimg)

pytestmark = needs_qemu

# ---- helpers -------------------------------------------------------------------


def _table(path: Path) -> tuple[int, int, list[tuple[int, int]]]:
    """(nb_snapshots, snapshots_offset, [(entry offset, extra size)]) read
    straight from the file, so the test does not trust qimg's parser."""
    raw = path.read_bytes()
    nb, off = struct.unpack_from(">IQ", raw, 60)
    entries = []
    pos = off
    for _ in range(nb):
        pos = -(-pos // 8) * 8
        id_len, name_len = struct.unpack_from(">HH", raw, pos + 12)
        extra = struct.unpack_from(">I", raw, pos + 36)[0]
        entries.append((pos, extra))
        pos += 40 + extra + id_len + name_len
    return nb, off, entries


def _masked(path: Path) -> bytes:
    """The file with every snapshot's date zeroed (dates are "now")."""
    raw = bytearray(path.read_bytes())
    try:
        entries = _table(path)[2]
    except struct.error:  # a hostile table past the end of the file
        entries = []
    for pos, _ in entries:
        raw[pos + 16:pos + 24] = bytes(8)
    return bytes(raw)


def _list_masked(text: bytes) -> bytes:
    """``snapshot -l`` / info text without the DATE column."""
    return re.sub(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", b"DATE", text)


def _make(tmp: Path, name: str, *opts: str) -> Path:
    p = tmp / name
    assert run_qemu("create", "-q", "-f", "qcow2", *opts, str(p), "4M").returncode == 0
    run_qemu_io("-c", "write -P 1 0 128k", "-c", "write -P 2 1M 64k", "-c", "write -c -P 3 2M 64k", str(p))
    return p


def _qio(path: Path, *cmds: str) -> None:
    args = []
    for c in cmds:
        args += ["-c", c]
    run_qemu_io(*args, str(path))


def _both(base: Path, steps: list) -> tuple[Path, Path]:
    """Run ``steps`` (snapshot argument lists, or qemu-io command tuples)
    on a qemu-img copy and a qimg copy of ``base``."""
    # same file name in two directories: messages name the file
    (base.parent / "q").mkdir(exist_ok=True)
    (base.parent / "p").mkdir(exist_ok=True)
    q = base.parent / "q" / base.name
    p = base.parent / "p" / base.name
    shutil.copy(base, q)
    shutil.copy(base, p)
    for step in steps:
        if isinstance(step, tuple):
            _qio(q, *step)
            _qio(p, *step)
            continue
        theirs = run_qemu("snapshot", *step, base.name, cwd=str(q.parent))
        mine = run_qimg("snapshot", *step, base.name, cwd=str(p.parent))
        assert mine.returncode == theirs.returncode, step
        assert _list_masked(mine.stdout) == _list_masked(theirs.stdout), step
        assert mine.stderr == theirs.stderr, step
    return q, p


def _assert_equivalent(q: Path, p: Path) -> None:
    assert _masked(p) == _masked(q)
    cq, cp = run_qemu("check", str(q)), run_qemu("check", str(p))
    assert cp.returncode == 0 and cp.stdout == cq.stdout
    lq, lp = run_qemu("snapshot", "-l", str(q)), run_qemu("snapshot", "-l", str(p))
    assert _list_masked(lp.stdout) == _list_masked(lq.stdout)
    assert run_qemu("map", "--output=json", str(p)).stdout == run_qemu("map", "--output=json", str(q)).stdout
    for line in lq.stdout.decode().splitlines()[2:]:
        sid = line.split()[0]
        oq, op = q.with_suffix(".snap"), p.with_suffix(".snap")
        assert run_qemu("convert", "-l", f"snapshot.id={sid}", "-O", "raw", str(q), str(oq)).returncode == 0
        assert run_qemu("convert", "-l", f"snapshot.id={sid}", "-O", "raw", str(p), str(op)).returncode == 0
        assert oq.read_bytes() == op.read_bytes()


# ---- the same operations through both programs -----------------------------------

SCENARIO = [
    ["-c", "one"],
    ("write -P 9 64k 128k", "write -z 1M 64k"),
    ["-c", "two"],
    ("write -P 7 0 64k", "discard 2M 64k"),
    ["-a", "one"],
    ["-c", "three"],
    ["-d", "two"],
    ["-l"],
    ["-a", "3"],
    ("write -P 5 3M 64k",),
    ["-c", "two"],
    ["-d", "one"],
]


@pytest.mark.parametrize("opts", [(), ("-o", "compat=0.10"),
                                  ("-o", "cluster_size=4096,refcount_bits=64,lazy_refcounts=on")])
def test_same_operations_same_image(tmp_path: Path, opts: tuple[str, ...]) -> None:
    base = _make(tmp_path, "base.qcow2", *opts)
    q, p = _both(base, SCENARIO)
    _assert_equivalent(q, p)


def test_delete_all_and_again(tmp_path: Path) -> None:
    base = _make(tmp_path, "base.qcow2")
    q, p = _both(base, [["-c", "a"], ["-c", "b"], ["-d", "a"], ["-d", "b"], ["-l"]])
    assert p.read_bytes() == q.read_bytes()
    q, p = _both(base, [["-c", "a"], ["-c", "b"], ["-d", "a"], ["-d", "b"], ["-c", "c"],
                        ("write -P 4 0 64k",), ["-a", "c"]])
    _assert_equivalent(q, p)


def test_duplicate_names_ids_and_lookup(tmp_path: Path) -> None:
    base = _make(tmp_path, "base.qcow2")
    # the same name twice; -a takes an ID first, -d names only
    q, p = _both(base, [["-c", "x"], ("write -P 8 0 64k",), ["-c", "x"], ["-c", "1"], ["-a", "1"],
                        ["-d", "x"], ["-d", "2"], ["-d", "1"], ["-l"], ["-c", "y" * 300]])
    _assert_equivalent(q, p)


def test_written_snapshot_data_is_copied_on_write(tmp_path: Path) -> None:
    """After a snapshot, writes go to new clusters; the snapshot keeps the
    old data (qemu-io reads through qimg's flags)."""
    p = _make(tmp_path, "a.qcow2")
    assert run_qimg("snapshot", "-c", "s", str(p)).returncode == 0
    _qio(p, "write -P 6 0 192k")
    out = tmp_path / "s.raw"
    assert run_qemu("convert", "-l", "s", "-O", "raw", str(p), str(out)).returncode == 0
    data = out.read_bytes()
    assert data[:128 << 10] == b"\1" * (128 << 10) and data[(1 << 20):(1 << 20) + 4] == b"\2" * 4
    assert run_qemu("check", str(p)).returncode == 0
    assert run_qimg("snapshot", "-a", "s", str(p)).returncode == 0
    run_qemu_io("-c", "read -P 1 0 128k", "-c", "read -P 0 128k 64k", str(p))
    assert run_qemu("check", str(p)).returncode == 0


# ---- reading what qemu-img wrote --------------------------------------------------


def test_qimg_reads_qemu_snapshots(tmp_path: Path) -> None:
    p = _make(tmp_path, "a.qcow2")
    assert run_qemu("snapshot", "-c", "first", str(p)).returncode == 0
    _qio(p, "write -P 5 0 64k")
    assert run_qemu("snapshot", "-c", "second", str(p)).returncode == 0
    for args in (["snapshot", "-l"], ["snapshot", "-q", "-l"], ["snapshot", "-U", "-l"], ["info"],
                 ["info", "--output=json"]):
        assert_same([*args, str(p)], str(tmp_path))
    assert_same(["snapshot", "-l", "--image-opts", f"driver=qcow2,file.filename={p}"], str(tmp_path))
    for spec in ("first", "2", "snapshot.id=1", "snapshot.name=second"):
        a, b = tmp_path / "a.raw", tmp_path / "b.raw"
        assert run_qemu("convert", "-l", spec, "-O", "raw", str(p), str(a)).returncode == 0
        r = run_qimg("convert", "-l", spec, "-O", "raw", str(p), str(b))
        assert r.returncode == 0, r.stderr
        assert a.read_bytes() == b.read_bytes()


def test_unknown_extra_data_kept(tmp_path: Path) -> None:
    """An entry with more extra data than QEMU 7.2 knows keeps it verbatim
    through a rewrite of the table, as qemu-img keeps it."""
    p = _make(tmp_path, "a.qcow2")
    assert run_qemu("snapshot", "-c", "s", str(p)).returncode == 0
    nb, off, [(pos, extra)] = _table(p)
    assert extra == 24
    raw = bytearray(p.read_bytes())
    id_len, name_len = struct.unpack_from(">HH", raw, pos + 12)
    names = raw[pos + 64:pos + 64 + id_len + name_len]
    struct.pack_into(">I", raw, pos + 36, 32)
    # a VM's snapshot: clock, state size (past 32 bits), icount
    struct.pack_into(">QII", raw, pos + 24, 3723_456_789_000, 0, 32)
    struct.pack_into(">QQQ", raw, pos + 40, 5 << 30, 4 << 20, 12345)
    raw[pos + 64:pos + 72] = b"FUTURE!!"
    raw[pos + 72:pos + 72 + len(names)] = names
    p.write_bytes(bytes(raw))
    assert run_qemu("check", str(p)).returncode == 0
    for args in (["snapshot", "-l", p.name], ["info", p.name], ["info", "--output=json", p.name]):
        assert_same(args, str(tmp_path))
    q, mine = _both(p, [["-c", "t"], ["-d", "t"]])
    _assert_equivalent(q, mine)
    nb, off, entries = _table(mine)
    assert entries[0][1] == 32 and b"FUTURE!!" in mine.read_bytes()[entries[0][0]:entries[0][0] + 80]


# ---- errors ------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["-c", "x", "r.raw"], ["-a", "x", "r.raw"], ["-d", "x", "r.raw"], ["-l", "r.raw"],
    ["-f", "qcow2", "-l", "a.qcow2"], [], ["-l"], ["-l", "a.qcow2", "b"], ["-U", "-c", "x", "a.qcow2"],
    ["-x", "a.qcow2"], ["-l", "missing.qcow2"], ["-c", "x", "missing.qcow2"], ["-c", "x", "-d", "y", "a.qcow2"],
    ["-l", "-l", "a.qcow2"], ["-a", "nope", "a.qcow2"], ["-d", "nope", "a.qcow2"], ["-d", "1", "a.qcow2"],
    ["a.qcow2"], ["-U", "a.qcow2"],
])
def test_errors_as_qemu(tmp_path_factory: pytest.TempPathFactory, args: list[str]) -> None:
    tmp = tmp_path_factory.getbasetemp() / "snapshot-errors"
    if not tmp.exists():
        tmp.mkdir()
        assert run_qemu("create", "-q", "-f", "raw", str(tmp / "r.raw"), "1M").returncode == 0
        _make(tmp, "a.qcow2")
        assert run_qemu("snapshot", "-c", "s", str(tmp / "a.qcow2")).returncode == 0
    # none of these changes the image
    assert_same(["snapshot", *args], str(tmp))


def test_refcount_overflow_leaks_as_qemu(tmp_path: Path) -> None:
    base = tmp_path / "r1.qcow2"
    assert run_qemu("create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", str(base), "1M").returncode == 0
    _qio(base, "write 0 64k")
    q, p = _both(base, [["-c", "x"], ["-l"]])
    cq, cp = run_qemu("check", str(q)), run_qemu("check", str(p))
    assert (cp.returncode, cp.stdout, cp.stderr) == (cq.returncode, cq.stdout, cq.stderr)
    assert p.read_bytes() == q.read_bytes()


def test_apply_with_other_disk_size(tmp_path: Path) -> None:
    base = _make(tmp_path, "a.qcow2")
    assert run_qemu("snapshot", "-c", "s", str(base)).returncode == 0
    assert run_qemu("resize", "-q", str(base), "8M").returncode == 0
    _qio(base, "write -P 4 6M 64k")
    assert run_qemu("snapshot", "-c", "big", str(base)).returncode == 0
    # applying resizes the image to the snapshot's size, shrinking or growing
    q, p = _both(base, [["-a", "s"]])
    assert p.read_bytes() == q.read_bytes()
    q, p = _both(base, [["-a", "s"], ["-a", "big"]])
    _assert_equivalent(q, p)


def _hostile(tmp_path: Path, name: str, patch) -> Path:
    p = _make(tmp_path, name)
    assert run_qemu("snapshot", "-c", "s1", str(p)).returncode == 0
    assert run_qemu("snapshot", "-c", "s2", str(p)).returncode == 0
    raw = bytearray(p.read_bytes())
    patch(raw, *struct.unpack_from(">IQ", raw, 60))
    p.write_bytes(bytes(raw))
    return p


HOSTILE = {
    "extra_too_big": lambda raw, nb, off: struct.pack_into(">I", raw, off + 36, 2000),
    "offset_past_eof": lambda raw, nb, off: struct.pack_into(">Q", raw, 64, 1 << 30),
    "many_past_eof": lambda raw, nb, off: struct.pack_into(">I", raw, 60, 3000),
    "too_many": lambda raw, nb, off: struct.pack_into(">I", raw, 60, 70000),
    "unaligned_table": lambda raw, nb, off: struct.pack_into(">Q", raw, 64, off + 8),
    "l1_too_large": lambda raw, nb, off: struct.pack_into(">QI", raw, off, 1 << 40, 1 << 26),
    "l1_unaligned": lambda raw, nb, off: struct.pack_into(">Q", raw, off, 1000),
    "names_too_long": lambda raw, nb, off: [struct.pack_into(">HHIIQII", raw, off + 12, 65535, 65535, 0, 0, 0, 0,
                                                             1024)],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tables(tmp_path: Path, case: str) -> None:
    p = _hostile(tmp_path, "h.qcow2", HOSTILE[case])
    assert_same(["snapshot", "-l", p.name], str(tmp_path))
    for args in (["info", p.name], ["convert", "-l", "s1", "-O", "raw", p.name, "o.raw"]):
        mine, theirs = run_qimg(*args, cwd=str(tmp_path)), run_qemu(*args, cwd=str(tmp_path))
        assert (mine.returncode, mine.stdout) == (theirs.returncode, theirs.stdout)
        # (an error hint line there carries the program name: not this module's output)
        assert mine.stderr.splitlines()[:1] == theirs.stderr.splitlines()[:1]
    for args in (["-a", "s1"], ["-d", "s1"], ["-c", "x"]):
        q, mine = _both(p, [args])  # same messages and exit code
        if run_qemu("check", str(q)).returncode == 0:
            # where qemu-img fails it leaves leaks and a header that counts the
            # failed snapshot (qcow2_mark_corrupt rewrites it); qimg does not
            assert _masked(mine) == _masked(q)


def _first_l1_entry(raw: bytearray) -> int:
    """File offset of snapshot 1's first L1 entry."""
    _, off = struct.unpack_from(">IQ", raw, 60)
    return struct.unpack_from(">Q", raw, off)[0]


def _l1_unaligned(raw: bytearray) -> None:
    pos = _first_l1_entry(raw)
    struct.pack_into(">Q", raw, pos, struct.unpack_from(">Q", raw, pos)[0] | 0x200)


def _data_past_refcounts(raw: bytearray) -> None:
    l2 = struct.unpack_from(">Q", raw, _first_l1_entry(raw))[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", raw, l2 + 8 * 40, 1 << 40)


@pytest.mark.parametrize("damage", [_l1_unaligned, _data_past_refcounts])
@pytest.mark.parametrize("args", [["-a", "s1"], ["-d", "s1"], ["-c", "x"]])
def test_damaged_snapshot_l2_references(tmp_path: Path, damage, args: list[str]) -> None:
    """Corruption found while counting references: QEMU's messages (and the
    corrupt bit), its errno, and what check says afterwards."""
    p = _hostile(tmp_path, "h.qcow2", lambda raw, nb, off: damage(raw))
    q, mine = _both(p, [args])
    cq, cp = run_qemu("check", str(q)), run_qemu("check", str(mine))
    assert cp.returncode == cq.returncode


def test_apply_grows_and_shrinks_l1(tmp_path: Path) -> None:
    """Snapshots of a 1 MiB and a 64 MiB image (L1 of 1 and 32 entries with
    4 KiB clusters): applying them in turn resizes and grows the L1 table
    exactly as qemu-img; qimg reads both snapshots as qemu-img does."""
    base = tmp_path / "rs.qcow2"
    assert run_qemu("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(base), "1M").returncode == 0
    _qio(base, "write -P 1 0 1M")
    assert run_qemu("snapshot", "-c", "s", str(base)).returncode == 0
    assert run_qemu("resize", "-q", str(base), "64M").returncode == 0
    _qio(base, "write -P 2 60M 1M")
    assert run_qemu("snapshot", "-c", "t", str(base)).returncode == 0
    for name in ("s", "t"):
        a, b = tmp_path / "a.raw", tmp_path / "b.raw"
        assert run_qemu("convert", "-l", name, "-O", "raw", str(base), str(a)).returncode == 0
        assert run_qimg("convert", "-l", name, "-O", "raw", str(base), str(b)).returncode == 0
        assert a.read_bytes() == b.read_bytes()
    q, p = _both(base, [["-a", "s"], ["-a", "t"], ["-a", "s"]])
    assert p.read_bytes() == q.read_bytes()
    assert run_qemu("check", str(p)).returncode == 0


def test_apply_refused_with_bitmaps(tmp_path: Path) -> None:
    base = tmp_path / "bm.qcow2"
    assert run_qemu("create", "-q", "-f", "qcow2", str(base), "4M").returncode == 0
    assert run_qemu("bitmap", "--add", str(base), "b0").returncode == 0
    _qio(base, "write 0 64k")
    q, p = _both(base, [["-c", "s"], ["-a", "s"], ["-a", "nope"], ["-d", "s"]])
    assert _masked(p) == _masked(q)


def test_refcount_overflow_midway_as_qemu(tmp_path: Path) -> None:
    """With 2-bit refcounts the updates overflow part of the way through:
    the references counted before stay, as qemu-img leaves them."""
    base = _make(tmp_path, "r2.qcow2", "-o", "cluster_size=4096,refcount_bits=2")
    q, p = _both(base, SCENARIO[:6])
    assert _masked(p) == _masked(q)
    cq, cp = run_qemu("check", str(q)), run_qemu("check", str(p))
    assert (cp.returncode, cp.stdout, cp.stderr) == (cq.returncode, cq.stdout, cq.stderr)


@needs_qemu
def test_list_pads_utf8_names_by_bytes(tmp_path):
    # printf pads %-16s by bytes, so a non-ASCII tag shifts the columns.
    path = str(tmp_path / "u.qcow2")
    assert run_qemu("create", "-q", "-f", "qcow2", path, "1M").returncode == 0
    for name in ("héllo", "abc"):
        assert run_qemu("snapshot", "-c", name, path).returncode == 0
    assert_same(["snapshot", "-l", path], str(tmp_path))
    assert_same(["info", path], str(tmp_path))


@needs_qemu
@pytest.mark.parametrize("args", [["snapshot", "-l", "s.qcow2"], ["snapshot", "-d", "sn", "s.qcow2"]])
def test_damaged_snapshot_table_hint_as_qemu(tmp_path, args):
    """qemu's hint after the open error carries no program name."""
    make_bad_snapshot_table(tmp_path)
    mine = assert_same(args, str(tmp_path))
    assert mine.stderr.endswith(FORCE_REMOVE_HINT)
