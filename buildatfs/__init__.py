"""buildatfs: a deduplicating, compressing FUSE filesystem for container storage."""

__version__ = "0.1.0"
