"""Fixtures that mount a real buildatfs store through /dev/fuse.

FUSE tests never skip for lack of FUSE: CI must run them, so a machine
without /dev/fuse fails the session at its start with the reason.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_helpers import (
    LIVE_MOUNTS,
    Mount,
    describe,
    finish_mount,
    lazy_unmount,
    mount_table,
    pid_alive,
    run_cli,
)

# A test that blocks longer than this inside the filesystem gets its daemons
# killed (which makes every pending FUSE request fail) and is failed.
TEST_TIMEOUT = 420.0
# Mountpoints live in world-readable temp dirs named like this.
MOUNT_DIR_PREFIX = "buildatfs-test-"
OWNER_FILE = "owner-pid"


def pytest_configure(config: pytest.Config) -> None:
    """Markers and warning policy, also when pytest runs without pyproject.toml."""
    config.addinivalue_line("markers", "fuse: mounts a real filesystem through /dev/fuse")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    # Warnings are failures; this one comes from hypothesis's own plugin imports.
    config.addinivalue_line("filterwarnings", "error")
    config.addinivalue_line(
        "filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing (load the fuse module or pass --device /dev/fuse)")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is not installed (apt-get install fuse3)")
    if os.geteuid() != 0:
        problems.append("the FUSE tests need root (device nodes, chown, trusted.* xattrs)")
    if problems:
        pytest.exit("cannot run the buildatfs FUSE tests: " + "; ".join(problems), returncode=3)
    sweep_stale_mounts(session.config)


def sweep_stale_mounts(config: pytest.Config) -> None:
    """Detach FUSE mounts that earlier, killed runs left in our own temp dirs.

    This runs before pytest prunes old temp dirs, which would otherwise try to
    delete through (or trip over) a dead mount. Mounts of pytest sessions that
    still run, possibly in parallel with this one, are left alone.
    """
    tmp = tempfile.gettempdir()
    pytest_roots = [os.path.join(tmp, f"pytest-of-{getpass.getuser()}") + "/"]
    if config.option.basetemp:
        pytest_roots.append(os.path.abspath(config.option.basetemp) + "/")
    ours = os.path.join(tmp, MOUNT_DIR_PREFIX)
    for entry in reversed(mount_table()):
        if not entry.fstype.startswith("fuse"):
            continue
        point = entry.mountpoint
        if point.startswith(ours):
            stale = not _owner_alive(Path(point).parent)
        else:
            stale = point.startswith(tuple(pytest_roots)) and _is_dead_mount(point)
        if stale:
            lazy_unmount(Path(point))


def _owner_alive(parent: Path) -> bool:
    """True if the pytest process that made this mount directory still runs."""
    try:
        pid = int((parent / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return pid_alive(pid)  # a reused pid only postpones the sweep


def _is_dead_mount(point: str) -> bool:
    """True if the mount's daemon is gone (stat in a child, so a hang cannot stop us)."""
    try:
        proc = subprocess.run(
            ["stat", "-c", "%i", point], capture_output=True, text=True, timeout=5, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return "Transport endpoint is not connected" in proc.stderr


@pytest.fixture(autouse=True)
def fuse_watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    """Kill this test's daemons if the test hangs in a FUSE request."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        for mnt in list(LIVE_MOUNTS):
            if mnt.pid is not None and mnt.owns(mnt.pid):
                os.kill(mnt.pid, signal.SIGKILL)

    timer = threading.Timer(TEST_TIMEOUT, fire)
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()
    if fired.is_set():
        pytest.fail(f"test hung for {TEST_TIMEOUT:.0f} s; its buildatfs daemons were killed")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A freshly initialised store directory."""
    path = tmp_path / "store"
    proc = run_cli("init", path)
    assert proc.returncode == 0, describe(proc)
    return path


@pytest.fixture
def mountpoint() -> Iterator[Path]:
    """An empty directory that every user can reach.

    pytest's own temp dirs are 0700, which would hide the mount from the
    tests that act as uid 65534 (allow_other is the point there).
    """
    parent = Path(tempfile.mkdtemp(prefix=MOUNT_DIR_PREFIX))
    parent.chmod(0o755)
    (parent / OWNER_FILE).write_text(str(os.getpid()))  # see sweep_stale_mounts
    path = parent / "mnt"
    path.mkdir()
    yield path
    with contextlib.suppress(OSError):  # never delete through a mount
        path.rmdir()
        (parent / OWNER_FILE).unlink()
        parent.rmdir()


@pytest.fixture
def mount_ctl(store: Path, mountpoint: Path) -> Iterator[Mount]:
    """An unmounted Mount of `store`; torn down strictly whatever the test did.

    Teardown unmounts, runs `fsck` (a healthy store has nothing to fix: exit
    0, unless the test changed `fsck_codes`) and fails on undeclared warnings
    in the store's log.
    """
    mnt = Mount(store, mountpoint)
    try:
        yield mnt
    finally:
        finish_mount(mnt)


@pytest.fixture
def mounted(mount_ctl: Mount) -> Path:
    """The mountpoint of a mounted fresh store (see `mount_ctl` for teardown)."""
    mount_ctl.mount()
    return mount_ctl.mountpoint
