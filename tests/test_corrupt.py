"""Damaged pack data reads as EIO for the damaged file only; the mount lives on.

These tests damage the store on purpose, so their teardown expects
`fsck --verify-data` to find the damage (exit 1 or 4) instead of exit 0.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from fuse_helpers import (
    Mount,
    find_in_packs,
    flip_byte,
    pid_alive,
    random_bytes,
    read_bytes,
    write_bytes,
)

pytestmark = pytest.mark.fuse

MiB = 1 << 20


@pytest.fixture
def damaged(mount_ctl: Mount) -> Mount:
    """Two random files written and committed; the mount is down afterwards."""
    mount_ctl.expect_damage()
    mount_ctl.mount()
    write_bytes(mount_ctl.mountpoint / "victim", random_bytes(2 * MiB, seed=1))
    write_bytes(mount_ctl.mountpoint / "bystander", random_bytes(2 * MiB, seed=2))
    mount_ctl.umount()
    return mount_ctl


def assert_eio(path: Path) -> None:
    with pytest.raises(OSError) as exc:
        read_bytes(path)
    assert exc.value.errno == errno.EIO


def assert_mount_healthy(mnt: Mount) -> None:
    assert mnt.pid is not None and pid_alive(mnt.pid), "the daemon died"
    assert sorted(os.listdir(mnt.mountpoint)) == ["bystander", "victim"]
    assert read_bytes(mnt.mountpoint / "bystander") == random_bytes(2 * MiB, seed=2)


def test_flipped_byte_gives_eio_for_that_file_only(damaged: Mount) -> None:
    victim = random_bytes(2 * MiB, seed=1)
    pack, offset = find_in_packs(damaged.store, victim[MiB : MiB + 64])
    flip_byte(pack, offset + 10)
    damaged.mount()  # cold caches
    assert_eio(damaged.mountpoint / "victim")
    assert_mount_healthy(damaged)
    problems = len(damaged.log_problems())
    assert problems >= 1, "the corrupt chunk was not logged"
    assert_eio(damaged.mountpoint / "victim")
    assert len(damaged.log_problems()) == problems, "the same corrupt chunk was logged again"


def test_truncated_pack_gives_eio(damaged: Mount) -> None:
    victim = random_bytes(2 * MiB, seed=1)
    pack, offset = find_in_packs(damaged.store, victim[MiB : MiB + 64])
    os.truncate(pack, offset + 10)  # the chunk holding the victim's middle is cut
    damaged.mount()
    assert_eio(damaged.mountpoint / "victim")
    assert damaged.pid is not None and pid_alive(damaged.pid), "the daemon died"
    assert sorted(os.listdir(damaged.mountpoint)) == ["bystander", "victim"]
