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
    store.sync_sync()
    for line in done:
        log.info("Recovery: %s.", line)
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
            done.append(f"deleted pack {pack}, which no index entry names")
        elif size > recorded[pack]:
            if not dry_run:
                store.packs.truncate_sync(pack, recorded[pack])
            done.append(f"cut {size - recorded[pack]} unreferenced byte(s) off pack {pack}")
    return done
