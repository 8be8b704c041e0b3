"""The mount(8) helper ``mount.fuse.buildatfs``.

mount(8) runs ``/sbin/mount.fuse.buildatfs STORE MOUNTPOINT [-sfnv] [-o OPTIONS]``
for ``mount -t fuse.buildatfs STORE MOUNTPOINT`` and for an /etc/fstab line such as::

    /var/lib/buildatfs/docker  /var/lib/docker  fuse.buildatfs  defaults,nofail  0  0

The helper drops the options that only mean something to mount(8) and systemd
(see `USERSPACE_OPTIONS`) and runs ``buildatfs mount -o REST STORE MOUNTPOINT``,
which returns once the mount answers.

There is no umount helper: umount(8) looks one up by the kernel's type, which
is plain ``fuse`` for every FUSE filesystem, so it would never be called.
umount(8) returns once the kernel has detached the mount, while the daemon
may still be committing; ``buildatfs umount`` also waits for that.

Exit codes follow mount(8): 0 success, 1 incorrect invocation, 32 the mount
failed (buildatfs has printed why on stderr).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_FAILURE = 32

# Options for mount(8), fstab and systemd, never for the filesystem. `x-*`
# options are userspace-only by convention (x-systemd.*, x-gvfs-*, ...).
USERSPACE_OPTIONS = frozenset(
    {
        "defaults",
        "auto",
        "noauto",
        "nofail",
        "_netdev",
        "user",
        "users",
        "nouser",
        "owner",
        "group",
        "rw",
    }
)
USERSPACE_PREFIXES = ("x-", "comment=")


@dataclass
class MountRequest:
    """What mount(8) asked for, after the userspace options are gone."""

    store: str
    mountpoint: str
    options: list[str] = field(default_factory=list)
    fake: bool = False
    verbose: bool = False


class UsageError(Exception):
    """mount(8) or a user called the helper with arguments it cannot take."""


def filter_options(text: str) -> list[str]:
    """Return the filesystem options in *text*, a comma separated ``-o`` value.

    Empty items and the options in `USERSPACE_OPTIONS` or starting with one of
    `USERSPACE_PREFIXES` are dropped; the rest keep their order.
    """
    kept = []
    for option in text.split(","):
        option = option.strip()
        if not option or option in USERSPACE_OPTIONS:
            continue
        if option.startswith(USERSPACE_PREFIXES):
            continue
        kept.append(option)
    return kept


def parse_mount_args(argv: Sequence[str]) -> MountRequest:
    """Parse the arguments mount(8) gives a helper; raises UsageError.

    Accepted: two positional arguments (STORE MOUNTPOINT), ``-o OPTIONS``
    (also ``-oOPTIONS``, and more than once), ``-t TYPE`` (ignored), and the
    flags -s (sloppy: ignored), -n (no mtab: ignored), -f (fake), -v (verbose).
    """
    positional: list[str] = []
    options: list[str] = []
    request = MountRequest("", "")
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-o", "-t"):
            if not args:
                raise UsageError(f"option {arg} needs a value")
            value = args.pop(0)
            if arg == "-o":
                options += filter_options(value)
        elif arg.startswith("-o") and len(arg) > 2:
            options += filter_options(arg[2:])
        elif arg.startswith("-") and len(arg) > 1 and arg != "--":
            for flag in arg[1:]:
                if flag == "f":
                    request.fake = True
                elif flag == "v":
                    request.verbose = True
                elif flag not in "sn":
                    raise UsageError(f"unknown option -{flag}")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise UsageError("expected STORE and MOUNTPOINT")
    request.store, request.mountpoint = positional
    request.options = options
    return request


def mount_command(request: MountRequest) -> list[str]:
    """The ``buildatfs`` arguments (without the program) that perform *request*."""
    argv = ["mount"]
    if request.options:
        argv += ["-o", ",".join(request.options)]
    return [*argv, request.store, request.mountpoint]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mount.fuse.buildatfs``; returns a mount(8) exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        request = parse_mount_args(args)
    except UsageError as exc:
        print(f"mount.fuse.buildatfs: {exc}", file=sys.stderr)
        print("usage: mount.fuse.buildatfs STORE MOUNTPOINT [-sfnv] [-o OPTIONS]", file=sys.stderr)
        return EXIT_USAGE
    command = mount_command(request)
    if request.verbose or request.fake:
        print("mount.fuse.buildatfs: buildatfs " + " ".join(command))
    if request.fake:
        return EXIT_OK
    return _run_buildatfs(command)


def _run_buildatfs(argv: list[str]) -> int:
    """Run the buildatfs CLI in this process; map its failures to exit 32."""
    from buildatfs import cli

    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse: a value mount(8) passed on is not valid
        code = exc.code if isinstance(exc.code, int) else 1
    return EXIT_OK if code == 0 else EXIT_FAILURE
