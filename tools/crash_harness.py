#!/usr/bin/env python3
"""Kill -9 a busy buildatfs daemon again and again; every fsync'ed fact must survive.

Usage: python3 tools/crash_harness.py --cycles N [--seed S] [--workdir DIR] [--keep]

One store, N cycles of:

1. mount it;
2. run a random write workload in a child process (creates, overwrites,
   appends, truncates, renames of files and directories, hard links, xattrs,
   unlinks, mkdir/rmdir, fsync of files and of directories);
3. kill -9 the daemon after a random delay (the pid is in STORE/lock);
4. `buildatfs umount` (clears the dead mount), `buildatfs fsck` (0 or 1);
5. mount again and check every fact that is still promised (below), read
   every file back (a read error is a failure), unmount, and `fsck` must now
   report the store clean (exit 0).

The journal. The child appends JSON lines to a file outside the mount:

- ``inv`` *before* every change, naming the paths whose earlier facts the
  change supersedes (the change may or may not survive the kill, so nothing
  is promised about those paths any more);
- ``file`` right after fsync(2) of a regular file returned: the sha256, size
  and user.* xattrs of the file at each of its paths;
- ``dir`` right after fsync(2) of a directory returned: its sorted entries.

A fact is checked after the kill only while no later ``inv`` superseded it.
An ``inv`` of a path drops the facts of that path and, for changes to entries
(create, unlink, rename, link, mkdir, rmdir), also those of everything below it
and the listing of its parent. A content change (write, truncate, xattr) drops
the facts of every path of the changed inode. Facts from earlier cycles stay
promised until a later cycle supersedes them, so old data is checked again
after every crash, recovery and garbage collection.

Fact lines are fsync'ed; ``inv`` lines only need to be written before the
change, since the child process itself is never killed before the daemon.

Exit status: 0 if nothing was lost and every fsck was as required, 1 otherwise,
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KiB, MiB = 1 << 10, 1 << 20
CLI_TIMEOUT = 180.0
CHILD_EXIT_TIMEOUT = 30.0
# Errors a workload op may see once the daemon is gone: new requests get
# ENOTCONN, requests in flight ECONNABORTED, and fsync of pages the kernel
# could no longer write back EIO.
DEAD_MOUNT_ERRNOS = {errno.ENOTCONN, errno.ECONNABORTED, errno.EIO}
LOST_FOUND = "lost+found"


# ---------------------------------------------------------------- the workload


@dataclass(eq=False)
class Node:
    """One inode as the workload believes it is."""

    data: bytearray = field(default_factory=bytearray)
    xattrs: dict[str, bytes] = field(default_factory=dict)
    paths: set[str] = field(default_factory=set)


class Journal:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def put(self, record: dict, durable: bool = False) -> None:
        os.write(self.fd, (json.dumps(record) + "\n").encode())
        if durable:
            os.fsync(self.fd)


def _sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def _user_xattrs(path: str) -> dict[str, bytes]:
    names = [n for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user.")]
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names}


class Workload:
    """Random changes to the tree under ROOT, with a journal of what is promised."""

    def __init__(self, root: Path, journal: Journal, seed: int, tag: str) -> None:
        self.root = root
        self.journal = journal
        self.rng = random.Random(seed)
        self.tag = tag
        self.counter = 0
        self.files: dict[str, Node] = {}
        self.dirs: set[str] = {""}
        self.ops = 0
        self.fsyncs = 0
        pool_rng = random.Random(1234)  # the same blocks every cycle: dedup across cycles
        self.pool = [pool_rng.randbytes(64 * KiB) for _ in range(6)]

    # -- the tree as it is now ------------------------------------------------

    def scan(self) -> None:
        """Build the model from the mount (after a crash, unfsync'ed state is unknown)."""
        by_ino: dict[int, Node] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = os.path.relpath(dirpath, self.root)
            rel_dir = "" if rel_dir == "." else rel_dir
            for name in dirnames:
                self.dirs.add(os.path.join(rel_dir, name))
            for name in filenames:
                rel = os.path.join(rel_dir, name)
                full = self.root / rel
                st = os.lstat(full)
                node = by_ino.get(st.st_ino)
                if node is None:
                    node = by_ino[st.st_ino] = Node()
                    try:
                        with open(full, "rb") as f:
                            node.data = bytearray(f.read())
                        node.xattrs = _user_xattrs(str(full))
                    except OSError as exc:
                        self.journal.put({"t": "scanerr", "path": rel, "err": str(exc)}, True)
                        raise
                node.paths.add(rel)
                self.files[rel] = node

    def full(self, rel: str) -> str:
        return str(self.root / rel)

    def new_name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.tag}-{self.counter}"

    def pick_dir(self, exclude: str | None = None) -> str:
        choices = [d for d in self.dirs if not _under(d, LOST_FOUND)]
        if exclude is not None:
            choices = [d for d in choices if not _under(d, exclude)]
        return self.rng.choice(sorted(choices))

    def pick_file(self) -> str | None:
        choices = [p for p in self.files if not _under(p, LOST_FOUND)]
        return self.rng.choice(sorted(choices)) if choices else None

    def data(self) -> bytes:
        """Bytes to write: slices of shared blocks, fresh random bytes, zeros."""
        size = self.rng.choice([0, 1, 100, 4 * KiB, 17 * KiB, 64 * KiB + 3, 200 * KiB])
        if self.rng.random() < 0.08:
            size = self.rng.randrange(256 * KiB, 2 * MiB)
        parts, left = [], size
        while left > 0:
            n = min(left, self.rng.randrange(1, 96 * KiB))
            kind = self.rng.random()
            if kind < 0.45:
                block = self.rng.choice(self.pool)
                start = self.rng.randrange(0, len(block))
                piece = (block[start:] + block)[:n]
            elif kind < 0.9:
                piece = self.rng.randbytes(n)
            else:
                piece = bytes(n)
            parts.append(piece)
            left -= n
        return b"".join(parts)

    # -- journal --------------------------------------------------------------

    def inv(self, paths: list[str], entry: bool) -> None:
        self.journal.put({"t": "inv", "paths": sorted(set(paths)), "entry": entry})

    def note_file_synced(self, node: Node) -> None:
        for path in sorted(node.paths):
            self.journal.put({"t": "file", "path": path, "sha": _sha(node.data),
                              "size": len(node.data),
                              "xattrs": {k: v.hex() for k, v in sorted(node.xattrs.items())}},
                             durable=True)
        self.fsyncs += 1

    def note_dir_synced(self, rel: str) -> None:
        prefix = rel + "/" if rel else ""
        names = sorted({p[len(prefix):].split("/")[0]
                        for p in [*self.files, *self.dirs]
                        if p.startswith(prefix) and p != rel and "/" not in p[len(prefix):]})
        self.journal.put({"t": "dir", "path": rel, "names": names}, durable=True)
        self.fsyncs += 1

    def maybe_fsync(self, fd: int, node: Node) -> None:
        if self.rng.random() < 0.45:
            os.fsync(fd)
            self.note_file_synced(node)

    # -- operations -----------------------------------------------------------

    def op_create(self) -> None:
        rel = os.path.join(self.pick_dir(), self.new_name("f"))
        self.inv([rel], entry=True)
        data = self.data()
        node = Node(data=bytearray(data), paths={rel})
        fd = os.open(self.full(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.files[rel] = node
        try:
            os.write(fd, data) if data else None
            self.maybe_fsync(fd, node)
        finally:
            os.close(fd)

    def op_rewrite(self) -> None:
        rel = self.pick_file()
        if rel is None:
            return
        node = self.files[rel]
        self.inv(list(node.paths), entry=False)
        data = self.data()
        fd = os.open(self.full(rel), os.O_WRONLY | os.O_TRUNC)
        node.data = bytearray()
        try:
            os.write(fd, data) if data else None
            node.data = bytearray(data)
            self.maybe_fsync(fd, node)
        finally:
            os.close(fd)

    def op_pwrite(self, append: bool) -> None:
        rel = self.pick_file()
        if rel is None:
            return
        node = self.files[rel]
        self.inv(list(node.paths), entry=False)
        data = self.data()[: 300 * KiB]
        flags = os.O_WRONLY | (os.O_APPEND if append else 0)
        offset = len(node.data) if append else self.rng.randrange(0, len(node.data) + 64 * KiB)
        fd = os.open(self.full(rel), flags)
        try:
            if data:
                if append:
                    os.write(fd, data)
                else:
                    os.pwrite(fd, data, offset)
                end = offset + len(data)
                if end > len(node.data):
                    node.data.extend(bytes(end - len(node.data)))
                node.data[offset:end] = data
            self.maybe_fsync(fd, node)
        finally:
            os.close(fd)

    def op_truncate(self) -> None:
        rel = self.pick_file()
        if rel is None:
            return
        node = self.files[rel]
        self.inv(list(node.paths), entry=False)
        size = self.rng.choice([0, len(node.data) // 2, len(node.data) + 70 * KiB,
                                self.rng.randrange(0, len(node.data) + 1)])
        os.truncate(self.full(rel), size)
        if size < len(node.data):
            del node.data[size:]
        else:
            node.data.extend(bytes(size - len(node.data)))
        if self.rng.random() < 0.4:
            self.fsync_path(rel)

    def fsync_path(self, rel: str) -> None:
        fd = os.open(self.full(rel), os.O_RDONLY)
        try:
            os.fsync(fd)
            self.note_file_synced(self.files[rel])
        finally:
            os.close(fd)

    def op_fsync_file(self) -> None:
        rel = self.pick_file()
        if rel is not None:
            self.fsync_path(rel)

    def op_fsync_dir(self) -> None:
        rel = self.pick_dir()
        fd = os.open(self.full(rel), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
            self.note_dir_synced(rel)
        finally:
            os.close(fd)

    def op_xattr(self) -> None:
        rel = self.pick_file()
        if rel is None:
            return
        node = self.files[rel]
        self.inv(list(node.paths), entry=False)
        if node.xattrs and self.rng.random() < 0.3:
            name = self.rng.choice(sorted(node.xattrs))
            os.removexattr(self.full(rel), name)
            del node.xattrs[name]
        else:
            name = f"user.k{self.rng.randrange(4)}"
            value = self.rng.randbytes(self.rng.randrange(0, 200))
            os.setxattr(self.full(rel), name, value)
            node.xattrs[name] = value
        if self.rng.random() < 0.4:
            self.fsync_path(rel)

    def op_rename_file(self) -> None:
        src = self.pick_file()
        if src is None:
            return
        if self.rng.random() < 0.3 and len(self.files) > 1:
            dst = self.pick_file()
        else:
            dst = os.path.join(self.pick_dir(), self.new_name("r"))
        if dst is None or dst == src:
            return
        node, old = self.files[src], self.files.get(dst)
        if old is node:
            return  # rename(2) between two links of one inode does nothing
        self.inv([src, dst], entry=True)
        os.rename(self.full(src), self.full(dst))
        if old is not None:
            old.paths.discard(dst)
        del self.files[src]
        node.paths.discard(src)
        node.paths.add(dst)
        self.files[dst] = node
        if self.rng.random() < 0.3:
            self.fsync_path(dst)

    def op_rename_dir(self) -> None:
        dirs = [d for d in self.dirs if d and not _under(d, LOST_FOUND)]
        if not dirs:
            return
        src = self.rng.choice(sorted(dirs))
        dst = os.path.join(self.pick_dir(exclude=src), self.new_name("D"))
        self.inv([src, dst], entry=True)
        os.rename(self.full(src), self.full(dst))
        self.dirs = {_moved(d, src, dst) for d in self.dirs}
        moved = {}
        for path, node in self.files.items():
            new = _moved(path, src, dst)
            if new != path:
                node.paths.discard(path)
                node.paths.add(new)
            moved[new] = node
        self.files = moved

    def op_link(self) -> None:
        src = self.pick_file()
        if src is None:
            return
        dst = os.path.join(self.pick_dir(), self.new_name("l"))
        self.inv([dst], entry=True)
        os.link(self.full(src), self.full(dst))
        node = self.files[src]
        node.paths.add(dst)
        self.files[dst] = node

    def op_unlink(self) -> None:
        rel = self.pick_file()
        if rel is None:
            return
        self.inv([rel], entry=True)
        os.unlink(self.full(rel))
        self.files.pop(rel).paths.discard(rel)

    def op_mkdir(self) -> None:
        rel = os.path.join(self.pick_dir(), self.new_name("d"))
        self.inv([rel], entry=True)
        os.mkdir(self.full(rel))
        self.dirs.add(rel)

    def op_rmdir(self) -> None:
        busy = {os.path.dirname(p) for p in [*self.files, *self.dirs]}
        empty = [d for d in self.dirs if d and d not in busy and not _under(d, LOST_FOUND)]
        if not empty:
            return
        rel = self.rng.choice(sorted(empty))
        self.inv([rel], entry=True)
        os.rmdir(self.full(rel))
        self.dirs.discard(rel)

    def step(self) -> None:
        big = len(self.files) > 150 or sum(len(n.data) for n in set(self.files.values())) > 24 * MiB
        ops = [
            (self.op_create, 3 if not big else 0.5),
            (self.op_rewrite, 2),
            (lambda: self.op_pwrite(append=False), 2),
            (lambda: self.op_pwrite(append=True), 2),
            (self.op_truncate, 1),
            (self.op_fsync_file, 1.5),
            (self.op_fsync_dir, 1),
            (self.op_xattr, 1.5),
            (self.op_rename_file, 1.5),
            (self.op_rename_dir, 0.3),
            (self.op_link, 0.8),
            (self.op_unlink, 1.5 if not big else 5),
            (self.op_mkdir, 0.5),
            (self.op_rmdir, 0.4),
        ]
        fn = self.rng.choices([f for f, _ in ops], weights=[w for _, w in ops])[0]
        fn()
        self.ops += 1


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


def _moved(path: str, src: str, dst: str) -> str:
    if path == src:
        return dst
    if path.startswith(src + "/"):
        return dst + path[len(src):]
    return path


def child_main(root: Path, journal_path: Path, seed: int, tag: str) -> int:
    """Run the workload until an op fails (normally: the daemon was killed)."""
    journal = Journal(journal_path)
    work = Workload(root, journal, seed, tag)
    try:
        work.scan()
    except OSError as exc:
        journal.put({"t": "end", "ops": 0, "fsyncs": 0, "errno": exc.errno,
                     "error": f"scan: {exc}", "time": time.time()}, durable=True)
        return 1
    journal.put({"t": "ready", "files": len(work.files), "time": time.time()}, durable=True)
    try:
        while True:
            work.step()
    except OSError as exc:
        journal.put({"t": "end", "ops": work.ops, "fsyncs": work.fsyncs, "errno": exc.errno,
                     "error": f"{type(exc).__name__}: {exc}", "time": time.time()},
                    durable=True)
    return 0


# ---------------------------------------------------------------- the harness


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("BUILDATFS_CRASH_AT", None)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + old if old else "")
    return env


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "buildatfs", *(str(a) for a in args)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), stdin=subprocess.DEVNULL,
                              stdout=out, stderr=err, timeout=CLI_TIMEOUT, check=False)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


class HarnessError(Exception):
    """A step of a cycle did not behave as required; the run stops."""


def must(proc: subprocess.CompletedProcess[str], what: str, codes: tuple[int, ...] = (0,)) -> None:
    if proc.returncode not in codes:
        raise HarnessError(f"{what}: `{' '.join(proc.args[2:])}` exited {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()[-500:]}")


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Totals:
    cycles: int = 0
    kills: int = 0
    ops: int = 0
    fsyncs: int = 0
    files_checked: int = 0
    dirs_checked: int = 0
    bytes_checked: int = 0
    bytes_lost: int = 0
    files_lost: int = 0
    dirs_wrong: int = 0
    unreadable: int = 0
    early_errors: int = 0
    fsck_after_kill: dict[int, int] = field(default_factory=dict)
    fsck_after_clean: dict[int, int] = field(default_factory=dict)
    odd_repairs: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class Harness:
    def __init__(self, workdir: Path, seed: int) -> None:
        self.workdir = workdir
        self.store = workdir / "store"
        self.mnt = workdir / "mnt"
        self.rng = random.Random(seed)
        self.seed = seed
        self.facts: dict[str, dict] = {}  # "f:PATH" or "d:PATH" -> journal record
        self.totals = Totals()
        self.daemon_pid: int | None = None
        self.child: subprocess.Popen | None = None

    def setup(self) -> None:
        self.mnt.mkdir(parents=True, exist_ok=True)
        must(cli("init", self.store), "init")

    def mount(self) -> None:
        must(cli("mount", self.store, self.mnt), "mount")
        self.daemon_pid = int((self.store / "lock").read_text().split()[0])

    def umount(self, what: str) -> None:
        must(cli("umount", self.mnt), what)
        pid = self.daemon_pid
        if pid is not None:
            wait_until(lambda: not pid_alive(pid), 30, f"daemon {pid} to exit")
        self.daemon_pid = None

    def fsck(self) -> subprocess.CompletedProcess[str]:
        return cli("fsck", self.store)

    # -- one cycle ------------------------------------------------------------

    def cycle(self, k: int) -> str:
        started = time.monotonic()
        t = self.totals
        self.mount()
        journal = self.workdir / f"journal-{k:04d}.jsonl"
        self.child = subprocess.Popen(
            [sys.executable, __file__, "_child", str(self.mnt), str(journal),
             str(self.rng.randrange(1 << 30)), f"c{k}"],
            stdin=subprocess.DEVNULL, env=cli_env())
        wait_until(lambda: _has_line(journal, '"t": "ready"') or self.child.poll() is not None,
                   60, "the workload to start")
        delay = self.rng.uniform(0.05, 1.5)
        time.sleep(delay)
        killed_at = time.time()
        if self.child.poll() is None:
            os.kill(self.daemon_pid, signal.SIGKILL)
            t.kills += 1
        pid = self.daemon_pid
        wait_until(lambda: not pid_alive(pid), 30, f"killed daemon {pid} to exit")
        try:
            self.child.wait(CHILD_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()
            t.failures.append(f"cycle {k}: the workload stayed blocked after the daemon died")
        self.child = None
        ops, fsyncs = self.apply_journal(k, journal, killed_at)
        t.ops += ops
        t.fsyncs += fsyncs

        self.umount("umount of the dead mount")
        proc = self.fsck()
        must(proc, "fsck after kill", (0, 1))
        kill_code = proc.returncode
        t.fsck_after_kill[proc.returncode] = t.fsck_after_kill.get(proc.returncode, 0) + 1
        for line in proc.stdout.splitlines():
            if ": " in line and not line.startswith(("recovery:", str(self.store))):
                t.odd_repairs.append(f"cycle {k}: {line}")

        self.mount()
        checked = self.verify(k)
        self.umount("clean umount after verify")
        proc = self.fsck()
        t.fsck_after_clean[proc.returncode] = t.fsck_after_clean.get(proc.returncode, 0) + 1
        if proc.returncode != 0:
            t.failures.append(f"cycle {k}: fsck after a clean umount exited {proc.returncode}: "
                              f"{proc.stdout.strip()[-400:]}")
        t.cycles += 1
        return (f"cycle {k + 1}: {ops} ops, {fsyncs} fsyncs, killed after {delay:.2f} s, "
                f"fsck {kill_code}; {checked}; fsck after clean umount {proc.returncode}; "
                f"{time.monotonic() - started:.1f} s")

    def apply_journal(self, k: int, journal: Path, killed_at: float) -> tuple[int, int]:
        ops = fsyncs = 0
        for line in journal.read_text().splitlines():
            rec = json.loads(line)
            kind = rec["t"]
            if kind == "inv":
                for path in rec["paths"]:
                    self.supersede(path, rec["entry"])
            elif kind == "file":
                self.facts["f:" + rec["path"]] = rec
            elif kind == "dir":
                self.facts["d:" + rec["path"]] = rec
            elif kind == "scanerr":
                self.totals.failures.append(f"cycle {k}: cannot read {rec['path']} after "
                                            f"recovery: {rec['err']}")
            elif kind == "end":
                ops, fsyncs = rec["ops"], rec["fsyncs"]
                if rec["errno"] not in DEAD_MOUNT_ERRNOS or rec["time"] < killed_at:
                    self.totals.early_errors += 1
                    after = rec["time"] - killed_at
                    self.totals.failures.append(
                        f"cycle {k}: the workload failed before the kill or with an unexpected "
                        f"error: {rec['error']} ({after:+.3f} s after the kill)")
        return ops, fsyncs

    def supersede(self, path: str, entry: bool) -> None:
        self.facts.pop("f:" + path, None)
        if not entry:
            return
        self.facts.pop("d:" + path, None)
        self.facts.pop("d:" + os.path.dirname(path), None)
        below = path + "/"
        for key in [k for k in self.facts if k[2:].startswith(below)]:
            del self.facts[key]

    def verify(self, k: int) -> str:
        t = self.totals
        files = dirs = nbytes = lost = 0
        for key, rec in sorted(self.facts.items()):
            full = self.mnt / rec["path"]
            if key.startswith("d:"):
                dirs += 1
                try:
                    names = sorted(os.listdir(full))
                except OSError as exc:
                    names = [f"<{exc}>"]
                if names != rec["names"]:
                    t.dirs_wrong += 1
                    t.failures.append(f"cycle {k}: directory /{rec['path']} lists {names}, "
                                      f"fsync'ed as {rec['names']}")
                continue
            files += 1
            nbytes += rec["size"]
            problem = None
            try:
                with open(full, "rb") as f:
                    data = f.read()
                xattrs = {n: v.hex() for n, v in sorted(_user_xattrs(str(full)).items())}
            except OSError as exc:
                problem = str(exc)
            else:
                if _sha(data) != rec["sha"]:
                    problem = f"content differs ({len(data)} bytes, expected {rec['size']})"
                elif xattrs != rec["xattrs"]:
                    problem = f"xattrs {xattrs} differ from {rec['xattrs']}"
            if problem is not None:
                lost += rec["size"]
                t.files_lost += 1
                t.failures.append(f"cycle {k}: fsync'ed file /{rec['path']}: {problem}")
        t.files_checked += files
        t.dirs_checked += dirs
        t.bytes_checked += nbytes
        t.bytes_lost += lost
        for path in _walk_files(self.mnt):
            try:
                with open(path, "rb") as f:
                    while f.read(1 << 20):
                        pass
            except OSError as exc:
                t.unreadable += 1
                t.failures.append(f"cycle {k}: {path} cannot be read back: {exc}")
        return f"{files} files ({nbytes / MiB:.1f} MiB) and {dirs} dirs checked, {lost} bytes lost"

    def cleanup_after_failure(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.wait()
        pid = self.daemon_pid
        if pid is not None and pid_alive(pid):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if os.fsencode(self.store) in cmdline:
                os.kill(pid, signal.SIGKILL)
                wait_until(lambda: not pid_alive(pid), 30, f"daemon {pid} to die")
        if os.path.ismount(self.mnt) or _in_mount_table(self.mnt):
            cli("umount", self.mnt)


def _has_line(path: Path, needle: str) -> bool:
    try:
        return needle in path.read_text()
    except FileNotFoundError:
        return False


def _walk_files(root: Path):
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            yield Path(dirpath, name)


def _in_mount_table(path: Path) -> bool:
    text = Path("/proc/self/mountinfo").read_text()
    return any(line.split()[4] == str(path) for line in text.splitlines())


def summary(t: Totals, seconds: float) -> str:
    def codes(d: dict[int, int]) -> str:
        return ", ".join(f"exit {c}: {n}" for c, n in sorted(d.items())) or "-"

    rows = [
        ("cycles", t.cycles),
        ("kills (kill -9 of a busy daemon)", t.kills),
        ("workload ops / fsyncs", f"{t.ops} / {t.fsyncs}"),
        ("fsync'ed files checked", t.files_checked),
        ("fsync'ed directory listings checked", t.dirs_checked),
        ("bytes checked", t.bytes_checked),
        ("bytes lost (must be 0)", t.bytes_lost),
        ("files lost or wrong", t.files_lost),
        ("directory listings wrong", t.dirs_wrong),
        ("files unreadable after recovery", t.unreadable),
        ("workload errors before the kill", t.early_errors),
        ("fsck after kill (0 or 1)", codes(t.fsck_after_kill)),
        ("fsck after clean umount (must be 0)", codes(t.fsck_after_clean)),
        ("fsck repairs other than recovery", len(t.odd_repairs)),
        ("seconds", f"{seconds:.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        root, journal, seed, tag = argv[1:5]
        return child_main(Path(root), Path(journal), int(seed), tag)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, required=True)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the store, mount point and journals go (default: a new "
                             "directory in /var/tmp, removed after a run without failures)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("crash_harness: needs root and /dev/fuse.", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    if args.workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="buildatfs-crash-", dir="/var/tmp"))
    else:
        workdir = args.workdir.absolute()
        if workdir.exists() and any(workdir.iterdir()):
            print(f"crash_harness: {workdir} is not empty.", file=sys.stderr)
            return 2
        workdir.mkdir(parents=True, exist_ok=True)
    print(f"crash harness: seed {seed}, {args.cycles} cycles in {workdir}", flush=True)
    harness = Harness(workdir, seed)
    started = time.monotonic()
    ok = False
    try:
        harness.setup()
        for k in range(args.cycles):
            print(harness.cycle(k), flush=True)
            for failure in harness.totals.failures:
                print(f"  FAILURE {failure}", flush=True)
            if harness.totals.failures:
                break
        ok = not harness.totals.failures and harness.totals.bytes_lost == 0
    except HarnessError as exc:
        harness.totals.failures.append(str(exc))
        print(f"  FAILURE {exc}", flush=True)
    finally:
        if not ok:
            harness.cleanup_after_failure()
    t = harness.totals
    log = harness.store / "buildatfs.log"
    tracebacks = log.read_text(errors="replace").count("Traceback") if log.exists() else 0
    if tracebacks:
        t.failures.append(f"{tracebacks} traceback(s) in {log}")
        ok = False
    print()
    print(summary(t, time.monotonic() - started))
    for line in t.odd_repairs[:20]:
        print(f"  note: {line}")
    if ok:
        if not args.keep:
            shutil.rmtree(workdir)
        print("RESULT: ok, nothing lost")
        return 0
    print(f"RESULT: FAILED ({len(t.failures)} failure(s)); "
          f"store, journals and log kept in {workdir}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
