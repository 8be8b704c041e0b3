"""The mount daemon: recover if needed, serve FUSE requests, commit and close.

`serve` runs in the foreground process. `buildatfs mount` without
``--foreground`` starts it as a child in its own session and waits on a pipe
until it reports ready (or an error), so that the command returns only once
the mount answers.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path

import pyfuse3
import trio

from buildatfs import gc, recovery
from buildatfs.errors import UserError
from buildatfs.fs import Operations
from buildatfs.store import Store

log = logging.getLogger(__name__)

DEFAULT_OPTIONS = ("allow_other", "suid", "dev", "default_permissions")
READAHEAD_KB = 1024


def fuse_options(store_path: Path, extra: list[str]) -> set[str]:
    """The FUSE mount options: the defaults, where *extra* may turn one off
    (``nosuid`` removes ``suid``, ``nodev`` removes ``dev``), plus *extra*."""
    options = set(DEFAULT_OPTIONS)
    for option in extra:
        options.discard(option.removeprefix("no"))
    options.update(extra)
    options.add(f"fsname={store_path}")
    options.add("subtype=buildatfs")
    return options


def serve(store_path: Path, mountpoint: Path, extra_options: list[str], ready: ReadyPipe) -> None:
    """Mount *store_path* at *mountpoint* and serve until unmounted.

    Raises UserError for a store that cannot be mounted; reports readiness or
    the error on *ready*.
    """
    try:
        store = Store.open(store_path)
        store.lock()
    except UserError as exc:
        ready.send(exc.exit_code, str(exc))
        raise
    try:
        if not store.is_clean():
            log.warning("%s was not unmounted cleanly; recovering it before mounting.", store_path)
            recovery.recover(store)
        ops = Operations(store)
        try:
            pyfuse3.init(ops, str(mountpoint), fuse_options(store_path, extra_options))
        except RuntimeError as exc:
            message = (
                f"cannot mount at {mountpoint}: {exc} (an unknown -o option? "
                f"libfuse says why in {store_path / 'buildatfs.log'})"
            )
            ready.send(1, message)
            raise UserError(message, exit_code=1) from None
        store.set_clean(False)
        try:
            trio.run(_serve, ops, mountpoint, ready)
        except BaseException:
            pyfuse3.close(unmount=True)
            raise
        pyfuse3.close(unmount=False)
        lost = {inode: d.staged_bytes for inode, d in ops.dirty.items() if d.staged_bytes}
        if lost:
            # (a full disk, say): the bytes were never fsync'ed, but close(2)
            # and the unmount were answered, so say it loudly, and leave the
            # store marked unclean so that `buildatfs umount` fails.
            log.error(
                "Unmounting with %d bytes of %d file(s) that could not be committed (inodes %s); "
                "they are lost.",
                sum(lost.values()),
                len(lost),
                ", ".join(map(str, sorted(lost))),
            )
            return
        ops.purge_unreferenced()
        # Garbage collection or compaction cut short by the unmount leaves
        # copies the index does not name; nothing appends any more.
        for line in recovery.trim_packs(store):
            log.info("At unmount: %s.", line)
        store.set_clean(True)
        served = ", ".join(f"{name} {n}" for name, n in ops.requests.most_common())
        log.info("Requests served: %d (%s).", ops.requests.total(), served or "none")
        log.info("Unmounted %s cleanly.", mountpoint)
    finally:
        store.close()


async def _serve(ops: Operations, mountpoint: Path, ready: ReadyPipe) -> None:
    async with trio.open_nursery() as nursery:  # commits and purges spawned by handlers
        ops.nursery = nursery
        async with trio.open_nursery() as background:
            background.start_soon(ops.maintain)
            background.start_soon(_unmount_on_signal, mountpoint)
            background.start_soon(_announce_ready, ready, ops, mountpoint)
            background.start_soon(_collect_on_signal, ops)
            await pyfuse3.main()
            background.cancel_scope.cancel()
        await ops.commit_all()
    await ops.commit_all()
    await trio.to_thread.run_sync(ops.store.sync_sync)


async def _announce_ready(ready: ReadyPipe, ops: Operations, mountpoint: Path) -> None:
    ready.send(0, "ready")
    notify = os.environ.get("NOTIFY_SOCKET")
    if notify:
        address = "\0" + notify[1:] if notify.startswith("@") else notify
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1\nSTATUS=Mounted", address)
    log.info("Mounted; serving requests.")
    # The kernel sets the readahead when it gets the reply to its INIT request,
    # which goes out after Operations.init() returns.
    await ops.initialized.wait()
    await trio.sleep(0.5)
    _raise_readahead(mountpoint)


def _raise_readahead(mountpoint: Path) -> None:
    """Let the kernel read ahead READAHEAD_KB on this mount instead of 128 KiB.

    pyfuse3 does not pass a readahead size to the kernel, so set the mount's
    backing-device limit: larger sequential reads cost fewer requests. Looks the
    device up in mountinfo, because a stat() of our own mount point would wait
    for this very thread.
    """
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mountpoint):
                device = fields[2]
    try:
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(str(READAHEAD_KB))
    except (OSError, UnboundLocalError) as exc:
        log.info("Cannot raise the readahead of %s (%s); reads stay at 128 KiB.", mountpoint, exc)


async def _collect_on_signal(ops: Operations) -> None:
    """On SIGUSR1 (sent by `buildatfs gc`), run a full pass at full speed; on
    SIGUSR2 (`buildatfs gc --compact`), compact every cold pack too."""
    with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGUSR2) as signals:
        async for signum in signals:
            report = await ops.collect_garbage(None, 0.0, compact_all=signum == signal.SIGUSR2)
            gc.write_report(ops.store, report)


async def _unmount_on_signal(mountpoint: Path) -> None:
    """On SIGTERM or SIGINT, ask the kernel to unmount; the loop then ends."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("Got signal %d; unmounting %s.", signum, mountpoint)
            result = await trio.run_process(
                ["fusermount3", "-u", str(mountpoint)], check=False, capture_stderr=True
            )
            if result.returncode:
                log.warning(
                    "Cannot unmount %s (%s); unmount it when it is no longer busy.",
                    mountpoint,
                    result.stderr.decode().strip(),
                )


class ReadyPipe:
    """The pipe on which a background daemon tells `buildatfs mount` how it went."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def send(self, code: int, message: str) -> None:
        """Send one line, once; later calls do nothing."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.write(fd, f"{code} {message}\n".encode())
        except OSError:
            pass
        os.close(fd)
