"""Space comes back: deleted data leaves the packs without a manual step, and
`buildatfs gc` frees it at once, mounted or not.

Each test copies two real trees into a store, deletes one, and compares the
bytes stored in packs with those of a fresh store holding only the tree that
was kept: they must come within 10% of each other.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from fuse_helpers import Mount, describe, run_cli, sha256_file, walk_files

KEPT = Path("/usr/lib/python3.11/email")
DELETED = Path("/usr/lib/python3.11")
BACKGROUND_TIMEOUT = 90.0


def copy_tree(source: Path, target: Path) -> None:
    subprocess.run(["cp", "-a", str(source), str(target)], check=True, timeout=600)


def stored(mnt: Mount, target: Path | None = None) -> int:
    return int(mnt.stats(target)["stored_bytes"])


@pytest.fixture
def fresh_reference(tmp_path: Path) -> int:
    """Pack bytes of a fresh store that holds only the kept tree."""
    store = tmp_path / "reference-store"
    assert run_cli("init", store).returncode == 0
    mountpoint = tmp_path / "reference-mnt"
    mountpoint.mkdir()
    ref = Mount(store, mountpoint)
    ref.mount()
    try:
        copy_tree(KEPT, mountpoint / "kept")
    finally:
        ref.umount()
    assert ref.fsck().returncode == 0
    return stored(ref)


def fill_and_delete(mnt: Mount) -> None:
    copy_tree(KEPT, mnt.mountpoint / "kept")
    copy_tree(DELETED, mnt.mountpoint / "deleted")
    mnt.remount()  # everything committed
    shutil.rmtree(mnt.mountpoint / "deleted")


def assert_kept_intact(mnt: Mount) -> None:
    for path in walk_files(KEPT):
        copy = mnt.mountpoint / "kept" / path.relative_to(KEPT)
        assert sha256_file(copy) == sha256_file(path), copy


def assert_near(value: int, reference: int) -> None:
    assert abs(value - reference) <= 0.1 * reference, (value, reference)


@pytest.mark.fuse
@pytest.mark.slow
def test_space_comes_back_by_itself(mount_ctl: Mount, fresh_reference: int) -> None:
    mount_ctl.mount()
    fill_and_delete(mount_ctl)
    full = stored(mount_ctl, mount_ctl.mountpoint)
    assert full > 2 * fresh_reference
    deadline = time.monotonic() + BACKGROUND_TIMEOUT
    while stored(mount_ctl, mount_ctl.mountpoint) > 1.1 * fresh_reference:
        assert time.monotonic() < deadline, (
            f"stored bytes stayed at {stored(mount_ctl, mount_ctl.mountpoint)} "
            f"(fresh store: {fresh_reference}) for {BACKGROUND_TIMEOUT:.0f} s"
        )
        time.sleep(1)
    assert_near(stored(mount_ctl, mount_ctl.mountpoint), fresh_reference)
    assert_kept_intact(mount_ctl)
    mount_ctl.remount()
    assert_kept_intact(mount_ctl)


@pytest.mark.fuse
@pytest.mark.parametrize("where", ["mounted", "unmounted"])
def test_gc_command_frees_at_once(mount_ctl: Mount, fresh_reference: int, where: str) -> None:
    mount_ctl.mount()
    fill_and_delete(mount_ctl)
    if where == "unmounted":
        mount_ctl.umount()
        target = mount_ctl.store
    else:
        target = mount_ctl.mountpoint
    proc = run_cli("gc", target)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.startswith("Removed "), describe(proc)
    after = stored(mount_ctl, target)
    assert_near(after, fresh_reference)
    assert mount_ctl.stats(target)["dead_bytes"] == 0
    if where == "unmounted":
        assert mount_ctl.fsck().returncode == 0
        mount_ctl.mount()
    assert_kept_intact(mount_ctl)
