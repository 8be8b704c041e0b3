"""The read path: committed extents to bytes, through a bounded chunk cache.

A read is planned inside one LMDB read transaction (which extents, which
chunks, where their records are) without awaiting, so that a commit landing
meanwhile cannot mix old extents with new staging state. The chunks are then
taken from the cache or loaded from the packs in worker threads, each checked
against its blake3 id.

A handle that reads sequentially gets readahead: the chunks of the next
READAHEAD_BYTES are loaded into the cache in the background, on every core,
so that its next reads find them decoded. One core decodes and checks about
half as fast as the disk and the kernel deliver, so the work has to be ahead
of the reader and spread over the cores.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import Final

import lmdb
import trio

from buildatfs.errors import ChunkError, ChunkMissing
from buildatfs.schema import Chunk
from buildatfs.store import Store

log = logging.getLogger(__name__)

CACHE_BYTES: Final = 64 * 1024 * 1024
# A read splits its missing chunks across the worker threads only if each
# share is at least this big: below it the thread hop costs more than it saves.
SHARE_MIN: Final = 128 * 1024
# How far ahead of a sequential reader its chunks are loaded, and how many
# bytes of files readahead may be loading at once over all readers (a share of
# the cache, so that what it loads stays cached until the readers get there).
READAHEAD_BYTES: Final = 8 * 1024 * 1024
PREFETCH_LIMIT: Final = CACHE_BYTES // 4


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

    def __contains__(self, chunk_id: bytes) -> bool:
        return chunk_id in self._data

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
    """Loads the chunks of planned reads, and of readahead, through the cache.

    The chunks one read is missing are loaded in a few worker calls that run
    on every core at once: a thread hop costs about as much as decoding a
    small chunk, so one hop per chunk would leave the cores idle. Each chunk
    being loaded is registered in ``_loading`` until it is done, so that a
    read that needs it waits for that load instead of decoding it again.
    """

    def __init__(self, store: Store, limiter: trio.CapacityLimiter) -> None:
        self.store = store
        self.cache = ChunkCache()
        self.limiter = limiter
        self.prefetching = 0  # bytes of files that readahead is loading now
        self._loading: dict[bytes, _Load] = {}
        self._reported: set[bytes] = set()

    def plan(self, txn: lmdb.Transaction, inode: int, start: int, end: int) -> list[Piece]:
        """Return the pieces of committed data in [start, end); gaps are holes."""
        pieces = []
        for offset, ext in self.store.extents(txn, inode, start, end):
            lo, hi = max(offset, start), min(offset + ext.length, end)
            chunk = self.store.get_chunk(txn, ext.chunk_id)
            pieces.append(Piece(lo, hi - lo, ext.chunk_id, ext.chunk_offset + lo - offset, chunk))
        return pieces

    async def fill(
        self, inode: int, start: int, buf: bytearray | memoryview, pieces: list[Piece]
    ) -> None:
        """Copy each piece's bytes into *buf* (which begins at file offset *start*).

        Raises ChunkCorrupt or ChunkMissing, after logging it once per chunk.
        """
        chunks = await self._gather(inode, pieces)
        for piece in pieces:
            pos = piece.offset - start
            data = memoryview(chunks[piece.chunk_id])
            buf[pos : pos + piece.length] = data[
                piece.chunk_offset : piece.chunk_offset + piece.length
            ]

    async def read(self, inode: int, start: int, end: int, pieces: list[Piece]) -> bytes:
        """Return the file's bytes [start, end): the pieces' data, zeros between them.

        Joins slices of the chunks instead of filling a zeroed buffer: one
        copy of each byte, where a reply of 1 MiB is most of a request's work.
        Raises like `fill`.
        """
        chunks = await self._gather(inode, pieces)
        parts: list[bytes | memoryview] = []
        pos = start
        for piece in pieces:
            if piece.offset > pos:
                parts.append(bytes(piece.offset - pos))
            data = memoryview(chunks[piece.chunk_id])
            parts.append(data[piece.chunk_offset : piece.chunk_offset + piece.length])
            pos = piece.offset + piece.length
        if end > pos:
            parts.append(bytes(end - pos))
        return b"".join(parts)

    async def _gather(self, inode: int, pieces: list[Piece]) -> dict[bytes, bytes]:
        """Return {chunk id: data} for every piece, from the cache, from loads
        already running, or loaded now; raise the first failure."""
        found: dict[bytes, bytes] = {}
        running: dict[bytes, tuple[_Load, Chunk | None]] = {}
        missing: dict[bytes, Chunk | None] = {}
        for piece in pieces:
            cid = piece.chunk_id
            if cid in found or cid in running or cid in missing:
                continue
            data = self.cache.get(cid)
            if data is not None:
                found[cid] = data
            elif (load := self._loading.get(cid)) is not None:
                running[cid] = (load, piece.chunk)
            else:
                missing[cid] = piece.chunk
        failures = await self._load_now(missing, found) if missing else {}
        again: dict[bytes, Chunk | None] = {}
        for cid, (load, chunk) in running.items():
            await load.done.wait()
            if load.data is not None:
                found[cid] = load.data
            else:
                # That load was readahead, whose errors are dropped, or another
                # read's: load it here so that this read reports its own error.
                again[cid] = chunk
        if again:
            failures.update(await self._load_now(again, found))
        if failures:
            for cid, exc in failures.items():
                self._report(inode, cid, exc)
            raise next(iter(failures.values()))
        return found

    async def _load_now(
        self, missing: dict[bytes, Chunk | None], found: dict[bytes, bytes]
    ) -> dict[bytes, Exception]:
        """Load *missing* into *found* and the cache, split across the worker
        threads; return the failures by chunk id."""
        wanted = list(missing.items())
        size = sum(chunk.raw_len for _, chunk in wanted if chunk is not None)
        shares = max(1, min(self.limiter.total_tokens, len(wanted), size // SHARE_MIN))
        batches = [wanted[i::shares] for i in range(shares)]
        results: list[list[bytes | Exception]] = [[] for _ in batches]
        loads = self._register(wanted)
        failures: dict[bytes, Exception] = {}

        async def run(i: int) -> None:
            results[i] = await trio.to_thread.run_sync(
                load_batch_sync, self.store, batches[i], limiter=self.limiter
            )

        try:
            if shares == 1:
                await run(0)
            else:
                async with trio.open_nursery() as nursery:
                    for i in range(shares):
                        nursery.start_soon(run, i)
            for batch, result in zip(batches, results, strict=True):
                for (cid, _), out in zip(batch, result, strict=True):
                    if isinstance(out, bytes):
                        found[cid] = out
                        self._done(cid, loads.pop(cid), out)
                    else:
                        failures[cid] = out
        finally:
            for cid, load in loads.items():
                self._done(cid, load, None)
        return failures

    def readahead(self, nursery: trio.Nursery, inode: int, start: int, end: int) -> bool:
        """Start loading the chunks of *inode*'s bytes [start, end) into the
        cache in the background; False, starting nothing, while readahead
        already covers its share of the cache (PREFETCH_LIMIT bytes).

        Readahead is only a guess at what comes next, so it plans in a
        transaction of its own in a worker thread: the index pages it reads
        from disk there are warm when the real read plans the same range in
        this thread. A load that fails is dropped: the read that needs the
        chunk loads it again and reports it.
        """
        if self.prefetching >= PREFETCH_LIMIT:
            return False
        self.prefetching += end - start
        nursery.start_soon(self._readahead, inode, start, end)
        return True

    async def _readahead(self, inode: int, start: int, end: int) -> None:
        try:
            try:
                pieces = await trio.to_thread.run_sync(
                    self._plan_sync, inode, start, end, limiter=self.limiter
                )
            except Exception as exc:
                log.debug("Readahead of inode %d cannot plan: %s", inode, exc)
                return
            await self._prefetch(pieces)
        finally:
            self.prefetching -= end - start

    def _plan_sync(self, inode: int, start: int, end: int) -> list[Piece]:
        with self.store.env.begin() as txn:
            return self.plan(txn, inode, start, end)

    async def _prefetch(self, pieces: list[Piece]) -> None:
        """Load the chunks of *pieces* that are neither cached nor loading.

        Each worker takes every n-th chunk, so that together they go through
        the range in file order as the reader does, in one call that hands
        over every chunk as soon as it is decoded: a worker that waited for
        this thread between chunks would idle while it serves a request.
        """
        wanted: dict[bytes, Chunk] = {}
        for piece in pieces:
            cid, chunk = piece.chunk_id, piece.chunk
            if chunk is None or cid in wanted or cid in self._loading or cid in self.cache:
                continue
            wanted[cid] = chunk
        if not wanted:
            return
        items: list[tuple[bytes, Chunk | None]] = list(wanted.items())
        size = sum(chunk.raw_len for chunk in wanted.values())
        lanes = max(1, min(self.limiter.total_tokens, size // SHARE_MIN))
        loads = self._register(items)
        token = trio.lowlevel.current_trio_token()

        def publish(cid: bytes, data: bytes | None) -> None:
            load = loads.pop(cid, None)
            if load is not None:
                self._done(cid, load, data)

        async def lane(batch: list[tuple[bytes, Chunk | None]]) -> None:
            try:
                await trio.to_thread.run_sync(
                    _prefetch_sync, self.store, batch, token, publish, limiter=self.limiter
                )
            except Exception as exc:  # _prefetch_sync catches per chunk; be sure
                log.debug("Readahead of %d chunks failed: %s", len(batch), exc)

        try:
            async with trio.open_nursery() as nursery:
                for i in range(lanes):
                    nursery.start_soon(lane, items[i::lanes])
        finally:
            for cid, load in loads.items():
                self._done(cid, load, None)

    def _register(self, wanted: list[tuple[bytes, Chunk | None]]) -> dict[bytes, _Load]:
        loads = {cid: _Load() for cid, _ in wanted}
        self._loading.update(loads)
        return loads

    def _done(self, cid: bytes, load: _Load, data: bytes | None) -> None:
        """Publish the outcome of *load*: cache the data, wake its waiters."""
        if data is not None:
            self.cache.put(cid, data)
            load.data = data
        if self._loading.get(cid) is load:
            del self._loading[cid]
        load.done.set()

    def _report(self, inode: int, chunk_id: bytes, exc: Exception) -> None:
        if chunk_id in self._reported:
            return
        self._reported.add(chunk_id)
        log.error(
            "Chunk %s of inode %d cannot be read (%s); reads of it fail with EIO. "
            "Run `buildatfs fsck --verify-data` on the store.",
            chunk_id.hex(),
            inode,
            exc,
        )


@dataclasses.dataclass(slots=True, eq=False)
class _Load:
    """A chunk that a worker thread is loading; *data* is set if it succeeded."""

    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    data: bytes | None = None


def load_batch_sync(
    store: Store, batch: list[tuple[bytes, Chunk | None]]
) -> list[bytes | Exception]:
    """Load every chunk of *batch*; each one's data, or the exception it raised."""
    out: list[bytes | Exception] = []
    for chunk_id, chunk in batch:
        try:
            out.append(load_chunk_sync(store, chunk_id, chunk))
        except Exception as exc:
            out.append(exc)
    return out


def _prefetch_sync(
    store: Store,
    batch: list[tuple[bytes, Chunk | None]],
    token: trio.lowlevel.TrioToken,
    publish: Callable[[bytes, bytes | None], None],
) -> None:
    """Load the chunks of *batch* in order, handing each one's data (None if
    it failed) to *publish* in the trio thread without waiting for it."""
    for chunk_id, chunk in batch:
        try:
            data: bytes | None = load_chunk_sync(store, chunk_id, chunk)
        except Exception:
            data = None
        token.run_sync_soon(publish, chunk_id, data)


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
