"""Files of a store by name, without a mount: paths, inodes and contents.

`Tree` loads the ``dirents`` sub-database once and answers both ways: the
paths (relative to the mount root) of an inode, with every name of a hard
link, and the inode of a path. `read_data_sync` reads a file's bytes through
its extents and the packs, so commands can read small files (Docker's JSON
metadata, for example) from a store that is mounted or not.

Nothing here writes. Callers pass their own read transaction; its snapshot
is what the answers describe.
"""

from __future__ import annotations

import collections
import stat
from collections.abc import Iterable, Iterator
from typing import Final

import lmdb

from buildatfs import schema
from buildatfs.reader import load_chunk_sync
from buildatfs.schema import Extent, Inode, read_pair, read_u64
from buildatfs.store import Store

ROOT: Final = schema.ROOT_INODE


class Tree:
    """The directory tree of one snapshot: names up and down.

    Memory grows with the number of directory entries (one tuple each).
    """

    def __init__(self) -> None:
        self.parents: dict[int, list[tuple[int, bytes]]] = collections.defaultdict(list)
        self.entries: dict[int, dict[bytes, int]] = collections.defaultdict(dict)

    @classmethod
    def load(cls, store: Store, txn: lmdb.Transaction) -> Tree:
        """Read every entry of ``dirents`` in *txn*; does not block on anything but LMDB."""
        tree = cls()
        for key, value in txn.cursor(db=store.dbs["dirents"]):
            parent, name = read_u64(key[:8]), bytes(key[8:])
            child = read_pair(value)[0]
            tree.parents[child].append((parent, name))
            tree.entries[parent][name] = child
        return tree

    def paths(self, inode: int, limit: int = 64) -> list[bytes]:
        """Return up to *limit* paths of *inode*, relative to the root, sorted.

        A hard-linked file has one path per name. An inode that no entry
        names (unlinked but still open) has none; the root's path is b"".
        """
        found: list[bytes] = []
        self._collect(inode, b"", set(), found, limit)
        return sorted(found)

    def _collect(
        self, inode: int, tail: bytes, seen: set[int], found: list[bytes], limit: int
    ) -> None:
        if inode == ROOT:
            found.append(tail)
            return
        if inode in seen:  # a loop would be damage (fsck's business); stop here
            return
        seen = seen | {inode}
        for parent, name in self.parents.get(inode, ()):
            if len(found) >= limit:
                return
            self._collect(parent, name + (b"/" + tail if tail else b""), seen, found, limit)

    def resolve(self, path: bytes | str) -> int | None:
        """Return the inode at *path* (relative to the root; no symlinks followed)."""
        if isinstance(path, str):
            path = path.encode()
        inode: int | None = ROOT
        for part in path.strip(b"/").split(b"/"):
            if not part:
                continue
            inode = self.entries.get(inode, {}).get(part) if inode is not None else None
            if inode is None:
                return None
        return inode

    def children(self, inode: int) -> dict[bytes, int]:
        return self.entries.get(inode, {})

    def descendants(self, inode: int) -> Iterator[int]:
        """Yield *inode* and every inode below it, each once."""
        seen = {inode}
        todo = [inode]
        while todo:
            current = todo.pop()
            yield current
            for child in self.entries.get(current, {}).values():
                if child not in seen:
                    seen.add(child)
                    todo.append(child)


def file_extents(store: Store, txn: lmdb.Transaction, inode: int) -> list[tuple[int, Extent]]:
    """Return (file offset, extent) of every extent of *inode*."""
    return list(store.extents(txn, inode, 0, 1 << 63))


def read_data_sync(
    store: Store, txn: lmdb.Transaction, inode: int, limit: int = 64 * 1024 * 1024
) -> bytes:
    """Return the committed bytes of regular file *inode*; holes read as zeros.

    Reads packs (blocking) while *txn* is open, so keep to small files: raises
    ValueError past *limit* bytes, KeyError if *inode* is not a regular file,
    and ChunkError if a chunk cannot be read back.
    """
    raw = txn.get(schema.u64(inode), db=store.dbs["inodes"])
    if raw is None or not stat.S_ISREG(Inode.unpack(raw).mode):
        raise KeyError(inode)
    size = Inode.unpack(raw).size
    if size > limit:
        raise ValueError(f"inode {inode} has {size} bytes, more than {limit}")
    buf = bytearray(size)
    for offset, ext in file_extents(store, txn, inode):
        data = load_chunk_sync(store, ext.chunk_id, store.get_chunk(txn, ext.chunk_id))
        buf[offset : offset + ext.length] = data[ext.chunk_offset : ext.chunk_offset + ext.length]
    return bytes(buf)


def users_of(
    store: Store, txn: lmdb.Transaction, chunk_ids: Iterable[bytes]
) -> dict[bytes, dict[int, list[int]]]:
    """Return {chunk id: {inode: [file offsets]}} for every extent naming one of
    *chunk_ids*. Scans the whole ``extents`` sub-database once."""
    wanted = set(chunk_ids)
    users: dict[bytes, dict[int, list[int]]] = {cid: {} for cid in wanted}
    if not wanted:
        return users
    for key, value in txn.cursor(db=store.dbs["extents"]):
        chunk_id = bytes(value[: schema.CHUNK_ID_LEN])
        if chunk_id in wanted:
            inode, offset = read_pair(key)
            users[chunk_id].setdefault(inode, []).append(offset)
    return users
