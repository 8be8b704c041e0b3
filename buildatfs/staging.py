"""Data written through the mount and not yet committed to chunks.

Each file with uncommitted writes has a `DirtyFile`: the byte ranges that are
dirty, and the written bytes themselves. Those bytes are kept in memory as
the write requests brought them, up to a budget shared by all files
(`MemoryBudget`); past it they go to a sparse staging file
``STORE/staging/<inode>`` at their own offsets. Most files are written whole
and committed soon after, so their bytes never touch the disk before they
are chunked. Reads of a dirty file take the dirty ranges from memory or the
staging file and the rest from committed chunks.

Staged data that was never committed is not promised to survive a crash
(only fsync promises that), so recovery discards the staging directory.
"""

from __future__ import annotations

import bisect
import errno
import os
import time
from pathlib import Path
from typing import Final

MEMORY_LIMIT: Final = 64 * 1024 * 1024  # staged bytes held in memory, all files together
# What keeping one piece costs besides its bytes (the bytes object's header,
# its place in three lists, its offset and serial): charged to the budget so
# that a stream of tiny writes cannot grow memory without bound.
PIECE_OVERHEAD: Final = 160


class Ranges:
    """A set of disjoint, non-adjacent half-open byte ranges, kept sorted."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.total = 0

    def __bool__(self) -> bool:
        return bool(self.starts)

    def __iter__(self):
        return zip(self.starts, self.ends, strict=True)

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        if self.ends and self.ends[-1] == start:  # appending: the common case
            self.ends[-1] = end
            self.total += end - start
            return
        # Ranges that touch [start, end) are merged into it.
        lo = bisect.bisect_left(self.ends, start)
        hi = bisect.bisect_right(self.starts, end)
        if lo < hi:
            start = min(start, self.starts[lo])
            end = max(end, self.ends[hi - 1])
            self.total -= sum(
                e - s for s, e in zip(self.starts[lo:hi], self.ends[lo:hi], strict=True)
            )
        self.starts[lo:hi] = [start]
        self.ends[lo:hi] = [end]
        self.total += end - start

    def clip(self, size: int) -> None:
        """Forget everything at or past *size*."""
        while self.ends and self.ends[-1] > size:
            if self.starts[-1] >= size:
                self.total -= self.ends[-1] - self.starts[-1]
                del self.starts[-1], self.ends[-1]
            else:
                self.total -= self.ends[-1] - size
                self.ends[-1] = size

    def overlapping(self, start: int, end: int) -> list[tuple[int, int]]:
        """Return the parts of the ranges that fall inside [start, end)."""
        lo = bisect.bisect_right(self.ends, start)
        out = []
        for i in range(lo, len(self.starts)):
            s, e = self.starts[i], self.ends[i]
            if s >= end:
                break
            out.append((max(s, start), min(e, end)))
        return out


def _cost(piece: bytes) -> int:
    return len(piece) + PIECE_OVERHEAD


class MemoryBudget:
    """How much memory the staged pieces of all files together may take."""

    def __init__(self, limit: int = MEMORY_LIMIT) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class DirtyFile:
    """Uncommitted writes of one inode. Plain methods; each blocks at most on
    page-cache I/O of the staging file.

    A write's bytes are kept as the request's own ``bytes`` object while the
    budget allows (no copy), else written to the staging file, which is
    created on first need. The pieces in memory never overlap, and where one
    lies over bytes in the file it is the newer: a write that goes to the
    file cuts away the memory it covers.

    Writes go on while a commit runs: `begin_commit` hands the commit the
    ranges written so far (``committing``) and starts a fresh ``ranges`` for
    later writes. Both sets stay readable until `end_commit`, so a read never
    falls between staged and committed data. A commit may read bytes newer
    than its snapshot; they stay in ``ranges`` and are committed again, which
    is harmless. Each piece in memory carries the number of the write that
    brought it, so `end_commit` frees exactly the pieces its commit saw.
    """

    def __init__(self, path: Path, size: int, budget: MemoryBudget) -> None:
        self.path = path
        self.fd: int | None = None
        self.ranges = Ranges()
        self.committing = Ranges()
        self.size = size
        self.last_write = time.monotonic()
        self.budget = budget
        self.filed = Ranges()  # what the staging file holds (may be older than memory)
        self._starts: list[int] = []  # pieces in memory, sorted by offset
        self._pieces: list[bytes] = []
        self._serials: list[int] = []
        self._serial = 0  # writes so far
        self._snapshot = 0  # writes before the running commit's snapshot

    @property
    def staged_bytes(self) -> int:
        return self.ranges.total + self.committing.total

    @property
    def memory_cost(self) -> int:
        """What this file's pieces in memory are charged to the budget."""
        return sum(map(_cost, self._pieces))

    @property
    def clean(self) -> bool:
        return not self.ranges and not self.committing

    def write(self, offset: int, buf: bytes) -> None:
        end = offset + len(buf)
        if self.budget.take(len(buf) + PIECE_OVERHEAD):
            self._cut(offset, end)
            i = bisect.bisect_left(self._starts, offset)
            self._starts.insert(i, offset)
            self._pieces.insert(i, bytes(buf))  # (a no-op for the bytes FUSE hands over)
            self._serials.insert(i, self._serial)
        else:
            if self.fd is None:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            _pwrite_all(self.fd, buf, offset)
            self.filed.add(offset, end)
            self._cut(offset, end)
        self._serial += 1
        self.ranges.add(offset, end)
        self.size = max(self.size, end)
        self.last_write = time.monotonic()

    def _cut(self, start: int, end: int) -> None:
        """Drop the memory that lies in [start, end), keeping the parts of
        pieces outside it."""
        starts, pieces, serials = self._starts, self._pieces, self._serials
        lo = max(bisect.bisect_right(starts, start) - 1, 0)
        hi = bisect.bisect_left(starts, end)
        if lo >= hi:
            return
        kept: list[tuple[int, bytes, int]] = []
        for i in range(lo, hi):
            s, piece = starts[i], pieces[i]
            e = s + len(piece)
            if e <= start:
                kept.append((s, piece, serials[i]))
                continue
            if s < start:
                kept.append((s, piece[: start - s], serials[i]))
            if e > end:
                kept.append((end, piece[end - s :], serials[i]))
        freed = sum(map(_cost, pieces[lo:hi])) - sum(_cost(k[1]) for k in kept)
        starts[lo:hi] = [k[0] for k in kept]
        pieces[lo:hi] = [k[1] for k in kept]
        serials[lo:hi] = [k[2] for k in kept]
        self.budget.give(freed)

    def begin_commit(self) -> tuple[Ranges, int]:
        """Return the ranges to commit and the size they belong with."""
        assert not self.committing, "one commit at a time per file"
        self.committing, self.ranges = self.ranges, Ranges()
        self._snapshot = self._serial
        return self.committing, self.size

    def end_commit(self, done: bool) -> None:
        """Forget the committed ranges, or after a failure keep them staged."""
        if done:
            self._forget_older_than(self._snapshot)
        else:
            for start, end in self.committing:
                self.ranges.add(start, end)
        self.committing = Ranges()

    def _forget_older_than(self, serial: int) -> None:
        starts: list[int] = []
        pieces: list[bytes] = []
        serials: list[int] = []
        freed = 0
        for start, piece, n in zip(self._starts, self._pieces, self._serials, strict=True):
            if n >= serial:
                starts.append(start)
                pieces.append(piece)
                serials.append(n)
            else:
                freed += _cost(piece)
        self._starts, self._pieces, self._serials = starts, pieces, serials
        self.budget.give(freed)

    def staged_parts(self, start: int, end: int) -> list[tuple[int, int]]:
        """Return the staged parts of [start, end), sorted and merged."""
        parts = sorted(
            self.ranges.overlapping(start, end) + self.committing.overlapping(start, end)
        )
        merged: list[tuple[int, int]] = []
        for s, e in parts:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
            else:
                merged.append((s, e))
        return merged

    def overlay(self, start: int, buf: bytearray | memoryview) -> None:
        """Copy the staged bytes of [start, start+len(buf)) into *buf*."""
        end = start + len(buf)
        view = memoryview(buf)
        if self.fd is not None:
            # Only the file's bytes inside staged ranges: elsewhere they may
            # be older than what was committed since.
            for s, e in self.staged_parts(start, end):
                for fs, fe in self.filed.overlapping(s, e):
                    os.preadv(self.fd, [view[fs - start : fe - start]], fs)
        starts, pieces = self._starts, self._pieces
        for i in range(max(bisect.bisect_right(starts, start) - 1, 0), len(starts)):
            s = starts[i]
            if s >= end:
                break
            piece = pieces[i]
            lo, hi = max(s, start), min(s + len(piece), end)
            if lo < hi:
                view[lo - start : hi - start] = piece[lo - s : hi - s]

    def covers(self, start: int, end: int) -> bool:
        return self.staged_parts(start, end) == [(start, end)]

    def truncate(self, size: int) -> None:
        """Cut the staged data at *size*; not while a commit runs."""
        assert not self.committing, "truncate waits for the commit"
        self.ranges.clip(size)
        self.filed.clip(size)
        self._cut(size, max(size, self._memory_end()))
        self.size = size
        if self.fd is not None and size < os.fstat(self.fd).st_size:
            os.ftruncate(self.fd, size)  # (growing it would only add a hole)

    def _memory_end(self) -> int:
        if not self._starts:
            return 0
        return self._starts[-1] + len(self._pieces[-1])

    def discard(self) -> None:
        self.budget.give(self.memory_cost)
        self._starts, self._pieces, self._serials = [], [], []
        if self.fd is None:
            return
        os.close(self.fd)
        self.fd = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _pwrite_all(fd: int, buf: bytes, offset: int) -> None:
    """Write all of *buf* at *offset*: a short write (a full disk, a file size
    limit) is continued, so that its cause comes back as an OSError instead of
    a hole that would read as zeros."""
    view = memoryview(buf)
    while view:
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n
