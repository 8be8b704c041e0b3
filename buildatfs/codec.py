"""Chunk identity and the chunk record format inside pack files.

A chunk record is a 48-byte header followed by the body::

    offset  size  field
    0       4     magic b"BFC1"
    4       1     codec: 0 = raw, 1 = zstd frame
    5       3     zero
    8       4     raw length (u32, big-endian)
    12      4     body length (u32, big-endian)
    16      32    chunk id: blake3 of the raw data

The header repeats everything the index knows about the chunk except its
refcount, so that the chunk index can be rebuilt from the packs alone.

Every function here is CPU-bound and meant for a worker thread (``_sync``);
each thread has its own zstd contexts.
"""

from __future__ import annotations

import struct
import threading
from typing import Final

import blake3
import zstandard

from buildatfs.errors import ChunkCorrupt

MAGIC: Final = b"BFC1"
HEADER: Final = struct.Struct(">4sB3xII32s")
CODEC_RAW: Final = 0
CODEC_ZSTD: Final = 1
ZSTD_LEVEL: Final = 3
# Store raw when zstd saves less than this fraction: decompressing costs more
# than the few bytes are worth.
MIN_SAVING: Final = 1 / 32

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    try:
        return _local.cctx
    except AttributeError:
        _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
        _local.dctx = zstandard.ZstdDecompressor()
        return _local.cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    _compressor()
    return _local.dctx


def chunk_id_sync(data: bytes | memoryview) -> bytes:
    """Return the 32-byte blake3 id of *data*."""
    return blake3.blake3(data).digest()


def encode_sync(chunk_id: bytes, data: bytes | memoryview) -> bytes:
    """Return the whole record (header and body) for one chunk."""
    body = _compressor().compress(data)
    codec = CODEC_ZSTD
    if len(body) > len(data) * (1 - MIN_SAVING):
        body, codec = bytes(data), CODEC_RAW
    return HEADER.pack(MAGIC, codec, len(data), len(body), chunk_id) + body


def parse_header(record: bytes | memoryview) -> tuple[int, int, int, bytes]:
    """Return (codec, raw length, body length, chunk id) or raise ChunkCorrupt."""
    if len(record) < HEADER.size:
        raise ChunkCorrupt("record shorter than its header")
    magic, codec, raw_len, body_len, chunk_id = HEADER.unpack_from(record)
    if magic != MAGIC or codec not in (CODEC_RAW, CODEC_ZSTD):
        raise ChunkCorrupt("bad record header")
    return codec, raw_len, body_len, chunk_id


def decode_sync(chunk_id: bytes, record: bytes) -> bytes:
    """Return the raw data of *record*, checked against *chunk_id*.

    Raises ChunkCorrupt if the header, the body or the hash do not match.
    """
    codec, raw_len, body_len, stored_id = parse_header(record)
    if stored_id != chunk_id or len(record) != HEADER.size + body_len:
        raise ChunkCorrupt("record does not belong to this chunk")
    body = memoryview(record)[HEADER.size :]
    if codec == CODEC_ZSTD:
        try:
            data = _decompressor().decompress(body, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise ChunkCorrupt(f"zstd: {exc}") from None
    else:
        data = bytes(body)
    if len(data) != raw_len or chunk_id_sync(data) != chunk_id:
        raise ChunkCorrupt("content does not match its blake3 id")
    return data
