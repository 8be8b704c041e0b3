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
    page-cache I/O of the staging file."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.ranges = Ranges()
        self.size = size
        self.last_write = time.monotonic()

    def write(self, offset: int, buf: bytes) -> None:
        os.pwrite(self.fd, buf, offset)
        self.ranges.add(offset, offset + len(buf))
        self.size = max(self.size, offset + len(buf))
        self.last_write = time.monotonic()

    def overlay(self, start: int, buf: bytearray | memoryview) -> None:
        """Copy the dirty bytes of [start, start+len(buf)) into *buf*."""
        for s, e in self.ranges.overlapping(start, start + len(buf)):
            data = os.pread(self.fd, e - s, s)
            buf[s - start : s - start + len(data)] = data

    def covers(self, start: int, end: int) -> bool:
        parts = self.ranges.overlapping(start, end)
        return len(parts) == 1 and parts[0] == (start, end)

    def truncate(self, size: int) -> None:
        self.ranges.clip(size)
        self.size = size
        os.ftruncate(self.fd, size)

    def discard(self) -> None:
        os.close(self.fd)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
