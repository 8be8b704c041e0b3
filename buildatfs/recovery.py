"""Bringing a store that was not unmounted cleanly back to a mountable state.

What a killed daemon can leave behind, and what undoes it:

============================  =============================================
left behind                   repair
============================  =============================================
staging files                 deleted: never fsync'ed, so never promised
orphans (nlink 0, was open)   purged with their data
pack bytes past the size the  cut off: no index entry names them (data is
index recorded                written before references)
pack files the index never    deleted
named
records no index entry names  counted as dead bytes of their pack (a commit
between named ones            or pass cut short among other commits'
                              records)
============================  =============================================

Index changes are LMDB transactions, so the index itself is always one
committed state; fsync made that state durable.
"""

from __future__ import annotations

import logging
import shutil

from buildatfs import schema
from buildatfs.store import Store

log = logging.getLogger(__name__)


def recover(store: Store) -> list[str]:
    """Undo what an interrupted mount left behind; return what was done."""
    done = []
    staged = list(store.staging.iterdir()) if store.staging.exists() else []
    if staged:
        shutil.rmtree(store.staging)
        done.append(f"discarded {len(staged)} uncommitted staging file(s)")
    store.staging.mkdir(exist_ok=True)
    with store.env.begin(write=True) as txn:
        orphans = [
            schema.read_u64(k) for k in txn.cursor(db=store.dbs["orphans"]).iternext(values=False)
        ]
        for inode in orphans:
            store.purge_inode(txn, inode)
    if orphans:
        done.append(f"purged {len(orphans)} unlinked inode(s)")
    done += trim_packs(store)
    done += recount_dead(store)
    store.sync_sync()
    for line in done:
        log.info("Recovery: %s.", line)
    return done


def recount_dead(store: Store) -> list[str]:
    """Set each pack's dead bytes to its recorded size less the records of
    live chunks; return what changed."""
    done = []
    with store.env.begin(write=True) as txn:
        live: dict[int, int] = {}
        for value in txn.cursor(db=store.dbs["chunks"]).iternext(keys=False):
            chunk = schema.Chunk.unpack(value)
            live[chunk.pack] = live.get(chunk.pack, 0) + chunk.record_len
        for key, value in list(txn.cursor(db=store.dbs["packs"])):
            pack = schema.read_u64(key)
            size, dead = schema.read_pair(value)
            want = size - live.get(pack, 0)
            if want != dead and want >= 0:
                txn.put(key, schema.pair(size, want), db=store.dbs["packs"])
                done.append(f"counted {want} dead byte(s) in pack {pack} (was {dead})")
    return done


def trim_packs(store: Store, dry_run: bool = False) -> list[str]:
    """Delete pack files the index does not name and cut pack bytes past the
    size it recorded; return what was done (with *dry_run*, what would be).

    Only safe while nothing appends (at mount and unmount, offline): an
    interrupted commit, garbage collection or compaction leaves exactly such
    bytes, and none of them is named by the index.
    """
    done = []
    with store.env.begin() as txn:
        recorded = {
            schema.read_u64(k): schema.read_pair(v)[0] for k, v in txn.cursor(db=store.dbs["packs"])
        }
    for pack, size in store.packs.list_sync().items():
        if pack not in recorded:
            if not dry_run:
                store.packs.delete_sync(pack)
            done.append(f"pack {pack}, which no index entry names{'' if dry_run else ': deleted'}")
        elif size > recorded[pack]:
            extra = size - recorded[pack]
            done.append(
                f"{extra} unreferenced byte(s) at the end of pack {pack}"
                f"{'' if dry_run else ': cut off'}"
            )
            if not dry_run:
                store.packs.truncate_sync(pack, recorded[pack])
    return done
