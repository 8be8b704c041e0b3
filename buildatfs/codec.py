"""Chunk identity and the chunk record format inside pack files.

A chunk record is a 48-byte header followed by the body::

    offset  size  field
    0       4     magic b"BFC1"
    4       1     codec: 0 = raw, 1 = zstd frame, 2 = compacted zstd frame
    5       3     zero
    8       4     raw length (u32, big-endian)
    12      4     body length (u32, big-endian)
    16      32    chunk id: blake3 of the raw data

The header repeats everything the index knows about the chunk except its
refcount, so that the chunk index can be rebuilt from the packs alone.

New chunks are compressed fast (zstd level 3) on the write path. Compaction
(compact.py) later re-encodes cold ones at a high level with a dictionary
trained on the store's own chunks, which recovers most of what compressing
each chunk alone loses against compressing whole files. A compacted frame
names its dictionary by the id zstd writes into the frame header; the
dictionaries themselves live in the index (``meta`` keys ``dict:<id>``), so
decoding a compacted record takes the store's dictionaries (`Dictionaries`).

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
CODEC_COMPACT: Final = 2
ZSTD_LEVEL: Final = 3
COMPACT_LEVEL: Final = 19
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


class Dictionaries:
    """The store's zstd dictionaries by id, with zstd contexts for each kept
    per thread (a context with a loaded dictionary is costly to make)."""

    def __init__(self, raw: dict[int, bytes] | None = None) -> None:
        self.raw: dict[int, bytes] = dict(raw or {})
        self._prepared: dict[int, zstandard.ZstdCompressionDict] = {}
        self._lock = threading.Lock()

    def add(self, dict_id: int, data: bytes) -> None:
        self.raw[dict_id] = data

    def newest(self) -> int | None:
        return max(self.raw) if self.raw else None

    def _prepared_dict(self, dict_id: int) -> zstandard.ZstdCompressionDict:
        with self._lock:
            prepared = self._prepared.get(dict_id)
            if prepared is None:
                data = self.raw.get(dict_id)
                if data is None:
                    raise ChunkCorrupt(f"zstd dictionary {dict_id} is not in the store")
                prepared = self._prepared[dict_id] = zstandard.ZstdCompressionDict(data)
            return prepared

    def compressor(self, dict_id: int | None) -> zstandard.ZstdCompressor:
        cache = _thread_cache("compact_cctx")
        cctx = cache.get(dict_id)
        if cctx is None:
            prepared = self._prepared_dict(dict_id) if dict_id is not None else None
            cctx = cache[dict_id] = zstandard.ZstdCompressor(
                level=COMPACT_LEVEL, dict_data=prepared, write_content_size=True
            )
        return cctx

    def decompressor(self, dict_id: int) -> zstandard.ZstdDecompressor:
        if dict_id == 0:
            return _decompressor()
        cache = _thread_cache("compact_dctx")
        dctx = cache.get(dict_id)
        if dctx is None:
            dctx = cache[dict_id] = zstandard.ZstdDecompressor(
                dict_data=self._prepared_dict(dict_id)
            )
        return dctx


def _thread_cache(name: str) -> dict:
    cache = getattr(_local, name, None)
    if cache is None:
        cache = {}
        setattr(_local, name, cache)
    return cache


def chunk_id_sync(data: bytes | memoryview) -> bytes:
    """Return the 32-byte blake3 id of *data*."""
    return blake3.blake3(data).digest()


def encode_sync(chunk_id: bytes, data: bytes | memoryview) -> bytes:
    """Return the whole record (header and body) for one chunk."""
    return _record(chunk_id, data, _compressor(), CODEC_ZSTD)


def compact_sync(
    chunk_id: bytes, data: bytes | memoryview, dicts: Dictionaries, dict_id: int | None
) -> bytes:
    """Return the compacted record of one chunk: zstd at COMPACT_LEVEL with
    dictionary *dict_id* (None: without one), or raw if that saves too little."""
    return _record(chunk_id, data, dicts.compressor(dict_id), CODEC_COMPACT)


def _record(
    chunk_id: bytes, data: bytes | memoryview, cctx: zstandard.ZstdCompressor, codec: int
) -> bytes:
    body = cctx.compress(data)
    if len(body) > len(data) * (1 - MIN_SAVING):
        body, codec = bytes(data), CODEC_RAW
    return HEADER.pack(MAGIC, codec, len(data), len(body), chunk_id) + body


def parse_header(record: bytes | memoryview) -> tuple[int, int, int, bytes]:
    """Return (codec, raw length, body length, chunk id) or raise ChunkCorrupt."""
    if len(record) < HEADER.size:
        raise ChunkCorrupt("record shorter than its header")
    magic, codec, raw_len, body_len, chunk_id = HEADER.unpack_from(record)
    if magic != MAGIC or codec not in (CODEC_RAW, CODEC_ZSTD, CODEC_COMPACT):
        raise ChunkCorrupt("bad record header")
    return codec, raw_len, body_len, chunk_id


def decode_sync(chunk_id: bytes, record: bytes, dicts: Dictionaries | None = None) -> bytes:
    """Return the raw data of *record*, checked against *chunk_id*; a
    compacted record needs the store's dictionaries *dicts*.

    Raises ChunkCorrupt if the header, the body or the hash do not match, or
    the dictionary the record names is not there.
    """
    codec, raw_len, body_len, stored_id = parse_header(record)
    if stored_id != chunk_id or len(record) != HEADER.size + body_len:
        raise ChunkCorrupt("record does not belong to this chunk")
    body = memoryview(record)[HEADER.size :]
    if codec != CODEC_RAW:
        try:
            dctx = _decompressor()
            if codec == CODEC_COMPACT:
                dict_id = zstandard.get_frame_parameters(body).dict_id
                dctx = (dicts or Dictionaries()).decompressor(dict_id)
            data = dctx.decompress(body, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise ChunkCorrupt(f"zstd: {exc}") from None
    else:
        data = bytes(body)
    if len(data) != raw_len or chunk_id_sync(data) != chunk_id:
        raise ChunkCorrupt("content does not match its blake3 id")
    return data
