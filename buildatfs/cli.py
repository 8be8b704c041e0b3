"""The ``buildatfs`` command line: thin verbs over the package.

Exit codes (besides those of ``fsck``, which follow fsck(8)):

  0  success
  1  operation failed (cannot mount, unmount refused because busy, ...)
  2  usage error: bad arguments, not a store, not a buildatfs mount point
  3  the store is already mounted (in use by another process)
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from buildatfs import __version__
from buildatfs.errors import UserError

log = logging.getLogger("buildatfs")


class _Parser(argparse.ArgumentParser):
    usage_exit = 2

    def error(self, message: str) -> None:
        """Print a usage error as one line and exit (2; 16 for fsck, as in fsck(8))."""
        self.exit(self.usage_exit, f"buildatfs: {message} (see `{self.prog} --help`)\n")


def _path(text: str) -> Path:
    """A path argument; an empty one would silently mean the current directory."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path names nothing")
    return Path(text)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="buildatfs",
        description="A deduplicating, compressing FUSE filesystem for container storage.",
    )
    p.add_argument("--version", action="version", version=f"buildatfs {__version__}")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("init", help="create a store")
    s.add_argument("store", type=_path)

    s = sub.add_parser("mount", help="mount a store")
    s.add_argument("store", type=_path)
    s.add_argument("mountpoint", type=_path)
    s.add_argument("--foreground", "-f", action="store_true", help="stay attached")
    s.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        help="extra FUSE mount options, comma separated",
    )
    s.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    s.add_argument("--log", type=_path, help=argparse.SUPPRESS)

    s = sub.add_parser("umount", help="unmount, after everything is committed")
    s.add_argument("mountpoint", type=_path)

    s = sub.add_parser(
        "stats",
        help="what dedup and compression save",
        description="Sizes, dedup and compression of a store, read from its index (works "
        "while mounted). Also a table per top-level entry of the mount and, when "
        "the store holds a Docker data-root, per image; these scan every extent "
        "(a few seconds per million): --totals skips them.",
    )
    s.add_argument("target", type=_path, help="a store or a mount point")
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="everything as JSON")
    fmt.add_argument("--prometheus", action="store_true", help="Prometheus text exposition format")
    s.add_argument(
        "--totals",
        action="store_true",
        help="only the store-wide counters (instant; no per-entry or per-image rows)",
    )

    s = sub.add_parser(
        "scrub",
        help="read back and verify every chunk",
        description="Verify every chunk (decode and check its blake3 id) at a bounded rate, and "
        "name every file that uses a damaged one. Exit 0: no damage; 1: damage "
        "found; 2: usage error.",
    )
    s.add_argument("target", type=_path, help="a mount point or a store")
    s.add_argument(
        "--rate",
        type=_byte_rate,
        default=100 * 1024 * 1024,
        metavar="BYTES_PER_S",
        help="stored bytes read per second at most; suffixes K, M, G; 0: no limit (default 100M)",
    )
    s.add_argument("--json", action="store_true")

    s = sub.add_parser(
        "estimate",
        help="predict what a store would hold for a directory",
        description="Read every regular file below DIR (no symlinks followed, no other file "
        "systems entered, hard links once), chunk, hash and compress it as a store "
        "would, and print the predicted sizes. Writes nothing.",
    )
    s.add_argument("directory", type=_path)
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("gc", help="give back the space of deleted data now")
    s.add_argument("target", type=_path, help="a store or a mount point")
    s.add_argument(
        "--compact",
        action="store_true",
        help="also recompress every cold pack now (slow: about 5 MiB/s per core)",
    )

    s = sub.add_parser("fsck", help="check and repair a store that is not mounted")
    s.usage_exit = 16
    s.add_argument("store", type=_path)
    s.add_argument("--verify-data", action="store_true", help="also re-hash every chunk")
    s.add_argument("--no-repair", action="store_true", help="only report")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "fsck":  # errors in fsck's options reach the top-level parser
        parser.usage_exit = 16
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        return _COMMANDS[args.command](args)
    except UserError as exc:
        print(f"buildatfs: {exc}", file=sys.stderr)
        return 16 if args.command == "fsck" and exc.exit_code == 2 else exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `buildatfs stats | head`
        sys.stderr.close()
        return 0


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    log_path = getattr(args, "log", None)
    if log_path is not None:
        logging.basicConfig(filename=log_path, level=level, format=fmt)
    else:
        logging.basicConfig(
            level=level if args.debug else logging.WARNING, format="buildatfs: %(message)s"
        )


def cmd_init(args: argparse.Namespace) -> int:
    from buildatfs.store import Store

    Store.init(args.store.absolute())
    print(f"Created a store at {args.store.absolute()}.")
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from buildatfs import daemon
    from buildatfs.store import Store

    store = args.store.absolute()
    mountpoint = args.mountpoint.resolve()  # the kernel records the resolved path
    _check_mountpoint(mountpoint)
    if store.resolve() == mountpoint.resolve() or mountpoint.resolve() in store.resolve().parents:
        raise UserError(f"the store {store} must not be inside its mount point {mountpoint}.")
    Store.open(store, readonly=True).close()  # a clear error for a non-store
    options = [o for group in args.options for o in group.split(",") if o]
    if args.foreground:
        daemon.serve(store, mountpoint, options, daemon.ReadyPipe(args.ready_fd))
        return 0
    return _mount_in_background(store, mountpoint, options, args.debug)


def _check_mountpoint(mountpoint: Path) -> None:
    try:
        if not mountpoint.is_dir():
            raise UserError(f"{mountpoint} is not a directory.")
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise UserError(
                f"{mountpoint} is a dead mount; run `buildatfs umount {mountpoint}` first.",
                exit_code=1,
            ) from None
        raise
    store = _find_mount(mountpoint)
    if store is not None:
        if not _daemon_running(store):  # the kernel may still answer stat() from its cache
            raise UserError(
                f"{mountpoint} is a dead mount; run `buildatfs umount {mountpoint}` first.",
                exit_code=1,
            )
        raise UserError(f"{mountpoint} is already a buildatfs mount point.", exit_code=3)


def _daemon_running(store: Path) -> bool:
    """True if a process holds the store's lock (a mount daemon serves it)."""
    try:
        fd = os.open(store / "lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _mount_in_background(store: Path, mountpoint: Path, options: list[str], debug: bool) -> int:
    read_fd, write_fd = os.pipe()
    cmd = [
        sys.executable,
        "-m",
        "buildatfs",
        *(["--debug"] if debug else []),
        "mount",
        "--foreground",
        "--ready-fd",
        str(write_fd),
        "--log",
        str(store / "buildatfs.log"),
    ]
    for option in options:
        cmd += ["-o", option]
    cmd += [str(store), str(mountpoint)]
    with open(store / "buildatfs.log", "ab") as logfile:
        child = subprocess.Popen(
            cmd,
            pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            start_new_session=True,
        )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        line = pipe.readline().decode().strip()
    if not line:
        code = child.wait()
        raise UserError(
            f"the mount daemon exited with status {code}; see {store / 'buildatfs.log'}",
            exit_code=1,
        )
    code_text, _, message = line.partition(" ")
    if code_text != "0":
        child.wait()
        raise UserError(message, exit_code=int(code_text))
    try:
        os.stat(mountpoint)  # answered by the daemon: the mount is live
    except OSError as exc:
        raise UserError(
            f"the mount at {mountpoint} does not answer ({exc.strerror}); "
            f"see {store / 'buildatfs.log'}",
            exit_code=1,
        ) from None
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = args.mountpoint.resolve()  # the kernel records the resolved path
    store = _find_mount(mountpoint)
    if store is None:
        raise UserError(f"{mountpoint} is not a buildatfs mount point.")
    dead = False
    try:
        os.stat(mountpoint)
    except OSError as exc:
        dead = exc.errno == errno.ENOTCONN
    served = _daemon_running(store)  # (a daemon may hold it and still be dead)
    cmd = ["fusermount3", "-u", *(["-z"] if dead else []), str(mountpoint)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        reason = (
            result.stderr.strip().splitlines()[-1]
            if result.stderr.strip()
            else "fusermount3 failed"
        )
        raise UserError(f"cannot unmount {mountpoint}: {reason}", exit_code=1)
    _wait_for_daemon(store)
    if not served:  # (the daemon was gone already: recovery at the next mount)
        return 0
    from buildatfs.store import Store

    opened = Store.open(store, readonly=True)
    try:
        clean = opened.is_clean()
    finally:
        opened.close()
    if not clean:
        raise UserError(
            f"{mountpoint} is unmounted, but its daemon did not finish cleanly: written data "
            f"may be lost (see {store / 'buildatfs.log'}; `buildatfs fsck {store}` repairs).",
            exit_code=1,
        )
    return 0


def _wait_for_daemon(store: Path) -> None:
    """Block until the daemon holding the store's lock has exited."""
    try:
        fd = os.open(store / "lock", os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        pid = int(os.pread(fd, 32, 0).split()[0])
    except (ValueError, IndexError):
        pid = None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # released when the daemon closes the store
    finally:
        os.close(fd)
    # The process itself ends a moment later; wait for that too (bounded, in
    # case the number was reused by then).
    deadline = time.monotonic() + 30
    while pid and time.monotonic() < deadline:
        try:
            if b"buildatfs" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                break
        except OSError:
            break
        time.sleep(0.02)


def _find_mount(mountpoint: Path) -> Path | None:
    """Return the store mounted at *mountpoint*, from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point, fstype, source = fields[4], fields[sep + 1], fields[sep + 2]
            if fstype == "fuse.buildatfs" and _unescape(point) == str(mountpoint):
                return Path(_unescape(source))
    return None


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape").encode("latin-1").decode()


def cmd_stats(args: argparse.Namespace) -> int:
    from buildatfs import stats

    target = args.target.resolve()
    store = _find_mount(target) or target
    report = stats.collect(store, breakdown=not args.totals)
    if args.prometheus:
        print(stats.render_prometheus(report), end="")
    else:
        print(json.dumps(report, indent=2) if args.json else stats.render(report))
    return 0


def _byte_rate(text: str) -> int:
    """A --rate value: bytes per second, with an optional K, M or G (binary) suffix."""
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    try:
        value = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate such as 50M") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the rate cannot be negative")
    return value


def cmd_scrub(args: argparse.Namespace) -> int:
    from buildatfs import scrub
    from buildatfs.progress import ProgressLine
    from buildatfs.store import Store

    target = args.target.resolve()
    store = Store.open(_find_mount(target) or target, readonly=True)
    line = ProgressLine("Scrubbing", scrub.describe)
    try:
        report = scrub.scrub(store, args.rate, line)
    finally:
        line.done()
        store.close()
    print(json.dumps(scrub.to_json(report), indent=2) if args.json else scrub.render(report))
    return 1 if report.damaged else 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from buildatfs import estimate
    from buildatfs.progress import ProgressLine

    root = args.directory.absolute()
    if not root.is_dir():
        raise UserError(f"{root} is not a directory.")
    line = ProgressLine("Estimating", estimate.describe)
    try:
        result = estimate.estimate(root, progress=line)
    finally:
        line.done()
    print(json.dumps(result.to_json(), indent=2) if args.json else estimate.render(result, root))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:

    target = args.target.resolve()
    store_path = _find_mount(target)
    if store_path is not None:
        try:
            os.statvfs(target)
        except OSError as exc:
            raise UserError(
                f"the mount at {target} does not answer ({exc.strerror}): its daemon is gone. "
                f"Unmount it with `fusermount3 -u {target}`, then run `buildatfs gc` on the store.",
                exit_code=1,
            ) from None
        report = _gc_mounted(store_path, args.compact)
    else:
        report = dataclasses.asdict(_gc_offline(target, args.compact))
    print(
        f"Removed {report['packs_removed']} pack(s), moved {report['chunks_moved']} chunk(s) "
        f"({report['bytes_moved']} bytes), freed {report['freed_bytes']} bytes."
    )
    return 0


def _gc_mounted(store_path: Path, compact: bool) -> dict:
    """Ask the daemon for a full pass (SIGUSR1, or SIGUSR2 to compact too)
    and wait for its report."""
    from buildatfs import gc

    pid = _daemon_pid(store_path)
    if not _daemon_running(store_path) or not _is_mount_daemon(pid):
        raise UserError(
            f"no mount daemon serves {store_path} (the store is in use by another "
            "command, or its mount is dead).",
            exit_code=1,
        )
    before = (gc.read_report(store_path) or {}).get("finished_ns", 0)
    try:
        os.kill(pid, signal.SIGUSR2 if compact else signal.SIGUSR1)
    except ProcessLookupError:
        raise UserError(f"the daemon of {store_path} has exited.", exit_code=1) from None
    while True:
        report = gc.read_report(store_path)
        if report is not None and report["finished_ns"] > before:
            return report
        if not os.path.exists(f"/proc/{pid}"):
            raise UserError("the mount daemon exited during garbage collection.", exit_code=1)
        time.sleep(0.1)


def _gc_offline(store_path: Path, compact_too: bool):
    import trio

    from buildatfs import compact, gc, recovery
    from buildatfs.progress import ProgressLine
    from buildatfs.store import Store

    async def full_pass(store: Store) -> gc.Report:
        report = await gc.run_pass(store, None, 0.0)
        if compact_too:
            line = ProgressLine("Compacting", lambda done: f"pack {done[0]} of {done[1]}")
            try:
                report.add(await compact.Compactor(store).run(None, progress=line))
            finally:
                line.done()
        return report

    store = Store.open(store_path)
    try:
        store.lock()
        if not store.is_clean():
            recovery.recover(store)
        # Unclean while the pass runs: if it is killed, the next mount or
        # fsck removes the copies it made that the index does not name.
        store.set_clean(False)
        report = trio.run(full_pass, store)
        store.set_clean(True)
        return report
    finally:
        store.close()


def _is_mount_daemon(pid: int) -> bool:
    """True if process *pid* is a `buildatfs mount` daemon (not fsck or gc)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"buildatfs" in b" ".join(argv) and b"mount" in argv


def _daemon_pid(store_path: Path) -> int:
    try:
        return int((store_path / "lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        raise UserError(f"cannot tell which process serves {store_path}.", exit_code=1) from None


def cmd_fsck(args: argparse.Namespace) -> int:
    from buildatfs import fsck

    return fsck.main(args.store.absolute(), verify_data=args.verify_data, repair=not args.no_repair)


_COMMANDS = {
    "init": cmd_init,
    "mount": cmd_mount,
    "umount": cmd_umount,
    "stats": cmd_stats,
    "scrub": cmd_scrub,
    "estimate": cmd_estimate,
    "fsck": cmd_fsck,
    "gc": cmd_gc,
}
