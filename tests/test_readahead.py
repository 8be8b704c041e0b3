"""Sequential reads with the daemon's readahead return exactly the file's bytes.

Readahead decodes chunks in the background ahead of a sequential reader, and
reads wait for those loads instead of decoding twice. None of that may change
what a read returns: the right bytes, or EIO exactly where a chunk is damaged.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import threading
from pathlib import Path

import pytest
import trio
from fuse_helpers import Mount, find_in_packs, flip_byte, random_bytes, write_bytes

from buildatfs import reader as reader_module
from buildatfs.reader import Reader
from buildatfs.store import Store

pytestmark = pytest.mark.fuse

MiB = 1 << 20
KiB = 1 << 10
MAX_CHUNK = 256 * KiB  # chunker.ChunkerParams.max_size


def mixed_bytes(size: int, seed: int) -> bytes:
    """Incompressible stretches (stored raw) between compressible ones (zstd),
    so that both record codecs are read ahead."""
    parts = []
    for i in range(size // (192 * KiB) + 1):
        parts.append(random_bytes(128 * KiB, seed=seed * 1000 + i))
        parts.append((b"line %08d of a text that compresses well\n" % (seed * 1000 + i)) * 1560)
    return b"".join(parts)[:size]


def read_sequentially(path: Path, block: int) -> bytes:
    out = bytearray()
    fd = os.open(path, os.O_RDONLY)
    try:
        while chunk := os.read(fd, block):
            out += chunk
    finally:
        os.close(fd)
    return bytes(out)


def test_sequential_reads_return_the_bytes_cold_and_warm(mount_ctl: Mount) -> None:
    mount_ctl.mount()
    data = {name: mixed_bytes(24 * MiB + 12345, seed=i) for i, name in enumerate("ab")}
    for name, content in data.items():
        write_bytes(mount_ctl.mountpoint / name, content)
    mount_ctl.remount()  # committed, chunk cache empty
    for block in (MiB, 128 * KiB, 3 * MiB + 17):
        for name, content in data.items():
            assert read_sequentially(mount_ctl.mountpoint / name, block) == content, (name, block)
        mount_ctl.remount()  # the kernel's page cache goes with the mount

    # Two readers at once on each file: they share chunks being read ahead.
    digests: dict[tuple[str, int], str] = {}

    def reader(name: str, n: int) -> None:
        got = read_sequentially(mount_ctl.mountpoint / name, MiB)
        digests[(name, n)] = hashlib.sha256(got).hexdigest()

    threads = [threading.Thread(target=reader, args=(name, n)) for name in data for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (name, _), digest in digests.items():
        assert digest == hashlib.sha256(data[name]).hexdigest(), name
    assert len(digests) == 4


def test_damaged_chunk_ahead_of_the_reader_fails_only_where_it_is(mount_ctl: Mount) -> None:
    mount_ctl.fsck_args = ("--verify-data",)
    mount_ctl.fsck_codes = frozenset({1, 4})
    mount_ctl.expect_log(r"cannot be read", 1)  # once, by a read; readahead stays quiet
    mount_ctl.mount()
    content = random_bytes(16 * MiB, seed=7)
    victim = mount_ctl.mountpoint / "victim"
    write_bytes(victim, content)
    mount_ctl.umount()
    damage = 10 * MiB
    pack, offset = find_in_packs(mount_ctl.store, content[damage : damage + 64])
    flip_byte(pack, offset + 10)
    mount_ctl.mount()  # cold

    fd = os.open(victim, os.O_RDONLY)
    try:
        pos = 0
        with pytest.raises(OSError) as exc:
            while pos < len(content):
                got = os.read(fd, MiB)
                assert got == content[pos : pos + len(got)], f"wrong bytes at {pos}"
                pos += len(got)
        assert exc.value.errno == errno.EIO
        # The damaged chunk ends after the damage and is at most MAX_CHUNK long.
        assert damage - MAX_CHUNK - MiB < pos <= damage + 10, f"EIO at {pos}"

        # Page by page around the damage: EIO on one run of pages no longer
        # than a chunk, which holds the damaged byte; the right bytes elsewhere.
        bad = []
        for page in range(damage - 2 * MAX_CHUNK, damage + 2 * MAX_CHUNK, 4 * KiB):
            try:
                got = os.pread(fd, 4 * KiB, page)
            except OSError as err:
                assert err.errno == errno.EIO
                bad.append(page)
            else:
                assert got == content[page : page + 4 * KiB], f"wrong bytes at {page}"
        assert bad, "the damaged chunk read without error"
        assert bad == list(range(bad[0], bad[-1] + 4 * KiB, 4 * KiB)), "EIO pages not one run"
        assert bad[0] <= damage + 10 < bad[-1] + 4 * KiB
        assert bad[-1] + 4 * KiB - bad[0] <= MAX_CHUNK + 8 * KiB

        # Sequential reads past the damage go on with the right bytes.
        os.lseek(fd, 12 * MiB, os.SEEK_SET)
        pos = 12 * MiB
        while got := os.read(fd, MiB):
            assert got == content[pos : pos + len(got)], f"wrong bytes at {pos}"
            pos += len(got)
        assert pos == len(content)
    finally:
        os.close(fd)
    assert mount_ctl.pid is not None


def test_reads_wait_for_readahead_instead_of_loading_again(
    mount_ctl: Mount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: readahead of a whole file while a reader goes through it.

    Whichever gets to a chunk first loads it, the other waits or finds it
    cached, so every chunk is decoded exactly once.
    """
    mount_ctl.mount()
    content = mixed_bytes(12 * MiB + 5, seed=3)
    write_bytes(mount_ctl.mountpoint / "f", content)
    inode = os.stat(mount_ctl.mountpoint / "f").st_ino
    mount_ctl.umount()

    loads: collections.Counter[bytes] = collections.Counter()
    lock = threading.Lock()
    real_load = reader_module.load_chunk_sync

    def counting_load(store: Store, chunk_id: bytes, chunk: object) -> bytes:
        with lock:
            loads[chunk_id] += 1
        return real_load(store, chunk_id, chunk)  # type: ignore[arg-type]

    monkeypatch.setattr(reader_module, "load_chunk_sync", counting_load)
    store = Store.open(mount_ctl.store)

    async def read_through() -> tuple[bytes, Reader]:
        reader = Reader(store, trio.CapacityLimiter(2))
        out = bytearray()
        async with trio.open_nursery() as nursery:
            assert reader.readahead(nursery, inode, 0, len(content))
            for off in range(0, len(content), MiB):
                end = min(off + MiB, len(content))
                with store.env.begin() as txn:
                    pieces = reader.plan(txn, inode, off, end)
                buf = bytearray(end - off)
                await reader.fill(inode, off, buf, pieces)
                out += buf
        return bytes(out), reader

    try:
        out, reader = trio.run(read_through)
    finally:
        store.close()
    assert out == content
    assert len(loads) >= 12 * MiB // (256 * KiB)
    assert max(loads.values()) == 1, "a chunk was decoded twice"
    assert not reader._loading and reader.prefetching == 0
