"""``qemu-img bench [-c count] [-d depth] [-f fmt]
[--flush-interval=flush_interval] [-i aio] [-n] [--no-drain] [-o offset]
[--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-U]
[-w] filename``: img_bench's options, checks and messages, in its order.

As in qemu-img 7.2, -q changes nothing (bench prints with plain printf),
--no-drain without --flush-interval is accepted and does nothing, and
-i io_uring is accepted.  Where qemu-img 7.2 crashes or hangs we refuse or
go on instead: depth 0 with requests to send (qemu waits for ever) is an
invalid queue depth; an empty image takes its requests at offset 0 (qemu
divides by zero; later qemu does this); a depth * buffer size too big to
allocate (qemu aborts) is no matter, as we never hold more than
ops.bench.MAX_IO.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from qimg.block.options import parse_u64
from qimg.cli import args as cli_args
from qimg.cli import common
from qimg.errors import QimgError
from qimg.units import cvtnum

if TYPE_CHECKING:
    from qimg.block.image import Image
    from qimg.ops.bench import BenchSpec

SHORT = "hc:d:f:ni:o:qs:S:t:wU"
LONG = ["help", "flush-interval=", "image-opts", "pattern=", "no-drain", "force-share"]

INT_MAX = (1 << 31) - 1
AIO_MODES = ("threads", "native", "io_uring")
#: cache mode -> (cache.direct, writethrough, no-flush), as bdrv_parse_cache_mode
CACHE = {
    "none": (True, False, False), "off": (True, False, False),
    "writeback": (False, False, False), "writethrough": (False, True, False),
    "directsync": (True, True, False), "unsafe": (False, False, True),
}


def _ulong(text: str, limit: int, message: str) -> int:
    """qemu_strtoul(text, NULL, 0, &res), refused above ``limit``."""
    value = parse_u64(text)
    if value is None or value > limit:
        raise QimgError(message)
    return value


def run(prog: str, argv: list[str]) -> int:
    from qimg.ops.bench import BenchSpec

    opts, operands = cli_args.parse(argv, SHORT, LONG)
    shared = common.CommonOptions()
    fields: dict[str, int | bool] = {}
    native = False
    cache = CACHE["writeback"]
    for opt, val in opts:
        if common.apply_common(opt, val, shared):
            continue
        if opt == "-c":
            fields["count"] = _ulong(val, INT_MAX, "Invalid request count specified")
        elif opt == "-d":
            fields["depth"] = _ulong(val, INT_MAX, "Invalid queue depth specified")
        elif opt == "-n":
            native = True
        elif opt == "-i":
            if val not in AIO_MODES:
                raise QimgError(f"Invalid aio option: {val}")
            native = native or val == "native"  # "threads" does not undo -n
        elif opt == "-o":
            fields["offset"] = cvtnum("offset", val)
        elif opt == "-s":
            fields["bufsize"] = cvtnum("buffer size", val, 0, INT_MAX)
        elif opt == "-S":
            fields["step"] = cvtnum("step_size", val, 0, INT_MAX)
        elif opt == "-t":
            if val not in CACHE:
                raise QimgError("Invalid cache mode")
            cache = CACHE[val]
        elif opt == "-w":
            fields["write"] = True
        elif opt == "--pattern":
            fields["pattern"] = _ulong(val, 0xFF, "Invalid pattern byte specified")
        elif opt == "--flush-interval":
            fields["flush_interval"] = _ulong(val, INT_MAX, "Invalid flush interval specified")
        elif opt == "--no-drain":
            fields["drain_on_flush"] = False
    direct, writethrough, no_flush = cache
    spec = BenchSpec(**fields, writethrough=writethrough, no_flush=no_flush)
    filename = common.one_image(operands)
    if spec.flush_interval and not spec.write:
        raise QimgError("--flush-interval is only available in write tests")
    if spec.flush_interval and spec.flush_interval < spec.depth:
        raise QimgError("Flush interval can't be smaller than depth")
    if spec.depth == 0 and spec.count:
        raise QimgError("Invalid queue depth specified")

    img = _open(filename, shared, spec.write, native, direct)
    try:
        _bench(img, spec)
    finally:
        img.close()
    return 0


def _open(name: str, shared: common.CommonOptions, write: bool, native: bool, direct: bool) -> "Image":
    """img_open, with file-posix's refusal of aio=native without O_DIRECT
    (which comes after the file itself opened, before any format check)."""
    if shared.image_opts and shared.fmt:
        raise QimgError("--image-opts and --format are mutually exclusive")
    if native and not (direct or _direct_in_image_opts(name, shared)):
        if shared.force_share and write:
            raise QimgError(f"Could not open '{name}': force-share=on can only be used with read-only images")
        _open_protocol(name, shared.image_opts)
        raise QimgError(f"Could not open '{name}': aio=native was specified, "
                        "but it requires cache.direct=on, which was not specified.")
    return common.open_image(name, shared.fmt, read_only=not write, force_share=shared.force_share,
                             use_image_opts=shared.image_opts)


def _direct_in_image_opts(name: str, shared: common.CommonOptions) -> bool:
    if not shared.image_opts:
        return False
    _, _, options = common.image_opts(name)
    return str(options.get("cache.direct", "off")) in ("on", "yes", "true", "y")


def _open_protocol(name: str, use_image_opts: bool) -> None:
    from qimg.protocols.file import File

    filename = common.image_opts(name)[0] if use_image_opts else name
    try:
        File(filename).close()
    except QimgError as e:
        raise QimgError(f"Could not open '{name}': {e.message}", e.code) from None


def _bench(img: "Image", spec: "BenchSpec") -> None:
    from qimg.ops.bench import run_bench

    out = sys.stdout
    out.write(f"Sending {spec.count} {'write' if spec.write else 'read'} requests, {spec.bufsize} bytes each, "
              f"{spec.depth} in parallel (starting at offset {spec.offset}, step size {spec.step_size})\n")
    if spec.flush_interval:
        out.write(f"Sending flush every {spec.flush_interval} requests\n")
    out.flush()
    seconds = run_bench(img, spec)
    out.write("Run completed in %3.3f seconds.\n" % seconds)
