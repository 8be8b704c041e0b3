#!/usr/bin/env python3
"""Summarize py-spy raw profiles (as `tools/bench.py --profile DIR` writes them)
into markdown tables: where the daemon's threads spent their samples.

    python3 tools/profile_summary.py [--top N] [--rate HZ] FILE...

Idle samples (a worker thread waiting for work, the trio thread waiting in
epoll) are counted apart, so the tables show busy time only. "self" is time
in the frame itself; "inclusive" is time in the frame and what it called.
Several files (one per daemon) are added up.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

# Frames where a thread waits rather than works.
IDLE_FRAMES = (
    "WorkerThread._work (trio/_core/_thread_cache.py",
    "EpollIOManager.get_events (trio/_core/_io_epoll.py",
    "Condition.wait (threading.py",
    "Event.wait (threading.py",
)


def short(frame: str) -> str:
    """`fn (path/to/mod.py:12)` -> `fn (mod.py:12)`."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else name


def summarize(files: list[Path], top: int, rate: float) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    busy = idle = 0
    for path in files:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = stack.split(";")
            if frames[-1].startswith(IDLE_FRAMES):
                idle += n
                continue
            busy += n
            own[short(frames[-1])] += n
            for frame in {short(f) for f in frames if _ours(f)}:
                inclusive[frame] += n
    out = [
        f"{busy / rate:.1f} s busy and {idle / rate:.1f} s idle in all threads "
        f"({busy + idle} samples at {rate:g} Hz, {len(files)} file(s)).",
        "",
        "| self | share | frame |",
        "|---:|---:|---|",
    ]
    for frame, n in own.most_common(top):
        out.append(f"| {n / rate:.2f} s | {n / max(busy, 1):.0%} | `{frame}` |")
    out += ["", "| inclusive | share | frame (buildatfs and pyfuse3) |", "|---:|---:|---|"]
    for frame, n in inclusive.most_common(top):
        out.append(f"| {n / rate:.2f} s | {n / max(busy, 1):.0%} | `{frame}` |")
    return "\n".join(out)


def _ours(frame: str) -> bool:
    """A frame of buildatfs or pyfuse3, below the daemon's entry point."""
    return ("buildatfs/" in frame or "pyfuse3" in frame) and not frame.startswith(_ENTRY)


_ENTRY = ("<module> ", "main ", "cmd_mount ")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=15, help="rows per table (default 15)")
    ap.add_argument(
        "--rate", type=float, default=200.0, help="py-spy's sampling rate in Hz (bench.py uses 200)"
    )
    args = ap.parse_args()
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        print(f"profile_summary: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    print(summarize(args.files, args.top, args.rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
