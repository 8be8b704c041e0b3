"""Predicting what a store would hold for an existing directory, without writing.

`estimate` walks the regular files below a directory (symlinks are not
followed, other file systems mounted below it are not entered, a hard-linked
inode counts once), cuts each one as a commit would (FastCDC over each data
segment, in 8 MiB windows carrying the last piece over; all-zero chunks
become holes), hashes every chunk, and compresses each chunk not seen before
with the store's own `codec.encode_sync`, summing the record sizes. Every
unique chunk is compressed, no sampling: the prediction is what a fresh
store's packs would hold after a copy that keeps holes (`cp -a`, `tar`),
short of the rare record two concurrent commits both write.

Work runs in one thread per core; zstd and blake3 release the GIL.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from buildatfs import codec
from buildatfs.chunker import DEFAULT_PARAMS, Chunker, ChunkerParams
from buildatfs.commit import WINDOW  # cut as commits cut, window for window
from buildatfs.stats import human_size, ratio

log = logging.getLogger(__name__)

_PENDING: Final = 64


@dataclasses.dataclass
class Estimate:
    files: int = 0
    logical_bytes: int = 0  # sizes of regular files, each inode once
    data_bytes: int = 0  # bytes read: the files' data segments
    hole_bytes: int = 0  # all-zero chunks, stored as holes
    chunks: int = 0  # unique chunks
    unique_bytes: int = 0
    stored_bytes: int = 0  # chunk records (header and body) of the unique chunks
    skipped: int = 0  # files that could not be read
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {
            "seconds": round(self.seconds, 3),
            "dedup_ratio": ratio(self.logical_bytes, self.unique_bytes),
            "compression_ratio": ratio(self.unique_bytes, self.stored_bytes),
            "overall_ratio": ratio(self.logical_bytes, self.stored_bytes),
        }


class _Counter:
    """The shared tally: the set of chunk ids seen, under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: set[bytes] = set()
        self.result = Estimate()

    def claim(self, chunk_id: bytes) -> bool:
        """Return True if *chunk_id* is new (the caller then encodes it)."""
        with self.lock:
            if chunk_id in self.seen:
                return False
            self.seen.add(chunk_id)
            return True


def estimate(
    root: Path,
    params: ChunkerParams = DEFAULT_PARAMS,
    progress: Callable[[Estimate], None] | None = None,
    jobs: int | None = None,
) -> Estimate:
    """Return the prediction for *root*; blocks while it reads every file once.

    *progress* is called from this thread about twice a second and at the end.
    """
    started = time.monotonic()
    tally = _Counter()
    chunker = Chunker(params)
    jobs = jobs or os.cpu_count() or 1
    last_report = 0.0
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        pending: set[concurrent.futures.Future[None]] = set()
        for path, size in _regular_files(root, tally.result):
            tally.result.files += 1
            tally.result.logical_bytes += size
            if len(pending) >= _PENDING:
                done, pending = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in done:
                    future.result()
            pending.add(pool.submit(_file_sync, path, chunker, tally))
            if progress is not None and time.monotonic() - last_report > 0.5:
                last_report = time.monotonic()
                tally.result.seconds = last_report - started
                progress(tally.result)
        for future in concurrent.futures.as_completed(pending):
            future.result()
    tally.result.seconds = time.monotonic() - started
    if progress is not None:
        progress(tally.result)
    return tally.result


def _regular_files(root: Path, result: Estimate) -> Iterator[tuple[Path, int]]:
    """Yield (path, size) of each regular file below *root*, each inode once."""
    root_dev = os.lstat(root).st_dev
    seen_links: set[tuple[int, int]] = set()
    todo = [root]
    while todo:
        directory = todo.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            log.warning(
                "Cannot list %s (%s); it is left out of the estimate.", directory, exc.strerror
            )
            result.skipped += 1
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                result.skipped += 1
                continue
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev == root_dev:
                    todo.append(Path(entry.path))
            elif stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in seen_links:
                        continue
                    seen_links.add(key)
                yield Path(entry.path), st.st_size


def _file_sync(path: Path, chunker: Chunker, tally: _Counter) -> None:
    """Cut, hash and (for new chunks) encode one file; add it to the tally."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        log.warning("Cannot read %s (%s); it is left out of the estimate.", path, exc.strerror)
        with tally.lock:
            tally.result.skipped += 1
        return
    try:
        for start, end in _data_segments(fd):
            _region_sync(fd, start, end, chunker, tally)
    except OSError as exc:
        log.warning("Reading %s failed (%s); the estimate counts part of it.", path, exc.strerror)
        with tally.lock:
            tally.result.skipped += 1
    finally:
        os.close(fd)


def _data_segments(fd: int) -> list[tuple[int, int]]:
    """Return the [start, end) ranges of *fd* that hold data (holes skipped).

    A copy that keeps holes writes exactly these ranges, and a commit cuts
    each written range on its own.
    """
    size = os.fstat(fd).st_size
    segments = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        segments.append((start, min(end, size)))
        pos = end
    return segments


def _region_sync(fd: int, start: int, end: int, chunker: Chunker, tally: _Counter) -> None:
    """Cut [start, end) as commit.Committer does: windows, last piece carried over."""
    buf_start, carry = start, b""
    while buf_start < end:
        fresh_start = buf_start + len(carry)
        fresh_end = min(fresh_start + WINDOW, end)
        fresh = os.pread(fd, fresh_end - fresh_start, fresh_start)
        if len(fresh) < fresh_end - fresh_start:  # the file shrank meanwhile
            fresh_end = fresh_start + len(fresh)
            end = fresh_end
        pieces = chunker.cut_sync(carry + fresh)
        if fresh_end < end and len(pieces) > 1:
            last = pieces.pop()
            carry, next_start = bytes(last.data), buf_start + last.offset
        else:
            carry, next_start = b"", fresh_end
        _tally_pieces(pieces, tally)
        with tally.lock:
            tally.result.data_bytes += len(fresh)
        if next_start <= buf_start:
            break
        buf_start = next_start


def _tally_pieces(pieces: list, tally: _Counter) -> None:
    holes = unique = stored = chunks = 0
    for piece in pieces:
        if piece.chunk_id is None:
            holes += len(piece.data)
        elif tally.claim(piece.chunk_id):
            chunks += 1
            unique += len(piece.data)
            stored += len(codec.encode_sync(piece.chunk_id, piece.data))
    with tally.lock:
        result = tally.result
        result.hole_bytes += holes
        result.chunks += chunks
        result.unique_bytes += unique
        result.stored_bytes += stored


def render(result: Estimate, root: Path) -> str:
    data = result.to_json()
    rows = [
        ("Files (each inode once)", str(result.files)),
        ("Logical bytes (file sizes)", human_size(result.logical_bytes)),
        ("Unique chunk bytes", human_size(result.unique_bytes)),
        ("Predicted stored bytes", human_size(result.stored_bytes)),
        ("Unique chunks", str(result.chunks)),
        ("Dedup ratio", f"{data['dedup_ratio']:.2f}x"),
        ("Compression ratio", f"{data['compression_ratio']:.2f}x"),
        ("Overall ratio", f"{data['overall_ratio']:.2f}x"),
    ]
    if result.skipped:
        rows.append(("Unreadable (left out)", str(result.skipped)))
    width = max(len(name) for name, _ in rows)
    head = f"Estimate for {root} (nothing written; {result.seconds:.1f} s):"
    return head + "\n" + "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def describe(result: Estimate) -> str:
    """The progress line's text."""
    return (
        f"{result.files} files, {human_size(result.logical_bytes)} listed, "
        f"{human_size(result.data_bytes)} read, {human_size(result.unique_bytes)} unique, "
        f"{human_size(result.stored_bytes)} predicted"
    )
