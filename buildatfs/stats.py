"""What the store holds and what dedup and compression save.

Reads the index read-only; LMDB lets this run beside a mounted daemon.

Besides the store-wide counters, `collect` can break usage down by group of
files: each top-level entry of the mount, and each Docker image (the files
of its layers). One scan of ``extents`` gives every chunk the set of groups
whose files use it; per group that yields:

``logical_bytes``          sizes of its regular files, each inode once
``unique_bytes``           raw bytes of the distinct chunks its files use
``exclusive_bytes``        raw bytes of those chunks no other group of the
                           same table uses
``shared_bytes``           unique minus exclusive: also used by another group
``exclusive_stored_bytes`` stored (record) bytes of the exclusive chunks
``reclaimable_bytes``      stored bytes of the chunks nothing else in the
                           store uses: what deleting the group would free
"""

from __future__ import annotations

import dataclasses
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lmdb

from buildatfs import dockerdb, schema
from buildatfs.paths import ROOT, Tree
from buildatfs.schema import Chunk, Inode, read_u64
from buildatfs.store import Store


def collect(path: Path, breakdown: bool = True) -> dict[str, Any]:
    """Return the counters and ratios of the store at *path*.

    With *breakdown*, also ``directories_breakdown`` (one row per top-level
    entry) and, if the store holds a Docker data-root, ``images``; that scans
    every inode, entry and extent in one read transaction.
    """
    store = Store.open(path, readonly=True)
    try:
        with store.env.begin() as txn:
            counters = store.counters(txn)
            pack_bytes, dead_bytes = store.stored_bytes(txn)
            extra = _breakdowns(store, txn) if breakdown else {}
        meta_file = path / "meta" / "data.mdb"
        metadata_bytes = meta_file.stat().st_blocks * 512
    finally:
        store.close()
    logical = counters["logical_bytes"]
    unique = counters["unique_bytes"]
    report = {
        "logical_bytes": logical,
        "unique_bytes": unique,
        "stored_bytes": pack_bytes,
        "dead_bytes": dead_bytes,
        "metadata_bytes": metadata_bytes,
        "chunks": counters["chunks"],
        "files": counters["files"],
        "directories": counters["directories"],
        "inodes": counters["inodes"],
        "dedup_ratio": ratio(logical, unique),
        "compression_ratio": ratio(unique, pack_bytes - dead_bytes),
        "overall_ratio": ratio(logical, pack_bytes),
        "overall_ratio_with_metadata": ratio(logical, pack_bytes + metadata_bytes),
    }
    report.update(extra)
    return report


def ratio(a: int, b: int) -> float:
    """a / b rounded for reports; 0.0 when b is 0."""
    return round(a / b, 3) if b else 0.0


# ---- breakdown by group -----------------------------------------------------


@dataclasses.dataclass
class Group:
    """A set of files to account for: every file below any of *roots*."""

    family: str  # groups of one family form one table
    roots: list[int]
    logical_bytes: int = 0
    unique_bytes: int = 0
    exclusive_bytes: int = 0
    exclusive_stored_bytes: int = 0
    reclaimable_bytes: int = 0

    def numbers(self) -> dict[str, int]:
        return {
            "logical_bytes": self.logical_bytes,
            "unique_bytes": self.unique_bytes,
            "shared_bytes": self.unique_bytes - self.exclusive_bytes,
            "exclusive_bytes": self.exclusive_bytes,
            "exclusive_stored_bytes": self.exclusive_stored_bytes,
            "reclaimable_bytes": self.reclaimable_bytes,
        }


def _breakdowns(store: Store, txn: lmdb.Transaction) -> dict[str, Any]:
    tree = Tree.load(store, txn)
    tops = sorted(tree.children(ROOT).items())
    groups = [Group("dirs", [inode]) for _, inode in tops]
    images = dockerdb.find_images(store, txn, tree)
    for image in images or []:
        roots = [layer.inode for layer in image.layers if layer.inode is not None]
        groups.append(Group("images", roots))
    account(store, txn, tree, groups)
    result: dict[str, Any] = {
        "directories_breakdown": [
            {"name": _show(name), **group.numbers()}
            for (name, _), group in zip(tops, groups, strict=False)
        ],
    }
    if images is not None:
        rows = []
        for image, group in zip(images, groups[len(tops) :], strict=True):
            rows.append(
                {
                    "id": image.image_id,
                    "tags": image.tags,
                    "driver": image.driver,
                    "layers": len(image.layers),
                    "layers_found": sum(1 for layer in image.layers if layer.inode is not None),
                    **group.numbers(),
                }
            )
        result["images"] = rows
    return result


def account(store: Store, txn: lmdb.Transaction, tree: Tree, groups: list[Group]) -> None:
    """Fill in the numbers of every group (see the module docstring).

    A group's exclusive and reclaimable bytes are judged against the other
    groups of its family; files that no group of a family holds (unlinked
    files still open, for instance) count as one more user, "outside".
    """
    sizes = _file_sizes(store, txn)
    families = sorted({g.family for g in groups})
    family_mask = dict.fromkeys(families, 0)
    for i, group in enumerate(groups):
        family_mask[group.family] |= 1 << i
    outside = {f: 1 << (len(groups) + j) for j, f in enumerate(families)}
    everyone_outside = sum(outside.values())

    # Which groups use each file.
    file_mask: dict[int, int] = {}
    below: dict[int, list[int]] = {}
    for i, group in enumerate(groups):
        members: set[int] = set()
        for root in group.roots:
            if root not in below:
                below[root] = [n for n in tree.descendants(root) if n in sizes]
            members.update(below[root])
        bit = 1 << i
        for inode in members:
            file_mask[inode] = file_mask.get(inode, 0) | bit
            group.logical_bytes += sizes[inode]
    for inode, mask in file_mask.items():
        for family in families:
            if not mask & family_mask[family]:
                file_mask[inode] = file_mask[inode] | outside[family]

    # Which groups use each chunk: one pass over the extents, in inode order.
    chunk_mask: dict[bytes, int] = {}
    last_inode, mask = -1, 0
    for key, value in txn.cursor(db=store.dbs["extents"]):
        inode = read_u64(key[:8])
        if inode != last_inode:
            last_inode, mask = inode, file_mask.get(inode, everyone_outside)
        chunk_id = bytes(value[: schema.CHUNK_ID_LEN])
        chunk_mask[chunk_id] = chunk_mask.get(chunk_id, 0) | mask

    for chunk_id, mask in chunk_mask.items():
        raw = txn.get(chunk_id, db=store.dbs["chunks"])
        if raw is None:
            continue  # an extent naming a missing chunk: fsck reports it
        chunk = Chunk.unpack(raw)
        for i in _bits(mask, len(groups)):
            group = groups[i]
            group.unique_bytes += chunk.raw_len
            bit = 1 << i
            if mask & family_mask[group.family] == bit:
                group.exclusive_bytes += chunk.raw_len
                group.exclusive_stored_bytes += chunk.record_len
                # Other families overlap by design (the top-level directory
                # that holds an image's layers), so only "outside" counts.
                if not mask & outside[group.family]:
                    group.reclaimable_bytes += chunk.record_len


def _bits(mask: int, limit: int) -> Iterable[int]:
    i = 0
    while mask and i < limit:
        if mask & 1:
            yield i
        mask >>= 1
        i += 1


def _file_sizes(store: Store, txn: lmdb.Transaction) -> dict[int, int]:
    """Return {inode: size} of every regular file."""
    sizes = {}
    for key, value in txn.cursor(db=store.dbs["inodes"]):
        rec = Inode.unpack(value)
        if stat.S_ISREG(rec.mode):
            sizes[read_u64(key)] = rec.size
    return sizes


def _show(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


# ---- output -----------------------------------------------------------------


def human_size(n: int) -> str:
    """Bytes in binary units for people: 512 B, 1.5 KiB, 3.2 GiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    raise AssertionError


_COLUMNS = (
    ("logical", "logical_bytes"),
    ("unique", "unique_bytes"),
    ("shared", "shared_bytes"),
    ("exclusive", "exclusive_bytes"),
    ("excl. stored", "exclusive_stored_bytes"),
    ("frees", "reclaimable_bytes"),
)


def render(report: dict[str, Any]) -> str:
    """Format *report* as tables for a person."""
    rows = [
        ("Logical bytes (file sizes)", human_size(report["logical_bytes"])),
        ("Unique chunk bytes", human_size(report["unique_bytes"])),
        ("Stored in packs", human_size(report["stored_bytes"])),
        ("  of which dead (awaiting gc)", human_size(report["dead_bytes"])),
        ("Metadata (LMDB)", human_size(report["metadata_bytes"])),
        ("Dedup ratio", f"{report['dedup_ratio']:.2f}x"),
        ("Compression ratio", f"{report['compression_ratio']:.2f}x"),
        ("Overall ratio", f"{report['overall_ratio']:.2f}x"),
        ("Overall, counting metadata", f"{report['overall_ratio_with_metadata']:.2f}x"),
        ("Chunks", str(report["chunks"])),
        ("Files", str(report["files"])),
        ("Directories", str(report["directories"])),
    ]
    width = max(len(name) for name, _ in rows)
    parts = ["\n".join(f"{name:<{width}}  {value}" for name, value in rows)]
    if report.get("directories_breakdown"):
        table = [
            [row["name"]] + [human_size(row[k]) for _, k in _COLUMNS]
            for row in report["directories_breakdown"]
        ]
        parts.append(
            "By top-level entry (shared/exclusive: with the other top-level entries)\n"
            + _table(["entry", *(c for c, _ in _COLUMNS)], table)
        )
    if report.get("images") is not None:
        table = [
            [
                row["id"].removeprefix("sha256:")[:12],
                ", ".join(row["tags"]) or "<none>",
                str(row["layers"]),
            ]
            + [human_size(row[k]) for _, k in _COLUMNS]
            for row in report["images"]
        ]
        parts.append(
            "Docker images (shared/exclusive: with the other images; frees: stored "
            "bytes no one else uses)\n"
            + _table(["image", "tags", "layers", *(c for c, _ in _COLUMNS)], table)
        )
    return "\n\n".join(parts)


def _table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "  (none)"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])]
        for i in range(1, len(row)):
            text_col = header[i] in ("tags",)
            cells.append(row[i].ljust(widths[i]) if text_col else row[i].rjust(widths[i]))
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


_HELP = {
    "logical_bytes": "Sum of the sizes of regular files, each inode once.",
    "unique_bytes": "Raw bytes of the distinct chunks in use.",
    "stored_bytes": "Bytes in pack files, dead records included.",
    "dead_bytes": "Bytes of pack records no chunk uses any more (awaiting gc).",
    "metadata_bytes": "Disk space of the LMDB index.",
    "chunks": "Distinct chunks in use.",
    "files": "Regular-file inodes.",
    "directories": "Directory inodes.",
    "inodes": "Inodes of every kind.",
    "dedup_ratio": "Logical bytes over unique bytes.",
    "compression_ratio": "Unique bytes over live stored bytes.",
    "overall_ratio": "Logical bytes over stored bytes.",
    "overall_ratio_with_metadata": "Logical bytes over stored plus metadata bytes.",
}
_GROUP_HELP = {
    "logical_bytes": "Sizes of the regular files in it, each inode once.",
    "unique_bytes": "Raw bytes of the distinct chunks its files use.",
    "shared_bytes": "Unique bytes also used by another {what}.",
    "exclusive_bytes": "Unique bytes no other {what} uses.",
    "exclusive_stored_bytes": "Stored bytes of the chunks no other {what} uses.",
    "reclaimable_bytes": "Stored bytes of the chunks nothing else in the store uses.",
}


def render_prometheus(report: dict[str, Any]) -> str:
    """Format *report* in the Prometheus text exposition format (version 0.0.4)."""
    out: list[str] = []
    for key, help_text in _HELP.items():
        name = f"buildatfs_{key}"
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {report[key]}"]
    families = [
        (
            "dir",
            "top-level entry",
            report.get("directories_breakdown") or [],
            lambda row: {"dir": row["name"]},
        )
    ]
    families.append(
        (
            "image",
            "image",
            report.get("images") or [],
            lambda row: {"image": row["id"], "tags": ",".join(row["tags"])},
        )
    )
    for prefix, what, rows, labels in families:
        if not rows:
            continue
        for key, help_text in _GROUP_HELP.items():
            name = f"buildatfs_{prefix}_{key}"
            out += [f"# HELP {name} {help_text.format(what=what)}", f"# TYPE {name} gauge"]
            out += [f"{name}{_labels(labels(row))} {row[key]}" for row in rows]
    return "\n".join(out) + "\n"


def _labels(labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
