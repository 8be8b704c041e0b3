"""A real tree of thousands of files through the mount, and dedup of a second copy."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from fuse_helpers import Mount, sha256_file

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

# Real trees with mixed file sizes; taken in order until MIN_FILES are reached.
SOURCES = ["/usr/lib/python3", "/usr/share/zoneinfo", "/usr/lib/python3.11", "/usr/share/perl"]
MIN_FILES = 3000


def pick_sources() -> list[Path]:
    chosen, count = [], 0
    for source in map(Path, SOURCES):
        if count >= MIN_FILES:
            break
        if source.is_dir():
            chosen.append(source)
            count += sum(len(files) for _, _, files in os.walk(source))
    if count < MIN_FILES:
        pytest.fail(f"this machine has only {count} files under {SOURCES}; need {MIN_FILES}")
    return chosen


def copy_tree(source: Path, dest: Path) -> None:
    """Copy directories, regular files (with mode and times) and symlinks."""
    for dirpath, dirnames, filenames in os.walk(source):
        rel = Path(dirpath).relative_to(source)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in dirnames + filenames:
            src = Path(dirpath, name)
            if src.is_symlink():
                os.symlink(os.readlink(src), dest / rel / name)
            elif name in filenames and src.is_file():
                shutil.copy2(src, dest / rel / name)


def snapshot(root: Path) -> dict[str, tuple[str, ...]]:
    """Path -> (kind, content hash or target, mode, mtime) for every entry."""
    result: dict[str, tuple[str, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            if path.is_symlink():
                result[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                result[rel] = ("dir",)
            else:
                result[rel] = ("file", sha256_file(path), oct(st.st_mode), str(st.st_mtime_ns))
    return result


def copy_sources(sources: list[Path], dest: Path) -> None:
    for source in sources:
        copy_tree(source, dest / source.name)


def test_tree_roundtrip_and_dedup_of_second_copy(
    mounted: Path, mount_ctl: Mount, tmp_path: Path
) -> None:
    sources = pick_sources()
    staging_ref = tmp_path / "reference"
    copy_sources(sources, staging_ref)  # the same copy on the host disk
    expected = snapshot(staging_ref)
    n_files = sum(1 for kind, *_ in expected.values() if kind == "file")
    assert n_files >= MIN_FILES

    copy_sources(sources, mounted / "copy1")
    mount_ctl.remount()
    assert snapshot(mounted / "copy1") == expected
    first = mount_ctl.stats()

    copy_sources(sources, mounted / "copy2")
    mount_ctl.remount()
    assert snapshot(mounted / "copy2") == expected
    second = mount_ctl.stats()

    tree_bytes = sum(
        p.stat().st_size for p in staging_ref.rglob("*") if p.is_file() and not p.is_symlink()
    )
    assert second["logical_bytes"] - first["logical_bytes"] == tree_bytes
    assert second["files"] - first["files"] == n_files
    growth = second["stored_bytes"] - first["stored_bytes"]
    assert growth < 0.01 * first["stored_bytes"], f"second copy added {growth} stored bytes"
    assert second["unique_bytes"] == first["unique_bytes"]
    assert second["stored_bytes"] < second["logical_bytes"]
    assert second["dedup_ratio"] > 1.9
