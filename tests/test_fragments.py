"""Small overwrites inside a large file: stored as chunks of their own with the
old extents split around them, then re-chunked once the file is quiet.

The first step keeps random small writes cheap (they cost their own size, not
a whole chunk each); the second puts content-defined boundaries back so that
the store neither keeps the overwritten parts of old chunks nor dedups worse.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from fuse_helpers import Mount, random_bytes, read_bytes, wait_for, write_bytes

from buildatfs.store import Store

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

KiB, MiB = 1 << 10, 1 << 20
REGROUP_TIMEOUT = 60.0


def fragment_count(store_path: Path, name: str) -> tuple[int, int]:
    """(extents naming only part of a chunk, extents in all) of the file *name*
    in the store's root directory; the store must not be mounted."""
    store = Store.open(store_path, readonly=True)
    try:
        with store.env.begin() as txn:
            inode = store.lookup(txn, 1, name.encode())
            assert inode is not None
            partial = total = 0
            for _, ext in store.extents(txn, inode, 0, 1 << 62):
                chunk = store.get_chunk(txn, ext.chunk_id)
                assert chunk is not None
                total += 1
                partial += ext.chunk_offset != 0 or ext.length != chunk.raw_len
            return partial, total
    finally:
        store.close()


def wait_for_regroup(mnt: Mount) -> None:
    wait_for(
        lambda: "small overwrites had fragmented" in mnt.log_path.read_text(),
        REGROUP_TIMEOUT,
        "re-chunking of the fragmented file",
    )


def assert_regrouped(mnt: Mount, name: str) -> None:
    """Unmount, then check that no extent of *name* names part of a chunk."""
    mnt.umount()
    partial, total = fragment_count(mnt.store, name)
    assert partial == 0, f"{partial} of {total} extents still name part of a chunk"


def overwrite(path: Path, model: bytearray, count: int, seed: int) -> None:
    """pwrite *count* 8 KiB pieces at random offsets (not page-aligned), fsync."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for i in range(count):
            offset = rng.randrange(len(model) - 8 * KiB)
            piece = random_bytes(8 * KiB, seed=seed * 1000 + i)
            os.pwrite(fd, piece, offset)
            model[offset : offset + len(piece)] = piece
        os.fsync(fd)
    finally:
        os.close(fd)


def test_small_overwrites_split_then_regroup(mounted: Path, mount_ctl: Mount) -> None:
    path = mounted / "db"
    model = bytearray(random_bytes(16 * MiB, seed=21))
    write_bytes(path, bytes(model), fsync=True)
    mount_ctl.remount()
    stored_before = mount_ctl.stats()["stored_bytes"]

    overwrite(path, model, 200, seed=22)
    assert read_bytes(path) == model
    # Each overwrite is stored at about its own size (the kernel writes back
    # the three whole pages it touches; random data does not compress), not
    # as the whole chunk of about 64 KiB under it.
    growth = mount_ctl.stats()["stored_bytes"] - stored_before
    assert growth < 200 * 16 * KiB, f"200 8-KiB writes grew the store by {growth} bytes"

    mount_ctl.umount()
    partial, total = fragment_count(mount_ctl.store, "db")
    assert partial >= 200, f"expected split extents, found {partial} of {total}"
    mount_ctl.mount()
    assert read_bytes(path) == model  # the split extents read back right, cold

    overwrite(path, model, 50, seed=23)
    wait_for_regroup(mount_ctl)
    assert read_bytes(path) == model
    assert_regrouped(mount_ctl, "db")
    mount_ctl.mount()
    assert read_bytes(path) == model


def test_regroup_waits_for_new_writes(mounted: Path, mount_ctl: Mount) -> None:
    """A file written again while it waits to be re-chunked keeps every write."""
    path = mounted / "busy"
    model = bytearray(random_bytes(4 * MiB, seed=31))
    write_bytes(path, bytes(model), fsync=True)
    for round_ in range(6):
        overwrite(path, model, 20, seed=40 + round_)
        time.sleep(2.5)
    with open(path, "ab") as f:
        tail = random_bytes(300 * KiB, seed=50)
        f.write(tail)
    model += tail
    assert read_bytes(path) == model
    wait_for_regroup(mount_ctl)
    mount_ctl.remount()
    assert read_bytes(path) == model


def test_regroup_survives_a_restart(mounted: Path, mount_ctl: Mount) -> None:
    """A file left fragmented at unmount is re-chunked after the next mount."""
    path = mounted / "restart"
    model = bytearray(random_bytes(4 * MiB, seed=61))
    write_bytes(path, bytes(model), fsync=True)
    overwrite(path, model, 30, seed=62)
    mount_ctl.umount()  # before the file has been quiet long enough
    partial, _ = fragment_count(mount_ctl.store, "restart")
    assert partial > 0
    mount_ctl.mount()
    wait_for_regroup(mount_ctl)
    assert_regrouped(mount_ctl, "restart")
    mount_ctl.mount()
    assert read_bytes(path) == model
