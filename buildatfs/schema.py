"""The on-disk truth: every LMDB sub-database, its keys, values and invariants.

A store is a directory::

    STORE/
      meta/        LMDB environment (this module's sub-databases)
      packs/       append-only pack files of chunk records (see codec.py)
      staging/     data written through the mount but not yet committed
      lock         flock()ed by the daemon that has the store mounted; holds its pid
      buildatfs.log  the daemon's log

All integers in keys are big-endian so that LMDB's byte order is numeric order.

Sub-databases
-------------

``meta``        name (ASCII bytes) -> value
    ``format``      format version, decimal ASCII (FORMAT_VERSION)
    ``chunker``     JSON of the FastCDC parameters, fixed at ``init``
    ``clean``       b"1" when the last mount ended cleanly, b"0" while mounted
    ``next_inode``  u64, the next inode number to hand out (never reused)
    ``next_cookie`` u64, the next readdir cookie to hand out (never reused)
    ``dict:<id>``   a zstd dictionary that compacted chunk records name by
    that id (decimal ASCII; see codec.py); never removed while a record may
    use it.
    ``fragmented:<inode>``  b"" while small overwrites have left that file
    fragmented and it waits to be re-chunked (commit.py); inode in decimal.
    counters (u64): ``logical_bytes`` (sum of sizes of regular files, each inode
    once), ``unique_bytes`` (sum of raw lengths of live chunks), ``chunks``,
    ``files`` (regular-file inodes), ``directories``, ``inodes``.

``inodes``      inode u64 -> INODE record (mode, uid, gid, nlink, size, rdev,
    atime, mtime, ctime in ns, generation, allocated). ``allocated`` is the
    number of file bytes covered by extents; holes are not counted.

``dirents``     parent u64 + name -> child u64 + cookie u64
``dircookies``  parent u64 + cookie u64 -> name
    Every dirent has exactly one dircookie and the other way round. Readdir
    walks ``dircookies`` in cookie order, so an offset stays valid while other
    entries come and go.

``xattrs``      inode u64 + name -> value
``symlinks``    inode u64 -> target

``extents``     inode u64 + file offset u64 -> chunk id (32) + offset in chunk
    u32 + length u32. A file's extents do not overlap and lie inside its size;
    a range without an extent is a hole and reads as zeros.

``chunks``      chunk id (blake3 of the raw data, 32 bytes) -> CHUNK record
    (pack, offset of the record in the pack, record length, raw length,
    refcount). refcount equals the number of extents naming the chunk; a chunk
    whose refcount drops to zero is deleted and its record counts as dead in
    its pack.

``packs``       pack u64 -> PACK record (size, dead). ``size`` is the length of
    the pack up to its last record that an index entry has ever named; bytes
    past it are left-overs of an interrupted commit. ``dead`` is the number of
    bytes in it that no chunk entry uses.

``orphans``     inode u64 -> b"" for inodes whose nlink is 0 but that were still
    open or known to the kernel; they are purged on release/forget or, after
    a crash, at the next mount.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Final

FORMAT_VERSION: Final = 1
ROOT_INODE: Final = 1
CHUNK_ID_LEN: Final = 32
NAME_MAX: Final = 255

DATABASES: Final = (
    b"meta",
    b"inodes",
    b"dirents",
    b"dircookies",
    b"xattrs",
    b"symlinks",
    b"extents",
    b"chunks",
    b"packs",
    b"orphans",
)

COUNTERS: Final = (
    "logical_bytes",
    "unique_bytes",
    "chunks",
    "files",
    "directories",
    "inodes",
)

U64: Final = struct.Struct(">Q")
U64_PAIR: Final = struct.Struct(">QQ")
_INODE: Final = struct.Struct(">IIIIQQqqqQQ")
_EXTENT: Final = struct.Struct(">32sII")
_CHUNK: Final = struct.Struct(">QQIIQ")


def u64(value: int) -> bytes:
    return U64.pack(value)


def read_u64(raw: bytes) -> int:
    return U64.unpack(raw)[0]


def pair(first: int, second: int) -> bytes:
    return U64_PAIR.pack(first, second)


def read_pair(raw: bytes) -> tuple[int, int]:
    return U64_PAIR.unpack(raw)


@dataclasses.dataclass(slots=True)
class Inode:
    """One ``inodes`` record; times are nanoseconds since the epoch."""

    mode: int
    uid: int
    gid: int
    nlink: int
    size: int = 0
    rdev: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    generation: int = 1
    allocated: int = 0

    def pack(self) -> bytes:
        # (not dataclasses.astuple, which deep-copies: this runs on every
        # metadata change)
        return _INODE.pack(
            self.mode, self.uid, self.gid, self.nlink, self.size, self.rdev,
            self.atime_ns, self.mtime_ns, self.ctime_ns, self.generation, self.allocated,
        )  # fmt: skip

    @classmethod
    def unpack(cls, raw: bytes) -> Inode:
        return cls(*_INODE.unpack(raw))


@dataclasses.dataclass(slots=True, frozen=True)
class Extent:
    """One ``extents`` value: bytes [chunk_offset, chunk_offset+length) of a chunk."""

    chunk_id: bytes
    chunk_offset: int
    length: int

    def pack(self) -> bytes:
        return _EXTENT.pack(self.chunk_id, self.chunk_offset, self.length)

    @classmethod
    def unpack(cls, raw: bytes) -> Extent:
        return cls(*_EXTENT.unpack(raw))


@dataclasses.dataclass(slots=True)
class Chunk:
    """One ``chunks`` value: where a chunk's record lies and who uses it."""

    pack: int
    offset: int
    record_len: int
    raw_len: int
    refcount: int

    def pack_value(self) -> bytes:
        return _CHUNK.pack(self.pack, self.offset, self.record_len, self.raw_len, self.refcount)

    @classmethod
    def unpack(cls, raw: bytes) -> Chunk:
        return cls(*_CHUNK.unpack(raw))


def dirent_key(parent: int, name: bytes) -> bytes:
    return U64.pack(parent) + name


def inode_prefixed(inode: int, suffix: bytes) -> bytes:
    """Key for ``xattrs`` (suffix = name) and similar inode-first keys."""
    return U64.pack(inode) + suffix
