"""Compaction: cold chunks re-encoded small, with a dictionary of the store's own.

The write path compresses each new chunk alone at zstd level 3, because it
must keep up with writers. Alone, a chunk of a few KiB compresses poorly: the
compressor starts every chunk knowing nothing. Compaction takes that back once
the data is cold. A pass:

1. trains a zstd dictionary on a sample of the store's chunks, if the store
   has none yet and holds enough chunks to learn from, keeps it in the index
   (``meta`` ``dict:<id>``) and syncs the index, so that the dictionary is
   durable before any record names it;
2. picks sealed packs in which live records written by the write path
   (codec 1) make up at least `CANDIDATE_SHARE` of the pack;
3. rewrites each such pack the way garbage collection does (gc.py, with its
   crash rules), re-encoding each of those records at `codec.COMPACT_LEVEL`
   with the dictionary (codec 2) on every worker thread at once; records
   that are raw or compacted already are copied as they are.

Reads need nothing new: a compacted record is a zstd frame that names its
dictionary, and decompresses as fast as any other. A record that fails its
check while being compacted is copied as it is, for scrub and fsck to report.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Awaitable, Callable
from typing import Final

import trio
import zstandard

from buildatfs import codec, gc
from buildatfs.errors import ChunkError
from buildatfs.schema import Chunk, read_pair, read_u64
from buildatfs.store import Store

log = logging.getLogger(__name__)

CANDIDATE_SHARE: Final = 0.25
DICT_SIZE: Final = 1024 * 1024
MIN_CHUNKS: Final = 256  # fewer chunks than this teach a dictionary too little
SAMPLE_CHUNKS: Final = 8000
SAMPLE_BYTES: Final = 16 * 1024  # of each sampled chunk, its first bytes


def _sample_sync(store: Store) -> list[bytes]:
    """Up to SAMPLE_CHUNKS chunks spread over the index, their first bytes each."""
    with store.env.begin() as txn:
        entries = [(key, Chunk.unpack(value)) for key, value in txn.cursor(db=store.dbs["chunks"])]
    if len(entries) < MIN_CHUNKS:
        return []
    picked = random.Random(len(entries)).sample(entries, min(SAMPLE_CHUNKS, len(entries)))
    samples = []
    for chunk_id, chunk in picked:
        try:
            samples.append(store.read_chunk_sync(chunk_id, chunk)[:SAMPLE_BYTES])
        except (ChunkError, OSError):
            continue  # moved or damaged meanwhile: one sample fewer
    return samples


async def ensure_dictionary(store: Store) -> int | None:
    """Return the id of the store's newest dictionary, training one first if
    there is none and the store has enough chunks; None if not yet."""
    newest = store.dicts.newest()
    if newest is not None:
        return newest
    samples = await trio.to_thread.run_sync(_sample_sync, store)
    if len(samples) < MIN_CHUNKS:
        return None
    try:
        trained = await trio.to_thread.run_sync(
            lambda: zstandard.train_dictionary(DICT_SIZE, samples)
        )
    except zstandard.ZstdError as exc:
        log.info("Cannot train a compression dictionary yet (%s); compacting without one.", exc)
        return None
    dict_id = trained.dict_id()
    with store.env.begin(write=True) as txn:
        store.put_dictionary(txn, dict_id, trained.as_bytes())
    await trio.to_thread.run_sync(store.sync_sync)
    log.info("Trained compression dictionary %d on %d chunks.", dict_id, len(samples))
    return dict_id


def _worth_compacting_sync(store: Store, pack: int) -> bool:
    with store.env.begin() as txn:
        size, _ = store.pack_record(txn, pack)
    if not size:
        return False
    live = gc.live_records(store, pack, gc.scan_sync(store, pack, size))
    fresh = sum(length for _, _, length, kind in live if kind == codec.CODEC_ZSTD)
    return fresh >= CANDIDATE_SHARE * size


class Compactor:
    """Compaction passes over one store; remembers the packs it found compact
    already, so that background passes do not scan them again."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.compact_packs: set[int] = set()
        self._damaged: set[bytes] = set()

    def sealed_packs(self) -> list[int]:
        current = self.store.packs.current
        with self.store.env.begin() as txn:
            packs = [
                read_u64(key)
                for key, value in txn.cursor(db=self.store.dbs["packs"])
                if read_pair(value)[0]
            ]
        return [p for p in packs if p != current and p not in self.compact_packs]

    async def run(
        self,
        rate: float | None,
        settle: Callable[[], Awaitable[None]] | None = None,
        max_packs: int | None = None,
        seal_from: int | None = 0,
        progress: Callable[[tuple[int, int]], None] | None = None,
    ) -> gc.Report:
        """Compact up to *max_packs* packs (None: all that qualify). The open
        pack is sealed first, and so compacted too, if it holds at least
        *seal_from* bytes (None: never). *progress* is called with (packs
        looked at, packs in all) after each pack.

        Only packs sealed when the pass starts are looked at, and *settle*
        must then wait until every commit that started before has finished:
        such a commit may have records in a pack that was rotated out under
        it, which the index does not name yet.
        """
        total = gc.Report()
        current = self.store.packs.current
        if current is not None and seal_from is not None:
            with self.store.env.begin() as txn:
                if self.store.pack_record(txn, current)[0] >= seal_from:
                    self.store.packs.seal()
        packs = self.sealed_packs()
        if settle is not None:
            await settle()
        dict_id = await ensure_dictionary(self.store)
        threads = max(1, min(2, os.cpu_count() or 1))
        for done, pack in enumerate(packs, 1):
            if max_packs is not None and total.packs_removed >= max_packs:
                break
            if await trio.to_thread.run_sync(_worth_compacting_sync, self.store, pack):
                transform = self._transform(dict_id)
                total.add(await gc.collect_pack(self.store, pack, rate, transform, threads))
            else:
                self.compact_packs.add(pack)
            if progress is not None:
                progress((done, len(packs)))
        if total.packs_removed:
            log.info(
                "Compaction rewrote %d pack(s), %d chunk(s), freed %d bytes.",
                total.packs_removed,
                total.chunks_moved,
                total.freed_bytes,
            )
        return total

    def _transform(self, dict_id: int | None) -> gc.Transform:
        store = self.store

        def recompress(chunk_id: bytes, record: bytes) -> bytes:
            try:
                if codec.parse_header(record)[0] != codec.CODEC_ZSTD:
                    return record
                data = codec.decode_sync(chunk_id, record, store.dicts)
            except ChunkError as exc:
                if chunk_id not in self._damaged:
                    self._damaged.add(chunk_id)
                    log.error(
                        "Chunk %s is damaged (%s); compaction keeps it as it is. "
                        "Run `buildatfs fsck --verify-data`.",
                        chunk_id.hex(),
                        exc,
                    )
                return record
            return codec.compact_sync(chunk_id, data, store.dicts, dict_id)

        return recompress
