"""A full disk under the store: ENOSPC (never EIO), no lost data, space comes back.

The store lives on a 64 MiB ext4 image mounted through a loop device, so
the disk fills in seconds. The index (LMDB) must never fail with "map full".
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_helpers import (
    Mount,
    describe,
    finish_mount,
    hand_to_daemon,
    pid_alive,
    random_bytes,
    read_bytes,
    run_cli,
    write_bytes,
)

pytestmark = pytest.mark.fuse

KiB, MiB = 1 << 10, 1 << 20
SPACE_BACK_TIMEOUT = 60.0


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr.strip()}"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh 64 MiB ext4 file system, loop-mounted; unmounted afterwards."""
    image, point = tmp_path / "disk.img", tmp_path / "disk"
    point.mkdir()
    _run("truncate", "-s", "64M", str(image))
    _run("mkfs.ext4", "-q", "-F", str(image))
    _run("mount", "-o", "loop", str(image), str(point))
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], capture_output=True, timeout=60, check=False)


@pytest.fixture
def small_mount(small_disk: Path, mountpoint: Path) -> Iterator[Mount]:
    """A store on the small disk (not mounted yet); torn down like `mount_ctl`."""
    store = small_disk / "store"
    proc = run_cli("init", store)
    assert proc.returncode == 0, describe(proc)
    mnt = Mount(store, mountpoint)
    mnt.expect_log(r"WARNING .*disk of .* is full")  # once per full-disk episode
    try:
        yield mnt
    finally:
        finish_mount(mnt)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def write_synced(path: Path, data: bytes) -> None:
    """Create PATH with DATA and fsync it; the OSError of any step propagates."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fill(root: Path, prefix: str, size: int, limit: int = 200) -> tuple[list[Path], OSError]:
    """Write fsync'ed random files until one fails; return them and the error."""
    written: list[Path] = []
    for i in range(limit):
        path = root / f"{prefix}-{i}"
        try:
            write_synced(path, random_bytes(size, seed=10_000 + i))
        except OSError as exc:
            return written, exc
        written.append(path)
    pytest.fail(f"{limit} files of {size} bytes did not fill the disk")


def assert_alive(mnt: Mount) -> None:
    assert mnt.pid is not None and pid_alive(mnt.pid), "the daemon died"


def test_full_disk_gives_enospc_and_recovers(small_mount: Mount) -> None:
    mnt = small_mount
    mnt.mount()
    root = mnt.mountpoint
    early = {f"early-{i}": random_bytes(2 * MiB, seed=i) for i in range(3)}
    for name, data in early.items():
        write_bytes(root / name, data, fsync=True)

    written, exc = fill(root, "fill", 1 * MiB)
    assert exc.errno == errno.ENOSPC, f"a full disk gave {exc!r}, not ENOSPC"
    assert len(written) >= 20, f"ENOSPC after only {len(written)} MiB"
    assert_alive(mnt)
    with pytest.raises(OSError) as again:  # still full: fails the same way
        write_synced(root / "one-more", random_bytes(1 * MiB, seed=1))
    assert again.value.errno == errno.ENOSPC
    for path in written[-3:]:  # fsync'ed just before the disk filled
        assert read_bytes(path) == random_bytes(1 * MiB, seed=10_000 + int(path.name[5:]))
    for name, data in early.items():
        assert read_bytes(root / name) == data

    mnt.umount()  # commits what is staged, or gives it up, without dying
    proc = mnt.fsck()
    assert proc.returncode == 0, describe(proc)
    mnt.mount()
    for path in [*written, root / "one-more"]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    deadline = time.monotonic() + SPACE_BACK_TIMEOUT
    while True:  # gc runs every second while space is low
        try:
            write_synced(root / "after", random_bytes(4 * MiB, seed=77))
            break
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, f"writing after deletions gave {exc!r}"
            if time.monotonic() > deadline:
                pytest.fail(f"no space came back within {SPACE_BACK_TIMEOUT:.0f} s of deleting "
                            f"{len(written)} MiB (free on the disk: {free_bytes(mnt.store)})")
            time.sleep(0.5)
    assert read_bytes(root / "after") == random_bytes(4 * MiB, seed=77)
    for name, data in early.items():
        assert read_bytes(root / name) == data
    assert_alive(mnt)
    mnt.umount()
    assert free_bytes(mnt.store) > 20 * MiB, "the deleted data's space was not given back"
    mnt.mount()
    for name, data in early.items():
        assert read_bytes(root / name) == data


def test_metadata_on_full_disk_gives_enospc(small_mount: Mount) -> None:
    """Files and xattrs alone (no file data) until the disk is full."""
    mnt = small_mount
    mnt.mount()
    root = mnt.mountpoint
    write_bytes(root / "early", random_bytes(1 * MiB, seed=5), fsync=True)
    value = random_bytes(4000, seed=6)
    error = None
    count = 0
    for d in range(10_000):
        try:
            sub = root / f"d{d}"
            sub.mkdir()
            for i in range(50):
                path = sub / f"f{i}"
                path.touch()
                for k in range(8):
                    os.setxattr(path, f"user.attr{k}", value)
                count += 1
        except OSError as exc:
            error = exc
            break
    assert error is not None
    assert error.errno == errno.ENOSPC, f"after {count} files: {error!r}, not ENOSPC"
    assert_alive(mnt)
    assert read_bytes(root / "early") == random_bytes(1 * MiB, seed=5)
    mnt.umount()
    proc = mnt.fsck()
    assert proc.returncode == 0, describe(proc)
    mnt.mount()
    assert read_bytes(root / "early") == random_bytes(1 * MiB, seed=5)
    assert not any("MapFull" in line or "map full" in line.lower() for line in
                   mnt.log_path.read_text().splitlines())


def test_index_never_map_full(mounted: Path, mount_ctl: Mount) -> None:
    """Far more metadata than LMDB's default 10 MiB map: files, names, xattrs."""
    value = random_bytes(2048, seed=3)
    for d in range(30):
        sub = mounted / f"dir-{d}"
        sub.mkdir()
        for i in range(60):
            path = sub / (f"file-{i}-" + "n" * 180)
            write_bytes(path, b"%d %d" % (d, i))
            for k in range(8):
                os.setxattr(path, f"user.attr-{k}", value)
    # 1800 files x 8 x 2 KiB of xattrs: about 30 MiB in the index.
    assert os.path.getsize(mount_ctl.store / "meta" / "data.mdb") > 20 * MiB
    mount_ctl.remount()
    for d in (0, 29):
        for i in (0, 59):
            path = mounted / f"dir-{d}" / (f"file-{i}-" + "n" * 180)
            assert read_bytes(path) == b"%d %d" % (d, i)
            assert os.getxattr(path, "user.attr-7") == value
    assert "map full" not in mount_ctl.log_path.read_text().lower()


def test_unmount_that_cannot_commit_says_so(small_mount: Mount, small_disk: Path) -> None:
    """Data closed without fsync, then the disk filled by someone else: the
    commits fail, and the unmount must not pass that off as a clean one."""
    mnt = small_mount
    mnt.mount()
    data = random_bytes(8 * MiB, seed=5)
    fd = os.open(mnt.mountpoint / "unsynced", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        hand_to_daemon(fd)  # staged in the daemon, nothing committed
        filler = small_disk / "filler"
        with open(filler, "wb") as out, contextlib.suppress(OSError):
            while True:  # (another program takes the disk's last byte)
                out.write(b"\0" * MiB)
                out.flush()
    finally:
        os.close(fd)  # the commit this starts fails: no room for the pack
    mnt.expect_log(r"ERROR .*Committing inode \d+ failed")
    mnt.expect_log(r"ERROR .*could not be committed")
    mnt.expect_log(r"^Traceback")  # (of the failed commits, logged in full)
    proc = run_cli("umount", mnt.mountpoint)
    assert proc.returncode == 1, describe(proc)
    assert "did not finish cleanly: written data may be lost" in proc.stderr, describe(proc)
    mnt.pid = None
    filler.unlink()
    proc = mnt.fsck()  # recovery of the unclean store, then nothing left to repair
    assert proc.returncode in (0, 1), describe(proc)
    mnt.mount()
    assert os.stat(mnt.mountpoint / "unsynced").st_size in (0, len(data))
