"""qcow2 compressed clusters: raw deflate with a 4 KiB window, as QEMU's
qcow2_zlib_compress/decompress (block/qcow2-threads.c), and the compressed
cluster descriptor layout of docs/interop/qcow2.txt."""

from __future__ import annotations

import zlib

from qimg.errors import QimgError

#: QEMU's deflateInit2(Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, ...)
_WBITS = -12
_MEMLEVEL = 9


COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1


def compress_cluster(data: bytes, cluster_size: int, compression_type: int = COMPRESSION_ZLIB) -> bytes | None:
    """Compress one cluster (``data`` shorter than a cluster is zero-padded,
    as for the last cluster of an image).

    Returns None when the result would not be smaller than cluster_size - 1
    bytes; the caller then stores the cluster uncompressed, as QEMU does.
    Pure and thread-safe: zlib releases the GIL, so a copy engine may call this
    from a thread pool and hand the result to Qcow2Driver.write_compressed_raw.
    """
    if len(data) < cluster_size:
        data = bytes(data) + bytes(cluster_size - len(data))
    if compression_type == COMPRESSION_ZSTD:
        out = _zstd().ZstdCompressor(level=3).compress(bytes(data))
        return out if len(out) <= cluster_size - 1 else None
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, _WBITS, _MEMLEVEL)
    out = c.compress(data) + c.flush(zlib.Z_FINISH)
    if len(out) > cluster_size - 1:
        return None
    return out


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise QimgError("This build does not support zstd compression") from None
    return zstandard


def decompress_cluster(data: bytes, cluster_size: int, compression_type: int = COMPRESSION_ZLIB) -> bytes:
    """Inflate one compressed cluster; it must yield exactly a cluster.
    (The stored data may be followed by sector padding: stop at a cluster.)"""
    if compression_type == COMPRESSION_ZSTD:
        import io

        try:
            with _zstd().ZstdDecompressor().stream_reader(io.BytesIO(data)) as r:
                out = r.read(cluster_size)
                while len(out) < cluster_size:
                    more = r.read(cluster_size - len(out))
                    if not more:
                        break
                    out += more
        except _zstd().ZstdError:
            raise QimgError("Input/output error") from None
        if len(out) != cluster_size:
            raise QimgError("Input/output error")
        return out
    try:
        d = zlib.decompressobj(_WBITS)
        out = d.decompress(data, cluster_size)
    except zlib.error:
        raise QimgError("Input/output error") from None
    if len(out) != cluster_size:
        raise QimgError("Input/output error")
    return out


def descriptor_layout(cluster_bits: int) -> tuple[int, int, int]:
    """(csize_shift, csize_mask, offset_mask) of a compressed L2 entry."""
    csize_shift = 62 - (cluster_bits - 8)
    csize_mask = (1 << (cluster_bits - 8)) - 1
    return csize_shift, csize_mask, (1 << csize_shift) - 1


def parse_descriptor(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host byte offset, bytes to read) of a compressed cluster."""
    shift, mask, off_mask = descriptor_layout(cluster_bits)
    host = entry & off_mask
    nb_sectors = ((entry >> shift) & mask) + 1
    return host, nb_sectors * 512 - (host & 511)


def make_descriptor(host: int, size: int, cluster_bits: int) -> int:
    shift, _, _ = descriptor_layout(cluster_bits)
    nb_csectors = ((host + size - 1) >> 9) - (host >> 9)
    return (1 << 62) | (nb_csectors << shift) | host
