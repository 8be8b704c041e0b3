"""Staged writes: bytes kept in memory up to a budget, the rest in a staging
file, and what a read or a commit sees of them.

The state machine drives one `DirtyFile` (with a real staging file) through
writes, truncations and commits that succeed or fail, next to a model of the
file's bytes; after every step the committed bytes overlaid with the staged
ones must equal the model, and the budget must account for exactly the bytes
held in memory. The FUSE test checks the same through the mount, with more
data than the budget so that both places are used.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
from pathlib import Path

import pytest
from fuse_helpers import Mount, hand_to_daemon, random_bytes, read_bytes
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from buildatfs import staging
from buildatfs.staging import DirtyFile, MemoryBudget, Ranges

MiB = 1 << 20
SPAN = 4096  # offsets and sizes stay small, so that writes overlap often


class StagingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"staging-{os.getpid()}-{id(self)}"
        self.tmp.mkdir(parents=True)
        self.budget = MemoryBudget(0)
        self.dirty = DirtyFile(self.tmp / "1", 0, self.budget)
        self.model = bytearray()  # the file as the writer sees it
        self.committed = bytearray()  # what commits have put in the index
        self.pending: tuple[Ranges, bytes] | None = None  # a commit's ranges and bytes

    @rule(limit=st.sampled_from([0, 700, 3000, 1 << 30]))
    def set_budget(self, limit: int) -> None:
        self.budget.limit = limit

    @rule(offset=st.integers(0, SPAN), data=st.binary(min_size=1, max_size=900))
    def write(self, offset: int, data: bytes) -> None:
        self.dirty.write(offset, data)
        end = offset + len(data)
        if len(self.model) < end:
            self.model.extend(bytes(end - len(self.model)))
        self.model[offset:end] = data

    @precondition(lambda self: self.pending is None)
    @rule(size=st.integers(0, SPAN + 1000))
    def truncate(self, size: int) -> None:
        self.dirty.truncate(size)
        for buf in (self.model, self.committed):
            del buf[size:]
        self.model.extend(bytes(size - len(self.model)))

    @precondition(lambda self: self.pending is None)
    @rule()
    def begin_commit(self) -> None:
        if not self.dirty.ranges:
            return
        ranges, size = self.dirty.begin_commit()
        assert size == len(self.model)
        self.pending = (ranges, bytes(self.current()))

    @precondition(lambda self: self.pending is not None)
    @rule(done=st.booleans())
    def end_commit(self, done: bool) -> None:
        assert self.pending is not None
        ranges, seen = self.pending
        if done:
            if len(self.committed) < len(seen):
                self.committed.extend(bytes(len(seen) - len(self.committed)))
            for start, end in ranges:
                self.committed[start:end] = seen[start:end]
        self.dirty.end_commit(done)
        self.pending = None

    def current(self) -> bytearray:
        buf = bytearray(len(self.model))
        known = self.committed[: len(buf)]
        buf[: len(known)] = known
        self.dirty.overlay(0, buf)
        return buf

    @invariant()
    def reads_match(self) -> None:
        assert self.current() == self.model
        assert self.dirty.size == len(self.model)

    @invariant()
    def budget_counts_memory(self) -> None:
        assert self.budget.used == self.dirty.memory_cost

    def teardown(self) -> None:
        self.dirty.discard()
        assert self.budget.used == 0
        assert not (self.tmp / "1").exists()
        self.tmp.rmdir()


TestStaging = StagingMachine.TestCase
TestStaging.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_tiny_writes_are_charged_their_overhead(tmp_path: Path) -> None:
    """A stream of one-byte appends fills the budget with what the pieces
    cost in memory, not only with their bytes, then goes to the file."""
    budget = MemoryBudget(64 * 1024)
    dirty = DirtyFile(tmp_path / "9", 0, budget)
    for i in range(10_000):
        dirty.write(i, b"%c" % (i % 256))
    assert budget.used <= budget.limit
    assert budget.used == dirty.memory_cost
    assert 0 < dirty.filed.total < 10_000  # the rest went to the staging file
    buf = bytearray(10_000)
    dirty.overlay(0, buf)
    assert buf == bytes(i % 256 for i in range(10_000))
    dirty.discard()
    assert budget.used == 0


def test_short_staging_writes_are_finished(tmp_path: Path) -> None:
    """A staging-file write that the kernel cuts short (here by the file size
    limit) ends in an error, never in bytes silently left out."""
    dirty = DirtyFile(tmp_path / "10", 0, MemoryBudget(0))
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (MiB + 100, old[1]))
    try:
        with pytest.raises(OSError) as err:
            dirty.write(MiB, b"y" * 1000)  # 100 bytes fit, 900 do not
        assert err.value.errno == errno.EFBIG
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)
    dirty.discard()


def test_unused_staging_file_is_never_created(tmp_path: Path) -> None:
    dirty = DirtyFile(tmp_path / "7", 0, MemoryBudget(MiB))
    dirty.write(0, b"x" * 1000)
    assert not (tmp_path / "7").exists()
    dirty.discard()


@pytest.mark.fuse
def test_more_than_the_budget_staged_through_the_mount(mount_ctl: Mount) -> None:
    """A file larger than the memory budget, written without fsync, reads
    back right while staged (part in memory, part in the staging file), after
    overwrites that cross from one part into the other, and after a remount."""
    mount_ctl.mount()
    size = staging.MEMORY_LIMIT + 16 * MiB
    data = bytearray(random_bytes(size, seed=41))
    path = mount_ctl.mountpoint / "big"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for pos in range(0, size, MiB):
            os.pwrite(fd, data[pos : pos + MiB], pos)
        hand_to_daemon(fd)
        spilled = mount_ctl.store / "staging" / str(os.fstat(fd).st_ino)
        assert spilled.stat().st_size > 0  # the part past the memory budget
        assert os.pread(fd, size, 0) == data
        patch = random_bytes(3 * MiB, seed=42)
        at = staging.MEMORY_LIMIT - MiB - 12345  # from memory into the staging file
        os.pwrite(fd, patch, at)
        data[at : at + len(patch)] = patch
        hand_to_daemon(fd)
        assert os.pread(fd, size, 0) == data
        os.fsync(fd)
        assert not spilled.exists()
    finally:
        os.close(fd)
    assert read_bytes(path) == data
    mount_ctl.remount()
    assert read_bytes(path) == data
