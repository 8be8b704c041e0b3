"""What the store holds and what dedup and compression save.

Reads the index read-only; LMDB lets this run beside a mounted daemon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from buildatfs.store import Store


def collect(path: Path) -> dict[str, Any]:
    """Return the counters and ratios of the store at *path*."""
    store = Store.open(path, readonly=True)
    try:
        with store.env.begin() as txn:
            counters = store.counters(txn)
            pack_bytes, dead_bytes = store.stored_bytes(txn)
        meta_file = path / "meta" / "data.mdb"
        metadata_bytes = meta_file.stat().st_blocks * 512
    finally:
        store.close()
    logical = counters["logical_bytes"]
    unique = counters["unique_bytes"]
    return {
        "logical_bytes": logical,
        "unique_bytes": unique,
        "stored_bytes": pack_bytes,
        "dead_bytes": dead_bytes,
        "metadata_bytes": metadata_bytes,
        "chunks": counters["chunks"],
        "files": counters["files"],
        "directories": counters["directories"],
        "inodes": counters["inodes"],
        "dedup_ratio": _ratio(logical, unique),
        "compression_ratio": _ratio(unique, pack_bytes - dead_bytes),
        "overall_ratio": _ratio(logical, pack_bytes),
        "overall_ratio_with_metadata": _ratio(logical, pack_bytes + metadata_bytes),
    }


def _ratio(a: int, b: int) -> float:
    return round(a / b, 3) if b else 0.0


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    raise AssertionError


def render(report: dict[str, Any]) -> str:
    """Format *report* as a table for a person."""
    rows = [
        ("Logical bytes (file sizes)", _size(report["logical_bytes"])),
        ("Unique chunk bytes", _size(report["unique_bytes"])),
        ("Stored in packs", _size(report["stored_bytes"])),
        ("  of which dead (awaiting gc)", _size(report["dead_bytes"])),
        ("Metadata (LMDB)", _size(report["metadata_bytes"])),
        ("Dedup ratio", f"{report['dedup_ratio']:.2f}x"),
        ("Compression ratio", f"{report['compression_ratio']:.2f}x"),
        ("Overall ratio", f"{report['overall_ratio']:.2f}x"),
        ("Overall, counting metadata", f"{report['overall_ratio_with_metadata']:.2f}x"),
        ("Chunks", str(report["chunks"])),
        ("Files", str(report["files"])),
        ("Directories", str(report["directories"])),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
