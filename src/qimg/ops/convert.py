"""``qemu-img convert``: copy one or more images (concatenated) into a new
or existing target, as img_convert does; the copying is the shared engine's
(qimg.ops.copy)."""

from __future__ import annotations

import os
from typing import Any, Callable

from qimg.block.image import Image, open_image
from qimg.block.options import coerce
from qimg.errors import QimgError
from qimg.ops.copy import BUF_SECTORS, MAX_BUF_SECTORS, SECTOR, CopyJob, run

#: opens an image for the command: (name, fmt, read_only=, force_share=, ...)
Opener = Callable[..., Image]

SPARSE_SIZE_ERROR = (
    "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. "
    "Select 0 to disable sparse detection (fully allocates output)."
)


class UnreportedError(QimgError):
    """A failure qemu-img does not report: it only exits with status 1."""


def check_sparse_size(sparse_size: int) -> int:
    """-S in bytes to sectors, with qemu-img's refusal."""
    if sparse_size % SECTOR or sparse_size // SECTOR > MAX_BUF_SECTORS:
        raise QimgError(SPARSE_SIZE_ERROR)
    return sparse_size // SECTOR


def _default_open(name: str, fmt: str | None = None, *, read_only: bool = True,
                  options: dict[str, Any] | None = None, **_: Any) -> Image:
    try:
        return open_image(name, fmt, read_only=read_only, options=options)
    except QimgError as e:
        raise QimgError(f"Could not open '{name}': {e.message}", e.code) from None


def _create_values(out_format: str, options: str | dict[str, Any] | None, size: int,
                   backing_file: str | None, backing_format: str | None) -> tuple[Any, dict[str, Any]]:
    """The target's driver and its typed create options (qemu's opts)."""
    from qimg.formats import get_driver
    from qimg.ops.create import create_schema, split_opts

    try:
        drv = get_driver(out_format)
    except QimgError:
        raise QimgError(f"Unknown file format '{out_format}'") from None
    if not drv.supports_create or not drv.create_opts:
        raise QimgError(f"Format driver '{out_format}' does not support image creation")
    schema = {s.name: s for s in create_schema(drv)}
    values: dict[str, Any] = {}
    if isinstance(options, dict):
        values.update(options)
    elif options:
        for name, text in split_opts(options):
            spec = schema.get(name)
            if spec is None:
                raise QimgError(f"Invalid parameter '{name}'")
            try:
                values[name] = coerce(spec, text)
            except QimgError as e:
                # error_report_err: the lines after the first are qemu's hint
                first, _, rest = e.message.partition("\n")
                raise QimgError(first, e.code, detail=rest + "\n" if rest else "") from None
    values["size"] = size
    if backing_file is not None:
        if "backing_file" not in schema:
            raise QimgError(f"Backing file not supported for file format '{out_format}'")
        values["backing_file"] = backing_file
    if backing_format is not None:
        if "backing_fmt" not in schema:
            raise QimgError(f"Backing file format not supported for file format '{out_format}'")
        values["backing_fmt"] = backing_format
    return drv, values


def _load_snapshot(sources: list[Image], snapshot: "str | tuple[str | None, str | None, bool] | None") -> None:
    """``snapshot``: an ID or a name, or (id, name, exact) as the command
    line's ``snapshot.id=``/``snapshot.name=`` give them."""
    if snapshot is None:
        return
    if len(sources) > 1:
        raise QimgError("No support for concatenating multiple snapshot")
    img = sources[0]
    # qemu's qcow2 can load snapshots; the driver may not declare it yet
    if not img.driver.supports_snapshots and img.format != "qcow2":
        raise QimgError(
            f"Failed to load snapshot: Block format '{img.format}' used by device '' "
            "does not support temporarily loading internal snapshots"
        )
    loader = getattr(img.driver, "load_snapshot_tmp", None)
    if loader is not None:
        if isinstance(snapshot, tuple):
            loader(snapshot[0], snapshot[1], exact=snapshot[2])
        else:
            loader(snapshot)
        return
    header = getattr(img.driver, "header", None)
    if getattr(header, "nb_snapshots", 0):
        raise QimgError("Failed to load snapshot: Operation not supported")
    raise QimgError("Failed to load snapshot: Can't find snapshot")


def convert(
    sources: list[str],
    target: str,
    *,
    src_format: str | None = None,
    out_format: str = "raw",
    options: str | dict[str, Any] | None = None,
    compressed: bool = False,
    sparse_size: int = 4096,
    backing_file: str | None = None,
    backing_format: str | None = None,
    skip_create: bool = False,
    progress: Callable[[float], None] | None = None,
    snapshot: "str | tuple[str | None, str | None, bool] | None" = None,
    target_is_zero: bool = False,
    bitmaps: bool = False,
    skip_broken_bitmaps: bool = False,
    force_share: bool = False,
    copy_range: bool = False,
    salvage: bool = False,
    rate_limit: int = 0,
    coroutines: int = 8,
    warn: Callable[[str], None] | None = None,
    opener: Opener | None = None,
    target_opener: Opener | None = None,
) -> None:
    """Convert ``sources`` (concatenated) into ``target``.

    ``options`` are the target's create options (``-o`` text or a dict),
    ``sparse_size`` is ``-S`` in bytes (0: write every byte), ``backing_file``
    makes the target an overlay that receives only the sources' top layer,
    ``skip_create`` (``-n``) writes into an existing target.  ``progress`` is
    called with the percentage done.  ``copy_range`` (``-C``) lets the
    kernel copy data file to file, ``salvage`` turns read errors into zeroes
    (each reported through ``warn``), ``rate_limit`` (``-r``) is in bytes
    per second, ``coroutines`` (``-m``) bounds the requests in flight.
    ``opener``/``target_opener`` open the
    sources/target (the command line passes its own for qemu-img's
    messages and --image-opts).  Raises QimgError with qemu-img's message.
    """
    if not sources:
        raise QimgError("Must specify image file name")
    min_sparse = check_sparse_size(sparse_size)
    if target_is_zero and not skip_create:
        raise QimgError("--target-is-zero requires use of -n flag")
    if copy_range and compressed:
        raise QimgError("Cannot enable copy offloading when -c is used")
    if copy_range and salvage:
        raise QimgError("Cannot use copy offloading in salvaging mode")
    if not 1 <= coroutines <= 16:
        raise QimgError("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
    opener = opener or _default_open
    target_opener = target_opener or opener
    srcs: list[Image] = []
    tgt: Image | None = None
    try:
        for name in sources:
            srcs.append(opener(name, src_format, read_only=True, force_share=force_share))
        _load_snapshot(srcs, snapshot)
        total_sectors = sum(-(-img.size // SECTOR) for img in srcs)

        drv = None
        values: dict[str, Any] = {}
        if not skip_create:
            drv, values = _create_values(out_format, options, total_sectors * SECTOR, backing_file, backing_format)
            backing_file = values.get("backing_file")
        target_has_backing = backing_file is not None
        if target_is_zero and target_has_backing:
            # qemu-img leaves through its error exit with ret still 0
            raise QimgError("Cannot use --target-is-zero when the destination image has a backing file", 0)
        if len(srcs) > 1 and target_has_backing:
            raise QimgError(
                "Having a backing file for the target makes no sense when concatenating multiple input images"
            )
        # with -n there are no create options: qemu-img checks -B's format
        # only on its way into them
        if target_has_backing and not skip_create and not values.get("backing_fmt"):
            raise QimgError("Use of backing file requires explicit backing format")
        if compressed and drv is not None:
            if not drv.supports_compression:
                raise QimgError("Compression not supported for this file format")
            if values.get("encryption") or values.get("encrypt.format"):
                raise QimgError("Compression and encryption not supported at the same time")
            if values.get("preallocation", "off") != "off":
                raise QimgError("Compression and preallocation not supported at the same time")
        if bitmaps:
            if len(srcs) > 1:
                raise QimgError("Copying bitmaps only possible with single source")
            from qimg.ops.bitmap import check_bitmaps

            check_bitmaps(srcs[0], skip_broken_bitmaps)

        if drv is not None:
            size = values.pop("size")
            if not force_share and _in_use(srcs, target):
                raise QimgError(f'{target}: error while converting {out_format}: Failed to get "write" lock',
                                detail=f"Is another process using the image [{target}]?\n")
            try:
                drv.create(target, size, values)
            except QimgError as e:
                # the file protocol's own create reports "Could not create"
                # (after the format checked its options: a refused option
                # leaves no file behind)
                message = e.message
                opened = f"Could not open '{target}': "
                if message.startswith(opened):
                    message = f"Could not create '{target}': " + message[len(opened):]
                raise QimgError(f"{target}: error while converting {out_format}: {message}") from None
            except OSError as e:
                raise QimgError(
                    f"{target}: error while converting {out_format}: Could not create '{target}': {e.strerror}"
                ) from None
        if drv is None and not force_share and _in_use(srcs, target):
            raise QimgError(f"Could not open '{target}': Failed to get \"write\" lock",
                            detail=f"Is another process using the image [{target}]?\n")
        # img_add_key_secrets: the new target opens with its key secrets
        secrets = {k: v for k, v in values.items() if k.endswith("key-secret")}
        tgt = target_opener(target, out_format, read_only=False, options=secrets or None)
        if bitmaps and not _bitmaps_supported(tgt):
            raise QimgError(f"Format driver '{tgt.format}' does not support bitmaps")
        if compressed and not tgt.driver.supports_compression:
            raise QimgError("Compression not supported for this file format")
        if skip_create and tgt.size < total_sectors * SECTOR:
            raise QimgError("output file is smaller than input file")

        job = CopyJob(srcs, tgt, min_sparse=min_sparse, compressed=compressed, progress=progress,
                      copy_range=copy_range, salvage=salvage, warn=warn, rate_limit=rate_limit,
                      coroutines=coroutines)
        job.target_has_backing = target_has_backing
        job.target_is_new = not skip_create
        if target_has_backing and not skip_create and tgt.backing is not None:
            job.target_backing_sectors = -(-tgt.backing.size // SECTOR)
        job.cluster_sectors = (tgt.driver.cluster_size or 0) // SECTOR
        if compressed:
            if job.cluster_sectors <= 0 or job.cluster_sectors > BUF_SECTORS:
                raise QimgError("invalid cluster size")
            job.buf_sectors = job.cluster_sectors
        if target_is_zero:
            job.has_zero_init = True
        elif min_sparse and not target_has_backing and not skip_create \
                and getattr(tgt.driver, "has_zero_init", True):
            # a new image reads as zeroes (bdrv_has_zero_init; not so an
            # encrypted one whose data is there); an existing one (-n) gets
            # its zero runs written explicitly, leaving what lies past the
            # sources' end untouched as qemu-img does
            job.has_zero_init = True
        run(job)
        if compressed and not tgt.driver.aligns_compressed_end:
            # qemu-img ends compressed output with an empty compressed write,
            # which qcow's driver refuses (-EINVAL): img_convert then fails
            # without a message, the data all written
            tgt.flush()
            raise UnreportedError("Invalid argument")
        if bitmaps:
            from qimg.ops.bitmap import copy_bitmaps

            copy_bitmaps(srcs[0], tgt, skip_broken_bitmaps)
        tgt.flush()
    except OSError as e:
        raise QimgError(f"error while converting: {e.strerror or e}") from None
    finally:
        if tgt is not None:
            tgt.close()
        for img in srcs:
            img.close()


def _in_use(sources: list[Image], target: str) -> bool:
    """Whether ``target`` is a file the sources hold open.  qemu-img opens
    its sources unsharing write (BDRV_O_NO_SHARE, unless -U), and their
    backing and data files with them: creating or opening the target for
    writing then fails on the lock, before anything is written."""
    try:
        st = os.stat(target)
    except (OSError, ValueError):
        return False
    for src in sources:
        for img in src.chain():
            for node in (img.file, getattr(img.driver, "data_node", None)):
                fd = getattr(node, "fd", None)
                if fd is None:
                    continue
                mine = os.fstat(fd)
                if (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino):
                    return True
    return False


def _bitmaps_supported(img: Image) -> bool:
    from qimg.ops.bitmap import persistent_supported

    return persistent_supported(img)


__all__ = ["convert", "check_sparse_size", "SPARSE_SIZE_ERROR", "UnreportedError"]
