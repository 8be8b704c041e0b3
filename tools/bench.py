#!/usr/bin/env python3
"""Measure buildatfs against plain disk and fuse-overlayfs on this machine.

Usage, as root from the repository root:

    python3 tools/bench.py [--quick] [--cache DIR] [--out FILE.md]

Every figure is a ratio against a baseline measured in the same run (plain
disk, fuse-overlayfs, or single-thread zstd level 3), with the targets
interleaved round by round, because other work shares the machine. The median
of the rounds is reported. The inputs (Debian rootfs tarballs made with
debootstrap, a data set cut from real files under /usr, a few versions of
pure-Python wheels) are made once and kept under --cache; the measurements
run in a scratch directory on the root file system that is removed at the
end, with every mount this script made.

Steps marked "cold" run after `sync` and `echo 3 > /proc/sys/vm/drop_caches`,
and after a remount of each FUSE target (so buildatfs has committed everything
and its chunk cache is empty); the other steps run with warm caches.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024

# Pure-Python wheels: several versions of each, unzipped side by side.
WHEELS = {
    "requests": ["2.28.2", "2.31.0", "2.32.3"],
    "urllib3": ["1.26.18", "2.0.7", "2.2.3"],
    "click": ["8.1.3", "8.1.7"],
}
# Rootfs variants: (name, suite, extra packages).
ROOTFS = [
    ("bookworm-minbase", "bookworm", []),
    ("bookworm-minbase-extra", "bookworm", ["procps", "less", "nano", "ca-certificates"]),
    ("bullseye-minbase", "bullseye", []),
]


@dataclasses.dataclass(frozen=True)
class Sizes:
    rounds: int
    meta_rounds: int
    dataset_parts: int
    part_bytes: int
    seq_write_bytes: int
    big_file_bytes: int
    random_reads: int
    random_writes: int
    rootfs_variants: int
    wheels_per_package: int


FULL = Sizes(rounds=3, meta_rounds=3, dataset_parts=8, part_bytes=128 * MIB,
             seq_write_bytes=256 * MIB, big_file_bytes=1024 * MIB, random_reads=20000,
             random_writes=8192, rootfs_variants=3, wheels_per_package=3)
QUICK = Sizes(rounds=1, meta_rounds=1, dataset_parts=3, part_bytes=64 * MIB,
              seq_write_bytes=64 * MIB, big_file_bytes=256 * MIB, random_reads=5000,
              random_writes=2048, rootfs_variants=2, wheels_per_package=2)


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kwargs)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed(fn: Callable[..., object], *args, **kwargs) -> float:
    """Return the seconds that fn(*args, **kwargs) takes."""
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def read_all(path: Path) -> int:
    """Read a file to the end in 1 MiB reads; return the byte count."""
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while chunk := os.read(fd, MIB):
            total += len(chunk)
    finally:
        os.close(fd)
    return total


def permuted(data: bytes, variant: int) -> bytes:
    """*data* with its bytes renamed by a fixed permutation: new content (new
    hashes), same compressibility."""
    table = bytes((i * 167 + 89 * variant + 1) & 255 for i in range(256))
    return data.translate(table)


# ---- inputs, cached -----------------------------------------------------------


def debian_mirror() -> str:
    """The first Debian mirror URI in this machine's apt sources."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[0] == "deb":
                return next(f for f in fields[1:] if "://" in f)
    raise SystemExit("bench: no Debian mirror found in /etc/apt sources")


def rootfs_tar(cache: Path, name: str, suite: str, include: list[str]) -> Path:
    """Return a tarball (with xattrs) of a debootstrap minbase tree, made once."""
    tar_path = cache / "rootfs" / f"{name}.tar"
    if tar_path.exists():
        return tar_path
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    tree = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tar_path.parent))
    say(f"making {tar_path.name} with debootstrap (once; kept in the cache)")
    try:
        cmd = ["debootstrap", "--variant=minbase"]
        if include:
            cmd.append("--include=" + ",".join(include))
        run(cmd + [suite, str(tree), debian_mirror()], stdout=subprocess.DEVNULL)
        partial = tar_path.with_suffix(".tar.part")
        run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-C", str(tree),
             "-cf", str(partial), "."])
        partial.rename(tar_path)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return tar_path


def dataset(cache: Path, sizes: Sizes) -> list[Path]:
    """Return the data set: regular files under /usr, concatenated in path
    order into parts of sizes.part_bytes each. Made once."""
    root = cache / f"dataset-{sizes.dataset_parts}x{sizes.part_bytes // MIB}M"
    parts = [root / f"part-{i:02d}" for i in range(sizes.dataset_parts)]
    if (root / "done").exists():
        return parts
    root.mkdir(parents=True, exist_ok=True)
    say(f"cutting the data set from /usr into {root}")
    files = _usr_files()
    for part in parts:
        with open(part, "wb") as out:
            left = sizes.part_bytes
            while left:
                data = Path(next(files)).read_bytes()[:left]
                out.write(data)
                left -= len(data)
    (root / "done").touch()
    return parts


def _usr_files() -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk("/usr"):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                if os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path):
                    yield path
    raise SystemExit("bench: /usr holds too little data for the data set")


def wheels(cache: Path, per_package: int) -> list[Path]:
    """Return cached wheels of a few versions of pure-Python packages."""
    folder = cache / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    found = []
    for package, versions in WHEELS.items():
        for version in versions[:per_package]:
            matches = sorted(folder.glob(f"{package}-{version}-*.whl"))
            if not matches:
                say(f"pip download {package}=={version}")
                run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                     "--only-binary=:all:", "-d", str(folder), f"{package}=={version}"])
                matches = sorted(folder.glob(f"{package}-{version}-*.whl"))
            found += matches[:1]
    return found


def ensure_tools() -> None:
    if shutil.which("fuse-overlayfs") is None:
        say("installing fuse-overlayfs with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "install", "-y", "-q", "fuse-overlayfs"], env=env,
            stdout=subprocess.DEVNULL)
    try:
        import zstandard  # noqa: F401
    except ImportError:
        raise SystemExit("bench: python zstandard is missing; run tools/setup.sh") from None


# ---- targets ------------------------------------------------------------------


def _mounted(mountpoint: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mountpoint) for line in f)


class Target:
    """A place to run workloads in. `root` is where workloads write."""

    name = ""
    label = ""

    def __init__(self, base: Path) -> None:
        self.base = base / self.name
        self.root = self.base / "mnt"
        self.serial = 0

    def fresh(self) -> None:
        """Start over with an empty file system."""
        self.stop()
        if self.base.exists():
            shutil.rmtree(self.base)
        self.serial += 1
        self.base.mkdir(parents=True)
        self.root.mkdir()
        self.start()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def settle(self) -> float:
        """Make everything written durable; return the seconds it took."""
        return timed(lambda: run(["sync", "-f", str(self.root)]))

    def cold(self) -> None:
        """Empty every cache between the workload and the disk."""
        drop_caches()


class Disk(Target):
    name = "disk"
    label = "disk"


class Overlay(Target):
    """fuse-overlayfs over an empty lower directory, upper and work on disk."""

    name = "overlay"
    label = "fuse-overlayfs"

    def start(self) -> None:
        for sub in ("lower", "upper", "work"):
            (self.base / sub).mkdir(exist_ok=True)
        opts = (f"lowerdir={self.base / 'lower'},upperdir={self.base / 'upper'},"
                f"workdir={self.base / 'work'}")
        # It warns about options it ignores (lazytime) on stderr; keep that quiet.
        result = subprocess.run(["fuse-overlayfs", "-o", opts, str(self.root)],
                                capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"bench: fuse-overlayfs failed: {result.stderr.strip()}")

    def stop(self) -> None:
        if _mounted(self.root):
            run(["fusermount3", "-u", str(self.root)])

    def settle(self) -> float:
        """fuse-overlayfs has no syncfs: unmount, then sync the upper directory's disk."""
        seconds = timed(lambda: (self.stop(), run(["sync", "-f", str(self.base / "upper")])))
        self.start()
        return seconds

    def cold(self) -> None:
        self.stop()
        drop_caches()
        self.start()


class Buildatfs(Target):
    name = "buildatfs"
    label = "buildatfs"

    def __init__(self, base: Path, wrapper: Path | None, profile: Path | None) -> None:
        super().__init__(base)
        self.store = self.base / "store"
        self.wrapper = wrapper
        self.profile_dir = profile
        self.pid: int | None = None
        self.peak_rss: dict[str, int] = {}  # workload -> VmHWM in bytes, highest seen
        self.workload = ""
        self._child: subprocess.Popen | None = None
        self._spy: subprocess.Popen | None = None

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "buildatfs", *args]

    def fresh(self) -> None:
        self.stop()
        if self.base.exists():
            shutil.rmtree(self.base)
        self.serial += 1
        self.base.mkdir(parents=True)
        self.root.mkdir()
        run(self.cli("init", str(self.store)), cwd=REPO, stdout=subprocess.DEVNULL)
        self.start()

    def start(self) -> None:
        if self.wrapper is None:
            run(self.cli("mount", str(self.store), str(self.root)), cwd=REPO)
        else:  # a scratch wrapper that runs the daemon in the foreground
            log = open(self.base / "wrapper.log", "ab")
            self._child = subprocess.Popen(
                [sys.executable, str(self.wrapper), "mount", "--foreground",
                 str(self.store), str(self.root)],
                cwd=REPO, stdout=log, stderr=log, start_new_session=True)
            deadline = time.monotonic() + 30
            while not _mounted(self.root):
                if time.monotonic() > deadline or self._child.poll() is not None:
                    log.close()
                    tail = Path(log.name).read_text(errors="replace")[-2000:]
                    raise SystemExit(f"bench: the wrapped daemon did not mount "
                                     f"(status {self._child.poll()}):\n{tail}")
                time.sleep(0.05)
            log.close()
        self.pid = int((self.store / "lock").read_text().split()[0])
        if self.profile_dir is not None:
            out = self.profile_dir / f"{self.workload}-{self.serial}-{time.time_ns()}.txt"
            self._spy = subprocess.Popen(
                ["py-spy", "record", "-p", str(self.pid), "-f", "raw", "-r", "200",
                 "--nonblocking", "--idle", "-o", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if not _mounted(self.root):
            return
        self.note_rss()
        if self._spy is not None:
            self._spy.send_signal(signal.SIGINT)
            self._spy.wait()
            self._spy = None
        run(self.cli("umount", str(self.root)), cwd=REPO)
        if self._child is not None:
            self._child.wait()
            self._child = None
        self.pid = None

    def note_rss(self) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    rss = int(line.split()[1]) * 1024
                    self.peak_rss[self.workload] = max(self.peak_rss.get(self.workload, 0), rss)

    def settle(self) -> float:
        """Unmount (which waits for every commit), sync the store's disk, mount again."""
        seconds = timed(lambda: (self.stop(), run(["sync", "-f", str(self.store)])))
        self.start()
        return seconds

    def cold(self) -> None:
        self.stop()
        drop_caches()
        self.start()

    def stats(self) -> dict:
        out = run(self.cli("stats", "--json", "--totals", str(self.store)), cwd=REPO,
                  capture_output=True, text=True).stdout
        return json.loads(out)


def rotations(targets: list[Target], rounds: int) -> Iterator[tuple[int, Target]]:
    """Each round visits every target, starting one further along each time."""
    for r in range(rounds):
        for i in range(len(targets)):
            yield r, targets[(r + i) % len(targets)]


# ---- results ------------------------------------------------------------------


class Results:
    """Samples per (step, target); medians on demand."""

    def __init__(self) -> None:
        self.samples: dict[tuple[str, str], list[float]] = {}
        self.notes: list[str] = []

    def add(self, step: str, target: str, value: float) -> None:
        self.samples.setdefault((step, target), []).append(value)

    def get(self, step: str, target: str) -> float | None:
        values = self.samples.get((step, target))
        return statistics.median(values) if values else None


# ---- workloads ----------------------------------------------------------------


def workload_tree(targets: list[Target], tar_path: Path, sizes: Sizes, res: Results) -> None:
    """tar -x of a rootfs, then cold find, cold and warm stat, cold cat."""
    for r, t in rotations(targets, sizes.meta_rounds):
        say(f"tree round {r + 1}/{sizes.meta_rounds}: {t.label}")
        t.workload = "tree"
        t.fresh()
        dest = t.root / "rootfs"
        dest.mkdir()
        read_all(tar_path)  # the tarball comes from the page cache
        res.add("tar -x", t.name, timed(
            run, ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf",
                  str(tar_path), "-C", str(dest)]))
        res.add("tar -x, then durable", t.name, res.samples[("tar -x", t.name)][-1] + t.settle())
        t.cold()
        res.add("find (cold)", t.name,
                timed(run, ["find", str(dest)], stdout=subprocess.DEVNULL))
        t.cold()
        stat_cmd = ["find", str(dest), "-printf", "%s %m %U %G %T@ %y\n"]
        res.add("stat every file (cold)", t.name,
                timed(run, stat_cmd, stdout=subprocess.DEVNULL))
        res.add("stat every file (warm)", t.name,
                timed(run, stat_cmd, stdout=subprocess.DEVNULL))
        t.cold()
        res.add("cat every file (cold)", t.name, timed(
            run, f"find '{dest}' -type f -print0 | xargs -0 cat > /dev/null", shell=True))
        if isinstance(t, Buildatfs):
            t.note_rss()
        t.stop()


def copy_files(sources: list[Path], folder: Path) -> None:
    """Copy each file into *folder* in 1 MiB writes, with an fsync at the end of each."""
    for src in sources:
        fd_in = os.open(src, os.O_RDONLY)
        fd_out = os.open(folder / src.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while chunk := os.read(fd_in, MIB):
                os.write(fd_out, chunk)
            os.fsync(fd_out)
        finally:
            os.close(fd_in)
            os.close(fd_out)


def read_files(paths: list[Path]) -> None:
    for path in paths:
        read_all(path)


def random_reads(path: Path, offsets: list[int]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            os.pread(fd, 4096, off)
    finally:
        os.close(fd)


def random_writes(path: Path, writes: list[tuple[int, int]], data: bytes) -> None:
    """pwrite 8 KiB of *data* (from the second offset) at each first offset; fsync."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for off, src in writes:
            os.pwrite(fd, data[src : src + 8192], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def zstd_seconds(parts: list[Path]) -> float:
    """Seconds zstd level 3 takes on one thread to compress the data set (from memory)."""
    import zstandard

    total = 0.0
    for part in parts:
        data = part.read_bytes()
        cctx = zstandard.ZstdCompressor(level=3)  # threads=0: the calling thread only
        start = time.perf_counter()
        obj = cctx.compressobj()
        view = memoryview(data)
        for pos in range(0, len(data), MIB):
            obj.compress(view[pos : pos + MIB])
        obj.flush()
        total += time.perf_counter() - start
    return total


def workload_ingest(targets: list[Target], parts: list[Path], sizes: Sizes,
                    res: Results) -> None:
    """First ingest and re-ingest with fsync, then cold and warm sequential reads."""
    nbytes = sum(p.stat().st_size for p in parts)
    res.notes.append(f"Data set: {len(parts)} files, {nbytes / MIB:.0f} MiB of real files "
                     f"from /usr concatenated.")
    for part in parts:
        read_all(part)
    for r, t in rotations(targets, sizes.rounds):
        if t is targets[0]:
            say(f"ingest round {r + 1}/{sizes.rounds}: zstd level 3, one thread")
            res.add("zstd-3, one thread", "cpu", nbytes / zstd_seconds(parts))
        say(f"ingest round {r + 1}/{sizes.rounds}: {t.label}")
        t.workload = "ingest"
        t.fresh()
        for name in ("a", "b"):
            (t.root / name).mkdir()
        res.add("first ingest, fsync", t.name, nbytes / timed(copy_files, parts, t.root / "a"))
        res.add("re-ingest (all duplicate), fsync", t.name,
                nbytes / timed(copy_files, parts, t.root / "b"))
        t.cold()
        files = [t.root / "a" / p.name for p in parts]
        res.add("sequential read (cold)", t.name, nbytes / timed(read_files, files))
        res.add("sequential read (warm)", t.name, nbytes / timed(read_files, files))
        if isinstance(t, Buildatfs):
            t.note_rss()
        t.stop()


def write_stream(path: Path, source: list[Path], nbytes: int, block: int, variant: int) -> None:
    """Write *nbytes* of (permuted) data-set bytes to a new file in *block*-byte
    writes, then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        for part in source * (nbytes // sum(p.stat().st_size for p in source) + 1):
            data = permuted(part.read_bytes()[:left], variant)
            view = memoryview(data)
            for pos in range(0, len(data), block):
                os.write(fd, view[pos : pos + block])
            left -= len(data)
            if not left:
                break
        os.fsync(fd)
    finally:
        os.close(fd)


def workload_writes(targets: list[Target], parts: list[Path], sizes: Sizes,
                    res: Results) -> None:
    """4 KiB sequential writes; cold 4 KiB random reads and 8 KiB random writes
    in a big file."""
    rng_data = permuted(parts[0].read_bytes()[: 16 * MIB], 7)
    for r, t in rotations(targets, sizes.rounds):
        say(f"write round {r + 1}/{sizes.rounds}: {t.label}")
        t.workload = "writes"
        t.fresh()
        seq, big = t.root / "seq", t.root / "big"
        seconds = timed(write_stream, seq, parts, sizes.seq_write_bytes, 4096, 3)
        res.add("4 KiB sequential writes, fsync", t.name, sizes.seq_write_bytes / seconds)
        seconds = timed(write_stream, big, parts, sizes.big_file_bytes, MIB, 5)
        res.add("create the big file (1 MiB writes), fsync", t.name,
                sizes.big_file_bytes / seconds)
        t.cold()
        rng = random.Random(1)
        blocks = sizes.big_file_bytes // 4096
        offsets = [rng.randrange(blocks) * 4096 for _ in range(sizes.random_reads)]
        res.add("4 KiB random reads (cold)", t.name,
                sizes.random_reads / timed(random_reads, big, offsets))
        blocks = sizes.big_file_bytes // 8192
        writes = [(rng.randrange(blocks) * 8192, rng.randrange(len(rng_data) // 8192) * 8192)
                  for _ in range(sizes.random_writes)]
        res.add("8 KiB random writes, fsync", t.name,
                sizes.random_writes * 8192 / timed(random_writes, big, writes, rng_data))
        if isinstance(t, Buildatfs):
            t.note_rss()
        t.stop()


def _tar_members(tar_path: Path) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isreg():  # hard links (LNKTYPE) are not regular members
                f = tar.extractfile(member)
                assert f is not None
                yield member.name, f.read()


def _zip_members(whl: Path) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            if not info.is_dir():
                yield info.filename, z.read(info)


def workload_dedup(bfs: Buildatfs, tars: list[Path], whls: list[Path], res: Results) -> dict:
    """Related trees into one store, against file-level dedup + zstd-3 per file."""
    import zstandard

    say("dedup: baseline (file-level dedup, zstd-3 per unique file)")
    seen: set[bytes] = set()
    cctx = zstandard.ZstdCompressor(level=3)
    logical = baseline = files = 0
    sources = [_tar_members(t) for t in tars] + [_zip_members(w) for w in whls]
    for members in sources:
        for _, data in members:
            files += 1
            logical += len(data)
            digest = hashlib.sha256(data).digest()
            if digest not in seen:
                seen.add(digest)
                baseline += len(cctx.compress(data))
    say("dedup: copying the trees into buildatfs")
    bfs.workload = "dedup"
    bfs.fresh()
    for tar_path in tars:
        dest = bfs.root / tar_path.stem
        dest.mkdir()
        run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf",
             str(tar_path), "-C", str(dest)])
    for whl in whls:
        with zipfile.ZipFile(whl) as z:
            z.extractall(bfs.root / "wheels" / whl.stem)
    bfs.note_rss()
    bfs.stop()
    fresh = bfs.stats()
    say("dedup: compacting the store (buildatfs gc --compact)")
    compact_seconds = timed(run, bfs.cli("gc", "--compact", str(bfs.store)), cwd=REPO,
                            stdout=subprocess.DEVNULL)
    stats = bfs.stats()
    names = ", ".join([t.stem for t in tars] + [w.name.split("-py")[0] for w in whls])
    return {"trees": names, "files": files, "logical": logical, "baseline": baseline,
            "unique_files": len(seen), "stats": stats, "fresh": fresh,
            "compact_seconds": compact_seconds}


# ---- the report ---------------------------------------------------------------


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def verdict(value: float | None, op: str, limit: float) -> str:
    if value is None:
        return "–"
    ok = value <= limit if op == "<=" else value >= limit
    return "PASS" if ok else "**MISS**"


def render(res: Results, targets: list[Target], bfs: Buildatfs, dedup: dict | None,
           sizes: Sizes, command: str, seconds: float) -> str:
    names = [t.name for t in targets]
    lines = [
        "# buildatfs benchmark", "",
        f"`{command}`, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
        f"{os.uname().release}, {seconds / 60:.1f} min. Median of {sizes.rounds} round(s) "
        f"({sizes.meta_rounds} for the tree steps), targets interleaved.", "",
        "| step | " + " | ".join(f"{t.label}" for t in targets)
        + " | buildatfs ÷ disk | buildatfs ÷ fuse-overlayfs | target | result |",
        "|---|" + "---|" * len(targets) + "---|---|---|---|",
    ]

    def row(step: str, unit: str, higher_better: bool, target: str = "",
            check: tuple[str, str, float] | None = None) -> None:
        values = {n: res.get(step, n) for n in names}
        cells = []
        for n in names:
            v = values[n]
            cells.append("–" if v is None else
                         (f"{v:.2f} s" if unit == "s" else
                          f"{v / MIB:.0f} MiB/s" if unit == "B/s" else f"{v:.0f}/s"))

        def ratio(other: str) -> float | None:
            a, b = values.get("buildatfs"), values.get(other)
            if a is None or b is None or not a or not b:
                return None
            # Always "how many times the cost on the baseline": time ratio.
            return b / a if higher_better else a / b

        by_name = {"disk": ratio("disk"), "overlay": ratio("overlay")}
        result = ""
        if check is not None:
            against, op, limit = check
            result = verdict(by_name[against], op, limit)
        lines.append(f"| {step} | " + " | ".join(cells)
                     + f" | {fmt_ratio(by_name['disk'])} | {fmt_ratio(by_name['overlay'])}"
                     + f" | {target} | {result} |")

    row("tar -x", "s", False, "≤ 3× disk", ("disk", "<=", 3))
    row("tar -x, then durable", "s", False)
    row("find (cold)", "s", False)
    row("stat every file (cold)", "s", False, "≤ 4× disk", ("disk", "<=", 4))
    row("stat every file (warm)", "s", False)
    row("cat every file (cold)", "s", False)
    row("first ingest, fsync", "B/s", True)
    row("re-ingest (all duplicate), fsync", "B/s", True)
    row("sequential read (cold)", "B/s", True,
        "≥ 0.5× fuse-overlayfs throughput (≤ 2× its time)", ("overlay", "<=", 2))
    row("sequential read (warm)", "B/s", True,
        "≥ 0.8× fuse-overlayfs throughput (≤ 1.25× its time)", ("overlay", "<=", 1.25))
    row("4 KiB random reads (cold)", "ops", True)
    row("4 KiB sequential writes, fsync", "B/s", True)
    row("create the big file (1 MiB writes), fsync", "B/s", True)
    row("8 KiB random writes, fsync", "B/s", True)
    lines += ["", "Ratios are time on buildatfs ÷ time on the baseline (per byte for throughput "
              "rows): lower is better, 1.00× is parity.", ""]

    lines += ["| buildatfs figure | value | target | result |", "|---|---|---|---|"]
    zstd = res.get("zstd-3, one thread", "cpu")
    for step, limit in (("first ingest, fsync", 1.5), ("re-ingest (all duplicate), fsync", 4.0)):
        speed = res.get(step, "buildatfs")
        if speed is not None and zstd:
            lines.append(f"| {step}: {speed / MIB:.0f} MiB/s ÷ zstd-3 one thread "
                         f"{zstd / MIB:.0f} MiB/s | {speed / zstd:.2f}× | ≥ {limit}× | "
                         f"{verdict(speed / zstd, '>=', limit)} |")
    seq = res.get("4 KiB sequential writes, fsync", "buildatfs")
    rnd = res.get("8 KiB random writes, fsync", "buildatfs")
    if seq and rnd:
        lines.append(f"| 8 KiB random writes into the big file ({sizes.big_file_bytes // MIB} MiB, "
                     f"{sizes.random_writes} writes): time per byte ÷ 4 KiB sequential writes "
                     f"to a new file | {seq / rnd:.2f}× | ≤ 3× | {verdict(seq / rnd, '<=', 3)} |")
    for n in names:
        s = res.get("4 KiB sequential writes, fsync", n)
        w = res.get("8 KiB random writes, fsync", n)
        if s and w and n != "buildatfs":
            lines.append(f"| (same ratio on {n}, for reference) | {s / w:.2f}× | | |")
    if bfs.peak_rss:
        peak = max(bfs.peak_rss.values())
        per = ", ".join(f"{k} {v / MIB:.0f}" for k, v in bfs.peak_rss.items())
        lines.append(f"| daemon peak RSS (VmHWM; MiB per workload: {per}) | {peak / MIB:.0f} MiB "
                     f"| ≤ 300 MB | {verdict(peak / 1e6, '<=', 300)} |")
    if dedup is not None:
        st, fresh = dedup["stats"], dedup["fresh"]
        stored = st["stored_bytes"]
        lines.append(
            f"| stored bytes after compaction ({stored / MIB:.1f} MiB packs) ÷ file-level "
            f"dedup + zstd-3 per file ({dedup['baseline'] / MIB:.1f} MiB) | "
            f"{stored / dedup['baseline']:.3f}× | ≤ 0.9× | "
            f"{verdict(stored / dedup['baseline'], '<=', 0.9)} |")
        lines.append(
            f"| same, counting the LMDB index ({st['metadata_bytes'] / MIB:.1f} MiB) | "
            f"{(stored + st['metadata_bytes']) / dedup['baseline']:.3f}× | | |")
        lines.append(
            f"| stored bytes as written, before compaction ({fresh['stored_bytes'] / MIB:.1f} "
            f"MiB; `gc --compact` took {dedup['compact_seconds']:.0f} s) | "
            f"{fresh['stored_bytes'] / dedup['baseline']:.3f}× | | |")
        lines += ["", f"Dedup trees: {dedup['trees']}; {dedup['files']} files, "
                  f"{dedup['logical'] / MIB:.1f} MiB logical ({dedup['unique_files']} distinct "
                  f"files); buildatfs logical {st['logical_bytes'] / MIB:.1f} MiB, unique "
                  f"{st['unique_bytes'] / MIB:.1f} MiB, {st['chunks']} chunks."]
    lines += ["", "Cold steps (after sync, drop_caches and a remount of the FUSE targets): "
              "find, stat (cold), cat, sequential read (cold), random reads. "
              "`tar -x, then durable`: tar, then until the data is on the disk: syncfs on disk; "
              "unmount and syncfs of the upper directory on fuse-overlayfs; unmount (which "
              "waits for every commit) and syncfs of the store on buildatfs. "
              "Ingest and write steps include the final fsync."]
    lines += [""] + [f"{n}" for n in res.notes]
    return "\n".join(lines) + "\n"


# ---- main ---------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small sizes, one round: 1-2 minutes (the full run takes 6-10)")
    p.add_argument("--cache", type=Path, default=Path("/var/tmp/buildatfs-bench-cache"),
                   help="where inputs are made once and kept")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    p.add_argument("--only", action="append", choices=["tree", "ingest", "writes", "dedup"],
                   help="run only these workloads (repeatable)")
    p.add_argument("--targets", default="disk,overlay,buildatfs",
                   help="comma-separated subset of disk,overlay,buildatfs")
    p.add_argument("--prepare", action="store_true", help="only make the cached inputs")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="run py-spy record on every buildatfs daemon, raw output into DIR")
    p.add_argument("--wrapper", type=Path, metavar="SCRIPT",
                   help="start the daemon as `python3 SCRIPT mount --foreground STORE MP`")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (mounts, drop_caches)")
    sizes = QUICK if args.quick else FULL
    command = " ".join(["python3", "tools/bench.py", *sys.argv[1:]])
    began = time.monotonic()

    ensure_tools()
    args.cache.mkdir(parents=True, exist_ok=True)
    tars = [rootfs_tar(args.cache, *spec) for spec in ROOTFS[: sizes.rootfs_variants]]
    parts = dataset(args.cache, sizes)
    whls = wheels(args.cache, sizes.wheels_per_package)
    if args.prepare:
        return 0
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)

    scratch = Path(tempfile.mkdtemp(prefix="buildatfs-bench-", dir="/var/tmp"))
    bfs = Buildatfs(scratch, args.wrapper, args.profile)
    chosen = args.targets.split(",")
    all_targets: list[Target] = [Disk(scratch), Overlay(scratch), bfs]
    targets = [t for t in all_targets if t.name in chosen]
    only = set(args.only or ["tree", "ingest", "writes", "dedup"])
    res = Results()
    dedup = None
    try:
        if "tree" in only:
            workload_tree(targets, tars[0], sizes, res)
        if "ingest" in only:
            workload_ingest(targets, parts, sizes, res)
        if "writes" in only:
            workload_writes(targets, parts, sizes, res)
        if "dedup" in only and bfs in targets:
            dedup = workload_dedup(bfs, tars, whls, res)
    finally:
        for t in all_targets:
            try:
                t.stop()
            except Exception as exc:  # keep cleaning up the others
                say(f"cannot unmount {t.root}: {exc}")
        for t in all_targets:
            if _mounted(t.root):
                subprocess.run(["fusermount3", "-u", "-z", str(t.root)])
        if any(_mounted(t.root) for t in all_targets):
            say(f"a mount is still there; left {scratch} in place")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    report = render(res, targets, bfs, dedup, sizes, command, time.monotonic() - began)
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
