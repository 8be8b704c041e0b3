"""Load: parallel writers and readers, fio with verification, stress-ng stressors.

After each load the daemon is alive, its log has no traceback (the mount
fixtures fail on any undeclared warning), and fsck finds the store clean.
fio and stress-ng come from Debian (tools/setup.sh installs them).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from fuse_helpers import Mount, pid_alive

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

KiB = 1 << 10
WORKERS = 4
FILES_PER_WORKER = 600


def _content(worker: int, i: int) -> bytes:
    rng = random.Random(worker * 100_003 + i)
    size = rng.choice([0, 1, 511, 4 * KiB, 13 * KiB, 64 * KiB + 1, 200 * KiB])
    shared = random.Random(7).randbytes(32 * KiB)  # dedups across files and workers
    head = shared[: rng.randrange(0, len(shared))]
    return (head + rng.randbytes(size))[:size]


def _worker(root: str, worker: int, peer: int, barrier, results) -> None:  # noqa: ANN001
    """Write this worker's files, verify them, then verify a peer's; put problems on RESULTS."""
    try:
        results.put((worker, _work(root, worker, peer, barrier)))
    except BaseException as exc:
        barrier.abort()
        results.put((worker, f"worker {worker}: {exc!r}"))


def _work(root: str, worker: int, peer: int, barrier) -> str:  # noqa: ANN001
    problems = []
    base = Path(root, f"w{worker}")
    for i in range(FILES_PER_WORKER):
        sub = base / f"d{i % 20}"
        sub.mkdir(parents=True, exist_ok=True)
        with open(sub / f"f{i}", "wb") as f:
            f.write(_content(worker, i))
        if i % 50 == 0:  # read while others write
            with open(base / f"d{0}" / "f0", "rb") as f:
                if f.read() != _content(worker, 0):
                    problems.append(f"w{worker}/d0/f0 changed while writing")
    for i in range(FILES_PER_WORKER):
        with open(base / f"d{i % 20}" / f"f{i}", "rb") as f:
            if f.read() != _content(worker, i):
                problems.append(f"w{worker} file {i} reads back wrong")
    barrier.wait(timeout=300)
    peer_base = Path(root, f"w{peer}")
    for i in range(FILES_PER_WORKER):
        with open(peer_base / f"d{i % 20}" / f"f{i}", "rb") as f:
            if hashlib.sha256(f.read()).digest() != hashlib.sha256(_content(peer, i)).digest():
                problems.append(f"w{peer} file {i} reads back wrong in worker {worker}")
    barrier.wait(timeout=300)  # every peer has read us: churn now
    for i in range(0, FILES_PER_WORKER, 3):  # delete a third, rename a third
        os.unlink(base / f"d{i % 20}" / f"f{i}")
        os.rename(base / f"d{(i + 1) % 20}" / f"f{i + 1}", base / f"d{(i + 1) % 20}" / f"g{i + 1}")
    return "\n".join(problems[:20])


def test_parallel_writers_and_readers(mounted: Path, mount_ctl: Mount) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(str(mounted), w, (w + 1) % WORKERS, barrier, results))
        for w in range(WORKERS)
    ]
    for proc in procs:
        proc.start()
    try:
        problems = dict(results.get(timeout=300) for _ in procs)
    finally:
        for proc in procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
    assert [p.exitcode for p in procs] == [0] * WORKERS, "a worker crashed"
    assert not any(problems.values()), "\n".join(problems.values())
    assert mount_ctl.pid is not None and pid_alive(mount_ctl.pid)
    mount_ctl.remount()
    for w in range(WORKERS):
        for i in range(FILES_PER_WORKER):
            d = mounted / f"w{w}" / f"d{i % 20}"
            if i % 3 == 0:
                assert not (d / f"f{i}").exists()
                continue
            name = f"g{i}" if i % 3 == 1 else f"f{i}"
            assert (d / name).read_bytes() == _content(w, i), f"w{w}/{name}"


def _fio(directory: Path, *job: str) -> subprocess.CompletedProcess[str]:
    # fio writes verify state files into its working directory: keep them out of the repo.
    cmd = ["fio", "--directory", str(directory), "--fallocate=none", "--group_reporting",
           "--verify_state_save=0", "--output-format=normal", *job]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False,
                          cwd=directory.parent)


FIO_JOBS = {
    "seqwrite": ["--name=seqwrite", "--rw=write", "--bs=1M", "--size=96M", "--numjobs=2",
                 "--verify=crc32c", "--do_verify=1"],
    "randwrite": ["--name=randwrite", "--rw=randwrite", "--bs=4k", "--size=12M",
                  "--verify=crc32c", "--do_verify=1", "--fsync=256"],
    "randrw": ["--name=randrw", "--rw=randrw", "--bs=16k", "--size=16M", "--verify=crc32c",
               "--do_verify=1"],
    "randread": ["--name=randread", "--rw=randread", "--bs=64k", "--size=48M",
                 "--time_based", "--runtime=5", "--numjobs=2"],
}


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (tools/setup.sh)")
def test_fio_verify(mounted: Path, mount_ctl: Mount) -> None:
    for name, job in FIO_JOBS.items():
        work = mounted / name
        work.mkdir()
        proc = _fio(work, *job)
        assert proc.returncode == 0, f"fio {name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
        assert "verify" not in proc.stderr.lower(), proc.stderr
        assert mount_ctl.pid is not None and pid_alive(mount_ctl.pid), f"daemon died in fio {name}"
    # Verify once more from a cold mount: what fio wrote was committed intact.
    mount_ctl.remount()
    proc = _fio(mounted / "seqwrite", "--name=seqwrite", "--rw=read", "--bs=1M", "--size=96M",
                "--numjobs=2", "--verify=crc32c", "--verify_only")
    assert proc.returncode == 0, f"fio verify after remount:\n{proc.stdout[-3000:]}\n{proc.stderr}"


STRESSORS = ["dir", "dentry", "rename", "link", "symlink", "xattr", "hdd", "seek", "chmod",
             "utime", "filename", "readahead"]


@pytest.mark.skipif(shutil.which("stress-ng") is None,
                    reason="stress-ng is not installed (tools/setup.sh)")
def test_stress_ng(mounted: Path, mount_ctl: Mount) -> None:
    cmd = ["stress-ng", "--temp-path", str(mounted), "--timeout", "10s", "--verify",
           "--metrics-brief", "--hdd-bytes", "32M", "--seek-size", "32M",
           "--readahead-bytes", "16M"]
    for stressor in STRESSORS:
        cmd += [f"--{stressor}", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"stress-ng exited {proc.returncode}:\n{output[-4000:]}"
    failed = [line for line in output.splitlines() if " fail" in line.lower()
              and "failed: 0" not in line.lower()]
    assert not failed, "\n".join(failed)
    assert mount_ctl.pid is not None and pid_alive(mount_ctl.pid), "the daemon died"
    os.listdir(mounted)
