"""The read path: committed extents to bytes, through a bounded chunk cache.

A read is planned inside one LMDB read transaction (which extents, which
chunks, where their records are) without awaiting, so that a commit landing
meanwhile cannot mix old extents with new staging state. The chunks are then
loaded, in a worker thread, from the cache or the packs, each checked against
its blake3 id.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Final

import lmdb
import trio

from buildatfs.errors import ChunkError, ChunkMissing
from buildatfs.schema import Chunk
from buildatfs.store import Store

log = logging.getLogger(__name__)

CACHE_BYTES: Final = 64 * 1024 * 1024


@dataclasses.dataclass(slots=True, frozen=True)
class Piece:
    """File bytes [offset, offset+length) are bytes [chunk_offset, ...) of a chunk."""

    offset: int
    length: int
    chunk_id: bytes
    chunk_offset: int
    chunk: Chunk | None  # None if the index lost the chunk


class ChunkCache:
    """Decompressed chunks, least recently used first out, bounded in bytes."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit = limit
        self.size = 0
        self._data: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()

    def get(self, chunk_id: bytes) -> bytes | None:
        data = self._data.get(chunk_id)
        if data is not None:
            self._data.move_to_end(chunk_id)
        return data

    def put(self, chunk_id: bytes, data: bytes) -> None:
        if chunk_id in self._data or len(data) > self.limit // 4:
            return
        self._data[chunk_id] = data
        self.size += len(data)
        while self.size > self.limit:
            _, old = self._data.popitem(last=False)
            self.size -= len(old)


class Reader:
    def __init__(self, store: Store, limiter: trio.CapacityLimiter) -> None:
        self.store = store
        self.cache = ChunkCache()
        self.limiter = limiter
        self._reported: set[bytes] = set()

    def plan(self, txn: lmdb.Transaction, inode: int, start: int, end: int) -> list[Piece]:
        """Return the pieces of committed data in [start, end); gaps are holes."""
        pieces = []
        for offset, ext in self.store.extents(txn, inode, start, end):
            lo, hi = max(offset, start), min(offset + ext.length, end)
            chunk = self.store.get_chunk(txn, ext.chunk_id)
            pieces.append(Piece(lo, hi - lo, ext.chunk_id, ext.chunk_offset + lo - offset, chunk))
        return pieces

    async def fill(self, inode: int, start: int, buf: bytearray, pieces: list[Piece]) -> None:
        """Copy each piece's bytes into *buf* (which begins at file offset *start*).

        Raises ChunkCorrupt or ChunkMissing, after logging it once per chunk.
        """
        for piece in pieces:
            data = await self.load(inode, piece.chunk_id, piece.chunk)
            pos = piece.offset - start
            buf[pos : pos + piece.length] = data[
                piece.chunk_offset : piece.chunk_offset + piece.length
            ]

    async def load(self, inode: int, chunk_id: bytes, chunk: Chunk | None) -> bytes:
        data = self.cache.get(chunk_id)
        if data is not None:
            return data
        try:
            data = await trio.to_thread.run_sync(
                load_chunk_sync, self.store, chunk_id, chunk, limiter=self.limiter
            )
        except Exception as exc:
            if chunk_id not in self._reported:
                self._reported.add(chunk_id)
                log.error(
                    "Chunk %s of inode %d cannot be read (%s); reads of it fail with EIO. "
                    "Run `buildatfs fsck --verify-data` on the store.",
                    chunk_id.hex(),
                    inode,
                    exc,
                )
            raise
        self.cache.put(chunk_id, data)
        return data


def load_chunk_sync(store: Store, chunk_id: bytes, chunk: Chunk | None) -> bytes:
    """Return the raw data of *chunk_id* from the record *chunk* names, checked.

    If that fails, the chunk is looked up again in a fresh read transaction
    and read once more: garbage collection may have moved it and deleted its
    old pack since the caller looked. Raises ChunkMissing or ChunkCorrupt.
    """
    try:
        if chunk is None:
            raise ChunkMissing("the chunk index has no entry for it")
        return store.read_chunk_sync(chunk_id, chunk)
    except ChunkError:
        with store.env.begin() as txn:
            moved = store.get_chunk(txn, chunk_id)
        if moved is None or (
            chunk is not None and (moved.pack, moved.offset) == (chunk.pack, chunk.offset)
        ):
            raise
        return store.read_chunk_sync(chunk_id, moved)
