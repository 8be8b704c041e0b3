"""The systemd units in systemd/ and the mount(8) helper `mount.fuse.buildatfs`.

The units are checked with `systemd-analyze verify` inside a throwaway root (a copy of the
host's unit directory, our units and drop-ins installed and enabled as `systemctl enable`
would, and stand-ins for the programs they run), so that nothing on the host changes. The
template service's ExecStart and ExecStop lines are then run for real, with a notify socket.

mount(8) looks for helpers only in /sbin, /sbin/fs.d and /sbin/fs, never on PATH, so the
helper tests install a two-line /sbin/mount.fuse.buildatfs wrapper around this checkout for
the test and remove it afterwards. If a mount.fuse.buildatfs is already installed there
(tools/setup.sh links it), that one is tested instead and left alone.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_helpers import (
    LIVE_MOUNTS,
    REPO,
    Mount,
    cli_env,
    describe,
    finish_mount,
    is_mounted,
    read_bytes,
    run_cli,
    write_bytes,
)

from buildatfs import mounthelper

UNITS = REPO / "systemd"
UNIT_FILES = ["var-lib-docker.mount", "buildatfs@.service"]
DROP_INS = ["docker.service.d/buildatfs.conf", "containerd.service.d/buildatfs.conf"]
HELPER = Path("/sbin/mount.fuse.buildatfs")
HOST_UNIT_DIR = Path("/usr/lib/systemd/system")

# Stand-ins for docker.service and containerd.service when docker.io is not installed.
STAND_IN = "[Unit]\nDescription=stand-in\n[Service]\nExecStart=/usr/bin/true\n"


# -- option parsing ---------------------------------------------------------------------------


def test_fstab_options_keep_only_filesystem_options() -> None:
    text = "defaults,noauto,nofail,_netdev,x-systemd.requires=docker.socket,"
    text += "x-systemd.mount-timeout=5min,comment=x,user,rw,ro,nodev,max_read=131072"
    assert mounthelper.filter_options(text) == ["ro", "nodev", "max_read=131072"]


def test_mount_args_as_mount8_passes_them() -> None:
    request = mounthelper.parse_mount_args(
        [
            "/srv/store",
            "/var/lib/docker",
            "-n",
            "-o",
            "noauto,nofail,x-systemd.requires=a,ro",
            "-s",
            "-t",
            "fuse.buildatfs",
        ]
    )
    assert (request.store, request.mountpoint) == ("/srv/store", "/var/lib/docker")
    assert request.options == ["ro"]
    assert not request.fake and not request.verbose
    assert mounthelper.mount_command(request) == [
        "mount",
        "-o",
        "ro",
        "/srv/store",
        "/var/lib/docker",
    ]


def test_mount_args_joined_o_repeated_o_and_flags() -> None:
    request = mounthelper.parse_mount_args(["-fv", "-odefaults,dev", "s", "m", "-o", "suid"])
    assert request.options == ["dev", "suid"]
    assert request.fake and request.verbose
    only_userspace = mounthelper.parse_mount_args(["s", "m", "-o", "defaults,noauto"])
    assert mounthelper.mount_command(only_userspace) == ["mount", "s", "m"]


@pytest.mark.parametrize(
    "argv", [[], ["only-store"], ["a", "b", "c"], ["a", "b", "-o"], ["a", "b", "-x"]]
)
def test_bad_invocation_exits_1(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert mounthelper.main(argv) == 1
    assert "usage: mount.fuse.buildatfs" in capsys.readouterr().err


def test_fake_mount_prints_and_does_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert mounthelper.main(["-f", "/no/store", "/no/mnt", "-o", "nofail,ro"]) == 0
    out = capsys.readouterr().out
    assert out == "mount.fuse.buildatfs: buildatfs mount -o ro /no/store /no/mnt\n"


# -- the units --------------------------------------------------------------------------------


def exec_paths(unit_text: str) -> set[str]:
    """Absolute program paths in the Exec*= lines of a unit (prefixes like - and @ dropped)."""
    paths = set()
    for line in unit_text.splitlines():
        key, _, value = line.partition("=")
        if key.strip().startswith("Exec") and value.strip():
            program = shlex.split(value)[0].lstrip("-@:+!")
            if program.startswith("/"):
                paths.add(program)
    return paths


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A root with the host's units, ours installed and enabled, and stub programs."""
    root = tmp_path / "root"
    shutil.copytree(HOST_UNIT_DIR, root / HOST_UNIT_DIR.relative_to("/"), symlinks=True)
    etc = root / "etc/systemd/system"
    for name in UNIT_FILES + DROP_INS:
        (etc / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(UNITS / name, etc / name)
    units = root / HOST_UNIT_DIR.relative_to("/")
    for name in ("docker.service", "containerd.service"):
        if not (units / name).exists():
            (units / name).write_text(STAND_IN)
    programs = set()
    for path in [
        *(etc / n for n in UNIT_FILES),
        units / "docker.service",
        units / "containerd.service",
    ]:
        programs |= exec_paths(path.read_text())
    for program in programs:  # verify checks that each program exists and is executable
        stub = root / program.lstrip("/")
        if not stub.exists():
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\nexit 0\n")
            stub.chmod(0o755)
    return root


def test_units_verify_cleanly(unit_root: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    for unit in ["var-lib-docker.mount", "buildatfs@var-lib-containerd.service"]:
        enable = subprocess.run(
            ["systemctl", f"--root={unit_root}", "enable", unit],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert enable.returncode == 0, describe(enable)
    etc = unit_root / "etc/systemd/system"
    for wanting in ("docker.service", "containerd.service"):
        links = sorted(p.name for p in (etc / f"{wanting}.requires").iterdir())
        assert links == ["buildatfs@var-lib-containerd.service", "var-lib-docker.mount"]

    verify = subprocess.run(
        [
            "systemd-analyze",
            f"--root={unit_root}",
            "verify",
            "var-lib-docker.mount",
            "buildatfs@var-lib-containerd.service",
            "docker.service",
            "containerd.service",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # Problems in a unit (unknown keys, bad values) are only printed; any output fails.
    assert verify.returncode == 0 and not verify.stdout + verify.stderr, describe(verify)


def test_units_say_what_they_must() -> None:
    mount = (UNITS / "var-lib-docker.mount").read_text()
    for line in [
        "What=/var/lib/buildatfs/docker",
        "Where=/var/lib/docker",
        "Type=fuse.buildatfs",
        "Before=docker.service containerd.service",
        "RequiredBy=docker.service containerd.service",
    ]:
        assert line in mount.splitlines()
    service = (UNITS / "buildatfs@.service").read_text()
    for line in ["Type=notify", "Before=docker.service containerd.service"]:
        assert line in service.splitlines()
    assert "RequiresMountsFor=/var/lib/docker" in (UNITS / DROP_INS[0]).read_text()
    assert (
        "RequiresMountsFor=/var/lib/docker /var/lib/containerd" in (UNITS / DROP_INS[1]).read_text()
    )


def unit_command(key: str, store_root: Path, mountpoint: Path) -> list[str]:
    """buildatfs@.service's KEY= line for MOUNTPOINT, with this checkout's CLI."""
    escaped = subprocess.run(
        ["systemd-escape", "--path", str(mountpoint)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    text = (UNITS / "buildatfs@.service").read_text()
    line = next(v for k, _, v in (li.partition("=") for li in text.splitlines()) if k == key)
    line = line.replace("/var/lib/buildatfs/", f"{store_root}/")
    argv = [a.replace("%i", escaped).replace("%f", str(mountpoint)) for a in shlex.split(line)]
    assert argv[0] == "/usr/local/bin/buildatfs", argv
    return [sys.executable, "-m", "buildatfs", *argv[1:]]


def test_template_service_commands(tmp_path: Path) -> None:
    """ExecStart announces READY=1 once mounted; ExecStop returns after the daemon exited."""
    if shutil.which("systemd-escape") is None:
        pytest.skip("systemd-escape is not installed (Debian package systemd)")
    mountpoint = tmp_path / "var lib" / "containerd"
    mountpoint.mkdir(parents=True)
    store_root = tmp_path / "stores"
    start = unit_command("ExecStart", store_root, mountpoint)
    store = Path(start[-2])
    assert store.parent == store_root and "containerd" in store.name
    proc = run_cli("init", store)
    assert proc.returncode == 0, describe(proc)

    mnt = Mount(store, mountpoint)
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(60)
        env = dict(cli_env(), NOTIFY_SOCKET=str(notify))
        with open(tmp_path / "daemon.out", "wb") as out:
            daemon = subprocess.Popen(
                start,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        try:
            message = sock.recv(4096)
            assert b"READY=1" in message.split(b"\n")
            assert is_mounted(mountpoint)
            mnt.pid = daemon.pid
            LIVE_MOUNTS.add(mnt)
            write_bytes(mountpoint / "f", b"through the unit", fsync=True)

            stop = subprocess.run(
                unit_command("ExecStop", store_root, mountpoint),
                env=cli_env(),
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
            assert stop.returncode == 0, describe(stop)
            # The lock is released as the daemon closes the store, just before it exits.
            assert daemon.wait(timeout=10) == 0, (tmp_path / "daemon.out").read_text()
            LIVE_MOUNTS.discard(mnt)
            mnt.pid = None
        finally:
            if daemon.poll() is None:
                mnt.force_cleanup()
                daemon.wait(timeout=30)
    mnt.mount()
    try:
        assert read_bytes(mountpoint / "f") == b"through the unit"
    finally:
        finish_mount(mnt)


# -- mount(8) with the helper -----------------------------------------------------------------


@pytest.fixture
def mount_helper() -> Iterator[Path]:
    """/sbin/mount.fuse.buildatfs: the installed one, or a wrapper removed afterwards."""
    if HELPER.exists():
        yield HELPER
        return
    HELPER.write_text(
        "#!/bin/sh\n"
        f"PYTHONPATH={shlex.quote(str(REPO))} exec {shlex.quote(sys.executable)} "
        "-c 'import sys; from buildatfs.mounthelper import main; sys.exit(main())' \"$@\"\n"
    )
    HELPER.chmod(0o755)
    try:
        yield HELPER
    finally:
        HELPER.unlink()


@pytest.fixture
def helper_mount(tmp_path: Path) -> Iterator[Mount]:
    """A fresh, unmounted store; torn down by unmount, fsck (exit 0) and the log check."""
    store = tmp_path / "store"
    proc = run_cli("init", store)
    assert proc.returncode == 0, describe(proc)
    (tmp_path / "mnt").mkdir()
    mnt = Mount(store, tmp_path / "mnt")
    try:
        yield mnt
    finally:
        finish_mount(mnt)


def mount8(mnt: Mount, options: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["mount", "-t", "fuse.buildatfs", "-o", options, str(mnt.store), str(mnt.mountpoint)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode == 0 and is_mounted(mnt.mountpoint):
        mnt.pid = mnt.daemon_pid()
        LIVE_MOUNTS.add(mnt)
    return proc


@pytest.mark.fuse
def test_mount8_write_umount_remount_read(mount_helper: Path, helper_mount: Mount) -> None:
    mnt = helper_mount
    fstab_options = "defaults,noauto,nofail,x-systemd.requires=docker.socket,comment=t"
    proc = mount8(mnt, fstab_options)
    assert proc.returncode == 0, describe(proc)
    assert is_mounted(mnt.mountpoint)
    data = os.urandom(300_000)
    write_bytes(mnt.mountpoint / "file", data)
    (mnt.mountpoint / "dir").mkdir()

    mnt.umount()  # buildatfs umount: returns after the daemon has exited

    again = mount8(mnt, "defaults")
    assert again.returncode == 0, describe(again)
    assert read_bytes(mnt.mountpoint / "file") == data
    assert (mnt.mountpoint / "dir").is_dir()


@pytest.mark.fuse
def test_mount8_failures_exit_32(mount_helper: Path, helper_mount: Mount, tmp_path: Path) -> None:
    mnt = helper_mount
    not_a_store = tmp_path / "empty"
    not_a_store.mkdir()
    bad = subprocess.run(
        ["mount", "-t", "fuse.buildatfs", str(not_a_store), str(mnt.mountpoint)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 32, describe(bad)
    assert not is_mounted(mnt.mountpoint)

    assert mount8(mnt, "defaults").returncode == 0
    other = tmp_path / "other"
    other.mkdir()
    busy = subprocess.run(
        ["mount", "-t", "fuse.buildatfs", str(mnt.store), str(other)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert busy.returncode == 32, describe(busy)
    assert not is_mounted(other)
