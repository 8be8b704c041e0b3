"""The command line: user mistakes, exit codes, the lock file and `stats`."""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fuse_helpers import (
    REPO,
    Mount,
    cli_env,
    describe,
    is_mounted,
    pid_alive,
    random_bytes,
    run_cli,
    wait_for,
    write_bytes,
)

MiB = 1 << 20
INT_KEYS = ["logical_bytes", "unique_bytes", "stored_bytes", "chunks", "files", "directories"]
FLOAT_KEYS = ["dedup_ratio", "compression_ratio", "overall_ratio"]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int | None = None) -> None:
    """A user mistake: non-zero (or CODE) exit, one stderr line, no traceback."""
    assert "Traceback" not in proc.stderr, describe(proc)
    if code is None:
        assert proc.returncode != 0, describe(proc)
    else:
        assert proc.returncode == code, describe(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, describe(proc)


def assert_usage_error(proc: subprocess.CompletedProcess[str], code: int = 2) -> None:
    """argparse style: usage lines are fine, but the exit code and no traceback."""
    assert proc.returncode == code, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    assert proc.stderr.strip(), describe(proc)


# --- user mistakes -----------------------------------------------------------


def test_no_arguments_is_usage_error() -> None:
    assert_usage_error(run_cli())


def test_unknown_command_is_usage_error() -> None:
    assert_usage_error(run_cli("frobnicate"))


def test_mount_missing_argument_is_usage_error(tmp_path: Path) -> None:
    assert_usage_error(run_cli("mount", tmp_path))


def test_fsck_bad_option_is_fsck_usage_error(store: Path) -> None:
    assert_usage_error(run_cli("fsck", "--no-such-option", store), code=16)


def test_fsck_missing_store(tmp_path: Path) -> None:
    proc = run_cli("fsck", tmp_path / "nope")
    assert_one_line_error(proc)
    assert proc.returncode in (8, 16), describe(proc)  # fsck(8): operational or usage


def test_stats_missing_store(tmp_path: Path) -> None:
    proc = run_cli("stats", tmp_path / "nope")
    assert_one_line_error(proc, code=2)
    assert proc.stderr == f"buildatfs: {tmp_path / 'nope'} does not exist.\n"
    proc = run_cli("stats", tmp_path)  # there, but no store: point at init
    assert_one_line_error(proc, code=2)
    assert f"run `buildatfs init {tmp_path}`" in proc.stderr


@pytest.mark.parametrize("command", [["gc"], ["stats"], ["scrub"], ["fsck"], ["init"]])
def test_empty_path_is_usage_error(command: list[str], tmp_path: Path) -> None:
    """An empty path would mean the current directory; it is refused instead."""
    proc = subprocess.run(
        [sys.executable, "-m", "buildatfs", *command, ""],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert_one_line_error(proc, code=16 if command == ["fsck"] else 2)
    assert "an empty path names nothing" in proc.stderr
    assert not any(tmp_path.iterdir())  # (init made nothing in the current directory)


@pytest.mark.fuse
def test_mount_missing_store(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    assert_one_line_error(run_cli("mount", tmp_path / "nope", tmp_path / "mnt"))
    assert not is_mounted(tmp_path / "mnt")


@pytest.mark.fuse
def test_mount_missing_mountpoint(store: Path, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("mount", store, tmp_path / "nope"))


def test_mount_a_plain_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "precious").write_bytes(b"keep")
    (tmp_path / "mnt").mkdir()
    assert_one_line_error(run_cli("mount", tmp_path / "notastore", tmp_path / "mnt"))
    assert not is_mounted(tmp_path / "mnt")
    assert os.listdir(tmp_path / "notastore") == ["precious"]


def test_init_refuses_existing_store(store: Path) -> None:
    before = sorted(p.name for p in store.iterdir())
    assert_one_line_error(run_cli("init", store))
    assert sorted(p.name for p in store.iterdir()) == before
    assert run_cli("fsck", store).returncode == 0


def test_umount_of_a_plain_directory(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("umount", tmp_path))


@pytest.mark.fuse
def test_mounting_a_mounted_store_exits_3(mounted: Path, mount_ctl: Mount, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    assert_one_line_error(run_cli("mount", mount_ctl.store, other), code=3)
    assert_one_line_error(run_cli("mount", mount_ctl.store, mounted), code=3)
    assert not is_mounted(other)
    assert mount_ctl.daemon_pid() == mount_ctl.pid


# --- init, mount, lock -------------------------------------------------------


def test_init_creates_layout(store: Path) -> None:
    for name in ("meta", "packs", "staging"):
        assert (store / name).is_dir(), name
    assert run_cli("fsck", store).returncode == 0


@pytest.mark.fuse
def test_lock_names_the_flocked_daemon(mounted: Path, mount_ctl: Mount) -> None:
    pid = mount_ctl.daemon_pid()
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert any(b"buildatfs" in arg for arg in cmdline), cmdline
    with open(mount_ctl.store / "lock", "rb") as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.fuse
def test_umount_returns_after_daemon_exit(mounted: Path, mount_ctl: Mount) -> None:
    (mounted / "f").write_bytes(random_bytes(MiB, seed=3))
    pid = mount_ctl.daemon_pid()
    proc = run_cli("umount", mounted)
    assert proc.returncode == 0, describe(proc)
    assert not is_mounted(mounted)
    assert not pid_alive(pid), f"umount returned while daemon {pid} still runs"


@pytest.mark.fuse
def test_mount_returns_with_caller_pipes_closed(mount_ctl: Mount) -> None:
    """`$(buildatfs mount ...)` must return: the daemon may not keep our stdout."""
    cmd = [sys.executable, "-m", "buildatfs", "mount", str(mount_ctl.store)]
    try:
        proc = subprocess.run(
            [*cmd, str(mount_ctl.mountpoint)],
            cwd=REPO,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        if is_mounted(mount_ctl.mountpoint):
            mount_ctl.pid = mount_ctl.daemon_pid()
    assert proc.returncode == 0, proc.stderr
    assert is_mounted(mount_ctl.mountpoint)


@pytest.mark.fuse
def test_foreground_mount_stays_attached(mount_ctl: Mount, tmp_path: Path) -> None:
    args = ["mount", "--foreground", str(mount_ctl.store), str(mount_ctl.mountpoint)]
    with open(tmp_path / "fg.err", "wb") as err:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "buildatfs", *args],
            cwd=REPO,
            env=cli_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        wait_for(lambda: is_mounted(mount_ctl.mountpoint), 60, "the foreground mount")
        mount_ctl.pid = daemon.pid
        assert mount_ctl.daemon_pid() == daemon.pid
        assert daemon.poll() is None
        (mount_ctl.mountpoint / "f").write_bytes(b"fg")
        mount_ctl.umount()
        assert daemon.wait(timeout=60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=60)


# --- stats -------------------------------------------------------------------


def load_stats(text: str) -> dict[str, float]:
    def reject(constant: str) -> float:
        raise AssertionError(f"stats printed {constant}, which is not JSON")

    return json.loads(text, parse_constant=reject)


def test_stats_json_on_empty_store(store: Path) -> None:
    proc = run_cli("stats", "--json", store)
    assert proc.returncode == 0, describe(proc)
    stats = load_stats(proc.stdout)
    assert {k: stats[k] for k in INT_KEYS[:5]} == dict.fromkeys(INT_KEYS[:5], 0)
    assert all(math.isfinite(stats[k]) for k in FLOAT_KEYS), stats


@pytest.mark.fuse
def test_stats_json_after_writing(mounted: Path, mount_ctl: Mount) -> None:
    random_data = random_bytes(MiB, seed=1)
    text = b"".join(b"line %07d of a compressible file\n" % i for i in range(40_000))[:MiB]
    for d in ("a", "b", "a/c"):
        (mounted / d).mkdir()
    write_bytes(mounted / "a" / "random", random_data)
    write_bytes(mounted / "b" / "random-copy", random_data)
    write_bytes(mounted / "a" / "c" / "text", text)
    mount_ctl.remount()
    proc = run_cli("stats", "--json", mount_ctl.store)
    assert proc.returncode == 0, describe(proc)
    stats = load_stats(proc.stdout)
    check_stats_types(stats)
    check_stats_values(stats, mount_ctl.store)
    via_mount = run_cli("stats", "--json", mounted)
    assert via_mount.returncode == 0, describe(via_mount)
    assert load_stats(via_mount.stdout) == stats


def check_stats_types(stats: dict[str, float]) -> None:
    for key in INT_KEYS:
        assert type(stats[key]) is int, (key, stats[key])
    for key in FLOAT_KEYS:
        assert type(stats[key]) is float, (key, stats[key])


def check_stats_values(stats: dict[str, float], store: Path) -> None:
    assert stats["logical_bytes"] == 3 * MiB
    assert stats["unique_bytes"] == 2 * MiB  # the copy shares every chunk
    on_disk = sum(p.stat().st_size for p in (store / "packs").glob("*/*.pack"))
    assert stats["stored_bytes"] == on_disk
    assert stats["stored_bytes"] < stats["unique_bytes"] < stats["logical_bytes"]
    assert stats["chunks"] >= 2
    assert stats["files"] == 3
    assert stats["directories"] in (3, 4)  # with or without the root
    assert stats["dedup_ratio"] == pytest.approx(3 * MiB / stats["unique_bytes"], rel=0.01)
    ratio = stats["unique_bytes"] / stats["stored_bytes"]
    assert stats["compression_ratio"] == pytest.approx(ratio, rel=0.1)
    overall = stats["logical_bytes"] / stats["stored_bytes"]
    assert stats["overall_ratio"] == pytest.approx(overall, rel=0.01)


def test_stats_human_table(store: Path) -> None:
    proc = run_cli("stats", store)
    assert proc.returncode == 0, describe(proc)
    assert len(proc.stdout.strip().splitlines()) >= 3, proc.stdout
    assert "Traceback" not in proc.stderr
    with pytest.raises(json.JSONDecodeError):
        json.loads(proc.stdout)
