"""Reading back every chunk of a store, mounted or not, and naming what is damaged.

`scrub` walks the ``chunks`` sub-database in batches, each in its own short
read transaction (a long one would keep a mounted daemon's LMDB from reusing
pages), reads each chunk's record from its pack in pack order and checks it
with `Store.read_chunk_sync`. Reading is paced to a rate in bytes per second so
that a scrub beside a busy mount leaves it disk time.

Garbage collection in a mounted daemon may move a chunk and delete its pack
meanwhile: a failed read looks the chunk up again and retries once, and a
chunk that has been deleted since its batch was listed is skipped, not
reported. Chunks added after the scrub passed their place in key order are
not checked; the next scrub checks them.

Each damaged chunk is reported with the files that use it, named by every
path they have (paths.Tree), from one scan of ``extents`` at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Final

from buildatfs.errors import ChunkError, ChunkMissing
from buildatfs.paths import Tree, users_of
from buildatfs.schema import Chunk
from buildatfs.store import Store

log = logging.getLogger(__name__)

DEFAULT_RATE: Final = 100 * 1024 * 1024
BATCH: Final = 2048


@dataclasses.dataclass
class FileUse:
    inode: int
    paths: list[str]  # empty for an unlinked file that is still open
    offsets: list[int]


@dataclasses.dataclass
class Damage:
    chunk_id: str  # hex
    pack: int
    offset: int
    error: str
    files: list[FileUse] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Progress:
    chunks: int = 0
    bytes_read: int = 0  # stored (record) bytes read from packs
    raw_bytes: int = 0
    total_chunks: int = 0
    total_bytes: int = 0
    damaged: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class Report:
    chunks: int
    bytes_read: int
    raw_bytes: int
    seconds: float
    damaged: list[Damage]


def scrub(
    store: Store, rate: float = DEFAULT_RATE, progress: Callable[[Progress], None] | None = None
) -> Report:
    """Verify every chunk of *store*; blocks for as long as that takes.

    *rate* bounds the stored bytes read per second (0: no bound). *progress*
    is called after each chunk.
    """
    state = Progress()
    with store.env.begin() as txn:
        state.total_chunks = store.counters(txn)["chunks"]
        size, dead = store.stored_bytes(txn)
        state.total_bytes = size - dead
    damaged: list[Damage] = []
    after = b""
    while True:
        batch = _list_batch(store, after)
        if not batch:
            break
        after = batch[-1][0]
        batch.sort(key=lambda item: (item[1].pack, item[1].offset))
        for chunk_id, chunk in batch:
            problem = _check_sync(store, chunk_id, chunk, state)
            if problem is not None:
                damaged.append(problem)
                state.damaged += 1
            _pace(state, rate)
            if progress is not None:
                progress(state)  # cheap: the caller decides how often to show it
    _name_users(store, damaged)
    return Report(
        state.chunks, state.bytes_read, state.raw_bytes, time.monotonic() - state.started, damaged
    )


def _list_batch(store: Store, after: bytes) -> list[tuple[bytes, Chunk]]:
    """Return up to BATCH (chunk id, record) pairs with ids greater than *after*."""
    batch = []
    with store.env.begin() as txn:
        cur = txn.cursor(db=store.dbs["chunks"])
        if not cur.set_range(after):
            return batch
        for key, value in cur:
            if key == after:
                continue
            batch.append((bytes(key), Chunk.unpack(value)))
            if len(batch) >= BATCH:
                break
    return batch


def _check_sync(
    store: Store, chunk_id: bytes, chunk: Chunk, state: Progress, retried: bool = False
) -> Damage | None:
    """Read and verify one chunk; return its Damage, or None if it is sound or gone."""
    try:
        data = store.read_chunk_sync(chunk_id, chunk)
    except ChunkError as exc:
        # Garbage collection may have moved it, or it was deleted: look again.
        with store.env.begin() as txn:
            now = store.get_chunk(txn, chunk_id)
        if now is None:
            return None
        if not retried and (now.pack, now.offset) != (chunk.pack, chunk.offset):
            return _check_sync(store, chunk_id, now, state, retried=True)
        state.chunks += 1
        state.bytes_read += chunk.record_len
        kind = "missing" if isinstance(exc, ChunkMissing) else "corrupt"
        log.debug("Chunk %s is %s: %s", chunk_id.hex(), kind, exc)
        return Damage(chunk_id.hex(), chunk.pack, chunk.offset, f"{kind}: {exc}")
    state.chunks += 1
    state.bytes_read += chunk.record_len
    state.raw_bytes += len(data)
    return None


def _pace(state: Progress, rate: float) -> None:
    """Sleep until reading state.bytes_read bytes has taken at least bytes/rate s."""
    if rate <= 0:
        return
    ahead = state.bytes_read / rate - (time.monotonic() - state.started)
    if ahead > 0.01:
        time.sleep(ahead)


def _name_users(store: Store, damaged: list[Damage]) -> None:
    """Fill in the files (and all their paths) that use each damaged chunk."""
    if not damaged:
        return
    with store.env.begin() as txn:
        users = users_of(store, txn, (bytes.fromhex(d.chunk_id) for d in damaged))
        tree = Tree.load(store, txn)
    for damage in damaged:
        for inode, offsets in sorted(users[bytes.fromhex(damage.chunk_id)].items()):
            paths = [p.decode("utf-8", "backslashreplace") for p in tree.paths(inode)]
            damage.files.append(FileUse(inode, paths, sorted(offsets)))


def to_json(report: Report) -> dict:
    return dataclasses.asdict(report) | {
        "seconds": round(report.seconds, 3),
        "ok": not report.damaged,
    }


def render(report: Report) -> str:
    """The report for a person: a summary line, then each damaged chunk and its files."""
    lines = [
        f"Scrubbed {report.chunks} chunks ({_mib(report.bytes_read)} stored, "
        f"{_mib(report.raw_bytes)} verified) in {report.seconds:.1f} s: "
        + (f"{len(report.damaged)} damaged." if report.damaged else "no damage found.")
    ]
    for damage in report.damaged:
        lines.append(
            f"Damaged chunk {damage.chunk_id} (pack {damage.pack}, offset "
            f"{damage.offset}): {damage.error}"
        )
        if not damage.files:
            lines.append("  used by no file")
        for use in damage.files:
            where = ", ".join(str(o) for o in use.offsets[:8])
            more = f" and {len(use.offsets) - 8} more" if len(use.offsets) > 8 else ""
            names = use.paths or [f"<unlinked inode {use.inode}>"]
            for name in names:
                lines.append(f"  {name}  (inode {use.inode}, at offset {where}{more})")
    if report.damaged:
        lines.append(
            "Reads of these ranges fail with EIO. Restore the files named above from "
            "a backup (or pull or rebuild the images); `buildatfs fsck --verify-data "
            "STORE` lists the same damage."
        )
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def describe(state: Progress) -> str:
    """The progress line's text."""
    share = state.bytes_read / state.total_bytes if state.total_bytes else 1.0
    elapsed = max(time.monotonic() - state.started, 1e-6)
    return (
        f"{state.chunks}/{state.total_chunks} chunks, {_mib(state.bytes_read)} of "
        f"{_mib(state.total_bytes)} ({share:.0%}), {state.bytes_read / elapsed / (1 << 20):.0f}"
        f" MiB/s, {state.damaged} damaged"
    )
