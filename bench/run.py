#!/usr/bin/env python3
"""Time qimg against qemu-img on the same files in the same run.

Builds a realistic disk: a 4 GiB ext4 file system holding a few hundred MB of
real files (copied from /usr), made with ``mkfs.ext4 -d`` so no mount is
needed, plus a 256 GiB qcow2 with preallocation=metadata.  Every workload is
run by both programs ``--runs`` times; the report gives medians, the ratio
qimg/qemu-img (below 1 means qimg is faster) and each side's peak memory.

    python3 bench/run.py [--dir /dev/shm/qimg-bench] [--runs 3] [--only convert]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

QIMG = [sys.executable, "-m", "qimg"]
QEMU = ["qemu-img"]

# Directories whose files fill the test file system (real, mixed content).
SOURCES = ["/usr/share", "/usr/lib/python3", "/usr/lib/x86_64-linux-gnu"]


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS (KiB) of one command; fails loudly."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    # check exits 0 on a clean image; anything else is a failed workload.
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    return wall, usage.ru_maxrss


def build_fs_image(work: str, payload_mb: int) -> str:
    raw = os.path.join(work, "fs.raw")
    if os.path.exists(raw):
        return raw
    tree = os.path.join(work, "tree")
    os.makedirs(tree, exist_ok=True)
    budget = payload_mb << 20
    for src in SOURCES:
        for root, _dirs, files in os.walk(src):
            for name in files:
                path = os.path.join(root, name)
                if budget <= 0 or os.path.islink(path) or not os.path.isfile(path):
                    continue
                dest = os.path.join(tree, os.path.relpath(path, "/"))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                try:
                    shutil.copyfile(path, dest)
                except OSError:
                    continue
                budget -= os.path.getsize(dest)
    subprocess.run(["truncate", "-s", "4G", raw], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, raw], check=True)
    shutil.rmtree(tree)
    return raw


def workloads(work: str, raw: str) -> list[tuple[str, list[str], str | None, float | None]]:
    """(name, arguments after the program, output file to remove after each
    run, the issue's target for the ratio qimg/qemu-img or None)."""
    q = lambda n: os.path.join(work, n)  # noqa: E731
    return [
        ("convert raw->qcow2", ["convert", "-f", "raw", "-O", "qcow2", raw, q("out.qcow2")], q("out.qcow2"), 1.0),
        ("convert qcow2->raw", ["convert", "-f", "qcow2", "-O", "raw", q("src.qcow2"), q("out.raw")], q("out.raw"),
         1.0),
        ("convert -c raw->qcow2 (zlib)", ["convert", "-c", "-f", "raw", "-O", "qcow2", raw, q("outc.qcow2")],
         q("outc.qcow2"), 0.6),
        ("convert -c raw->qcow2 (zstd)", ["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd",
                                          raw, q("outz.qcow2")], q("outz.qcow2"), 0.7),
        ("convert compressed qcow2->raw", ["convert", "-f", "qcow2", "-O", "raw", q("srcc.qcow2"), q("outc.raw")],
         q("outc.raw"), 1.0),
        ("compare raw vs qcow2", ["compare", "-f", "raw", "-F", "qcow2", raw, q("src.qcow2")], None, 1.2),
        ("check 256G prealloc=metadata", ["check", "-f", "qcow2", q("big.qcow2")], None, 1.0),
        ("map --output=json 256G", ["map", "--output=json", "-f", "qcow2", q("big.qcow2")], None, 1.5),
        # the target here is absolute: under 40 ms (see main)
        ("info qcow2", ["info", q("src.qcow2")], None, None),
        # The overlay is copied fresh before each run (see REBASE_PREP).
        ("rebase safe 4G, 10% differ", ["rebase", "-b", "rb_new.qcow2", "-F", "qcow2", q("rb_run.qcow2")],
         q("rb_run.qcow2"), None),
    ]


#: workloads that need a fresh copy of an input before each run: name -> (source, copy)
REBASE_PREP = ("rb_overlay.qcow2", "rb_run.qcow2")


def build_rebase_inputs(work: str, raw: str) -> None:
    """Two 4 GiB backing files that differ in 10% of their clusters (every
    tenth 64 KiB cluster rewritten) and an overlay over the first, holding
    a few clusters of its own; all made by qemu-img and qemu-io."""
    q = lambda n: os.path.join(work, n)  # noqa: E731
    if os.path.exists(q("rb_overlay.qcow2")):
        return
    subprocess.run(QEMU + ["convert", "-f", "raw", "-O", "qcow2", raw, q("rb_old.qcow2")], check=True)
    shutil.copyfile(q("rb_old.qcow2"), q("rb_new.qcow2"))
    size = os.path.getsize(raw)
    cmds: list[str] = []
    for i, off in enumerate(range(0, size, 10 * 65536)):
        cmds += ["-c", f"write -q -P {0x40 + i % 64} {off} 64k"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, q("rb_new.qcow2")], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(QEMU + ["create", "-q", "-f", "qcow2", "-b", "rb_old.qcow2", "-F", "qcow2",
                           q("rb_overlay.qcow2")], check=True)
    cmds = []
    for off in range(0, size, 37 * 65536 * 16):
        cmds += ["-c", f"write -q -P 0x11 {off} 128k"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, q("rb_overlay.qcow2")], check=True, stdout=subprocess.DEVNULL)


def fresh_venv(work: str) -> list[str]:
    """qimg installed (not editable) in a virtual environment of its own, so
    start-up is measured as a user gets it, without this machine's site
    packages and their .pth hooks."""
    venv = os.path.join(work, "venv")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([python, "-m", "pip", "install", "-q", repo], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", repo], check=True)
    # the console script, as a user runs it (python -m adds runpy's imports)
    return [os.path.join(venv, "bin", "qimg")]


def main() -> int:
    global QIMG

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/dev/shm/qimg-bench", help="work directory (tmpfs recommended)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--payload-mb", type=int, default=700, help="MB of real files in the file system")
    ap.add_argument("--only", default="", help="run only workloads whose name contains this")
    ap.add_argument("--no-venv", action="store_true",
                    help="run qimg from this interpreter instead of a fresh virtual environment")
    args = ap.parse_args()
    if not shutil.which("qemu-img"):
        print("qemu-img is not installed: apt-get install qemu-utils", file=sys.stderr)
        return 2
    os.makedirs(args.dir, exist_ok=True)
    if not args.no_venv:
        QIMG = fresh_venv(args.dir)
    raw = build_fs_image(args.dir, args.payload_mb)
    q = lambda n: os.path.join(args.dir, n)  # noqa: E731
    # Inputs made by qemu-img, so both programs read the same bytes.
    if not os.path.exists(q("src.qcow2")):
        subprocess.run(QEMU + ["convert", "-f", "raw", "-O", "qcow2", raw, q("src.qcow2")], check=True)
    if not os.path.exists(q("srcc.qcow2")):
        subprocess.run(QEMU + ["convert", "-c", "-f", "raw", "-O", "qcow2", raw, q("srcc.qcow2")], check=True)
    if not os.path.exists(q("big.qcow2")):
        subprocess.run(QEMU + ["create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", q("big.qcow2"), "256G"],
                       check=True)
    if not args.only or args.only in "rebase safe 4G, 10% differ":
        build_rebase_inputs(args.dir, raw)

    print(f"{'workload':34} {'qemu-img s':>10} {'qimg s':>10} {'ratio':>7} {'target':>7} {'qemu MiB':>9} "
          f"{'qimg MiB':>9}")
    for name, cmd, out, target in workloads(args.dir, raw):
        if args.only not in name:
            continue
        times: dict[str, list[float]] = {"qemu": [], "qimg": []}
        peaks: dict[str, int] = {"qemu": 0, "qimg": 0}
        try:
            for _ in range(args.runs):
                for side, prog in (("qemu", QEMU), ("qimg", QIMG)):
                    if out and os.path.basename(out) == REBASE_PREP[1]:
                        shutil.copyfile(q(REBASE_PREP[0]), out)
                    wall, rss = run(prog + cmd)
                    times[side].append(wall)
                    peaks[side] = max(peaks[side], rss)
                    if out and os.path.exists(out):
                        os.unlink(out)
        except SystemExit as e:
            print(f"{name:34} FAILED: {str(e).splitlines()[0]}")
            continue
        tq, ti = statistics.median(times["qemu"]), statistics.median(times["qimg"])
        if target is not None:
            goal = f"{'<=' if ti / tq <= target else '>'}{target:.1f}"
        else:
            goal = f"{'<' if ti < 0.040 else '>='}40ms" if name.startswith("info") else ""
        print(f"{name:34} {tq:10.3f} {ti:10.3f} {ti / tq:7.2f} {goal:>7} {peaks['qemu'] / 1024:9.1f} "
              f"{peaks['qimg'] / 1024:9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
