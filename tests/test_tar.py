"""A tar archive with xattrs, hard links, devices and owners survives extraction."""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest
from fuse_helpers import Mount

pytestmark = pytest.mark.fuse

TAR_OPTS = ["--xattrs", "--xattrs-include=*", "--numeric-owner"]
CAPS = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # cap_net_raw+ep
SOURCE = next((p for p in ("/usr/share/perl", "/usr/lib/python3.11") if os.path.isdir(p)), "")


def tar(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["tar", *TAR_OPTS, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def add_special_entries(root: Path) -> None:
    """Things a container layer holds that a plain copy of /usr lacks."""
    sp = root / "special"
    sp.mkdir()
    make_special_files(sp)
    # Ownership first: chown clears setuid bits and security.capability.
    entries = sorted(p for p in sp.iterdir() if p.name != "sgid")
    for i, path in enumerate(entries):
        os.chown(path, 1000 + i, 2000 + i * 7, follow_symlinks=False)
    os.chown(sp / "sgid", 65534, 65534)
    os.chmod(sp / "ping", 0o4755)
    os.chmod(sp / "sgid", 0o2775)
    os.chmod(sp / "sticky", 0o1777)
    os.setxattr(sp / "ping", "security.capability", CAPS)
    os.setxattr(sp / "tagged", "user.mime_type", b"text/plain")
    os.setxattr(sp / "tagged", "trusted.overlay.origin", bytes(range(64)))
    for i, path in enumerate(entries):
        ns = (1_400_000_000_000_000_000 + i, 1_500_000_000_111_111_111 + i * 99)
        os.utime(path, ns=ns, follow_symlinks=False)


def make_special_files(sp: Path) -> None:
    (sp / "ping").write_bytes(b"\x7fELF fake binary")
    (sp / "tagged").write_bytes(b"tagged")
    os.link(sp / "tagged", sp / "tagged.hardlink")
    os.mknod(sp / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.link(sp / "null", sp / "null.hardlink")
    os.mknod(sp / "sda1", stat.S_IFBLK | 0o660, os.makedev(8, 1))
    os.mkfifo(sp / "fifo", 0o640)
    (sp / "sgid").mkdir()
    (sp / "sticky").mkdir()
    os.symlink("x" * 1000, sp / "dangling")
    with open(sp / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    (sp / "empty").write_bytes(b"")
    (sp / os.fsdecode(b"name\xff")).write_bytes(b"odd name")


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    if not SOURCE:
        pytest.fail("no /usr/share/perl or /usr/lib/python3.11 to archive")
    src = tmp_path / "src"
    shutil.copytree(SOURCE, src / "tree", symlinks=True)
    add_special_entries(src)
    path = tmp_path / "layer.tar"
    proc = tar("-cpf", str(path), "-C", str(src), ".")
    assert proc.returncode == 0, proc.stderr
    return path


def test_tar_extract_and_compare_after_remount(
    archive: Path, mounted: Path, mount_ctl: Mount
) -> None:
    dst = mounted / "layer"
    dst.mkdir()
    proc = tar("-xpf", str(archive), "-C", str(dst))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    mount_ctl.remount()
    proc = tar("-df", str(archive), "-C", str(dst))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    check_specials(dst / "special")


def check_specials(sp: Path) -> None:
    """What `tar -d` may not compare: xattrs, link counts, device numbers."""
    assert os.getxattr(sp / "ping", "security.capability") == CAPS
    assert stat.S_IMODE(os.stat(sp / "ping").st_mode) == 0o4755
    assert os.getxattr(sp / "tagged", "user.mime_type") == b"text/plain"
    assert os.getxattr(sp / "tagged.hardlink", "trusted.overlay.origin") == bytes(range(64))
    assert os.stat(sp / "tagged").st_ino == os.stat(sp / "tagged.hardlink").st_ino
    # GNU tar archives a hard link to a device as a second device node.
    assert os.lstat(sp / "null.hardlink").st_rdev == os.makedev(1, 3)
    assert os.lstat(sp / "sda1").st_rdev == os.makedev(8, 1)
    assert stat.S_ISFIFO(os.lstat(sp / "fifo").st_mode)
    sgid = os.stat(sp / "sgid")
    assert (stat.S_IMODE(sgid.st_mode), sgid.st_uid, sgid.st_gid) == (0o2775, 65534, 65534)
    assert stat.S_IMODE(os.stat(sp / "sticky").st_mode) == 0o1777
    assert os.readlink(sp / "dangling") == "x" * 1000
