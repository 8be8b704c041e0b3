"""`buildatfs scrub`: every chunk read back, damage named by the files that use it.

The damage test flips one byte of a committed chunk inside its pack file
(random data is stored raw, so a 64-byte piece of the file can be found
there), so its teardown expects `fsck --verify-data` to find the damage.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from fuse_helpers import (
    Mount,
    describe,
    find_in_packs,
    flip_byte,
    random_bytes,
    run_cli,
    write_bytes,
)

pytestmark = pytest.mark.fuse

MiB = 1 << 20


def scrub(target: Path, *args: str) -> tuple[int, dict]:
    proc = run_cli("scrub", "--json", *args, target)
    assert proc.returncode in (0, 1), describe(proc)
    return proc.returncode, json.loads(proc.stdout)


def named_paths(report: dict) -> set[str]:
    return {p for d in report["damaged"] for f in d["files"] for p in f["paths"]}


def test_scrub_names_every_path_of_the_damaged_file(mount_ctl: Mount) -> None:
    mount_ctl.expect_damage()
    mnt = mount_ctl.mountpoint
    victim = random_bytes(2 * MiB, seed=11)
    mount_ctl.mount()
    write_bytes(mnt / "victim", victim)
    write_bytes(mnt / "bystander", random_bytes(2 * MiB, seed=12))
    (mnt / "dir").mkdir()
    os.link(mnt / "victim", mnt / "dir" / "alias")
    mount_ctl.umount()

    pack, offset = find_in_packs(mount_ctl.store, victim[MiB : MiB + 64])
    flip_byte(pack, offset + 10)
    mount_ctl.mount()

    code, report = scrub(mnt, "--rate", "0")
    assert code == 1, report
    assert len(report["damaged"]) == 1, report
    damage = report["damaged"][0]
    assert damage["error"].startswith("corrupt"), damage
    assert named_paths(report) == {"victim", "dir/alias"}
    (use,) = damage["files"]
    # The flipped byte is at file offset MiB + 10: the chunk starts at most
    # one maximal chunk (256 KiB) before it.
    assert use["offsets"] and all(MiB + 10 - 256 * 1024 < o <= MiB + 10 for o in use["offsets"])
    assert report["chunks"] >= 2 * (2 * MiB) // (256 * 1024)

    human = run_cli("scrub", mnt)
    assert human.returncode == 1, describe(human)
    assert "victim" in human.stdout and "dir/alias" in human.stdout, human.stdout
    assert "bystander" not in human.stdout, human.stdout

    mount_ctl.umount()
    code, offline = scrub(mount_ctl.store)  # the same from the unmounted store
    assert code == 1
    assert named_paths(offline) == {"victim", "dir/alias"}


def test_healthy_store_scrubs_clean_at_the_rate_asked(mount_ctl: Mount) -> None:
    mnt = mount_ctl.mountpoint
    mount_ctl.mount()
    (mnt / "a").mkdir()
    for i in range(4):
        write_bytes(mnt / "a" / f"random{i}", random_bytes(MiB, seed=20 + i), fsync=True)
    write_bytes(mnt / "text", b"all work and no play\n" * 50_000, fsync=True)
    stored = mount_ctl.stats()["stored_bytes"]
    assert stored > 4 * MiB

    started = time.monotonic()
    code, report = scrub(mnt, "--rate", "2M")
    took = time.monotonic() - started
    assert code == 0, report
    assert report["damaged"] == [] and report["ok"] is True
    assert report["bytes_read"] == stored
    # 4 MiB and more at 2 MiB/s: the pacing must show.
    assert took >= report["bytes_read"] / (2 * MiB) - 0.5, (took, report)

    text = run_cli("scrub", "--rate", "0", mnt)
    assert text.returncode == 0, describe(text)
    assert "no damage found" in text.stdout


def test_scrub_usage_errors(tmp_path: Path) -> None:
    proc = run_cli("scrub", tmp_path)
    assert proc.returncode == 2, describe(proc)
    assert "not a buildatfs store" in proc.stderr
    proc = run_cli("scrub", "--rate", "fast", tmp_path)
    assert proc.returncode == 2, describe(proc)
