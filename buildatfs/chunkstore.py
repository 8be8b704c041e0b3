"""Where pack files live: a small interface and its local-directory implementation.

The rest of buildatfs sees packs only through `PackStore`: append records to
the open pack, read a byte range, make what was appended durable, list,
truncate and delete packs. An object-store backend (S3 and the like) fits the
same interface by uploading a pack once it is sealed and serving reads with
ranged GETs through a local cache.

Every method blocks on I/O (``_sync``) and is safe to call from several worker
threads at once.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import errno
import os
import threading
from pathlib import Path
from typing import Final

from buildatfs import faults
from buildatfs.errors import ChunkMissing

PACK_LIMIT: Final = 64 * 1024 * 1024
_OPEN_FDS: Final = 64


class PackStore(abc.ABC):
    """Append-only pack files named by increasing numbers."""

    @abc.abstractmethod
    def append_sync(self, records: list[bytes]) -> list[tuple[int, int]]:
        """Append *records* and return the (pack, offset) of each."""

    @property
    @abc.abstractmethod
    def current(self) -> int | None:
        """The pack that appends go to now, if one is open."""

    @abc.abstractmethod
    def seal(self) -> None:
        """Stop appending to the open pack; the next append starts a new one."""

    @abc.abstractmethod
    def read_sync(self, pack: int, offset: int, length: int) -> bytes:
        """Return *length* bytes at *offset* of *pack*; ChunkMissing if absent."""

    @abc.abstractmethod
    def flush_sync(self) -> None:
        """Make every record appended so far durable."""

    @abc.abstractmethod
    def list_sync(self) -> dict[int, int]:
        """Return {pack: size in bytes} for every pack present."""

    @abc.abstractmethod
    def truncate_sync(self, pack: int, size: int) -> None:
        """Cut *pack* back to *size* bytes (recovery of an interrupted commit)."""

    @abc.abstractmethod
    def delete_sync(self, pack: int) -> None:
        """Remove *pack*."""


class LocalPackStore(PackStore):
    """Packs as files ``packs/XX/NNNNNNNN.pack`` in a local directory.

    A new pack is started by the first append of each process, so a pack that
    an interrupted daemon left half written is never appended to again.
    """

    def __init__(self, root: Path, limit: int = PACK_LIMIT) -> None:
        self.root = root
        self.limit = limit
        self._lock = threading.Lock()
        self._fds: collections.OrderedDict[int, _Handle] = collections.OrderedDict()
        self._current: int | None = None
        self._current_fd = -1
        self._current_size = 0
        self._unsynced: set[int] = set()
        self._highest = 0

    def path(self, pack: int) -> Path:
        return self.root / f"{pack & 0xFF:02x}" / f"{pack:08x}.pack"

    def append_sync(self, records: list[bytes]) -> list[tuple[int, int]]:
        with self._lock:
            places = []
            for record in records:
                if self._current is None or self._current_size + len(record) > self.limit:
                    self._rotate()
                assert self._current is not None
                places.append((self._current, self._current_size))
                self._write_all(record)
            return places

    def _write_all(self, record: bytes) -> None:
        """Append one whole record, or leave the pack as it was and raise."""
        view = memoryview(record)
        try:
            while view:
                view = view[os.write(self._current_fd, view) :]
        except OSError:
            # A partial record (disk full, say) must not shift later offsets.
            os.ftruncate(self._current_fd, self._current_size)
            raise
        self._current_size += len(record)

    @property
    def current(self) -> int | None:
        return self._current

    def seal(self) -> None:
        with self._lock:
            self._current = None

    def _rotate(self) -> None:
        """Seal the open pack (its fd stays cached for reads) and start the next."""
        # Numbers are never reused within a process: a reader that planned
        # with a collected pack must not find another pack under its name.
        number = max(max(self.list_sync(), default=0), self._highest) + 1
        self._highest = number
        path = self.path(number)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._current, self._current_fd, self._current_size = number, fd, 0
        self._unsynced.add(number)
        self._fds[number] = _Handle(fd)
        faults.point("pack:rotated")

    def read_sync(self, pack: int, offset: int, length: int) -> bytes:
        handle = self._open(pack)
        try:
            data = os.pread(handle.fd, length, offset)
        finally:
            self._done(handle)
        if len(data) != length:
            raise ChunkMissing(f"pack {pack} ends before offset {offset + length}")
        return data

    def _open(self, pack: int) -> _Handle:
        """The cached descriptor of *pack*, counted as in use until `_done`.

        A descriptor that is evicted or whose pack is deleted while a read
        uses it is closed by that read's `_done`, never under it: closing it
        earlier could let the read hit another file that reused the number.
        """
        with self._lock:
            handle = self._fds.get(pack)
            if handle is not None:
                self._fds.move_to_end(pack)
            else:
                try:
                    fd = os.open(self.path(pack), os.O_RDONLY)
                except FileNotFoundError:
                    raise ChunkMissing(f"pack {pack} does not exist") from None
                handle = self._fds[pack] = _Handle(fd)
                while len(self._fds) > _OPEN_FDS:
                    old, old_handle = next(iter(self._fds.items()))
                    if old == self._current:
                        self._fds.move_to_end(old)
                        continue
                    del self._fds[old]
                    _retire(old_handle)
            handle.users += 1
            return handle

    def _done(self, handle: _Handle) -> None:
        with self._lock:
            handle.users -= 1
            if handle.retired and not handle.users:
                os.close(handle.fd)

    def flush_sync(self) -> None:
        with self._lock:
            packs = list(self._unsynced)
            if self._current is not None:
                self._unsynced = {self._current}
            else:
                self._unsynced = set()
        for pack in packs:
            try:
                fd = os.open(self.path(pack), os.O_RDONLY)
            except FileNotFoundError:
                continue  # deleted meanwhile (nothing names it)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if packs:
            _fsync_dir(self.root)

    def list_sync(self) -> dict[int, int]:
        packs = {}
        if not self.root.exists():
            return packs
        for sub in self.root.iterdir():
            for entry in os.scandir(sub):
                if entry.name.endswith(".pack"):
                    packs[int(entry.name[:-5], 16)] = entry.stat().st_size
        return packs

    def truncate_sync(self, pack: int, size: int) -> None:
        os.truncate(self.path(pack), size)

    def delete_sync(self, pack: int) -> None:
        with self._lock:
            handle = self._fds.pop(pack, None)
            if handle is not None:
                _retire(handle)
            self._unsynced.discard(pack)
            if pack == self._current:
                self._current = None
        try:
            self.path(pack).unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        with self._lock:
            for handle in self._fds.values():
                _retire(handle)
            self._fds.clear()
            self._current = None


@dataclasses.dataclass(slots=True)
class _Handle:
    """A cached read descriptor and how many reads use it right now."""

    fd: int
    users: int = 0
    retired: bool = False


def _retire(handle: _Handle) -> None:
    """Close *handle* now if no read uses it, else when the last one ends
    (the caller holds the pack store's lock)."""
    handle.retired = True
    if not handle.users:
        os.close(handle.fd)


def _fsync_dir(path: Path) -> None:
    for sub in [path, *path.iterdir()]:
        try:
            fd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            if exc.errno == errno.ENOTDIR:
                continue
            raise
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
