"""Shared fixtures: run qimg and the real qemu-img side by side."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

needs_qemu = pytest.mark.skipif(
    QEMU_IMG is None or QEMU_IO is None,
    reason="INTEROP SKIPPED: qemu-img/qemu-io not installed (apt-get install qemu-utils)",
)


def run_qimg(*args: str, cwd: str | None = None, input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run ``qemu-img``-named qimg so that messages match qemu-img's byte for byte."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    code = "import sys; sys.argv[0] = 'qemu-img'; from qimg.cli.main import main; raise SystemExit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, cwd=cwd, env=env, input=input)


def run_qemu(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, cwd=cwd)


def run_qemu_io(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(["qemu-io", *args], capture_output=True, cwd=cwd)
    assert p.returncode == 0, p.stderr
    return p


def same(args: list[str], cwd: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """Run one command line through both programs; the caller asserts."""
    return run_qimg(*args, cwd=cwd), run_qemu(*args, cwd=cwd)


def assert_same(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    mine, theirs = same(args, cwd)
    assert mine.stdout.decode() == theirs.stdout.decode()
    assert mine.stderr.decode() == theirs.stderr.decode()
    assert mine.returncode == theirs.returncode
    return mine
