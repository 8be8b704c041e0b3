"""POSIX behaviour that Docker, tar, dpkg, git and databases rely on (design 1).

Every test runs on a real mount; the fixture unmounts strictly and fscks.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fuse_helpers import (
    Mount,
    find_mount,
    random_bytes,
    read_bytes,
    write_bytes,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.fuse

GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
# uid 65534 may not reach an interpreter under /root (pyenv); the system one is public.
NOBODY_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def renameat2(src: Path, dst: Path, flags: int) -> None:
    """renameat2(2) through libc; raises OSError like os.rename."""
    rc = _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src))


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(2) with raw (sec, nsec) pairs, so UTIME_NOW/OMIT can be passed."""
    times = (Timespec * 2)(Timespec(*atime), Timespec(*mtime))
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def perm(path: Path | bytes) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def run_as_nobody(code: str, mask: int = 0o022) -> None:
    """Run Python CODE as uid/gid 65534 with umask MASK; fail on non-zero exit."""
    proc = subprocess.run(
        [NOBODY_PYTHON, "-c", code],
        user=65534,
        group=65534,
        extra_groups=[],
        umask=mask,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


# --- mount options -----------------------------------------------------------


def test_default_mount_options(mounted: Path) -> None:
    entry = find_mount(mounted)
    assert entry is not None
    assert entry.fstype.startswith("fuse")
    for flag in ("nosuid", "nodev", "noexec", "ro"):
        assert flag not in entry.mount_options.split(","), entry.mount_options
    supers = entry.super_options.split(",")
    assert "allow_other" in supers, entry.super_options
    assert "default_permissions" in supers, entry.super_options


# --- regular files -----------------------------------------------------------


def test_regular_file_roundtrip(mounted: Path) -> None:
    data = random_bytes(3 * MiB + 17, seed=1)
    path = mounted / "file"
    write_bytes(path, data)
    st_ = os.stat(path)
    assert stat.S_ISREG(st_.st_mode)
    assert st_.st_size == len(data)
    assert st_.st_nlink == 1
    assert read_bytes(path) == data
    with open(path, "rb") as f:
        f.seek(MiB + 5)
        assert f.read(1000) == data[MiB + 5 : MiB + 1005]


def test_dense_file_blocks_cover_size(mounted: Path) -> None:
    path = mounted / "dense"
    write_bytes(path, random_bytes(MiB, seed=2))
    assert os.stat(path).st_blocks * 512 >= MiB


def test_sparse_file_blocks_count_holes_as_empty(mounted: Path, mount_ctl: Mount) -> None:
    path = mounted / "sparse"
    tail = random_bytes(4 * KiB, seed=3)
    with open(path, "wb") as f:
        f.seek(100 * MiB)
        f.write(tail)
    for _ in range(2):  # before and after a remount
        st_ = os.stat(path)
        assert st_.st_size == 100 * MiB + 4 * KiB
        assert st_.st_blocks * 512 <= 256 * KiB, f"hole counted: st_blocks={st_.st_blocks}"
        with open(path, "rb") as f:
            f.seek(50 * MiB)
            assert f.read(MiB) == bytes(MiB)
            f.seek(100 * MiB - 10)
            assert f.read() == bytes(10) + tail
        mount_ctl.remount()


def test_offsets_past_4gib(mounted: Path, mount_ctl: Mount) -> None:
    path = mounted / "big"
    far = 5 * GiB + 12345
    head = random_bytes(300, seed=4)
    tail = random_bytes(64 * KiB, seed=5)
    with open(path, "wb") as f:
        f.seek(4 * GiB - 100)  # straddles the 32-bit boundary
        f.write(head)
        f.seek(far)
        f.write(tail)
    for _ in range(2):
        assert os.stat(path).st_size == far + len(tail)
        with open(path, "rb") as f:
            f.seek(4 * GiB - 100)
            assert f.read(300) == head
            assert f.read(1000) == bytes(1000)
            f.seek(far)
            assert f.read() == tail
        mount_ctl.remount()


def test_truncate_committed_file_both_ways(mounted: Path, mount_ctl: Mount) -> None:
    path = mounted / "trunc"
    data = random_bytes(MiB, seed=6)
    write_bytes(path, data)
    os.truncate(path, 300_001)
    assert os.stat(path).st_size == 300_001
    assert read_bytes(path) == data[:300_001]
    os.truncate(path, 2 * MiB)
    expected = data[:300_001] + bytes(2 * MiB - 300_001)
    assert read_bytes(path) == expected
    mount_ctl.remount()
    assert read_bytes(path) == expected
    os.truncate(path, 0)
    assert read_bytes(path) == b""
    assert os.stat(path).st_size == 0


def test_ftruncate_on_open_file_both_ways(mounted: Path) -> None:
    path = mounted / "ftrunc"
    data = random_bytes(512 * KiB, seed=7)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.ftruncate(fd, 1000)
        os.ftruncate(fd, 200_000)  # the cut-off bytes must not come back
        assert os.fstat(fd).st_size == 200_000
        assert os.pread(fd, 300_000, 0) == data[:1000] + bytes(199_000)
    finally:
        os.close(fd)
    assert read_bytes(path) == data[:1000] + bytes(199_000)


def test_write_into_middle_of_large_file_after_remount(mounted: Path, mount_ctl: Mount) -> None:
    path = mounted / "db"
    data = bytearray(random_bytes(32 * MiB, seed=8))
    write_bytes(path, bytes(data))
    mount_ctl.remount()
    stored_before = mount_ctl.stats()["stored_bytes"]
    patch = random_bytes(8 * KiB, seed=9)
    offset = 13 * MiB + 4097
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(patch)
    data[offset : offset + len(patch)] = patch
    assert read_bytes(path) == data
    mount_ctl.remount()
    assert read_bytes(path) == data
    growth = mount_ctl.stats()["stored_bytes"] - stored_before
    assert growth < 4 * MiB, f"an 8 KiB write grew the store by {growth} bytes"


def test_idle_open_file_gets_committed(mounted: Path, mount_ctl: Mount) -> None:
    before = mount_ctl.stats()["stored_bytes"]
    with open(mounted / "idle", "wb") as f:
        f.write(random_bytes(2 * MiB, seed=10))
        f.flush()
        deadline = time.monotonic() + 30
        while mount_ctl.stats()["stored_bytes"] - before < 2 * MiB:
            assert time.monotonic() < deadline, "open idle file was not committed in 30 s"
            time.sleep(0.5)


def test_grow_by_truncate_only_is_a_hole(mounted: Path, mount_ctl: Mount) -> None:
    path = mounted / "holes"
    path.write_bytes(b"")
    os.truncate(path, 64 * MiB)
    mount_ctl.remount()
    assert os.stat(path).st_size == 64 * MiB
    assert os.stat(path).st_blocks == 0
    with open(path, "rb") as f:
        f.seek(33 * MiB)
        assert f.read(MiB) == bytes(MiB)


def test_o_append_from_two_descriptors(mounted: Path, mount_ctl: Mount) -> None:
    path = mounted / "log"
    first = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    second = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(100):
            os.write(first if i % 2 else second, b"line %03d\n" % i)
    finally:
        os.close(first)
        os.close(second)
    mount_ctl.remount()
    assert read_bytes(path) == b"".join(b"line %03d\n" % i for i in range(100))


def test_shared_mmap_writes_persist(mounted: Path, mount_ctl: Mount) -> None:
    """LMDB and SQLite write through shared mappings."""
    path = mounted / "mapped"
    data = bytearray(random_bytes(4 * MiB, seed=16))
    write_bytes(path, bytes(data))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        for offset in (0, 12345, 2 * MiB + 1, 4 * MiB - 10):
            m[offset : offset + 10] = b"0123456789"
            data[offset : offset + 10] = b"0123456789"
        m.flush()
    mount_ctl.remount()
    assert read_bytes(path) == data


def test_rename_over_open_file_keeps_it_readable(mounted: Path, mount_ctl: Mount) -> None:
    old, new = random_bytes(300 * KiB, seed=17), random_bytes(200 * KiB, seed=18)
    write_bytes(mounted / "config", old)
    write_bytes(mounted / "config.tmp", new)
    mount_ctl.remount()
    with open(mounted / "config", "rb") as reader:
        os.rename(mounted / "config.tmp", mounted / "config")
        assert reader.read() == old
    assert read_bytes(mounted / "config") == new
    assert os.listdir(mounted) == ["config"]


@settings(
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["write", "truncate"]),
            st.integers(0, 3 * MiB),
            st.integers(0, 300 * KiB),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_random_writes_match_model(
    mounted: Path, mount_ctl: Mount, ops: list[tuple[str, int, int]]
) -> None:
    path = mounted / f"model-{len(os.listdir(mounted))}"
    base = random_bytes(2 * MiB, seed=11)
    write_bytes(path, base)
    model = bytearray(base)
    fd = os.open(path, os.O_RDWR)
    try:
        for i, (kind, offset, length) in enumerate(ops):
            if kind == "write" and length:  # an empty pwrite does not extend
                chunk = random_bytes(length, seed=100 + i)
                os.pwrite(fd, chunk, offset)
                model[len(model) : offset] = bytes(max(0, offset - len(model)))
                model[offset : offset + length] = chunk
            elif kind == "truncate":
                os.ftruncate(fd, offset)
                model[offset:] = b""
                model.extend(bytes(offset - len(model)))
        assert os.fstat(fd).st_size == len(model)
    finally:
        os.close(fd)
    assert read_bytes(path) == model
    mount_ctl.remount()  # read the committed extents, not the page cache
    assert read_bytes(path) == model


# --- directories, links, special files ---------------------------------------


def test_directory_nlink(mounted: Path) -> None:
    assert os.stat(mounted).st_nlink == 2
    (mounted / "a").mkdir()
    (mounted / "b").mkdir()
    (mounted / "a" / "sub").mkdir()
    (mounted / "a" / "file").write_bytes(b"x")
    assert os.stat(mounted).st_nlink == 4
    assert os.stat(mounted / "a").st_nlink == 3
    os.rename(mounted / "b", mounted / "a" / "b")
    assert os.stat(mounted).st_nlink == 3
    assert os.stat(mounted / "a").st_nlink == 4
    os.rmdir(mounted / "a" / "sub")
    assert os.stat(mounted / "a").st_nlink == 3


def test_directory_errors(mounted: Path) -> None:
    (mounted / "d").mkdir()
    (mounted / "d" / "f").write_bytes(b"x")
    with pytest.raises(OSError) as exc:
        os.rmdir(mounted / "d")
    assert exc.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileExistsError):
        os.mkdir(mounted / "d")
    with pytest.raises(NotADirectoryError):
        os.rmdir(mounted / "d" / "f")
    with pytest.raises(IsADirectoryError):
        os.unlink(mounted / "d")
    with pytest.raises(FileNotFoundError):
        os.stat(mounted / "missing")


def test_symlink_long_target(mounted: Path, mount_ctl: Mount) -> None:
    target = ("d" * 99 + "/") * 39 + "e" * 100
    link = mounted / "long"
    os.symlink(target, link)
    os.symlink("file", mounted / "short")
    (mounted / "file").write_bytes(b"through the link")
    for _ in range(2):
        st_ = os.lstat(link)
        assert stat.S_ISLNK(st_.st_mode)
        assert st_.st_size == 4000
        assert os.readlink(link) == target
        assert (mounted / "short").read_bytes() == b"through the link"
        mount_ctl.remount()


def test_hard_links_to_regular_file(mounted: Path, mount_ctl: Mount) -> None:
    (mounted / "d").mkdir()
    orig = mounted / "orig"
    orig.write_bytes(b"one")
    os.link(orig, mounted / "d" / "link")
    assert os.stat(orig).st_ino == os.stat(mounted / "d" / "link").st_ino
    assert os.stat(orig).st_nlink == 2
    with open(mounted / "d" / "link", "ab") as f:
        f.write(b"two")
    assert orig.read_bytes() == b"onetwo"
    mount_ctl.remount()
    assert os.stat(orig).st_nlink == 2
    os.unlink(orig)
    assert os.stat(mounted / "d" / "link").st_nlink == 1
    assert (mounted / "d" / "link").read_bytes() == b"onetwo"
    with pytest.raises(PermissionError):
        os.link(mounted / "d", mounted / "dirlink")


def test_hard_link_to_device_node(mounted: Path, mount_ctl: Mount) -> None:
    node = mounted / "null"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.link(node, mounted / "null2")
    for _ in range(2):
        a, b = os.lstat(node), os.lstat(mounted / "null2")
        assert a.st_ino == b.st_ino
        assert a.st_nlink == b.st_nlink == 2
        assert stat.S_ISCHR(b.st_mode)
        assert b.st_rdev == os.makedev(1, 3)
        mount_ctl.remount()


@pytest.mark.parametrize(
    ("kind", "major", "minor"),
    [(stat.S_IFCHR, 1, 3), (stat.S_IFBLK, 7, 0), (stat.S_IFCHR, 259, 65537)],
)
def test_mknod_devices(mounted: Path, mount_ctl: Mount, kind: int, major: int, minor: int) -> None:
    node = mounted / "dev"
    with umask(0o022):
        os.mknod(node, kind | 0o666, os.makedev(major, minor))
    for _ in range(2):
        st_ = os.lstat(node)
        assert stat.S_IFMT(st_.st_mode) == kind
        assert (os.major(st_.st_rdev), os.minor(st_.st_rdev)) == (major, minor)
        assert stat.S_IMODE(st_.st_mode) == 0o644
        mount_ctl.remount()


def test_device_node_opens_the_device(mounted: Path) -> None:
    """The mount has `dev`: a char node for /dev/null (1,3) behaves as /dev/null."""
    node = mounted / "null"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with open(node, "r+b", buffering=0) as f:
        assert f.write(b"discarded") == 9
        assert f.read(100) == b""


def test_fifo(mounted: Path, mount_ctl: Mount) -> None:
    fifo = mounted / "fifo"
    os.mkfifo(fifo, 0o600)
    mount_ctl.remount()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        writer = os.open(fifo, os.O_WRONLY)
        os.write(writer, b"ping")
        os.close(writer)
        assert os.read(reader, 100) == b"ping"
    finally:
        os.close(reader)


def test_unix_socket(mounted: Path, mount_ctl: Mount) -> None:
    path = mounted / "sock"
    assert len(os.fsencode(path)) < 100, "socket path too long for sun_path"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(os.fsencode(path))
        server.listen(1)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(os.fsencode(path))
            conn, _ = server.accept()
            with conn:
                client.sendall(b"hello")
                assert conn.recv(100) == b"hello"
    mount_ctl.remount()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


# --- xattrs ------------------------------------------------------------------


def test_xattr_user_set_get_list_remove(mounted: Path) -> None:
    path = mounted / "f"
    path.write_bytes(b"x")
    values = {"user.a": b"1", "user.bin": b"\x00\xff" * 100, "user.empty": b""}
    for name, value in values.items():
        os.setxattr(path, name, value)
    assert sorted(os.listxattr(path)) == sorted(values)
    for name, value in values.items():
        assert os.getxattr(path, name) == value
    os.removexattr(path, "user.a")
    assert sorted(os.listxattr(path)) == ["user.bin", "user.empty"]
    with pytest.raises(OSError) as exc:
        os.getxattr(path, "user.a")
    assert exc.value.errno == errno.ENODATA


def test_xattr_create_replace_and_missing(mounted: Path) -> None:
    path = mounted / "f"
    path.write_bytes(b"x")
    os.setxattr(path, "user.x", b"v1", os.XATTR_CREATE)
    with pytest.raises(FileExistsError):
        os.setxattr(path, "user.x", b"v2", os.XATTR_CREATE)
    assert os.getxattr(path, "user.x") == b"v1"
    os.setxattr(path, "user.x", b"v3", os.XATTR_REPLACE)
    assert os.getxattr(path, "user.x") == b"v3"
    for call in (
        lambda: os.setxattr(path, "user.y", b"v", os.XATTR_REPLACE),
        lambda: os.getxattr(path, "user.y"),
        lambda: os.removexattr(path, "user.y"),
    ):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.ENODATA


def test_xattr_trusted_overlay_on_dir_and_symlink(mounted: Path, mount_ctl: Mount) -> None:
    d = mounted / "upper"
    d.mkdir()
    os.symlink("nowhere", mounted / "link")
    os.setxattr(d, "trusted.overlay.opaque", b"y")
    os.setxattr(d, "trusted.overlay.origin", bytes(range(256)))
    os.setxattr(mounted / "link", "trusted.overlay.redirect", b"/a", follow_symlinks=False)
    mount_ctl.remount()
    assert sorted(os.listxattr(d)) == ["trusted.overlay.opaque", "trusted.overlay.origin"]
    assert os.getxattr(d, "trusted.overlay.origin") == bytes(range(256))
    got = os.getxattr(mounted / "link", "trusted.overlay.redirect", follow_symlinks=False)
    assert got == b"/a"
    os.removexattr(d, "trusted.overlay.opaque")
    assert os.listxattr(d) == ["trusted.overlay.origin"]


def test_xattr_security_capability(mounted: Path, mount_ctl: Mount) -> None:
    path = mounted / "ping"
    path.write_bytes(b"\x7fELF")
    os.chmod(path, 0o755)
    # vfs_cap_data revision 2, effective, permitted = CAP_NET_RAW (13).
    caps = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
    os.setxattr(path, "security.capability", caps)
    mount_ctl.remount()
    assert os.getxattr(path, "security.capability") == caps
    assert "security.capability" in os.listxattr(path)


def test_xattr_many_and_large_values(mounted: Path, mount_ctl: Mount) -> None:
    path = mounted / "f"
    path.write_bytes(b"")
    values = {f"user.k{i:03d}": random_bytes(i * 37, seed=i) for i in range(100)}
    values["user.large"] = random_bytes(32 * KiB, seed=12)
    for name, value in values.items():
        os.setxattr(path, name, value)
    mount_ctl.remount()
    assert sorted(os.listxattr(path)) == sorted(values)
    assert all(os.getxattr(path, n) == v for n, v in values.items())


def test_posix_acl_xattr_stored(mounted: Path) -> None:
    path = mounted / "f"
    path.write_bytes(b"")
    # Version 2 ACL: USER_OBJ rw-, USER 1000 r--, GROUP_OBJ r--, MASK r--, OTHER ---.
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 4, 1000), (0x04, 4, 0xFFFFFFFF)]
    entries += [(0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)]
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    os.setxattr(path, "system.posix_acl_access", acl)
    assert os.getxattr(path, "system.posix_acl_access") == acl


# --- modes, ownership, timestamps --------------------------------------------


def test_special_mode_bits_preserved(mounted: Path, mount_ctl: Mount) -> None:
    wanted = {"suid": 0o4755, "sgid": 0o2755, "both": 0o6711, "plain": 0o640}
    for name, mode in wanted.items():
        (mounted / name).write_bytes(b"#!/bin/sh\n")
        os.chmod(mounted / name, mode)
    (mounted / "tmpdir").mkdir()
    os.chmod(mounted / "tmpdir", 0o1777)
    wanted["tmpdir"] = 0o1777
    mount_ctl.remount()
    assert {name: perm(mounted / name) for name in wanted} == wanted


def test_setgid_directory_passes_group_on(mounted: Path, mount_ctl: Mount) -> None:
    shared = mounted / "shared"
    shared.mkdir()
    os.chown(shared, 0, 1234)
    os.chmod(shared, 0o2775)
    (shared / "file").write_bytes(b"x")
    (shared / "sub").mkdir()
    os.mknod(shared / "fifo", stat.S_IFIFO | 0o644)
    (mounted / "plain").mkdir()
    mount_ctl.remount()
    for name in ("file", "sub", "fifo"):
        assert os.lstat(shared / name).st_gid == 1234, name
    assert os.stat(shared / "sub").st_mode & stat.S_ISGID
    assert not os.stat(shared / "file").st_mode & stat.S_ISGID
    assert os.stat(mounted / "plain").st_gid == 0
    assert not os.stat(mounted / "plain").st_mode & stat.S_ISGID


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_new_objects_owned_by_caller_with_umask(mounted: Path, mask: int) -> None:
    d = mounted / "public"
    d.mkdir()
    os.chmod(d, 0o777)
    run_as_nobody(
        "import os\n"
        f"d = {str(d)!r}\n"
        "os.close(os.open(d + '/file', os.O_CREAT | os.O_WRONLY, 0o666))\n"
        "os.mkdir(d + '/dir', 0o777)\n"
        "os.mkfifo(d + '/fifo', 0o666)\n"
        "os.symlink('file', d + '/link')\n",
        mask,
    )
    for name in ("file", "dir", "fifo", "link"):
        st_ = os.lstat(d / name)
        assert (st_.st_uid, st_.st_gid) == (65534, 65534), name
    assert perm(d / "file") == 0o666 & ~mask
    assert perm(d / "dir") == 0o777 & ~mask
    assert perm(d / "fifo") == 0o666 & ~mask


def test_permissions_checked_for_other_users(mounted: Path) -> None:
    secret = mounted / "secret"
    secret.write_bytes(b"root only")
    os.chmod(secret, 0o600)
    readable = mounted / "readable"
    readable.write_bytes(b"for all")
    os.chmod(readable, 0o644)
    code = f"""
assert open({str(readable)!r}, "rb").read() == b"for all"
for path, mode in (({str(secret)!r}, "rb"), ({str(readable)!r}, "ab")):
    try:
        open(path, mode)
    except PermissionError:
        continue
    raise SystemExit(f"uid 65534 could open {{path}} with {{mode}}")
"""
    run_as_nobody(code)


def test_chown_persists(mounted: Path, mount_ctl: Mount) -> None:
    path = mounted / "f"
    path.write_bytes(b"x")
    os.chown(path, 1000, 2000)
    os.symlink("f", mounted / "l")
    os.chown(mounted / "l", 3000, 4000, follow_symlinks=False)
    mount_ctl.remount()
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (1000, 2000)
    st_ = os.lstat(mounted / "l")
    assert (st_.st_uid, st_.st_gid) == (3000, 4000)


def test_nanosecond_timestamps(mounted: Path, mount_ctl: Mount) -> None:
    path = mounted / "f"
    path.write_bytes(b"x")
    os.symlink("f", mounted / "l")
    atime, mtime = 1_600_000_000_123_456_789, 1_500_000_000_987_654_321
    os.utime(path, ns=(atime, mtime))
    os.utime(mounted / "l", ns=(atime + 1, mtime + 1), follow_symlinks=False)
    mount_ctl.remount()
    st_ = os.stat(path)
    assert (st_.st_atime_ns, st_.st_mtime_ns) == (atime, mtime)
    lst = os.lstat(mounted / "l")
    assert (lst.st_atime_ns, lst.st_mtime_ns) == (atime + 1, mtime + 1)


def test_utime_now_and_omit(mounted: Path) -> None:
    path = mounted / "f"
    path.write_bytes(b"x")
    os.utime(path, ns=(1_000_000_000_000_000_001, 1_100_000_000_000_000_002))
    before = time.time_ns()
    utimensat(path, (0, UTIME_OMIT), (0, UTIME_NOW))
    st_ = os.stat(path)
    assert st_.st_atime_ns == 1_000_000_000_000_000_001
    assert before - 2 * 10**9 <= st_.st_mtime_ns <= time.time_ns() + 2 * 10**9
    assert st_.st_ctime_ns >= before - 2 * 10**9
    utimensat(path, (0, UTIME_NOW), (0, UTIME_OMIT))
    again = os.stat(path)
    assert again.st_mtime_ns == st_.st_mtime_ns
    assert again.st_atime_ns >= before - 2 * 10**9


def test_write_updates_mtime_and_chmod_updates_ctime(mounted: Path) -> None:
    path = mounted / "f"
    path.write_bytes(b"x")
    os.utime(path, ns=(10**18, 10**18))
    ctime = os.stat(path).st_ctime_ns
    with open(path, "ab") as f:
        f.write(b"y")
    assert os.stat(path).st_mtime_ns > 10**18 + 10**9
    os.chmod(path, 0o600)
    assert os.stat(path).st_ctime_ns >= ctime


# --- rename ------------------------------------------------------------------


def test_rename_replaces_target(mounted: Path) -> None:
    (mounted / "a").write_bytes(b"A")
    (mounted / "b").write_bytes(b"B")
    ino = os.stat(mounted / "a").st_ino
    os.rename(mounted / "a", mounted / "b")
    assert not (mounted / "a").exists()
    assert (mounted / "b").read_bytes() == b"A"
    assert os.stat(mounted / "b").st_ino == ino
    assert os.listdir(mounted) == ["b"]


def test_rename_directory_over_directory(mounted: Path) -> None:
    for name in ("src", "empty", "full"):
        (mounted / name).mkdir()
    (mounted / "src" / "f").write_bytes(b"x")
    (mounted / "full" / "g").write_bytes(b"y")
    with pytest.raises(OSError) as exc:
        os.rename(mounted / "src", mounted / "full")
    assert exc.value.errno == errno.ENOTEMPTY
    os.rename(mounted / "src", mounted / "empty")
    assert (mounted / "empty" / "f").read_bytes() == b"x"
    assert os.stat(mounted).st_nlink == 4


def test_rename_noreplace(mounted: Path) -> None:
    (mounted / "a").write_bytes(b"A")
    (mounted / "b").write_bytes(b"B")
    with pytest.raises(FileExistsError):
        renameat2(mounted / "a", mounted / "b", RENAME_NOREPLACE)
    assert (mounted / "a").read_bytes() == b"A"
    assert (mounted / "b").read_bytes() == b"B"
    renameat2(mounted / "a", mounted / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(mounted)) == ["b", "c"]


def test_rename_exchange_file_and_directory(mounted: Path, mount_ctl: Mount) -> None:
    (mounted / "d1").mkdir()
    (mounted / "d2").mkdir()
    (mounted / "d1" / "x").mkdir()
    (mounted / "d1" / "x" / "inner").write_bytes(b"in")
    (mounted / "d2" / "y").write_bytes(b"file y")
    ino_x, ino_y = os.stat(mounted / "d1" / "x").st_ino, os.stat(mounted / "d2" / "y").st_ino
    renameat2(mounted / "d1" / "x", mounted / "d2" / "y", RENAME_EXCHANGE)
    mount_ctl.remount()
    assert (mounted / "d1" / "x").read_bytes() == b"file y"
    assert (mounted / "d2" / "y" / "inner").read_bytes() == b"in"
    assert os.stat(mounted / "d1" / "x").st_ino == ino_y
    assert os.stat(mounted / "d2" / "y").st_ino == ino_x
    assert os.stat(mounted / "d1").st_nlink == 2
    assert os.stat(mounted / "d2").st_nlink == 3
    with pytest.raises(FileNotFoundError):
        renameat2(mounted / "d1" / "x", mounted / "missing", RENAME_EXCHANGE)


def test_rename_whiteout_leaves_char_device_0_0(mounted: Path, mount_ctl: Mount) -> None:
    (mounted / "a").write_bytes(b"content")
    ino = os.stat(mounted / "a").st_ino
    renameat2(mounted / "a", mounted / "b", RENAME_WHITEOUT)
    mount_ctl.remount()
    st_ = os.lstat(mounted / "a")
    assert stat.S_ISCHR(st_.st_mode)
    assert st_.st_rdev == os.makedev(0, 0)
    assert (mounted / "b").read_bytes() == b"content"
    assert os.stat(mounted / "b").st_ino == ino


# --- open, unlink, names -----------------------------------------------------


def test_open_with_o_trunc(mounted: Path, mount_ctl: Mount) -> None:
    path = mounted / "f"
    write_bytes(path, random_bytes(100 * KiB, seed=13))
    mount_ctl.remount()
    with open(path, "rb") as reader:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            assert os.fstat(fd).st_size == 0
            assert os.stat(path).st_size == 0
            os.write(fd, b"short")
        finally:
            os.close(fd)
        assert reader.read() == b"short"
    mount_ctl.remount()
    assert read_bytes(path) == b"short"


def test_unlinked_open_file_stays_usable(mounted: Path, mount_ctl: Mount) -> None:
    path = mounted / "f"
    data = random_bytes(600 * KiB, seed=14)
    write_bytes(path, data)
    mount_ctl.remount()
    files_before = mount_ctl.stats(mounted)["files"]
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        assert not path.exists()
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, len(data) + 10, 0) == data
        os.pwrite(fd, b"appended", len(data))
        os.fsync(fd)
        assert os.pread(fd, 100, len(data) - 2) == data[-2:] + b"appended"
    finally:
        os.close(fd)
    assert os.listdir(mounted) == []
    mount_ctl.remount()
    assert mount_ctl.stats()["files"] == files_before - 1


def test_name_of_255_bytes(mounted: Path, mount_ctl: Mount) -> None:
    names = ["a" * 255, "é" * 127 + "b"]
    for name in names:
        assert len(name.encode()) == 255
        (mounted / name).write_bytes(name.encode())
    mount_ctl.remount()
    assert sorted(os.listdir(mounted)) == sorted(names)
    assert all((mounted / n).read_bytes() == n.encode() for n in names)


def test_name_of_256_bytes_fails_with_enametoolong(mounted: Path) -> None:
    long = mounted / ("a" * 256)
    (mounted / "ok").write_bytes(b"x")
    (mounted / "dir").mkdir()
    for call in (
        lambda: os.stat(long),
        lambda: os.open(long, os.O_CREAT | os.O_WRONLY, 0o644),
        lambda: os.mkdir(long),
        lambda: os.symlink("ok", long),
        lambda: os.rename(mounted / "ok", long),
        lambda: os.link(mounted / "ok", long),
        lambda: os.mknod(long, stat.S_IFIFO | 0o600),
    ):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.ENAMETOOLONG
    assert sorted(os.listdir(mounted)) == ["dir", "ok"]


def test_non_utf8_names(mounted: Path, mount_ctl: Mount) -> None:
    root = os.fsencode(mounted)
    names = [b"caf\xe9", b"\xff\xfe\xfd", b"tab\tnew\nline", b"\x01\x7f", b"-dash"]
    for name in names:
        with open(root + b"/" + name, "wb") as f:
            f.write(name)
    os.mkdir(root + b"/dir\xc0")
    os.rename(root + b"/caf\xe9", root + b"/dir\xc0/moved\x80")
    mount_ctl.remount()
    expected = sorted([*names[1:], b"dir\xc0"])
    assert sorted(os.listdir(root)) == expected
    for name in names[1:]:
        assert read_bytes(root + b"/" + name) == name
    assert read_bytes(root + b"/dir\xc0/moved\x80") == b"caf\xe9"


# --- statfs, inode numbers, readdir, persistence -----------------------------


def test_statfs_reports_store_disk(mounted: Path, mount_ctl: Mount) -> None:
    fs, disk = os.statvfs(mounted), os.statvfs(mount_ctl.store)
    total, disk_total = fs.f_blocks * fs.f_frsize, disk.f_blocks * disk.f_frsize
    free, disk_free = fs.f_bavail * fs.f_frsize, disk.f_bavail * disk.f_frsize
    assert abs(total - disk_total) <= disk_total * 0.05, (total, disk_total)
    assert abs(free - disk_free) <= disk_total * 0.05, (free, disk_free)
    assert fs.f_namemax == 255


def test_inode_numbers_stable_across_remount(mounted: Path, mount_ctl: Mount) -> None:
    (mounted / "dir").mkdir()
    (mounted / "dir" / "file").write_bytes(b"x")
    os.link(mounted / "dir" / "file", mounted / "hard")
    os.symlink("dir", mounted / "sym")
    os.mkfifo(mounted / "fifo")
    names = ["", "dir", "dir/file", "hard", "sym", "fifo"]
    before = {n: os.lstat(mounted / n).st_ino for n in names}
    mount_ctl.remount()
    assert {n: os.lstat(mounted / n).st_ino for n in names} == before
    assert before["hard"] == before["dir/file"]
    assert len(set(before.values())) == len(names) - 1


def getdents_types(directory: Path) -> dict[str, int]:
    """Name -> d_type straight from getdents64(2) (overlayfs needs real d_type)."""
    names = {}
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    buf = ctypes.create_string_buffer(32 * KiB)
    try:
        while (n := _libc.syscall(217, fd, buf, len(buf))) > 0:  # SYS_getdents64
            pos = 0
            while pos < n:
                reclen, dtype = struct.unpack_from("<HB", buf.raw, pos + 16)
                name = buf.raw[pos + 19 : pos + reclen].split(b"\0", 1)[0]
                names[os.fsdecode(name)] = dtype
                pos += reclen
        assert n == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)
    return names


def test_readdir_reports_d_type(mounted: Path) -> None:
    (mounted / "dir").mkdir()
    (mounted / "file").write_bytes(b"")
    os.symlink("file", mounted / "link")
    os.mkfifo(mounted / "fifo")
    os.mknod(mounted / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(mounted / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    dt_dir, dt_reg, dt_lnk, dt_fifo, dt_chr, dt_blk = 4, 8, 10, 1, 2, 6
    types = getdents_types(mounted)
    types.pop(".", None)  # POSIX lets a filesystem leave out . and ..
    types.pop("..", None)
    assert types == {
        "dir": dt_dir,
        "file": dt_reg,
        "link": dt_lnk,
        "fifo": dt_fifo,
        "chr": dt_chr,
        "blk": dt_blk,
    }


def test_readdir_neither_skips_nor_repeats_while_deleting(mounted: Path) -> None:
    d = mounted / "big"
    d.mkdir()
    names = {f"entry-{i:05d}-{'x' * 40}" for i in range(3000)}
    for name in names:
        (d / name).write_bytes(b"")
    seen = []
    with os.scandir(d) as it:
        for entry in it:
            seen.append(entry.name)
            os.unlink(entry.path)  # already seen: must not shift what follows
    assert len(seen) == len(set(seen)), "readdir repeated entries"
    assert set(seen) == names, f"readdir skipped {len(names - set(seen))} entries"
    assert os.listdir(d) == []


def test_readdir_offsets_survive_additions(mounted: Path) -> None:
    d = mounted / "big"
    d.mkdir()
    names = {f"old-{i:05d}" for i in range(2000)}
    for name in names:
        (d / name).write_bytes(b"")
    seen = []
    with os.scandir(d) as it:
        for i, entry in enumerate(it):
            seen.append(entry.name)
            if i % 3 == 0:
                (d / f"new-{i:05d}").write_bytes(b"")
    old_seen = [n for n in seen if n.startswith("old-")]
    assert len(seen) == len(set(seen)), "readdir repeated entries"
    assert set(old_seen) == names


def test_data_survives_remount(mounted: Path, mount_ctl: Mount) -> None:
    files = {
        "empty": b"",
        "one": b"1",
        "text": b"compressible line\n" * 20_000,
        "a/b/c/random": random_bytes(5 * MiB + 3, seed=15),
    }
    for name, data in files.items():
        (mounted / name).parent.mkdir(parents=True, exist_ok=True)
        write_bytes(mounted / name, data)
    mount_ctl.remount()
    for name, data in files.items():
        assert read_bytes(mounted / name) == data, name
    assert os.stat(mounted / "a" / "b").st_nlink == 3


def test_overlayfs_upper_on_mount(mounted: Path, tmp_path: Path) -> None:
    """Docker's overlay2: upper and work dirs on buildatfs, deleted and recreated."""
    if "overlay" not in Path("/proc/filesystems").read_text():
        pytest.skip("the kernel has no overlay filesystem")
    lower, merged = tmp_path / "lower", tmp_path / "merged"
    lower.mkdir()
    merged.mkdir()
    (lower / "base").write_bytes(b"from lower")
    (lower / "gone").write_bytes(b"to delete")
    for round_ in range(3):
        upper, work = mounted / "upper", mounted / "work"
        upper.mkdir()
        work.mkdir()
        overlay_round(lower, upper, work, merged, round_)
        subprocess.run(["rm", "-rf", str(upper), str(work)], check=True, timeout=60)


def overlay_round(lower: Path, upper: Path, work: Path, merged: Path, round_: int) -> None:
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    proc = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"round {round_}: overlay mount failed: {proc.stderr}"
    try:
        (merged / "new").write_bytes(b"upper data")
        os.unlink(merged / "gone")
        with open(merged / "base", "ab") as f:
            f.write(b" + copy-up")
        assert sorted(os.listdir(merged)) == ["base", "new"]
        assert (merged / "base").read_bytes() == b"from lower + copy-up"
    finally:
        subprocess.run(["umount", str(merged)], check=True, timeout=60)
    whiteout = os.lstat(upper / "gone")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert (upper / "new").read_bytes() == b"upper data"
