"""Run the buildatfs CLI and manage real FUSE mounts for the tests.

Every external command runs with a timeout, so a hung mount fails a test
instead of hanging the session. Daemons started here are registered in
LIVE_MOUNTS so that the watchdog in conftest.py can kill them (by pid) when a
test blocks inside a FUSE request.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLI_TIMEOUT = 120.0
MOUNT_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 180.0
DAEMON_EXIT_GRACE = 10.0

# A log line at these levels is a test failure unless the test declared it.
LOG_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|^Traceback")

LIVE_MOUNTS: set[Mount] = set()


def cli_env() -> dict[str, str]:
    """The environment for CLI runs: the work tree's package comes first."""
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + old if old else "")
    return env


def run_cli(*args: object, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run `python -m buildatfs ARGS` and return its exit code and output.

    Output goes through temporary files, not pipes, so a daemon that keeps
    the caller's stdout open cannot make this wait. Fails the test on timeout.
    """
    cmd = [sys.executable, "-m", "buildatfs", *(os.fsdecode(a) for a in args)]  # type: ignore[arg-type]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.run(
                cmd,
                cwd=REPO,
                env=cli_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(cmd)} did not finish within {timeout:.0f} s")
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    """A one-paragraph account of a finished command for assertion messages."""
    cmd = " ".join(str(a) for a in proc.args)
    return f"{cmd} exited {proc.returncode}\nstdout: {proc.stdout!r}\nstderr: {proc.stderr!r}"


def wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll COND until it is true; fail the test naming WHAT after TIMEOUT s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mountpoint: str
    fstype: str
    source: str
    mount_options: str
    super_options: str


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mount_table() -> list[MountEntry]:
    """Parse /proc/self/mountinfo (reading it never touches a FUSE daemon)."""
    entries = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        fstype, source, super_options = [*right.split(), "", "", ""][:3]
        entries.append(
            MountEntry(_unescape(fields[4]), fstype, _unescape(source), fields[5], super_options)
        )
    return entries


def find_mount(mountpoint: Path) -> MountEntry | None:
    """The newest mount at MOUNTPOINT, if any."""
    found = [e for e in mount_table() if e.mountpoint == str(mountpoint)]
    return found[-1] if found else None


def is_mounted(mountpoint: Path) -> bool:
    return find_mount(mountpoint) is not None


def pid_alive(pid: int) -> bool:
    """True if PID runs and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def lazy_unmount(mountpoint: Path) -> None:
    """Detach a (possibly dead) FUSE mount; only for cleanup after failures."""
    subprocess.run(
        ["fusermount3", "-u", "-z", str(mountpoint)],
        capture_output=True,
        timeout=30,
        check=False,
    )


def sha256_file(path: Path | bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_bytes(path: Path | bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path: Path | bytes, data: bytes, *, fsync: bool = False) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def hand_to_daemon(fd: int) -> None:
    """Make the kernel send *fd*'s dirty pages to the daemon as writes (no
    fsync, so nothing is committed) and drop them from its cache, so that
    reads of them reach the daemon."""
    libc = ctypes.CDLL(None, use_errno=True)
    wait_write_wait = 1 | 2 | 4  # SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER
    if libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), wait_write_wait):
        raise OSError(ctypes.get_errno(), "sync_file_range")
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def random_bytes(size: int, seed: int) -> bytes:
    """Incompressible, reproducible bytes."""
    return random.Random(seed).randbytes(size)


@dataclass(eq=False)
class Mount:
    """One store and one mountpoint, mounted and unmounted through the CLI.

    The `mount_ctl` fixture tears it down strictly: unmount, then fsck with
    `fsck_args`, whose exit code must be in `fsck_codes`, then the log check.
    Tests that damage the store change those two attributes.
    """

    store: Path
    mountpoint: Path
    pid: int | None = None
    fsck_args: tuple[str, ...] = ()
    fsck_codes: frozenset[int] = frozenset({0})
    expected_log: list[tuple[re.Pattern[str], int | None]] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.store / "buildatfs.log"

    def mount(self, *extra: str) -> None:
        """Mount through the CLI and check that the daemon and mount are there."""
        proc = run_cli("mount", *extra, self.store, self.mountpoint, timeout=MOUNT_TIMEOUT)
        assert proc.returncode == 0, describe(proc)
        assert is_mounted(self.mountpoint), f"mount returned 0 but {self.mountpoint} is not mounted"
        self.pid = self.daemon_pid()
        assert pid_alive(self.pid), f"pid {self.pid} in {self.store / 'lock'} is not running"
        LIVE_MOUNTS.add(self)
        os.stat(self.mountpoint)  # answers

    def daemon_pid(self) -> int:
        text = (self.store / "lock").read_text().strip()
        assert text.isdigit(), f"{self.store / 'lock'} holds {text!r}, not a pid"
        return int(text)

    def umount(self) -> None:
        """Unmount strictly: exit 0, mount gone, daemon gone when it returns."""
        proc = run_cli("umount", self.mountpoint, timeout=UMOUNT_TIMEOUT)
        assert proc.returncode == 0, describe(proc)
        assert not is_mounted(self.mountpoint), "umount returned 0 but the mount is still there"
        if self.pid is not None:
            # test_cli checks that umount waits for the exit itself; here a
            # short grace keeps that one bug from failing every test.
            pid = self.pid
            wait_for(lambda: not pid_alive(pid), DAEMON_EXIT_GRACE, f"daemon {pid} to exit")
        LIVE_MOUNTS.discard(self)
        self.pid = None

    def remount(self) -> None:
        self.umount()
        self.mount()

    def kill_daemon(self) -> None:
        """kill -9 the daemon (pid from STORE/lock) and wait until it is gone."""
        pid = self.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), 30, f"killed daemon {pid} to exit")
        LIVE_MOUNTS.discard(self)

    def owns(self, pid: int | None) -> bool:
        """True if PID is alive and is a buildatfs process serving our store."""
        if pid is None or not pid_alive(pid):
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return False
        return b"buildatfs" in cmdline and os.fsencode(self.store) in cmdline

    def force_cleanup(self) -> None:
        """After a failure: kill our daemon if it still runs, detach the mount."""
        pid = self.pid
        if pid is not None and self.owns(pid):
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not pid_alive(pid), 30, f"daemon {pid} to die")
        if is_mounted(self.mountpoint):
            lazy_unmount(self.mountpoint)
        LIVE_MOUNTS.discard(self)

    def fsck(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("fsck", *args, self.store, timeout=600)

    def stats(self, target: Path | None = None) -> dict[str, float]:
        proc = run_cli("stats", "--json", target or self.store)
        assert proc.returncode == 0, describe(proc)
        return json.loads(proc.stdout)

    def expect_damage(self) -> None:
        """The test damages the store on purpose: teardown's `fsck --verify-data`
        must find damage (exit 1 or 4), and the log may hold errors."""
        self.fsck_args = ("--verify-data",)
        self.fsck_codes = frozenset({1, 4})
        self.expect_log(r"\b(ERROR|WARNING)\b")

    def expect_log(self, pattern: str, count: int | None = None) -> None:
        """Declare log problem lines matching PATTERN (exactly COUNT if given)."""
        self.expected_log.append((re.compile(pattern), count))

    def log_problems(self) -> list[str]:
        if not self.log_path.exists():
            return []
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if LOG_PROBLEM.search(line)]

    def check_log(self) -> None:
        """Fail on any warning or error the test did not declare."""
        problems = self.log_problems()
        for pattern, count in self.expected_log:
            matched = [line for line in problems if pattern.search(line)]
            if count is not None:
                assert len(matched) == count, (
                    f"expected {count} log lines matching {pattern.pattern!r}, got {matched}"
                )
            problems = [line for line in problems if not pattern.search(line)]
        assert not problems, "undeclared warnings/errors in buildatfs.log:\n" + "\n".join(problems)


def finish_mount(mnt: Mount) -> None:
    """Strict teardown: unmount, fsck as declared, check the log."""
    try:
        if is_mounted(mnt.mountpoint):
            mnt.umount()
    finally:
        mnt.force_cleanup()
    proc = mnt.fsck(*mnt.fsck_args)
    assert proc.returncode in mnt.fsck_codes, describe(proc)
    mnt.check_log()


def walk_files(root: Path) -> Iterable[Path]:
    """Regular files under ROOT, sorted, without following symlinks."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                yield path


def _docker_e2e():  # tools/ is not a package: load the end-to-end script as a module
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import docker_e2e
    finally:
        sys.path.pop(0)
    return docker_e2e


DockerDaemon = _docker_e2e().Daemon


def docker_daemon(
    name: str, data_root: Path, run_dir: Path, storage_driver: str | None = None
) -> DockerDaemon:
    """A dockerd of the test's own (not started): data-root DATA_ROOT, everything else,
    socket and log included, in RUN_DIR (keep it short: unix socket paths are limited)."""
    return DockerDaemon(
        name, data_root, run_dir, run_dir / "dockerd.log", storage_driver=storage_driver
    )


def pack_files(store: Path) -> list[Path]:
    return sorted((store / "packs").glob("*/*.pack"))


def find_in_packs(store: Path, needle: bytes) -> tuple[Path, int]:
    """The one pack file and offset holding NEEDLE (random data is stored raw)."""
    hits = []
    for pack in pack_files(store):
        body = pack.read_bytes()
        at = body.find(needle)
        while at >= 0:
            hits.append((pack, at))
            at = body.find(needle, at + 1)
    assert len(hits) == 1, f"expected the needle once in the packs, found {hits}"
    return hits[0]


def flip_byte(pack: Path, offset: int) -> None:
    """Damage one stored byte, as a failing disk would."""
    with open(pack, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
