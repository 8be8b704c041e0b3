"""Docker's storage needs: kernel overlayfs on buildatfs, and dockerd end to end.

The overlayfs tests put the lower, upper and work directories all on one buildatfs mount,
as overlay2 does under Docker's data-root, and check what overlayfs writes into the upper
directory: copied-up files, whiteouts (character devices 0/0), opaque directories
(trusted.overlay.opaque=y) and renamed lower directories. Each test ends by unmounting,
checking the store with fsck (exit 0) and remounting to see the upper directory survive.

The end-to-end test runs tools/docker_e2e.py --quick, which starts two dockerds (one on
buildatfs, one on plain disk), builds, runs, saves and compares images.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_helpers import (
    REPO,
    Mount,
    describe,
    docker_daemon,
    finish_mount,
    read_bytes,
    run_cli,
    write_bytes,
)

DOCKERD = Path("/usr/sbin/dockerd")
DOCKER = Path("/usr/bin/docker")
E2E_TIMEOUT = 900.0


@pytest.fixture
def buildatfs_mount(tmp_path: Path) -> Iterator[Mount]:
    """A fresh store mounted with `python3 -m buildatfs mount`.

    Teardown: `buildatfs umount`, then `buildatfs fsck` must exit 0, and the store's log
    must hold no warning or error.
    """
    store = tmp_path / "store"
    proc = run_cli("init", store)
    assert proc.returncode == 0, describe(proc)
    (tmp_path / "mnt").mkdir()
    mnt = Mount(store, tmp_path / "mnt")
    mnt.mount()
    try:
        yield mnt
    finally:
        finish_mount(mnt)


def mount_overlay(base: Path, merged: Path, extra: str = "") -> None:
    options = f"lowerdir={base / 'lower'},upperdir={base / 'upper'},workdir={base / 'work'}"
    proc = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options + extra, str(merged)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, describe(proc)


def umount_overlay(merged: Path) -> None:
    proc = subprocess.run(
        ["umount", str(merged)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, describe(proc)


@pytest.fixture
def overlay(buildatfs_mount: Mount, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(merged, base): an overlay whose lower, upper and work dirs are all on buildatfs."""
    base = buildatfs_mount.mountpoint / "overlay2" / "layer"
    lower = base / "lower"
    for sub in ("lower/dir/sub", "lower/gone", "lower/moved/inner", "upper", "work"):
        (base / sub).mkdir(parents=True)
    write_bytes(lower / "file", b"lower data\n" * 1000)
    write_bytes(lower / "dir" / "a", b"a")
    write_bytes(lower / "dir" / "sub" / "b", b"b")
    write_bytes(lower / "gone" / "x", b"x")
    write_bytes(lower / "moved" / "inner" / "deep", b"deep")
    os.setxattr(lower / "file", "user.origin", b"lower")
    merged = tmp_path / "merged"
    merged.mkdir()
    yield merged, base
    if os.path.ismount(merged):
        umount_overlay(merged)


def assert_whiteout(path: Path) -> None:
    st = os.lstat(path)
    assert stat.S_ISCHR(st.st_mode), f"{path} is not a character device: {st}"
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (0, 0)


@pytest.mark.fuse
def test_overlay_copy_up_whiteout_opaque(
    overlay: tuple[Path, Path], buildatfs_mount: Mount
) -> None:
    merged, base = overlay
    mount_overlay(base, merged)

    with open(merged / "file", "ab") as f:  # copy-up of data and xattrs
        f.write(b"upper\n")
    assert read_bytes(base / "upper" / "file") == b"lower data\n" * 1000 + b"upper\n"
    assert read_bytes(base / "lower" / "file") == b"lower data\n" * 1000
    assert os.getxattr(base / "upper" / "file", "user.origin") == b"lower"

    os.unlink(merged / "dir" / "a")  # whiteout inside a copied-up directory
    assert_whiteout(base / "upper" / "dir" / "a")
    assert not (merged / "dir" / "a").exists()
    assert (merged / "dir" / "sub" / "b").exists()

    shutil.rmtree(merged / "gone")  # rmdir + mkdir of a lower directory: opaque
    (merged / "gone").mkdir()
    write_bytes(merged / "gone" / "new", b"new")
    assert os.getxattr(base / "upper" / "gone", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(merged / "gone")) == ["new"]

    umount_overlay(merged)
    buildatfs_mount.remount()
    mount_overlay(base, merged)
    assert_whiteout(base / "upper" / "dir" / "a")
    assert os.getxattr(base / "upper" / "gone", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(merged / "gone")) == ["new"]
    assert sorted(os.listdir(merged / "dir")) == ["sub"]
    assert read_bytes(merged / "file").endswith(b"upper\n")


@pytest.mark.fuse
@pytest.mark.parametrize("redirect_dir", ["default", "on"])
def test_overlay_rename_lower_directory(
    overlay: tuple[Path, Path], buildatfs_mount: Mount, redirect_dir: str
) -> None:
    """Without redirect_dir, rename(2) of a lower dir is EXDEV and mv copies; with it, the
    kernel renames and records the origin in trusted.overlay.redirect."""
    merged, base = overlay
    mount_overlay(base, merged, "" if redirect_dir == "default" else ",redirect_dir=on")

    try:
        os.rename(merged / "moved", merged / "renamed")
        renamed = True
    except OSError as exc:
        assert redirect_dir == "default", f"rename with redirect_dir=on failed: {exc}"
        assert exc.errno == 18  # EXDEV: the caller (mv) copies instead
        shutil.move(merged / "moved", merged / "renamed")
        renamed = False
    assert read_bytes(merged / "renamed" / "inner" / "deep") == b"deep"
    assert not (merged / "moved").exists()
    assert_whiteout(base / "upper" / "moved")
    if renamed:
        redirect = os.getxattr(base / "upper" / "renamed", "trusted.overlay.redirect")
        assert redirect.strip(b"/") == b"moved"

    umount_overlay(merged)
    buildatfs_mount.remount()
    mount_overlay(base, merged, "" if redirect_dir == "default" else ",redirect_dir=on")
    assert sorted(os.listdir(merged)) == ["dir", "file", "gone", "renamed"]
    assert read_bytes(merged / "renamed" / "inner" / "deep") == b"deep"


@pytest.mark.slow
def test_docker_end_to_end_quick(tmp_path: Path) -> None:
    for program in (DOCKERD, DOCKER):
        if not program.exists():
            pytest.skip(f"{program} is missing (Debian package docker.io)")
    script = REPO / "tools" / "docker_e2e.py"
    try:
        proc = subprocess.run(
            [sys.executable, str(script), "--quick", "--workdir", str(tmp_path / "e2e")],
            capture_output=True,
            text=True,
            timeout=E2E_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script} --quick did not finish within {E2E_TIMEOUT:.0f} s")
    assert proc.returncode == 0, describe(proc)
    assert re.search(r"storage driver on buildatfs\s+\|\s+overlay2$", proc.stdout, re.M), (
        proc.stdout
    )
    assert re.search(r"ratio logical/stored\s+\|\s+\d+\.\d\dx", proc.stdout), proc.stdout
    assert "docker_e2e: OK" in proc.stdout


def _tiny_rootfs(dest: Path) -> Path:
    """A tar of the host's dash and the libraries it needs: enough for RUN and run."""
    root = dest / "rootfs"
    for path in ("/bin/dash", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"):
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(path), target)
    (root / "bin" / "sh").symlink_to("dash")
    tar = dest / "rootfs.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True, timeout=60)
    return tar


@pytest.mark.fuse
@pytest.mark.parametrize("driver", ["vfs", "fuse-overlayfs"])
def test_other_storage_drivers(buildatfs_mount: Mount, tmp_path: Path, driver: str) -> None:
    """dockerd with vfs or fuse-overlayfs on a buildatfs data-root imports, builds and runs."""
    if not (DOCKERD.exists() and DOCKER.exists()):
        pytest.skip(f"needs {DOCKERD} and {DOCKER} (Debian's docker.io)")
    if driver == "fuse-overlayfs" and shutil.which("fuse-overlayfs") is None:
        pytest.skip("needs fuse-overlayfs (Debian's fuse-overlayfs package)")
    run_dir = Path(f"/tmp/bfdrv-{os.getpid()}-{driver}")  # short: unix socket paths are limited
    run_dir.mkdir()
    daemon = docker_daemon(driver, buildatfs_mount.mountpoint / "docker", run_dir, driver)
    try:
        daemon.start()
        info = daemon.docker("info", "--format", "{{.Driver}}").stdout.strip()
        assert info == driver
        daemon.docker("import", _tiny_rootfs(tmp_path), "tiny:1")
        context = tmp_path / "context"
        context.mkdir()
        (context / "Dockerfile").write_text("FROM tiny:1\nRUN echo built-on-" + driver + " > /x\n")
        daemon.docker("build", "--network=none", "-q", "-t", "tiny:2", context)
        out = daemon.docker(
            "run",
            "--rm",
            "--network=none",
            "--pull=never",
            "tiny:2",
            "/bin/sh",
            "-c",
            "read line < /x; echo $line",
        ).stdout.strip()
        assert out == f"built-on-{driver}"
        daemon.docker("rmi", "tiny:2", "tiny:1")
    finally:
        daemon.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
