"""Data written through the mount and not yet committed to chunks.

Each file with uncommitted writes has a sparse staging file
``STORE/staging/<inode>`` holding the written bytes at their own offsets, and
an in-memory list of the byte ranges that are dirty. Reads of a dirty file
take those ranges from the staging file and the rest from committed chunks.

Staged data that was never committed is not promised to survive a crash
(only fsync promises that), so recovery discards the staging directory.
"""

from __future__ import annotations

import bisect
import os
import time
from pathlib import Path


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


class DirtyFile:
    """Uncommitted writes of one inode. Plain methods; each blocks only on
    page-cache I/O of the staging file.

    Writes go on while a commit runs: `begin_commit` hands the commit the
    ranges written so far (``committing``) and starts a fresh ``ranges`` for
    later writes. Both sets stay readable from the staging file until
    `end_commit`, so a read never falls between staged and committed data. A
    commit may read bytes newer than its snapshot; they stay in ``ranges`` and
    are committed again, which is harmless.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.ranges = Ranges()
        self.committing = Ranges()
        self.size = size
        self.last_write = time.monotonic()

    @property
    def staged_bytes(self) -> int:
        return self.ranges.total + self.committing.total

    @property
    def clean(self) -> bool:
        return not self.ranges and not self.committing

    def write(self, offset: int, buf: bytes) -> None:
        os.pwrite(self.fd, buf, offset)
        self.ranges.add(offset, offset + len(buf))
        self.size = max(self.size, offset + len(buf))
        self.last_write = time.monotonic()

    def begin_commit(self) -> tuple[Ranges, int]:
        """Return the ranges to commit and the size they belong with."""
        assert not self.committing, "one commit at a time per file"
        self.committing, self.ranges = self.ranges, Ranges()
        return self.committing, self.size

    def end_commit(self, done: bool) -> None:
        """Forget the committed ranges, or after a failure keep them staged."""
        if not done:
            for start, end in self.committing:
                self.ranges.add(start, end)
        self.committing = Ranges()

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
        for s, e in self.staged_parts(start, start + len(buf)):
            data = os.pread(self.fd, e - s, s)
            buf[s - start : s - start + len(data)] = data

    def covers(self, start: int, end: int) -> bool:
        return self.staged_parts(start, end) == [(start, end)]

    def truncate(self, size: int) -> None:
        """Cut the staged data at *size*; not while a commit runs."""
        assert not self.committing, "truncate waits for the commit"
        self.ranges.clip(size)
        self.size = size
        os.ftruncate(self.fd, size)

    def discard(self) -> None:
        os.close(self.fd)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
