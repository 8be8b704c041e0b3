"""The write path's second half: staged bytes to chunks, packs and extents.

Committing a file re-chunks only the regions its writes touched, widened to
the committed extents they overlap (content-defined boundaries fall back in
step within a chunk or two, so a write into a large file costs in proportion
to the write). Chunking, hashing and compression run in worker threads; the
index changes in one LMDB write transaction at the end, after the chunk
records are in a pack ("data before references").

A small overwrite inside committed data (less than an average chunk) is not
widened: its bytes become a chunk of their own and the old extents are split
around it, which costs the write's size instead of a whole chunk's. That
leaves the file fragmented (extents naming parts of chunks, chunks below the
minimum size, dedup boundaries out of step), so once the file has been quiet
for a while `defragment` re-chunks those regions with widening, and the old
chunks' unused parts become garbage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

import lmdb
import trio

from buildatfs import codec, faults
from buildatfs.chunker import Chunker
from buildatfs.reader import Reader
from buildatfs.schema import Extent
from buildatfs.staging import DirtyFile, Ranges
from buildatfs.store import Store

log = logging.getLogger(__name__)

WINDOW: Final = 8 * 1024 * 1024
INLINE_LIMIT: Final = 256 * 1024  # bytes below which chunking or compressing stays inline
PARALLEL_SHARE: Final = 1024 * 1024  # compress in parallel only shares at least this big
LARGE_AT_ONCE: Final = 2  # regions of more than a window chunked at the same time, at most

T = TypeVar("T")
_RETRIES: Final = 5


@dataclasses.dataclass(slots=True)
class Stored:
    """A chunk record this commit appended to a pack."""

    place: tuple[int, int]
    record_len: int
    raw_len: int


@dataclasses.dataclass(slots=True)
class Plan:
    """What one commit will write into the index."""

    regions: list[tuple[int, int]]
    fragmenting: bool = False  # some region is a small overwrite, not widened
    extents: list[tuple[int, bytes, int]] = dataclasses.field(default_factory=list)
    stored: dict[bytes, Stored] = dataclasses.field(default_factory=dict)


class ChunkVanished(Exception):
    """A chunk this commit deduplicated against was deleted meanwhile."""


class Committer:
    def __init__(self, store: Store, reader: Reader, limiter: trio.CapacityLimiter) -> None:
        self.store = store
        self.reader = reader
        self.limiter = limiter
        self.chunker = Chunker(store.params)
        # Large regions hold windows of WINDOW bytes and their compressed
        # records; two at a time keep both cores busy, more only cost memory.
        self.large = trio.CapacityLimiter(LARGE_AT_ONCE)
        self._next_ticket = 0
        self._running: set[int] = set()
        # Chunks that a running commit is storing or has stored but not yet
        # indexed: a concurrent commit of the same bytes waits for and
        # shares that record instead of writing it a second time.
        self._storing: dict[bytes, trio.Event] = {}
        self._unindexed: dict[bytes, Stored] = {}
        # inode -> time.monotonic() of the last commit that left fragments;
        # the index keeps the set across restarts (schema.py), so a file left
        # fragmented at unmount is re-chunked after the next mount.
        with store.env.begin() as txn:
            waiting = store.fragmented_inodes(txn)
        self.fragmented: dict[int, float] = dict.fromkeys(waiting, time.monotonic())

    async def commit(
        self,
        inode: int,
        dirty: DirtyFile | None,
        ranges: Ranges,
        size: int,
        *,
        split: bool = True,
    ) -> bool:
        """Commit the staged *ranges* of *dirty*, with the file at *size*, into
        the index; the caller holds the inode's lock, so no truncation or other
        commit runs meanwhile (writes may). With *split* false, every range is
        widened to whole chunks, small overwrites too.

        Returns False if the inode no longer exists (its data is then dead).
        Awaits worker threads; raises ChunkError if old data cannot be read.
        """
        ticket = self._next_ticket
        self._next_ticket += 1
        self._running.add(ticket)
        owned: set[bytes] = set()
        try:
            return await self._commit(inode, dirty, ranges, size, owned, split)
        finally:
            self._running.discard(ticket)
            # Records this commit stored that no commit indexed (the inode
            # went away, or the commit failed) are dead.
            orphaned = [self._unindexed.pop(cid) for cid in owned if cid in self._unindexed]
            if orphaned:
                self.store.disown([(s.place, s.record_len) for s in orphaned])

    async def settle(self) -> None:
        """Wait until every commit that started before this call has finished."""
        horizon = self._next_ticket
        while self._running and min(self._running) < horizon:
            await trio.sleep(0.05)

    async def _commit(
        self,
        inode: int,
        dirty: DirtyFile | None,
        ranges: Ranges,
        size: int,
        owned: set[bytes],
        split: bool,
    ) -> bool:
        for _ in range(_RETRIES):
            with self.store.env.begin() as txn:
                if self.store.get_inode(txn, inode) is None:
                    return False
                plan = self._plan(txn, inode, ranges, size, split)
            for start, end in plan.regions:
                gate = self.large if end - start > WINDOW else contextlib.nullcontext()
                async with gate:
                    await self._chunk_region(inode, dirty, start, end, plan, owned)
            faults.point("commit:chunks-written")
            indexed: set[bytes] = set()
            try:
                with self.store.env.begin(write=True) as txn:
                    applied = self._apply(txn, inode, size, plan, indexed)
            except ChunkVanished:
                log.debug("A chunk vanished during the commit of inode %d; retrying", inode)
                continue
            for cid in indexed:
                del self._unindexed[cid]
            if applied and plan.fragmenting:
                self.fragmented[inode] = time.monotonic()
            return applied
        raise RuntimeError(f"commit of inode {inode} kept racing with deletions")

    def _plan(
        self, txn: lmdb.Transaction, inode: int, ranges: Ranges, size: int, split: bool
    ) -> Plan:
        """Widen each dirty range to the committed extents it overlaps, except
        (with *split*) small overwrites that lie inside committed data."""
        plan = Plan([])
        small = self.chunker.params.avg_size
        for start, end in ranges:
            first = next(self.store.extents(txn, inode, start, start + 1), None)
            last = next(self.store.extents(txn, inode, end - 1, end), None)
            if split and end - start < small and first is not None and last is not None:
                plan.fragmenting = True
            else:
                if first is not None:
                    start = min(start, first[0])
                if last is not None:
                    end = max(end, last[0] + last[1].length)
            end = min(end, size)
            regions = plan.regions
            if regions and start <= regions[-1][1]:
                regions[-1] = (regions[-1][0], max(end, regions[-1][1]))
            elif start < end:
                regions.append((start, end))
        return plan

    def _fragments_sync(self, inode: int, size: int) -> Ranges:
        with self.store.env.begin() as txn:
            return self.fragments(txn, inode, size)

    def fragments(self, txn: lmdb.Transaction, inode: int, size: int) -> Ranges:
        """The parts of a file that small overwrites left fragmented: extents
        naming part of a chunk, and chunks below the minimum size that are not
        the file's tail, each with one neighbouring extent on either side so
        that re-chunking falls back onto content-defined boundaries."""
        out = Ranges()
        extents = list(self.store.extents(txn, inode, 0, size))
        for i, (_, ext) in enumerate(extents):
            chunk = self.store.get_chunk(txn, ext.chunk_id)
            if chunk is None:
                continue  # fsck's business; re-chunking could not read it
            partial = ext.chunk_offset != 0 or ext.length != chunk.raw_len
            tiny = chunk.raw_len < self.chunker.params.min_size and i + 1 < len(extents)
            if partial or tiny:
                lo = extents[max(i - 1, 0)][0]
                hi_offset, hi_ext = extents[min(i + 1, len(extents) - 1)]
                out.add(lo, hi_offset + hi_ext.length)
        return out

    async def defragment(self, inode: int) -> None:
        """Re-chunk the fragmented parts of *inode*'s committed data with
        widening. The caller holds the inode's lock and has no staged data of
        it: the bytes re-chunked are the committed ones."""
        self.fragmented.pop(inode, None)
        with self.store.env.begin() as txn:
            rec = self.store.get_inode(txn, inode)
        if rec is not None:
            # A large file has many extents to look at: not on the trio thread.
            ranges = await trio.to_thread.run_sync(self._fragments_sync, inode, rec.size)
            if ranges and await self.commit(inode, None, ranges, rec.size, split=False):
                log.info(
                    "Re-chunked %d bytes of inode %d that small overwrites had fragmented.",
                    ranges.total,
                    inode,
                )
        if inode not in self.fragmented:  # (no small overwrite came meanwhile)
            with self.store.env.begin(write=True) as txn:
                self.store.set_fragmented(txn, inode, False)

    async def current_bytes(
        self, inode: int, dirty: DirtyFile | None, start: int, end: int, prefix: bytes = b""
    ) -> bytearray:
        """Return *prefix* followed by the file's bytes [start, end): committed
        data overlaid with staged data."""
        buf = bytearray(len(prefix) + end - start)
        buf[: len(prefix)] = prefix
        view = memoryview(buf)[len(prefix) :]
        if dirty is None or not dirty.covers(start, end):
            with self.store.env.begin() as txn:
                pieces = self.reader.plan(txn, inode, start, end)
            await self.reader.fill(inode, start, view, pieces)
        if dirty is not None:
            dirty.overlay(start, view)
        return buf

    async def _chunk_region(
        self,
        inode: int,
        dirty: DirtyFile | None,
        start: int,
        end: int,
        plan: Plan,
        owned: set[bytes],
    ) -> None:
        """Cut [start, end) into chunks, store the new ones, add extents to *plan*.

        A pipeline of two steps: while one window's new chunks are compressed
        and appended, the next window is read and cut, so that no core waits
        for the other step.
        """
        send, receive = trio.open_memory_channel[tuple[int, list]](1)

        async def cut_windows() -> None:
            async with send:
                buf_start, carry = start, b""
                while buf_start < end:
                    fresh_start = buf_start + len(carry)
                    fresh_end = min(fresh_start + WINDOW, end)
                    buf = await self.current_bytes(inode, dirty, fresh_start, fresh_end, carry)
                    pieces = await self._offload(self.chunker.cut_sync, buf, size=len(buf))
                    if fresh_end < end and len(pieces) > 1:
                        last = pieces.pop()
                        carry = bytes(last.data)
                        next_start = buf_start + last.offset
                    else:
                        carry, next_start = b"", fresh_end
                    await send.send((buf_start, pieces))
                    buf_start = next_start

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cut_windows)
            async with receive:
                async for buf_start, pieces in receive:
                    await self._store_new(pieces, plan, owned)
                    for piece in pieces:
                        if piece.chunk_id is not None:
                            plan.extents.append(
                                (buf_start + piece.offset, piece.chunk_id, len(piece.data))
                            )

    async def _store_new(self, pieces: list, plan: Plan, owned: set[bytes]) -> None:
        """Store the chunks of *pieces* that neither the index nor another
        running commit has; record in *plan* where each stored chunk lies."""
        while True:
            new, busy = {}, []
            with self.store.env.begin() as txn:
                for piece in pieces:
                    cid = piece.chunk_id
                    if cid is None or cid in plan.stored or cid in new:
                        continue
                    shared = self._unindexed.get(cid)
                    if shared is not None:
                        plan.stored[cid] = shared
                    elif cid in self._storing:
                        busy.append(self._storing[cid])
                    elif self.store.get_chunk(txn, cid) is None:
                        new[cid] = piece.data
            if not busy:
                break
            for event in busy:
                await event.wait()
        if not new:
            return
        for cid in new:
            self._storing[cid] = trio.Event()
        try:
            places = await self._encode_append(new)
            plan.stored.update(places)
            self._unindexed.update(places)
            owned.update(places)
        finally:
            for cid in new:
                self._storing.pop(cid).set()

    async def _offload(self, fn: Callable[..., T], *args: Any, size: int) -> T:
        """Run *fn* in a worker thread, or right here if its input is small.

        Handing work to a thread costs more than hashing or compressing a few
        KiB, and most files in a container image are that small.
        """
        if size <= INLINE_LIMIT:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def _encode_append(self, new: dict[bytes, bytes]) -> dict[bytes, Stored]:
        """Compress *new* chunks, on every worker thread at once when there is
        enough of them, and append the records to the open pack."""
        ids = list(new)
        size = sum(len(data) for data in new.values())
        shares = max(1, min(self.limiter.total_tokens, size // PARALLEL_SHARE))
        parts = [ids[i::shares] for i in range(shares)]
        encoded: list[list[bytes]] = [[] for _ in parts]

        async def encode(i: int) -> None:
            encoded[i] = await self._offload(_encode_sync, parts[i], new, size=size // shares)

        async with trio.open_nursery() as nursery:
            for i in range(shares):
                nursery.start_soon(encode, i)
        ids = [cid for part in parts for cid in part]
        records = [record for part in encoded for record in part]
        places = await self._offload(self.store.packs.append_sync, records, size=size)
        return {
            cid: Stored(place, len(record), len(new[cid]))
            for cid, record, place in zip(ids, records, places, strict=True)
        }

    def _apply(
        self,
        txn: lmdb.Transaction,
        inode: int,
        size: int,
        plan: Plan,
        indexed: set[bytes],
    ) -> bool:
        """Write *plan* into the index: references first, then the old extents go.

        A record is indexed by the first commit that applies it, whether it
        stored the record or shared it; *indexed* collects those, which the
        caller takes out of ``_unindexed`` once the transaction has committed.
        Later commits that share it count as references to the indexed chunk,
        so a record is never indexed again after its chunk died (its bytes are
        counted dead by then). A record nobody indexed is counted dead by the
        commit that stored it, when it ends.
        """
        store = self.store
        rec = store.get_inode(txn, inode)
        if rec is None:
            return False  # `commit` counts the records it stored as dead
        for _, cid, _ in plan.extents:
            stored = plan.stored.get(cid)
            first = stored is not None and self._unindexed.get(cid) is stored
            if first and cid not in indexed:
                store.add_chunk(txn, cid, stored.place, stored.record_len, stored.raw_len)
                indexed.add(cid)
            elif store.get_chunk(txn, cid) is None:
                raise ChunkVanished(cid)
            else:
                store.incref(txn, cid)
        lost = sum(store.drop_extents(txn, inode, start, end) for start, end in plan.regions)
        for offset, cid, length in plan.extents:
            store.put_extent(txn, inode, offset, Extent(cid, 0, length))
        rec.allocated += sum(length for _, _, length in plan.extents) - lost
        if plan.fragmenting:
            store.set_fragmented(txn, inode, True)
        if size != rec.size:
            store.set_size(txn, inode, rec, size)
        store.put_inode(txn, inode, rec)
        return True


def _encode_sync(ids: list[bytes], chunks: dict[bytes, bytes]) -> list[bytes]:
    return [codec.encode_sync(cid, chunks[cid]) for cid in ids]
