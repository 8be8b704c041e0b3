"""`buildatfs estimate`: a dry run over a directory predicts a real copy's store.

The source is real data (this Python's standard library, twice, with hard
links, symlinks, a sparse file and incompressible data). It is copied with
`cp -a` into a fresh mount; after unmounting, `buildatfs stats` of the store
must be within 5% of the prediction, and the estimate must write nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from fuse_helpers import Mount, describe, random_bytes, run_cli, write_bytes

pytestmark = pytest.mark.fuse

STDLIB = Path(os.__file__).parent
MiB = 1 << 20


def make_source(root: Path) -> None:
    skip = shutil.ignore_patterns("site-packages", "__pycache__", "test", "tests", "idlelib")
    shutil.copytree(STDLIB, root / "lib", symlinks=True, ignore=skip)
    shutil.copytree(root / "lib" / "email", root / "copy" / "email", symlinks=True)
    write_bytes(root / "copy" / "random", random_bytes(3 * MiB, seed=5))
    os.link(root / "copy" / "random", root / "copy" / "random-link")
    os.symlink("../lib/os.py", root / "copy" / "os.py")
    with open(root / "sparse", "wb") as f:  # data, a hole, data
        f.write(random_bytes(300_000, seed=6))
        f.seek(40 * MiB)
        f.write(b"tail" * 10_000)


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            found[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


def test_estimate_predicts_a_real_copy(tmp_path: Path, mount_ctl: Mount) -> None:
    source = tmp_path / "source"
    make_source(source)
    before = snapshot(source)

    proc = run_cli("estimate", "--json", source, timeout=600)
    assert proc.returncode == 0, describe(proc)
    predicted = json.loads(proc.stdout)
    assert snapshot(source) == before, "estimate changed the directory"
    assert predicted["skipped"] == 0
    assert predicted["dedup_ratio"] > 1.0  # the copied email package and the hard link

    mount_ctl.mount()
    copy = subprocess.run(
        ["cp", "-a", f"{source}/.", str(mount_ctl.mountpoint)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert copy.returncode == 0, copy.stderr
    mount_ctl.umount()
    actual = mount_ctl.stats()

    assert predicted["logical_bytes"] == actual["logical_bytes"]
    assert predicted["files"] == actual["files"]
    for key in ("unique_bytes", "stored_bytes"):
        assert abs(predicted[key] - actual[key]) <= 0.05 * actual[key], (key, predicted, actual)

    human = run_cli("estimate", source)
    assert human.returncode == 0, describe(human)
    assert "Predicted stored bytes" in human.stdout


def test_estimate_usage_error(tmp_path: Path) -> None:
    proc = run_cli("estimate", tmp_path / "missing")
    assert proc.returncode == 2, describe(proc)
    assert "is not a directory" in proc.stderr
