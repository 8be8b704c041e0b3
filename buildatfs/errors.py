"""Domain exceptions. Only fs.py turns them into errno values for FUSE."""

from __future__ import annotations


class BuildatfsError(Exception):
    """Base class of every error buildatfs raises on purpose."""


class UserError(BuildatfsError):
    """A mistake on the command line; printed as one line, exit code attached."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StoreBusy(UserError):
    """The store is mounted by another process."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=3)


class ChunkError(BuildatfsError):
    """A chunk cannot be read back as the bytes it was stored as."""


class ChunkCorrupt(ChunkError):
    """Stored bytes do not decode to data with the chunk's blake3 id."""


class ChunkMissing(ChunkError):
    """The index or a pack no longer has the chunk."""
