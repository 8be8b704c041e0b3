"""Checking a store that is not mounted, and repairing what can be repaired.

Each check enforces one invariant of schema.py, reports every violation as a
`Problem`, and repairs it in the same write transaction unless asked only to
report. Damaged chunk data cannot be repaired: the files using it are named
and keep answering EIO for the damaged range, never wrong bytes.

Exit codes follow fsck(8): 0 no problem, 1 problems repaired, 4 problems left,
8 operational error, 16 usage error.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import stat
import sys
from pathlib import Path

import lmdb

from buildatfs import paths, recovery, schema
from buildatfs.errors import ChunkError, UserError
from buildatfs.schema import Extent, Inode, pair, read_pair, read_u64, u64
from buildatfs.store import Store, now_ns

log = logging.getLogger(__name__)

EXIT_CLEAN, EXIT_REPAIRED, EXIT_LEFT, EXIT_OPERATIONAL, EXIT_USAGE = 0, 1, 4, 8, 16
LOST_AND_FOUND = b"lost+found"


@dataclasses.dataclass
class Problem:
    check: str
    message: str
    repaired: bool


class Checker:
    """Runs every check over one store inside one write transaction."""

    def __init__(self, store: Store, repair: bool, verify_data: bool) -> None:
        self.store = store
        self.repair = repair
        self.verify_data = verify_data
        self.problems: list[Problem] = []
        self.db = store.dbs

    def found(self, check: str, message: str, repairable: bool = True) -> bool:
        """Record a problem; return True if the caller should repair it."""
        fix = self.repair and repairable
        self.problems.append(Problem(check, message, fix))
        log.info("%s: %s%s", check, message, " (repaired)" if fix else "")
        return fix

    def run(self, txn: lmdb.Transaction) -> None:
        checks = (
            self.check_dirents,
            self.check_tree,
            self.check_extents,
            self.check_chunks,
            self.check_packs,
            self.check_inode_data,
            self.check_counters,
        )
        for done, check in enumerate(checks):
            _progress(check.__name__.removeprefix("check_").replace("_", " "), done, len(checks))
            check(txn)
        _progress("", len(checks), len(checks))

    # -- every dirent has its dircookie and names a live inode -------------------

    def check_dirents(self, txn: lmdb.Transaction) -> None:
        """Invariant: dirents and dircookies mirror each other; children exist."""
        cookies = {}
        for key, name in txn.cursor(db=self.db["dircookies"]):
            cookies[key] = name
        seen = set()
        for key, value in list(txn.cursor(db=self.db["dirents"])):
            parent, name = read_u64(key[:8]), key[8:]
            child, cookie = read_pair(value)
            ckey = pair(parent, cookie)
            seen.add(ckey)
            if self.store.get_inode(txn, child) is None:
                if self.found(
                    "dirents", f"entry {name!r} in inode {parent} names missing inode {child}"
                ):
                    txn.delete(key, db=self.db["dirents"])
                    txn.delete(ckey, db=self.db["dircookies"])
            elif cookies.get(ckey) != name:
                if self.found("dirents", f"entry {name!r} in inode {parent} has no readdir cookie"):
                    txn.put(ckey, name, db=self.db["dircookies"])
        for ckey in cookies.keys() - seen:
            if self.found("dirents", f"readdir cookie {read_pair(ckey)} names no entry"):
                txn.delete(ckey, db=self.db["dircookies"])

    # -- every inode is reachable and its nlink counts its entries -----------

    def check_tree(self, txn: lmdb.Transaction) -> None:
        """Invariants: every inode with links is reachable from the root; nlink
        equals the number of entries (plus 2 and subdirectories for a directory)."""
        refs: collections.Counter[int] = collections.Counter()
        subdirs: collections.Counter[int] = collections.Counter()
        parents: dict[int, int] = {}
        for key, value in txn.cursor(db=self.db["dirents"]):
            parent, child = read_u64(key[:8]), read_pair(value)[0]
            refs[child] += 1
            rec = self.store.get_inode(txn, child)
            if rec is not None and stat.S_ISDIR(rec.mode):
                subdirs[parent] += 1
                parents[child] = parent
        reachable = self._reachable(txn)
        orphans = {read_u64(k) for k in txn.cursor(db=self.db["orphans"]).iternext(values=False)}
        for key, value in list(txn.cursor(db=self.db["inodes"])):
            inode, rec = read_u64(key), Inode.unpack(value)
            if inode not in reachable and inode != schema.ROOT_INODE:
                if inode in orphans and refs[inode] == 0:
                    if self.found("tree", f"inode {inode} is unlinked but was not purged"):
                        self.store.purge_inode(txn, inode)
                    continue
                if self.found("tree", f"inode {inode} is not reachable from the root"):
                    self._to_lost_found(txn, inode, rec)
                    refs[inode] += 1
                    if stat.S_ISDIR(rec.mode):
                        subdirs[self._lost_found(txn)] += 1
                rec = self.store.get_inode(txn, inode) or rec
            want = 2 + subdirs[inode] if stat.S_ISDIR(rec.mode) else refs[inode]
            if rec.nlink != want:
                if self.found("tree", f"inode {inode} has nlink {rec.nlink}, entries say {want}"):
                    rec.nlink = want
                    self.store.put_inode(txn, inode, rec)

    def _reachable(self, txn: lmdb.Transaction) -> set[int]:
        seen = {schema.ROOT_INODE}
        todo = [schema.ROOT_INODE]
        while todo:
            parent = todo.pop()
            for _, name in self.store.children(txn, parent):
                child = self.store.lookup(txn, parent, name)
                if child is None or child in seen:
                    continue
                seen.add(child)
                rec = self.store.get_inode(txn, child)
                if rec is not None and stat.S_ISDIR(rec.mode):
                    todo.append(child)
        return seen

    def _lost_found(self, txn: lmdb.Transaction) -> int:
        existing = self.store.lookup(txn, schema.ROOT_INODE, LOST_AND_FOUND)
        if existing is not None:
            return existing
        t = now_ns()
        rec = Inode(mode=0o40700, uid=0, gid=0, nlink=2, atime_ns=t, mtime_ns=t, ctime_ns=t)
        inode = self.store.create_inode(txn, rec)
        self.store.add_dirent(txn, schema.ROOT_INODE, LOST_AND_FOUND, inode)
        root = self.store.get_inode(txn, schema.ROOT_INODE)
        assert root is not None
        root.nlink += 1
        self.store.put_inode(txn, schema.ROOT_INODE, root)
        return inode

    def _to_lost_found(self, txn: lmdb.Transaction, inode: int, rec: Inode) -> None:
        txn.delete(u64(inode), db=self.db["orphans"])
        self.store.add_dirent(txn, self._lost_found(txn), str(inode).encode(), inode)

    # -- extents tile each file and name indexed chunks ----------------------

    def check_extents(self, txn: lmdb.Transaction) -> None:
        """Invariants: extents belong to regular files, do not overlap, lie inside
        the size, name indexed chunks and fit in them; allocated sums them."""
        self.refs: collections.Counter[bytes] = collections.Counter()
        allocated: collections.Counter[int] = collections.Counter()
        prev_inode, prev_end = -1, 0
        recs: dict[int, Inode | None] = {}
        for key, value in list(txn.cursor(db=self.db["extents"])):
            inode, offset = read_pair(key)
            ext = Extent.unpack(value)
            if inode not in recs:
                recs[inode] = self.store.get_inode(txn, inode)
            rec = recs[inode]
            if inode != prev_inode:
                prev_inode, prev_end = inode, 0
            chunk = self.store.get_chunk(txn, ext.chunk_id)
            bad = None
            if rec is None or not stat.S_ISREG(rec.mode):
                bad = "belongs to no regular file"
            elif offset < prev_end:
                bad = "overlaps the previous extent"
            elif offset + ext.length > rec.size:
                bad = "lies past the end of the file"
            elif chunk is None:
                bad = f"names chunk {ext.chunk_id.hex()[:16]} that is not indexed"
            elif ext.chunk_offset + ext.length > chunk.raw_len:
                bad = "reaches past the end of its chunk"
            if bad is not None:
                message = f"extent at {offset} of inode {inode} {bad}"
                if self.found("extents", message, repairable=chunk is not None or rec is None):
                    txn.delete(key, db=self.db["extents"])
                continue
            prev_end = offset + ext.length
            self.refs[ext.chunk_id] += 1
            allocated[inode] += ext.length
        for key, value in list(txn.cursor(db=self.db["inodes"])):
            inode, rec = read_u64(key), Inode.unpack(value)
            if stat.S_ISREG(rec.mode) and rec.allocated != allocated[inode]:
                if self.found(
                    "extents",
                    f"inode {inode} counts {rec.allocated} allocated bytes, "
                    f"extents hold {allocated[inode]}",
                ):
                    rec.allocated = allocated[inode]
                    self.store.put_inode(txn, inode, rec)

    # -- refcounts equal references; records lie in their packs --------------

    def check_chunks(self, txn: lmdb.Transaction) -> None:
        """Invariants: refcount equals the extents naming the chunk; no chunk
        without references; each record lies inside its pack (and, with
        --verify-data, decodes to bytes with its blake3 id)."""
        recorded = {read_u64(k): read_pair(v)[0] for k, v in txn.cursor(db=self.db["packs"])}
        present = self.store.packs.list_sync()
        # A record must lie inside both what the index recorded and the file.
        packs = {pack: min(size, present.get(pack, -1)) for pack, size in recorded.items()}
        self.live: collections.Counter[int] = collections.Counter()
        self.damaged: list[bytes] = []
        for key, value in list(txn.cursor(db=self.db["chunks"])):
            chunk = schema.Chunk.unpack(value)
            want = self.refs.get(key, 0)
            if want == 0:
                if self.found("chunks", f"chunk {key.hex()[:16]} has no references"):
                    txn.delete(key, db=self.db["chunks"])
                continue
            if chunk.refcount != want:
                if self.found(
                    "chunks",
                    f"chunk {key.hex()[:16]} has refcount {chunk.refcount}, {want} extents use it",
                ):
                    chunk.refcount = want
                    txn.put(key, chunk.pack_value(), db=self.db["chunks"])
            self.live[chunk.pack] += chunk.record_len
            if chunk.offset + chunk.record_len > packs.get(chunk.pack, -1):
                self.found(
                    "chunks",
                    f"chunk {key.hex()[:16]} lies outside pack {chunk.pack}",
                    repairable=False,
                )
                self.damaged.append(key)
            elif self.verify_data:
                try:
                    self.store.read_chunk_sync(key, chunk)
                except ChunkError as exc:
                    self.found(
                        "chunks", f"chunk {key.hex()[:16]} is damaged: {exc}", repairable=False
                    )
                    self.damaged.append(key)
        if self.damaged:
            self._name_damaged_files(txn)

    def _name_damaged_files(self, txn: lmdb.Transaction) -> None:
        """Report, as a problem of its own, every file that uses damaged data."""
        tree = paths.Tree.load(self.store, txn)
        for users in paths.users_of(self.store, txn, self.damaged).values():
            for inode, offsets in sorted(users.items()):
                names = b", ".join(tree.paths(inode)).decode(errors="replace") or f"inode {inode}"
                self.found(
                    "data",
                    f"{names} has damaged data at offset(s) {sorted(offsets)}; "
                    "reads there fail with EIO (restore the file from its source)",
                    repairable=False,
                )

    # -- packs: recorded sizes and dead bytes --------------------------------

    def check_packs(self, txn: lmdb.Transaction) -> None:
        """Invariants: each pack file is at least as long as recorded; dead
        bytes equal the recorded size minus the records of live chunks."""
        files = self.store.packs.list_sync()
        for key, value in list(txn.cursor(db=self.db["packs"])):
            pack = read_u64(key)
            size, dead = read_pair(value)
            if pack not in files:
                if self.live[pack]:
                    self.found("packs", f"pack {pack} is missing", repairable=False)
                elif self.found("packs", f"pack {pack} is missing and holds nothing live"):
                    txn.delete(key, db=self.db["packs"])
                continue
            if files[pack] < size:
                self.found("packs", f"pack {pack} is shorter than recorded", repairable=False)
            want_dead = size - self.live[pack]
            if dead != want_dead:
                if self.found(
                    "packs", f"pack {pack} records {dead} dead bytes, actually {want_dead}"
                ):
                    txn.put(key, pair(size, want_dead), db=self.db["packs"])

    # -- xattrs, symlinks and orphans belong to live inodes --------------------

    def check_inode_data(self, txn: lmdb.Transaction) -> None:
        """Invariants: xattrs, symlink targets, orphan and fragmented marks
        name live inodes; every symlink has a target."""
        for name in ("xattrs", "symlinks", "orphans"):
            for key in list(txn.cursor(db=self.db[name]).iternext(values=False)):
                inode = read_u64(key[:8])
                if self.store.get_inode(txn, inode) is None:
                    if self.found(name, f"entry for missing inode {inode}"):
                        txn.delete(key, db=self.db[name])
        meta = self.db["meta"]
        for inode in self.store.fragmented_inodes(txn):
            if self.store.get_inode(txn, inode) is None:
                if self.found("meta", f"fragmented mark for missing inode {inode}"):
                    self.store.set_fragmented(txn, inode, False)
        top = max(
            (read_u64(k) for k in txn.cursor(db=self.db["inodes"]).iternext(values=False)),
            default=schema.ROOT_INODE,
        )
        if read_u64(txn.get(b"next_inode", db=meta)) <= top:
            if self.found("meta", "the next inode number is already in use"):
                txn.put(b"next_inode", u64(top + 1), db=meta)

    # -- counters equal what they count -------------------------------------

    def check_counters(self, txn: lmdb.Transaction) -> None:
        """Invariant: the meta counters equal sums over inodes and chunks."""
        want = dict.fromkeys(schema.COUNTERS, 0)
        for value in txn.cursor(db=self.db["inodes"]).iternext(keys=False):
            rec = Inode.unpack(value)
            want["inodes"] += 1
            if stat.S_ISREG(rec.mode):
                want["files"] += 1
                want["logical_bytes"] += rec.size
            elif stat.S_ISDIR(rec.mode):
                want["directories"] += 1
        for value in txn.cursor(db=self.db["chunks"]).iternext(keys=False):
            want["chunks"] += 1
            want["unique_bytes"] += schema.Chunk.unpack(value).raw_len
        have = self.store.counters(txn)
        for name, value in want.items():
            if have[name] != value:
                if self.found("counters", f"{name} is {have[name]}, should be {value}"):
                    txn.put(name.encode(), u64(value), db=self.db["meta"])


def check(store: Store, repair: bool = True, verify_data: bool = False) -> list[Problem]:
    """Check (and repair) *store*, which must be locked by the caller."""
    problems = []
    if repair and not store.is_clean():
        for line in recovery.recover(store):
            problems.append(Problem("recovery", line, True))
    elif store.staging.exists() and any(store.staging.iterdir()):
        problems.append(Problem("staging", "staging files left by an unclean mount", False))
    else:
        # Left-overs of an interrupted gc or compaction in a store marked clean.
        for line in recovery.trim_packs(store, dry_run=not repair):
            problems.append(Problem("packs", line, repair))
    checker = Checker(store, repair, verify_data)
    with store.env.begin(write=repair) as txn:
        checker.run(txn)
        if not repair:
            txn.abort()
    problems += checker.problems
    if repair:
        store.set_clean(True)
    return problems


def main(path: Path, verify_data: bool, repair: bool) -> int:
    """Run fsck from the command line; return an fsck(8) exit code."""
    try:
        store = Store.open(path)
    except UserError as exc:
        print(f"buildatfs: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.exit_code == 2 else EXIT_OPERATIONAL
    try:
        try:
            store.lock()
        except UserError as exc:
            print(
                f"buildatfs: {exc} Unmount it, or let that command finish, first.", file=sys.stderr
            )
            return EXIT_OPERATIONAL
        problems = check(store, repair=repair, verify_data=verify_data)
    finally:
        store.close()
    left = [p for p in problems if not p.repaired]
    for p in problems:
        print(f"{p.check}: {p.message}{' (repaired)' if p.repaired else ''}")
    if not problems:
        print(f"{path}: clean")
        return EXIT_CLEAN
    print(f"{path}: {len(problems)} problem(s), {len(problems) - len(left)} repaired")
    return EXIT_LEFT if left else EXIT_REPAIRED


def _progress(step: str, done: int, total: int) -> None:
    """Show a progress bar on a terminal (stderr), and log the step."""
    if sys.stderr.isatty():
        width = 30
        filled = width * done // total
        bar = "#" * filled + "." * (width - filled)
        text = f"Checking {step}..." if step else "Checked."
        end = "\n" if done == total else ""
        print(f"\r[{bar}] {done}/{total} {text}".ljust(70), end=end, file=sys.stderr, flush=True)
    if step:
        log.info("Checking %s...", step)
