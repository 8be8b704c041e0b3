#!/usr/bin/env python3
"""Where the CPU goes in the benchmark's slow steps: the CPU of the client and
of each daemon thread against the wall time, and the kernel requests served.

    python3 tools/cpu_profile.py [--native] [--scratch DIR] [tar|ingest|read ...]

- tar: `tar -x` of the minbase rootfs into a fresh store; requests per
  archive entry, and CPU per request of the daemon's trio thread.
- ingest: the benchmark's data set copied in with 1 MiB writes and an fsync
  per file, then copied again (all duplicate); CPU per MiB.
- read: the first copy read back in 1 MiB reads after a remount and
  drop_caches; CPU per MiB.

The inputs are the ones `tools/bench.py --prepare` makes under its cache. A
trio thread near one full core means the request loop is the limit; worker
threads near one core each mean compression or decoding is. With --native,
py-spy samples the daemon (C frames and idle time included) during each step
and the trio thread's samples are grouped by what it was doing.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import MIB, copy_files, read_files  # (tools/ is on sys.path: the script's folder)

CACHE = Path("/var/tmp/buildatfs-bench-cache")
TARBALL = CACHE / "rootfs" / "bookworm-minbase.tar"
DATASET = CACHE / "dataset-8x128M"
TICK = os.sysconf("SC_CLK_TCK")

# The trio thread's samples, grouped; the first group that matches wins. The
# first three look at the innermost frame, the others at the whole stack.
GROUPS = (
    ("waiting for the next request (epoll_wait)", ("epoll_wait ",)),
    ("reading requests from /dev/fuse", ("read ",)),
    ("sending replies (writev)", ("writev ",)),
    ("commits", ("Committer.", "Operations.commit", "_commit_logged")),
    ("handlers", ("Operations.", "Store.", "Reader.", "handler.<locals>")),
    ("trio's scheduler, pyfuse3's request loop, the rest", ("",)),
)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of *pid*, by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # (a worker thread that just ended)
        out[task.name] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def machine_busy() -> float:
    """CPU seconds all cores spent busy since boot (all processes and the kernel)."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / TICK


def native_groups(raw: Path) -> list[tuple[str, int]]:
    """Samples of the trio thread per group in a py-spy raw profile."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or "Thread._bootstrap" in stack or "WorkerThread" in stack:
            continue  # worker threads
        leaf = stack.rsplit(";", 1)[-1].split(" (")[0] + " "
        for i, (name, marks) in enumerate(GROUPS):
            where = leaf if i < 3 else stack
            if any(mark in where for mark in marks):
                counts[name] += int(n)
                break
    return counts.most_common()


class Daemon:
    """A fresh store mounted under *scratch*, with CPU accounting per step."""

    def __init__(self, scratch: Path, native: bool) -> None:
        self.scratch = scratch
        self.native = native
        self.store, self.mnt = scratch / "store", scratch / "mnt"
        shutil.rmtree(scratch, ignore_errors=True)
        self.mnt.mkdir(parents=True)
        self.cli("init", self.store)
        self.mount()

    def cli(self, *args: object) -> None:
        subprocess.run(
            [sys.executable, "-m", "buildatfs", *map(str, args)],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def mount(self) -> None:
        self.cli("mount", self.store, self.mnt)
        self.pid = int((self.store / "lock").read_text().split()[0])

    def umount(self) -> None:
        self.cli("umount", self.mnt)

    def step(self, name: str, fn: Callable[[], None]) -> dict[str, float]:
        """Run *fn*; return its wall time and the CPU of client and daemon."""
        spy = None
        if self.native:
            spy = subprocess.Popen(
                ["py-spy", "record", "--native", "--idle", "-r", "100", "-f", "raw",
                 "-p", str(self.pid), "-o", str(self.scratch / f"{name}.native.txt")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1)  # (py-spy attaches)
        before, usage0, busy0 = thread_cpu(self.pid), os.times(), machine_busy()
        start = time.perf_counter()
        fn()
        wall, usage1, after = time.perf_counter() - start, os.times(), thread_cpu(self.pid)
        busy = machine_busy() - busy0
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its profile and exits
            spy.wait(timeout=60)
        own = (usage1.user - usage0.user) + (usage1.system - usage0.system)
        children = (usage1.children_user - usage0.children_user) + (
            usage1.children_system - usage0.children_system
        )
        main = str(self.pid)
        return {
            "wall": wall,
            "client": own + children,
            "trio": after.get(main, 0.0) - before.get(main, 0.0),
            "workers": sum(v - before.get(t, 0.0) for t, v in after.items() if t != main),
            "machine": busy,
        }

    def report(self, name: str, cpu: dict[str, float], unit: str, amount: float) -> None:
        wall = cpu["wall"]
        scale, label = (1e3, "ms") if unit == "MiB" else (1e6, "us")
        print(
            f"  CPU per {unit}: client {cpu['client'] / amount * scale:.2f} {label}, "
            f"daemon trio thread {cpu['trio'] / amount * scale:.2f} {label}, "
            f"daemon workers {cpu['workers'] / amount * scale:.2f} {label}"
        )
        print(
            f"  cores busy: client {cpu['client'] / wall:.2f}, trio thread "
            f"{cpu['trio'] / wall:.2f}, workers {cpu['workers'] / wall:.2f}; the whole "
            f"machine {cpu['machine'] / wall:.2f} of {os.cpu_count()} (kernel threads and "
            "other work included)"
        )
        raw = self.scratch / f"{name}.native.txt"
        if self.native and raw.exists():
            groups = native_groups(raw)
            samples = sum(n for _, n in groups) or 1
            print(f"  trio thread, py-spy --native --idle ({samples} samples, {raw}):")
            for group, n in groups:
                print(f"    {n / samples:4.0%}  {group}")


def requests_served(store: Path) -> tuple[int, list[tuple[str, int]]]:
    """The last 'Requests served' line of the store's log."""
    line = re.findall(r"Requests served: (\d+) \((.*)\)\.", (store / "buildatfs.log").read_text())
    total, kinds = line[-1]
    return int(total), [(k.rsplit(" ", 1)[0], int(k.rsplit(" ", 1)[1])) for k in kinds.split(", ")]


def profile_tar(d: Daemon) -> None:
    with tarfile.open(TARBALL) as tf:
        entries = sum(1 for _ in tf)
    cpu = d.step("tar", lambda: subprocess.run(["tar", "-xf", str(TARBALL), "-C", str(d.mnt)],
                                               check=True))  # fmt: skip
    d.umount()
    total, kinds = requests_served(d.store)
    print(f"tar -x of {TARBALL.name}: {entries} entries in {cpu['wall']:.2f} s")
    print(f"  requests: {total}, {total / entries:.1f} per entry: " + ", ".join(
        f"{k} {n / entries:.2f}" for k, n in kinds if n / entries >= 0.01))  # fmt: skip
    d.report("tar", cpu, "request", total)
    d.mount()


def copy_into(sources: list[Path], folder: Path) -> None:
    folder.mkdir()
    copy_files(sources, folder)


def dataset() -> list[Path]:
    parts = sorted(DATASET.glob("part*"))
    read_files(parts)  # (into the page cache: the copy measures the mount, not the source)
    return parts


def profile_ingest(d: Daemon) -> None:
    parts = dataset()
    mib = sum(p.stat().st_size for p in parts) / MIB
    for name, folder in (("first ingest", "a"), ("re-ingest", "b")):
        cpu = d.step(name.replace(" ", "-"), lambda f=folder: copy_into(parts, d.mnt / f))
        print(f"{name} of {mib:.0f} MiB: {mib / cpu['wall']:.0f} MiB/s")
        d.report(name.replace(" ", "-"), cpu, "MiB", mib)


def profile_read(d: Daemon) -> None:
    parts = dataset()
    mib = sum(p.stat().st_size for p in parts) / MIB
    if not (d.mnt / "a").exists():
        copy_into(parts, d.mnt / "a")
    d.umount()
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    d.mount()
    cpu = d.step("cold-read", lambda: read_files([d.mnt / "a" / p.name for p in parts]))
    print(f"cold sequential read of {mib:.0f} MiB: {mib / cpu['wall']:.0f} MiB/s")
    d.report("cold-read", cpu, "MiB", mib)


STEPS = {"tar": profile_tar, "ingest": profile_ingest, "read": profile_read}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("steps", nargs="*", metavar="STEP", help="tar, ingest, read (default: all)")
    ap.add_argument("--scratch", type=Path, default=Path("/var/tmp/buildatfs-cpu-profile"))
    ap.add_argument("--native", action="store_true", help="also sample with py-spy")
    args = ap.parse_args()
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        ap.error(f"no step {unknown[0]!r}; the steps are {', '.join(STEPS)}")
    missing = [p for p in (TARBALL, DATASET) if not p.exists()]
    if missing:
        print(f"cpu_profile: no {missing[0]}; make the inputs with "
              "`python3 tools/bench.py --prepare`", file=sys.stderr)  # fmt: skip
        return 2
    d = Daemon(args.scratch, args.native)
    try:
        for step in args.steps or list(STEPS):
            STEPS[step](d)
    finally:
        d.umount()
        shutil.rmtree(d.store, ignore_errors=True)  # (raw profiles stay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
