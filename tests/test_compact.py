"""Compaction: cold chunks recompressed with a dictionary trained on the store.

Each test copies a real tree in, compacts (by command, or by itself once the
mount is idle), and checks that the packs shrank, that every file reads back
the same after a cold remount, and that `fsck --verify-data` finds every
record intact. Damage is never made worse: a damaged record is kept as it is
and still reads as EIO, and a record whose dictionary is gone reads as EIO,
never as other bytes.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fuse_helpers import (
    Mount,
    cli_env,
    describe,
    flip_byte,
    random_bytes,
    read_bytes,
    run_cli,
    sha256_file,
    wait_for,
    walk_files,
    write_bytes,
)

from buildatfs.store import DICT_PREFIX, Store

pytestmark = pytest.mark.fuse

SMALL_TREE = Path("/usr/share/perl5")  # a few hundred real text files, 6 MB
BIG_TREE = Path("/usr/lib/python3.11")  # enough to fill a pack past the idle seal size
IDLE_TIMEOUT = 240.0


def copy_tree(source: Path, target: Path) -> None:
    subprocess.run(["cp", "-a", str(source), str(target)], check=True, timeout=600)


def fill(mnt: Mount, tree: Path) -> None:
    """Mount and copy *tree* in as ``tree``."""
    mnt.mount()
    copy_tree(tree, mnt.mountpoint / "tree")


def assert_tree_intact(source: Path, copy: Path) -> None:
    for path in walk_files(source):
        assert sha256_file(copy / path.relative_to(source)) == sha256_file(path), path


def first_record(store_path: Path, relative: Path) -> tuple[Path, int, int]:
    """(pack file, offset, length) of the record of the first chunk of a file;
    the store must not be mounted."""
    store = Store.open(store_path, readonly=True)
    try:
        with store.env.begin() as txn:
            inode = 1
            for name in relative.parts:
                found = store.lookup(txn, inode, name.encode())
                assert found is not None, relative
                inode = found
            _, ext = next(store.extents(txn, inode, 0, 1))
            chunk = store.get_chunk(txn, ext.chunk_id)
            assert chunk is not None
            return store.packs.path(chunk.pack), chunk.offset, chunk.record_len
    finally:
        store.close()


def stored(mnt: Mount, target: Path) -> int:
    return int(mnt.stats(target)["stored_bytes"])


@pytest.mark.parametrize("where", ["mounted", "unmounted"])
def test_compact_command_shrinks_store_and_keeps_data(mount_ctl: Mount, where: str) -> None:
    mount_ctl.fsck_args = ("--verify-data",)
    fill(mount_ctl, SMALL_TREE)
    mount_ctl.remount()  # everything committed
    target = mount_ctl.mountpoint if where == "mounted" else mount_ctl.store
    if where == "unmounted":
        mount_ctl.umount()
    before = mount_ctl.stats(target)
    proc = run_cli("gc", "--compact", target)
    assert proc.returncode == 0, describe(proc)
    after = mount_ctl.stats(target)
    assert after["chunks"] == before["chunks"]
    assert after["stored_bytes"] < 0.92 * before["stored_bytes"], (before, after)
    assert after["dead_bytes"] == 0
    # A second pass finds nothing left to do.
    again = run_cli("gc", "--compact", target)
    assert again.returncode == 0, describe(again)
    assert again.stdout.startswith("Removed 0 pack(s)"), describe(again)
    if where == "unmounted":
        proc = mount_ctl.fsck("--verify-data")
        assert proc.returncode == 0, describe(proc)
        mount_ctl.mount()
    else:
        mount_ctl.remount()  # cold: every read decodes a compacted record
    assert_tree_intact(SMALL_TREE, mount_ctl.mountpoint / "tree")


@pytest.mark.slow
def test_compaction_runs_by_itself_when_quiet(mount_ctl: Mount) -> None:
    """A trickle of log lines (as from a container) does not hold it off."""
    mount_ctl.fsck_args = ("--verify-data",)
    fill(mount_ctl, BIG_TREE)
    subprocess.run(["sync", "-f", str(mount_ctl.mountpoint)], check=True)
    before = stored(mount_ctl, mount_ctl.mountpoint)
    started = time.monotonic()
    lines = 0
    with open(mount_ctl.mountpoint / "app.log", "a") as log:

        def compacted() -> bool:
            nonlocal lines
            log.write(f"{time.time():.3f} request {lines} served\n")
            log.flush()
            lines += 1
            return "Compaction rewrote" in mount_ctl.log_path.read_text()

        wait_for(compacted, IDLE_TIMEOUT, "background compaction", interval=1.0)
    assert time.monotonic() - started > 30, "compaction began while the mount was busy"
    after = stored(mount_ctl, mount_ctl.mountpoint)
    assert after < 0.92 * before, (before, after)
    mount_ctl.remount()
    assert_tree_intact(BIG_TREE, mount_ctl.mountpoint / "tree")


@pytest.fixture
def to_damage(mount_ctl: Mount) -> Mount:
    """The small tree copied in, the mount down; teardown expects damage."""
    mount_ctl.expect_damage()
    fill(mount_ctl, SMALL_TREE)
    mount_ctl.umount()
    return mount_ctl


def test_damaged_record_is_kept_as_it_is(to_damage: Mount) -> None:
    mount_ctl = to_damage
    victim = max(walk_files(SMALL_TREE), key=lambda p: p.stat().st_size)
    pack, offset, length = first_record(
        mount_ctl.store, Path("tree") / victim.relative_to(SMALL_TREE)
    )
    flip_byte(pack, offset + length // 2)  # inside the zstd body
    proc = run_cli("gc", "--compact", mount_ctl.store)
    assert proc.returncode == 0, describe(proc)
    mount_ctl.mount()
    with pytest.raises(OSError) as exc:
        read_bytes(mount_ctl.mountpoint / "tree" / victim.relative_to(SMALL_TREE))
    assert exc.value.errno == errno.EIO
    for path in walk_files(SMALL_TREE):
        if path != victim:
            copy = mount_ctl.mountpoint / "tree" / path.relative_to(SMALL_TREE)
            assert sha256_file(copy) == sha256_file(path), path


def test_missing_dictionary_reads_as_eio(to_damage: Mount) -> None:
    mount_ctl = to_damage
    proc = run_cli("gc", "--compact", mount_ctl.store)
    assert proc.returncode == 0, describe(proc)
    store = Store.open(mount_ctl.store)
    try:
        assert store.dicts.raw, "compaction trained no dictionary"
        with store.env.begin(write=True) as txn:
            for dict_id in store.dicts.raw:
                assert txn.delete(DICT_PREFIX + str(dict_id).encode(), db=store.dbs["meta"])
    finally:
        store.close()
    mount_ctl.mount()
    errors = 0
    for path in walk_files(SMALL_TREE):
        try:
            data = read_bytes(mount_ctl.mountpoint / "tree" / path.relative_to(SMALL_TREE))
        except OSError as exc:
            assert exc.errno == errno.EIO
            errors += 1
        else:
            assert data == path.read_bytes(), path
    assert errors > 0
    mount_ctl.umount()
    proc = mount_ctl.fsck("--verify-data", "--no-repair")
    assert proc.returncode in (1, 4), describe(proc)
    assert "not in the store" in proc.stdout + proc.stderr, describe(proc)


def start_cli(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "buildatfs", *map(str, args)],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_unmount_during_compaction_leaves_no_stray_pack(mount_ctl: Mount) -> None:
    fill(mount_ctl, BIG_TREE)
    mount_ctl.remount()
    compaction = start_cli("gc", "--compact", mount_ctl.mountpoint)
    # Commits during the pass put their records after its copies in the open
    # pack, so cutting the pack's end cannot remove those copies.
    written = {}
    deadline = time.monotonic() + 3  # well inside the pass: 50 MB at zstd level 19
    while time.monotonic() < deadline:
        name = f"during-{len(written)}"
        written[name] = random_bytes(64 * 1024, seed=len(written))
        write_bytes(mount_ctl.mountpoint / name, written[name], fsync=True)
        time.sleep(0.1)
    mount_ctl.umount()  # cancels the pass; its copies are counted as dead
    _, err = compaction.communicate(timeout=120)
    assert compaction.returncode == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    proc = mount_ctl.fsck("--no-repair")
    assert proc.returncode == 0, describe(proc)  # no pack the index does not name
    mount_ctl.mount()
    assert_tree_intact(BIG_TREE, mount_ctl.mountpoint / "tree")
    for name, data in written.items():
        assert read_bytes(mount_ctl.mountpoint / name) == data, name


@pytest.mark.slow
def test_killed_offline_compaction_is_repaired(mount_ctl: Mount) -> None:
    fill(mount_ctl, BIG_TREE)
    mount_ctl.umount()
    compaction = start_cli("gc", "--compact", mount_ctl.store)
    time.sleep(4)
    compaction.kill()
    compaction.communicate(timeout=60)
    proc = mount_ctl.fsck()
    assert proc.returncode in (0, 1), describe(proc)
    proc = mount_ctl.fsck("--no-repair")
    assert proc.returncode == 0, describe(proc)
    mount_ctl.mount()
    assert_tree_intact(BIG_TREE, mount_ctl.mountpoint / "tree")


@pytest.mark.slow
def test_gc_on_a_dead_mount_says_so(mount_ctl: Mount) -> None:
    fill(mount_ctl, BIG_TREE)
    mount_ctl.kill_daemon()
    for args in (("gc",), ("gc", "--compact")):
        proc = run_cli(*args, mount_ctl.mountpoint)
        assert proc.returncode == 1, describe(proc)
        assert "Traceback" not in proc.stderr, describe(proc)
        assert "does not answer" in proc.stderr, describe(proc)
    # The offline pass the message suggests holds the store's lock; asking
    # the dead mount again must neither signal it nor disturb it.
    subprocess.run(["fusermount3", "-u", "-z", str(mount_ctl.mountpoint)], check=True)
    offline = start_cli("gc", "--compact", mount_ctl.store)
    time.sleep(2)
    proc = run_cli("gc", mount_ctl.store)
    assert proc.returncode == 3, describe(proc)  # in use by the offline pass
    _, err = offline.communicate(timeout=300)
    assert offline.returncode == 0, err
