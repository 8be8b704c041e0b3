"""Opening a store, and every change to its index that keeps the invariants.

`Store` owns the LMDB environment and the pack store. The methods that take a
``txn`` run inside a write transaction the caller opened; none of them
awaits, so a trio caller keeps the transaction on its own thread. The
invariants they keep are listed in schema.py.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import lmdb

from buildatfs import codec, schema
from buildatfs.chunker import DEFAULT_PARAMS, ChunkerParams
from buildatfs.chunkstore import LocalPackStore
from buildatfs.errors import StoreBusy, UserError
from buildatfs.schema import Chunk, Extent, Inode, pair, read_pair, read_u64, u64

log = logging.getLogger(__name__)

MAP_SIZE: Final = 1 << 40  # address space only; the file grows with its content
DICT_PREFIX: Final = b"dict:"
FRAGMENTED_PREFIX: Final = b"fragmented:"


def now_ns() -> int:
    return time.time_ns()


class Store:
    """An opened store. Use `Store.open`; close with `close`."""

    def __init__(self, path: Path, env: lmdb.Environment, readonly: bool) -> None:
        self.path = path
        self.env = env
        self.readonly = readonly
        self.dbs = {
            name.decode(): env.open_db(name, create=not readonly) for name in schema.DATABASES
        }
        self.packs = LocalPackStore(path / "packs")
        self.staging = path / "staging"
        self._lock_fd = -1
        with env.begin() as txn:
            raw = txn.get(b"chunker", db=self.dbs["meta"])
            found = {
                int(key[len(DICT_PREFIX) :]): txn.get(key, db=self.dbs["meta"])
                for key in self._meta_keys(txn, DICT_PREFIX)
            }
        self.params = ChunkerParams.from_json(raw) if raw else DEFAULT_PARAMS
        self.dicts = codec.Dictionaries(found)

    # ---- opening and closing ------------------------------------------------

    @staticmethod
    def init(path: Path, params: ChunkerParams = DEFAULT_PARAMS) -> None:
        """Create an empty store at *path* (a missing or empty directory)."""
        if path.exists() and not path.is_dir():
            raise UserError(f"{path} is not a directory; give a new or empty directory.")
        if path.exists() and any(path.iterdir()):
            raise UserError(f"{path} is not empty; give a new or empty directory.")
        for sub in ("meta", "packs", "staging"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
        env = _open_env(path, readonly=False)
        store = Store(path, env, readonly=False)
        t = now_ns()
        root = Inode(mode=0o40755, uid=0, gid=0, nlink=2, atime_ns=t, mtime_ns=t, ctime_ns=t)
        with env.begin(write=True) as txn:
            meta = store.dbs["meta"]
            txn.put(b"format", str(schema.FORMAT_VERSION).encode(), db=meta)
            txn.put(b"chunker", params.to_json(), db=meta)
            txn.put(b"clean", b"1", db=meta)
            txn.put(b"next_inode", u64(schema.ROOT_INODE + 1), db=meta)
            txn.put(b"next_cookie", u64(1), db=meta)
            for name in schema.COUNTERS:
                txn.put(name.encode(), u64(0), db=meta)
            txn.put(u64(schema.ROOT_INODE), root.pack(), db=store.dbs["inodes"])
            store.bump(txn, "directories", 1)
            store.bump(txn, "inodes", 1)
        (path / "lock").touch()
        store.close()

    @classmethod
    def open(cls, path: Path, readonly: bool = False) -> Store:
        """Open the store at *path*; UserError if it is not one."""
        if not (path / "meta" / "data.mdb").is_file():
            if not path.exists():
                raise UserError(f"{path} does not exist.")
            raise UserError(f"{path} is not a buildatfs store (run `buildatfs init {path}`).")
        env = _open_env(path, readonly)
        try:
            store = cls(path, env, readonly)
            with env.begin() as txn:
                version = txn.get(b"format", db=store.dbs["meta"])
        except lmdb.Error as exc:
            env.close()
            raise UserError(
                f"the index of {path} is damaged ({exc}); restore meta/ from a backup.",
                exit_code=1,
            ) from None
        if version != str(schema.FORMAT_VERSION).encode():
            env.close()
            raise UserError(f"{path} has store format {version!r}; this buildatfs reads 1.")
        return store

    def lock(self) -> None:
        """Take the store's flock and write our pid into it; StoreBusy if held."""
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StoreBusy(f"{self.path} is in use by process {holder or '?'}.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        self.packs.close()
        self.env.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def sync_sync(self) -> None:
        """Make everything committed so far durable: packs first, then the index."""
        self.packs.flush_sync()
        self.env.sync(True)

    # ---- meta ---------------------------------------------------------------

    def bump(self, txn: lmdb.Transaction, name: str, delta: int) -> None:
        if delta:
            key = name.encode()
            meta = self.dbs["meta"]
            txn.put(key, u64(read_u64(txn.get(key, db=meta)) + delta), db=meta)

    def counters(self, txn: lmdb.Transaction) -> dict[str, int]:
        meta = self.dbs["meta"]
        return {name: read_u64(txn.get(name.encode(), db=meta)) for name in schema.COUNTERS}

    def take_number(self, txn: lmdb.Transaction, key: bytes) -> int:
        meta = self.dbs["meta"]
        number = read_u64(txn.get(key, db=meta))
        txn.put(key, u64(number + 1), db=meta)
        return number

    def is_clean(self) -> bool:
        with self.env.begin() as txn:
            return txn.get(b"clean", db=self.dbs["meta"]) == b"1"

    def set_clean(self, clean: bool) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(b"clean", b"1" if clean else b"0", db=self.dbs["meta"])
        self.sync_sync()

    # ---- inodes and directory entries ---------------------------------------

    def get_inode(self, txn: lmdb.Transaction, inode: int) -> Inode | None:
        raw = txn.get(u64(inode), db=self.dbs["inodes"])
        return Inode.unpack(raw) if raw is not None else None

    def put_inode(self, txn: lmdb.Transaction, inode: int, rec: Inode) -> None:
        txn.put(u64(inode), rec.pack(), db=self.dbs["inodes"])

    def lookup(self, txn: lmdb.Transaction, parent: int, name: bytes) -> int | None:
        raw = txn.get(schema.dirent_key(parent, name), db=self.dbs["dirents"])
        return read_pair(raw)[0] if raw is not None else None

    def add_dirent(self, txn: lmdb.Transaction, parent: int, name: bytes, child: int) -> None:
        cookie = self.take_number(txn, b"next_cookie")
        txn.put(schema.dirent_key(parent, name), pair(child, cookie), db=self.dbs["dirents"])
        txn.put(pair(parent, cookie), name, db=self.dbs["dircookies"])

    def remove_dirent(self, txn: lmdb.Transaction, parent: int, name: bytes) -> int:
        """Remove the entry and return the child inode it named."""
        key = schema.dirent_key(parent, name)
        child, cookie = read_pair(txn.pop(key, db=self.dbs["dirents"]))
        txn.delete(pair(parent, cookie), db=self.dbs["dircookies"])
        return child

    def replace_dirent(self, txn: lmdb.Transaction, parent: int, name: bytes, child: int) -> None:
        """Point an existing entry at *child*, keeping its readdir cookie."""
        key = schema.dirent_key(parent, name)
        _, cookie = read_pair(txn.get(key, db=self.dbs["dirents"]))
        txn.put(key, pair(child, cookie), db=self.dbs["dirents"])

    def children(
        self, txn: lmdb.Transaction, parent: int, after_cookie: int = 0
    ) -> Iterator[tuple[int, bytes]]:
        """Yield (cookie, name) of *parent*'s entries in cookie order."""
        cur = txn.cursor(db=self.dbs["dircookies"])
        if not cur.set_range(pair(parent, after_cookie + 1)):
            return
        for key, name in cur:
            owner, cookie = read_pair(key)
            if owner != parent:
                return
            yield cookie, name

    def has_children(self, txn: lmdb.Transaction, parent: int) -> bool:
        return next(self.children(txn, parent), None) is not None

    def create_inode(self, txn: lmdb.Transaction, rec: Inode) -> int:
        inode = self.take_number(txn, b"next_inode")
        self.put_inode(txn, inode, rec)
        self._count_kind(txn, rec.mode, 1)
        if (rec.mode & 0o170000) == 0o100000:
            self.bump(txn, "logical_bytes", rec.size)
        return inode

    def _count_kind(self, txn: lmdb.Transaction, mode: int, delta: int) -> None:
        kind = mode & 0o170000
        self.bump(txn, "inodes", delta)
        if kind == 0o100000:
            self.bump(txn, "files", delta)
        elif kind == 0o040000:
            self.bump(txn, "directories", delta)

    def purge_inode(self, txn: lmdb.Transaction, inode: int) -> None:
        """Delete an inode that no entry names any more, with its data."""
        rec = self.get_inode(txn, inode)
        txn.delete(u64(inode), db=self.dbs["orphans"])
        if rec is None:
            return
        self.drop_extents(txn, inode, 0)
        if (rec.mode & 0o170000) == 0o100000:
            self.bump(txn, "logical_bytes", -rec.size)
        for key in list(self.prefixed_keys(txn, "xattrs", inode)):
            txn.delete(key, db=self.dbs["xattrs"])
        txn.delete(u64(inode), db=self.dbs["symlinks"])
        txn.delete(u64(inode), db=self.dbs["inodes"])
        self.set_fragmented(txn, inode, False)
        self._count_kind(txn, rec.mode, -1)

    def set_fragmented(self, txn: lmdb.Transaction, inode: int, fragmented: bool) -> None:
        """Remember (or forget) that small overwrites left *inode* fragmented."""
        key = FRAGMENTED_PREFIX + str(inode).encode()
        if fragmented:
            txn.put(key, b"", db=self.dbs["meta"])
        else:
            txn.delete(key, db=self.dbs["meta"])

    def fragmented_inodes(self, txn: lmdb.Transaction) -> list[int]:
        keys = self._meta_keys(txn, FRAGMENTED_PREFIX)
        return [int(key[len(FRAGMENTED_PREFIX) :]) for key in keys]

    def _meta_keys(self, txn: lmdb.Transaction, prefix: bytes) -> Iterator[bytes]:
        return _keys_with_prefix(txn, self.dbs["meta"], prefix)

    def prefixed_keys(self, txn: lmdb.Transaction, db: str, inode: int) -> Iterator[bytes]:
        return _keys_with_prefix(txn, self.dbs[db], u64(inode))

    def set_size(self, txn: lmdb.Transaction, inode: int, rec: Inode, size: int) -> None:
        """Set a regular file's size, dropping the data past it."""
        if size < rec.size:
            rec.allocated -= self.drop_extents(txn, inode, size)
        if (rec.mode & 0o170000) == 0o100000:
            self.bump(txn, "logical_bytes", size - rec.size)
        rec.size = size

    # ---- extents and chunk references -------------------------------------

    def extents(
        self, txn: lmdb.Transaction, inode: int, start: int, end: int
    ) -> Iterator[tuple[int, Extent]]:
        """Yield (file offset, extent) of the extents that overlap [start, end)."""
        cur = txn.cursor(db=self.dbs["extents"])
        key = pair(inode, start)
        # Start one key early: the extent covering *start* may begin before it.
        if cur.set_range(key):
            if cur.key() != key and not cur.prev():
                cur.first()
        elif not cur.last():
            return
        for raw_key, value in cur:
            owner, offset = read_pair(raw_key)
            if owner < inode:
                continue
            if owner > inode or offset >= end:
                return
            ext = Extent.unpack(value)
            if offset + ext.length > start:
                yield offset, ext

    def drop_extents(
        self, txn: lmdb.Transaction, inode: int, start: int, end: int | None = None
    ) -> int:
        """Remove file data in [start, end) and return how many bytes extents lost.

        An extent that straddles *start* or *end* is cut; the chunk keeps its
        reference as long as some extent still names it.
        """
        db = self.dbs["extents"]
        lost = 0
        stop = end if end is not None else 1 << 63
        for offset, ext in list(self.extents(txn, inode, start, stop)):
            txn.delete(pair(inode, offset), db=db)
            ext_end = offset + ext.length
            if offset < start:
                head = Extent(ext.chunk_id, ext.chunk_offset, start - offset)
                txn.put(pair(inode, offset), head.pack(), db=db)
                self.incref(txn, ext.chunk_id)
            if ext_end > stop:
                tail = Extent(ext.chunk_id, ext.chunk_offset + stop - offset, ext_end - stop)
                txn.put(pair(inode, stop), tail.pack(), db=db)
                self.incref(txn, ext.chunk_id)
            lost += min(ext_end, stop) - max(offset, start)
            self.decref(txn, ext.chunk_id)
        return lost

    def put_extent(self, txn: lmdb.Transaction, inode: int, offset: int, ext: Extent) -> None:
        txn.put(pair(inode, offset), ext.pack(), db=self.dbs["extents"])

    def put_dictionary(self, txn: lmdb.Transaction, dict_id: int, data: bytes) -> None:
        """Keep a zstd dictionary that compacted records may name (codec.py)."""
        txn.put(DICT_PREFIX + str(dict_id).encode(), data, db=self.dbs["meta"])
        self.dicts.add(dict_id, data)

    def read_chunk_sync(self, chunk_id: bytes, chunk: Chunk) -> bytes:
        """Read the record *chunk* names and return its checked raw data;
        raises ChunkCorrupt."""
        record = self.packs.read_sync(chunk.pack, chunk.offset, chunk.record_len)
        return codec.decode_sync(chunk_id, record, self.dicts)

    def get_chunk(self, txn: lmdb.Transaction, chunk_id: bytes) -> Chunk | None:
        raw = txn.get(chunk_id, db=self.dbs["chunks"])
        return Chunk.unpack(raw) if raw is not None else None

    def incref(self, txn: lmdb.Transaction, chunk_id: bytes) -> None:
        chunk = self.get_chunk(txn, chunk_id)
        assert chunk is not None, "incref of a chunk that is not in the index"
        chunk.refcount += 1
        txn.put(chunk_id, chunk.pack_value(), db=self.dbs["chunks"])

    def decref(self, txn: lmdb.Transaction, chunk_id: bytes) -> None:
        chunk = self.get_chunk(txn, chunk_id)
        if chunk is None:
            log.error(
                "Extent names chunk %s that is not in the index; run `buildatfs fsck`.",
                chunk_id.hex(),
            )
            return
        chunk.refcount -= 1
        if chunk.refcount > 0:
            txn.put(chunk_id, chunk.pack_value(), db=self.dbs["chunks"])
            return
        txn.delete(chunk_id, db=self.dbs["chunks"])
        self.add_dead(txn, chunk.pack, chunk.record_len)
        self.bump(txn, "unique_bytes", -chunk.raw_len)
        self.bump(txn, "chunks", -1)

    def add_chunk(
        self,
        txn: lmdb.Transaction,
        chunk_id: bytes,
        place: tuple[int, int],
        record_len: int,
        raw_len: int,
    ) -> None:
        """Index a chunk just appended at *place* with one reference.

        If another commit indexed the same chunk meanwhile, that copy wins and
        this record, if it is another one, is counted as dead.
        """
        pack, offset = place
        self.note_pack_end(txn, pack, offset + record_len)
        existing = self.get_chunk(txn, chunk_id)
        if existing is not None:
            existing.refcount += 1
            txn.put(chunk_id, existing.pack_value(), db=self.dbs["chunks"])
            if (existing.pack, existing.offset) != place:
                self.add_dead(txn, pack, record_len)
            return
        chunk = Chunk(pack, offset, record_len, raw_len, 1)
        txn.put(chunk_id, chunk.pack_value(), db=self.dbs["chunks"])
        self.bump(txn, "unique_bytes", raw_len)
        self.bump(txn, "chunks", 1)

    def pack_record(self, txn: lmdb.Transaction, pack: int) -> tuple[int, int]:
        raw = txn.get(u64(pack), db=self.dbs["packs"])
        return read_pair(raw) if raw is not None else (0, 0)

    def note_pack_end(self, txn: lmdb.Transaction, pack: int, end: int) -> None:
        size, dead = self.pack_record(txn, pack)
        if end > size:
            txn.put(u64(pack), pair(end, dead), db=self.dbs["packs"])

    def disown(self, records: list[tuple[tuple[int, int], int]]) -> None:
        """Count records ((pack, offset), length) that were appended but that
        no index entry will name as dead bytes of their packs, in a write
        transaction of its own; logs instead of raising if the index fails.

        A pass that is cut short leaves such records in the open pack, maybe
        between records of commits, where no trimming of the pack reaches.
        """
        try:
            with self.env.begin(write=True) as txn:
                for (pack, offset), length in records:
                    self.note_pack_end(txn, pack, offset + length)
                    self.add_dead(txn, pack, length)
        except lmdb.Error as exc:
            log.warning("Cannot count %d unused records as dead (%s)", len(records), exc)

    def add_dead(self, txn: lmdb.Transaction, pack: int, nbytes: int) -> None:
        size, dead = self.pack_record(txn, pack)
        txn.put(u64(pack), pair(size, dead + nbytes), db=self.dbs["packs"])

    # ---- reports ------------------------------------------------------------

    def stored_bytes(self, txn: lmdb.Transaction) -> tuple[int, int]:
        """Return (bytes in packs, dead bytes in packs) as the index knows them."""
        size = dead = 0
        for _, value in txn.cursor(db=self.dbs["packs"]):
            s, d = read_pair(value)
            size, dead = size + s, dead + d
        return size, dead


def _keys_with_prefix(txn: lmdb.Transaction, db: object, prefix: bytes) -> Iterator[bytes]:
    """The keys of *db* that start with *prefix*, in order."""
    cur = txn.cursor(db=db)
    if not cur.set_range(prefix):
        return
    for key in cur.iternext(values=False):
        if not key.startswith(prefix):
            return
        yield key


def _open_env(path: Path, readonly: bool) -> lmdb.Environment:
    try:
        return lmdb.open(
            str(path / "meta"),
            map_size=MAP_SIZE,
            max_dbs=len(schema.DATABASES) + 2,
            readonly=readonly,
            sync=False,
            metasync=False,
            readahead=False,
            max_readers=1024,
        )
    except lmdb.Error as exc:
        if isinstance(exc, lmdb.ReadonlyError) or getattr(exc, "errno", None) == errno.EACCES:
            raise UserError(f"cannot open {path}: permission denied", exit_code=1) from None
        raise UserError(f"cannot open the index of {path}: {exc}", exit_code=1) from None
