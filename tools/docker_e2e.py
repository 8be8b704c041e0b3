#!/usr/bin/env python3
"""Docker on buildatfs, end to end and offline, next to Docker on plain disk.

Usage: python3 tools/docker_e2e.py [--quick] [--workdir DIR] [--keep] [--cache DIR]

Steps, each of which must succeed:

1. Make (or reuse from the cache) a debootstrap minbase bookworm root file system, as a
   tar file. The mirror is read from /etc/apt at run time.
2. Create and mount a fresh buildatfs store; start two dockerds by hand, one with its
   data-root on the mount and one on plain disk. Each has its own config file, exec-root,
   pidfile and unix socket outside the mount, and --iptables=false --bridge=none.
3. `docker import` the rootfs as the base image in both, then build the same images (legacy
   builder, --network=none) that share the base, with RUN steps that add users, copy and
   delete /usr/share/doc, replace directories and generate data.
4. Check that `docker info` reports overlay2 on buildatfs, run containers from the images
   (--rm --network=none --pull=never) and check what they print.
5. `docker save` one image from both daemons and compare every layer's content: for each
   member of each layer.tar its name, type, mode, uid, gid, size, link target, device
   numbers, xattrs and, for regular files, the sha256 of its data. Member mtimes are not
   compared (each build sets its own). Within each save, the sha256 of every layer.tar must
   equal the image's diff_id, and the imported base layer must be byte-identical in both.
6. Measure both data-roots, remove the images, `docker system prune -af --volumes`, stop both
   dockerds by pid, unmount, and run `buildatfs fsck`, which must find nothing.

Prints a summary table. Exits 0 on success, 1 on any failure (with the reason on stderr),
2 on bad arguments. Cleans up in every case; the work directory is kept only with --keep.
Needs root, /dev/fuse, dockerd 20.10 (/usr/sbin/dockerd), its client /usr/bin/docker and
debootstrap. BUILDATFS_E2E_CACHE sets the default cache directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("BUILDATFS_E2E_CACHE", "/var/cache/buildatfs-e2e"))
ROOTFS_TAR = "bookworm-minbase.tar"
DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # the client that matches dockerd 20.10
BASE_IMAGE = "e2e/base:bookworm"
PAYLOAD_SIZE = 6 << 20
DAEMON_START_TIMEOUT = 90.0
DAEMON_STOP_TIMEOUT = 60.0


class E2EFailure(Exception):
    """A step failed; the message says which and why."""


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(
    cmd: Sequence[object],
    *,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    stdin: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run CMD, capturing output; raise E2EFailure on a non-zero exit when CHECK."""
    args = [os.fspath(a) for a in cmd]  # type: ignore[arg-type]
    infile = open(stdin, "rb") if stdin is not None else subprocess.DEVNULL
    try:
        proc = subprocess.run(
            args,
            stdin=infile,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise E2EFailure(f"`{' '.join(args)}` did not finish within {timeout:.0f} s") from None
    finally:
        if stdin is not None:
            infile.close()  # type: ignore[union-attr]
    if check and proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise E2EFailure(f"`{' '.join(args)}` exited {proc.returncode}: {detail}")
    return proc


# -- buildatfs --------------------------------------------------------------------------------


def buildatfs_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    return env


def buildatfs(
    *args: object, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run this checkout's buildatfs CLI."""
    return run(
        [sys.executable, "-m", "buildatfs", *args],
        timeout=timeout,
        env=buildatfs_env(),
        check=check,
    )


def mounts_under(prefix: Path) -> list[str]:
    """Mount points at or below PREFIX, deepest first (from /proc/self/mountinfo)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point == str(prefix) or point.startswith(str(prefix) + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def fstype_of(mountpoint: Path) -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mountpoint):
                return fields[fields.index("-") + 1]
    return None


# -- root file system -------------------------------------------------------------------------


def debian_mirror() -> str:
    """The bookworm mirror URI named in /etc/apt (deb822 sources first, then sources.list)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for stanza in sources.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1)
                for line in stanza.splitlines()
                if ":" in line and not line.startswith("#")
            )
            suites = fields.get("Suites", "").split()
            if "bookworm" in suites and fields.get("URIs"):
                return fields["URIs"].split()[0]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == "bookworm":
                return parts[1]
    raise E2EFailure(
        "no bookworm mirror found in /etc/apt/sources.list.d/debian.sources "
        "or /etc/apt/sources.list"
    )


def rootfs_tar(cache: Path) -> Path:
    """The cached minbase tar; made with debootstrap on first use."""
    tar_path = cache / ROOTFS_TAR
    if tar_path.exists():
        say(f"Using the cached root file system {tar_path}.")
        return tar_path
    if shutil.which("debootstrap") is None:
        raise E2EFailure("debootstrap is not installed (apt-get install debootstrap)")
    cache.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache))
    mirror = debian_mirror()
    say(f"Making a minbase bookworm root file system with debootstrap from {mirror}...")
    try:
        run(["debootstrap", "--variant=minbase", "bookworm", target, mirror], timeout=1800)
        partial = tar_path.with_suffix(".partial")
        run(["tar", "--numeric-owner", "-C", target, "-cf", partial, "."], timeout=600)
        partial.rename(tar_path)
    finally:
        for point in mounts_under(target):  # debootstrap mounts /proc and /sys inside
            run(["umount", "-l", point], check=False)
        if not mounts_under(target):
            shutil.rmtree(target, ignore_errors=True)
    return tar_path


# -- dockerd ----------------------------------------------------------------------------------


@dataclass
class Daemon:
    """One dockerd started here, with everything it owns outside its data-root."""

    name: str
    data_root: Path
    run_dir: Path
    log_path: Path
    pid: int | None = None
    child_pids: list[int] = field(default_factory=list)
    storage_driver: str | None = None  # None: dockerd's own choice (overlay2 here)
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "docker.pid"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DOCKER_HOST=f"unix://{self.socket}",
            DOCKER_BUILDKIT="0",
            DOCKER_CONFIG=str(self.run_dir / "client-config"),
        )
        return env

    def docker(
        self, *args: object, timeout: float = 600, stdin: Path | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run([DOCKER, *args], timeout=timeout, env=self.env(), stdin=stdin, check=check)

    def start(self) -> None:
        self.data_root.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "exec").mkdir(parents=True, exist_ok=True)
        config = self.run_dir / "daemon.json"
        # The trust key would otherwise go to /etc/docker/key.json (dockerd 20.10).
        config.write_text(json.dumps({"deprecated-key-path": str(self.run_dir / "key.json")}))
        cmd = [
            DOCKERD,
            "--config-file",
            config,
            "--data-root",
            self.data_root,
            "--exec-root",
            self.run_dir / "exec",
            "--pidfile",
            self.pidfile,
            "-H",
            f"unix://{self.socket}",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--bridge=none",
            "--userland-proxy=false",
        ]
        if self.storage_driver:
            cmd += ["--storage-driver", self.storage_driver]
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                [os.fspath(c) for c in cmd],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.pid, self.process = proc.pid, proc
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise E2EFailure(
                    f"dockerd ({self.name}) exited {proc.returncode} at start:\n" + self.log_tail()
                )
            if (
                self.socket.exists()
                and self.docker("version", check=False, timeout=30).returncode == 0
            ):
                break
            if time.monotonic() > deadline:
                raise E2EFailure(
                    f"dockerd ({self.name}) did not answer within "
                    f"{DAEMON_START_TIMEOUT:.0f} s:\n" + self.log_tail()
                )
            time.sleep(0.3)
        self.child_pids = children_of(self.pid)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM our dockerd by pid and wait; SIGKILL it and its containerd on timeout."""
        try:
            self._stop()
        finally:
            if self.process is not None:
                try:  # reap it: a Popen still running warns when collected
                    self.process.wait(timeout=DAEMON_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    say(f"dockerd ({self.name}) is still running; it is left behind.")

    def _stop(self) -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        self.child_pids = sorted(set(self.child_pids) | set(children_of(pid)))
        if not pid_alive(pid):
            return
        os.kill(pid, signal.SIGTERM)
        if wait_pid_gone(pid, DAEMON_STOP_TIMEOUT):
            for child in self.child_pids:  # containerd normally ends with dockerd
                wait_pid_gone(child, 15)
            return
        say(
            f"dockerd ({self.name}, pid {pid}) ignored SIGTERM for "
            f"{DAEMON_STOP_TIMEOUT:.0f} s; killing it and its children."
        )
        for victim in [pid, *self.child_pids]:
            if pid_alive(victim):
                os.kill(victim, signal.SIGKILL)
                wait_pid_gone(victim, 15)


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rpartition(")")[2].split()[0] == "Z":
        try:  # our own child: reap it
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


# -- images -----------------------------------------------------------------------------------


@dataclass
class Image:
    tag: str
    dockerfile: str
    check_cmd: str
    expect: list[str]


def payload_bytes() -> bytes:
    """Reproducible, incompressible bytes, the same for both daemons."""
    return random.Random(20250520).randbytes(PAYLOAD_SIZE)


def image_plans(quick: bool) -> list[Image]:
    sha = hashlib.sha256(payload_bytes()).hexdigest()
    images = [
        Image(
            "e2e/users:1",
            f"""FROM {BASE_IMAGE}
RUN groupadd -g 2000 builders && useradd -m -u 1234 -G builders -s /bin/sh alice \\
    && useradd -M -u 1235 bob
RUN mkdir -p /srv/shared && chown alice:builders /srv/shared && chmod 2775 /srv/shared \\
    && cp /bin/true /usr/local/bin/suid-true && chmod 4755 /usr/local/bin/suid-true \\
    && ln -s /srv/shared /srv/link && mkfifo /srv/fifo && ln /etc/passwd /srv/passwd.hard
USER alice
RUN echo "written by $(id -un)" > /srv/shared/note && touch /home/alice/.profile-extra
USER root
""",
            "id alice; stat -c '%a %U:%G' /srv/shared /usr/local/bin/suid-true; "
            "cat /srv/shared/note; stat -c %G /srv/shared/note; readlink /srv/link",
            [
                "uid=1234(alice)",
                "2000(builders)",
                "2775 alice:builders",
                "4755 root:root",
                "written by alice",
                "builders",
                "/srv/shared",
            ],
        ),
        Image(
            "e2e/docs:1",
            f"""FROM {BASE_IMAGE}
RUN cp -a /usr/share/doc /opt/doc-copy && cp -a /usr/share/doc /opt/doc-copy2
RUN rm -rf /usr/share/doc/apt /usr/share/doc/bash /etc/cron.daily
RUN rm -rf /etc/apt/apt.conf.d && mkdir /etc/apt/apt.conf.d \\
    && echo 'APT::Sandbox::User "root";' > /etc/apt/apt.conf.d/99e2e
RUN mv /opt/doc-copy2 /opt/doc-moved && mv /usr/share/doc/dpkg /usr/share/doc/dpkg-moved
""",
            "test ! -e /usr/share/doc/apt && test ! -e /usr/share/doc/bash && echo gone; "
            "ls /etc/apt/apt.conf.d; test -d /usr/share/doc/dpkg-moved && echo moved; "
            "diff -r /opt/doc-copy /opt/doc-moved && echo copies-equal",
            ["gone", "99e2e", "moved", "copies-equal"],
        ),
        Image(
            "e2e/data:1",
            f"""FROM {BASE_IMAGE}
COPY payload.bin /data/payload.bin
RUN cp /data/payload.bin /data/payload.copy && head -c 3000000 /data/payload.bin > /data/head \\
    && dd if=/dev/zero of=/data/zeros bs=1M count=16 status=none \\
    && truncate -s 200M /data/sparse && printf tail >> /data/sparse
RUN mkdir /data/small && for i in $(seq 1 400); do \\
        seq "$i" 1000 > "/data/small/f$i"; done
RUN dd if=/data/payload.bin of=/data/payload.copy bs=4096 seek=100 count=2 conv=notrunc \\
        skip=7 status=none && rm /data/small/f1*
""",
            "sha256sum /data/payload.bin | cut -d' ' -f1; ls /data/small | wc -l; "
            "stat -c %s /data/sparse; tail -c 4 /data/sparse; echo; cmp /data/payload.bin "
            "/data/payload.copy || true",
            [sha, "289", str((200 << 20) + 4), "tail", "differ: char 409601"],
        ),
    ]
    if not quick:
        images += [
            Image(
                "e2e/data-child:1",
                """FROM e2e/data:1
RUN cp -a /data /data2 && rm -rf /data/small && mkdir /data/small && echo new > /data/small/x
WORKDIR /work
RUN tar -C /usr/share/doc -cf docs.tar . && tar -xf docs.tar && rm docs.tar
""",
                "ls /data/small; ls /data2/small | wc -l; ls /work | wc -l",
                ["x", "289"],
            ),
            Image(
                "e2e/users-child:1",
                """FROM e2e/users:1
RUN userdel -r alice && useradd -m -u 1300 carol && chown -R carol /srv/shared
""",
                "id carol; stat -c %U /srv/shared/note; test ! -e /home/alice && echo no-alice",
                ["uid=1300(carol)", "carol", "no-alice"],
            ),
        ]
    return images


def build_images(daemon: Daemon, images: list[Image], context: Path) -> None:
    for image in images:
        ctx = context / image.tag.replace("/", "_").replace(":", "_")
        (ctx / "Dockerfile").write_text(image.dockerfile)
        started = time.monotonic()
        daemon.docker("build", "--network=none", "--pull=false", "-t", image.tag, ctx, timeout=900)
        say(f"  {daemon.name}: built {image.tag} in {time.monotonic() - started:.1f} s")


def make_contexts(context: Path, images: list[Image]) -> None:
    payload = payload_bytes()
    for image in images:
        ctx = context / image.tag.replace("/", "_").replace(":", "_")
        ctx.mkdir(parents=True, exist_ok=True)
        (ctx / "payload.bin").write_bytes(payload)
        os.utime(ctx / "payload.bin", (1_700_000_000, 1_700_000_000))


def run_containers(daemon: Daemon, images: list[Image], quick: bool) -> int:
    """Run each image's check (and a few extra containers); return how many ran."""
    count = 0
    for image in images:
        out = daemon.docker(
            "run",
            "--rm",
            "--network=none",
            "--pull=never",
            image.tag,
            "sh",
            "-c",
            image.check_cmd,
            timeout=300,
        ).stdout
        missing = [text for text in image.expect if text not in out]
        if missing:
            raise E2EFailure(
                f"{daemon.name}: container of {image.tag} printed {out!r}, without {missing}"
            )
        count += 1
    # A writable layer with real data, copied up and deleted lower files, and a volume.
    script = (
        "dd if=/data/payload.bin of=/data/payload.bin bs=1 count=5 conv=notrunc "
        "status=none seek=10 && rm /data/head && mkdir -p /vol/d && cp /data/zeros /vol/d/ "
        "&& sha256sum /vol/d/zeros | cut -c1-16 && ls /data"
    )
    out = daemon.docker(
        "run",
        "--rm",
        "--network=none",
        "--pull=never",
        "-v",
        "e2evol:/vol",
        "e2e/data:1",
        "sh",
        "-c",
        script,
        timeout=300,
    ).stdout
    zeros = hashlib.sha256(bytes(16 << 20)).hexdigest()[:16]
    if zeros not in out or "head" in out.split():
        raise E2EFailure(f"{daemon.name}: copy-up / volume container printed {out!r}")
    count += 1
    out = daemon.docker(
        "run",
        "--rm",
        "--network=none",
        "--pull=never",
        "-v",
        "e2evol:/vol",
        BASE_IMAGE,
        "sh",
        "-c",
        "sha256sum /vol/d/zeros | cut -c1-16",
        timeout=300,
    ).stdout
    if out.strip() != zeros:
        raise E2EFailure(f"{daemon.name}: the volume did not keep its data: {out!r}")
    count += 1
    if not quick:
        name = "e2e-kept"
        daemon.docker(
            "run",
            "--name",
            name,
            "--network=none",
            "--pull=never",
            "e2e/docs:1",
            "sh",
            "-c",
            "echo changed > /etc/motd && rm -rf /opt/doc-copy",
        )
        daemon.docker("commit", name, "e2e/committed:1")
        daemon.docker("rm", name)
        out = daemon.docker(
            "run",
            "--rm",
            "--network=none",
            "--pull=never",
            "e2e/committed:1",
            "sh",
            "-c",
            "cat /etc/motd; test -e /opt/doc-copy || echo nocopy",
        ).stdout
        if "changed" not in out or "nocopy" not in out:
            raise E2EFailure(f"{daemon.name}: committed container printed {out!r}")
        count += 2
    return count


# -- layer comparison -------------------------------------------------------------------------


def layer_listing(tar: tarfile.TarFile) -> list[tuple[object, ...]]:
    """Name, type, mode, uid, gid, size, link, device, xattrs and data sha256 per member."""
    rows = []
    for member in tar:
        digest = ""
        if member.isreg():
            f = tar.extractfile(member)
            assert f is not None
            h = hashlib.sha256()
            while block := f.read(1 << 20):
                h.update(block)
            digest = h.hexdigest()
        xattrs = sorted(
            (k, v) for k, v in member.pax_headers.items() if k.startswith("SCHILY.xattr.")
        )
        rows.append(
            (
                member.name,
                member.type,
                member.mode,
                member.uid,
                member.gid,
                member.size,
                member.linkname,
                member.devmajor,
                member.devminor,
                tuple(xattrs),
                digest,
            )
        )
    return sorted(rows)


def saved_layers(daemon: Daemon, tag: str, workdir: Path) -> list[list[tuple[object, ...]]]:
    """`docker save` TAG; check each layer.tar against its diff_id; list each layer."""
    archive = workdir / f"save-{daemon.name}.tar"
    daemon.docker("save", "-o", archive, tag, timeout=600)
    listings = []
    with tarfile.open(archive) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = json.load(outer.extractfile(manifest[0]["Config"]))  # type: ignore[arg-type]
        diff_ids = config["rootfs"]["diff_ids"]
        layers = manifest[0]["Layers"]
        if len(layers) != len(diff_ids):
            raise E2EFailure(
                f"{daemon.name}: {tag} has {len(layers)} layers, {len(diff_ids)} diff_ids"
            )
        for path, diff_id in zip(layers, diff_ids, strict=True):
            data = outer.extractfile(path)
            assert data is not None
            h = hashlib.sha256()
            while block := data.read(1 << 20):
                h.update(block)
            if f"sha256:{h.hexdigest()}" != diff_id:
                raise E2EFailure(
                    f"{daemon.name}: layer {path} of {tag} reads back with sha256 "
                    f"{h.hexdigest()}, not its diff_id {diff_id}"
                )
            with tarfile.open(fileobj=outer.extractfile(path)) as inner:
                listings.append(layer_listing(inner))
        listings_ids = diff_ids
    archive.unlink()
    return [[("diff_id", listings_ids[0])], *listings]


def compare_saves(fuse: Daemon, plain: Daemon, tag: str, workdir: Path) -> str:
    a = saved_layers(fuse, tag, workdir)
    b = saved_layers(plain, tag, workdir)
    if a[0] != b[0]:
        raise E2EFailure(f"the imported base layer differs: {a[0]} on buildatfs, {b[0]} on disk")
    if len(a) != len(b):
        raise E2EFailure(f"{tag}: {len(a) - 1} layers on buildatfs, {len(b) - 1} on disk")
    members = 0
    for index, (left, right) in enumerate(zip(a[1:], b[1:], strict=True)):
        if left != right:
            only_left = sorted(set(left) - set(right))[:5]
            only_right = sorted(set(right) - set(left))[:5]
            raise E2EFailure(
                f"{tag} layer {index} differs; buildatfs only: {only_left}; disk only: {only_right}"
            )
        members += len(left)
    return f"{len(a) - 1} layers, {members} members equal"


# -- measurements -----------------------------------------------------------------------------


def du_bytes(path: Path) -> tuple[int, int]:
    """(apparent bytes `du -sbx`, allocated bytes `du -sx -B1`) of PATH."""
    apparent = int(run(["du", "-sbx", path]).stdout.split()[0])
    allocated = int(run(["du", "-sx", "-B1", path]).stdout.split()[0])
    return apparent, allocated


def fuse_stats(target: Path) -> dict[str, float]:
    return json.loads(buildatfs("stats", "--json", target).stdout)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Results:
    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, key: str, value: object) -> None:
        self.rows.append((key, str(value)))

    def print(self) -> None:
        width = max(len(k) for k, _ in self.rows)
        print("\n== buildatfs docker e2e summary ==")
        for key, value in self.rows:
            print(f"{key.ljust(width)} | {value}")


@contextmanager
def workspace(requested: Path | None, keep: bool) -> Iterator[tuple[Path, Path]]:
    """The work directory (data) and a short run directory (sockets, exec-roots)."""
    workdir = requested or Path(tempfile.mkdtemp(prefix="buildatfs-e2e-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="bfe2e-", dir="/tmp"))  # unix paths stay short
    try:
        yield workdir.resolve(), run_dir
    finally:
        for base in (run_dir, workdir):
            for point in mounts_under(base):  # netns or overlay mounts a killed dockerd left
                run(["umount", "-l", point], check=False)
        shutil.rmtree(run_dir, ignore_errors=True)
        if keep:
            say(f"Kept the work directory {workdir}.")
        elif mounts_under(workdir):
            say(f"Not removing {workdir}: something is still mounted below it.")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def e2e(args: argparse.Namespace, workdir: Path, run_dir: Path, results: Results) -> None:
    started = time.monotonic()
    tar_path = rootfs_tar(args.cache)
    store, mountpoint = workdir / "store", workdir / "mnt"
    mountpoint.mkdir()
    buildatfs("init", store)
    buildatfs("mount", store, mountpoint)
    daemons = [
        Daemon(
            "buildatfs", mountpoint / "docker", run_dir / "f", workdir / "dockerd-buildatfs.log"
        ),
        Daemon("disk", workdir / "disk-docker", run_dir / "d", workdir / "dockerd-disk.log"),
    ]
    fuse, plain = daemons
    try:
        for d in daemons:
            d.start()
        drivers = {
            d.name: d.docker("info", "--format", "{{.Driver}}").stdout.strip() for d in daemons
        }
        say(f"Both dockerds answer; storage drivers {drivers}.")
        results.add("storage driver on buildatfs", drivers["buildatfs"])
        results.add("storage driver on disk", drivers["disk"])
        if drivers["buildatfs"] != "overlay2":
            raise E2EFailure(
                f"dockerd on buildatfs uses {drivers['buildatfs']!r}, not overlay2:\n"
                + fuse.log_tail()
            )

        images = image_plans(args.quick)
        make_contexts(workdir / "context", images)
        timings = {}
        for d in daemons:
            t0 = time.monotonic()
            d.docker("import", "-", BASE_IMAGE, stdin=tar_path, timeout=900)
            t1 = time.monotonic()
            say(f"  {d.name}: imported the base image in {t1 - t0:.1f} s")
            build_images(d, images, workdir / "context")
            timings[d.name] = (t1 - t0, time.monotonic() - t1)
        results.add("images built (each daemon)", f"{len(images)} + base")
        for d in daemons:
            imp, build = timings[d.name]
            results.add(f"import / builds on {d.name}", f"{imp:.1f} s / {build:.1f} s")

        ran = sum(run_containers(d, images, args.quick) for d in daemons)
        results.add("containers run (both daemons)", ran)

        compared = compare_saves(fuse, plain, "e2e/data:1", workdir)
        say(f"docker save e2e/data:1: {compared}")
        results.add("docker save e2e/data:1", compared)

        apparent, allocated = du_bytes(plain.data_root)
        stats = fuse_stats(mountpoint)
        physical = stats["stored_bytes"] + stats["metadata_bytes"]
        results.add("disk data-root, du -sbx (apparent)", f"{apparent} ({human(apparent)})")
        results.add("disk data-root, du -sx -B1 (allocated)", f"{allocated} ({human(allocated)})")
        results.add(
            "buildatfs logical_bytes",
            f"{stats['logical_bytes']:.0f} ({human(stats['logical_bytes'])})",
        )
        results.add(
            "buildatfs unique_bytes",
            f"{stats['unique_bytes']:.0f} ({human(stats['unique_bytes'])})",
        )
        results.add(
            "buildatfs stored_bytes",
            f"{stats['stored_bytes']:.0f} ({human(stats['stored_bytes'])})",
        )
        if "dead_bytes" in stats:  # pack bytes no chunk uses any more, until gc
            results.add(
                "buildatfs dead_bytes (in stored)",
                f"{stats['dead_bytes']:.0f} ({human(stats['dead_bytes'])})",
            )
        results.add(
            "buildatfs metadata_bytes",
            f"{stats['metadata_bytes']:.0f} ({human(stats['metadata_bytes'])})",
        )
        results.add(
            "buildatfs ratio logical/stored",
            f"{stats['overall_ratio']:.2f}x "
            f"(dedup {stats['dedup_ratio']:.2f}x, compression {stats['compression_ratio']:.2f}x)",
        )
        results.add("ratio disk allocated/(stored+metadata)", f"{allocated / physical:.2f}x")

        for d in daemons:
            tags = [i.tag for i in images] + [BASE_IMAGE]
            if not args.quick:
                tags.append("e2e/committed:1")
            d.docker("rmi", *tags)
            d.docker("system", "prune", "-af", "--volumes")
            left = d.docker("images", "-aq").stdout.split()
            if left:
                raise E2EFailure(f"{d.name}: images left after prune: {left}")
        after = fuse_stats(mountpoint)
        results.add(
            "after rmi + prune: buildatfs logical/stored/dead",
            f"{human(after['logical_bytes'])} / {human(after['stored_bytes'])} / "
            f"{human(after.get('dead_bytes', 0))}",
        )
        results.add("after rmi + prune: disk du -sbx", human(du_bytes(plain.data_root)[0]))
    finally:
        for d in daemons:
            d.stop()
        leftovers = (
            mounts_under(mountpoint)[:-1] if fstype_of(mountpoint) else mounts_under(mountpoint)
        )
        for point in leftovers:
            say(f"Unmounting {point}, left behind by dockerd.")
            run(["umount", point], check=False)
        if fstype_of(mountpoint) == "fuse.buildatfs":
            buildatfs("umount", mountpoint, timeout=900)
    proc = buildatfs("fsck", store, timeout=1800, check=False)
    results.add("buildatfs fsck after unmount", f"exit {proc.returncode}")
    if proc.returncode != 0:
        raise E2EFailure(
            f"buildatfs fsck {store} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    log = (store / "buildatfs.log").read_text(errors="replace")
    problems = [
        line
        for line in log.splitlines()
        if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|^Traceback", line)
    ]
    results.add("warnings/errors in buildatfs.log", len(problems))
    if problems:
        raise E2EFailure("buildatfs.log has warnings or errors:\n" + "\n".join(problems[:20]))
    results.add("total time", f"{time.monotonic() - started:.0f} s")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 images and fewer containers")
    p.add_argument(
        "--workdir",
        type=Path,
        help="where the store, mount and disk data-root go "
        "(default: a new directory under /var/tmp)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help="where the rootfs tar is cached (default: $BUILDATFS_E2E_CACHE or %(default)s)",
    )
    return p.parse_args(argv)


def preflight() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root")
    for path in (DOCKERD, DOCKER, "/dev/fuse"):
        if not os.path.exists(path):
            problems.append(f"{path} is missing")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is missing (apt-get install fuse3)")
    if problems:
        raise E2EFailure("cannot run: " + "; ".join(problems))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = Results()
    try:
        preflight()
        if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
            raise E2EFailure(f"--workdir {args.workdir} is not empty")
        with workspace(args.workdir, args.keep) as (workdir, run_dir):
            say(f"Work directory {workdir}; sockets and exec-roots in {run_dir}.")
            e2e(args, workdir, run_dir, results)
    except E2EFailure as exc:
        if results.rows:
            results.print()
        print(f"docker_e2e: FAILED: {exc}", file=sys.stderr)
        return 1
    results.print()
    print("docker_e2e: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
