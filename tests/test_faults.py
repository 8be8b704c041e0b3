"""The daemon dies at each named step of a commit, a pack rotation and a gc pass.

For every step in `faults.STEPS`: the store holds fsync'ed "old" files; a
mount with ``BUILDATFS_CRASH_AT=step`` changes them until the daemon dies at
that step; after the documented recovery (umount, fsck, mount) every file has
its old or its new content in full, never a mix, and fsck is clean.
Also runs tools/crash_harness.py for 10 kill -9 cycles.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fuse_helpers import (
    REPO,
    Mount,
    cli_env,
    describe,
    pid_alive,
    random_bytes,
    read_bytes,
    run_cli,
    wait_for,
    write_bytes,
)

from buildatfs import faults

pytestmark = pytest.mark.fuse

KiB, MiB = 1 << 10, 1 << 20
COMMIT_STEPS = [s for s in faults.STEPS if s.startswith(("commit:", "pack:"))]
GC_STEPS = [s for s in faults.STEPS if s.startswith("gc:")]
# What recovery must give back after a crash at each step (README, crash rules):
# staging is discarded, committed index transactions are kept.
EXPECTED = {
    "commit:chunks-written": "old",
    "commit:index-committed": "new",
    "commit:staging-removed": "new",
    "pack:rotated": "old",
}


def test_every_step_is_covered() -> None:
    assert set(COMMIT_STEPS) | set(GC_STEPS) == set(faults.STEPS)
    assert set(EXPECTED) == set(COMMIT_STEPS)


def old_files() -> dict[str, bytes]:
    """Random (stored raw), compressible and deduplicating contents."""
    text = b"".join(b"line %d of a compressible file\n" % i for i in range(40000))
    return {
        "small": random_bytes(300 * KiB, seed=1),
        "grows": random_bytes(1 * MiB, seed=2),
        "appended": text,
        "patched": random_bytes(3 * MiB, seed=3),
        "untouched": random_bytes(2 * MiB, seed=4),
    }


def new_files(old: dict[str, bytes]) -> dict[str, bytes]:
    """Each changed file's new content; none of it is in the store yet."""
    patched = bytearray(old["patched"])
    patched[MiB : MiB + 100 * KiB] = random_bytes(100 * KiB, seed=13)
    return {
        "small": random_bytes(300 * KiB, seed=11),
        "grows": random_bytes(1 * MiB + 4321, seed=12),
        "appended": old["appended"] + random_bytes(70 * KiB, seed=14),
        "patched": bytes(patched),
    }


def overwrite_in_place(path: Path, data: bytes, old_len: int) -> int:
    """Open without O_TRUNC (which commits at once, as its own step) and write."""
    fd = os.open(path, os.O_WRONLY)
    assert len(data) >= old_len
    os.pwrite(fd, data, 0)
    return fd


def mount_crashing(mnt: Mount, step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUILDATFS_CRASH_AT", step)
    try:
        mnt.mount()
    finally:
        monkeypatch.delenv("BUILDATFS_CRASH_AT")


def wait_for_death(mnt: Mount, timeout: float = 60) -> None:
    pid = mnt.daemon_pid()
    wait_for(lambda: not pid_alive(pid), timeout, f"daemon {pid} to die at its crash step")


def recover(mnt: Mount) -> int:
    """umount the dead mount, fsck (0 or 1), mount again; return fsck's code."""
    mnt.umount()
    proc = mnt.fsck()
    assert proc.returncode in (0, 1), describe(proc)
    mnt.mount()
    return proc.returncode


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_crash_in_commit_keeps_old_or_new(
    mount_ctl: Mount, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = mount_ctl.mountpoint
    old = old_files()
    mount_ctl.mount()
    for name, data in old.items():
        write_bytes(root / name, data, fsync=True)
    mount_ctl.umount()

    mount_crashing(mount_ctl, step, monkeypatch)
    new = new_files(old)
    fds = []
    for name in ("grows", "appended", "patched"):
        fd = overwrite_in_place(root / name, new[name], len(old[name]))
        fds.append(fd)
    small = overwrite_in_place(root / "small", new["small"], len(old["small"]))
    with pytest.raises(OSError):  # the daemon dies inside this commit
        os.fsync(small)
        os.close(small)
        for fd in fds:
            os.fsync(fd)
        pytest.fail(f"the daemon did not die at {step}")
    for fd in [small, *fds]:
        with contextlib.suppress(OSError):
            os.close(fd)
    wait_for_death(mount_ctl)

    recover(mount_ctl)
    states = {}
    for name, data in old.items():
        got = read_bytes(root / name)
        if got == data:
            states[name] = "old"
        elif name in new and got == new[name]:
            states[name] = "new"
        else:
            pytest.fail(f"after a crash at {step}, {name} is neither old nor new: "
                        f"{len(got)} bytes {digest(got)}, old {digest(data)}, "
                        f"new {digest(new.get(name, b''))}")
    assert states["untouched"] == "old"
    assert states["small"] == EXPECTED[step], f"fsync'ed file after a crash at {step}: {states}"
    assert sorted(os.listdir(root)) == sorted(old)


@pytest.mark.parametrize("step", GC_STEPS)
def test_crash_in_gc_keeps_live_files(mount_ctl: Mount, step: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    root = mount_ctl.mountpoint
    keep = {f"keep-{i}": random_bytes(200 * KiB + i, seed=100 + i) for i in range(4)}
    mount_ctl.mount()
    for name, data in keep.items():
        write_bytes(root / name, data, fsync=True)
    write_bytes(root / "junk", random_bytes(6 * MiB, seed=200), fsync=True)
    mount_ctl.umount()
    packs_before = sorted((mount_ctl.store / "packs").glob("*/*.pack"))
    assert packs_before, "nothing was written to a pack"

    mount_crashing(mount_ctl, step, monkeypatch)
    os.truncate(root / "junk", 0)  # drops its extents at once: the pack is mostly dead
    proc = run_cli("gc", root)
    assert proc.returncode == 1, f"gc should report the daemon's death: {describe(proc)}"
    wait_for_death(mount_ctl)

    recover(mount_ctl)
    for name, data in keep.items():
        assert read_bytes(root / name) == data, f"{name} damaged by a crash at {step}"
    assert read_bytes(root / "junk") == b""
    proc = run_cli("gc", root)  # the interrupted collection can finish now
    assert proc.returncode == 0, describe(proc)
    for name, data in keep.items():
        assert read_bytes(root / name) == data, f"{name} damaged by gc after recovery"
    mount_ctl.umount()
    packs_after = sorted((mount_ctl.store / "packs").glob("*/*.pack"))
    assert sum(p.stat().st_size for p in packs_after) < 3 * MiB, "the dead pack was not reclaimed"
    mount_ctl.mount()
    for name, data in keep.items():
        assert read_bytes(root / name) == data


@pytest.mark.parametrize("step", GC_STEPS)
def test_crash_in_compaction_keeps_files(mount_ctl: Mount, step: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Compaction moves records the way gc does, so the same crash rules hold."""
    root = mount_ctl.mountpoint
    keep = {f"text-{i}": b"".join(b"record %d of file %d, compressible\n" % (j, i)
                                  for j in range(20000 + i)) for i in range(4)}
    mount_ctl.mount()
    for name, data in keep.items():
        write_bytes(root / name, data, fsync=True)
    mount_ctl.umount()

    mount_crashing(mount_ctl, step, monkeypatch)
    proc = run_cli("gc", "--compact", root)
    assert proc.returncode == 1, f"gc should report the daemon's death: {describe(proc)}"
    wait_for_death(mount_ctl)

    recover(mount_ctl)
    for name, data in keep.items():
        assert read_bytes(root / name) == data, f"{name} damaged by a crash at {step}"
    proc = run_cli("gc", "--compact", root)  # the interrupted compaction can finish now
    assert proc.returncode == 0, describe(proc)
    mount_ctl.remount()
    for name, data in keep.items():
        assert read_bytes(root / name) == data, f"{name} damaged by compaction after recovery"
    mount_ctl.fsck_args = ("--verify-data",)


@pytest.mark.slow
def test_crash_harness_10_cycles(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "crash_harness.py"), "--cycles", "10",
         "--seed", "20240611", "--workdir", str(tmp_path / "crash")],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=400, check=False,
    )
    assert proc.returncode == 0, f"crash harness failed:\n{proc.stdout}\n{proc.stderr}"
    assert re.search(r"^bytes lost \(must be 0\) +0$", proc.stdout, re.M), proc.stdout
