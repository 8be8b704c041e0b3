"""Giving back the space of deleted data: rewriting packs that are mostly dead.

A chunk whose refcount drops to zero leaves its record in its pack as dead
bytes (schema.py). A pack whose dead share reaches `DEAD_SHARE` is collected:
its live records are copied verbatim to the open pack, the index is pointed at
the copies, and the old pack is deleted. The order keeps "data before
references" and never loses a live record:

1. copy the live records and flush the pack store (copies are durable);
2. in one write transaction, point each chunk that still lives at the old
   place to its copy, and forget the old pack;
3. sync the index, then delete the old pack file.

A crash after 1 leaves unnamed copies that recovery cuts off; after 2, a pack
file the index no longer names, which recovery deletes. A chunk that died or
moved while its record was being copied keeps its index entry, and the copy is
counted as dead. Reads that planned with the old place retry once (reader.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import trio

from buildatfs import codec, faults
from buildatfs.errors import ChunkCorrupt
from buildatfs.schema import read_pair, read_u64, u64
from buildatfs.store import Store

log = logging.getLogger(__name__)

DEAD_SHARE: Final = 0.5
RATE: Final = 64 * 1024 * 1024  # bytes copied per second at most, in the background
BATCH: Final = 4 * 1024 * 1024


@dataclasses.dataclass
class Report:
    packs_removed: int = 0
    chunks_moved: int = 0
    bytes_moved: int = 0
    freed_bytes: int = 0

    def add(self, other: Report) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


def candidates(store: Store, share: float = DEAD_SHARE) -> list[int]:
    """Return the packs with dead bytes making up at least *share* of them,
    deadest first (share 0: every pack with any dead byte)."""
    found = []
    with store.env.begin() as txn:
        for key, value in txn.cursor(db=store.dbs["packs"]):
            size, dead = read_pair(value)
            if size == 0 or (dead and dead / size >= share):
                found.append((dead / size if size else 1.0, read_u64(key)))
    return [pack for _, pack in sorted(found, reverse=True)]


def scan_sync(store: Store, pack: int, size: int) -> list[tuple[int, bytes, int, int]]:
    """Return (offset, chunk id, record length, codec) of every record in *pack*."""
    records = []
    offset = 0
    while offset + codec.HEADER.size <= size:
        header = store.packs.read_sync(pack, offset, codec.HEADER.size)
        try:
            kind, _, body_len, chunk_id = codec.parse_header(header)
        except ChunkCorrupt:
            log.error(
                "Pack %d has a damaged record header at offset %d; the rest of it "
                "is not collected. Run `buildatfs fsck --verify-data`.",
                pack,
                offset,
            )
            return []
        length = codec.HEADER.size + body_len
        records.append((offset, chunk_id, length, kind))
        offset += length
    return records


def live_records(
    store: Store, pack: int, records: list[tuple[int, bytes, int, int]]
) -> list[tuple[int, bytes, int, int]]:
    """The records of *pack* that the chunk index names."""
    with store.env.begin() as txn:
        live = []
        for record in records:
            chunk = store.get_chunk(txn, record[1])
            if chunk is not None and chunk.pack == pack and chunk.offset == record[0]:
                live.append(record)
    return live


Transform = Callable[[bytes, bytes], bytes]


def _read_sync(
    store: Store, pack: int, batch: list[tuple[int, bytes, int, int]], transform: Transform | None
) -> list[bytes]:
    records = [store.packs.read_sync(pack, offset, length) for offset, _, length, _ in batch]
    if transform is not None:
        records = [transform(cid, rec) for (_, cid, _, _), rec in zip(batch, records, strict=True)]
    return records


async def _read_batch(
    store: Store,
    pack: int,
    batch: list[tuple[int, bytes, int, int]],
    transform: Transform | None,
    threads: int,
) -> tuple[list[tuple[int, bytes, int, int]], list[bytes]]:
    """Read (and transform) *batch* in *threads* worker threads at once;
    return the batch in the order of the records read, and the records."""
    shares = [batch[j::threads] for j in range(threads)]
    outputs: list[list[bytes]] = [[] for _ in shares]

    async def run_share(j: int) -> None:
        outputs[j] = await trio.to_thread.run_sync(_read_sync, store, pack, shares[j], transform)

    async with trio.open_nursery() as nursery:
        for j in range(threads):
            nursery.start_soon(run_share, j)
    return [rec for share in shares for rec in share], [rec for out in outputs for rec in out]


async def collect_pack(
    store: Store,
    pack: int,
    rate: float | None = RATE,
    transform: Transform | None = None,
    threads: int = 1,
) -> Report:
    """Move the live records of *pack* to the open pack and delete it.

    *transform* (chunk id, record) -> record, if given, re-encodes each record
    on the way, in *threads* worker threads at once (compaction). Awaits
    worker threads; reads at most *rate* bytes per second (None: no limit).
    """
    with store.env.begin() as txn:
        size, _ = store.pack_record(txn, pack)
    records = await trio.to_thread.run_sync(scan_sync, store, pack, size)
    if not records and size:
        return Report()
    live = live_records(store, pack, records)
    moved: list[tuple[int, bytes, int, tuple[int, int]]] = []
    started = time.monotonic()
    read = copied = 0
    indexed = False
    try:
        for i in range(0, len(live), 64):
            batch, new_records = await _read_batch(
                store, pack, live[i : i + 64], transform, threads
            )
            places = await trio.to_thread.run_sync(store.packs.append_sync, new_records)
            moved += [
                (offset, cid, len(rec), place)
                for (offset, cid, _, _), rec, place in zip(batch, new_records, places, strict=True)
            ]
            read += sum(length for _, _, length, _ in batch)
            copied += sum(len(rec) for rec in new_records)
            if rate:
                await trio.sleep(max(0.0, read / rate - (time.monotonic() - started)))
        await trio.to_thread.run_sync(store.packs.flush_sync)
        faults.point("gc:copied")
        with store.env.begin(write=True) as txn:
            for offset, chunk_id, length, (new_pack, new_offset) in moved:
                store.note_pack_end(txn, new_pack, new_offset + length)
                chunk = store.get_chunk(txn, chunk_id)
                if chunk is not None and chunk.pack == pack and chunk.offset == offset:
                    chunk.pack, chunk.offset, chunk.record_len = new_pack, new_offset, length
                    txn.put(chunk_id, chunk.pack_value(), db=store.dbs["chunks"])
                else:
                    store.add_dead(txn, new_pack, length)
            size, _ = store.pack_record(txn, pack)
            txn.delete(u64(pack), db=store.dbs["packs"])
        indexed = True
    finally:
        if not indexed and moved:  # cut short by an unmount or an error
            store.disown([(place, length) for _, _, length, place in moved])
    report = Report(packs_removed=1, chunks_moved=len(moved), bytes_moved=copied)
    await trio.to_thread.run_sync(store.sync_sync)
    faults.point("gc:index-updated")
    store.packs.delete_sync(pack)
    report.freed_bytes = size - copied
    return report


async def run_pass(
    store: Store,
    rate: float | None = RATE,
    share: float = DEAD_SHARE,
    settle: Callable[[], Awaitable[None]] | None = None,
) -> Report:
    """Collect every pack whose dead share is at least *share*.

    If the open pack qualifies it is sealed first. *settle* must wait until
    every commit that started before has finished: such a commit may have
    records that the index does not name yet in a chosen pack (the open one,
    or one that was rotated out under it).
    """
    total = Report()
    packs = candidates(store, share)
    if store.packs.current in packs:
        store.packs.seal()
    if packs and settle is not None:
        await settle()
    for pack in packs:
        total.add(await collect_pack(store, pack, rate))
    if total.packs_removed:
        log.info(
            "Garbage collection removed %d pack(s), moved %d chunk(s), freed %d bytes.",
            total.packs_removed,
            total.chunks_moved,
            total.freed_bytes,
        )
    return total


REPORT_FILE: Final = "gc-report.json"


def write_report(store: Store, report: Report) -> None:
    """Publish the result of a forced pass for `buildatfs gc` to pick up."""
    data = dict(dataclasses.asdict(report), finished_ns=time.time_ns())
    tmp = store.path / (REPORT_FILE + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, store.path / REPORT_FILE)


def read_report(store_path: Path) -> dict | None:
    try:
        return json.loads((store_path / REPORT_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
