"""The FUSE adapter: pyfuse3 request handlers over a store.

Every handler is wrapped by `handler`: a domain error becomes its errno, an
unexpected exception becomes EIO and one logged traceback, and the mount keeps
serving. LMDB transactions open and close between two awaits, so each one is
atomic with respect to the other handlers (trio runs one task at a time).

Per-inode state kept in memory:
- ``lookups``: the kernel's lookup count, from entry replies minus forgets;
- ``open_count``: open file handles;
- ``dirty``: staged writes (staging.DirtyFile);
- ``locks``: a trio.Lock per file that lets one commit, truncation or purge
  run at a time (writes go on during a commit).
An inode whose nlink drops to 0 is kept (in the ``orphans`` sub-db) until
both counts are zero, then purged with its data.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import functools
import logging
import os
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import lmdb
import pyfuse3
import trio
from pyfuse3 import FileHandleT, FUSEError, InodeT

from buildatfs import compact, faults, gc, schema
from buildatfs.commit import Committer
from buildatfs.errors import ChunkError
from buildatfs.reader import READAHEAD_BYTES, Reader
from buildatfs.schema import Inode, u64
from buildatfs.staging import DirtyFile, MemoryBudget
from buildatfs.store import Store, now_ns

log = logging.getLogger(__name__)

ENTRY_TIMEOUT: Final = 10.0
ATTR_TIMEOUT: Final = 10.0
BLKSIZE: Final = 128 * 1024
IDLE_COMMIT: Final = 3.0  # seconds without writes before a file is committed
FILE_DIRTY_LIMIT: Final = 64 * 1024 * 1024
TOTAL_DIRTY_LIMIT: Final = 512 * 1024 * 1024
CHECKPOINT_INTERVAL: Final = 5.0
GC_INTERVAL: Final = 10.0
DEFRAGMENT_IDLE: Final = 10.0  # seconds a fragmented file stays quiet before re-chunking
# Cold packs are compacted once less than COMPACT_QUIET_BYTES were written in
# the last COMPACT_QUIET_SECONDS: a trickle of log lines must not hold it off.
COMPACT_QUIET_SECONDS: Final = 60
COMPACT_QUIET_BYTES: Final = 4 * 1024 * 1024
COMPACT_RATE: Final = 16 * 1024 * 1024  # bytes per second compaction reads at most
# When idle, the open pack is sealed for compaction only once it holds this
# much, so that quiet spells do not leave many small packs behind.
COMPACT_SEAL_FROM: Final = 4 * 1024 * 1024
SPACE_RESERVE: Final = 64 * 1024 * 1024
XATTR_SIZE_MAX: Final = 65536
RENAME_WHITEOUT: Final = 4
ACL_ACCESS: Final = b"system.posix_acl_access"
_ACL_USER_OBJ, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x04, 0x10, 0x20

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def handler(fn: F) -> F:
    """Translate errors at the FUSE boundary; nothing may end the main loop."""

    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        self.requests[name] += 1
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except ChunkError:
            raise FUSEError(errno.EIO) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise FUSEError(exc.errno) from None
            log.exception("%s failed; answering EIO", fn.__name__)
            raise FUSEError(errno.EIO) from None
        except lmdb.Error as exc:
            # py-lmdb keeps only the message, and a failed page write on a
            # full disk can surface as EIO: ask the disk.
            if "No space left" in str(exc) or self.space_low():
                raise FUSEError(errno.ENOSPC) from None
            log.exception("%s failed in the index; answering EIO", fn.__name__)
            raise FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed; answering EIO", fn.__name__)
            raise FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _negative_entry() -> pyfuse3.EntryAttributes:
    """The reply to a lookup of a missing name: inode 0 lets the kernel cache
    the miss (every later create of that name passes through the kernel)."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = InodeT(0)
    entry.entry_timeout = ENTRY_TIMEOUT
    return entry


_NEGATIVE_ENTRY: Final = _negative_entry()


async def _guarded(fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
    try:
        await fn(*args)
    except Exception:
        log.exception("Background task %s failed; the mount keeps serving", fn.__name__)


def acl_mode(acl: bytes, mode: int) -> int:
    """Return *mode* with its permission bits taken from an access ACL.

    Filesystems with ACLs keep the mode in step with the access ACL (owner,
    group-or-mask and other entries), and tools such as cp and mv set
    permissions through the ACL alone. Raises FUSEError(EINVAL) if *acl* is
    not a version 2 POSIX ACL xattr.
    """
    if len(acl) < 4 or (len(acl) - 4) % 8 or struct.unpack_from("<I", acl)[0] != 2:
        raise FUSEError(errno.EINVAL)
    bits = {}
    for offset in range(4, len(acl), 8):
        tag, perm, _ = struct.unpack_from("<HHI", acl, offset)
        bits[tag] = perm & 7
    group = bits.get(_ACL_MASK, bits.get(_ACL_GROUP_OBJ, 0))
    perms = bits.get(_ACL_USER_OBJ, 0) << 6 | group << 3 | bits.get(_ACL_OTHER, 0)
    return (mode & ~0o777) | perms


def _check_name(name: bytes) -> None:
    if len(name) > schema.NAME_MAX:
        raise FUSEError(errno.ENAMETOOLONG)


def _is_dir(rec: Inode) -> bool:
    return stat.S_ISDIR(rec.mode)


@dataclasses.dataclass(slots=True)
class Stream:
    """Where one file handle reads, for readahead.

    ``end`` is where its last read ended; a read that starts there continues
    a sequential run. ``ahead`` is how far readahead has been started.
    """

    end: int = -1
    ahead: int = 0


class Operations(pyfuse3.Operations):
    enable_writeback_cache = True
    supports_dot_lookup = False

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store
        self.limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
        # Reads, readahead included, have threads of their own: a long
        # readahead must not hold up a commit's hashing and compression, nor
        # a commit the reads.
        self.read_limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
        self.reader = Reader(store, self.read_limiter)
        self.committer = Committer(store, self.reader, self.limiter)
        self.lookups: dict[int, int] = {}
        self.open_count: dict[int, int] = {}
        self.handles: dict[int, int] = {}
        self.streams: dict[int, Stream] = {}  # file handle -> where it reads
        self.dirty: dict[int, DirtyFile] = {}
        self.staging_memory = MemoryBudget()
        self.locks: dict[int, trio.Lock] = {}
        self.nursery: trio.Nursery | None = None
        self.changed_since_sync = False
        self.gc_lock = trio.Lock()
        self.compactor = compact.Compactor(store)
        self.bytes_written = 0  # through this mount, in all
        self.compaction_done = False  # until the next write
        self.low_on_space = False
        self.initialized = trio.Event()
        self.write_failed: set[int] = set()  # inodes whose writes fail until truncated or closed
        self.requests: collections.Counter[str] = collections.Counter()  # served, by kind
        self._next_fh = 1

    # ---- helpers ------------------------------------------------------------

    def _get(self, txn, inode: int) -> Inode:
        rec = self.store.get_inode(txn, inode)
        if rec is None:
            raise FUSEError(errno.ENOENT)
        return rec

    def _entry(self, inode: int, rec: Inode) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = InodeT(inode)
        entry.generation = rec.generation
        entry.entry_timeout = ENTRY_TIMEOUT
        entry.attr_timeout = ATTR_TIMEOUT
        entry.st_mode = rec.mode
        entry.st_nlink = rec.nlink
        entry.st_uid = rec.uid
        entry.st_gid = rec.gid
        entry.st_rdev = rec.rdev
        size, allocated = rec.size, rec.allocated
        dirty = self.dirty.get(inode)
        if dirty is not None:
            size = dirty.size
            allocated += dirty.staged_bytes
        entry.st_size = size
        entry.st_blksize = BLKSIZE
        entry.st_blocks = (min(allocated, size) + 511) // 512
        entry.st_atime_ns = rec.atime_ns
        entry.st_mtime_ns = rec.mtime_ns
        entry.st_ctime_ns = rec.ctime_ns
        return entry

    def _remember(self, inode: int, rec: Inode) -> pyfuse3.EntryAttributes:
        """Return the entry for a reply that raises the kernel's lookup count."""
        self.lookups[inode] = self.lookups.get(inode, 0) + 1
        return self._entry(inode, rec)

    def _lock(self, inode: int) -> trio.Lock:
        """The lock that lets one commit, truncation or purge of *inode* run at a time."""
        lock = self.locks.get(inode)
        if lock is None:
            lock = self.locks[inode] = trio.Lock()
        return lock

    def _drop_lock(self, inode: int) -> None:
        """Forget an idle lock; one in use stays, or two tasks would hold "the" lock."""
        lock = self.locks.get(inode)
        if lock is not None and not lock.locked() and not lock.statistics().tasks_waiting:
            del self.locks[inode]

    def _touch_dir(self, txn, parent: int, rec: Inode, t: int, nlink_delta: int = 0) -> None:
        rec.mtime_ns = rec.ctime_ns = t
        rec.nlink += nlink_delta
        self.store.put_inode(txn, parent, rec)

    def _changed(self) -> None:
        self.changed_since_sync = True

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run *fn* in the background; its failure is logged, never fatal."""
        assert self.nursery is not None
        self.nursery.start_soon(_guarded, fn, *args)

    def space_low(self) -> bool:
        """True if the store's disk is down to its reserve.

        Staged bytes still need their room in a pack, so they count as used.
        Writes get ENOSPC below the reserve, so that commits, deletions and
        the index always find room to finish.
        """
        st = os.statvfs(self.store.path)
        free = st.f_bavail * st.f_frsize
        reserve = min(SPACE_RESERVE, st.f_blocks * st.f_frsize // 10)
        was_low = self.low_on_space
        if free > reserve + TOTAL_DIRTY_LIMIT:
            self.low_on_space = False
        else:
            staged = sum(dirty.staged_bytes for dirty in self.dirty.values())
            self.low_on_space = free < reserve + staged
        if self.low_on_space and not was_low:
            log.warning(
                "The disk of %s is full (%d bytes free, %d staged); writes fail with ENOSPC "
                "until files are deleted or the disk grows.",
                self.store.path,
                free,
                sum(dirty.staged_bytes for dirty in self.dirty.values()),
            )
        elif was_low and not self.low_on_space:
            log.info("The disk of %s has room again; writes are accepted.", self.store.path)
        return self.low_on_space

    def init(self) -> None:
        """Called by pyfuse3 once the kernel's INIT request is handled."""
        self.initialized.set()

    # ---- lookup and attributes ----------------------------------------------

    @handler
    async def lookup(
        self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        _check_name(name)
        with self.store.env.begin() as txn:
            child = self.store.lookup(txn, parent_inode, name)
            if child is None:
                return _NEGATIVE_ENTRY
            return self._remember(child, self._get(txn, child))

    @handler
    async def getattr(
        self, inode: InodeT, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        with self.store.env.begin() as txn:
            return self._entry(inode, self._get(txn, inode))

    @handler
    async def setattr(
        self,
        inode: InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        t = now_ns()
        if fields.update_size:
            await self._truncate(inode, attr.st_size, t, explicit_mtime=fields.update_mtime)
        with self.store.env.begin(write=True) as txn:
            rec = self._get(txn, inode)
            if fields.update_mode:
                rec.mode = stat.S_IFMT(rec.mode) | stat.S_IMODE(attr.st_mode)
            if fields.update_uid:
                rec.uid = attr.st_uid
            if fields.update_gid:
                rec.gid = attr.st_gid
            if fields.update_atime:
                rec.atime_ns = attr.st_atime_ns
            if fields.update_mtime:
                rec.mtime_ns = attr.st_mtime_ns
            rec.ctime_ns = attr.st_ctime_ns if fields.update_ctime else t
            self.store.put_inode(txn, inode, rec)
        self._changed()
        return self._entry(inode, rec)

    async def _truncate(self, inode: int, size: int, t: int, explicit_mtime: bool = False) -> None:
        self.write_failed.discard(inode)
        async with self._lock(inode):
            dirty = self.dirty.get(inode)
            if dirty is not None:
                dirty.truncate(size)
            with self.store.env.begin(write=True) as txn:
                rec = self._get(txn, inode)
                if not stat.S_ISREG(rec.mode):
                    raise FUSEError(errno.EINVAL)
                self.store.set_size(txn, inode, rec, size)
                if not explicit_mtime:
                    rec.mtime_ns = rec.ctime_ns = t
                self.store.put_inode(txn, inode, rec)
        self._changed()

    @handler
    async def readlink(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        with self.store.env.begin() as txn:
            target = txn.get(u64(inode), db=self.store.dbs["symlinks"])
        if target is None:
            raise FUSEError(errno.EINVAL)
        return target

    @handler
    async def forget(self, inode_list: list[tuple[InodeT, int]]) -> None:
        for inode, count in inode_list:
            left = self.lookups.get(inode, 0) - count
            if left > 0:
                self.lookups[inode] = left
                continue
            self.lookups.pop(inode, None)
            self._maybe_purge(inode)

    def _maybe_purge(self, inode: int) -> None:
        """Purge *inode* if no entry, no handle and no kernel reference is left."""
        if self.lookups.get(inode) or self.open_count.get(inode):
            return
        with self.store.env.begin() as txn:
            if txn.get(u64(inode), db=self.store.dbs["orphans"]) is None:
                self._drop_lock(inode)
                return
        self._spawn(self._purge, inode)

    async def _purge(self, inode: int) -> None:
        async with self._lock(inode):
            if self.lookups.get(inode) or self.open_count.get(inode):
                return
            dirty = self.dirty.pop(inode, None)
            if dirty is not None:
                dirty.discard()
            with self.store.env.begin(write=True) as txn:
                self.store.purge_inode(txn, inode)
        self._drop_lock(inode)
        self._changed()

    # ---- creating and removing entries ---------------------------------------

    def _new_child(
        self,
        txn,
        parent_inode: int,
        name: bytes,
        mode: int,
        ctx: pyfuse3.RequestContext,
        rdev: int = 0,
        size: int = 0,
    ) -> tuple[int, Inode]:
        """Create an inode and its entry; EEXIST, ENOTDIR and ENAMETOOLONG as ext4."""
        _check_name(name)
        parent = self._get(txn, parent_inode)
        if not _is_dir(parent):
            raise FUSEError(errno.ENOTDIR)
        if parent.nlink == 0:
            raise FUSEError(errno.ENOENT)
        if self.store.lookup(txn, parent_inode, name) is not None:
            raise FUSEError(errno.EEXIST)
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        t = now_ns()
        rec = Inode(
            mode=mode,
            uid=ctx.uid,
            gid=gid,
            nlink=2 if stat.S_ISDIR(mode) else 1,
            size=size,
            rdev=rdev,
            atime_ns=t,
            mtime_ns=t,
            ctime_ns=t,
        )
        inode = self.store.create_inode(txn, rec)
        self.store.add_dirent(txn, parent_inode, name, inode)
        self._touch_dir(txn, parent_inode, parent, t, 1 if stat.S_ISDIR(mode) else 0)
        self._changed()
        return inode, rec

    @handler
    async def mkdir(
        self, parent_inode: InodeT, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        mode = stat.S_IFDIR | (stat.S_IMODE(mode) & ~ctx.umask)
        with self.store.env.begin(write=True) as txn:
            inode, rec = self._new_child(txn, parent_inode, name, mode, ctx)
        return self._remember(inode, rec)

    @handler
    async def mknod(
        self, parent_inode: InodeT, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        mode = stat.S_IFMT(mode) | (stat.S_IMODE(mode) & ~ctx.umask)
        with self.store.env.begin(write=True) as txn:
            inode, rec = self._new_child(txn, parent_inode, name, mode, ctx, rdev=rdev)
        return self._remember(inode, rec)

    @handler
    async def symlink(
        self, parent_inode: InodeT, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        with self.store.env.begin(write=True) as txn:
            inode, rec = self._new_child(
                txn, parent_inode, name, stat.S_IFLNK | 0o777, ctx, size=len(target)
            )
            txn.put(u64(inode), target, db=self.store.dbs["symlinks"])
        return self._remember(inode, rec)

    @handler
    async def create(
        self, parent_inode: InodeT, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        mode = stat.S_IFREG | (stat.S_IMODE(mode) & ~ctx.umask)
        with self.store.env.begin(write=True) as txn:
            inode, rec = self._new_child(txn, parent_inode, name, mode, ctx)
        return self._open_handle(inode), self._remember(inode, rec)

    @handler
    async def link(
        self, inode: InodeT, new_parent_inode: InodeT, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        _check_name(new_name)
        t = now_ns()
        with self.store.env.begin(write=True) as txn:
            rec = self._get(txn, inode)
            parent = self._get(txn, new_parent_inode)
            if _is_dir(rec):
                raise FUSEError(errno.EPERM)
            if rec.nlink == 0:
                raise FUSEError(errno.ENOENT)
            if self.store.lookup(txn, new_parent_inode, new_name) is not None:
                raise FUSEError(errno.EEXIST)
            self.store.add_dirent(txn, new_parent_inode, new_name, inode)
            rec.nlink += 1
            rec.ctime_ns = t
            self.store.put_inode(txn, inode, rec)
            self._touch_dir(txn, new_parent_inode, parent, t)
        self._changed()
        return self._remember(inode, rec)

    @handler
    async def unlink(self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        _check_name(name)
        with self.store.env.begin(write=True) as txn:
            child = self._child(txn, parent_inode, name)
            if _is_dir(self._get(txn, child)):
                raise FUSEError(errno.EISDIR)
            self._remove_entry(txn, parent_inode, name, now_ns())
        self._maybe_purge(child)

    @handler
    async def rmdir(self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        _check_name(name)
        with self.store.env.begin(write=True) as txn:
            child = self._child(txn, parent_inode, name)
            rec = self._get(txn, child)
            if not _is_dir(rec):
                raise FUSEError(errno.ENOTDIR)
            if self.store.has_children(txn, child):
                raise FUSEError(errno.ENOTEMPTY)
            self._remove_entry(txn, parent_inode, name, now_ns())
        self._maybe_purge(child)

    def _child(self, txn, parent_inode: int, name: bytes) -> int:
        child = self.store.lookup(txn, parent_inode, name)
        if child is None:
            raise FUSEError(errno.ENOENT)
        return child

    def _remove_entry(self, txn, parent_inode: int, name: bytes, t: int) -> int:
        """Remove an entry, drop the child's link and park it in ``orphans`` at 0."""
        child = self.store.remove_dirent(txn, parent_inode, name)
        rec = self._get(txn, child)
        is_dir = _is_dir(rec)
        rec.nlink = 0 if is_dir else rec.nlink - 1
        rec.ctime_ns = t
        self.store.put_inode(txn, child, rec)
        if rec.nlink == 0:
            txn.put(u64(child), b"", db=self.store.dbs["orphans"])
        self._touch_dir(txn, parent_inode, self._get(txn, parent_inode), t, -1 if is_dir else 0)
        self._changed()
        return child

    @handler
    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: bytes,
        parent_inode_new: InodeT,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        _check_name(name_old)
        _check_name(name_new)
        if flags & ~(pyfuse3.RENAME_EXCHANGE | pyfuse3.RENAME_NOREPLACE | RENAME_WHITEOUT):
            raise FUSEError(errno.EINVAL)
        replaced = None
        with self.store.env.begin(write=True) as txn:
            t = now_ns()
            child = self._child(txn, parent_inode_old, name_old)
            target = self.store.lookup(txn, parent_inode_new, name_new)
            if flags & pyfuse3.RENAME_EXCHANGE:
                if target is None:
                    raise FUSEError(errno.ENOENT)
                self._exchange(
                    txn, parent_inode_old, name_old, child, parent_inode_new, name_new, target, t
                )
                return
            if target is not None:
                if flags & pyfuse3.RENAME_NOREPLACE:
                    raise FUSEError(errno.EEXIST)
                self._check_replace(txn, child, target)
                replaced = self._remove_entry(txn, parent_inode_new, name_new, t)
            self._move(txn, parent_inode_old, name_old, child, parent_inode_new, name_new, t)
            if flags & RENAME_WHITEOUT:
                self._new_child(txn, parent_inode_old, name_old, stat.S_IFCHR, ctx, rdev=0)
        self._changed()
        if replaced is not None:
            self._maybe_purge(replaced)

    def _check_replace(self, txn, child: int, target: int) -> None:
        src_dir = _is_dir(self._get(txn, child))
        dst_dir = _is_dir(self._get(txn, target))
        if src_dir and not dst_dir:
            raise FUSEError(errno.ENOTDIR)
        if dst_dir and not src_dir:
            raise FUSEError(errno.EISDIR)
        if dst_dir and self.store.has_children(txn, target):
            raise FUSEError(errno.ENOTEMPTY)

    def _move(
        self,
        txn,
        old_parent: int,
        old_name: bytes,
        child: int,
        new_parent: int,
        new_name: bytes,
        t: int,
    ) -> None:
        self.store.remove_dirent(txn, old_parent, old_name)
        self.store.add_dirent(txn, new_parent, new_name, child)
        rec = self._get(txn, child)
        rec.ctime_ns = t
        self.store.put_inode(txn, child, rec)
        moved_dir = 1 if _is_dir(rec) and old_parent != new_parent else 0
        self._touch_dir(txn, old_parent, self._get(txn, old_parent), t, -moved_dir)
        self._touch_dir(txn, new_parent, self._get(txn, new_parent), t, moved_dir)

    def _exchange(
        self,
        txn,
        parent_a: int,
        name_a: bytes,
        inode_a: int,
        parent_b: int,
        name_b: bytes,
        inode_b: int,
        t: int,
    ) -> None:
        self.store.replace_dirent(txn, parent_a, name_a, inode_b)
        self.store.replace_dirent(txn, parent_b, name_b, inode_a)
        rec_a, rec_b = self._get(txn, inode_a), self._get(txn, inode_b)
        for inode, rec in ((inode_a, rec_a), (inode_b, rec_b)):
            rec.ctime_ns = t
            self.store.put_inode(txn, inode, rec)
        shift = (1 if _is_dir(rec_a) else 0) - (1 if _is_dir(rec_b) else 0)
        if parent_a == parent_b:
            shift = 0
        self._touch_dir(txn, parent_a, self._get(txn, parent_a), t, -shift)
        if parent_b != parent_a:
            self._touch_dir(txn, parent_b, self._get(txn, parent_b), t, shift)
        self._changed()

    # ---- directories ------------------------------------------------------

    @handler
    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT:
        with self.store.env.begin() as txn:
            if not _is_dir(self._get(txn, inode)):
                raise FUSEError(errno.ENOTDIR)
        return FileHandleT(inode)

    @handler
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        with self.store.env.begin() as txn:
            for cookie, name in self.store.children(txn, fh, start_id):
                child = self.store.lookup(txn, fh, name)
                rec = self.store.get_inode(txn, child) if child is not None else None
                if rec is None:
                    continue
                if not pyfuse3.readdir_reply(token, name, self._entry(child, rec), cookie):
                    return
                self.lookups[child] = self.lookups.get(child, 0) + 1

    @handler
    async def releasedir(self, fh: FileHandleT) -> None:
        return None

    @handler
    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        await self._sync()

    # ---- xattrs -----------------------------------------------------------

    @handler
    async def getxattr(self, inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        with self.store.env.begin() as txn:
            value = txn.get(schema.inode_prefixed(inode, name), db=self.store.dbs["xattrs"])
        if value is None:
            raise FUSEError(pyfuse3.ENOATTR)
        return value

    @handler
    async def setxattr(
        self, inode: InodeT, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        if len(name) > schema.NAME_MAX or not name:
            raise FUSEError(errno.ERANGE)
        if len(value) > XATTR_SIZE_MAX:
            raise FUSEError(errno.E2BIG)
        with self.store.env.begin(write=True) as txn:
            rec = self._get(txn, inode)
            if name == ACL_ACCESS:
                rec.mode = acl_mode(value, rec.mode)
            txn.put(schema.inode_prefixed(inode, name), value, db=self.store.dbs["xattrs"])
            rec.ctime_ns = now_ns()
            self.store.put_inode(txn, inode, rec)
        self._changed()
        if name == ACL_ACCESS:
            # The kernel caches the mode and would show the old one; tell it
            # after this reply, since a notification from inside a handler
            # can deadlock.
            self._spawn(trio.to_thread.run_sync, pyfuse3.invalidate_inode, inode, True)

    @handler
    async def listxattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> list[bytes]:
        with self.store.env.begin() as txn:
            return [key[8:] for key in self.store.prefixed_keys(txn, "xattrs", inode)]

    @handler
    async def removexattr(self, inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        with self.store.env.begin(write=True) as txn:
            rec = self._get(txn, inode)
            if not txn.delete(schema.inode_prefixed(inode, name), db=self.store.dbs["xattrs"]):
                raise FUSEError(pyfuse3.ENOATTR)
            rec.ctime_ns = now_ns()
            self.store.put_inode(txn, inode, rec)
        self._changed()

    # ---- file data ----------------------------------------------------------

    def _open_handle(self, inode: int) -> pyfuse3.FileInfo:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = inode
        self.open_count[inode] = self.open_count.get(inode, 0) + 1
        # Every change to file data passes through this mount's kernel page
        # cache, so a cached page is never stale.
        return pyfuse3.FileInfo(fh=FileHandleT(fh), keep_cache=True)

    @handler
    async def open(
        self, inode: InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        with self.store.env.begin() as txn:
            rec = self._get(txn, inode)
        if _is_dir(rec):
            raise FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC and stat.S_ISREG(rec.mode):
            await self._truncate(inode, 0, now_ns())
        return self._open_handle(inode)

    @handler
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        inode = self.handles[fh]
        dirty = self.dirty.get(inode)
        with self.store.env.begin() as txn:
            rec = self._get(txn, inode)
            file_size = dirty.size if dirty is not None else rec.size
            end = min(off + size, file_size)
            if off >= end:
                return b""
            covered = dirty is not None and dirty.covers(off, end)
            pieces = [] if covered else self.reader.plan(txn, inode, off, end)
        ahead = self._next_readahead(fh, off, end, file_size)
        if ahead is not None:
            assert self.nursery is not None
            if not self.reader.readahead(self.nursery, inode, *ahead):
                self.streams[fh].ahead = end  # readahead is full: try again next read
        if dirty is None:
            return await self.reader.read(inode, off, end, pieces)
        # Take the staged bytes now, in the same step as the plan: a commit
        # that lands while the chunks load must not drop them from under us.
        staged = bytearray(end - off)
        parts = dirty.staged_parts(off, end)
        dirty.overlay(off, staged)
        buf = bytearray(end - off)
        await self.reader.fill(inode, off, buf, pieces)
        for s, e in parts:
            buf[s - off : e - off] = staged[s - off : e - off]
        return buf  # pyfuse3 replies from any buffer: no copy to bytes

    def _next_readahead(
        self, fh: int, off: int, end: int, file_size: int
    ) -> tuple[int, int] | None:
        """Note that handle *fh* read [off, end); return the range to read
        ahead next, if it reads sequentially and is within half a window of
        where readahead got to."""
        stream = self.streams.get(fh)
        if stream is None:
            stream = self.streams[fh] = Stream()
        sequential = off == stream.end
        stream.end = end
        if not sequential:
            stream.ahead = 0
            return None
        if stream.ahead - end >= READAHEAD_BYTES // 2:
            return None
        start, stop = max(stream.ahead, end), min(end + READAHEAD_BYTES, file_size)
        if start >= stop:
            return None
        stream.ahead = stop
        return start, stop

    @handler
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        inode = self.handles[fh]
        if inode in self.write_failed or self.space_low():
            # Once one write of a file failed, the kernel's later write-backs
            # of that file fail too, so that it ends where it first failed
            # (as on ext4) instead of holding a hole that reads as zeros.
            # Truncating the file or closing it lifts this.
            self.write_failed.add(inode)
            raise FUSEError(errno.ENOSPC)
        # No await from here on: a commit running meanwhile sees this write
        # either wholly or not at all (staging.DirtyFile).
        self.bytes_written += len(buf)
        self.compaction_done = False
        dirty = self.dirty.get(inode)
        if dirty is None:
            with self.store.env.begin() as txn:
                size = self._get(txn, inode).size
            path = self.store.staging / str(inode)
            dirty = self.dirty[inode] = DirtyFile(path, size, self.staging_memory)
        try:
            dirty.write(off, buf)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self.write_failed.add(inode)
            raise
        if dirty.ranges.total > FILE_DIRTY_LIMIT and not self._lock(inode).locked():
            self._spawn(self._commit_logged, inode)
        return len(buf)

    async def commit(self, inode: int) -> None:
        """Commit what *inode* had staged when called, if anything.

        Takes the inode's lock (one commit, truncation or purge at a time);
        writes go on meanwhile and stay staged for the next commit.
        """
        async with self._lock(inode):
            dirty = self.dirty.get(inode)
            if dirty is None:
                return
            if dirty.ranges:  # (a truncation may have cut them all away)
                ranges, size = dirty.begin_commit()
                try:
                    await self.committer.commit(inode, dirty, ranges, size)
                except BaseException:
                    dirty.end_commit(done=False)
                    raise
                dirty.end_commit(done=True)
                faults.point("commit:index-committed")
            if dirty.clean:
                del self.dirty[inode]
                dirty.discard()
                faults.point("commit:staging-removed")
        self._changed()

    async def _defragment(self, inode: int) -> None:
        """Re-chunk what small overwrites left fragmented, unless the file has
        been written again meanwhile (it is then retried after that commit)."""
        async with self._lock(inode):
            if inode in self.dirty:
                return
            try:
                await self.committer.defragment(inode)
            except Exception:
                log.exception("Re-chunking inode %d failed; its data stays as it is", inode)
        self._changed()

    async def _commit_logged(self, inode: int) -> None:
        try:
            await self.commit(inode)
        except Exception:
            log.exception("Committing inode %d failed; its data stays staged and is retried", inode)

    # No flush handler: pyfuse3 answers ENOSYS, after which the kernel sends
    # no more FLUSH requests, one round trip less per close(2). Write errors
    # still reach close(2): the kernel writes the file's dirty pages back
    # before it would send FLUSH and returns their error.

    @handler
    async def release(self, fh: FileHandleT) -> None:
        inode = self.handles.pop(fh)
        self.streams.pop(fh, None)
        left = self.open_count[inode] - 1
        if left:
            self.open_count[inode] = left
            return
        del self.open_count[inode]
        self.write_failed.discard(inode)
        if inode in self.dirty:
            self._spawn(self._commit_logged, inode)
        self._maybe_purge(inode)

    @handler
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        await self.commit(self.handles[fh])
        await self._sync()

    async def _sync(self) -> None:
        self.changed_since_sync = False
        await trio.to_thread.run_sync(self.store.sync_sync)

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.store.path)
        data = pyfuse3.StatvfsData()
        data.f_bsize = st.f_bsize
        data.f_frsize = st.f_frsize
        data.f_blocks = st.f_blocks
        data.f_bfree = st.f_bfree
        data.f_bavail = st.f_bavail
        data.f_files = st.f_files
        data.f_ffree = st.f_ffree
        data.f_favail = st.f_favail
        data.f_namemax = schema.NAME_MAX
        return data

    # ---- background work ----------------------------------------------------

    async def maintain(self) -> None:
        """Commit idle files, bound staging, checkpoint the index, collect
        garbage and compact in the background. Runs until cancelled.

        Garbage collection and compaction run in this task's own nursery, so
        that an unmount cancels them instead of waiting: what a cut-short
        pass copied is not named by the index, and the unmount trims it
        (recovery.trim_packs). Commits run in the handlers' nursery and are
        always finished.
        """
        last_sync = last_gc = time.monotonic()
        # bytes written in each of the last COMPACT_QUIET_SECONDS ticks
        recent: collections.deque[int] = collections.deque(maxlen=COMPACT_QUIET_SECONDS)
        counted = self.bytes_written
        async with trio.open_nursery() as jobs:
            while True:
                await trio.sleep(1)
                now = time.monotonic()
                gc_due = now - last_gc > (1.0 if self.low_on_space else GC_INTERVAL)
                if gc_due and not self.gc_lock.locked():
                    last_gc = now
                    self._retry_purges()
                    jobs.start_soon(_guarded, self.collect_garbage, gc.RATE, gc.DEAD_SHARE)
                recent.append(self.bytes_written - counted)
                counted = self.bytes_written
                quiet = len(recent) == recent.maxlen and sum(recent) < COMPACT_QUIET_BYTES
                if quiet and not self.compaction_done and not self.gc_lock.locked():
                    jobs.start_soon(_guarded, self.compact_idle)
                total = 0
                for inode, dirty in list(self.dirty.items()):
                    total += dirty.staged_bytes
                    idle = now - dirty.last_write > IDLE_COMMIT
                    if idle and not self._lock(inode).locked():
                        self._spawn(self._commit_logged, inode)
                for inode, when in list(self.committer.fragmented.items()):
                    quiet = now - when > DEFRAGMENT_IDLE and inode not in self.dirty
                    if quiet and not self._lock(inode).locked():
                        self._spawn(self._defragment, inode)
                if total > TOTAL_DIRTY_LIMIT and self.dirty:
                    biggest = max(self.dirty, key=lambda i: self.dirty[i].ranges.total)
                    self._spawn(self._commit_logged, biggest)
                if self.changed_since_sync and now - last_sync > CHECKPOINT_INTERVAL:
                    last_sync = now
                    await self._sync()

    def _retry_purges(self) -> None:
        """Purge orphans whose purge failed earlier (a full disk, say)."""
        with self.store.env.begin() as txn:
            orphans = [
                schema.read_u64(k)
                for k in txn.cursor(db=self.store.dbs["orphans"]).iternext(values=False)
            ]
        for inode in orphans:
            if not self.lookups.get(inode) and not self.open_count.get(inode):
                self._spawn(self._purge, inode)

    async def collect_garbage(
        self, rate: float | None, share: float, compact_all: bool = False
    ) -> gc.Report:
        """Run one garbage collection pass (one at a time), then, with
        *compact_all*, compact every cold pack that qualifies."""
        async with self.gc_lock:
            try:
                report = await gc.run_pass(self.store, rate, share, settle=self.committer.settle)
                if compact_all:
                    report.add(await self.compactor.run(rate, settle=self.committer.settle))
                return report
            except Exception:
                log.exception("Garbage collection failed; it is retried later")
                return gc.Report()

    async def compact_idle(self) -> None:
        """Compact one cold pack while the mount is quiet; once none is left,
        rest until the next write."""
        async with self.gc_lock:
            started = self.bytes_written
            try:
                report = await self.compactor.run(
                    COMPACT_RATE,
                    settle=self.committer.settle,
                    max_packs=1,
                    seal_from=COMPACT_SEAL_FROM,
                )
            except Exception:
                log.exception("Compaction failed; it is retried later")
                return
            if not report.packs_removed and self.bytes_written == started:
                self.compaction_done = True

    async def commit_all(self) -> None:
        """Commit every staged file (used at unmount)."""
        for inode in list(self.dirty):
            await self._commit_logged(inode)

    def purge_unreferenced(self) -> None:
        """Purge every orphan: at unmount no handle or lookup is left."""
        with self.store.env.begin(write=True) as txn:
            for key in list(txn.cursor(db=self.store.dbs["orphans"]).iternext(values=False)):
                self.store.purge_inode(txn, schema.read_u64(key))
