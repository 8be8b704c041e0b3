"""`buildatfs stats`: per top-level entry and per Docker image, JSON and Prometheus.

The directory test shares a copied tree between two top-level directories and
checks that shared and exclusive bytes add up exactly. The Docker test runs a
real dockerd with its data-root on a buildatfs mount, imports two small root
file systems made from this machine's own binaries and builds one image on
top of the first, stops dockerd, and reads the images back from the store.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_helpers import (
    DockerDaemon,
    Mount,
    describe,
    docker_daemon,
    random_bytes,
    run_cli,
    write_bytes,
)

pytestmark = pytest.mark.fuse

STDLIB = Path(os.__file__).parent
DOCKERD = Path("/usr/sbin/dockerd")
DOCKER = Path("/usr/bin/docker")  # the client that matches dockerd 20.10
KiB, MiB = 1 << 10, 1 << 20
ROW_KEYS = (
    "logical_bytes",
    "unique_bytes",
    "shared_bytes",
    "exclusive_bytes",
    "exclusive_stored_bytes",
    "reclaimable_bytes",
)


def stats_json(target: Path) -> dict:
    proc = run_cli("stats", "--json", target)
    assert proc.returncode == 0, describe(proc)
    return json.loads(proc.stdout)


def check_row(row: dict) -> None:
    assert set(ROW_KEYS) <= row.keys(), row
    assert row["shared_bytes"] + row["exclusive_bytes"] == row["unique_bytes"], row
    assert 0 <= row["reclaimable_bytes"] <= row["exclusive_stored_bytes"], row


# ---- Prometheus text format, checked strictly ----------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"^({_NAME})(\{{(?:{_LABEL})(?:,{_LABEL})*\}})? (\S+)$")


def parse_prometheus(text: str) -> dict[tuple[str, str], float]:
    """Return {(metric, label text): value}; fail on anything malformed."""
    assert text.endswith("\n")
    helped, typed, samples = set(), set(), {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in helped, f"two HELP lines for {name}"
            helped.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind == "gauge" and name in helped and name not in typed, line
            typed.add(name)
        else:
            match = _SAMPLE.match(line)
            assert match, f"malformed sample line {line!r}"
            name, labels, value = match.groups()
            assert name in typed, f"{name} has no TYPE line before its samples"
            key = (name, labels or "")
            assert key not in samples, f"duplicate series {key}"
            samples[key] = float(value)
    return samples


# ---- per top-level entry ------------------------------------------------------------


def test_top_level_breakdown_adds_up(mount_ctl: Mount) -> None:
    mnt = mount_ctl.mountpoint
    mount_ctl.mount()
    tree = mnt / "a" / "json"
    shutil.copytree(STDLIB / "json", tree, ignore=shutil.ignore_patterns("__pycache__"))
    write_bytes(mnt / "a" / "only-a", random_bytes(700 * KiB, seed=1), fsync=True)
    subprocess.run(["cp", "-a", str(mnt / "a"), str(mnt / "b")], check=True, timeout=300)
    os.unlink(mnt / "b" / "only-a")
    write_bytes(mnt / "b" / "only-b", random_bytes(500 * KiB, seed=2), fsync=True)
    write_bytes(mnt / "loose", random_bytes(300 * KiB, seed=3), fsync=True)
    os.link(mnt / "loose", mnt / "a" / "loose-link")  # a hard link across two entries
    mount_ctl.umount()

    report = stats_json(mount_ctl.store)
    rows = {row["name"]: row for row in report["directories_breakdown"]}
    assert sorted(rows) == ["a", "b", "loose"]
    for row in rows.values():
        check_row(row)
    a, b, loose = rows["a"], rows["b"], rows["loose"]
    assert a["exclusive_bytes"] == 700 * KiB  # random data: its own chunks, nothing else
    assert b["exclusive_bytes"] == 500 * KiB
    assert loose["exclusive_bytes"] == 0 and loose["shared_bytes"] == 300 * KiB
    # The json tree is in a and b; loose is in a and at the top.
    assert b["shared_bytes"] == a["shared_bytes"] - 300 * KiB > 0
    assert a["shared_bytes"] + a["exclusive_bytes"] + b["exclusive_bytes"] == report["unique_bytes"]
    assert a["logical_bytes"] == b["logical_bytes"] - 500 * KiB + 700 * KiB + 300 * KiB
    assert a["reclaimable_bytes"] == a["exclusive_stored_bytes"] > 700 * KiB

    prom = run_cli("stats", "--prometheus", mount_ctl.store)
    assert prom.returncode == 0, describe(prom)
    samples = parse_prometheus(prom.stdout)
    assert samples[("buildatfs_logical_bytes", "")] == report["logical_bytes"]
    assert samples[("buildatfs_stored_bytes", "")] == report["stored_bytes"]
    for name, row in rows.items():
        for key in ROW_KEYS:
            assert samples[(f"buildatfs_dir_{key}", f'{{dir="{name}"}}')] == row[key]

    human = run_cli("stats", mount_ctl.store)
    assert human.returncode == 0, describe(human)
    assert "By top-level entry" in human.stdout and "\n  loose " in human.stdout

    totals = json.loads(run_cli("stats", "--json", "--totals", mount_ctl.store).stdout)
    assert "directories_breakdown" not in totals
    assert totals["unique_bytes"] == report["unique_bytes"]


# ---- per Docker image -------------------------------------------------------------


def rootfs_tar(path: Path, extra: dict[str, bytes]) -> None:
    """A tiny root file system from this machine's own dash, head and libc."""
    libdir = "usr/lib/x86_64-linux-gnu"
    files = {
        "usr/bin/dash": Path("/usr/bin/dash"),
        "usr/bin/head": Path("/usr/bin/head"),
        f"{libdir}/libc.so.6": Path(f"/{libdir}/libc.so.6"),
        f"{libdir}/ld-linux-x86-64.so.2": Path(f"/{libdir}/ld-linux-x86-64.so.2"),
    }
    for py in sorted(STDLIB.glob("*.py"))[:60]:
        files[f"usr/lib/stdlib/{py.name}"] = py
    with tarfile.open(path, "w") as tar:
        for name in (
            "usr",
            "usr/bin",
            "usr/lib",
            libdir,
            "usr/lib64",
            "usr/lib/stdlib",
            "etc",
            "tmp",
            "dev",
            "proc",
            "sys",
        ):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        for name, target in (
            ("bin", "usr/bin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
            ("usr/bin/sh", "dash"),
            ("usr/lib64/ld-linux-x86-64.so.2", f"/{libdir}/ld-linux-x86-64.so.2"),
        ):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        for name, source in files.items():
            tar.add(source, arcname=name)
        for name, data in extra.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def dockerd_on(mount_ctl: Mount, tmp_path: Path) -> Iterator[DockerDaemon]:
    for program in (DOCKERD, DOCKER):
        if not program.exists():
            pytest.skip(f"{program} is missing (Debian package docker.io)")
    mount_ctl.mount()
    # Unix socket paths must stay under 108 bytes: pytest's tmp_path is too deep.
    run_dir = Path(tempfile.mkdtemp(prefix="bfs-dockerd-"))
    daemon = docker_daemon("stats", mount_ctl.mountpoint, run_dir)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.slow
def test_per_image_breakdown_of_a_real_docker_root(
    dockerd_on: DockerDaemon, mount_ctl: Mount, tmp_path: Path
) -> None:
    docker = dockerd_on
    rootfs_tar(tmp_path / "base.tar", {})
    rootfs_tar(tmp_path / "variant.tar", {"variant": random_bytes(400 * KiB, seed=7)})
    docker.docker("import", "-", "t/base:1", stdin=tmp_path / "base.tar")
    docker.docker("import", "-", "t/variant:1", stdin=tmp_path / "variant.tar")
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(
        "FROM t/base:1\nRUN head -c 300000 /dev/urandom > /built && echo built > /note\n"
    )
    docker.docker("build", "--network=none", "-t", "t/built:1", context)
    ids = {
        tag: docker.docker("image", "inspect", "-f", "{{.Id}}", tag).stdout.strip()
        for tag in ("t/base:1", "t/variant:1", "t/built:1")
    }
    driver = docker.docker("info", "-f", "{{.Driver}}").stdout.strip()
    docker.stop()

    mounted = stats_json(mount_ctl.mountpoint)
    mount_ctl.umount()
    report = stats_json(mount_ctl.store)
    assert report["images"] == mounted["images"]
    images = {row["id"]: row for row in report["images"]}
    assert set(ids.values()) <= images.keys(), (ids, list(images))
    base, variant, built = (images[ids[t]] for t in ("t/base:1", "t/variant:1", "t/built:1"))
    assert base["tags"] == ["t/base:1"] and built["tags"] == ["t/built:1"]
    assert base["driver"] == variant["driver"] == driver
    assert (base["layers"], variant["layers"], built["layers"]) == (1, 1, 2)
    for row in (base, variant, built):
        check_row(row)
        assert row["layers_found"] == row["layers"], row
        assert row["shared_bytes"] > 1 * MiB, row  # libc and friends are in every image

    # The base layer is all shared (variant has the same files, built uses the layer).
    assert base["exclusive_bytes"] == 0 and base["reclaimable_bytes"] == 0
    assert variant["exclusive_bytes"] == 400 * KiB  # random data, only in the variant
    assert built["exclusive_bytes"] >= 300_000
    assert built["logical_bytes"] >= base["logical_bytes"] + 300_000
    assert variant["logical_bytes"] == base["logical_bytes"] + 400 * KiB
    assert variant["reclaimable_bytes"] >= 400 * KiB

    prom = run_cli("stats", "--prometheus", mount_ctl.store)
    assert prom.returncode == 0, describe(prom)
    samples = parse_prometheus(prom.stdout)
    series = f'{{image="{ids["t/variant:1"]}",tags="t/variant:1"}}'
    assert samples[("buildatfs_image_exclusive_bytes", series)] == variant["exclusive_bytes"]
    human = run_cli("stats", mount_ctl.store)
    assert "Docker images" in human.stdout and "t/built:1" in human.stdout, human.stdout
