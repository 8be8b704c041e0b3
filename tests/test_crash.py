"""kill -9 of a busy daemon: every fsync'ed file survives the documented recovery."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
from pathlib import Path

import pytest
from fuse_helpers import Mount, describe, random_bytes, sha256_file, wait_for

pytestmark = pytest.mark.fuse

KiB = 1 << 10
SIZES = [0, 1, 4 * KiB, 100 * KiB + 7, 1 << 20, 3 * (1 << 20) + 11]


class BackgroundWriter(threading.Thread):
    """Writes new files (never fsync'ed) until the mount dies or it is stopped."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.stop = threading.Event()
        self.files_done = 0
        self.error: OSError | None = None

    def run(self) -> None:
        block = random_bytes(256 * KiB, seed=99)
        try:
            while not self.stop.is_set():
                with open(self.root / f"unsynced-{self.files_done}", "wb") as f:
                    for _ in range(8):
                        f.write(block)
                self.files_done += 1
        except OSError as exc:
            self.error = exc


def write_synced(root: Path) -> dict[str, str]:
    """Files written and fsync'ed (also some in a new subdirectory) -> sha256."""
    (root / "sub").mkdir()
    hashes = {}
    for i, size in enumerate(SIZES * 2):
        name = f"synced-{i}" if i % 2 else f"sub/synced-{i}"
        data = random_bytes(size, seed=i)
        with open(root / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        hashes[name] = hashlib.sha256(data).hexdigest()
    return hashes


@pytest.mark.parametrize("recovery", ["umount-fsck-mount", "umount-mount"])
def test_fsynced_files_survive_kill_9(mount_ctl: Mount, recovery: str) -> None:
    # Only a mount (not fsck) finds the store unclean, and says so once.
    unclean = 0 if recovery == "umount-fsck-mount" else 1
    mount_ctl.expect_log(r"WARNING .*not unmounted cleanly", count=unclean)
    mount_ctl.mount()
    root = mount_ctl.mountpoint
    writer = BackgroundWriter(root)
    writer.start()
    synced = write_synced(root)
    dirty = os.open(root / "open-dirty", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(dirty, random_bytes(1 << 20, seed=7))  # left open, never fsync'ed
    wait_for(lambda: writer.files_done >= 2, 60, "the background writer to make progress")
    mount_ctl.kill_daemon()
    writer.stop.set()
    writer.join(60)
    assert not writer.is_alive(), "a writer stayed blocked after the daemon was killed"
    with contextlib.suppress(OSError):
        os.close(dirty)
    with pytest.raises(OSError) as exc:
        os.stat(root / "never-looked-up")  # a cached stat of root might still answer
    assert exc.value.errno == errno.ENOTCONN
    recover(mount_ctl, with_fsck=recovery == "umount-fsck-mount")
    for name, digest in synced.items():
        assert sha256_file(root / name) == digest, name


def recover(mnt: Mount, *, with_fsck: bool) -> None:
    """The documented recovery: umount the dead mount, [fsck,] mount."""
    mnt.umount()
    if with_fsck:
        proc = mnt.fsck()
        assert proc.returncode in (0, 1), describe(proc)
    mnt.mount()
