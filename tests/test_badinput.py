"""Bad input: damaged, cut and missing packs, a damaged index, hostile names, wrong CLI use.

Damage must show as EIO for the files it touches (never wrong bytes), fsck
must name it and exit 4, and everything else must stay readable. User
mistakes get one line on stderr, no traceback, and a documented exit code.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fuse_helpers import (
    REPO,
    Mount,
    cli_env,
    describe,
    flip_byte,
    is_mounted,
    lazy_unmount,
    pack_files,
    pid_alive,
    random_bytes,
    read_bytes,
    run_cli,
    write_bytes,
)

pytestmark = pytest.mark.fuse

MiB = 1 << 20
EXIT_USAGE, EXIT_FAILED, EXIT_BUSY = 2, 1, 3
FSCK_LEFT, FSCK_OPERATIONAL, FSCK_USAGE = 4, 8, 16


# ---------------------------------------------------------------- damaged packs


def pack_holding(store: Path, needle: bytes) -> tuple[Path, int]:
    """The pack file holding NEEDLE (random data is stored raw) and its offset."""
    for pack in pack_files(store):
        offset = pack.read_bytes().find(needle)
        if offset >= 0:
            return pack, offset
    pytest.fail("the needle is in no pack")


VICTIM = random_bytes(3 * MiB, seed=41)
BYSTANDER = random_bytes(2 * MiB, seed=42)


@pytest.fixture
def two_packs(mount_ctl: Mount) -> Mount:
    """`victim` and `bystander` written by two daemons, so in two packs; unmounted."""
    mount_ctl.fsck_args = ("--verify-data",)
    mount_ctl.fsck_codes = frozenset({FSCK_LEFT})
    mount_ctl.expect_log(r"\b(ERROR|WARNING)\b")
    mount_ctl.mount()
    write_bytes(mount_ctl.mountpoint / "victim", VICTIM, fsync=True)
    mount_ctl.remount()
    write_bytes(mount_ctl.mountpoint / "bystander", BYSTANDER, fsync=True)
    mount_ctl.umount()
    return mount_ctl


DAMAGE: dict[str, Callable[[Path, int], None]] = {
    "flipped-byte": lambda pack, offset: flip_byte(pack, offset + 1000),
    "truncated": lambda pack, offset: os.truncate(pack, offset + 1000),
    "missing": lambda pack, offset: pack.unlink(),
}


def victim_inode(mnt: Mount) -> int:
    mnt.mount()
    inode = os.stat(mnt.mountpoint / "victim").st_ino
    mnt.umount()
    return inode


def assert_eio(path: Path) -> None:
    with pytest.raises(OSError) as exc:
        read_bytes(path)
    assert exc.value.errno == errno.EIO, f"reading {path.name} gave {exc.value!r}, not EIO"


def check_damaged_mount(mnt: Mount, start_intact: bool) -> None:
    mnt.mount()
    root = mnt.mountpoint
    assert_eio(root / "victim")
    if start_intact:
        with open(root / "victim", "rb") as f:  # the undamaged start still reads
            assert f.read(4096) == VICTIM[:4096]
    assert read_bytes(root / "bystander") == BYSTANDER
    assert sorted(os.listdir(root)) == ["bystander", "victim"]
    write_bytes(root / "new", b"still writable", fsync=True)
    assert read_bytes(root / "new") == b"still writable"
    os.unlink(root / "new")
    assert mnt.pid is not None and pid_alive(mnt.pid), "the daemon died"
    mnt.umount()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_pack(two_packs: Mount, damage: str) -> None:
    mnt = two_packs
    inode = victim_inode(mnt)
    pack, offset = pack_holding(mnt.store, VICTIM[2 * MiB : 2 * MiB + 64])
    bystander_pack, _ = pack_holding(mnt.store, BYSTANDER[:64])
    assert pack != bystander_pack
    DAMAGE[damage](pack, offset)

    check_damaged_mount(mnt, start_intact=damage != "missing")
    proc = mnt.fsck("--verify-data")
    assert proc.returncode == FSCK_LEFT, describe(proc)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output
    problem = {"flipped-byte": "damaged", "truncated": "pack 1 ", "missing": "pack 1 is missing"}[
        damage
    ]
    assert problem in proc.stdout, f"fsck does not name the problem: {describe(proc)}"
    if damage != "missing":  # see test_missing_pack_names_the_victim
        assert "victim" in output or f"Inode {inode} " in output, (
            f"fsck does not name the damaged file (victim, inode {inode}): {describe(proc)}"
        )
    # fsck must not "repair" the damage into wrong bytes: still EIO afterwards.
    check_damaged_mount(mnt, start_intact=damage != "missing")
    proc = mnt.fsck("--verify-data")
    assert proc.returncode == FSCK_LEFT, describe(proc)


def test_missing_pack_names_the_victim(two_packs: Mount) -> None:
    """A whole pack gone: fsck should say which files lost data, as for other damage."""
    mnt = two_packs
    inode = victim_inode(mnt)
    pack, _ = pack_holding(mnt.store, VICTIM[:64])
    pack.unlink()
    proc = mnt.fsck()
    assert proc.returncode == FSCK_LEFT, describe(proc)
    output = proc.stdout + proc.stderr
    assert "victim" in output or f"Inode {inode} " in output, (
        f"fsck reports the missing pack but not the file that lost its data: {describe(proc)}"
    )


# ---------------------------------------------------------------- damaged index


def tree_digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def damage_meta_pages(mdb: Path) -> None:
    with open(mdb, "r+b") as f:  # both LMDB meta pages
        f.write(b"\xab" * 8192)


def damage_data_pages(mdb: Path) -> None:
    size = mdb.stat().st_size
    with open(mdb, "r+b") as f:  # every page but the two meta pages
        f.seek(8192)
        f.write(random_bytes(size - 8192, seed=9))


def assert_one_line_error(proc: subprocess.CompletedProcess[str], codes: set[int]) -> None:
    assert proc.returncode in codes, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("buildatfs: "), describe(proc)


@pytest.mark.parametrize(
    "damage", [damage_meta_pages, damage_data_pages], ids=["meta-pages", "data-pages"]
)
def test_damaged_index_is_a_clear_error(mount_ctl: Mount, damage: Callable[[Path], None]) -> None:
    mount_ctl.mount()
    write_bytes(mount_ctl.mountpoint / "file", random_bytes(2 * MiB, seed=5), fsync=True)
    mount_ctl.umount()
    packs_before = tree_digest(mount_ctl.store / "packs")
    backup = mount_ctl.store.parent / "meta-backup"
    shutil.copytree(mount_ctl.store / "meta", backup)
    damage(mount_ctl.store / "meta" / "data.mdb")

    proc = run_cli("mount", mount_ctl.store, mount_ctl.mountpoint)
    try:
        assert_one_line_error(proc, {EXIT_FAILED})
        assert not is_mounted(mount_ctl.mountpoint)
        proc = mount_ctl.fsck()
        assert_one_line_error(proc, {FSCK_OPERATIONAL, FSCK_LEFT})
        assert tree_digest(mount_ctl.store / "packs") == packs_before, "pack files changed"
    finally:
        # Put the index back so that the strict teardown can check the store.
        shutil.rmtree(mount_ctl.store / "meta")
        shutil.copytree(backup, mount_ctl.store / "meta")
        if is_mounted(mount_ctl.mountpoint):
            mount_ctl.force_cleanup()
    mount_ctl.mount()
    assert read_bytes(mount_ctl.mountpoint / "file") == random_bytes(2 * MiB, seed=5)


# ---------------------------------------------------------------- hostile names


HOSTILE_NAMES = [
    b"a" * 255,
    b"\xc3\xa9" * 127 + b"x",  # 255 bytes of UTF-8
    b"new\nline",
    b"\nstarts-with-newline",
    b"\xff\xfe\xfd",
    b"tab\there",
    b"\x01\x02\x1b[31mred",
    b" leading and trailing ",
    b"-rf",
    b"...",
    b"back\\slash",
    b"emoji-\xf0\x9f\x90\xb3",
    b"--",
    b"*?[]{}$`'\"",
]


def name_ops(root: bytes) -> list[tuple[str, str]]:
    """Run the same name operations under ROOT; return (operation, outcome) pairs."""
    results = []

    def attempt(label: str, fn: Callable[[], object]) -> None:
        try:
            fn()
            results.append((label, "ok"))
        except OSError as exc:
            results.append((label, errno.errorcode[exc.errno]))

    def join(*parts: bytes) -> bytes:
        return b"/".join([root, *parts])

    for i, name in enumerate(HOSTILE_NAMES):
        attempt(f"create {i}", lambda n=name: write_bytes(join(n), n))
        attempt(f"setxattr {i}", lambda n=name: os.setxattr(join(n), b"user.x", n))
        attempt(f"mkdir {i}", lambda n=name: os.mkdir(join(n + b".d")))
        attempt(f"rename {i}", lambda n=name: os.rename(join(n + b".d"), join(b"d-" + n[:200])))
    attempt("create 256", lambda: write_bytes(join(b"b" * 256), b""))
    attempt("stat 256", lambda: os.stat(join(b"b" * 256)))
    attempt("mkdir 256", lambda: os.mkdir(join(b"c" * 256)))
    attempt("rename to 256", lambda: os.rename(join(b"a" * 255), join(b"a" * 256)))
    attempt("mkdir ..", lambda: os.mkdir(join(b"..")))
    attempt("mkdir .", lambda: os.mkdir(join(b".")))
    attempt("create ..", lambda: os.open(join(b".."), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    attempt("rename to ..", lambda: os.rename(join(b"-rf"), join(b"..")))
    attempt("unlink ..", lambda: os.unlink(join(b"..")))
    attempt("rmdir .", lambda: os.rmdir(join(b".")))
    attempt("xattr name 255", lambda: os.setxattr(join(b"--"), b"user." + b"n" * 250, b"v"))
    attempt("xattr name 256", lambda: os.setxattr(join(b"--"), b"user." + b"n" * 251, b"v"))
    attempt("symlink 4095", lambda: os.symlink(b"t" * 4095, join(b"long-link")))
    attempt("symlink 4096", lambda: os.symlink(b"t" * 4096, join(b"too-long-link")))
    attempt("symlink ../..", lambda: os.symlink(b"../../../../etc/shadow", join(b"escape")))
    return results


def test_hostile_names_as_on_ext4(mounted: Path, mount_ctl: Mount, tmp_path: Path) -> None:
    reference = tmp_path / "ext4"
    reference.mkdir()
    want = name_ops(os.fsencode(reference))
    got = name_ops(os.fsencode(mounted))
    differ = [(w[0], w[1], g[1]) for w, g in zip(want, got, strict=True) if w != g]
    assert not differ, f"(operation, ext4, buildatfs) that differ: {differ}"
    listing = sorted(os.listdir(os.fsencode(mounted)))
    assert listing == sorted(os.listdir(os.fsencode(reference)))
    mount_ctl.remount()
    assert sorted(os.listdir(os.fsencode(mounted))) == listing
    for name in HOSTILE_NAMES:
        path = os.fsencode(mounted) + b"/" + name
        assert read_bytes(path) == name
        assert os.getxattr(path, b"user.x") == name
    assert os.readlink(os.fsencode(mounted) + b"/long-link") == b"t" * 4095


# ---------------------------------------------------------------- wrong CLI use


# (arguments, wanted exit code); "{store}" is an initialised store, "{mnt}" an
# unmounted directory, "{file}" a regular file, "{tmp}" a directory that is not a store.
CLI_CASES = [
    (["mount", "{tmp}/missing-store", "{mnt}"], EXIT_USAGE),
    (["mount", "{file}", "{mnt}"], EXIT_USAGE),
    (["mount", "{tmp}", "{mnt}"], EXIT_USAGE),
    (["mount", "{store}", "{tmp}/missing-mountpoint"], EXIT_USAGE),
    (["mount", "{store}", "{file}"], EXIT_USAGE),
    (["mount", "{store}"], EXIT_USAGE),
    (["umount", "{mnt}"], EXIT_USAGE),
    (["umount", "{tmp}/missing-mountpoint"], EXIT_USAGE),
    (["umount", "{file}"], EXIT_USAGE),
    (["fsck", "{tmp}/missing-store"], FSCK_USAGE),
    (["fsck", "{file}"], FSCK_USAGE),
    (["fsck"], FSCK_USAGE),
    (["fsck", "--no-such-option", "{store}"], FSCK_USAGE),
    (["init", "{store}"], EXIT_USAGE),
    (["init", "{file}"], EXIT_USAGE),
    (["gc", "{tmp}/missing-store"], EXIT_USAGE),
    (["stats", "{tmp}/missing-store"], EXIT_USAGE),
    (["no-such-command"], EXIT_USAGE),
    ([], EXIT_USAGE),
]


def _case_id(case: object) -> str:
    args = case.values[0] if hasattr(case, "values") else case[0]  # type: ignore[index,union-attr]
    return " ".join(a.replace("{", "").replace("}", "") for a in args) or "no-arguments"


@pytest.mark.parametrize(("args", "code"), CLI_CASES, ids=[_case_id(c) for c in CLI_CASES])
def test_cli_mistake_is_one_line(
    args: list[str], code: int, store: Path, mountpoint: Path, tmp_path: Path
) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("not a store\n")
    names = {"store": store, "mnt": mountpoint, "file": afile, "tmp": tmp_path}
    proc = run_cli(*(a.format(**names) for a in args))
    assert_one_line_error(proc, {code})
    assert not is_mounted(mountpoint)


def test_mount_twice_and_fsck_while_mounted(
    mounted: Path, mount_ctl: Mount, tmp_path: Path
) -> None:
    other = tmp_path / "other-mountpoint"
    other.mkdir()
    proc = run_cli("mount", mount_ctl.store, other)
    assert_one_line_error(proc, {EXIT_BUSY})
    assert not is_mounted(other)
    proc = run_cli("mount", mount_ctl.store, mounted)
    assert_one_line_error(proc, {EXIT_BUSY})
    proc = mount_ctl.fsck()
    assert_one_line_error(proc, {FSCK_OPERATIONAL})
    assert mount_ctl.pid is not None and pid_alive(mount_ctl.pid)


def test_store_inside_its_own_mountpoint_is_refused(tmp_path: Path) -> None:
    """Mounting over the store's own directory hides the store from its daemon.

    Such a daemon deadlocks on itself at its first statvfs or pack listing, so
    if the mount is accepted nothing may touch it: its daemon is killed at once
    (found through /proc, since STORE/lock now lies behind the mount).
    """
    mountpoint = tmp_path / "mnt"
    store = mountpoint / "store"
    proc = run_cli("init", store)
    assert proc.returncode == 0, describe(proc)
    proc = run_cli("mount", store, mountpoint, timeout=60)
    if proc.returncode == 0:
        _kill_daemon_of(store, mountpoint)
        pytest.fail(
            f"mounting {store} on {mountpoint} was accepted; the daemon then "
            "deadlocks on its own mount (statvfs of the store, pack listing)"
        )
    assert_one_line_error(proc, {EXIT_USAGE})


def _kill_daemon_of(store: Path, mountpoint: Path) -> None:
    """The daemon this test started (by pid, from its command line), then the mount."""
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
            if b"--foreground" in argv and argv[-2:] == [
                os.fsencode(store),
                os.fsencode(mountpoint),
            ]:
                os.kill(int(pid_dir.name), 9)
    lazy_unmount(mountpoint)


def test_python_m_and_command_agree() -> None:
    """`python -m buildatfs` is the entry point the tests use; --help works without a store."""
    proc = subprocess.run(
        [sys.executable, "-m", "buildatfs", "--help"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and "fsck" in proc.stdout
