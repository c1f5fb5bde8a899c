from conftest import needs_qemu, run_qimg, same


def test_no_arguments():
    p = run_qimg()
    assert p.returncode == 1
    assert p.stderr == b"qemu-img: Not enough arguments\nTry 'qemu-img --help' for more information\n"


@needs_qemu
def test_unknown_command_matches(tmp_path):
    mine, theirs = same(["frobnicate"], str(tmp_path))
    assert (mine.returncode, mine.stderr) == (theirs.returncode, theirs.stderr)


def test_help_lists_commands():
    p = run_qimg("--help")
    assert p.returncode == 0
    out = p.stdout.decode()
    for cmd in ("convert", "create", "info", "map", "check", "compare"):
        assert f"\n  {cmd} [" in out
