"""One test per fsck invariant: plant the inconsistency in a real store, fsck
finds and repairs it (exit 1), a second fsck finds nothing (exit 0), and the
files still read back.

The inconsistencies are written straight into the store's LMDB index with the
store unmounted, through buildatfs.store.Store (the same code the daemon uses),
so each test breaks exactly one invariant of buildatfs/schema.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fuse_helpers import Mount, describe, random_bytes, read_bytes, write_bytes

from buildatfs import schema
from buildatfs.schema import Chunk, Extent, pair, read_pair, u64
from buildatfs.store import Store

FSCK_CLEAN, FSCK_REPAIRED, FSCK_LEFT = 0, 1, 4
KiB = 1024

FILES = {
    "a": random_bytes(300 * KiB, seed=1),
    "dir/b": b"text " * 20000,
    "dir/sub/c": random_bytes(5 * KiB, seed=2),
}


@pytest.fixture
def filled(mount_ctl: Mount) -> Mount:
    """A store holding FILES and a hard link, unmounted."""
    mount_ctl.mount()
    root = mount_ctl.mountpoint
    (root / "dir" / "sub").mkdir(parents=True)
    for name, data in FILES.items():
        write_bytes(root / name, data, fsync=True)
    os.link(root / "a", root / "dir" / "a-link")
    os.setxattr(root / "a", "user.note", b"kept")
    mount_ctl.umount()
    assert mount_ctl.fsck().returncode == FSCK_CLEAN
    return mount_ctl


def inode_of(store: Store, txn, path: str) -> int:
    inode = schema.ROOT_INODE
    for part in path.split("/"):
        child = store.lookup(txn, inode, part.encode())
        assert child is not None, path
        inode = child
    return inode


def first_extent(store: Store, txn, inode: int) -> tuple[int, Extent]:
    return next(store.extents(txn, inode, 0, 1 << 62))


# Each planter breaks one invariant and returns the check name fsck reports.


def dangling_entry(store: Store, txn) -> str:
    store.add_dirent(txn, schema.ROOT_INODE, b"ghost", 999_999)
    return "dirents"


def entry_without_cookie(store: Store, txn) -> str:
    _, cookie = read_pair(
        txn.get(schema.dirent_key(schema.ROOT_INODE, b"a"), db=store.dbs["dirents"])
    )
    txn.delete(pair(schema.ROOT_INODE, cookie), db=store.dbs["dircookies"])
    return "dirents"


def cookie_without_entry(store: Store, txn) -> str:
    txn.put(pair(schema.ROOT_INODE, 777_777), b"nothing", db=store.dbs["dircookies"])
    return "dirents"


def unreachable_inode(store: Store, txn) -> str:
    child = inode_of(store, txn, "dir/sub/c")
    store.remove_dirent(txn, inode_of(store, txn, "dir/sub"), b"c")
    assert store.get_inode(txn, child) is not None
    return "tree"


def wrong_nlink(store: Store, txn) -> str:
    inode = inode_of(store, txn, "a")
    rec = store.get_inode(txn, inode)
    rec.nlink = 7
    store.put_inode(txn, inode, rec)
    return "tree"


def unpurged_orphan(store: Store, txn) -> str:
    inode = inode_of(store, txn, "dir/sub/c")
    store.remove_dirent(txn, inode_of(store, txn, "dir/sub"), b"c")
    rec = store.get_inode(txn, inode)
    rec.nlink = 0
    store.put_inode(txn, inode, rec)
    txn.put(u64(inode), b"", db=store.dbs["orphans"])
    return "tree"


def extent_past_end(store: Store, txn) -> str:
    inode = inode_of(store, txn, "dir/sub/c")
    _, ext = first_extent(store, txn, inode)
    store.incref(txn, ext.chunk_id)
    store.put_extent(txn, inode, 1 << 20, ext)
    return "extents"


def wrong_allocated(store: Store, txn) -> str:
    inode = inode_of(store, txn, "dir/b")
    rec = store.get_inode(txn, inode)
    rec.allocated += 12345
    store.put_inode(txn, inode, rec)
    return "extents"


def wrong_refcount(store: Store, txn) -> str:
    _, ext = first_extent(store, txn, inode_of(store, txn, "a"))
    chunk = store.get_chunk(txn, ext.chunk_id)
    chunk.refcount += 3
    txn.put(ext.chunk_id, chunk.pack_value(), db=store.dbs["chunks"])
    return "chunks"


def unreferenced_chunk(store: Store, txn) -> str:
    _, ext = first_extent(store, txn, inode_of(store, txn, "a"))
    chunk = store.get_chunk(txn, ext.chunk_id)
    txn.put(
        b"\x01" * 32,
        Chunk(chunk.pack, chunk.offset, chunk.record_len, chunk.raw_len, 1).pack_value(),
        db=store.dbs["chunks"],
    )
    return "chunks"


def wrong_dead_bytes(store: Store, txn) -> str:
    key, value = next(iter(txn.cursor(db=store.dbs["packs"])))
    size, dead = read_pair(value)
    txn.put(key, pair(size, dead + 4096), db=store.dbs["packs"])
    return "packs"


def vanished_empty_pack(store: Store, txn) -> str:
    txn.put(u64(4242), pair(0, 0), db=store.dbs["packs"])
    return "packs"


def xattr_of_missing_inode(store: Store, txn) -> str:
    txn.put(schema.inode_prefixed(888_888, b"user.x"), b"y", db=store.dbs["xattrs"])
    return "xattrs"


def fragmented_mark_of_missing_inode(store: Store, txn) -> str:
    store.set_fragmented(txn, 777_777, True)
    return "meta"


def stray_pack_file(store: Store, txn) -> str:
    """What a gc or compaction pass cut short leaves: a pack nothing names."""
    path = store.packs.path(9_999)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 4096)
    return "packs"


def next_inode_in_use(store: Store, txn) -> str:
    txn.put(b"next_inode", u64(2), db=store.dbs["meta"])
    return "meta"


def wrong_counter(store: Store, txn) -> str:
    store.bump(txn, "logical_bytes", 1000)
    store.bump(txn, "files", 2)
    return "counters"


REPAIRABLE: list[Callable[[Store, object], str]] = [
    dangling_entry,
    entry_without_cookie,
    cookie_without_entry,
    unreachable_inode,
    wrong_nlink,
    unpurged_orphan,
    extent_past_end,
    wrong_allocated,
    wrong_refcount,
    unreferenced_chunk,
    wrong_dead_bytes,
    vanished_empty_pack,
    xattr_of_missing_inode,
    fragmented_mark_of_missing_inode,
    stray_pack_file,
    next_inode_in_use,
    wrong_counter,
]


def plant(store_path: Path, planter: Callable[[Store, object], str]) -> str:
    store = Store.open(store_path)
    try:
        with store.env.begin(write=True) as txn:
            return planter(store, txn)
    finally:
        store.close()


@pytest.mark.fuse
@pytest.mark.parametrize("planter", REPAIRABLE, ids=[p.__name__ for p in REPAIRABLE])
def test_fsck_finds_and_repairs(filled: Mount, planter: Callable[[Store, object], str]) -> None:
    check = plant(filled.store, planter)
    proc = filled.fsck()
    assert proc.returncode == FSCK_REPAIRED, describe(proc)
    assert f"{check}: " in proc.stdout and "(repaired)" in proc.stdout, describe(proc)
    proc = filled.fsck()
    assert proc.returncode == FSCK_CLEAN, describe(proc)

    filled.mount()
    root = filled.mountpoint
    for name, data in FILES.items():
        path = root / name
        if planter is unpurged_orphan and name == "dir/sub/c":
            assert not path.exists()  # the repair purges it, as its unlink meant
            continue
        if not path.exists():  # moved to lost+found by the repair
            path = next((root / "lost+found").iterdir())
        assert read_bytes(path) == data, name
    assert os.getxattr(root / "a", "user.note") == b"kept"
    assert os.stat(root / "a").st_nlink == 2


@pytest.mark.fuse
def test_unreachable_inode_lands_in_lost_and_found(filled: Mount) -> None:
    plant(filled.store, unreachable_inode)
    assert filled.fsck().returncode == FSCK_REPAIRED
    filled.mount()
    found = list((filled.mountpoint / "lost+found").iterdir())
    assert [read_bytes(p) for p in found] == [FILES["dir/sub/c"]]


@pytest.mark.fuse
def test_extent_naming_a_missing_chunk_is_reported_not_hidden(filled: Mount) -> None:
    """Data whose chunk the index lost cannot be repaired: fsck says so (exit 4)
    and reads of that file keep failing with EIO rather than returning zeros."""
    store = Store.open(filled.store)
    try:
        with store.env.begin(write=True) as txn:
            _, ext = first_extent(store, txn, inode_of(store, txn, "a"))
            txn.delete(ext.chunk_id, db=store.dbs["chunks"])
    finally:
        store.close()
    proc = filled.fsck()
    assert proc.returncode == FSCK_LEFT, describe(proc)
    assert "not indexed" in proc.stdout, describe(proc)
    filled.fsck_codes = frozenset({FSCK_LEFT})
    filled.expect_log(r"cannot be read")
    filled.mount()
    with pytest.raises(OSError) as err:
        read_bytes(filled.mountpoint / "a")
    assert err.value.errno == 5
    assert read_bytes(filled.mountpoint / "dir" / "b") == FILES["dir/b"]


@pytest.mark.fuse
def test_leftovers_of_an_unclean_mount_are_recovered(filled: Mount) -> None:
    """Staging files and an unclean flag, as a killed daemon leaves them."""
    (filled.store / "staging" / "12345").write_bytes(b"never committed")
    store = Store.open(filled.store)
    try:
        store.set_clean(False)
    finally:
        store.close()
    proc = filled.fsck()
    assert proc.returncode == FSCK_REPAIRED, describe(proc)
    assert "recovery: discarded 1 uncommitted staging file(s)" in proc.stdout
    assert not any((filled.store / "staging").iterdir())
    assert filled.fsck().returncode == FSCK_CLEAN


def test_every_check_has_a_test() -> None:
    """Each check_* method of the Checker is exercised by a planter above."""
    from buildatfs.fsck import Checker

    checks = {name for name in dir(Checker) if name.startswith("check_")}
    covered = {
        "check_dirents",
        "check_tree",
        "check_extents",
        "check_chunks",
        "check_packs",
        "check_inode_data",
        "check_counters",
    }
    assert checks == covered
